"""`--budget 10m`: train for a wall-clock time instead of a step count. The run measures its own step
time over its first PROBE_STEPS steps (inside the warmup, whose lr does not depend on the step count),
then fixes the number of steps so that the run, its evaluations and its final save end within the
budget, and plans the schedule over those steps. The plan is kept in TrainState (budget_plan): a
resume finishes it and never measures again. The clock starts at the process's start under
`gptrain train` (process_started_at: imports and data preparation included), when train() is called
from Python, and leaves out time spent paused. When the warmup is done the run plans once more from all
its steps so far (maybe_replan). Steps that slow down after the plan (a busy shared VM) end the run
early, complete, rather than more than OVERRUN past the budget."""

from __future__ import annotations

import os
import re
import statistics
import time
from pathlib import Path

from gptrain.errors import UserError

PROBE_STEPS = 10  # steps timed before the plan is made (the first SKIP_STEPS are warm-up, not timed)
SKIP_STEPS = 2
PROVISIONAL_STEPS = 10**9  # the plan's length until it is made: only the warmup's lr is used meanwhile
SAFETY = 0.97  # of the time left, planned; the estimates of evaluation and save time are rough
OVERRUN = 0.05  # past the budget by this much at most: steps that slow down after the plan end the run early
SAVE_BYTES_PER_SECOND = 200e6
UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds of "90", "90s", "10m", "1.5h"; a UserError for anything else."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", text or "")
    if not found or float(found.group(1)) <= 0:
        raise UserError(f"train.budget must be a positive time such as 90s, 10m or 1.5h (got {text!r})")
    return float(found.group(1)) * UNITS[found.group(2) or ""]


