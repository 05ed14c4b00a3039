"""TensorBoard and W&B sinks: tiny CPU trainings with each switched on, read back, then a resume that redoes
the steps a crash lost (checkpoint at the middle step, the metric files cut back to it)."""

import json
import shutil
import struct
import subprocess
import sys
import time
import types
from html import escape

import pytest
from conftest import wait_for
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

from gptrain import resolve_config, train
from gptrain.cli import main
from gptrain.config import from_toml_text
from gptrain.errors import UserError
from gptrain.integrations.loggers import TensorBoardSink, WandbSink, scalars

SECRET = "dashboard-token-7Qx9vLw2"  # stands for the dashboard's token: never to reach W&B


def tiny_values(tmp_path, corpus, **extra):
    values = {
        "data.source": str(corpus), "data.data_dir": str(tmp_path / "dataset"), "data.val_fraction": 0.2,
        "tokenizer.kind": "char", "embd": 32, "layers": 2, "heads": 2, "context": 32, "batch-size": 8,
        "steps": 40, "lr": 1e-2, "schedule.num_warmup_steps": 5, "eval.every_steps": 20, "eval.num_batches": 2,
        "samples.every_steps": 10, "samples.num_tokens": 20, "checkpoint.every_steps": 20, "log.live": "off",
        "log.is_quiet": True, "run_dir": str(tmp_path / "run"),
    }
    return values | extra


def resume_after_a_crash(run):
    """As if killed at the last step before its final checkpoint: the resume redoes every step after the
    middle one (the newest periodic checkpoint)."""
    for name in ("final", "best"):
        shutil.rmtree(run / "checkpoints" / name)
    train(from_toml_text((run / "config.toml").read_text()), resume=run, log=lambda *_: None)


def jsonl_rows(run, kind):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_scalars_are_named_by_kind_and_leave_out_text_flags_and_gaps():
    row = {"kind": "val", "step": 3, "time": 1.0, "val_loss": 2.5, "val_bpb": 1.25, "scope": "sample",
           "tokens_seen": 96, "flag": True}
    assert scalars(row) == {"val/loss": 2.5, "val/bpb": 1.25, "val/tokens_seen": 96.0}
    train_row = {"kind": "train", "step": 3, "time": 1.0, "loss": 2.0, "mfu": None, "mfu_basis": "probe"}
    assert scalars(train_row) == {"train/loss": 2.0}
    assert scalars({"kind": "event", "step": 0, "time": 1.0, "message": "hi", "world_size": 1}) == {}


