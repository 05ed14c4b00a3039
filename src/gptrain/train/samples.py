"""Text samples written during training, to show what the model has learned so far."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptrain.errors import UserError
from gptrain.model.generate import generate
from gptrain.model.gpt import GPT
from gptrain.tokenizer import EOT_TEXT, Tokenizer
from gptrain.tokenizer.base import prompt_ids


@dataclass(kw_only=True)
class SamplesConfig:
    every_steps: int = 300  # 0: only at the end
    num_tokens: int = 120
    prompt: str = "\n"  # empty: start from the document separator
    temperature: float = 0.8
    top_k: int = 50
    seed: int = 1234  # fixed, so that samples from step to step are comparable

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.num_tokens < 1 or self.temperature <= 0 or self.top_k < 0:
            raise UserError("samples.every_steps and samples.top_k must be >= 0, samples.num_tokens >= 1, "
                            "samples.temperature > 0")


def write_sample(model: GPT, tokenizer: Tokenizer, cfg: SamplesConfig, device: str) -> str:
    """Generate one sample from the prompt with a fixed seed; returns prompt + continuation."""
    idx = torch.tensor([prompt_ids(tokenizer, cfg.prompt)], dtype=torch.long, device=device)
    out = generate(model, idx, cfg.num_tokens, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed)
    text = tokenizer.decode(out[0].tolist())
    return text if cfg.prompt else text.removeprefix(EOT_TEXT)
