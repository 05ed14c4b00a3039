"""Steering a live trainer: commands, acknowledgements, pause, save, stop, lr scale, the lock, and replay."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from conftest import wait_for

from gptrain.config import from_toml_text, resolve_config
from gptrain.errors import UserError
from gptrain.train import loop
from gptrain.train.control import ACKS_FILE, CONTROL_FILE, ControlReader, TrainerLock, check_command, send_command
from gptrain.train.schedule import lr_at


def _rows(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.fixture
def slow_steps(monkeypatch):
    """Steps of a tiny model take ~20 ms, so a test can act while the run is still going."""
    real = loop.step_run

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "step_run", slow)


def _config(tmp_path, corpus, steps):
    return resolve_config(None, {
        "data.source": str(corpus), "data.data_dir": str(tmp_path / "dataset"), "tokenizer.kind": "char",
        "embd": 16, "layers": 1, "heads": 1, "context": 16, "batch-size": 4, "steps": steps,
        "schedule.num_warmup_steps": 5, "eval.every_steps": 0, "samples.every_steps": 0, "samples.num_tokens": 4,
        "checkpoint.every_steps": 20, "checkpoint.keep_last": 10, "log.is_quiet": True, "log.live": "off",
        "train.compile": "off",  # a long run: no compile probe
        "run_dir": str(tmp_path / "run")}, environ={})


def _start(cfg, **kwargs):
    box = {}
    thread = threading.Thread(target=lambda: box.update(loop.train(cfg, log=lambda *_: None, **kwargs)))
    thread.start()
    return thread, box


def test_commands_are_checked_and_read_once(tmp_path):
    assert check_command({"id": "a", "command": "lr_scale", "value": "0.5"})["value"] == 0.5
    for bad in ({"id": "a", "command": "lr_scale", "value": 0}, {"id": "", "command": "pause"},
                {"id": "a", "command": "explode"}, {"id": "a", "command": "eval_every", "value": "x"}):
        with pytest.raises(UserError):
            check_command(bad)
    (tmp_path / CONTROL_FILE).write_text('{"id": "1", "command": "pause"}\nnot json\n{"id": "2", "comm')
    reader = ControlReader.open(tmp_path)
    first = reader.poll()
    assert first[0] == {"id": "1", "command": "pause"} and "not JSON" in first[1]["error"]
    assert reader.poll() == []  # the half-written line waits for its end
    with open(tmp_path / CONTROL_FILE, "a") as f:
        f.write('and": "stop"}\n')
    assert reader.poll() == [{"id": "2", "command": "stop"}]
    reader.acknowledge({"id": "1", "command": "pause"}, 3, "paused")
    again = ControlReader.open(tmp_path)
    assert [c["id"] for c in again.poll()] == [None, "2"]  # an acknowledged id is never applied again


def test_one_trainer_per_run_directory_and_no_command_without_one(tmp_path):
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(UserError, match="no trainer is running"):
        send_command(tmp_path, "pause")
    lock = TrainerLock(tmp_path)
    lock.acquire()
    with pytest.raises(UserError, match="another gptrain process is training"):
        TrainerLock(tmp_path).acquire()
    lock.release()
    TrainerLock(tmp_path).acquire()  # free again once released


def test_pause_save_lr_and_stop_steer_a_live_run(tmp_path, corpus_dir, slow_steps):
    cfg = _config(tmp_path, corpus_dir, steps=100_000)
    run = tmp_path / "run"
    thread, box = _start(cfg)
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(_rows(run, "train")) >= 5)
    paused = send_command(run, "pause")
    count = len(_rows(run, "train"))
    time.sleep(1.0)
    assert paused["ok"] and len(_rows(run, "train")) == count  # no step while paused
    saved = send_command(run, "save")
    wait_for(lambda: (run / "checkpoints" / f"step_{saved['step']:06d}").is_dir())
    scaled = send_command(run, "lr_scale", 0.5)
    send_command(run, "resume")
    wait_for(lambda: len(_rows(run, "train")) >= count + 5)
    stopped = send_command(run, "stop")
    thread.join(30)
    assert box["is_stopped"] and box["stop_signal"] == 0  # a command stop: `gptrain train` exits 0
    lrs = {r["step"]: r["lr"] for r in _rows(run, "train")}
    step = scaled["step"]
    assert lrs[step + 1] == pytest.approx(0.5 * lr_at(step, cfg.train.num_steps, cfg.schedule))
    assert lrs[step] == pytest.approx(lr_at(step - 1, cfg.train.num_steps, cfg.schedule))
    assert (run / "checkpoints" / f"step_{stopped['step']:06d}").is_dir()  # saved at the stop
    acks = [json.loads(line) for line in (run / ACKS_FILE).read_text().splitlines()]
    assert [a["command"] for a in acks] == ["pause", "save", "lr_scale", "resume", "stop"]
    assert sum(1 for r in _rows(run, "event") if r.get("command")) == 5


def test_a_state_command_is_replayed_after_a_crash_and_one_off_commands_are_not(tmp_path, corpus_dir,
                                                                                 slow_steps):
    cfg = _config(tmp_path, corpus_dir, steps=120)
    run = tmp_path / "run"
    thread, box = _start(cfg)
    wait_for(lambda: (run / "checkpoints" / "step_000020").is_dir())
    scaled = send_command(run, "lr_scale", 0.25)
    stopped = send_command(run, "stop")
    thread.join(30)
    assert 20 < scaled["step"] <= stopped["step"] < 40
    # As if the process died before the stop's checkpoint: resume from step 20.
    shutil.rmtree(run / "checkpoints" / f"step_{stopped['step']:06d}")
    summary = loop.train(from_toml_text((run / "config.toml").read_text()), resume=run, log=lambda *_: None)
    assert summary["step"] == 120  # the stop was not replayed
    lrs = {r["step"]: r["lr"] for r in _rows(run, "train")}
    step = scaled["step"]
    assert lrs[step + 1] == pytest.approx(0.25 * lr_at(step, 120, cfg.schedule))  # re-applied at its step
    assert lrs[step] == pytest.approx(lr_at(step - 1, 120, cfg.schedule))
    assert len((run / ACKS_FILE).read_text().splitlines()) == 2  # nothing acknowledged twice
    assert any("again: first applied at step" in r["message"] for r in _rows(run, "event"))
