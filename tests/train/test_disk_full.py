"""A full disk: a checkpoint that would not fit is not started, and one that runs out of space midway is
removed; either way the run stops with one line naming the folder and the space, exit 1, and the last
good checkpoint stays intact and loadable."""

from __future__ import annotations

import errno
import json
from collections import namedtuple

import pytest

from gptrain.cli import main
from gptrain.train import checkpoint as ckpt

Usage = namedtuple("Usage", "total used free")


def _args(tmp_path, corpus_dir):
    return ["train", "--data", str(corpus_dir), "--data.data_dir", str(tmp_path / "ds"), "--tokenizer", "char",
            "--embd", "16", "--layers", "1", "--heads", "1", "--context", "16", "--batch-size", "4", "--steps", "20",
            "--checkpoint.every_steps=5", "--eval.every_steps=0", "--samples.every_steps=0", "--log.live=off",
            "--quiet", "--run-dir", str(tmp_path / "run")]


def _checkpoints(tmp_path):
    return sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_a_checkpoint_that_would_not_fit_is_not_started(tmp_path, corpus_dir, monkeypatch, capsys):
    real_usage, real_write = ckpt.shutil.disk_usage, ckpt.write_checkpoint
    writes = []

    def write_checkpoint(snapshot, folder):
        writes.append(folder.name)
        real_write(snapshot, folder)

    def disk_usage(path):  # room for the first checkpoint only
        return real_usage(path) if not writes else Usage(10**9, 10**9 - 1000, 1000)

    monkeypatch.setattr(ckpt, "write_checkpoint", write_checkpoint)

    monkeypatch.setattr(ckpt.shutil, "disk_usage", disk_usage)
    assert main(_args(tmp_path, corpus_dir)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not enough disk space for checkpoint" in err and "step_000010" in err
    assert "needs about" in err and "free" in err
    assert _checkpoints(tmp_path) == ["step_000005"]  # nothing else started, the last good one intact
    assert ckpt.read_checkpoint(tmp_path / "run" / "checkpoints" / "step_000005")["state"]["train"]["step"] == 5


def test_running_out_of_space_midway_removes_the_partial_folder(tmp_path, corpus_dir, monkeypatch, capsys):
    real = ckpt.save_file
    calls = []

    def save_file(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # the second checkpoint's model.safetensors
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    assert main(_args(tmp_path, corpus_dir)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ran out of disk space writing checkpoint" in err and "Traceback" not in err
    assert _checkpoints(tmp_path) == ["step_000005"]  # no step_000010.tmp left behind
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000005" / "state.json").read_text())
    assert state["train"]["step"] == 5
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(r)["step"] for r in rows) < 20  # it stopped, it did not train on without saving


@pytest.mark.parametrize("free, fits", [(10**9, True), (10, False)])
def test_space_check(tmp_path, monkeypatch, free, fits):
    from gptrain.errors import OutOfSpace

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: Usage(10**9, 0, free))
    if fits:
        ckpt.check_space([tmp_path / "a"], 2048)
    else:
        with pytest.raises(OutOfSpace, match="needs about 2.0 KB and 10 B is free"):
            ckpt.check_space([tmp_path / "a"], 2048)
