"""The linear probe: the faster kernel per pass from measured times (fake times here: no timed test),
all ATen when oneDNN gains too little, and a cache so a machine probes a shape once."""

from __future__ import annotations

import json

from gptrain.model import linear_probe
from gptrain.model.cpu_linear import LinearPlan
from gptrain.model.gpt import ModelConfig


def _times(forward, grad_input, grad_weight):
    """Each pass's (onednn, aten) seconds."""
    return {name: {"onednn": pair[0], "aten": pair[1]}
            for name, pair in zip(("forward", "grad_input", "grad_weight"), (forward, grad_input, grad_weight),
                                  strict=True)}


def test_each_pass_gets_its_faster_kernel():
    plan = linear_probe.plan_from_times(_times((1.0, 2.0), (3.0, 2.0), (2.0, 2.5)))
    assert plan == LinearPlan(forward="onednn", grad_input="aten", grad_weight="onednn")


def test_a_backward_pass_can_take_onednn_on_a_contiguous_copy():
    times = _times((1.0, 2.0), (3.0, 2.0), (2.0, 2.5))
    times["grad_input"]["onednn_copy"] = 1.5  # faster than both
    times["grad_weight"]["onednn_copy"] = 2.1  # slower than oneDNN as it is
    plan = linear_probe.plan_from_times(times)
    assert plan == LinearPlan(forward="onednn", grad_input="onednn_copy", grad_weight="onednn")
    assert LinearPlan.parse(plan.to_text()) == plan


def test_the_probe_times_the_copy_only_where_an_operand_is_strided(monkeypatch):
    timed = []

    def fake(a, b, bias, kernels):
        timed.append((b.is_contiguous(), kernels))
        return {kernel: 1.0 for kernel in kernels}

    monkeypatch.setattr(linear_probe, "_time_alternating", fake)
    seconds = linear_probe.time_passes(ModelConfig(n_embd=16, n_layer=1, n_head=2, vocab_size=40), 32)
    assert set(seconds["forward"]) == {"onednn", "aten"}
    assert set(seconds["grad_input"]) == set(seconds["grad_weight"]) == {"onednn", "aten", "onednn_copy"}
    assert all(is_contiguous == ("onednn_copy" not in kernels) for is_contiguous, kernels in timed)


def test_a_small_gain_keeps_plain_f_linear():
    plan = linear_probe.plan_from_times(_times((0.99, 1.0), (1.0, 1.0), (1.2, 1.0)))
    assert plan.is_all_aten  # 1% of the matmul time is not worth the autograd.Function's overhead


def test_shapes_are_the_blocks_four_and_the_head_unless_the_loss_chunks_it():
    cfg = ModelConfig(n_embd=32, n_layer=3, n_head=2, vocab_size=100, vocab_multiple=64)
    assert linear_probe.linear_shapes(cfg, 64) == [(32, 96, 3), (32, 32, 3), (32, 128, 3), (128, 32, 3), (32, 128, 1)]
    gpt2 = ModelConfig(n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    assert (768, 50304, 1) in linear_probe.linear_shapes(gpt2, 4 * 64)
    assert (768, 50304, 1) not in linear_probe.linear_shapes(gpt2, 16 * 1024)  # chunked_loss takes the head


def test_probe_times_real_matmuls_and_caches_the_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTRAIN_SPEED_CACHE", str(tmp_path))
    cfg = ModelConfig(n_embd=16, n_layer=1, n_head=2, block_size=8, vocab_size=40)
    plan, found = linear_probe.choose_linear_plan(cfg, 32)
    if found["source"] == "no oneDNN":  # a PyTorch without the op: F.linear, nothing to measure
        assert plan.is_all_aten
        return
    assert found["source"] == "probe"
    assert all(seconds > 0 for kernels in found["seconds"].values() for seconds in kernels.values())
    cached = json.loads((tmp_path / linear_probe.CACHE_FILE_NAME).read_text())
    assert list(cached.values())[0]["plan"] == plan.to_text()
    monkeypatch.setattr(linear_probe, "time_passes", lambda *a: (_ for _ in ()).throw(AssertionError("re-probed")))
    again, found = linear_probe.choose_linear_plan(cfg, 32)
    assert (again, found["source"]) == (plan, "cache")