def test_tensorboard_holds_each_step_once_after_a_resume_that_redoes_steps(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setattr("gptrain.metrics.system.SYSTEM_EVERY_SECONDS", 0.0)  # a system row every step
    cfg = resolve_config(None, tiny_values(tmp_path, corpus_dir, **{"log.tensorboard": "on"}), environ={})
    assert cfg.log.tensorboard is True and cfg.log.wandb_project == ""
    train(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    first = read_scalars(run)
    losses = [r["loss"] for r in jsonl_rows(run, "train")]
    assert [e.step for e in first["train/loss"]] == list(range(1, 41))
    assert [e.value for e in first["train/loss"]] == pytest.approx(losses, rel=1e-6)
    assert [e.step for e in first["val/loss"]] == [20, 40]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_second", "train/tokens_seen", "val/perplexity",
            "val/bpb", "system/cpu_percent", "system/rss_bytes"} <= first.keys()

    resumed_at = time.time()
    resume_after_a_crash(run)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    after = read_scalars(run)
    for tag in ("train/loss", "train/lr", "system/cpu_percent"):
        steps = [e.step for e in after[tag]]
        assert steps == list(range(1, 41)), tag  # 21..40 once: the crashed launch's were purged
    assert all((e.wall_time >= resumed_at) == (e.step > 20) for e in after["train/loss"])
    assert [e.step for e in after["val/loss"]] == [20, 40] and after["val/loss"][1].wall_time >= resumed_at
    # TensorBoard's own loader (every summary as a tensor, the first restart marker being the run's start).
    plugin = plugin_event_accumulator.EventAccumulator(str(run / "tensorboard"))
    plugin.Reload()
    for tag in plugin.Tags()["tensors"]:
        steps = [e.step for e in plugin.Tensors(tag)]
        if tag != "events/text_summary":  # a launch writes several events at its first step
            assert steps == sorted(set(steps)), tag
    assert [e.step for e in plugin.Tensors("train/loss")] == list(range(1, 41))
    assert [e.step for e in plugin.Tensors("samples/text_summary")] == [10, 20, 30, 40]
    events = [e.tensor_proto.string_val[0].decode() for e in plugin.Tensors("events/text_summary")]
    assert "resumed from step 20" in events


def read_scalars(run) -> dict[str, list]:
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def test_a_missing_extra_is_one_line_before_the_run_directory_is_made(tmp_path, corpus_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for module in ("tensorboard", "torch.utils.tensorboard", "wandb"):  # as if not installed
        monkeypatch.setitem(sys.modules, module, None)
    argv = ["train", "--data", str(corpus_dir), "--run-dir", str(tmp_path / "run"), "--steps", "2"]
    assert main([*argv, "--log.tensorboard=on"]) == 2
    assert capsys.readouterr().err == ("gptrain: error: log.tensorboard needs its extra: "
                                       "pip install 'gptrain[tensorboard]'\n")
    assert main([*argv, "--log.wandb_project", "demo"]) == 2
    assert "log.wandb_project needs its extra: pip install 'gptrain[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r"pip install 'gptrain\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb", 0)
    with pytest.raises(UserError, match=r"pip install 'gptrain\[wandb\]'"):
        WandbSink(tmp_path, "demo", {})


def test_the_core_imports_neither_package():
    code = ("import sys, gptrain.cli, gptrain.train.loop, gptrain.integrations.loggers; "
            "print(sorted(m for m in ('tensorboard', 'torch.utils.tensorboard', 'wandb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"


def test_a_wandb_project_name_w_and_b_refuses_is_a_user_error():
    with pytest.raises(UserError, match="log.wandb_project must be a W&B project name"):
        resolve_config(None, {"log.wandb_project": "team/project"}, environ={})


def test_a_resumed_online_wandb_run_takes_only_steps_after_its_last_and_fails_with_the_training(tmp_path,
                                                                                                monkeypatch):
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class FakeRun:  # what wandb.init returns for a run W&B already holds up to step 20
        step, offline = 21, False

        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self, exit_code):
            calls["finish"].append(exit_code)

    def init(**kwargs):
        calls["init"].append(kwargs)
        if kwargs["project"] == "offline-only":
            raise fake.Error("api_key not configured (no-tty)")
        return FakeRun()

    fake = types.SimpleNamespace(init=init, Error=type("Error", (Exception,), {}), Settings=dict,
                                 Html=lambda text, inject: ("html", text, inject))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / "wandb_id").write_text("abcd1234\n")
    sink = WandbSink(tmp_path, "demo", {"seed": 1})
    assert calls["init"][0] | {"settings": None} == {
        "project": "demo", "dir": str(tmp_path), "id": "abcd1234", "resume": "allow", "name": tmp_path.name,
        "config": {"seed": 1}, "save_code": False, "settings": None}
    assert calls["init"][0]["settings"] == {"console": "off"}  # the terminal is not uploaded
    for step in (20, 21):
        sink.emit({"kind": "train", "step": step, "time": 0.0, "loss": 1.5, "mfu_basis": "spec"})
        sink.emit({"kind": "event", "step": step, "time": 0.0, "message": "hello", "world_size": 1})
    sink.emit({"kind": "sample", "step": 21, "time": 0.0, "text": "a<b"})
    assert calls["log"] == [(21, {"train/loss": 1.5}), (21, {"samples/text": ("html", "<pre>a&lt;b</pre>", False)})]
    try:
        raise RuntimeError("the training failed")
    except RuntimeError:
        sink.close()
    sink.close()
    assert calls["finish"] == [1, 0]
    with pytest.raises(UserError, match=r"W&B did not start \(api_key not configured \(no-tty\)\): run `wandb lo"):
        WandbSink(tmp_path, "offline-only", {})


def test_wandb_offline_run_is_continued_by_a_resume_and_gets_no_secrets(tmp_path, corpus_dir, monkeypatch, capfd):
    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("DASHBOARD_TOKEN", SECRET)
    # The terminal shows the secret while W&B runs (as the dashboard's URL would): it must not be uploaded.
    from gptrain.metrics.system import SystemSampler

    sample = SystemSampler.sample
    monkeypatch.setattr(SystemSampler, "sample", lambda self: print(SECRET, file=sys.stderr) or sample(self))
    monkeypatch.setattr("gptrain.metrics.system.SYSTEM_EVERY_SECONDS", 0.0)
    values = tiny_values(tmp_path, corpus_dir, steps=20, **{"eval.every_steps": 10, "checkpoint.every_steps": 10,
                                                           "log.wandb_project": "gptrain-tests"})
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    run = tmp_path / "run"
    run_id = (run / "wandb_id").read_text().strip()
    resume_after_a_crash(run)
    assert SECRET in capfd.readouterr().err
    assert (run / "wandb_id").read_text().strip() == run_id
    launches = list((run / "wandb").glob("offline-run-*"))
    assert len(launches) == 2
    # W&B's service process may still be writing a launch's transaction log when finish() returns (seen
    # as a launch with no history yet, 1 run in 3 here): wait until both hold their last step, 20.
    def last_step(folder):
        history = read_wandb_log(next(folder.glob("run-*.wandb")))["history"]
        return history[-1][0] if history else None

    wait_for(lambda: all(last_step(folder) == 20 for folder in launches), seconds=20)
    logged = sorted((read_wandb_log(next(folder.glob("run-*.wandb"))) | {"folder": folder} for folder in launches),
                    key=lambda launch: launch["history"][0][0])  # by first step: the first launch first
    assert [launch["run_id"] for launch in logged] == [run_id, run_id]
    assert {launch["project"] for launch in logged} == {"gptrain-tests"}
    assert logged[0]["config"]["model"]["n_embd"] == 32 and logged[0]["config"]["log"]["wandb_project"]
    assert steps_with(logged[0], "train/loss") == list(range(1, 21))
    assert steps_with(logged[1], "train/loss") == list(range(11, 21))  # offline: each launch a part of the run
    assert steps_with(logged[0], "val/loss") == [10, 20] and steps_with(logged[1], "val/loss") == [20]
    assert steps_with(logged[0], "system/rss_bytes") == list(range(1, 21))
    assert steps_with(logged[0], "samples/text/path") == [10, 20]  # an HTML file per sample
    html = (logged[0]["folder"] / "files" / dict(logged[0]["history"])[10]["samples/text/path"]).read_text()
    assert html == f"<pre>{escape(jsonl_rows(run, 'sample')[0]['text'])}</pre>"
    for path in (run / "wandb").rglob("*"):
        assert not path.is_file() or SECRET.encode() not in path.read_bytes(), path
    assert not list((tmp_path / "wandb-home").rglob("*.wandb"))  # the run directory holds the run


def steps_with(launch: dict, key: str) -> list[int]:
    return [step for step, record in launch["history"] if key in record]


def read_wandb_log(path) -> dict:
    """A W&B transaction log (run-<id>.wandb: a 7-byte header, then LevelDB-style records in 32 KiB blocks)
    as {run_id, project, config, history: [(step, {key: value})]}."""
    from wandb.proto import wandb_internal_pb2

    data, out = path.read_bytes(), {"history": []}
    assert data[:4] == b":W&B"
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:  # the zero padding at the end of a block
            pos += room
            continue
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            read_record(record, out)
    return out


def read_record(record, out: dict) -> None:
    kind = record.WhichOneof("record_type")
    if kind == "run":
        config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        out |= {"run_id": record.run.run_id, "project": record.run.project, "config": config}
    elif kind == "history":
        items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
        out["history"].append((items["_step"], items))
