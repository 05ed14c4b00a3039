"""Bad steps: skipped, and after too many within the window a rollback to the newest checkpoint's
weights (the data position kept, the lr lowered and ramped back), giving up after max_rollbacks;
no checkpoint ever holds non-finite weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from gptrain import resolve_config, train
from gptrain.errors import TrainingDiverged
from gptrain.train import loop


def _values(tmp_path, corpus_dir, **extra):
    return {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"), "tokenizer.kind": "char",
            "embd": 16, "layers": 1, "heads": 1, "context": 16, "batch-size": 4, "steps": 30, "lr": 1e-2,
            "schedule.num_warmup_steps": 2, "schedule.kind": "constant", "eval.every_steps": 0,
            "samples.every_steps": 0, "checkpoint.every_steps": 5, "checkpoint.keep_last": 10, "log.live": "off",
            "log.is_quiet": True, "run_dir": str(tmp_path / "run"), "train.max_bad_steps": 3,
            "train.bad_step_window": 10, "train.recovery_steps": 10, "train.max_rollbacks": 1} | extra


def _poison_weights_at(monkeypatch, steps):
    """Before each of these steps, the weights turn NaN (as a diverged update would leave them)."""
    real = loop.step_run

    def step_run(run, *args, **kwargs):
        if run.state.step in steps:
            with torch.no_grad():
                run.model.transformer.wte.weight.fill_(math.nan)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(loop, "step_run", step_run)


def _rows(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_nan_weights_are_skipped_then_rolled_back_to_the_newest_checkpoint(tmp_path, corpus_dir, monkeypatch):
    _poison_weights_at(monkeypatch, {12})
    train(resolve_config(None, _values(tmp_path, corpus_dir), environ={}), log=lambda *_: None)
    run = tmp_path / "run"
    events = [r["message"] for r in _rows(run, "event")]
    assert sum("update skipped" in m for m in events) == 3  # steps 13, 14, 15
    (rollback,) = [m for m in events if "rolled back" in m]
    assert rollback.startswith("step 15:") and "checkpoint step_000010" in rollback
    train_rows = _rows(run, "train")
    assert [r["step"] for r in train_rows] == list(range(1, 31))  # the step counter went on
    assert all(math.isfinite(r["loss"]) for r in train_rows[15:])  # finite again after the rollback
    lrs = {r["step"]: r["lr"] for r in train_rows}
    assert lrs[16] == pytest.approx(0.5e-2) and lrs[21] == pytest.approx(0.75e-2) and lrs[30] == pytest.approx(1e-2)
    for folder in (run / "checkpoints").iterdir():  # every checkpoint on disk holds finite weights
        assert all(torch.isfinite(t).all() for t in load_file(str(folder / "model.safetensors")).values()), folder
    state = json.loads((run / "checkpoints" / "final" / "state.json").read_text())["train"]
    assert state["num_rollbacks"] == 1 and state["recovery_start_step"] == 15


def test_a_run_that_keeps_diverging_gives_up_and_saves_no_nan(tmp_path, corpus_dir, monkeypatch):
    _poison_weights_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(TrainingDiverged, match="gave up at step 9: 3 bad steps within 10 steps again after 1"):
        train(resolve_config(None, _values(tmp_path, corpus_dir), environ={}), log=lambda *_: None)
    run = tmp_path / "run"
    events = [r["message"] for r in _rows(run, "event")]
    assert any("rolled back to the weights of a fresh initialisation (seed 1337)" in m for m in events)
    assert any("checkpoint step_000005 not written" in m for m in events)
    assert not (run / "checkpoints" / "step_000005").exists()


def test_giving_up_is_one_line_and_exit_1(monkeypatch, capsys):
    import gptrain.cli as cli

    def diverge(args, extra):
        raise TrainingDiverged("gave up at step 9: ...")

    monkeypatch.setattr(cli, "cmd_train", diverge)
    assert cli.main(["train"]) == 1
    assert capsys.readouterr().err == "gptrain: gave up at step 9: ...\n"


def test_spike_batches_are_skipped_and_rolled_back_past(tmp_path, corpus_dir, monkeypatch):
    """Batches whose targets are noise (a corrupt stretch of data): the loss jumps far above its running
    mean, so with train.spike_factor those updates are skipped, and three of them roll the run back."""
    real = loop.step_run
    spiky = {20, 21, 22}

    def step_run(run, *args, **kwargs):
        if run.state.step not in spiky:
            return real(run, *args, **kwargs)
        loader, next_batch = run.train_loader, run.train_loader.next_batch
        noise = torch.Generator().manual_seed(run.state.step)

        def corrupt():
            x, y = next_batch()  # the data position moves on: this stretch is not seen again
            return x, torch.randint(0, int(y.max()) + 1, y.shape, generator=noise)

        loader.next_batch = corrupt
        try:
            return real(run, *args, **kwargs)
        finally:
            del loader.next_batch

    monkeypatch.setattr(loop, "step_run", step_run)
    values = _values(tmp_path, corpus_dir, **{"train.spike_factor": 1.3, "steps": 30})
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    run = tmp_path / "run"
    events = [r["message"] for r in _rows(run, "event")]
    skipped = [m for m in events if "update skipped" in m]
    assert [m.split(":")[0] for m in skipped] == ["step 21", "step 22", "step 23"]
    assert all("limit" in m for m in skipped)
    assert any(m.startswith("step 23:") and "checkpoint step_000020" in m for m in events if "rolled back" in m)
    losses = {r["step"]: r["loss"] for r in _rows(run, "train")}
    assert all(losses[s] > 1.3 * losses[20] for s in (21, 22, 23)) and losses[30] < losses[21]
