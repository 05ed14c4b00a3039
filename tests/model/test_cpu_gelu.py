"""gptrain's CPU GELU kernel: ATen's tanh GELU within fp32 rounding, forward and backward, and its place in the MLP."""

import copy

import pytest
import torch
import torch.nn.functional as F

from gptrain.model import cpu_gelu, cpu_kernels, kernel_probe
from gptrain.model.gpt import GPT, ModelConfig

pytestmark = pytest.mark.skipif(cpu_kernels.library()[0] is None,
                                reason=f"the kernels cannot be built here: {cpu_kernels.library()[1]}")


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 4096 * 3 + 5])
def test_gelu_matches_the_exact_tanh_gelu_like_aten(n):
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=generator) * 4  # far into both tails: -20 .. 20
    x[0] = -30.0 if n > 1 else x[0]
    grad = torch.randn(n, generator=generator)
    exact = x.double().requires_grad_(True)
    F.gelu(exact, approximate="tanh").backward(grad.double())
    mine = x.clone().requires_grad_(True)
    y = cpu_gelu.gelu(mine)
    y.backward(grad)
    aten_y = F.gelu(x, approximate="tanh")
    aten_g = torch.ops.aten.gelu_backward(grad, x, approximate="tanh")
    exact_y = F.gelu(x.double(), approximate="tanh")
    for got, ref, want in ((y, aten_y, exact_y), (mine.grad, aten_g, exact.grad)):
        error, aten_error = (got.double() - want).abs().max().item(), (ref.double() - want).abs().max().item()
        assert error <= max(3 * aten_error, 1e-6)
    assert torch.isfinite(mine.grad).all()


def test_gelu_of_a_strided_input_and_threads_give_the_same_bits():
    x = torch.randn(64, 96)[:, ::2]  # not contiguous
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_gelu.gelu(x)
        torch.set_num_threads(2)
        two = cpu_gelu.gelu(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, cpu_gelu.gelu(x.contiguous()))


def test_model_on_the_gelu_kernel_keeps_loss_and_gradients(monkeypatch):
    cfg = ModelConfig(n_embd=32, n_layer=2, n_head=2, block_size=16, vocab_size=40)
    torch.manual_seed(0)
    plain = GPT(cfg)
    fast = copy.deepcopy(plain)
    cpu_gelu.set_gelu_kernel(fast, "gptrain")
    calls = []
    original = cpu_gelu.gelu
    monkeypatch.setattr(cpu_gelu, "gelu", lambda x: calls.append(1) or original(x))
    x, y = torch.randint(0, 40, (3, 16)), torch.randint(0, 40, (3, 16))
    losses = []
    for model in (plain, fast):
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
    assert len(calls) == 2  # one per layer
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for a, b in zip(plain.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast(x)  # bf16 autocast: ATen's GELU
    assert len(calls) == 2


def test_the_probe_times_both_gelus_and_picks_the_faster(monkeypatch):
    cfg = ModelConfig(n_embd=32, n_head=2, n_layer=1, block_size=16, vocab_size=30)
    real = kernel_probe.time_gelu(cfg, 2)
    assert set(real) == {"gptrain", "aten"} and all(s > 0 for s in real.values())
    monkeypatch.setattr(kernel_probe, "time_gelu", lambda cfg, b: {"gptrain": 2.0, "aten": 1.0})
    assert kernel_probe.choose_gelu_kernel(cfg, 7) == ("aten", "probed now: gptrain's 2000.00 ms vs aten's 1000.00 ms")

