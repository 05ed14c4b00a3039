import json

from gptrain.config import RunConfig, to_toml
from gptrain.train.run_dir import find_auto_resume


def _run(path, with_checkpoint: bool):
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.toml").write_text(to_toml(RunConfig()))
    if with_checkpoint:
        (path / "checkpoints" / "step_000004").mkdir()
        (path / "checkpoints" / "step_000004" / "state.json").write_text(json.dumps({"train": {"step": 4}}))


def test_auto_resume_finds_the_newest_run_of_exactly_this_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _run(tmp_path / "runs" / "gpt2-20260101-120000", with_checkpoint=True)
    _run(tmp_path / "runs" / "gpt2-20260102-120000", with_checkpoint=True)
    _run(tmp_path / "runs" / "gpt2-20260103-120000", with_checkpoint=False)  # died before its first checkpoint
    _run(tmp_path / "runs" / "gpt2-124m-fineweb-20260104-120000", with_checkpoint=True)  # another name
    found, _ = find_auto_resume(RunConfig(name="gpt2"))
    assert found.name == "gpt2-20260102-120000"
    assert find_auto_resume(RunConfig(name="gpt2-124m"))[0] is None


def test_auto_resume_with_a_run_dir(tmp_path):
    assert find_auto_resume(RunConfig(run_dir=str(tmp_path / "new"))) == (None, False)
    _run(tmp_path / "empty", with_checkpoint=False)
    assert find_auto_resume(RunConfig(run_dir=str(tmp_path / "empty"))) == (None, True)  # start again in it
    _run(tmp_path / "done", with_checkpoint=True)
    assert find_auto_resume(RunConfig(run_dir=str(tmp_path / "done"))) == (tmp_path / "done", False)
