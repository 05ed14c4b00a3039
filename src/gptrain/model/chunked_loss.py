"""Linear head + cross-entropy in row chunks, so the full (N, V) logits never exist at once.

Dims: N rows (B * T flattened), D width, V real vocab, P padded vocab (head rows; P >= V), R chunk rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -1  # targets with this value add nothing to the loss or its count (F.cross_entropy's ignore_index)

# One chunk's fp32 logits are at most 2**26 elements = 256 MB: for GPT-2's vocab that is 1280 rows,
# a (1280 x 768 x 50304) matmul that still keeps a GPU busy, while the per-chunk temporaries (logits
# in the compute dtype, their fp32 copy, the gradient) stay under 1 GB. Unchunked, GPT-2 at B=64,
# T=1024 holds (65536, 50304) logits: 13 GB in fp32 alone, plus the bf16 original and the gradient.
_CHUNK_LOGITS_ELEMENTS = 2**26
# Chunk rows are a multiple of this: the rows are the K dimension of grad_W = g.T @ x, and bf16
# tensor-core GEMMs want K aligned.
_CHUNK_ROWS_MULTIPLE = 128


# Below this many (N * P) logits on CPU the plain head + F.cross_entropy is kept: its head matmuls
# run on oneDNN (cpu_linear.py: ~2x MKL's sgemm on AMD CPUs), while the chunked path's four matmuls
# (logits recomputed in backward) go through torch.matmul. On a 2-core Intel Xeon the chunked path was
# 0-4% faster per fp32 GPT step (GPT-2 124M at B=4, T=64 and the default model at B=32, T=128), but
# that does not carry over to AMD's MKL path. 2**27 fp32 logits are 512 MB: from there on the memory
# saving wins on any CPU.
CHUNKED_MIN_CPU_LOGITS = 2**27


def should_chunk(x_ND: Tensor, w_PD: Tensor) -> bool:
    """Whether the chunked loss beats the plain one: always off-CPU, on CPU only for big logits."""
    return x_ND.device.type != "cpu" or x_ND.size(0) * w_PD.size(0) >= CHUNKED_MIN_CPU_LOGITS


def default_chunk_rows(num_padded_vocab: int) -> int:
    """Rows per chunk so one chunk's fp32 logits fit in _CHUNK_LOGITS_ELEMENTS."""
    rows = _CHUNK_LOGITS_ELEMENTS // num_padded_vocab
    return max(_CHUNK_ROWS_MULTIPLE, rows // _CHUNK_ROWS_MULTIPLE * _CHUNK_ROWS_MULTIPLE)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype F.linear would use here: the autocast dtype when autocast is on, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 compute (as the old `.float()` logits); fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits_RP(x_RD: Tensor, w_PD: Tensor, vocab_size: int) -> Tensor:
    """One chunk's logits in the softmax dtype, padded vocab columns -inf (no probability, no gradient)."""
    # The matmul runs in the compute dtype (bf16 under autocast, as F.linear would); only the
    # softmax math is upcast. The cast copies a bf16 chunk and is a no-op for fp32; either way
    # the in-place fill below only ever touches a temporary.
    logits_RP = (x_RD @ w_PD.t()).to(_softmax_dtype(x_RD.dtype))
    if vocab_size < logits_RP.size(1):
        logits_RP[:, vocab_size:].fill_(float("-inf"))
    return logits_RP


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over non-ignored rows of cross_entropy(x_ND @ w_PD.T [:, :V], targets_N), chunked by rows."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, w_PD: Tensor, targets_N: Tensor, vocab_size: int, chunk_rows: int) -> Tensor:
        device_type = x_ND.device.type
        dtype = _compute_dtype(x_ND)
        # Cast once, explicitly, then switch autocast off: the dtype of every op below is then
        # visible here, and backward (which runs outside the forward's autocast state) reuses it.
        # The casts are saved for backward, as autocast's F.linear saves its bf16 inputs.
        x_ND_c, w_PD_c = x_ND.to(dtype), w_PD.to(dtype)
        is_valid_N = targets_N != IGNORE_INDEX
        safe_targets_N = torch.where(is_valid_N, targets_N, 0)
        lse_N = torch.empty(x_ND.size(0), dtype=_softmax_dtype(dtype), device=x_ND.device)
        loss_sum = torch.zeros((), dtype=_softmax_dtype(dtype), device=x_ND.device)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, x_ND.size(0), chunk_rows):
                stop = min(start + chunk_rows, x_ND.size(0))
                logits_RP = _chunk_logits_RP(x_ND_c[start:stop], w_PD_c, vocab_size)
                lse_R = torch.logsumexp(logits_RP, dim=1)
                target_R = logits_RP.gather(1, safe_targets_N[start:stop, None]).squeeze(1)
                loss_sum += torch.where(is_valid_N[start:stop], lse_R - target_R, 0.0).sum()
                lse_N[start:stop] = lse_R
        # A tensor, not .item(): no host sync, and no graph break under torch.compile.
        count = is_valid_N.sum()
        ctx.save_for_backward(x_ND_c, w_PD_c, safe_targets_N, is_valid_N, lse_N, count)
        ctx.x_dtype, ctx.w_dtype = x_ND.dtype, w_PD.dtype
        ctx.vocab_size, ctx.chunk_rows = vocab_size, chunk_rows
        # 0 / 0 = nan when every target is ignored, as F.cross_entropy gives.
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        x_ND_c, w_PD_c, safe_targets_N, is_valid_N, lse_N, count = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # d(mean)/d(logits) = (softmax - onehot) * grad_loss / count on valid rows, 0 on ignored ones.
        row_scale_N = is_valid_N.to(lse_N.dtype) * (grad_loss.to(lse_N.dtype) / count)
        grad_x_ND = torch.empty_like(x_ND_c) if need_x else None
        # grad_W sums over every chunk: accumulate in fp32 (at least) whatever the compute dtype.
        grad_w_PD = torch.zeros(w_PD_c.shape, dtype=lse_N.dtype, device=w_PD_c.device) if need_w else None
        with torch.autocast(x_ND_c.device.type, enabled=False):
            for start in range(0, x_ND_c.size(0), ctx.chunk_rows):
                stop = min(start + ctx.chunk_rows, x_ND_c.size(0))
                x_RD = x_ND_c[start:stop]
                g_PR = _softmax_grad_PR(x_RD, w_PD_c, ctx.vocab_size, lse_N[start:stop],
                                        safe_targets_N[start:stop], row_scale_N[start:stop])
                if need_x:
                    grad_x_ND[start:stop] = g_PR.t() @ w_PD_c
                if need_w:
                    _add_matmul_(grad_w_PD, g_PR, x_RD)
        if need_x:
            grad_x_ND = grad_x_ND.to(ctx.x_dtype)
        if need_w:
            grad_w_PD = grad_w_PD.to(ctx.w_dtype)
        return grad_x_ND, grad_w_PD, None, None, None


