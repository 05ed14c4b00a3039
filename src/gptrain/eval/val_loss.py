"""Validation loss and perplexity over a fixed set of held-out windows.

Dims: B batch, T sequence.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from gptrain.data.loader import ShardLoader
from gptrain.errors import UserError


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = 100  # 0: only at the end
    num_batches: int = 10  # val batches per evaluation (the same windows every time)
    patience: int = 0  # stop after this many evaluations without a new best val loss; 0: never

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.num_batches < 1 or self.patience < 0:
            raise UserError("eval.every_steps and eval.patience must be >= 0, eval.num_batches >= 1")


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    loader: ShardLoader,
    num_batches: int,
    device: str,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Mean loss over the loader's first num_batches batches (it is rewound first), and perplexity."""
    was_training = model.training
    model.eval()
    loader.reset()
    num_batches = min(num_batches, max(1, loader.windows_per_epoch // loader.batch_size))
    total = torch.zeros((), device=device)
    for _ in range(num_batches):
        x_BT, y_BT = loader.next_batch()
        with autocast or contextlib.nullcontext():
            total += model(x_BT.to(device), y_BT.to(device)).float()
    model.train(was_training)
    val_loss = total.item() / num_batches
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}
