"""GPT-2's tanh GELU for fp32 CPU training in a kernel of gptrain's own (cpu_kernels.cpp), or ATen's.

ATen's CPU tanh GELU runs at about 1.2 G elements/s on 2 cores, slower than the memory it touches: at
the default job's shape (B=32, T=128: a 4096 x 768 activation) its forward and backward took 4.1 ms a
layer on a 2-core Zen 5, this kernel's 1.0 ms. It computes x * sigmoid(2u), the same function (model/gpt.py,
gelu_tanh), within fp32 rounding; the backward recomputes the sigmoid from x, so it saves what ATen's
saves (x). Which one a model uses is its MLPs' gelu_kernel, chosen by the trainer's probe
(kernel_probe.py, fast_paths.py) and kept in the checkpoint. Compiled graphs keep inductor's own
fused GELU (the sigmoid form), whatever the choice.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptrain.model.cpu_kernels import library, set_model_kernel

KERNELS = ("gptrain", "aten")


def supports(x: Tensor) -> bool:
    """fp32 CPU tensors outside autocast and compile (compiled graphs fuse their own GELU)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        library()[0].gptrain_gelu_forward(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        ctx.save_for_backward(x)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch.empty_like(x)
        library()[0].gptrain_gelu_backward(x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), x.numel(),
                                           torch.get_num_threads())
        return grad_x


def gelu(x: Tensor) -> Tensor:
    """The tanh GELU on the kernel; check supports() first."""
    return _Gelu.apply(x)


def set_gelu_kernel(model: torch.nn.Module, kernel: str) -> None:
    """Every MLP of the model on this GELU ("gptrain" where it applies, else ATen's)."""
    set_model_kernel(model, "gelu_kernel", kernel, KERNELS, "GELU")
