"""The chunked head + cross-entropy equals the plain one, in value and gradient, for any chunking.

Dims: N rows, D width, V real vocab, P padded vocab.
"""

import pytest
import torch
import torch.nn.functional as F

import gptrain.model.chunked_loss as chunked_loss
import gptrain.model.gpt as gpt
from gptrain.model.chunked_loss import chunked_linear_cross_entropy, default_chunk_rows, should_chunk
from gptrain.model.gpt import GPT, ModelConfig

N, D, V, P = 37, 16, 61, 64


def make_inputs(dtype: torch.dtype = torch.float32):
    """Hidden states, a padded head and targets with a few ignored (-1) rows."""
    x_ND = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w_PD = torch.randn(P, D, dtype=dtype, requires_grad=True)
    targets_N = torch.randint(0, V, (N,))
    targets_N[::5] = -1
    return x_ND, w_PD, targets_N


def plain_loss(x_ND, w_PD, targets_N):
    """The unchunked reference: full logits cut to V, then F.cross_entropy."""
    return F.cross_entropy((x_ND @ w_PD.t())[:, :V].float(), targets_N, ignore_index=-1)


@pytest.mark.parametrize("chunk_rows", [1, 5, 10, 36, 37, 1000])
def test_loss_and_grads_match_plain_cross_entropy(chunk_rows):
    x_ND, w_PD, targets_N = make_inputs()
    expected = plain_loss(x_ND, w_PD, targets_N)
    expected_gx, expected_gw = torch.autograd.grad(expected, (x_ND, w_PD))
    loss = chunked_linear_cross_entropy(x_ND, w_PD, targets_N, V, chunk_rows)
    gx, gw = torch.autograd.grad(loss, (x_ND, w_PD))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Near-zero elements: cancellation among terms of order 0.1, summed in another order, leaves up to 1.5e-7
    torch.testing.assert_close(gx, expected_gx, rtol=1e-5, atol=5e-7)
    torch.testing.assert_close(gw, expected_gw, rtol=1e-5, atol=5e-7)


def test_gradcheck_fp64():
    x_ND, w_PD, targets_N = make_inputs(torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w: chunked_linear_cross_entropy(x, w, targets_N, V, 7), (x_ND, w_PD)
    )


def test_ignored_rows_neither_count_nor_get_gradient():
    x_ND, w_PD, targets_N = make_inputs()
    is_kept_N = targets_N != -1
    loss = chunked_linear_cross_entropy(x_ND, w_PD, targets_N, V, 8)
    (gx,) = torch.autograd.grad(loss, x_ND)
    kept_only = chunked_linear_cross_entropy(x_ND[is_kept_N], w_PD, targets_N[is_kept_N], V, 8)
    torch.testing.assert_close(loss, kept_only, rtol=1e-6, atol=0)
    assert torch.all(gx[~is_kept_N] == 0)
    assert torch.all(gx[is_kept_N].abs().sum(dim=1) > 0)


def test_padded_vocab_rows_get_no_probability_and_zero_grad():
    x_ND, w_PD, targets_N = make_inputs()
    loss = chunked_linear_cross_entropy(x_ND, w_PD, targets_N, V, 8)
    (gw,) = torch.autograd.grad(loss, w_PD)
    assert torch.all(gw[V:] == 0)
    assert torch.all(gw[:V].abs().sum(dim=1) > 0)
    # Huge padded rows would dominate the softmax if they took part in it.
    with torch.no_grad():
        w_PD[V:] = 1e4
    assert chunked_linear_cross_entropy(x_ND, w_PD, targets_N, V, 8).item() == pytest.approx(loss.item())


def test_bf16_autocast_matches_plain_autocast_path():
    x_ND, w_PD, targets_N = make_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain_loss(x_ND, w_PD, targets_N)
        loss = chunked_linear_cross_entropy(x_ND, w_PD, targets_N, V, 8)
    expected_gx, expected_gw = torch.autograd.grad(expected, (x_ND, w_PD))
    gx, gw = torch.autograd.grad(loss, (x_ND, w_PD))
    assert loss.dtype == torch.float32 and gx.dtype == gw.dtype == torch.float32
    # Same bf16 matmul and fp32 softmax as the plain path; grad_W sums per-chunk bf16 partials.
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, expected_gx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, expected_gw, rtol=2e-2, atol=1e-4)


