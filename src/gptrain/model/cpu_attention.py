"""Causal self-attention for fp32 CPU training in a kernel of gptrain's own (cpu_kernels.cpp), or SDPA.

At small head counts and contexts ATen's CPU flash attention spends most of its time outside the math
(the default job's shape, 6 heads of 32, T=128, B=32: one layer's forward and backward took 12.0 ms
with SDPA and its transposes and copies on 2 Zen 5 cores, 5.3 ms on this kernel). This kernel reads
q, k and v straight from the qkv projection's output, writes y in the layout c_proj reads and the
gradient as one (B, T, 3C) tensor, so the transposes, the contiguous copy and the split's
concatenation go too. It is C++ built for this CPU at first use (cpu_kernels.py); without a compiler
(or with GPTRAIN_CPU_KERNELS=0) attention is SDPA.

Which kernel a model uses is its attention_kernel ("sdpa" unless the trainer's probe, fast_paths.py,
chose "gptrain"): it is a speed choice, stored in the checkpoint like the linear plan, since the two
kernels round differently. The kernel serves what training and evaluation run: causal attention over
a whole sequence, fp32, no dropout, a head size that is a multiple of 16 up to 256; anything else is SDPA.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gptrain.model.cpu_kernels import library, set_model_kernel

KERNELS = ("gptrain", "sdpa")
MAX_HEAD_SIZE = 256  # the kernel's per-row buffers


def supports(qkv: Tensor, n_head: int) -> bool:
    """Whether the kernel can run this attention: fp32 CPU tensors outside autocast, head size a multiple of 16
    (set_attention_kernel has checked that the kernel is built)."""
    head_size = qkv.shape[-1] // (3 * n_head)
    return (qkv.device.type == "cpu" and qkv.dtype == torch.float32 and qkv.dim() == 3 and head_size % 16 == 0
            and head_size <= MAX_HEAD_SIZE
            and not torch.is_autocast_enabled("cpu"))


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor]:
    B, T, C3 = qkv.shape
    C = C3 // 3
    D = C // n_head
    qkv = _last_dim_contiguous(qkv)
    y = qkv.new_empty(B, T, C)
    lse = qkv.new_empty(B, n_head, T)
    library()[0].gptrain_attention_forward(qkv.data_ptr(), qkv.stride(0), qkv.stride(1), y.data_ptr(), y.stride(0),
                                           y.stride(1), lse.data_ptr(), B, T, n_head, D, 1 / math.sqrt(D),
                                           torch.get_num_threads())
    return y, lse


def _backward(qkv: Tensor, y: Tensor, lse: Tensor, grad_y: Tensor, n_head: int) -> Tensor:
    B, T, C3 = qkv.shape
    D = C3 // 3 // n_head
    qkv, y, grad_y = (_last_dim_contiguous(t) for t in (qkv, y, grad_y))
    grad = qkv.new_empty(B, T, C3)
    library()[0].gptrain_attention_backward(
        qkv.data_ptr(), qkv.stride(0), qkv.stride(1), y.data_ptr(), y.stride(0), y.stride(1), grad_y.data_ptr(),
        grad_y.stride(0), grad_y.stride(1), lse.contiguous().data_ptr(), grad.data_ptr(), grad.stride(0),
        grad.stride(1), B, T, n_head, D, 1 / math.sqrt(D), torch.get_num_threads())
    return grad


# The same calls as ops of gptrain's own, which compiled graphs call as they are; eager calls skip their dispatch.
_FORWARD_OP = torch.library.custom_op("gptrain::cpu_attention_forward", _forward, mutates_args=(),
                                      schema="(Tensor qkv, int n_head) -> (Tensor, Tensor)")
_BACKWARD_OP = torch.library.custom_op("gptrain::cpu_attention_backward", _backward, mutates_args=(),
                                       schema="(Tensor qkv, Tensor y, Tensor lse, Tensor grad_y, int n_head) -> Tensor")


@_FORWARD_OP.register_fake
def _forward_shape(qkv: Tensor, n_head: int) -> tuple[Tensor, Tensor]:
    B, T, C3 = qkv.shape
    return qkv.new_empty(B, T, C3 // 3), qkv.new_empty(B, n_head, T)


@_BACKWARD_OP.register_fake
def _backward_shape(qkv: Tensor, y: Tensor, lse: Tensor, grad_y: Tensor, n_head: int) -> Tensor:
    return qkv.new_empty(qkv.shape)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: Tensor, n_head: int) -> Tensor:
        y, lse = _FORWARD_OP(qkv, n_head) if torch.compiler.is_compiling() else _forward(qkv, n_head)
        ctx.save_for_backward(qkv, y, lse)
        ctx.n_head = n_head
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        qkv, y, lse = ctx.saved_tensors
        run = _BACKWARD_OP if torch.compiler.is_compiling() else _backward
        return run(qkv, y, lse, grad_y, ctx.n_head), None


def causal_attention(qkv_BT3C: Tensor, n_head: int) -> Tensor:
    """softmax(q k^T / sqrt(head size), causal) v for q, k, v packed as the qkv projection's (B, T, 3C)
    output; returns (B, T, C), heads side by side. Check supports() first."""
    return _CausalAttention.apply(qkv_BT3C, n_head)


def set_attention_kernel(model: torch.nn.Module, kernel: str) -> None:
    """Every attention layer of the model on this kernel ("gptrain" where it applies, else SDPA)."""
    set_model_kernel(model, "attention_kernel", kernel, KERNELS, "attention")
