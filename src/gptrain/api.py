"""Checkpoint: load a trained model with its tokenizer and config; generate text and evaluate it from Python."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gptrain.config import RunConfig, from_toml_text
from gptrain.distributed.env import resolve_device
from gptrain.errors import UserError
from gptrain.eval.checkpoint import evaluate_split, find_eval_dataset
from gptrain.eval.hellaswag import run_hellaswag
from gptrain.model.generate import SampleConfig, stream_tokens
from gptrain.model.gpt import GPT
from gptrain.tokenizer import Tokenizer, load_tokenizer
from gptrain.tokenizer.base import prompt_ids
from gptrain.train.checkpoint import load_model_weights, read_checkpoint
from gptrain.train.step import autocast_context


@dataclass
class Checkpoint:
    path: Path
    model: GPT
    tokenizer: Tokenizer
    config: RunConfig
    state: dict

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Checkpoint:
        """A checkpoint folder, or a run directory (its final/, else latest, else best checkpoint), or a
        Hugging Face folder or Hub name (gptrain.interop.resolve_model_source)."""
        from gptrain.interop import resolve_model_source

        folder = resolve_model_source(path)  # a gptrain checkpoint or run; or an HF folder or Hub name, imported
        pieces = read_checkpoint(folder, with_optimizer=False)
        config = from_toml_text(pieces["config_toml"])
        tokenizer = load_tokenizer(pieces["tokenizer_path"])
        model = GPT(replace(config.model, vocab_size=tokenizer.vocab_size))
        load_model_weights(model, pieces["model"], folder)
        model.to(resolve_device(device)).eval()
        return cls(path=folder, model=model, tokenizer=tokenizer, config=config, state=pieces["state"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def stream(self, prompt: str = "", max_new_tokens: int = 200, **options) -> Iterator[str]:
        """Yield text pieces as tokens are sampled (options: SampleConfig fields, e.g. top_k=50)."""
        cfg = SampleConfig(max_new_tokens=max_new_tokens, **options)
        idx = torch.tensor([prompt_ids(self.tokenizer, prompt)], dtype=torch.long, device=self.device)
        new: list[int] = []
        printed = ""
        for token in stream_tokens(self.model, idx, cfg):
            new.append(int(token[0, 0]))
            text = self.tokenizer.decode(new)
            # Hold back an unfinished multi-byte character until its last byte arrives.
            stable = text.rstrip("\ufffd")
            if len(stable) > len(printed):
                yield stable[len(printed):]
                printed = stable
        final = self.tokenizer.decode(new)
        if len(final) > len(printed):
            yield final[len(printed):]

    def generate(self, prompt: str = "", max_new_tokens: int = 200, **options) -> str:
        """The prompt's continuation as one string."""
        return "".join(self.stream(prompt, max_new_tokens, **options))

    @property
    def step(self) -> int:
        return int(self.state.get("train", {}).get("step", 0))

    def _autocast(self):
        """The run's precision on a GPU; fp32 on the CPU, where bf16 (emulated on many CPUs) is opt-in for
        training only: a checkpoint scores and samples the same there whatever it was trained in."""
        precision = "fp32" if str(self.device) == "cpu" else self.config.train.precision
        return autocast_context(str(self.device), precision)

    def evaluate(self, data: str | None = None, split: str = "val", batch_size: int | None = None,
                 show_progress: bool | None = False, log=print) -> dict[str, float]:
        """Loss, perplexity, bits per byte and token count over a whole split: the run's own val split
        (found from any working directory, or re-prepared), or that of `data` (a catalogue name or path)."""
        if split not in ("train", "val"):
            raise UserError(f"split must be train or val (got {split!r})")
        folder = find_eval_dataset(self.config, self.tokenizer, self.state, data, log=log)
        return {"data": str(folder), "split": split} | evaluate_split(
            self.model, self.tokenizer, folder, split, str(self.device),
            batch_size=batch_size or self.config.train.batch_size, autocast=self._autocast(),
            show_progress=show_progress)

    def hellaswag(self, file: str | Path | None = None, limit: int | None = None, batch_size: int = 8,
                  show_progress: bool | None = False, log=print) -> dict[str, float]:
        """HellaSwag accuracies (acc, acc_norm, acc_norm_bytes, over all and over scored items) and counts,
        on a local JSONL in the official format or the official val set (downloaded once)."""
        metrics = run_hellaswag(self.model, self.tokenizer, str(self.device), file=file, limit=limit,
                                batch_size=batch_size, autocast=self._autocast(), log=log,
                                show_progress=show_progress)
        return {k.removeprefix("hellaswag_"): v for k, v in metrics.items()}
