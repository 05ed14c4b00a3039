"""Validation loss and perplexity over a fixed set of held-out windows.

Dims: B batch, T sequence.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gptrain.data.loader import ShardLoader
from gptrain.errors import UserError


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = 100  # 0: only at the end
    num_batches: int = 10  # val batches per evaluation (the same windows every time)
    num_tokens: int = 0  # > 0: evaluate on this many tokens instead (the same whatever the batch and ranks)
    patience: int = 0  # stop after this many evaluations without a new best val loss; 0: never

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.num_batches < 1 or self.patience < 0 or self.num_tokens < 0:
            raise UserError("eval.every_steps, eval.patience and eval.num_tokens must be >= 0, "
                            "eval.num_batches >= 1")


def num_eval_windows(cfg: EvalConfig, batch_size: int, block_size: int) -> int:
    """Windows per evaluation: eval.num_tokens worth, else eval.num_batches micro batches."""
    return -(-cfg.num_tokens // block_size) if cfg.num_tokens else cfg.num_batches * batch_size


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    loader: ShardLoader,
    num_windows: int,
    device: str,
    autocast: contextlib.AbstractContextManager | None = None,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float]:
    """Mean loss per token over the first num_windows windows of the loader, and perplexity.

    The windows are shared among the loader's ranks and the loss is reduced as a sum and a count
    (reduce_sum sums a tensor over ranks), so the figure does not depend on the number of ranks.
    Every rank runs the same number of forwards (a rank with no windows left runs one with weight 0),
    because under FSDP each forward is a collective.
    """
    was_training = model.training
    model.eval()
    B, W, rank = loader.batch_size, loader.world_size, loader.rank
    loader.reset()
    windows = loader.take_windows(min(num_windows, loader.windows_per_epoch))
    totals = torch.zeros(2, device=device)  # loss sum, token count
    for start in range(0, len(windows), W * B):
        mine = windows[start + rank * B : start + (rank + 1) * B]
        weight = 1.0 if len(mine) else 0.0
        x_BT, y_BT = loader.read(mine if len(mine) else windows[:1])
        with autocast or contextlib.nullcontext():
            loss = model(x_BT.to(device), y_BT.to(device)).float()
        totals += torch.stack([loss * y_BT.numel(), torch.tensor(float(y_BT.numel()), device=device)]) * weight
    if reduce_sum is not None:
        reduce_sum(totals)
    model.train(was_training)
    loss_sum, count = totals.tolist()
    val_loss = loss_sum / count
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}