def _softmax_grad_PR(x_RD: Tensor, w_PD: Tensor, vocab_size: int, lse_R: Tensor,
                     targets_R: Tensor, row_scale_R: Tensor) -> Tensor:
    """Gradient of the loss w.r.t. one chunk's logits, transposed (P, R), in the compute dtype."""
    # Recomputed from x and W rather than saved: saving it is exactly the (N, P) tensor we avoid.
    # As W @ x.T, not forward's x @ W.T: torch.compile (AOTAutograd) CSEs the joint forward+backward
    # graph, would merge an identical matmul with forward's, and then save every chunk's logits for
    # backward (measured: 17 MB saved instead of 1.3 MB; tests/model/test_chunked_loss.py checks it).
    # (P, R) is also the layout grad_W = g.T @ x wants.
    g_PR = (w_PD @ x_RD.t()).to(_softmax_dtype(x_RD.dtype))
    if vocab_size < g_PR.size(0):
        g_PR[vocab_size:].fill_(float("-inf"))
    g_PR.sub_(lse_R).exp_()  # softmax; exp(-inf) = 0 on padded rows of W, so they get no gradient
    g_PR.scatter_add_(0, targets_R[None, :], torch.full_like(lse_R[None, :], -1.0))
    g_PR.mul_(row_scale_R)
    return g_PR.to(x_RD.dtype)


def _add_matmul_(acc_PD: Tensor, a_PR: Tensor, b_RD: Tensor) -> None:
    """acc_PD += a_PR @ b_RD, with acc in fp32 and a, b in the compute dtype."""
    if a_PR.dtype == acc_PD.dtype:
        acc_PD.addmm_(a_PR, b_RD)
    else:
        # The GEMM accumulates in fp32 internally and rounds each chunk's partial once to bf16 (as
        # the unchunked bf16 grad_W is rounded once); the sum over chunks is then exact-ish fp32.
        acc_PD.add_(a_PR @ b_RD)


def chunked_linear_cross_entropy(x_ND: Tensor, w_PD: Tensor, targets_N: Tensor, vocab_size: int,
                                 chunk_rows: int | None = None) -> Tensor:
    """Mean cross-entropy of x_ND @ w_PD.T over the first vocab_size columns; -1 targets ignored."""
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(w_PD.size(0))
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1 (got {chunk_rows})")
    return ChunkedLinearCrossEntropy.apply(x_ND, w_PD, targets_N, vocab_size, chunk_rows)
