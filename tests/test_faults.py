"""Fault points (faults.py): armed by GPTRAIN_TEST_FAULT, they stop a process at exactly one visit, and
JsonlSink stops there with half a row on disk; config validation accepts the variables and refuses a typo."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import wait_for

from gptrain.config import resolve_config
from gptrain.errors import UserError
from gptrain.faults import FAULT_ENV, MARKER_ENV, parse_fault


def test_parse_fault_takes_a_known_point_and_a_positive_visit():
    assert parse_fault("checkpoint.model:2") == ("checkpoint.model", 2)
    assert parse_fault("") is None
    for bad in ("checkpoint.modle:2", "checkpoint.model:0", "checkpoint.model", "metrics.append:x"):
        with pytest.raises(UserError, match=FAULT_ENV):
            parse_fault(bad)


def test_config_validation_accepts_the_fault_variables_and_refuses_a_bad_one():
    resolve_config(None, {}, environ={FAULT_ENV: "prepare.swap:1", MARKER_ENV: "/tmp/marker"})
    with pytest.raises(UserError, match="expected <point>:<n>"):
        resolve_config(None, {}, environ={FAULT_ENV: "prepare.swapp:1"})


def _stopped_at(tmp_path, fault: str, code: str) -> tuple[str, str]:
    """Run code with the fault armed until it stops there: (its stdout so far, the marker's text)."""
    marker = tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTRAIN_")}
    env |= {FAULT_ENV: fault, MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None)
        assert proc.poll() is None, "the process ended instead of stopping at the fault point"
    finally:
        proc.kill()
    return proc.communicate()[0], marker.read_text()


def test_a_fault_point_stops_the_process_at_its_armed_visit_only(tmp_path):
    code = ("from gptrain.faults import fault_point\n"
            "for i in range(3):\n"
            "    fault_point('prepare.swap')\n"  # another point: never stops here
            "    fault_point('prepare.shard')\n"
            "    print(i, flush=True)\n")
    out, marker = _stopped_at(tmp_path, "prepare.shard:2", code)
    assert out == "0\n"  # passed the first visit, stopped at the second
    assert marker.startswith("prepare.shard:2 pid ")


def test_jsonl_sink_armed_stops_with_half_a_line_on_disk(tmp_path):
    code = ("from pathlib import Path\n"
            "from gptrain.metrics.sinks import JsonlSink\n"
            "sink = JsonlSink(Path('metrics.jsonl'))\n"
            "for step in (1, 2, 3):\n"
            "    sink.emit({'kind': 'train', 'step': step, 'loss': 1.5})\n")
    _stopped_at(tmp_path, "metrics.append:2", code)
    line = '{"kind": "train", "step": %d, "loss": 1.5}\n'
    assert (tmp_path / "metrics.jsonl").read_text() == line % 1 + (line % 2)[: len(line % 2) // 2]
