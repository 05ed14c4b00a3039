"""gptrain's CPU kernels: attention with SDPA's math (values and gradients), deterministic, a clean fallback."""

import copy
import ctypes
import math
import platform
import subprocess

import pytest
import torch
import torch.nn.functional as F

from gptrain.errors import UserError
from gptrain.model import cpu_attention, cpu_gelu, cpu_kernels, kernel_probe
from gptrain.model.gpt import GPT, ModelConfig

requires_kernel = pytest.mark.skipif(cpu_kernels.library()[0] is None,
                                     reason=f"the kernel cannot be built here: {cpu_kernels.library()[1]}")


def exact_attention(qkv: torch.Tensor, n_head: int) -> torch.Tensor:
    """Causal attention written out in float64: what both kernels approximate."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv.double().split(C, dim=2))
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // n_head)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)


def value_and_grad(fn, qkv: torch.Tensor, grad_y: torch.Tensor, n_head: int):
    qkv = qkv.detach().clone().requires_grad_(True)
    y = fn(qkv, n_head)
    y.backward(grad_y.to(y.dtype))
    return y.double(), qkv.grad.double()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@requires_kernel
@pytest.mark.parametrize("B,T,H,D", [(2, 64, 4, 32), (3, 37, 2, 16), (1, 130, 3, 64), (2, 5, 1, 48), (1, 20, 1, 128)])
def test_kernel_matches_exact_attention_like_sdpa(B, T, H, D):
    generator = torch.Generator().manual_seed(T)
    qkv = torch.randn(B, T, 3 * H * D, generator=generator) * 1.5
    grad_y = torch.randn(B, T, H * D, generator=generator)
    exact_y, exact_g = value_and_grad(exact_attention, qkv.double(), grad_y.double(), H)
    sdpa_y, sdpa_g = value_and_grad(kernel_probe.sdpa_attention, qkv, grad_y, H)
    mine_y, mine_g = value_and_grad(cpu_attention.causal_attention, qkv, grad_y, H)
    assert mine_y.shape == (B, T, H * D) and mine_g.shape == qkv.shape
    # within a few times SDPA's own fp32 error of the exact result
    assert relative_error(mine_y, exact_y) < max(4 * relative_error(sdpa_y, exact_y), 2e-6)
    assert relative_error(mine_g, exact_g) < max(4 * relative_error(sdpa_g, exact_g), 4e-6)


@requires_kernel
def test_kernel_reads_strided_inputs():
    """q, k, v taken from a wider tensor (row stride > 3C) give the same result as a contiguous copy."""
    generator = torch.Generator().manual_seed(1)
    wide = torch.randn(2, 24, 3 * 64 + 16, generator=generator)
    qkv = wide[:, :, 8:8 + 3 * 64]
    assert not qkv.is_contiguous()
    assert torch.equal(cpu_attention.causal_attention(qkv, 2), cpu_attention.causal_attention(qkv.contiguous(), 2))


@requires_kernel
def test_kernel_is_deterministic_across_thread_counts():
    generator = torch.Generator().manual_seed(2)
    qkv = torch.randn(3, 50, 3 * 96, generator=generator)
    grad_y = torch.randn(3, 50, 96, generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            results.append(value_and_grad(cpu_attention.causal_attention, qkv, grad_y, 3))
    finally:
        torch.set_num_threads(threads)
    for y, g in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(g, results[0][1])


def tiny_models(**overrides):
    cfg = ModelConfig(**{"n_embd": 64, "n_layer": 2, "n_head": 2, "block_size": 32, "vocab_size": 50, **overrides})
    torch.manual_seed(0)
    plain = GPT(cfg)
    fast = copy.deepcopy(plain)
    cpu_attention.set_attention_kernel(fast, "gptrain")
    return plain, fast


def loss_and_grads(model, x, y):
    for p in model.parameters():
        p.grad = None
    loss = model(x, y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


@requires_kernel
@pytest.mark.parametrize("backend", ["", "aot_eager"])
def test_model_on_the_kernel_keeps_loss_and_gradients(backend):
    plain, fast = tiny_models()
    x, y = torch.randint(0, 50, (3, 32)), torch.randint(0, 50, (3, 32))
    calls = []
    run = torch.compile(fast, backend=backend) if backend else fast
    original = cpu_attention._forward
    cpu_attention._forward = lambda *args: calls.append(1) or original(*args)  # eager path only
    try:
        fast_loss, fast_grads = loss_and_grads(run, x, y)
    finally:
        cpu_attention._forward = original
    plain_loss, plain_grads = loss_and_grads(plain, x, y)
    assert abs(fast_loss - plain_loss) < 1e-5
    for a, b in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if not backend:
        assert len(calls) == 2  # one per layer: the kernel ran, not SDPA


@requires_kernel
def test_training_on_the_kernel_lowers_the_loss():
    _, model = tiny_models()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(3)
    x = torch.randint(0, 50, (4, 32), generator=generator)
    losses = []
    for _ in range(30):
        loss = model(x, x.roll(-1, dims=1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@requires_kernel
def test_sdpa_is_used_where_the_kernel_does_not_apply(monkeypatch):
    monkeypatch.setattr(cpu_attention, "causal_attention", lambda *a: pytest.fail("the kernel ran"))
    for overrides in ({"n_embd": 48, "n_head": 2}, {"dropout": 0.1}):  # head size 24; dropout while training
        _, model = tiny_models(**overrides)
        model.train()
        model(torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))).backward()
    _, model = tiny_models()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 50, (2, 16)))
    model.eval()
    model.generate(torch.zeros(1, 1, dtype=torch.long), max_new_tokens=3)  # the KV cache path


def test_without_a_compiler_there_is_no_kernel_and_a_clear_reason(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "compiler", lambda: None)
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() == (None, "no C++ compiler found (set CXX or install g++)")
        with pytest.raises(UserError, match="not available here"):
            cpu_attention.set_attention_kernel(GPT(ModelConfig(n_embd=32, n_layer=1, n_head=2, block_size=8,
                                                               vocab_size=20)), "gptrain")
        assert kernel_probe.choose_attention_kernel(ModelConfig(), 4)[0] == "sdpa"
        assert kernel_probe.choose_gelu_kernel(ModelConfig(), 4)[0] == "aten"
        monkeypatch.setenv(cpu_kernels.ENV, "0")
        cpu_kernels.library.cache_clear()
        assert cpu_kernels.library() == (None, "GPTRAIN_CPU_KERNELS=0")
    finally:
        cpu_kernels.library.cache_clear()


def test_a_failed_build_leaves_no_library_behind(monkeypatch, tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", bad)
    monkeypatch.setenv("GPTRAIN_CACHE", str(tmp_path / "cache"))
    if cpu_kernels.compiler() is None:
        pytest.skip("no C++ compiler on this machine to fail with")
    cpu_kernels.library.cache_clear()
    try:
        lib, why = cpu_kernels.library()
    finally:
        cpu_kernels.library.cache_clear()
    assert lib is None and why.startswith("building gptrain's CPU kernels failed:")
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []


def test_the_probe_picks_the_faster_kernel_and_caches_it(monkeypatch):
    if cpu_kernels.library()[0] is None:
        pytest.skip(f"the kernel cannot be built here: {cpu_kernels.library()[1]}")
    cfg = ModelConfig(n_embd=64, n_head=2, n_layer=1, block_size=16, vocab_size=30)
    measured = []
    for times, expected in (({"gptrain": 1.0, "sdpa": 2.0}, "gptrain"), ({"gptrain": 0.99, "sdpa": 1.0}, "sdpa")):
        batch = 3 + len(measured)  # a shape of its own each time: not cached yet
        monkeypatch.setattr(kernel_probe, "time_attention", lambda cfg, b, t=times: measured.append(b) or t)
        kernel, why = kernel_probe.choose_attention_kernel(cfg, batch)
        assert kernel == expected and why.startswith("probed now")
        again, why = kernel_probe.choose_attention_kernel(cfg, batch)
        assert again == expected and why.startswith("probed before")
    assert measured == [3, 4]  # each shape measured once
    real = kernel_probe.time_attention(cfg, 2)  # the real measurement runs and times both
    assert set(real) == {"gptrain", "sdpa"} and all(s > 0 for s in real.values())


def test_the_probe_refuses_head_sizes_the_kernel_lacks():
    kernel, why = kernel_probe.choose_attention_kernel(ModelConfig(n_embd=48, n_head=2), 2)
    assert kernel == "sdpa" and ("multiple of 16" in why or cpu_kernels.library()[0] is None)


def test_sdpa_reference_matches_exact():
    qkv = torch.randn(2, 9, 3 * 32)
    torch.testing.assert_close(kernel_probe.sdpa_attention(qkv, 2).double(), exact_attention(qkv, 2),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v4"])  # AVX2 (8-float vectors), AVX-512 (16-float)
def test_both_vector_widths_compute_the_same_math(march, tmp_path, monkeypatch):
    """The kernels built for each x86 level this CPU can run, not only its own: the same results."""
    if platform.machine() != "x86_64" or (march == "x86-64-v4" and "avx512f" not in open("/proc/cpuinfo").read()):
        pytest.skip(f"this CPU cannot run {march} code")
    if cpu_kernels.compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    flags = [flag if flag != "-march=native" else f"-march={march}" for flag in cpu_kernels.FLAGS]
    built = subprocess.run([cpu_kernels.compiler(), *flags, str(cpu_kernels.SOURCE), "-o", str(tmp_path / "k.so")],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    lib = ctypes.CDLL(str(tmp_path / "k.so"))
    for name, argtypes in cpu_kernels.SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    for module in (cpu_attention, cpu_gelu):
        monkeypatch.setattr(module, "library", lambda: (lib, "test"))
    x = torch.randn(1003) * 4
    torch.testing.assert_close(cpu_gelu.gelu(x), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
    qkv = torch.randn(2, 45, 3 * 64) * 1.5
    grad_y = torch.randn(2, 45, 64)
    exact_y, exact_g = value_and_grad(exact_attention, qkv.double(), grad_y.double(), 2)
    mine = qkv.clone().requires_grad_(True)
    y = cpu_attention.causal_attention(mine, 2)
    y.backward(grad_y)
    torch.testing.assert_close(y.double(), exact_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine.grad.double(), exact_g, rtol=1e-5, atol=1e-5)
    g = torch.randn(77, 45)  # the transpose (cpu_linear.contiguous), edges included
    out = torch.empty(45, 77)
    lib.gptrain_transpose(g.data_ptr(), out.data_ptr(), 77, 45, 2)
    assert torch.equal(out, g.t())
