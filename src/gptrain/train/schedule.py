"""Learning-rate schedules as pure functions of the optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from gptrain.errors import UserError

KINDS = ("cosine", "linear", "constant", "wsd")
AUTO_WARMUP_STEPS = 100  # at most; a tenth of a shorter run
EXTEND_RULES = ("off", "hold")


@dataclass(kw_only=True)
class ScheduleConfig:
    peak_lr: float = 2e-3
    num_warmup_steps: int = -1  # -1: auto, min(100, a tenth of the run); an explicit one is below the run's steps
    kind: str = "cosine"  # decay after warmup: cosine, linear, constant, or wsd (warmup-stable-decay)
    final_lr_ratio: float = 0.1  # lr at the last step = peak_lr * final_lr_ratio
    decay_fraction: float = 0.2  # wsd (and extend=hold): the share of steps spent decaying at the end
    extend: str = "off"  # a --resume with more steps: off refuses; hold keeps the lr reached, then decays

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"schedule.kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.peak_lr <= 0:
            raise UserError(f"schedule.peak_lr must be positive (got {self.peak_lr})")
        if self.num_warmup_steps < -1:
            raise UserError(f"schedule.num_warmup_steps must be >= 0, or -1 for auto (got {self.num_warmup_steps})")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise UserError(f"schedule.decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        if self.extend not in EXTEND_RULES:
            raise UserError(f"schedule.extend must be one of {', '.join(EXTEND_RULES)} (got {self.extend!r})")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise UserError(f"schedule.final_lr_ratio must be in [0, 1] (got {self.final_lr_ratio})")


def resolve_warmup(cfg: ScheduleConfig, num_steps: int) -> ScheduleConfig:
    """The warmup a run of num_steps uses (auto resolved, so the run's config.toml stores the number); an
    explicit warmup that is not below num_steps would never reach peak_lr: a mistake."""
    if cfg.num_warmup_steps == -1:
        return replace(cfg, num_warmup_steps=min(AUTO_WARMUP_STEPS, num_steps // 10))
    if cfg.num_warmup_steps >= num_steps:
        raise UserError(f"schedule.num_warmup_steps={cfg.num_warmup_steps} is not below the run's {num_steps} "
                        f"steps, so the lr would never reach peak_lr: lower it, or leave it out (auto: "
                        f"min({AUTO_WARMUP_STEPS}, steps / 10))")
    return cfg


def lr_at(step: int, num_steps: int, cfg: ScheduleConfig) -> float:
    """Linear warmup over num_warmup_steps, then decay to peak_lr * final_lr_ratio at num_steps."""
    if cfg.num_warmup_steps == -1:
        cfg = resolve_warmup(cfg, num_steps)
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


def planned_lr(step: int, num_steps: int, tails: list[dict], cfg: ScheduleConfig) -> float:
    """The schedule of a run whose plan may have been extended: lr_at over the first plan's num_steps,
    then each tail (schedule.extend=hold) from its start: its starting lr held, then a linear decay to
    min(that lr, peak_lr * final_lr_ratio) over the tail's last decay_fraction, ending at its end."""
    tail = next((t for t in reversed(tails) if step >= t["start"]), None)
    if tail is None:
        return lr_at(step, num_steps, cfg)
    start_lr, floor = tail["lr"], min(tail["lr"], cfg.peak_lr * cfg.final_lr_ratio)
    decay_start = tail["start"] + (1.0 - cfg.decay_fraction) * (tail["end"] - tail["start"])
    if step < decay_start:
        return start_lr
    progress = min(1.0, (step - decay_start) / max(1.0, tail["end"] - 1 - decay_start))
    return start_lr - (start_lr - floor) * progress


def extend_plan(step: int, num_steps: int, tails: list[dict], new_num_steps: int, cfg: ScheduleConfig) -> list[dict]:
    """The tails of a run resumed at `step` and asked to end at new_num_steps: the same when that is its
    plan's end, one more under schedule.extend=hold (starting at the lr the run reached), else refused."""
    planned_end = tails[-1]["end"] if tails else num_steps
    if new_num_steps == planned_end:
        return tails
    if new_num_steps <= step:
        raise UserError(f"the run is already at step {step}: --steps {new_num_steps} would end it before that "
                        f"(its plan ends at step {planned_end})")
    if cfg.extend != "hold":
        raise UserError(f"this run's lr schedule was planned for {planned_end} steps, and --steps {new_num_steps} "
                        f"would re-plan it (the lr would jump at the resume step): resume without --steps, or "
                        f"fine-tune from it in a new run (--init-from RUN, a new schedule), or continue it with "
                        f"--schedule.extend=hold (hold the lr it reached, then decay over the new tail)")
    reached = planned_lr(max(0, step - 1), num_steps, tails, cfg)
    kept = [t for t in tails if t["start"] < step]
    return [*kept, {"start": step, "end": new_num_steps, "lr": reached}]
