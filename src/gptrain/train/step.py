"""One optimizer step: gradient accumulation over micro steps, clipping, a guard against bad steps."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from gptrain.data.loader import ShardLoader
from gptrain.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 32  # micro batch: sequences per forward/backward on one device
    batch_tokens: int = 0  # global batch in tokens; 0: one micro batch per device (no accumulation)
    num_steps: int = 1500
    num_epochs: float = 0.0  # > 0: train this many passes over the train split instead of num_steps
    precision: str = "auto"  # auto: bf16 autocast on GPUs that have it, fp32 elsewhere
    compile: str = "auto"  # auto: torch.compile on CUDA only
    max_bad_steps: int = 10  # skipped steps in a row (non-finite, or spikes) before the run stops
    spike_factor: float = 0.0  # skip an update whose loss exceeds this times the running mean; 0: off
    log_every_steps: int = 10

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"train.batch_size must be at least 1 (got {self.batch_size})")
        if self.num_steps < 1 and self.num_epochs <= 0:
            raise UserError("train.num_steps must be at least 1 (or set train.num_epochs)")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.compile not in COMPILE_MODES:
            raise UserError(f"train.compile must be one of {', '.join(COMPILE_MODES)} (got {self.compile!r})")
        if self.spike_factor < 0 or (0 < self.spike_factor <= 1):
            raise UserError(f"train.spike_factor must be 0 (off) or above 1 (got {self.spike_factor})")
        if self.log_every_steps < 1:
            raise UserError("train.log_every_steps must be at least 1")


def autocast_context(device: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (when asked or 'auto' and supported); fp32 everywhere else."""
    is_cuda = device.startswith("cuda")
    use_bf16 = precision == "bf16" or (precision == "auto" and is_cuda and torch.cuda.is_bf16_supported())
    if use_bf16 and not is_cuda:
        raise UserError("train.precision=bf16 needs a CUDA GPU here; use fp32 on this device")
    if use_bf16:
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    loss: float  # mean loss over the step's micro batches
    grad_norm: float  # global norm before clipping
    is_applied: bool  # False when the step was skipped: non-finite loss or gradient, or a loss spike


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: ShardLoader,
    *,
    num_micro_steps: int,
    lr: float,
    grad_clip: float,
    device: str,
    autocast: contextlib.AbstractContextManager,
    max_loss: float = float("inf"),
) -> StepResult:
    """Forward/backward num_micro_steps micro batches, clip, and update, unless the loss or gradient is
    non-finite or the loss exceeds max_loss (a spike)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for _ in range(num_micro_steps):
        x_BT, y_BT = loader.next_batch()
        if device.startswith("cuda"):  # pinned host memory makes the copy truly asynchronous
            x_BT, y_BT = x_BT.pin_memory(), y_BT.pin_memory()
        x_BT = x_BT.to(device, non_blocking=True)
        y_BT = y_BT.to(device, non_blocking=True)
        with autocast:
            loss = model(x_BT, y_BT) / num_micro_steps
        loss.backward()
        loss_sum += loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    # The one host sync of the step: loss and norm come back together and decide whether to update.
    loss, norm = torch.stack([loss_sum, grad_norm.to(loss_sum.device)]).tolist()
    is_applied = math.isfinite(loss) and math.isfinite(norm) and loss <= max_loss
    if is_applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, grad_norm=norm, is_applied=is_applied)
