"""read_run(): a RunRecord of everything a run directory's files say about its run (for reports and plots).

It reads config.toml, metrics.jsonl, eval.jsonl, samples.txt and checkpoints/*/state.json, and nothing
else, so the figures are right after a resume (whose cut-back left only the rows that count) too.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from gptrain.config import RunConfig, from_toml_text
from gptrain.errors import UserError
from gptrain.metrics.sinks import parse_rows

# Event rows that open a launch (a start or a resume): layout, machine, resumed_from.
LAUNCH_KEYS = ("strategy", "machine", "resumed_from")
SAMPLE_HEADER = re.compile(r"^=== step (\d+) ===$", re.MULTILINE)


def is_number(value: object) -> bool:
    """A finite int or float (NaN and infinity are written as null; bools are not figures)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(kw_only=True)
class RunRecord:
    """The rows of one run directory by kind, with the figures a report card shows."""

    run_dir: Path
    config: RunConfig
    rows: list[dict] = field(default_factory=list)  # metrics.jsonl in file order
    eval_rows: list[dict] = field(default_factory=list)  # eval.jsonl "eval" rows (full split)
    hellaswag_rows: list[dict] = field(default_factory=list)  # eval.jsonl "hellaswag" rows
    samples_text: str | None = None  # the last sample in samples.txt (used when no sample row is left)
    step_seconds: float | None = None  # TrainState.elapsed_seconds when the newest checkpoint is at the last step
    num_unreadable_lines: int = 0

    @property
    def name(self) -> str:
        return self.run_dir.name

    def of_kind(self, kind: str) -> list[dict]:
        return [r for r in self.rows if r.get("kind") == kind]

    @property
    def train_rows(self) -> list[dict]:
        return self.of_kind("train")

    @property
    def val_rows(self) -> list[dict]:
        """Val rows on the sampled val windows (rows from before "scope" existed are sampled too)."""
        return [r for r in self.of_kind("val") if r.get("scope", "sample") == "sample" and is_number(r.get("val_loss"))]

    @property
    def event_rows(self) -> list[dict]:
        return self.of_kind("event")

    @property
    def num_steps(self) -> int:
        train = self.train_rows
        return int(train[-1]["step"]) if train else 0

    @property
    def tokens_seen(self) -> int:
        train = [r for r in self.train_rows if is_number(r.get("tokens_seen"))]
        return int(train[-1]["tokens_seen"]) if train else 0

    @property
    def final_val(self) -> dict | None:
        val = self.val_rows
        return val[-1] if val else None

    @property
    def best_val(self) -> dict | None:
        return min(self.val_rows, key=lambda r: r["val_loss"], default=None)

    @property
    def best_bpb(self) -> dict | None:
        """The val row with the lowest bits per byte."""
        return min((r for r in self.val_rows if is_number(r.get("val_bpb"))), key=lambda r: r["val_bpb"],
                   default=None)

    @property
    def last_hellaswag(self) -> dict | None:
        """The last val row that carries HellaSwag figures (it ran at that step during training)."""
        rows = [r for r in self.of_kind("val") if is_number(r.get("hellaswag_acc_norm"))]
        return rows[-1] if rows else None

    @property
    def last_hellaswag_eval(self) -> dict | None:
        return self.hellaswag_rows[-1] if self.hellaswag_rows else None

    @property
    def full_evals(self) -> list[dict]:
        """The latest full-split evaluation of each (checkpoint, split, data), in step order."""
        latest = {(r.get("checkpoint"), r.get("split"), r.get("data")): r for r in self.eval_rows}
        return sorted(latest.values(), key=lambda r: (r.get("step") or 0, str(r.get("split"))))

    @property
    def layout(self) -> dict | None:
        """The latest layout event row (strategy, batch, num_parameters, dataset, val_set)."""
        rows = [r for r in self.event_rows if "strategy" in r]
        return rows[-1] if rows else None

    @property
    def machine(self) -> dict | None:
        rows = [r["machine"] for r in self.event_rows if isinstance(r.get("machine"), dict)]
        return rows[-1] if rows else None

    @property
    def num_launches(self) -> int:
        """Starts and resumes: one layout row each (older runs: one plus the resume events)."""
        if not self.rows:
            return 0
        num_layouts = sum(1 for r in self.event_rows if "strategy" in r)
        return num_layouts or 1 + sum(1 for r in self.event_rows if "resumed_from" in r)

    @property
    def val_sets(self) -> list[str]:
        """The distinct val_set ids of the run's launches, in order (more than one: a resume changed it)."""
        ids = [str(r["val_set"]) for r in self.event_rows if r.get("val_set") is not None]
        return list(dict.fromkeys(ids))

    @property
    def num_parameters(self) -> int | None:
        layout = self.layout
        return layout.get("num_parameters") if layout else None

    @property
    def wall_seconds(self) -> float:
        return launch_seconds(self.rows)

    @property
    def tokens_per_second(self) -> float | None:
        """The median of the train rows' tokens/s (step time only: evaluation and checkpoints excluded)."""
        values = [r["tokens_per_second"] for r in self.train_rows if is_number(r.get("tokens_per_second"))]
        return statistics.median(values) if values else None

    @property
    def mfu(self) -> float | None:
        values = [r["mfu"] for r in self.train_rows if is_number(r.get("mfu"))]
        return statistics.median(values) if values else None

    @property
    def latest_sample(self) -> tuple[int | None, str] | None:
        """(step, text) of the newest sample row, else of samples.txt's last entry."""
        rows = [r for r in self.of_kind("sample") if isinstance(r.get("text"), str)]
        if rows:
            return rows[-1].get("step"), rows[-1]["text"]
        return (None, self.samples_text) if self.samples_text is not None else None

    @property
    def is_done(self) -> bool:
        """Whether the run finished: a "done:" event after its last train row."""
        for row in reversed(self.rows):
            if row.get("kind") == "train":
                return False
            if row.get("kind") == "event" and str(row.get("message", "")).startswith("done:"):
                return True
        return False

    def tokens_of(self, rows: list[dict]) -> list[int | None]:
        """Tokens seen at each row: its own tokens_seen, else its step's train row, else step x batch_tokens."""
        by_step = {r.get("step"): int(r["tokens_seen"]) for r in self.train_rows if is_number(r.get("tokens_seen"))}
        layout = self.layout or {}
        batch = layout.get("batch_tokens") if is_number(layout.get("batch_tokens")) else None
        out = []
        for row in rows:
            step = row.get("step")
            if is_number(row.get("tokens_seen")):
                out.append(int(row["tokens_seen"]))
            else:
                out.append(by_step.get(step, int(step * batch) if batch and is_number(step) else None))
        return out


