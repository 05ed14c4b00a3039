"""Test-only fault points: with GPTRAIN_TEST_FAULT="<point>:<n>" the process stops for good the n-th time
it reaches <point>, after writing the file GPTRAIN_TEST_FAULT_MARKER names, so a test can SIGKILL it there
(scripts/fault_sweep.py). Unset (always, outside tests), a fault point is one comparison.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from gptrain.errors import UserError
from gptrain.files import write_atomic

FAULT_ENV, MARKER_ENV = "GPTRAIN_TEST_FAULT", "GPTRAIN_TEST_FAULT_MARKER"
POINTS = (
    # train/checkpoint.write_checkpoint, in the writer thread: around each file of <name>.tmp and its swap
    "checkpoint.start", "checkpoint.model", "checkpoint.optimizer", "checkpoint.state", "checkpoint.swap",
    "checkpoint.swapped",
    "metrics.append",  # metrics/sinks.JsonlSink.emit: half of a row's line is written
    # data preparation: a shard just finished, a manifest about to be written, the dataset about to be swapped in
    "prepare.shard", "prepare.manifest", "prepare.swap",
)


def parse_fault(spec: str) -> tuple[str, int] | None:
    """("point", n) from "point:n"; None for an empty spec."""
    if not spec:
        return None
    name, _, count = spec.rpartition(":")
    if name not in POINTS or not count.isdigit() or int(count) < 1:
        raise UserError(f"{FAULT_ENV}={spec!r}: expected <point>:<n> with n >= 1, a point among {', '.join(POINTS)}")
    return name, int(count)


def _armed_from_environment() -> tuple[str, int] | None:
    try:
        return parse_fault(os.environ.get(FAULT_ENV, ""))
    except UserError:  # config validation reports it (config.env_overrides): importing never fails
        return None


_ARMED = _armed_from_environment()  # read once: the environment does not change under a run
_counts: dict[str, int] = {}
_lock = threading.Lock()  # the checkpoint writer's thread and the training thread both pass fault points


def is_armed(name: str) -> bool:
    """Whether this process stops at some visit of point `name` (a caller may then take a slower path)."""
    return _ARMED is not None and _ARMED[0] == name


def fault_point(name: str) -> None:
    """Count a visit of point `name`; at the armed visit write the marker file and sleep until killed."""
    if _ARMED is None or _ARMED[0] != name:
        return
    with _lock:
        _counts[name] = visit = _counts.get(name, 0) + 1
    if visit != _ARMED[1]:
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        write_atomic(Path(marker), f"{name}:{visit} pid {os.getpid()}\n")
    while True:  # only SIGKILL ends this (a SIGTERM handler merely sets a flag the stopped thread never reads)
        time.sleep(3600)
