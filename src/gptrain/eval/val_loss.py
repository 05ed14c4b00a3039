"""Validation loss, perplexity and bits per byte: over a seeded sample of windows spread across the
whole val split (during training), or over every token of a split (`gptrain eval`).

Bits per byte = summed negative log-likelihood (nats) of the targets / (ln 2 x the UTF-8 bytes those
targets decode to). A document separator counts 0 bytes and is left out of both sums; an unknown
symbol counts 0 bytes here (prepared shards never hold one: a character alphabet is fitted on train
and val), while HellaSwag counts the bytes of the text it stood for.

Dims: B batch, T sequence, N windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from gptrain.data.loader import ShardLoader
from gptrain.errors import UserError

SAMPLE_SEED = 20240520  # fixed, not the run's seed: runs with different seeds are validated on the same tokens


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = 100  # 0: only at the end
    num_batches: int = 10  # val batches per evaluation, when num_tokens is 0
    num_tokens: int = 0  # > 0: a sample of this many tokens spread over the val split (all of it if smaller)
    patience: int = 0  # stop after this many evaluations without a new best val loss; 0: never
    hellaswag_every_steps: int = 0  # HellaSwag at these steps (a multiple of every_steps) and at the end; 0: off
    hellaswag_limit: int = 0  # score the first N items only; 0: all 10,042
    hellaswag_file: str = ""  # a local HellaSwag JSONL; empty: the official val set, downloaded once

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.num_batches < 1 or self.patience < 0 or self.num_tokens < 0:
            raise UserError("eval.every_steps, eval.patience and eval.num_tokens must be >= 0, "
                            "eval.num_batches >= 1")
        if self.hellaswag_every_steps < 0 or self.hellaswag_limit < 0:
            raise UserError("eval.hellaswag_every_steps and eval.hellaswag_limit must be >= 0")
        if self.hellaswag_every_steps and (not self.every_steps or self.hellaswag_every_steps % self.every_steps):
            raise UserError(f"eval.hellaswag_every_steps ({self.hellaswag_every_steps}) must be a multiple of "
                            f"eval.every_steps ({self.every_steps}): HellaSwag runs with a validation")


def num_eval_windows(cfg: EvalConfig, batch_size: int, block_size: int) -> int:
    """Windows per evaluation: eval.num_tokens worth, else eval.num_batches micro batches."""
    return -(-cfg.num_tokens // block_size) if cfg.num_tokens else cfg.num_batches * batch_size


def _with_skip(windows: np.ndarray, skip: int = 0) -> np.ndarray:
    """(shard, start) windows as (shard, start, skip)."""
    return np.concatenate([windows, np.full((len(windows), 1), skip, dtype=np.int64)], axis=1)


def sample_windows(loader: ShardLoader, count: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """(shard, start, 0) of count windows spread over the whole split: one seeded pick in each of count
    equal stretches of its windows, in order (every window when count covers the split). The same
    windows every time, whatever the number of ranks or the micro batch."""
    windows = loader.split_windows()
    n = len(windows)
    if count < n:
        lo, hi = np.arange(count) * n // count, np.arange(1, count + 1) * n // count
        windows = windows[lo + np.random.default_rng([seed, count]).integers(0, hi - lo)]
    return _with_skip(windows)


def full_split_windows(loader: ShardLoader) -> np.ndarray:
    """(shard, start, skip) windows whose targets are every token of the split once (but each shard's
    first): the regular windows, then per shard one window ending at its last token (shorter for a
    shard shorter than a window) whose first `skip` targets, already scored, are left out."""
    windows, T = loader.split_windows(), loader.block_size
    tails = []
    for i, tokens in enumerate(loader.shards):
        covered = (len(tokens) - 1) // T * T  # targets the regular windows score in this shard
        if len(tokens) - 1 > covered:
            start = max(0, len(tokens) - T - 1)
            tails.append([i, start, covered - start])
    return np.concatenate([_with_skip(windows), np.array(tails, dtype=np.int64).reshape(-1, 3)])


def val_set_id(fingerprint: str, windows: np.ndarray, block_size: int) -> str:
    """An id of the tokens a val sample scores: runs with equal ids were validated on the same tokens."""
    digest = hashlib.sha256(f"{fingerprint}:{block_size}:".encode() + np.ascontiguousarray(windows).tobytes())
    return digest.hexdigest()[:16]


def _read(loader: ShardLoader, windows: np.ndarray) -> tuple[Tensor, Tensor]:
    """(x, y) for (shard, start, skip) windows: targets are -1 for the first `skip` (scored elsewhere) and
    past the end of a shard shorter than a window (its inputs padded; causal attention never sees them)."""
    T = loader.block_size
    rows = np.zeros((len(windows), T + 1), dtype=np.int64)
    lengths = np.zeros(len(windows), dtype=np.int64)
    for r, (shard, start, _) in enumerate(windows):
        piece = loader.shards[int(shard)][int(start) : int(start) + T + 1]
        rows[r, : len(piece)], lengths[r] = piece, len(piece)
    batch = torch.from_numpy(rows)
    x_NT, y_NT = batch[:, :-1], batch[:, 1:]
    pos_T = torch.arange(T)[None, :]
    is_unscored = (pos_T < torch.from_numpy(windows[:, 2:3])) | (pos_T >= torch.from_numpy(lengths[:, None]) - 1)
    return x_NT, y_NT.masked_fill(is_unscored, -1)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    loader: ShardLoader,
    windows: np.ndarray,
    device: str,
    *,
    byte_lengths: list[int] | None = None,
    eot_id: int = -1,
    autocast: contextlib.AbstractContextManager | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Mean loss per target token over the given (shard, start, skip) windows, perplexity, and bits per
    byte (with byte_lengths, the bytes of each token id; eot_id's targets are left out of it).

    The windows are shared among the loader's ranks and reduced as sums and counts (reduce_sum sums
    a tensor over ranks), so the figures do not depend on the number of ranks. Every rank runs the
    same number of forwards (a rank with no windows left runs one with weight 0): under FSDP each
    forward is a collective. on_batch(windows done) reports progress.
    """
    was_training = model.training
    model.eval()
    B, W, rank = loader.batch_size, loader.world_size, loader.rank
    lengths = torch.tensor(byte_lengths or [0], dtype=torch.float32, device=device)
    # Batch sums in fp32 on the device (MPS has no fp64), totals in fp64: a whole split is millions of tokens.
    totals = torch.zeros(4, dtype=torch.float64)  # nats of all targets, their count, nats and bytes without EOT
    for begin in range(0, len(windows), W * B):
        mine = windows[begin + rank * B : begin + (rank + 1) * B]
        x_BT, y_BT = _read(loader, mine if len(mine) else windows[:1])
        x_BT, y_BT = x_BT.to(device), y_BT.to(device)
        with autocast or contextlib.nullcontext():
            nll_BT = model(x_BT, y_BT, reduction="none").float()
        scored_BT = y_BT >= 0
        counted_BT = scored_BT & (y_BT != eot_id)
        bytes_BT = lengths[y_BT.clamp(0, len(lengths) - 1)] if byte_lengths else torch.zeros_like(nll_BT)
        batch = torch.stack([nll_BT.sum(), scored_BT.sum(), nll_BT[counted_BT].sum(), bytes_BT[counted_BT].sum()])
        totals += batch.cpu().double() * (1.0 if len(mine) else 0.0)
        if on_batch is not None:
            on_batch(min(begin + W * B, len(windows)))
    if reduce_sum is not None:
        totals = totals.to(device)
        reduce_sum(totals)
    model.train(was_training)
    nats, count, counted_nats, num_bytes = totals.tolist()
    loss = nats / count
    bpb = counted_nats / (math.log(2) * num_bytes) if num_bytes else float("nan")
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0)), "val_bpb": bpb,
            "val_num_tokens": int(count)}
