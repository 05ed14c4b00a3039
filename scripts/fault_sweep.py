"""Fault injection: SIGKILL a tiny CPU training at points drawn from a seed (during steps, inside checkpoint
writes, halfway through a metrics row, during its data preparation), resume it with `gptrain train --resume
RUN`, and compare it with an uninterrupted run: every loss and sample and the final weights bit for bit, every
checkpoint on disk loads (at the kill and at the end), one metrics row per step, byte-identical shards.

    .venv/bin/python scripts/fault_sweep.py                 # 24 points from seed 0; exit 1 unless all are exact
    .venv/bin/python scripts/fault_sweep.py --points 44 --seed 7 --keep /tmp/sweep

A point is `<fault point>:<n>`: stop the n-th time the launch reaches that point of gptrain.faults.POINTS
(GPTRAIN_TEST_FAULT), then SIGKILL it; `step:<n>`: SIGKILL once n train rows are written, wherever the run
is by then. tests/integration/test_fault_injection.py runs a few points through this same harness.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from gptrain.errors import UserError
from gptrain.faults import FAULT_ENV, MARKER_ENV, POINTS
from gptrain.metrics.sinks import parse_rows
from gptrain.train.checkpoint import read_checkpoint

NUM_STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 40, 5, 10
EVAL_STEPS = list(range(EVAL_EVERY, NUM_STEPS + 1, EVAL_EVERY))
NUM_DOCUMENTS, DOCUMENT_LINES = 12, 4000  # ~2.4 MB: several encoding tasks (encode.TASK_CHARS), so several manifests
SHARD_TOKENS = 300_000  # ~9 shards
CHECKPOINT_POINTS = tuple(p for p in POINTS if p.startswith("checkpoint."))
PREPARE_POINTS = tuple(p for p in POINTS if p.startswith("prepare."))
KINDS = ("step", *POINTS)
# Visits of a first launch that the reference run does not count for us (measured; a point beyond them is
# reported as not reached): 3 manifests (the first one, then after each of the 2 encoding tasks that finish a
# shard), one swap; a step kill waits for 1..39 train rows.
FIXED_VISITS = {"step": NUM_STEPS - 1, "prepare.manifest": 3, "prepare.swap": 1}
WORDS = ("thou art the king of all that doth lie before thee and thine own heart speak gentle lord what news "
         "from rome my sword shall fall upon the field").split()
LAUNCH_SECONDS = 120


@dataclass(frozen=True)
class Point:
    fault: str  # one of KINDS
    visit: int  # the visit to stop at (for "step": the number of train rows to wait for)

    def __str__(self) -> str:
        return f"{self.fault}:{self.visit}"


@dataclass
class Outcome:
    point: Point
    where: str = ""  # the checkpoint folder a checkpoint.* point stops in
    problems: list[str] = field(default_factory=list)  # empty: exact
    killed_after_step: int = 0  # the last train row on disk at the kill
    resumed_from: int | None = None  # the step the resumed launch started from (None: a relaunch)
    seconds: float = 0.0

    def describe(self) -> str:
        how = "relaunched" if self.resumed_from is None else f"resumed from step {self.resumed_from}"
        verdict = "exact" if not self.problems else "NOT EXACT"
        point = f"{self.point} ({self.where})" if self.where else str(self.point)
        head = f"{point:36} {verdict:9} killed after step {self.killed_after_step:2d}, {how} ({self.seconds:.1f}s)"
        return "\n".join([head, *(f"    {p}" for p in self.problems)])


def draw_points(seed: int, num_points: int, visits: dict[str, int], kinds: tuple[str, ...] = KINDS) -> list[Point]:
    """num_points distinct points: rounds through the kinds in a seeded order, a seeded visit of each
    (visits: how many times a first launch reaches each kind, Sweep.visits)."""
    rng, points = random.Random(seed), []
    capacity = sum(visits[k] for k in kinds)
    while len(points) < min(num_points, capacity):
        for kind in rng.sample(kinds, len(kinds)):
            untaken = [v for v in range(1, visits[kind] + 1) if Point(kind, v) not in points]
            if untaken and len(points) < num_points:
                points.append(Point(kind, rng.choice(untaken)))
    return points


def checkpoint_writes(reference: Path) -> list[str]:
    """The folders a first launch writes, in order (each write_checkpoint passes every checkpoint.* point
    once): at a periodic step step_N/ then best/ when its evaluation is the best so far; at the end final/
    then best/."""
    best, best_steps = float("inf"), set()
    for row in rows(reference)[0]:
        if row["kind"] == "val" and row["val_loss"] < best:
            best, best_steps = row["val_loss"], best_steps | {row["step"]}
    writes = []
    for step in range(1, NUM_STEPS):
        writes += [f"step_{step:06d}/"] if step % CHECKPOINT_EVERY == 0 else []
        writes += ["best/"] if step in best_steps else []
    return writes + ["final/", *(["best/"] if NUM_STEPS in best_steps else [])]


def write_corpus(folder: Path) -> Path:
    """NUM_DOCUMENTS plays of seeded pseudo-Shakespeare."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(NUM_DOCUMENTS):
        rng = random.Random(i)
        lines = [f"{rng.choice(['KING', 'LORD', 'QUEEN', 'FOOL'])}.\n"
                 + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + ".\n"
                 for _ in range(DOCUMENT_LINES)]
        (folder / f"play_{i:02d}.txt").write_text("\n".join(lines))
    return folder


