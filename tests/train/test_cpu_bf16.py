"""bf16 mixed precision on the CPU (train.precision=bf16): autocast over fp32 weights, attention kept in
fp32, and a training whose loss falls like fp32's. It runs on any CPU (emulated where bf16 is not native)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gptrain import resolve_config, train
from gptrain.bench.run import BenchOptions
from gptrain.errors import UserError
from gptrain.model.gpt import GPT, ModelConfig, attention, gelu_tanh_by_sigmoid
from gptrain.train.fast_paths import compile_key, cpu_precision_hint
from gptrain.train.step import autocast_context, has_fast_cpu_bf16, uses_bf16


def test_bf16_on_the_cpu_only_when_asked():
    assert uses_bf16("cpu", "bf16") and not uses_bf16("cpu", "auto") and not uses_bf16("cpu", "fp32")
    with pytest.raises(UserError, match="needs a CUDA GPU or the CPU"):
        uses_bf16("mps", "bf16")
    with autocast_context("cpu", "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast_context("cpu", "auto"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(UserError, match="needs a CUDA GPU or the CPU"):
        BenchOptions(model=ModelConfig(), device="mps", dtype="bf16")
    assert compile_key(ModelConfig(), 4, "cpu", "bf16") != compile_key(ModelConfig(), 4, "cpu")  # other graphs


@pytest.mark.parametrize("amx, avx512_bf16, native", [(True, False, True), (False, True, True), (False, False, False)])
def test_native_cpu_bf16_means_amx_or_avx512_bf16_and_the_log_says_so(monkeypatch, amx, avx512_bf16, native):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert has_fast_cpu_bf16() is native
    assert ("multiplies bf16 natively" in cpu_precision_hint("cpu", "auto")) is native
    assert ("emulated" in cpu_precision_hint("cpu", "bf16")) is not native
    assert cpu_precision_hint("cpu", "fp32") == cpu_precision_hint("cuda", "auto") == ""


def test_attention_under_cpu_autocast_runs_in_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 4).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attention(q, k, v, 0.0, True)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    assert y.dtype == torch.float32 and torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    expected.sum().backward()
    assert q.grad.dtype == torch.bfloat16 and torch.allclose(q.grad.float(), q32.grad, rtol=1e-2, atol=1e-2)


def test_the_sigmoid_gelu_keeps_its_gradient_in_fp32_for_bf16_inputs():
    x = torch.tensor([-3.0, -1.0, 0.5, 3.0, 4.0]).bfloat16().requires_grad_()
    y = gelu_tanh_by_sigmoid(x)
    y.sum().backward()
    x32 = x.detach().float().requires_grad_()
    F.gelu(x32, approximate="tanh").sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    # A bf16 sigmoid is 1 at x = 3 and 4, which would make the slope exactly 1 there.
    assert torch.allclose(x.grad.float(), x32.grad, rtol=4e-3) and x.grad[3] > 1


def test_a_bf16_model_step_matches_fp32_within_bf16_rounding():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=16, vocab_size=64))
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    model(x, y).backward()
    fp32 = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with autocast_context("cpu", "bf16"):
        loss = model(x, y)
    loss.backward()
    assert loss.dtype == torch.float32
    for name, p in model.named_parameters():
        assert p.dtype == p.grad.dtype == torch.float32  # mixed precision: weights and gradients stay fp32
        cos = F.cosine_similarity(p.grad.flatten(), fp32[name].flatten(), dim=0)
        assert cos > 0.98, name


def test_a_bf16_cpu_training_loss_falls(tmp_path, corpus_dir):
    values = {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"), "tokenizer.kind": "char",
              "embd": 32, "layers": 2, "heads": 4, "context": 32, "batch-size": 8, "steps": 40, "lr": 3e-3,
              "train.precision": "bf16", "eval.every_steps": 0, "samples.every_steps": 0, "log.live": "off",
              "log.is_quiet": True, "run_dir": str(tmp_path / "run")}
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert [r["precision"] for r in rows if "precision" in r] == ["bf16"]  # the layout row says how it trained
    (chosen,) = [r["fast_paths"] for r in rows if "fast_paths" in r]
    assert chosen["precision"] == "bf16" and chosen["cpu_linear_why"] == "bf16 autocast: F.linear"
    assert "bf16 autocast (fp32 weights)" in (tmp_path / "run" / "report.md").read_text()
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # saved as trained: fp32 master weights
