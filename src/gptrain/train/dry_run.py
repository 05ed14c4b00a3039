"""`gptrain train --dry-run`: build everything, run two steps, and report peak memory per rank and the
largest micro batch that should fit. No run directory is written (the dataset is prepared as usual)."""

from __future__ import annotations

import copy
import math
import os
import resource
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gptrain.config import RunConfig
from gptrain.distributed import parallel
from gptrain.distributed.env import DistEnv
from gptrain.errors import UserError
from gptrain.train.schedule import lr_at
from gptrain.train.setup import Run, build_run, configure_device, step_run
from gptrain.train.step import autocast_context

HEADROOM = 0.9  # leave 10% of the device for the allocator's fragmentation and the rest of the process


def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: str) -> int:
    """Peak tensor memory on a GPU; elsewhere the process's peak resident set (it never goes down)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def memory_capacity_bytes(device: str) -> int:
    """The GPU's memory, or this rank's share of the machine's memory."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[1]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def _micro_step_at(run: Run, batch_size: int) -> int:
    """Peak memory of one eager forward/backward at another micro batch (gradients reduced, then dropped)."""
    loader = copy.copy(run.train_loader)
    loader.batch_size = batch_size
    x_BT, y_BT = (t.to(run.env.device) for t in loader.next_batch())
    eager = getattr(run.step_model, "_orig_mod", run.step_model)  # no recompiling for a new batch shape
    reset_peak_memory(run.env.device)
    with parallel.gradient_sync(eager, run.plan.strategy, run.cfg.parallel, is_last=True):
        with autocast_context(run.env.device, run.cfg.train.precision):
            loss = eager(x_BT, y_BT)
        loss.backward()
    run.optimizer.zero_grad(set_to_none=True)
    return peak_memory_bytes(run.env.device)


def measure(run: Run) -> dict:
    """Two real steps (the optimizer state now exists), then one micro step at B/2 and one at the micro
    batch B (known to fit by then): memory grows linearly with the batch, so the two give the cost of
    a sequence."""
    cfg, env, plan = run.cfg, run.env, run.plan
    reset_peak_memory(env.device)
    for step in range(2):
        result = step_run(run, lr_at(step, plan.num_steps, cfg.schedule))
    B = cfg.train.batch_size
    peak_steps = peak_memory_bytes(env.device)
    half = max(1, B // 2)
    peak_half = _micro_step_at(run, half)
    peak = max(peak_half, _micro_step_at(run, B))
    per_sequence = (peak - peak_half) / (B - half) if B > half else 0.0
    capacity = memory_capacity_bytes(env.device)
    fixed = peak - B * per_sequence
    largest = math.floor((HEADROOM * capacity - fixed) / per_sequence) if per_sequence > 0 else None
    return {"rank": env.rank, "device": env.device, "loss": result.loss, "peak_steps_bytes": peak_steps,
            "peak_half_bytes": peak_half, "peak_bytes": peak, "per_sequence_bytes": per_sequence,
            "capacity_bytes": capacity, "largest_micro_batch": largest}


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def print_report(run: Run, rows: list[dict]) -> None:
    cfg, plan = run.cfg, run.plan
    B = cfg.train.batch_size
    print(f"dry run: {run.model.num_parameters():,} parameters | {plan.strategy} on {plan.world_size} rank(s) | "
          f"micro batch {B} x {plan.num_micro_steps} accumulation steps | {plan.tokens_per_step:,} tokens per "
          f"step | 2 steps done, loss {rows[0]['loss']:.4f}")
    print(f"{'rank':>4} {'device':<8} {'peak (steps)':>13} {f'peak (B={max(1, B // 2)})':>14} {f'peak (B={B})':>14} "
          f"{'memory':>11}  largest micro batch (estimate)")
    for r in rows:
        largest = r["largest_micro_batch"]
        guess = "unknown (memory did not grow with the batch)" if largest is None else f"about {largest}"
        print(f"{r['rank']:>4} {r['device']:<8} {_gb(r['peak_steps_bytes']):>13} {_gb(r['peak_half_bytes']):>14} "
              f"{_gb(r['peak_bytes']):>14} {_gb(r['capacity_bytes']):>11}  {guess}")
    print("nothing was written; on CPUs the peak is the process's resident memory, on GPUs tensor memory")


def dry_run(cfg: RunConfig, log=print) -> list[dict]:
    """Build the run as `gptrain train` would, measure on every rank; rank 0 prints the table."""
    is_joined = dist.is_initialized()
    env = DistEnv.start(cfg.device, cfg.parallel.timeout_seconds)
    configure_device(cfg.train, env)
    run = build_run(cfg, env, Path(cfg.run_dir or "runs/dry-run"), None, None, log, can_probe=False)
    try:
        row = measure(run)
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"micro batch {cfg.train.batch_size} does not fit on {env.device} (out of memory in the "
                        "first steps): lower --batch-size, or try --parallel fsdp or "
                        "--train.use_activation_checkpointing=on") from None
    rows = env.gather_objects(row)
    if env.is_main:
        print_report(run, rows)
    if not is_joined:  # only on success: see train()
        env.close()
    return rows or []