def child_env(fault: Point | None = None, marker: Path | None = None) -> dict[str, str]:
    """This environment without GPTRAIN_* settings, on one thread (bitwise-equal runs), maybe a fault armed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTRAIN_")}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    if fault is not None and fault.fault != "step":
        env |= {FAULT_ENV: str(fault), MARKER_ENV: str(marker)}
    return env


def launch(args: list[str], cwd: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as err:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "gptrain", "train", *args], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)


def run_to_end(args: list[str], cwd: Path, log: Path) -> str | None:
    """Run a launch to its end: None, or what went wrong."""
    proc = launch(args, cwd, log, child_env())
    try:
        code = proc.wait(timeout=LAUNCH_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"`gptrain train {' '.join(args)}` timed out; see {log}"
    return None if code == 0 else f"`gptrain train {' '.join(args)}` exited {code}: {_tail(log)}"


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(lines[-3:])


def rows(run_dir: Path) -> tuple[list[dict], int]:
    path = run_dir / "metrics.jsonl"
    return parse_rows(path.read_bytes().splitlines()) if path.is_file() else ([], 0)


def _num_train_rows(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b'"kind": "train"') if path.is_file() else 0


def kill_at(point: Point, args: list[str], folder: Path) -> str | None:
    """Launch with the point armed, SIGKILL it there; None, or why the kill did not happen there."""
    marker, run_dir = folder / "marker", folder / "run"
    proc = launch(args, folder, folder / "launch.log", child_env(point, marker))
    deadline = time.monotonic() + LAUNCH_SECONDS
    try:
        while not (_num_train_rows(run_dir) >= point.visit if point.fault == "step" else marker.exists()):
            if proc.poll() is not None:
                log = _tail(folder / "launch.log")
                return f"the launch ended (exit {proc.returncode}) before reaching {point}: {log}"
            if time.monotonic() > deadline:
                return f"{point} not reached in {LAUNCH_SECONDS}s"
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return None


def load_checkpoints(run_dir: Path) -> tuple[dict[str, int], list[str]]:
    """The checkpoint folders (not `.tmp` ones: unfinished by name) that load, with their steps, and a
    problem for each one that does not."""
    ckpts = run_dir / "checkpoints"
    steps, problems = {}, []
    for folder in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        if folder.is_dir() and not folder.name.endswith(".tmp"):
            try:
                steps[folder.name] = read_checkpoint(folder)["state"]["train"]["step"]
            except UserError as e:
                problems.append(f"checkpoint {folder.name}/ does not load: {e}")
    return steps, problems


def csv_steps(run_dir: Path, column: str) -> list[int]:
    with open(run_dir / "metrics.csv", encoding="utf-8", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r[column]]


def compare_rows(run_dir: Path, reference: Path) -> list[str]:
    """One train row per step, one val and sample row per evaluation and sample, all equal to the reference's."""
    (got, num_bad), (want, _) = rows(run_dir), rows(reference)
    problems = [f"metrics.jsonl holds {num_bad} damaged line(s)"] if num_bad else []
    for kind, key in (("train", "loss"), ("val", "val_loss"), ("sample", "text")):
        mine = [(r["step"], r[key]) for r in got if r["kind"] == kind]
        theirs = [(r["step"], r[key]) for r in want if r["kind"] == kind]
        if mine != theirs:
            steps = [s for s, _ in mine]
            differ = [s for (s, a), (_, b) in zip(mine, theirs, strict=False) if a != b]
            problems.append(f"{kind} rows differ from the uninterrupted run's: steps {_ranges(steps)}, "
                            f"{len(differ)} {key} value(s) differ (first at step {differ[0] if differ else '-'})")
    for column, steps in (("train_loss", list(range(1, NUM_STEPS + 1))), ("val_loss", EVAL_STEPS)):
        if csv_steps(run_dir, column) != steps:
            problems.append(f"metrics.csv {column} rows are at steps {_ranges(csv_steps(run_dir, column))}")
    return problems


