"""SIGKILL a tiny training (a subprocess) anywhere, `--resume` it, and get the uninterrupted run back bit for
bit: a few points of scripts/fault_sweep.py's harness (CI runs the script's full sweep as its own step)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).parents[2] / "scripts" / "fault_sweep.py"
SEED = 0


def _load_harness():
    spec = importlib.util.spec_from_file_location("fault_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # importing it runs nothing
    return module


harness = _load_harness()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The corpus and the uninterrupted reference run, shared by this module's points."""
    return harness.Sweep(tmp_path_factory.mktemp("faults"))


def _drawn(sweep, family: str):
    """This module's points, one of each: a plain step, a checkpoint write, a metrics append (seeded)."""
    checkpoint_kind = random.Random(SEED).choice(harness.CHECKPOINT_POINTS)
    points = sweep.draw(SEED, 3, ("step", checkpoint_kind, "metrics.append"))
    return next(p for p in points if p.fault.startswith(family))


@pytest.mark.parametrize("family", ["step", "checkpoint.", "metrics.append"])
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_run(sweep, family):
    outcome = sweep.run_point(_drawn(sweep, family))
    assert not outcome.problems, outcome.describe()
    assert outcome.killed_after_step >= 1 and outcome.resumed_from is not None  # killed mid-run, then resumed


def test_a_preparation_killed_anywhere_reruns_to_identical_shards(sweep):
    point = sweep.draw(SEED, 1, harness.PREPARE_POINTS)[0]
    outcome = sweep.run_point(point)
    assert not outcome.problems, outcome.describe()  # the shards byte for byte, and then the same training


def test_the_comparison_sees_a_changed_weight_a_lost_row_and_a_damaged_checkpoint(sweep, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(sweep.reference, run)
    assert harness.compare_runs(run, sweep.reference) == []
    model = run / "checkpoints" / "final" / "model.safetensors"
    tensors = load_file(str(model))
    name = next(iter(tensors))
    tensors[name] = torch.nextafter(tensors[name], torch.full_like(tensors[name], float("inf")))  # one ulp
    save_file(tensors, str(model), metadata={"format": "pt"})
    # A consistent checkpoint with other weights (its checksum updated too), so the tensor comparison is what
    # catches it; a plain edit is refused at load by the checksum (tests/test_bad_inputs.py).
    state_path = run / "checkpoints" / "final" / "state.json"
    state = json.loads(state_path.read_text())
    state["checksums"]["model.safetensors"] = hashlib.sha256(model.read_bytes()).hexdigest()
    state_path.write_text(json.dumps(state))
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(line for line in lines if '"step": 7, ' not in line
                                               or '"kind": "train"' not in line))
    (run / "checkpoints" / "best" / "optimizer.safetensors").unlink()
    problems = harness.compare_runs(run, sweep.reference)
    assert any(p.startswith("final/model.safetensors differs") for p in problems), problems
    assert any(p.startswith("train rows differ") for p in problems), problems
    assert any(p.startswith("checkpoint best/ does not load") for p in problems), problems


def test_a_kill_between_the_final_and_the_best_checkpoint_resumes_to_the_uninterrupted_run(sweep):
    """The resume finds final/ whole and best/ not yet: it copies the snapshot into best/, removes
    best.tmp/ and writes the report card (saving.settle_checkpoints, the already-complete branch)."""
    if sweep.writes[-2:] != ["final/", "best/"]:
        pytest.fail(f"the last evaluation should be the best, so that final/ and best/ are written: {sweep.writes}")
    outcome = sweep.run_point(harness.Point("checkpoint.model", len(sweep.writes)))
    assert not outcome.problems, outcome.describe()