def process_started_at() -> float | None:
    """time.monotonic() at this process's start (Linux: /proc/self/stat's start time, in clock ticks after
    boot), or None where that is not known."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.monotonic() - age if 0 <= age < 3600 else None


def planned_steps(budget_seconds: float, elapsed_seconds: float, step_seconds: float, done_steps: int,
                  eval_every: int, eval_seconds: float, save_seconds: float) -> int:
    """The run's total steps: what the time left holds after the final evaluation and save, each step
    also paying its share of the periodic evaluations (never fewer than the steps already done)."""
    left = SAFETY * (budget_seconds - elapsed_seconds) - eval_seconds - save_seconds
    per_step = step_seconds + (eval_seconds / eval_every if eval_every else 0.0)
    return max(done_steps, done_steps + int(left / per_step))


def make_plan(run, step_seconds: list[float], now: float | None = None) -> dict:
    """Rank 0's plan from the probe's step times (every rank then uses rank 0's, see maybe_plan)."""
    cfg, plan = run.cfg, run.plan
    measured = statistics.median(step_seconds[SKIP_STEPS:] or step_seconds)
    # An evaluation is forward passes only (about a third of a training step's work per token).
    eval_seconds = cfg.eval.num_tokens / plan.tokens_per_step * measured / 3 if cfg.eval.every_steps else 0.0
    save_seconds = 1.0 + 16 * run.model.num_parameters() / SAVE_BYTES_PER_SECOND  # weights + AdamW moments
    elapsed = (time.monotonic() if now is None else now) - run.launched_at - run.paused_seconds
    budget = parse_duration(cfg.train.budget)
    num_steps = planned_steps(budget, elapsed, measured, run.state.step, cfg.eval.every_steps, eval_seconds,
                              save_seconds)
    return {"num_steps": num_steps, "step_seconds": measured, "measured_steps": len(step_seconds),
            "elapsed_seconds": elapsed, "budget_seconds": budget, "reserve_seconds": eval_seconds + save_seconds}


def is_past_deadline(run, lookahead_seconds: float = 0.0, now: float | None = None) -> bool:
    """Whether a budget run planned in this launch must end now to stay within budget x (1 + OVERRUN),
    its final evaluation, sample and save included: its steps have run slower than planned (a shared
    VM's neighbours got busy). lookahead_seconds: the steps until the next check. The end's cost is the
    plan's estimate, or the longest evaluation, sample and save this launch has timed if that is more.
    Rank 0's clock decides; every rank gets its answer."""
    plan = run.state.budget_plan
    if not (run.cfg.train.budget and plan and run.budget_planned_here):
        return False
    elapsed = (time.monotonic() if now is None else now) - run.launched_at - run.paused_seconds
    reserve = max(plan.get("reserve_seconds", 0.0), run.longest_tail_seconds)
    is_late = elapsed + lookahead_seconds + reserve > plan["budget_seconds"] * (1 + OVERRUN)
    return bool(run.env.broadcast_object(is_late if run.env.is_main else None))


def warmup_steps(run, num_steps: int) -> int:
    from gptrain.train.schedule import resolve_warmup

    return resolve_warmup(run.cfg.schedule, num_steps).num_warmup_steps


def maybe_replan(run, step_seconds: list[float]) -> None:
    """Once, when the warmup's last step is done, in the launch that planned: plan again from all its
    step times so far (the first 10 of a shared VM's steps can be 5-13% off its pace), if the new length
    keeps the warmup (auto: 100 steps for any plan of 1000 or more), so every lr used stays the one
    planned. A resume keeps whichever plan its checkpoint has."""
    from gptrain.train.run_log import emit

    plan, step = run.state.budget_plan, run.state.step
    if not (run.cfg.train.budget and plan and run.budget_planned_here) or "first_num_steps" in plan:
        return
    warmup = warmup_steps(run, plan["num_steps"])
    if step != warmup or step <= PROBE_STEPS:
        return
    new = run.env.broadcast_object(make_plan(run, step_seconds) if run.env.is_main else None)
    if new["num_steps"] <= warmup or warmup_steps(run, new["num_steps"]) != warmup:
        return
    run.state.budget_plan = {**new, "first_num_steps": plan["num_steps"]}
    run.plan.num_steps = run.state.schedule_steps = new["num_steps"]
    emit(run, {"kind": "event", "budget_plan": run.state.budget_plan, "message": (
        f"budget {run.cfg.train.budget}: {new['step_seconds']:.3f}s per step over the warmup's {step} steps: "
        f"planned again, {new['num_steps']} steps (first plan {plan['num_steps']})")})


def maybe_plan(run, step_seconds: list[float]) -> None:
    """After the probe's last step: fix the run's length (the same on every rank) and log the plan."""
    from gptrain.train.run_log import emit

    if not run.cfg.train.budget or run.state.budget_plan is not None or run.state.step < PROBE_STEPS:
        maybe_replan(run, step_seconds)
        return
    budget_plan = run.env.broadcast_object(make_plan(run, step_seconds) if run.env.is_main else None)
    run.state.budget_plan, run.plan.num_steps = budget_plan, budget_plan["num_steps"]
    run.budget_planned_here = True  # a resume finishes the plan's steps without a deadline of its own
    run.state.schedule_steps = budget_plan["num_steps"]
    note = ""
    if budget_plan["num_steps"] <= run.cfg.schedule.num_warmup_steps:
        note = (f"; the warmup ({run.cfg.schedule.num_warmup_steps} steps) is longer, so the lr stays below peak_lr "
                "(raise the budget or lower --schedule.num_warmup_steps)")
    emit(run, {"kind": "event", "budget_plan": budget_plan, "message": (
        f"budget {run.cfg.train.budget}: {budget_plan['step_seconds']:.3f}s per step measured over the first "
        f"{budget_plan['measured_steps']} steps, {budget_plan['elapsed_seconds']:.0f}s used: planned "
        f"{budget_plan['num_steps']} steps{note}")})


def end_at_deadline(run) -> None:
    """End the run at this step (its final evaluation and save follow), and say why: the plan keeps
    the steps it had planned, its num_steps becomes the steps done, so the run is complete."""
    from gptrain.train.run_log import emit

    plan, step = run.state.budget_plan, run.state.step
    run.state.budget_plan = {**plan, "num_steps": step, "planned_steps": plan["num_steps"]}
    run.plan.num_steps = step
    emit(run, {"kind": "event", "message": (
        f"budget {run.cfg.train.budget}: ending at step {step} of the {plan['num_steps']} planned, to stay within "
        f"{OVERRUN:.0%} of it (the steps ran slower than the {plan['step_seconds']:.3f}s measured)")})
