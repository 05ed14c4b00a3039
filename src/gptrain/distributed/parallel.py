"""Data-parallel strategies on torch.distributed: DDP, ZeRO-1 (DDP + sharded optimizer state), FSDP2.

The model stays single-device code; this module wraps it. `wrap_model` returns the module the step
calls, `gradient_sync` says whether a micro step reduces gradients, and activation checkpointing is
applied here too, so the model never knows about any of it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptrain.distributed.env import DistEnv
from gptrain.errors import UserError

STRATEGIES = ("auto", "ddp", "zero1", "fsdp")


@dataclass(kw_only=True)
class ParallelConfig:
    strategy: str = "auto"  # auto: ddp under torchrun; ddp | zero1 | fsdp (ignored in one process)
    should_fsdp_sync_micro_steps: bool = True  # off: skip reduce-scatter on accumulation micro steps
    should_fsdp_reshard_after_forward: bool = True  # off: keep gathered weights from forward to backward (speed)
    timeout_seconds: int = 1800  # a collective that waits longer ends the job (data prep waits on files)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"parallel.strategy must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        if self.timeout_seconds < 1:
            raise UserError("parallel.timeout_seconds must be at least 1")


def resolve_strategy(cfg: ParallelConfig, world_size: int) -> str:
    """'none' in one process (nothing to synchronise), else the configured strategy (auto: ddp)."""
    if world_size == 1:
        return "none"
    return "ddp" if cfg.strategy == "auto" else cfg.strategy


FSDP_CPU_MIN_TORCH = "2.6"  # before it FSDP2 makes CUDA streams whatever the mesh's device (seen on 2.4.1 and 2.5.1)


def can_fsdp_run_on(device: str) -> bool:
    from torch.torch_version import TorchVersion

    return device.startswith("cuda") or TorchVersion(torch.__version__) >= FSDP_CPU_MIN_TORCH


def check_strategy_supported(strategy: str, device: str) -> None:
    """A UserError, before anything is written, for a strategy this torch cannot run on this device."""
    if strategy == "fsdp" and not can_fsdp_run_on(device):
        raise UserError(f"--parallel fsdp on the {device.split(':')[0].upper()} needs torch >= {FSDP_CPU_MIN_TORCH} "
                        f"(this is {torch.__version__}): use --parallel ddp or zero1, or upgrade torch")


def import_fully_shard():
    """fully_shard and MixedPrecisionPolicy: public in torch >= 2.6, under _composable before."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def apply_activation_checkpointing(blocks: nn.ModuleList) -> None:
    """Recompute each block's activations in backward instead of keeping them (torch's checkpoint).

    The block's forward is replaced on the instance, so parameter names and state_dict keys stay.
    """
    for block in blocks:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # evaluation and sampling keep their KV cache path
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed


def wrap_model(model: nn.Module, strategy: str, cfg: ParallelConfig, env: DistEnv, *, use_bf16: bool) -> nn.Module:
    """The module the training step calls: DDP around the model, or the model itself sharded in place
    by FSDP2 (each block, then the root holding the tied embeddings), or the model unchanged."""
    if strategy in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.local_rank] if env.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if strategy == "fsdp":
        fully_shard, MixedPrecisionPolicy = import_fully_shard()
        # Gradients are reduced in fp32 whatever the compute dtype, so sums over ranks do not lose bits.
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)
        # The mesh names the device: each block's weights move there as they are sharded (model on the CPU).
        mesh = env.device_mesh()
        options = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.should_fsdp_reshard_after_forward)
        for block in model.transformer.h:
            fully_shard(block, **options)
        fully_shard(model, **options)
    return model


def gradient_sync(step_model: nn.Module, strategy: str, cfg: ParallelConfig, *, is_last: bool):
    """A context for one micro step: DDP and ZeRO-1 reduce gradients only on the last micro step;
    FSDP reduce-scatters on every one unless should_fsdp_sync_micro_steps is off."""
    if strategy in ("ddp", "zero1"):
        module = getattr(step_model, "_orig_mod", step_model)  # torch.compile keeps the DDP wrapper inside
        return contextlib.nullcontext() if is_last else module.no_sync()
    if strategy == "fsdp":
        module = getattr(step_model, "_orig_mod", step_model)
        module.set_requires_gradient_sync(is_last or cfg.should_fsdp_sync_micro_steps)
    return contextlib.nullcontext()


def gather_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (under FSDP2 it is a DTensor over the shards)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
