"""Where metrics go: metrics.jsonl, metrics.csv, samples.txt, and the terminal (MetricSink protocol).

Every row is a dict with "kind" ("train", "val", "sample", "event"), "step" and "time".
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from gptrain.faults import fault_point, is_armed

CSV_COLUMNS = ["step", "lr", "train_loss", "val_loss", "train_perplexity", "val_perplexity", "sample", "timestamp",
               "val_bpb", "hellaswag_acc", "hellaswag_acc_norm"]
VAL_COLUMNS = ("val_loss", "val_perplexity", "val_bpb", "hellaswag_acc", "hellaswag_acc_norm")


def parse_rows(lines: Iterable[str | bytes]) -> tuple[list[dict], int]:
    """The JSON objects among lines (blank ones skipped) and how many other lines there were (one being
    written, a damaged one): every reader of metrics.jsonl, eval.jsonl and the control files uses this."""
    rows, num_bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            num_bad += 1
    return rows, num_bad


METRIC_FILES = ("metrics.jsonl", "metrics.csv", "samples.txt")  # cut back to a checkpoint on resume


def file_offsets(run_dir: Path) -> dict[str, int]:
    """The metric files' sizes now: saved with a checkpoint, so a resume can cut them back to it."""
    return {name: (run_dir / name).stat().st_size for name in METRIC_FILES if (run_dir / name).is_file()}


def cut_back(run_dir: Path, offsets: dict[str, int]) -> None:
    """Truncate each metric file to its saved size: rows written after the checkpoint (steps a resume
    redoes, a half-written last line) go, so every step has one train row and every evaluation one."""
    for name, size in offsets.items():
        path = run_dir / name
        if name in METRIC_FILES and path.is_file() and path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)


class MetricSink(Protocol):
    def emit(self, row: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Append-only, one JSON object per line, flushed every line (viewers tail this file)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def emit(self, row: dict) -> None:
        # NaN/Infinity are not JSON (a browser's JSON.parse rejects them): they are written as null.
        row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        line = json.dumps(row, allow_nan=False) + "\n"
        if is_armed("metrics.append"):  # a test stops here with half a line on disk (faults.py)
            half = len(line) // 2
            self._file.write(line[:half])
            self._file.flush()
            fault_point("metrics.append")
            line = line[half:]
        self._file.write(line)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CsvSink:
    """The train and val figures as spreadsheet columns."""

    def __init__(self, path: Path) -> None:
        is_new = not path.exists() or path.stat().st_size == 0
        # A resumed run keeps its file's columns (one written before a column was added has fewer).
        columns = CSV_COLUMNS
        if not is_new:
            with open(path, encoding="utf-8", newline="") as f:
                columns = next(csv.reader(f), CSV_COLUMNS)
        self._file = open(path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=columns, extrasaction="ignore")
        if is_new:
            self._writer.writeheader()

    def emit(self, row: dict) -> None:
        kind = row["kind"]
        out = {"step": row["step"], "timestamp": row["time"]}
        if kind == "train":
            out |= {"lr": row["lr"], "train_loss": row["loss"], "train_perplexity": math.exp(min(row["loss"], 50))}
        elif kind == "val":
            out |= {k: row[k] for k in VAL_COLUMNS if k in row}
        elif kind == "sample":
            out["sample"] = row["text"]
        else:
            return
        self._writer.writerow(out)
        self._file.flush()


    def close(self) -> None:
        self._file.close()


class SamplesSink:
    """samples.txt: each sample headed by its step."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def emit(self, row: dict) -> None:
        if row["kind"] == "sample":
            self._file.write(f"=== step {row['step']} ===\n{row['text']}\n\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()
