"""The run's fast paths (linear kernels, compile): an explicit setting wins, then the checkpoint's choice,
then the probe or the measured compile rule; a resume keeps them, so it stays bitwise."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import copy_run_at, have_equal_final_weights

from gptrain import resolve_config, train
from gptrain.errors import UserError
from gptrain.model.cpu_linear import LinearPlan
from gptrain.model.gpt import ModelConfig
from gptrain.train import compile_probe, fast_paths

CFG = ModelConfig(n_embd=16, n_layer=1, n_head=2, block_size=8, vocab_size=40)


def test_linear_setting_beats_checkpoint_beats_probe(monkeypatch):
    probed = (LinearPlan("onednn"), {"source": "probe"})
    monkeypatch.setattr(fast_paths, "choose_linear_plan", lambda cfg, rows: probed)
    saved = {"cpu_linear": "grad_weight=onednn"}
    assert fast_paths.resolve_linear("aten", saved, CFG, 8, "cpu") == (LinearPlan(), "set")
    assert fast_paths.resolve_linear("auto", saved, CFG, 8, "cpu")[0] == LinearPlan(grad_weight="onednn")
    plan, why = fast_paths.resolve_linear("auto", {}, CFG, 8, "cpu")
    if fast_paths.default_plan().is_all_aten:  # no oneDNN op in this PyTorch
        assert plan.is_all_aten
    else:
        assert (plan, why) == (LinearPlan("onednn"), "probed now")
    assert fast_paths.resolve_linear("auto", {}, CFG, 8, "cuda")[0].is_all_aten


def test_compile_rule_needs_a_saving_over_twice_the_compile_time():
    record = {"compile_seconds": 30.0, "eager_step_seconds": 0.10, "compiled_step_seconds": 0.08}
    assert fast_paths.compile_pays(record, 3001)[0]  # 0.02 s x 3001 steps = 60.02 s > 2 x 30 s
    assert not fast_paths.compile_pays(record, 2999)[0]
    assert fast_paths.compile_pays(record, 0, budget_seconds=600)[0]  # 7,500 compiled steps fit in 10 minutes
    slower = {**record, "compiled_step_seconds": 0.11}
    assert not fast_paths.compile_pays(slower, 10**6)[0]


def test_compile_auto_on_the_cpu_uses_the_measured_record(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path))
    monkeypatch.setattr(fast_paths, "has_cpp_compiler", lambda: True)
    key = fast_paths.compile_key(CFG, 4, "cpu")
    is_on, why = fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 10**6)
    assert not is_on and "short run" not in why and "no measurement" in why  # no probe given: stays eager
    fast_paths.record_compile_times(key, compile_seconds=10.0, eager_step_seconds=0.2, compiled_step_seconds=0.1)
    assert fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 10**6)[0]
    assert not fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 100)[0]
    assert not fast_paths.resolve_compile("auto", {"compile": "off"}, "inductor", "cpu", key, 10**6)[0]
    assert fast_paths.resolve_compile("auto", {}, "inductor", "cuda", key, 1)[0]


def test_a_long_unmeasured_run_probes_compile_once_and_a_short_one_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path))
    monkeypatch.setattr(fast_paths, "has_cpp_compiler", lambda: True)
    key = fast_paths.compile_key(CFG, 4, "cpu")
    probes = []

    def probe() -> dict:
        probes.append(1)
        return {"compile_seconds": 5.0, "eager_step_seconds": 0.025, "compiled_step_seconds": 0.01}

    is_on, why = fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 999, probe=probe)
    assert not is_on and "short run" in why and not probes
    assert not fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 0, budget_seconds=1199, probe=probe)[0]
    assert not probes  # a 10-minute budget (the default job's) is not worth a cold compile to measure
    twelve_layers = compile_probe.min_run_seconds(ModelConfig(n_layer=12))  # its cold compile takes 3x as long
    assert twelve_layers == 3 * compile_probe.min_run_seconds(ModelConfig(n_layer=4)) == 3600
    is_on, why = fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 0, budget_seconds=3000, probe=probe,
                                            min_run_s=twelve_layers)
    assert not is_on and "under 60 min" in why and not probes
    is_on, why = fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 1000, probe=probe)
    assert is_on and "measured now" in why and probes == [1]  # faster, and the compile is already paid
    is_on, why = fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 600, probe=probe)
    assert not is_on and "measured before" in why and probes == [1]  # recorded: 0.015 s x 600 = 9 s < 2 x 5 s
    assert fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 700, probe=probe)[0]  # 10.5 s > 10 s
    other = fast_paths.compile_key(CFG, 8, "cpu")
    is_on, why = fast_paths.resolve_compile("auto", {}, "inductor", "cpu", other, 0, budget_seconds=1200, probe=probe)
    assert is_on and "measured now" in why and probes == [1, 1]


def test_a_run_in_steps_that_times_short_eager_is_not_measured_compiled(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path))
    monkeypatch.setattr(fast_paths, "has_cpp_compiler", lambda: True)
    key = fast_paths.compile_key(CFG, 4, "cpu")
    is_on, why = fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 3000,
                                            probe=lambda: {"eager_step_seconds": 0.2})  # 3,000 x 0.2 s: 10 min
    assert not is_on and "about 10.0 min eager" in why
    assert not (tmp_path / fast_paths.COMPILE_CACHE_FILE_NAME).exists()  # nothing recorded: it was not measured


def test_a_failing_probe_leaves_the_run_eager_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path))
    monkeypatch.setattr(fast_paths, "has_cpp_compiler", lambda: True)
    key = fast_paths.compile_key(CFG, 4, "cpu")

    def broken_toolchain() -> dict:
        raise RuntimeError("CppCompileError: omp.h: No such file or directory\nmore lines")

    is_on, why = fast_paths.resolve_compile("auto", {}, "inductor", "cpu", key, 10**6, probe=broken_toolchain)
    assert not is_on and "compiling failed" in why and "omp.h" in why and "more lines" not in why
    assert not (tmp_path / fast_paths.COMPILE_CACHE_FILE_NAME).exists()  # the next run tries again


def test_a_dry_run_never_probes_compile(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path))
    monkeypatch.setattr(fast_paths, "has_cpp_compiler", lambda: True)
    monkeypatch.setattr(fast_paths, "probe_compile", lambda *args, **kwargs: pytest.fail("a dry run measured compile"))
    run = SimpleNamespace(cfg=resolve_config(None, {"train.cpu_linear": "aten", "steps": 10**5}, environ={}),
                          env=SimpleNamespace(device="cpu", on_main=lambda fn: fn()),
                          plan=SimpleNamespace(num_steps=10**5, num_micro_steps=1, strategy="none"),
                          state=SimpleNamespace(fast_paths=None),
                          model=torch.nn.Linear(2, 2), step_model=None)
    run.cfg.model.vocab_size = 64
    fast_paths.apply_fast_paths(run, None, can_probe=False)
    assert run.state.fast_paths["compile"] == "off" and "no measurement" in run.state.fast_paths["compile_why"]


def test_compile_probe_times_both_models_and_leaves_the_rng_alone():
    from gptrain.train.compile_probe import probe_compile

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    compiled = []
    record = probe_compile(CFG, 2, lambda model: None, lambda model: compiled.append(model) or torch.compile(
        model, backend="aot_eager"))
    assert torch.equal(torch.rand(3), expected)
    assert len(compiled) == 1
    assert record["eager_step_seconds"] > 0 and record["compiled_step_seconds"] > 0 and record["compile_seconds"] >= 0
    assert fast_paths.compile_pays(record, 10)[1].startswith("auto: ")
    # A run in steps whose eager passes project it under PROBE_MIN_RUN_S is timed eager only.
    short = probe_compile(CFG, 2, lambda model: None, lambda model: pytest.fail("compiled for a short run"),
                          num_micro_batches=1000)
    assert set(short) == {"eager_step_seconds"}
    assert short["eager_step_seconds"] * 1000 < compile_probe.min_run_seconds(CFG)


def test_without_a_cpp_compiler_the_cpu_runs_eager_or_says_why_it_cannot_compile(monkeypatch):
    monkeypatch.setattr(fast_paths, "has_cpp_compiler", lambda: False)
    is_on, why = fast_paths.resolve_compile("auto", {"compile": "on"}, "inductor", "cpu", "key", 10**6)
    assert not is_on and "no C++ compiler" in why
    with pytest.raises(UserError, match="train.compile=on needs a C\\+\\+ compiler"):
        fast_paths.resolve_compile("on", {}, "inductor", "cpu", "key", 10**6)
    assert fast_paths.resolve_compile("on", {}, "aot_eager", "cpu", "key", 1)[0]  # no code generation


def test_the_embedding_grad_is_summed_in_place_only_by_one_eager_cpu_process():
    assert fast_paths.resolve_embedding_grad({}, "cpu", "none", is_compiled=False) == "in_place"
    assert fast_paths.resolve_embedding_grad({}, "cpu", "none", is_compiled=True) == "dense"
    assert fast_paths.resolve_embedding_grad({}, "cpu", "ddp", is_compiled=False) == "dense"  # DDP hooks
    assert fast_paths.resolve_embedding_grad({}, "cuda", "none", is_compiled=False) == "dense"
    # A resume keeps its checkpoint's; one from before the choice was recorded ran dense.
    assert fast_paths.resolve_embedding_grad({"embedding_grad": "dense"}, "cpu", "none", is_compiled=False) == "dense"
    assert fast_paths.resolve_embedding_grad({"embedding_grad": "in_place"}, "cpu", "none", False) == "in_place"
    # A one-process checkpoint resumed on more ranks (same machine key) or compiled: DDP would drop the rows.
    assert fast_paths.resolve_embedding_grad({"embedding_grad": "in_place"}, "cpu", "ddp", False) == "dense"
    assert fast_paths.resolve_embedding_grad({"embedding_grad": "in_place"}, "cpu", "none", True) == "dense"
    assert fast_paths.resolve_embedding_grad(fast_paths.legacy_choices("cpu"), "cpu", "none", False) == "dense"


def test_a_resume_on_another_machine_decides_again_and_an_old_checkpoint_keeps_the_old_kernels():
    run = SimpleNamespace(cfg=resolve_config(None, {"train.cpu_linear": "auto", "steps": 10}, environ={}),
                          env=SimpleNamespace(device="cpu", on_main=lambda fn: fn()),
                          plan=SimpleNamespace(num_steps=10, num_micro_steps=1, strategy="none"),
                          state=SimpleNamespace(fast_paths=None),
                          model=torch.nn.Linear(2, 2), step_model=None)
    run.cfg.model.vocab_size = 64
    elsewhere = {"cpu_linear": "grad_weight=onednn", "compile": "off", "machine": "cpu: some other CPU | torch 0"}
    note = fast_paths.apply_fast_paths(run, elsewhere)
    assert "decided again" in note and run.state.fast_paths["machine"] == fast_paths.machine_key("cpu")
    assert run.state.fast_paths["embedding_grad"] == "in_place" and run.model.embedding_grad == "in_place"
    legacy = fast_paths.legacy_choices("cpu")
    fast_paths.apply_fast_paths(run, legacy)
    assert run.state.fast_paths["cpu_linear"] == fast_paths.default_plan().to_text()  # what gptrain did then
    assert run.state.fast_paths["cpu_linear_why"] == "kept from the checkpoint"
    assert run.state.fast_paths["embedding_grad"] == "dense" and run.model.embedding_grad == "dense"


def _values(tmp_path, corpus_dir, run, **extra):
    return {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"), "tokenizer.kind": "char",
            "embd": 16, "layers": 1, "heads": 2, "context": 16, "batch-size": 4, "steps": 12,
            "eval.every_steps": 0, "samples.every_steps": 0, "checkpoint.every_steps": 6, "log.live": "off",
            "log.is_quiet": True, "run_dir": str(tmp_path / run), **extra}


def test_the_probed_plan_is_logged_saved_and_kept_by_a_resume(tmp_path, corpus_dir, monkeypatch):
    probed = LinearPlan(forward="onednn", grad_weight="onednn")
    # A PyTorch without the oneDNN op runs F.linear, probing nothing; the resume still keeps that choice.
    expected = LinearPlan() if fast_paths.default_plan().is_all_aten else probed
    monkeypatch.setattr(fast_paths, "choose_linear_plan", lambda cfg, rows: (probed, {"source": "probe"}))
    train(resolve_config(None, _values(tmp_path, corpus_dir, "full"), environ={}), log=lambda *_: None)
    full = tmp_path / "full"
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    (chosen,) = [r["fast_paths"] for r in rows if "fast_paths" in r]
    assert chosen["cpu_linear"] == expected.to_text() and chosen["compile"] == "off"
    assert chosen["embedding_grad"] == "in_place"  # one eager CPU process: kept by the resume below too
    state = json.loads((full / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["train"]["fast_paths"]["cpu_linear"] == expected.to_text()
    # The machine would now probe otherwise: the resume keeps the checkpoint's kernels, bit for bit.
    cut = copy_run_at(full, "step_000006", tmp_path / "cut")
    monkeypatch.setattr(fast_paths, "choose_linear_plan", lambda cfg, rows: pytest.fail("a resume probed again"))
    train(resolve_config(cut / "config.toml", {}, environ={}), resume=cut, log=lambda *_: None)
    assert have_equal_final_weights(full, cut)


def test_a_long_cpu_run_probes_compile_after_the_malloc_tuning_and_logs_the_choice(tmp_path, corpus_dir, monkeypatch):
    setup = importlib.import_module("gptrain.train.setup")  # gptrain.train is also the train() function
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path / "speed"))
    monkeypatch.setattr(fast_paths, "has_cpp_compiler", lambda: True)
    events = []
    monkeypatch.setattr(setup, "tune_malloc", lambda: events.append("tune_malloc"))
    monkeypatch.setattr(fast_paths, "probe_compile", lambda *args, **kwargs: events.append("probe") or {
        "compile_seconds": 1.0, "eager_step_seconds": 0.02, "compiled_step_seconds": 0.03})  # compiling is slower
    monkeypatch.setattr(compile_probe, "PROBE_MIN_MICRO_BATCHES", 12)  # 12 steps count as a long run here
    values = _values(tmp_path, corpus_dir, "long", **{"train.compile": "auto"})
    train(resolve_config(None, values, environ={}), should_tune_malloc=True, log=lambda *_: None)
    assert events == ["tune_malloc", "probe"]  # the probe times steps as the training runs them
    rows = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    (chosen,) = [r["fast_paths"] for r in rows if "fast_paths" in r]
    assert chosen["compile"] == "off" and "measured now" in chosen["compile_why"]


def test_attention_setting_beats_checkpoint_beats_probe(monkeypatch):
    monkeypatch.setitem(fast_paths.OWN_KERNELS, "cpu_attention", ("sdpa", lambda cfg, batch: ("gptrain", "probed")))
    resolve = fast_paths.resolve_own_kernel
    assert resolve("cpu_attention", "sdpa", {"cpu_attention": "gptrain"}, CFG, 2, "cpu") == ("sdpa", "set")
    assert resolve("cpu_attention", "auto", {"cpu_linear": "aten"}, CFG, 2, "cpu") == (
        "sdpa", "kept from the checkpoint")  # a checkpoint from before the choice existed ran SDPA
    assert resolve("cpu_attention", "auto", {}, CFG, 2, "cpu") == ("gptrain", "probed")
    assert resolve("cpu_attention", "auto", {}, CFG, 2, "cpu", is_autocast=True)[0] == "sdpa"
    assert resolve("cpu_attention", "auto", {}, CFG, 2, "cuda")[0] == "sdpa"
    assert resolve("cpu_gelu", "auto", {"cpu_attention": "gptrain"}, CFG, 2, "cpu") == (
        "aten", "kept from the checkpoint")
    assert fast_paths.legacy_choices("cpu")["cpu_attention"] == "sdpa"
    assert fast_paths.legacy_choices("cpu")["cpu_gelu"] == "aten"


def test_attention_gptrain_without_the_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(fast_paths, "library", lambda: (None, "no C++ compiler found"))
    with pytest.raises(UserError, match="train.cpu_gelu=gptrain: gptrain's kernels are not available here"):
        fast_paths.resolve_own_kernel("cpu_gelu", "gptrain", {}, CFG, 2, "cpu")
    kernel, why = fast_paths.resolve_own_kernel("cpu_attention", "auto", {"cpu_attention": "gptrain"}, CFG, 2, "cpu")
    assert kernel == "sdpa" and "not available here" in why  # a resume elsewhere still runs, on SDPA


def test_the_probed_own_kernels_are_logged_saved_and_kept_by_a_resume(tmp_path, corpus_dir, monkeypatch):
    from gptrain.model import cpu_attention, cpu_gelu, cpu_kernels

    if cpu_kernels.library()[0] is None:
        pytest.skip(f"the kernels cannot be built here: {cpu_kernels.library()[1]}")
    for name, theirs in (("cpu_attention", "sdpa"), ("cpu_gelu", "aten")):
        monkeypatch.setitem(fast_paths.OWN_KERNELS, name, (theirs, lambda cfg, batch: ("gptrain", "probed now")))
    calls = []
    original, original_gelu = cpu_attention._forward, cpu_gelu.gelu
    monkeypatch.setattr(cpu_attention, "_forward", lambda *args: calls.append(1) or original(*args))
    monkeypatch.setattr(cpu_gelu, "gelu", lambda x: calls.append(2) or original_gelu(x))
    values = _values(tmp_path, corpus_dir, "full", embd=32, **{"train.cpu_linear": "aten"})
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    full = tmp_path / "full"
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    (chosen,) = [r["fast_paths"] for r in rows if "fast_paths" in r]
    assert chosen["cpu_attention"] == chosen["cpu_gelu"] == "gptrain"
    assert set(calls) == {1, 2}  # the kernels trained the model
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    state = json.loads((full / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["train"]["fast_paths"]["cpu_attention"] == "gptrain"
    cut = copy_run_at(full, "step_000006", tmp_path / "cut")
    for name, theirs in (("cpu_attention", "sdpa"), ("cpu_gelu", "aten")):
        monkeypatch.setitem(fast_paths.OWN_KERNELS, name, (theirs, lambda *a: pytest.fail("a resume probed again")))
    train(resolve_config(cut / "config.toml", {}, environ={}), resume=cut, log=lambda *_: None)
    assert have_equal_final_weights(full, cut)
