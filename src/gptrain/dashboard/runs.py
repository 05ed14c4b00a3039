"""What the dashboard reads from a run directory: metrics rows from a byte offset (the file may have been
cut back by a resume), thinned for drawing, and the run's config and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from gptrain.metrics.sinks import parse_rows
from gptrain.train.control import is_trainer_running

MAX_TRAIN_POINTS = 2000  # train and system rows sent on a first load; every val, sample and event row is sent
LOG_TAIL_BYTES = 64 * 1024  # of train.log on a first load


def read_rows_from(path: Path, offset: int) -> tuple[list[dict], int, bool]:
    """Whole JSON lines of path from byte offset on: (rows, the offset after them, whether the file was
    cut back below offset, so the reader started again from 0). A line still being written waits."""
    if not path.is_file():
        return [], 0, offset > 0
    size = path.stat().st_size
    is_reset = size < offset
    start = 0 if is_reset else offset
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(size - start)
    whole = data[: data.rfind(b"\n") + 1]
    rows = parse_rows(whole.splitlines())[0]
    return rows, start + len(whole), is_reset


def thin(rows: list[dict], max_points: int = MAX_TRAIN_POINTS) -> list[dict]:
    """Every row but train and system ones, and at most max_points of each of those, evenly spread
    (the last one always kept), so a first load of a 100,000-step run stays small."""
    out, kept = [], []
    for kind in ("train", "system"):
        of_kind = [i for i, r in enumerate(rows) if r.get("kind") == kind]
        stride = max(1, -(-len(of_kind) // max_points))
        kept += of_kind[::stride] + of_kind[-1:]
    keep = set(kept)
    for i, row in enumerate(rows):
        if row.get("kind") not in ("train", "system") or i in keep:
            out.append(row)
    return out


def read_log_from(path: Path, offset: int) -> tuple[str, int, bool]:
    """train.log's whole lines from byte offset on (its last LOG_TAIL_BYTES when offset is 0 or the file
    was cut back): (text, the offset after it, whether the reader started again)."""
    if not path.is_file():
        return "", 0, offset > 0
    size = path.stat().st_size
    is_reset = size < offset
    start = max(0, size - LOG_TAIL_BYTES) if offset == 0 or is_reset else offset
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(size - start)
    whole = data[: data.rfind(b"\n") + 1]
    return whole.decode("utf-8", errors="replace"), start + len(whole), is_reset


def describe_run(run_dir: Path) -> dict:
    """Name, path, config text, checkpoints (name and step) of a run directory, and whether a trainer is
    running in it now."""

    checkpoints = []
    for folder in sorted((run_dir / "checkpoints").glob("*/state.json")):
        try:
            step = json.loads(folder.read_text())["train"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        checkpoints.append({"name": folder.parent.name, "step": step})
    config = run_dir / "config.toml"
    return {"name": run_dir.name, "path": str(run_dir), "checkpoints": checkpoints,
            "config": config.read_text(encoding="utf-8") if config.is_file() else "",
            "is_live": is_trainer_running(run_dir)}
