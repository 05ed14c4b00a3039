"""One optimizer step: gradient accumulation over micro steps, clipping, a guard against bad steps."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gptrain.data.loader import ShardLoader
from gptrain.distributed.parallel import gather_norm
from gptrain.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("auto", "on", "off")


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 32  # micro batch: sequences per forward/backward on one device
    batch_tokens: int = 0  # global batch in tokens; 0: one micro batch per device (no accumulation)
    num_steps: int = 1500
    num_epochs: float = 0.0  # > 0: train this many passes over the train split instead of num_steps
    budget: str = ""  # a wall-clock time (90s, 10m, 1.5h) instead of num_steps/num_epochs (train/budget.py);
    # a run given no steps, epochs or budget at all gets config.DEFAULT_BUDGET (10m)
    precision: str = "auto"  # auto: bf16 autocast on GPUs that have it, fp32 elsewhere; bf16 also on the CPU
    compile: str = "auto"  # auto: on CUDA; on the CPU when a measured saving pays for it (train/fast_paths.py)
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for checks)
    # CPU fp32 linear kernels per pass (model/cpu_linear.py): auto (probed once per machine and shape),
    # aten, onednn, onednn_copy (backward: oneDNN on a contiguous copy of the transposed operand), or
    # forward=K,grad_input=K,grad_weight=K; a resume keeps the run's choice
    cpu_linear: str = "auto"
    # CPU fp32 attention (model/cpu_attention.py): auto (probed once per machine and shape), gptrain (its own
    # C++ kernel, compiled for this CPU at first use) or sdpa (PyTorch's); a resume keeps the run's choice
    cpu_attention: str = "auto"
    cpu_gelu: str = "auto"  # CPU fp32 eager GELU: auto (probed), gptrain (its C++ kernel) or aten; as cpu_attention
    use_tf32: bool = True  # fp32 matmuls on TF32 tensor cores (CUDA)
    spike_factor: float = 0.0  # skip an update whose loss exceeds this times the running mean; 0: off
    max_bad_steps: int = 10  # skipped steps (non-finite, or spikes) within bad_step_window: then a rollback
    bad_step_window: int = 100
    recovery_factor: float = 0.5  # lr multiplier right after a rollback, rising back to 1 ...
    recovery_steps: int = 100  # ... over this many steps
    max_rollbacks: int = 3  # then the run gives up (exit 1)
    log_every_steps: int = 10
    use_activation_checkpointing: bool = False  # recompute block activations in backward: less memory

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"train.batch_size must be at least 1 (got {self.batch_size})")
        if self.num_steps < 1 and self.num_epochs <= 0:
            raise UserError("train.num_steps must be at least 1 (or set train.num_epochs)")
        if self.budget:
            from gptrain.train.budget import parse_duration

            parse_duration(self.budget)
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.compile not in COMPILE_MODES:
            raise UserError(f"train.compile must be one of {', '.join(COMPILE_MODES)} (got {self.compile!r})")
        if self.cpu_linear != "auto":
            from gptrain.model.cpu_linear import LinearPlan

            LinearPlan.parse(self.cpu_linear)
        if self.cpu_attention not in ("auto", "gptrain", "sdpa"):
            raise UserError(f"train.cpu_attention must be auto, gptrain or sdpa (got {self.cpu_attention!r})")
        if self.cpu_gelu not in ("auto", "gptrain", "aten"):
            raise UserError(f"train.cpu_gelu must be auto, gptrain or aten (got {self.cpu_gelu!r})")
        if self.spike_factor < 0 or (0 < self.spike_factor <= 1):
            raise UserError(f"train.spike_factor must be 0 (off) or above 1 (got {self.spike_factor})")
        if self.max_bad_steps < 1 or self.bad_step_window < self.max_bad_steps:
            raise UserError(f"train.max_bad_steps must be >= 1 and train.bad_step_window >= it (got "
                            f"{self.max_bad_steps} within {self.bad_step_window})")
        if not 0 < self.recovery_factor <= 1 or self.recovery_steps < 0 or self.max_rollbacks < 0:
            raise UserError("train.recovery_factor must be in (0, 1], train.recovery_steps and train.max_rollbacks "
                            f">= 0 (got {self.recovery_factor}, {self.recovery_steps}, {self.max_rollbacks})")
        if self.log_every_steps < 1:
            raise UserError("train.log_every_steps must be at least 1")


def uses_bf16(device: str, precision: str) -> bool:
    """bf16 on CUDA when asked, or 'auto' and supported; on the CPU only when asked (its matmuls are fast
    in bf16 only with AMX or AVX-512 BF16, see has_fast_cpu_bf16); fp32 everywhere else."""
    is_cuda, is_cpu = device.startswith("cuda"), device == "cpu"
    use_bf16 = precision == "bf16" or (precision == "auto" and is_cuda and torch.cuda.is_bf16_supported())
    if use_bf16 and not (is_cuda or is_cpu):
        raise UserError(f"train.precision=bf16 needs a CUDA GPU or the CPU (not {device}); use fp32 on this device")
    return use_bf16


def has_fast_cpu_bf16() -> bool:
    """Whether this x86 CPU multiplies bf16 matrices natively (AMX or AVX-512 BF16): 3.6-6.5x its fp32
    rate on a 2-core Sapphire-Rapids-class Xeon. Elsewhere (AVX-512 without BF16, AVX2, other CPUs as
    far as gptrain knows) bf16 is emulated, slower than fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(check()) for check in checks if check is not None)