def test_tied_gpt_with_padded_vocab_matches_plain_loss(monkeypatch):
    cfg = ModelConfig(n_embd=32, n_layer=2, n_head=2, block_size=16, vocab_size=V, vocab_multiple=64)
    model = GPT(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.size(0) == P
    idx_BT = torch.randint(0, V, (3, 16))
    targets_BT = torch.roll(idx_BT, -1, dims=1)
    targets_BT[:, -1] = -1

    def loss_and_grads(min_cpu_logits: int):
        monkeypatch.setattr(chunked_loss, "CHUNKED_MIN_CPU_LOGITS", min_cpu_logits)
        model.zero_grad(set_to_none=True)
        loss = model(idx_BT, targets_BT)
        loss.backward()
        return loss, {name: p.grad.clone() for name, p in model.named_parameters()}

    num_calls = []

    def spy(*args):
        num_calls.append(1)
        return chunked_linear_cross_entropy(*args, chunk_rows=10)  # 48 rows: 5 chunks, one partial

    monkeypatch.setattr(gpt, "chunked_linear_cross_entropy", spy)
    plain, plain_grads = loss_and_grads(2**62)
    assert not num_calls
    chunked, chunked_grads = loss_and_grads(0)
    assert len(num_calls) == 1
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.all(chunked_grads["transformer.wte.weight"][V:] == 0)


def test_chunked_only_off_cpu_or_for_big_logits():
    small_ND, vocab_PD = torch.empty(2**14, 1), torch.empty(2**12, 1)
    assert not should_chunk(small_ND, vocab_PD)
    assert should_chunk(torch.empty(2**15, 1), vocab_PD)  # 2**27 logits
    assert should_chunk(small_ND.to("meta"), vocab_PD.to("meta"))


def test_default_chunk_rows_bound_the_chunk_logits():
    gpt2_rows = default_chunk_rows(50304)
    assert gpt2_rows % 128 == 0 and 128 <= gpt2_rows and gpt2_rows * 50304 <= 2**26
    assert default_chunk_rows(2048) == 2**15
    assert default_chunk_rows(2**30) == 128


def test_compiles_with_aot_eager():
    x_ND, w_PD, targets_N = make_inputs()
    expected = plain_loss(x_ND, w_PD, targets_N)
    expected_gx, expected_gw = torch.autograd.grad(expected, (x_ND, w_PD))
    compiled = torch.compile(chunked_linear_cross_entropy, backend="aot_eager", fullgraph=True)
    loss = compiled(x_ND, w_PD, targets_N, V, 10)
    gx, gw = torch.autograd.grad(loss, (x_ND, w_PD))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # Near-zero elements: cancellation among terms of order 0.1, summed in another order, leaves up to 1.5e-7
    torch.testing.assert_close(gx, expected_gx, rtol=1e-5, atol=5e-7)
    torch.testing.assert_close(gw, expected_gw, rtol=1e-5, atol=5e-7)


def test_compiled_saves_no_logits_for_backward():
    # AOTAutograd CSEs forward and backward together; a recompute it merged would save the logits.
    num_rows, width, vocab, padded = 64, 4, 250, 256
    x_ND = torch.randn(num_rows, width, requires_grad=True)
    w_PD = torch.randn(padded, width, requires_grad=True)
    targets_N = torch.randint(0, vocab, (num_rows,))
    compiled = torch.compile(chunked_linear_cross_entropy, backend="aot_eager", fullgraph=True)
    saved_bytes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved_bytes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(x_ND, w_PD, targets_N, vocab, 16)
    loss.backward()
    assert saved_bytes and sum(saved_bytes) < num_rows * padded * 4 / 4