def launch_seconds(rows: list[dict]) -> float:
    """Wall-clock seconds of the run: each launch from its first row (written once setup is done) to its
    last, summed, so time between a stop and its resume, and steps a resume cut back, are not counted."""
    total, start, last, has_body = 0.0, None, None, False
    for row in rows:
        t = row.get("time")
        if not is_number(t):
            continue
        is_launch = row.get("kind") == "event" and any(k in row for k in LAUNCH_KEYS)
        if is_launch and has_body:  # a new launch begins; one launch writes several launch rows in a row
            total += max(0.0, last - start)
            start = None
        if start is None:
            start, has_body = t, False
        has_body = has_body or not is_launch
        last = t
    if start is not None:
        total += max(0.0, last - start)
    return total


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a file, one a line (read a line at a time), and how many lines were not one
    (a line being written)."""
    if not path.is_file():
        return [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_rows(f)


def last_sample_in(path: Path) -> str | None:
    """The newest entry of samples.txt (each headed "=== step N ==="), without its trailing blank line;
    read a line at a time (the file grows with the run)."""
    if not path.is_file():
        return None
    latest: list[str] | None = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if SAMPLE_HEADER.fullmatch(line.rstrip("\n")):
                latest = []
            elif latest is not None:
                latest.append(line)
    return None if latest is None else "".join(latest).strip("\n")


def checkpoint_step_seconds(run_dir: Path, last_step: int) -> float | None:
    """TrainState.elapsed_seconds (time inside steps) of a checkpoint taken at the run's last step, if any."""
    for state_path in sorted((run_dir / "checkpoints").glob("*/state.json")):
        try:
            train = json.loads(state_path.read_text(encoding="utf-8"))["train"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged or half-written checkpoint says nothing here
        if isinstance(train, dict) and train.get("step") == last_step and is_number(train.get("elapsed_seconds")):
            return float(train["elapsed_seconds"])
    return None


def read_run(run_dir: Path) -> RunRecord:
    """Everything a run directory's files say about its run; UserError if it is not a run directory."""
    run_dir = Path(run_dir)
    missing = [n for n in ("config.toml", "metrics.jsonl") if not (run_dir / n).is_file()]
    if missing:
        raise UserError(f"{run_dir} is not a run directory (no {' or '.join(missing)} in it): give a folder "
                        "made by `gptrain train`, such as runs/<name>-<time>")
    try:
        config = from_toml_text((run_dir / "config.toml").read_text(encoding="utf-8"))
    except UserError as e:
        raise UserError(f"{run_dir / 'config.toml'} cannot be read ({e}): the report needs the run's config") from None
    rows, num_bad = read_jsonl(run_dir / "metrics.jsonl")
    evals, num_bad_evals = read_jsonl(run_dir / "eval.jsonl")
    record = RunRecord(
        run_dir=run_dir,
        config=config,
        rows=rows,
        eval_rows=[r for r in evals if r.get("kind") == "eval" and is_number(r.get("loss"))],
        hellaswag_rows=[r for r in evals if r.get("kind") == "hellaswag" and is_number(r.get("acc_norm"))],
        samples_text=last_sample_in(run_dir / "samples.txt"),
        num_unreadable_lines=num_bad + num_bad_evals,
    )
    record.step_seconds = checkpoint_step_seconds(run_dir, record.num_steps) if record.num_steps else None
    return record