def _ranges(steps: list[int]) -> str:
    return ",".join(str(s) for s in steps) if len(steps) < 12 else f"{steps[:3]}...{steps[-3:]} ({len(steps)} rows)"


def compare_checkpoints(run_dir: Path, reference: Path) -> list[str]:
    """The same checkpoint folders as the reference, each loading, with bitwise-equal weights and optimizer."""
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    want = sorted(p.name for p in (reference / "checkpoints").iterdir())
    loadable, problems = load_checkpoints(run_dir)
    if names != want:
        problems.append(f"checkpoints/ holds {names}, the uninterrupted run's {want}")
    for name in sorted(set(loadable) & set(want)):
        for file in ("model.safetensors", "optimizer.safetensors"):
            a, b = (load_file(str(d / "checkpoints" / name / file)) for d in (run_dir, reference))
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                problems.append(f"{name}/{file} differs from the uninterrupted run's")
    return problems


def compare_dataset(data_dir: Path, reference: Path) -> list[str]:
    """Byte-identical files, and no partial folder left beside it."""
    if not data_dir.is_dir():
        return [f"{data_dir} was not made"]
    files = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    want = {p.name: p.read_bytes() for p in reference.iterdir()}
    problems = [f"dataset file {n} differs or is missing" for n in sorted(set(files) | set(want))
                if files.get(n) != want.get(n)]
    problems += [f"{p.name} was left beside the dataset" for p in data_dir.parent.glob(f"{data_dir.name}.partial-*")]
    return problems


