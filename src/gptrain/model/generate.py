"""Sampling from a GPT: greedy, temperature, top-k, top-p, stop tokens; streamed with a KV cache.

Dims: B batch, T sequence, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gptrain.errors import UserError
from gptrain.model.gpt import GPT, KVCache


@dataclass(kw_only=True)
class SampleConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    is_greedy: bool = False
    seed: int | None = None
    stop_tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if not (0 < self.temperature < math.inf) and not self.is_greedy:
            raise UserError(f"temperature must be a finite number > 0 (got {self.temperature}); use --greedy for "
                            "argmax")
        if self.seed is not None and self.seed < 0:
            raise UserError(f"seed must be >= 0 (got {self.seed})")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1] (got {self.top_p})")


def filter_logits(logits_BV: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with mass >= top_p."""
    if top_k > 0 and top_k < logits_BV.size(-1):
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        cum_BV = torch.softmax(sorted_BV, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted_BV = (cum_BV - torch.softmax(sorted_BV, dim=-1)) >= top_p
        drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    return logits_BV


def pick_next(
    logits_BV: Tensor, cfg: SampleConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Choose the next token for each row: argmax when greedy, else a filtered, tempered sample."""
    if cfg.is_greedy:
        return logits_BV.argmax(dim=-1, keepdim=True)
    logits_BV = filter_logits(logits_BV.float() / cfg.temperature, cfg.top_k, cfg.top_p)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator)


@torch.no_grad()
def stream_tokens(model: GPT, idx_BT: Tensor, cfg: SampleConfig) -> Iterator[Tensor]:
    """Yield the next token (B, 1) at each step; KV cache while the text fits the context.

    Past the context the window slides, and because positions are absolute, the cache is rebuilt:
    the output equals a plain crop-and-recompute loop, only faster inside the window.
    """
    was_training = model.training
    model.eval()
    block = model.config.block_size
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=idx_BT.device).manual_seed(cfg.seed)
    cache: KVCache | None = None
    stop_ids = torch.tensor(cfg.stop_tokens, device=idx_BT.device) if cfg.stop_tokens else None
    try:
        for _ in range(cfg.max_new_tokens):
            if cache is None or cache.length >= block:
                cache = KVCache(model.config.n_layer)
                logits_BTV = model(idx_BT[:, -block:], cache=cache)
            else:
                logits_BTV = model(idx_BT[:, -1:], cache=cache)
            next_B1 = pick_next(logits_BTV[:, -1, :], cfg, generator)
            idx_BT = torch.cat([idx_BT, next_B1], dim=1)
            yield next_B1
            if stop_ids is not None and bool(torch.isin(next_B1, stop_ids).all()):
                return
    finally:
        model.train(was_training)


def generate(model: GPT, idx_BT: Tensor, max_new_tokens: int, **options) -> Tensor:
    """Return idx_BT extended by up to max_new_tokens tokens (options: SampleConfig fields)."""
    cfg = SampleConfig(max_new_tokens=max_new_tokens, **options)
    new = list(stream_tokens(model, idx_BT, cfg))
    return torch.cat([idx_BT, *new], dim=1) if new else idx_BT
