"""Tiny end-to-end trainings on the CPU: loss falls, run directory contract, exact resume, fine-tuning."""

import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptrain import Checkpoint, resolve_config, train
from gptrain.errors import UserError

HELLASWAG = Path(__file__).parent.parent / "fixtures" / "hellaswag_fixture.jsonl"


def tiny_values(tmp_path, corpus, **extra):
    values = {
        "data.source": str(corpus), "data.data_dir": str(tmp_path / "dataset"), "data.val_fraction": 0.2,
        "tokenizer.kind": "char", "embd": 32, "layers": 2, "heads": 2, "context": 32, "batch-size": 8,
        "steps": 60, "lr": 1e-2, "eval.every_steps": 20, "eval.num_batches": 4,
        "samples.every_steps": 30, "samples.num_tokens": 20, "checkpoint.every_steps": 30, "log.live": "off",
        "log.is_quiet": True, "run_dir": str(tmp_path / "run"), "train.log_every_steps": 20,
    }
    return values | extra


def _rows(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_training_loss_falls_and_run_dir_is_complete(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.setattr("gptrain.metrics.system.SYSTEM_EVERY_SECONDS", 0.0)  # a system row every step
    cfg = resolve_config(None, tiny_values(tmp_path, corpus_dir), environ={})
    summary = train(cfg, log=lambda *_: None)
    run = tmp_path / "run"
    train_rows, val_rows = _rows(run, "train"), _rows(run, "val")
    assert len(train_rows) == 60 and [r["step"] for r in val_rows] == [20, 40, 60]
    assert train_rows[-1]["loss"] < 0.6 * train_rows[0]["loss"]
    assert val_rows[-1]["val_loss"] < 0.6 * train_rows[0]["loss"]
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "mfu", "tokens_seen", "time"} <= train_rows[0].keys()
    system = _rows(run, "system")
    assert len(system) == 60 and all(r["rss_bytes"] > 0 and r["cpu_percent"] >= 0 for r in system)
    assert summary["step"] == 60 and summary["val_loss"] == val_rows[-1]["val_loss"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "lr", "train_loss", "val_loss", "train_perplexity", "val_perplexity",
                             "sample", "timestamp", "val_bpb", "hellaswag_acc", "hellaswag_acc_norm"]
    val_csv = [r for r in rows if r["val_loss"]]
    assert [float(r["val_bpb"]) for r in val_csv] == [r["val_bpb"] for r in val_rows]
    assert all(r["scope"] == "sample" and r["val_num_tokens"] == 4 * 8 * 32 and 0 < r["val_bpb"] < 8
               for r in val_rows)
    assert "=== step 30 ===" in (run / "samples.txt").read_text()
    log = (run / "train.log").read_text()  # the plain console's lines, whatever the terminal showed
    assert "step 60/60" in log and "bits/byte" in log and "done: 60 steps" in log
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best", "final", "step_000030"]  # step 60 is the final one; keep_last=2
    assert (run / "config.toml").is_file() and (run / "tokenizer.json").is_file()
    checkpoint = Checkpoint.load(run)
    assert checkpoint.path.name == "final" and checkpoint.model.config.vocab_size == checkpoint.tokenizer.vocab_size
    text = checkpoint.generate("KING", max_new_tokens=30, is_greedy=True)
    assert len(text) == 30


def test_resume_n_then_n_equals_2n_bitwise(tmp_path, corpus_dir):
    values = tiny_values(tmp_path, corpus_dir, steps=40, **{"model.dropout": 0.1, "checkpoint.every_steps": 20,
                                                           "samples.every_steps": 0, "eval.hellaswag_every_steps": 20,
                                                           "eval.hellaswag_file": str(HELLASWAG),
                                                           "eval.hellaswag_limit": 4})
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    full = tmp_path / "run"
    # A second run directory holding only what existed at step 20: as if the process died there.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "config.toml", cut / "config.toml")
    shutil.copytree(full / "checkpoints" / "step_000020", cut / "checkpoints" / "step_000020")
    from gptrain.config import from_toml_text

    cfg = from_toml_text((cut / "config.toml").read_text())
    train(cfg, resume=cut, log=lambda *_: None)
    a = load_file(str(full / "checkpoints" / "final" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses_full = [r["loss"] for r in _rows(full, "train")][20:]
    losses_cut = [r["loss"] for r in _rows(cut, "train")]
    assert losses_cut == losses_full
    # Validation and HellaSwag after the resume score exactly what the uninterrupted run scored.
    untimed = [{**r, "time": 0} for r in _rows(full, "val") if r["step"] > 20]
    assert [{**r, "time": 0} for r in _rows(cut, "val")] == untimed and untimed[-1]["hellaswag_num_items"] == 4
    # The resumed launch wrote its machine row, and the report card was made from the run directory alone.
    assert [r["machine"]["torch"] for r in _rows(cut, "event") if "machine" in r] == [torch.__version__]
    assert "| steps | 40 |" in (cut / "report.md").read_text() and (cut / "loss.png").is_file()


def test_a_run_stores_its_vocab_padding_resolved_and_a_resume_keeps_an_older_padded_one(tmp_path, corpus_dir):
    quiet = dict(steps=4, **{"checkpoint.every_steps": 2, "samples.every_steps": 0, "eval.every_steps": 2})
    train(resolve_config(None, tiny_values(tmp_path, corpus_dir, **quiet), environ={}), log=lambda *_: None)
    assert "vocab_multiple = 1\n" in (tmp_path / "run" / "config.toml").read_text()  # auto: a char vocab unpadded
    # A run from before auto padding (64: its char vocabulary padded to 64 rows), cut at step 2, resumed
    # with today's defaults: it keeps its rows and finishes; asking for other rows is refused.
    old = tiny_values(tmp_path, corpus_dir, **quiet, run_dir=str(tmp_path / "old"), **{"model.vocab_multiple": 64})
    train(resolve_config(None, old, environ={}), log=lambda *_: None)
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "old" / "config.toml", cut / "config.toml")
    shutil.copytree(tmp_path / "old" / "checkpoints" / "step_000002", cut / "checkpoints" / "step_000002")
    now = {k: v for k, v in old.items() if k != "model.vocab_multiple"} | {"run_dir": str(cut)}
    from gptrain.config import from_toml_text

    assert from_toml_text((cut / "config.toml").read_text()).model.vocab_size < 64  # so 64 rows are padded
    with pytest.raises(UserError, match="its embedding has 64 rows"):
        train(resolve_config(None, now | {"model.vocab_multiple": 1}, environ={}), resume=cut, log=lambda *_: None)
    train(resolve_config(None, now, environ={}), resume=cut, log=lambda *_: None)
    rows = load_file(str(cut / "checkpoints" / "final" / "model.safetensors"))["transformer.wte.weight"].shape[0]
    assert rows == 64 and "vocab_multiple = 64\n" in (cut / "config.toml").read_text()


def test_run_dir_exists_is_refused_unless_overwrite(tmp_path, corpus_dir):
    from gptrain.errors import UserError

    cfg = resolve_config(None, tiny_values(tmp_path, corpus_dir, steps=2), environ={})
    train(cfg, log=lambda *_: None)
    with pytest.raises(UserError, match="already exists"):
        train(cfg, log=lambda *_: None)
    assert train(cfg, should_overwrite=True, log=lambda *_: None)["step"] == 2


def test_fine_tune_from_checkpoint_on_another_corpus(tmp_path, corpus_dir):
    train(resolve_config(None, tiny_values(tmp_path, corpus_dir, steps=30), environ={}), log=lambda *_: None)
    base = tmp_path / "run" / "checkpoints" / "final"
    other = tmp_path / "other.jsonl"
    lines = (corpus_dir / "play_1.txt").read_text().split("\n\n")
    other.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    values = tiny_values(tmp_path, other, steps=1, **{"data.data_dir": str(tmp_path / "ds2"),
                                                      "run_dir": str(tmp_path / "ft"), "lr": 1e-9})
    summary = train(resolve_config(None, values, environ={}), init_from=base, log=lambda *_: None)
    tuned = Checkpoint.load(tmp_path / "ft")
    start = Checkpoint.load(base)
    assert tuned.tokenizer.to_json() == start.tokenizer.to_json()  # the checkpoint's tokenizer is reused
    # With a negligible learning rate, the fine-tuned weights are the pre-trained ones, not a fresh init.
    for (name, a), b in zip(start.model.state_dict().items(), tuned.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert summary["val_loss"] < 3.0  # a fresh model would start near ln(vocab) = 3.6


def test_early_stopping_when_val_loss_stops_improving(tmp_path, corpus_dir):
    # A learning rate far below one ulp of the weights leaves them bit-identical: val loss cannot improve.
    values = tiny_values(tmp_path, corpus_dir, steps=100, lr=1e-30, **{"eval.every_steps": 5, "eval.patience": 2,
                                                                      "optim.weight_decay": 0.0})
    summary = train(resolve_config(None, values, environ={}), log=lambda *_: None)
    assert summary["step"] == 15  # best at step 5, no better at 10 and 15: patience 2 is spent
    events = [r["message"] for r in _rows(tmp_path / "run", "event")]
    assert any(m.startswith("early stop") for m in events)


def test_epochs_set_the_number_of_steps(tmp_path, corpus_dir):
    values = tiny_values(tmp_path, corpus_dir, epochs=0.5, **{"eval.every_steps": 0, "samples.every_steps": 0,
                                                             "checkpoint.every_steps": 0})
    summary = train(resolve_config(None, values, environ={}), log=lambda *_: None)
    meta = json.loads((tmp_path / "dataset" / "meta.json").read_text())
    windows = (meta["num_train_tokens"] - 1) // 32  # one shard, windows of 33 tokens at stride 32
    assert summary["step"] == -(-windows // 2 // 8)  # ceil(0.5 epoch of windows / 8 per step)
    last = _rows(tmp_path / "run", "train")[-1]
    assert 0.5 <= last["epoch"] < 0.5 + 8 / windows + 1e-9


def test_compiled_training_matches_eager(tmp_path, corpus_dir):
    """train.compile=on (torch.compile, inductor on the CPU) gives the eager losses."""
    losses = {}
    for mode in ("off", "on"):
        values = tiny_values(tmp_path, corpus_dir, steps=3, **{"train.compile": mode, "run_dir": str(tmp_path / mode),
                                                              "eval.every_steps": 0, "samples.every_steps": 0})
        train(resolve_config(None, values, environ={}), log=lambda *_: None)
        losses[mode] = [r["loss"] for r in _rows(tmp_path / mode, "train")]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)


def test_fine_tune_takes_the_checkpoint_sizes_and_resume_keeps_its_tokenizer(tmp_path, corpus_dir):
    train(resolve_config(None, tiny_values(tmp_path, corpus_dir, steps=5), environ={}), log=lambda *_: None)
    other = tmp_path / "other.txt"
    other.write_text((corpus_dir / "play_2.txt").read_text())
    # Default sizes on the command line: the checkpoint's (32 wide, 2 layers) win, not ModelConfig's.
    values = {"data.source": str(other), "data.data_dir": str(tmp_path / "ds3"), "steps": 4, "log.is_quiet": True,
              "run_dir": str(tmp_path / "ft"), "batch-size": 4, "eval.every_steps": 0, "samples.every_steps": 0,
              "checkpoint.every_steps": 2}
    train(resolve_config(None, values, environ={}), init_from=tmp_path / "run", log=lambda *_: None)
    tuned = Checkpoint.load(tmp_path / "ft")
    assert (tuned.config.model.n_embd, tuned.config.model.n_layer) == (32, 2)
    base_tok = Checkpoint.load(tmp_path / "run").tokenizer.to_json()
    assert tuned.tokenizer.to_json() == base_tok
    from gptrain.config import from_toml_text

    cfg = from_toml_text((tmp_path / "ft" / "config.toml").read_text())
    summary = train(apply(cfg, {"steps": 6, "schedule.extend": "hold"}), resume=tmp_path / "ft", log=lambda *_: None)
    assert summary["step"] == 6
    assert Checkpoint.load(tmp_path / "ft").tokenizer.to_json() == base_tok


def apply(cfg, values):
    from gptrain.config import apply_overrides

    return apply_overrides(cfg, values)


def test_weights_that_do_not_fit_are_a_user_error(tmp_path, corpus_dir):
    from gptrain.errors import UserError
    from gptrain.model.gpt import GPT, ModelConfig
    from gptrain.train.checkpoint import load_model_weights, read_checkpoint

    train(resolve_config(None, tiny_values(tmp_path, corpus_dir, steps=2), environ={}), log=lambda *_: None)
    folder = tmp_path / "run" / "checkpoints" / "final"
    wrong = GPT(ModelConfig(n_embd=48, n_layer=2, n_head=2, block_size=32, vocab_size=40))
    with pytest.raises(UserError, match="do not fit this model"):
        load_model_weights(wrong, read_checkpoint(folder, with_optimizer=False)["model"], folder)


def test_ctrl_c_stops_at_a_step_boundary_and_resumes_exactly(tmp_path, corpus_dir, monkeypatch):
    import os
    import signal

    from gptrain.train import setup  # step_run calls train_step from there

    values = tiny_values(tmp_path, corpus_dir, steps=12, **{"checkpoint.every_steps": 0, "samples.every_steps": 0,
                                                           "eval.every_steps": 0, "model.dropout": 0.1})
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    calls = {"n": 0}
    real_step = setup.train_step

    def step_then_interrupt(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C inside step 5
        return real_step(*args, **kwargs)

    monkeypatch.setattr(setup, "train_step", step_then_interrupt)
    cut_values = values | {"run_dir": str(tmp_path / "cut")}
    summary = train(resolve_config(None, cut_values, environ={}), log=lambda *_: None)
    assert summary["is_stopped"] and summary["step"] == 5
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_000005"]
    monkeypatch.setattr(setup, "train_step", real_step)
    from gptrain.config import from_toml_text

    train(from_toml_text((tmp_path / "cut" / "config.toml").read_text()), resume=tmp_path / "cut", log=lambda *_: None)
    a = load_file(str(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [r for r in _rows(tmp_path / "cut", "event") if "resumed_from" in r]
    assert events and events[0]["resumed_from"] == 5


def test_resume_applies_overridden_optimizer_settings(tmp_path, corpus_dir):
    from gptrain.config import apply_overrides, from_toml_text
    from gptrain.train import setup  # step_run calls train_step from there

    values = tiny_values(tmp_path, corpus_dir, steps=3, **{"eval.every_steps": 0, "samples.every_steps": 0})
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    cfg = apply_overrides(from_toml_text((tmp_path / "run" / "config.toml").read_text()),
                          {"steps": 4, "schedule.extend": "hold", "optim.weight_decay": 0.05, "optim.beta2": 0.99})
    seen = {}
    real = setup.train_step

    def spy(model, optimizer, *args, **kwargs):
        seen["groups"] = [(g["weight_decay"], g["betas"]) for g in optimizer.param_groups]
        return real(model, optimizer, *args, **kwargs)

    setup.train_step = spy
    try:
        train(cfg, resume=tmp_path / "run", log=lambda *_: None)
    finally:
        setup.train_step = real
    assert seen["groups"] == [(0.05, (0.9, 0.99)), (0.0, (0.9, 0.99))]


def test_resume_auto_continues_a_run_or_starts_it(tmp_path, corpus_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    values = tiny_values(tmp_path, corpus_dir, steps=8, **{"checkpoint.every_steps": 4, "samples.every_steps": 0,
                                                          "run_dir": ""})
    cfg = resolve_config(None, values, environ={})
    first = train(cfg, resume="auto", log=lambda *_: None)  # nothing to resume: a new run
    run_dir = tmp_path / first["run_dir"]
    assert run_dir.parent.name == "runs" and first["step"] == 8
    # Keep only what existed at step 4 (as if the job was preempted there), then requeue the same command.
    shutil.rmtree(run_dir / "checkpoints" / "final")
    shutil.rmtree(run_dir / "checkpoints" / "best")
    again = train(cfg, resume="auto", log=lambda *_: None)
    assert Path(again["run_dir"]) == Path(first["run_dir"]) and again["train_loss"] == first["train_loss"]
    assert any(r["message"] == "resumed from step 4" for r in _rows(run_dir, "event"))
    # A run killed before its first checkpoint starts again in the same folder.
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.toml", fresh / "config.toml")
    summary = train(replace(cfg, run_dir=str(fresh)), resume="auto", log=lambda *_: None)
    assert summary["step"] == 8 and (fresh / "checkpoints" / "final").is_dir()


def test_dry_run_measures_memory_and_writes_no_run(tmp_path, corpus_dir, capsys):
    from gptrain.train.dry_run import dry_run

    cfg = resolve_config(None, tiny_values(tmp_path, corpus_dir), environ={})
    (row,) = dry_run(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    assert math.isfinite(row["loss"]) and 0 < row["peak_half_bytes"] <= row["peak_bytes"] < row["capacity_bytes"]
    assert row["largest_micro_batch"] is None or row["largest_micro_batch"] > 0
    out = capsys.readouterr().out
    assert "none on 1 rank(s) | micro batch 8 x 1 accumulation steps" in out and "peak (B=4)" in out


def test_sigterm_saves_and_exits_0(tmp_path, corpus_dir):
    import signal
    import subprocess
    import sys
    import time

    values = tiny_values(tmp_path, corpus_dir, steps=100000, **{"checkpoint.every_steps": 0, "eval.every_steps": 0,
                                                               "samples.every_steps": 0, "train.compile": "off"})
    args = [f"--{k}={v}" for k, v in values.items() if "." in k] + ["--run-dir", values["run_dir"], "--quiet"]
    args += ["--data", values["data.source"], "--tokenizer", "char", "--context", "32", "--batch-size", "8",
             "--embd", "32", "--layers", "2", "--heads", "2", "--steps", "100000"]
    args = [a for a in args if not a.startswith(("--data.source", "--tokenizer.kind", "--log.is_quiet"))]
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("GPTRAIN_")}
    proc = subprocess.Popen([sys.executable, "-m", "gptrain", "train", *args], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    run = tmp_path / "run"
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").is_file() or len(_rows(run, "train")) < 3:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0  # saved and stopped: a clean end for a scheduler
    saved = Checkpoint.load(run)
    assert 3 <= saved.state["train"]["step"] < 100000


def test_a_resume_after_a_crash_leaves_one_row_per_step_and_evaluation(tmp_path, corpus_dir):
    values = tiny_values(tmp_path, corpus_dir, steps=40, **{"checkpoint.every_steps": 20, "samples.every_steps": 10})
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    run = tmp_path / "run"
    # As if killed at step 40 before its final checkpoint, halfway through writing a line.
    for name in ("final", "best"):
        shutil.rmtree(run / "checkpoints" / name)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "kind": "tra')
    from gptrain.config import from_toml_text

    train(from_toml_text((run / "config.toml").read_text()), resume=run, log=lambda *_: None)
    assert [r["step"] for r in _rows(run, "train")] == list(range(1, 41))
    assert [r["step"] for r in _rows(run, "val")] == [20, 40]
    assert [r["step"] for r in _rows(run, "sample")] == [10, 20, 30, 40]
    with open(run / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table if r["train_loss"]] == list(range(1, 41))
    assert [int(r["step"]) for r in table if r["val_loss"]] == [20, 40]
    assert (run / "samples.txt").read_text().count("=== step 30 ===") == 1


def test_a_cached_peak_that_the_steps_outrun_is_measured_again_once(tmp_path, corpus_dir, monkeypatch):
    # A probe that landed in a VM's slow moment would show MFU over 100% for every run on that machine.
    from gptrain.metrics import throughput

    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path / "speed"))
    key = throughput._peak_key(throughput.machine_id("cpu"), "fp32")
    throughput.write_cache(throughput.speed_cache_dir() / throughput.CACHE_FILE_NAME, {key: 1.0})  # 1 FLOP/s
    measured = []
    monkeypatch.setattr(throughput, "measure_matmul_flops", lambda *a, **k: measured.append(k) or 1e12)
    cfg = resolve_config(None, tiny_values(tmp_path, corpus_dir, steps=20, **{"train.log_every_steps": 1}), environ={})
    train(cfg, log=lambda *_: None)
    events = [r["message"] for r in _rows(tmp_path / "run", "event") if r["message"].startswith("MFU over 100%")]
    assert events == ["MFU over 100%: the cached matmul peak was low; measured again: 1,000 GFLOP/s"]
    assert len(measured) == 1 and measured[0]["budget_seconds"] == 1.0
    assert all(0 < r["mfu"] < 1 for r in _rows(tmp_path / "run", "train"))
    assert throughput.read_cache(throughput.speed_cache_dir() / throughput.CACHE_FILE_NAME)[key] == 1e12