def autocast_context(device: str, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (when asked or 'auto' and supported) and on the CPU (when asked); fp32
    everywhere else. The weights, gradients and optimizer stay fp32 (mixed precision)."""
    if uses_bf16(device, precision):
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class StepResult:
    loss: float  # mean loss over the step's micro batches, on all ranks together
    grad_norm: float  # global norm before clipping
    is_applied: bool  # False when the step was skipped: non-finite loss or gradient, or a loss spike
    should_stop: bool = False  # some rank was asked to stop (Ctrl-C, SIGTERM): every rank agrees
    has_commands: bool = False  # rank 0 has control commands to apply at this step boundary


def always_sync(is_last: bool) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


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
    gradient_sync: Callable[[bool], contextlib.AbstractContextManager] = always_sync,
    reduce_sum: Callable[[Tensor], Tensor] = lambda t: t,
    world_size: int = 1,
    is_stop_requested: Callable[[], bool] = lambda: False,
    has_commands: Callable[[], bool] = lambda: False,
) -> StepResult:
    """Forward/backward num_micro_steps micro batches, clip, and update, unless the loss or gradient is
    non-finite or the loss exceeds max_loss (a spike).

    gradient_sync(is_last) is the strategy's context for a micro step (DDP skips the all-reduce until
    the last one); reduce_sum sums over ranks, so the loss and the stop request are the same on all.
    is_stop_requested() is read after the backward passes, so a signal during this step stops after it;
    has_commands() (rank 0's pending control commands) rides in the same reduction, so every rank knows.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    for micro_step in range(num_micro_steps):
        x_BT, y_BT = loader.next_batch()
        if device.startswith("cuda"):  # pinned host memory makes the copy truly asynchronous
            x_BT, y_BT = x_BT.pin_memory(), y_BT.pin_memory()
        x_BT = x_BT.to(device, non_blocking=True)
        y_BT = y_BT.to(device, non_blocking=True)
        with gradient_sync(micro_step == num_micro_steps - 1):
            with autocast:
                loss = model(x_BT, y_BT) / num_micro_steps
            loss.backward()
        loss_sum += loss.detach()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm, unscale = clip_gradients(params, grad_clip, optimizer)
    # The gradients are already reduced (the norm is the same on every rank); the loss and the stop
    # request are summed here. One host sync per step: everything comes back together.
    flags = torch.tensor([float(is_stop_requested()), float(has_commands())], device=device)
    shared = reduce_sum(torch.cat([loss_sum.reshape(1), flags]))
    loss, stops, commands, norm = torch.cat([shared, grad_norm.reshape(1).to(shared.device, shared.dtype)]).tolist()
    loss /= world_size
    is_applied = math.isfinite(loss) and math.isfinite(norm) and loss <= max_loss
    if is_applied:
        step_optimizer(optimizer, unscale)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss, grad_norm=norm, is_applied=is_applied, should_stop=stops > 0,
                      has_commands=commands > 0)


def clip_gradients(params: list[Tensor], grad_clip: float,
                   optimizer: torch.optim.Optimizer) -> tuple[Tensor, Tensor | None]:
    """The global gradient norm (before clipping), and the clipping as a divisor for a fused AdamW to apply
    inside its kernel (None: the gradients were clipped here, the usual way). Folding the clip into the
    update saves a read and write of every gradient (GPT-2 124M on a 2-core CPU: 20 ms of a 0.8 s step);
    the math is the same up to fp32 rounding: g / (1 / c) instead of g * c."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    if not can_unscale_in_optimizer(optimizer, params):
        return gather_norm(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)), None
    norm = gradient_norm([p.grad for p in params])
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # clip_grad_norm_'s
    return norm, coefficient.reciprocal().float()


def gradient_norm(grads: list[Tensor]) -> Tensor:
    """The global L2 norm of the gradients. On the CPU the sum of a BLAS dot product per tensor: torch's
    norm kernel there runs at half the memory bandwidth and sums in plain fp32 (GPT-2 124M on 2 Xeon
    cores: 39 -> 13 ms a step; on its 38.6M-element embedding gradient 4e-5 relative error against the
    float64 norm instead of 3e-3). Elsewhere torch's multi-tensor norm."""
    if not grads or any(g.device.type != "cpu" for g in grads):
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    flat = [g.reshape(-1) for g in grads]
    return torch.stack([torch.dot(g, g) for g in flat]).sum().sqrt()


def can_unscale_in_optimizer(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> bool:
    """A fused torch AdamW over plain tensors: its kernel divides the gradients by `grad_scale` (the hook
    GradScaler uses). Not ZeRO-1's wrapper, not FSDP's DTensors, not a PyTorch before get_total_norm."""
    return (type(optimizer) is torch.optim.AdamW and hasattr(torch.nn.utils, "get_total_norm")
            and all(group.get("fused") for group in optimizer.param_groups)
            and all(type(p.grad) is Tensor for p in params))


def step_optimizer(optimizer: torch.optim.Optimizer, unscale: Tensor | None) -> None:
    """optimizer.step(), dividing the gradients by `unscale` inside the fused kernel when given."""
    if unscale is None:
        optimizer.step()
        return
    optimizer.grad_scale, optimizer.found_inf = unscale, torch.zeros_like(unscale)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf
