"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptrain.errors import UserError

KINDS = ("cosine", "linear", "constant", "wsd")


@dataclass(kw_only=True)
class ScheduleConfig:
    peak_lr: float = 2e-3
    num_warmup_steps: int = 100
    kind: str = "cosine"  # decay after warmup: cosine, linear, constant, or wsd (warmup-stable-decay)
    final_lr_ratio: float = 0.1  # lr at the last step = peak_lr * final_lr_ratio
    decay_fraction: float = 0.2  # wsd only: the share of steps spent decaying at the end

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"schedule.kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.peak_lr <= 0:
            raise UserError(f"schedule.peak_lr must be positive (got {self.peak_lr})")
        if self.num_warmup_steps < 0:
            raise UserError(f"schedule.num_warmup_steps must be >= 0 (got {self.num_warmup_steps})")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise UserError(f"schedule.decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise UserError(f"schedule.final_lr_ratio must be in [0, 1] (got {self.final_lr_ratio})")


def lr_at(step: int, num_steps: int, cfg: ScheduleConfig) -> float:
    """Linear warmup over num_warmup_steps, then decay to peak_lr * final_lr_ratio at num_steps."""
    if step < cfg.num_warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.num_warmup_steps
    floor = cfg.peak_lr * cfg.final_lr_ratio
    decay_steps = max(1, num_steps - 1 - cfg.num_warmup_steps)
    progress = min(1.0, (step - cfg.num_warmup_steps) / decay_steps)
    if cfg.kind == "constant":
        return cfg.peak_lr
    if cfg.kind == "linear":
        return cfg.peak_lr - (cfg.peak_lr - floor) * progress
    if cfg.kind == "wsd":
        decay_start = 1.0 - cfg.decay_fraction
        if progress <= decay_start:
            return cfg.peak_lr
        return cfg.peak_lr - (cfg.peak_lr - floor) * (progress - decay_start) / cfg.decay_fraction
    return floor + (cfg.peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
