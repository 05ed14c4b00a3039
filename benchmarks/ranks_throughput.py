"""Tokens/s of one process vs N torchrun ranks on the same global batch, measured in the same run.

Both runs train the default Shakespeare model (or the flags given after --) on the CPU, from the same
seed, with the same tokens per step: one process accumulates N micro batches, N ranks take one each.
One process gets all the machine's threads; torchrun gives each rank one (its default). Medians of
the per-step tokens/s after the first steps; the ratio is N ranks over one process, and the two runs
alternate `--repeats` times so that load on the machine hits both alike.

    python benchmarks/ranks_throughput.py                          # DDP, 2 ranks, 60 steps
    python benchmarks/ranks_throughput.py --strategy fsdp --steps 40 -- --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(nproc: int, strategy: str, steps: int, extra: list[str], folder: Path, env: dict) -> float:
    """Median tokens/s of one training run (the first 5 steps are warm-up and left out)."""
    run_dir = folder / f"run-{nproc}"
    args = ["train", "--steps", str(steps), "--device", "cpu", "--quiet", "--run-dir", str(run_dir), "--overwrite",
            "--eval.every_steps", "0", "--samples.every_steps", "0", "--checkpoint.every_steps", "0",
            "--train.batch_tokens", str(32 * 128 * 2), "--parallel", strategy, *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "gptrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "gptrain", *args]
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_seconds = []
    train = [r for r in rows if r["kind"] == "train"]
    for before, after in zip(train[5:], train[6:]):
        step_seconds.append(after["time"] - before["time"])
    return (32 * 128 * 2) / statistics.median(step_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "zero1", "fsdp"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("extra", nargs="*", help="gptrain train flags for both runs (after --)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTRAIN_")}
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            one.append(run_once(1, args.strategy, args.steps, args.extra, Path(tmp), env))
            two.append(run_once(2, args.strategy, args.steps, args.extra, Path(tmp), env))
    a, b = statistics.median(one), statistics.median(two)
    print(f"cpu threads {os.cpu_count()} | {args.steps} steps of {32 * 128 * 2:,} tokens | strategy {args.strategy}")
    print(f"1 process : {a:,.0f} tokens/s (runs: {', '.join(f'{x:,.0f}' for x in one)})")
    print(f"2 ranks   : {b:,.0f} tokens/s (runs: {', '.join(f'{x:,.0f}' for x in two)})")
    print(f"ratio 2 ranks / 1 process: {b / a:.2f}")


if __name__ == "__main__":
    main()