class Sweep:
    """One corpus, one uninterrupted reference run (and the dataset it prepared), then points, each in a folder."""

    def __init__(self, root: Path) -> None:
        self.root, self._numbers = root, itertools.count(1)  # next() is atomic: points may run in threads
        self.corpus = write_corpus(root / "corpus")
        (root / "reference").mkdir(parents=True, exist_ok=True)
        self.reference, self.dataset = root / "reference" / "run", root / "reference" / "dataset"
        problem = run_to_end(self.train_args(self.reference, self.dataset), root / "reference",
                             root / "reference" / "launch.log")
        if problem:
            raise RuntimeError(f"the uninterrupted reference run failed: {problem}")
        self.writes = checkpoint_writes(self.reference)
        num_shards = [len(list(self.dataset.glob(f"*_{split}_*.bin"))) for split in ("train", "val")]
        self.visits = FIXED_VISITS | dict.fromkeys(CHECKPOINT_POINTS, len(self.writes)) | {
            "metrics.append": len(rows(self.reference)[0]),
            "prepare.shard": sum(n - 1 for n in num_shards)}  # the last shard of a split is finished at its end

    def draw(self, seed: int, num_points: int, kinds: tuple[str, ...] = KINDS) -> list[Point]:
        return draw_points(seed, num_points, self.visits, kinds)

    def train_args(self, run_dir: Path, data_dir: Path) -> list[str]:
        return ["--data", str(self.corpus), "--data.data_dir", str(data_dir), "--data.shard_tokens", str(SHARD_TOKENS),
                "--tokenizer", "char", "--embd", "16", "--layers", "1", "--heads", "1", "--context", "16",
                "--batch-size", "4", "--steps", str(NUM_STEPS), "--model.dropout", "0.1",
                "--checkpoint.every_steps", str(CHECKPOINT_EVERY), "--eval.every_steps", str(EVAL_EVERY),
                "--samples.every_steps", str(EVAL_EVERY), "--samples.num_tokens", "16", "--log.live", "off",
                "--quiet", "--run-dir", str(run_dir)]

    def run_point(self, point: Point) -> Outcome:
        """Kill a launch at point, check what is on disk, resume it to its end, compare with the reference."""
        started, number = time.perf_counter(), next(self._numbers)
        folder = self.root / f"point_{number:02d}_{point.fault}_{point.visit}"
        folder.mkdir(parents=True)
        data_dir = folder / "dataset" if point.fault.startswith("prepare.") else self.dataset
        outcome = Outcome(point, where=self.writes[point.visit - 1] if point.fault in CHECKPOINT_POINTS else "")
        args = self.train_args(folder / "run", data_dir)
        if (problem := kill_at(point, args, folder)) is not None:
            outcome.problems.append(problem)
        else:
            outcome.problems += self._resume(folder / "run", args, outcome)
            if data_dir != self.dataset:
                outcome.problems += compare_dataset(data_dir, self.dataset)
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _resume(self, run_dir: Path, args: list[str], outcome: Outcome) -> list[str]:
        """After the kill: every checkpoint loads; `--resume` continues from the newest one (or starts the
        run again at step 0 when there is none) and ends where the uninterrupted run ended."""
        outcome.killed_after_step = max([r["step"] for r in rows(run_dir)[0] if r["kind"] == "train"], default=0)
        steps, unloadable = load_checkpoints(run_dir)
        problems = [f"at the kill: {p}" for p in unloadable]
        # Killed while preparing its data, before the run directory was made: no run to --resume yet.
        is_run = (run_dir / "config.toml").is_file()
        if (problem := run_to_end(["--resume", str(run_dir), "--quiet"] if is_run else args, run_dir.parent,
                                  run_dir.parent / "resume.log")) is not None:
            return problems + [problem]
        if is_run:
            resumed = [r["resumed_from"] for r in rows(run_dir)[0] if "resumed_from" in r]
            outcome.resumed_from = resumed[-1] if resumed else 0
            if outcome.resumed_from != max(steps.values(), default=0):
                problems.append(f"resumed from step {outcome.resumed_from}, not from the newest checkpoint "
                                f"(step {max(steps.values(), default=0)})")
        return problems + compare_runs(run_dir, self.reference)


def compare_runs(run_dir: Path, reference: Path) -> list[str]:
    """Metrics rows, checkpoints, and the files of the run directory (report.md, loss.png...) against the
    uninterrupted run's."""
    names, want = ({p.name for p in d.iterdir() if p.is_file()} for d in (run_dir, reference))
    files = [f"the run directory lacks {', '.join(sorted(want - names))}"] if want - names else []
    return compare_rows(run_dir, reference) + compare_checkpoints(run_dir, reference) + files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=24, help="how many kill points (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="draws the points (default 0)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="points run at once, each launch on one thread (default: 2, or 1 on one core)")
    parser.add_argument("--keep", type=Path, help="work in this new folder and keep it (default: a temp folder, "
                        "kept only when a point is not exact)")
    args = parser.parse_args(argv)
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep} is not empty: give a new folder")
    started = time.perf_counter()
    root = args.keep or Path(tempfile.mkdtemp(prefix="gptrain-faults-"))
    sweep = Sweep(root)
    print(f"fault sweep: {args.points} points from seed {args.seed}; reference run in "
          f"{time.perf_counter() - started:.1f}s", flush=True)
    outcomes = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for outcome in pool.map(sweep.run_point, sweep.draw(args.seed, args.points)):
            outcomes.append(outcome)
            print(outcome.describe(), flush=True)
    num_exact = sum(not o.problems for o in outcomes)
    print(f"{num_exact}/{len(outcomes)} exact ({time.perf_counter() - started:.0f}s)")
    if num_exact < len(outcomes) or args.keep:
        print(f"the runs are in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if num_exact == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
