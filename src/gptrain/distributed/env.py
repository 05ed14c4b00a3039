"""DistEnv: rank, world size and device. A trivial single-process object outside torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gptrain.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(preference: str) -> str:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit device must exist."""
    if preference not in DEVICES and not preference.startswith("cuda:"):
        raise UserError(f"device must be one of {', '.join(DEVICES)} (got {preference!r})")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if preference == "mps" and not has_mps:
        raise UserError("device mps was asked for but Apple MPS is not available: use --device cpu or auto")
    return preference


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_preference: str = "auto") -> DistEnv:
        """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK if present (process groups come with DDP)."""
        device = resolve_device(device_preference)
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device == "cuda" and world_size > 1:
            device = f"cuda:{local_rank}"
        return cls(rank=rank, local_rank=local_rank, world_size=world_size, device=device)
