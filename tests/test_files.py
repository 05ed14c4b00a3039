"""Files and folders appear whole or not at all: the atomic file helper, the folder swap (an atomic
exchange, or the `.old` fallback that readers and the next trainer recover from)."""

from __future__ import annotations

import json

import pytest

from gptrain import files
from gptrain.train.checkpoint import latest_checkpoint_dir, resolve_checkpoint_dir


def test_write_atomic_replaces_whole_and_leaves_nothing_on_an_error(tmp_path):
    path = tmp_path / "a.json"
    files.write_atomic(path, "old")
    with pytest.raises(RuntimeError), files.atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
    files.write_atomic(path, b"new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def _folder(path, text):
    path.mkdir()
    (path / "state.json").write_text(json.dumps({"train": {"step": text}}))
    return path


@pytest.mark.parametrize("can_exchange", [True, False])
def test_swap_in_replaces_a_non_empty_folder(tmp_path, monkeypatch, can_exchange):
    if not can_exchange:
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    _folder(tmp_path / "best", 1)
    files.swap_in(_folder(tmp_path / "best.tmp", 2), tmp_path / "best")
    assert json.loads((tmp_path / "best" / "state.json").read_text())["train"]["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best"]


def test_the_exchange_is_atomic_on_this_machine(tmp_path):
    a, b = _folder(tmp_path / "a", 1), _folder(tmp_path / "b", 2)
    assert files._exchange(a, b)  # Linux with renameat2 on ext4/tmpfs, as here and in CI
    assert json.loads((a / "state.json").read_text())["train"]["step"] == 2


def test_a_crash_between_the_fallback_renames_loses_no_checkpoint(tmp_path, monkeypatch):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    _folder(ckpts / "best", 7)
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    tmp = _folder(ckpts / "best.tmp", 9)
    real_rename = type(tmp).rename

    def rename(self, to):  # the process dies after the old folder moved aside, before the new one moved in
        if self == tmp:
            raise OSError("killed")
        return real_rename(self, to)

    monkeypatch.setattr(type(tmp), "rename", rename)
    with pytest.raises(OSError):
        files.swap_in(tmp, ckpts / "best")
    monkeypatch.undo()
    assert not (ckpts / "best").exists() and (ckpts / "best.old").is_dir()  # the moment the crash left
    assert latest_checkpoint_dir(tmp_path / "run") == ckpts / "best.old"  # readers take the whole old one
    assert resolve_checkpoint_dir(tmp_path / "run") == ckpts / "best.old"
    files.restore_swaps(ckpts)  # what the next trainer does under its lock
    assert (ckpts / "best" / "state.json").is_file() and not (ckpts / "best.old").exists()
