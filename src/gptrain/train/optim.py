"""AdamW with weight decay on 2-D tensors only (matmuls and embeddings; not biases or norms)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from gptrain.errors import UserError


@dataclass(kw_only=True)
class OptimConfig:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global L2 norm; 0 turns clipping off
    use_fused: bool = True  # fused AdamW kernel where this PyTorch has one for the device

    def __post_init__(self) -> None:
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise UserError("optim.weight_decay and optim.grad_clip must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError(f"optim.beta1 and optim.beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, *,
                    shard_state: bool = False) -> torch.optim.Optimizer:
    """AdamW over the model's parameters in two groups: decayed (dim >= 2) and not decayed.

    shard_state: ZeRO-1, each rank keeps and updates only its share of the optimizer state
    (torch's ZeroRedundancyOptimizer, which broadcasts the updated parameters after each step).
    """
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight is listed once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    device = params[0].device.type
    extra = {}
    if cfg.use_fused and "fused" in inspect.signature(torch.optim.AdamW).parameters and device in ("cuda", "cpu"):
        extra["fused"] = True
    if shard_state:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr, betas=(cfg.beta1, cfg.beta2),
                                       eps=cfg.eps, **extra)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **extra)
