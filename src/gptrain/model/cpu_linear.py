"""Linear layers whose fp32 CPU matmuls run on oneDNN or on ATen (MKL sgemm on x86), chosen per pass.

Which is faster depends on the CPU and the shapes: on AVX-512 AMD parts oneDNN's brgemm runs about
twice MKL's AVX2 path (2-core EPYC, GPT-2 124M: forward 0.36 -> 0.17 s), on an AVX2-only Zen 3 its
backward is 1.4x slower, and at small shapes MKL wins on Intel. So every Linear carries a LinearPlan,
a kernel for each of the three matmuls (forward, grad_input, grad_weight), which the trainer picks
by measuring (train/fast_paths.py) and keeps in its checkpoint; a backward pass can also take oneDNN on
a contiguous copy of its transposed operand (onednn_copy). Compiled graphs keep the plan: there
oneDNN is the opaque op gptrain::onednn_linear, which inductor calls as it is. Everywhere else (CUDA,
MPS, autocast, other dtypes, a PyTorch without the op) it is F.linear. Parameters and state_dict keys
are nn.Linear's, so checkpoints do not know the difference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gptrain.errors import UserError
from gptrain.model.cpu_kernels import library

# A private op that inductor itself uses; looked up once, with F.linear as the fallback.
_LINEAR_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_IS_ENABLED = (os.environ.get("GPTRAIN_ONEDNN_LINEAR", "1") != "0" and _LINEAR_POINTWISE is not None
               and torch.backends.mkldnn.is_available())
# onednn_copy: oneDNN after copying its strided second operand (W^T, X^T in the backward) contiguous, which
# some CPUs run faster (GPT-2's MLP projection with PyTorch limited to AVX2 on a Zen 5: grad_input 9.0 ms on
# oneDNN, 7.1 on MKL, 5.9 this way); the forward's W is contiguous already, so there it is oneDNN's.
KERNELS = ("onednn", "aten", "onednn_copy")
PASSES = ("forward", "grad_input", "grad_weight")


@dataclass(frozen=True)
class LinearPlan:
    """The kernel of each matmul of a linear layer: y = x W^T, dX = dY W, dW = dY^T X."""

    forward: str = "aten"
    grad_input: str = "aten"
    grad_weight: str = "aten"

    def __post_init__(self) -> None:
        for name in PASSES:
            if getattr(self, name) not in KERNELS:
                raise UserError(f"train.cpu_linear: the kernel for {name} must be one of {', '.join(KERNELS)} "
                                f"(got {getattr(self, name)!r})")

    @property
    def is_all_aten(self) -> bool:
        return all(getattr(self, f.name) == "aten" for f in fields(self))

    def to_text(self) -> str:
        """One kernel ("aten", "onednn", "onednn_copy") or "forward=onednn,grad_input=aten,grad_weight=onednn_copy"
        (parse() reads it back)."""
        kernels = {getattr(self, name) for name in PASSES}
        if len(kernels) == 1:
            return kernels.pop()
        return ",".join(f"{name}={getattr(self, name)}" for name in PASSES)

    @classmethod
    def parse(cls, text: str, name: str = "train.cpu_linear") -> LinearPlan:
        """One kernel (of KERNELS) for all three passes, or pass=kernel pairs; missing passes are aten."""
        text = text.strip()
        if text in KERNELS:
            return cls(**dict.fromkeys(PASSES, text))
        pairs = {}
        for item in (part.strip() for part in text.split(",")):
            pass_name, _, kernel = (piece.strip() for piece in item.partition("="))
            if pass_name not in PASSES or pass_name in pairs:
                problem = "is given twice" if pass_name in pairs else "is not PASS=KERNEL"
                raise UserError(f"{name}: {item!r} {problem}; give auto, {', '.join(KERNELS)}, or PASS=KERNEL "
                                f"pairs with PASS one of {', '.join(PASSES)}")
            pairs[pass_name] = kernel
        return cls(**pairs)


def default_plan() -> LinearPlan:
    """Before (or without) a probe: oneDNN everywhere, as before plans existed; GPTRAIN_ONEDNN_LINEAR=0: ATen."""
    return _DEFAULT_PLAN


_DEFAULT_PLAN = LinearPlan.parse("onednn" if _IS_ENABLED else "aten")  # a constant: dynamo traces no cache


def _onednn_linear(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    return _LINEAR_POINTWISE(contiguous(a), b, bias, "none", [], "")


def contiguous(a: Tensor) -> Tensor:
    """a, contiguous (oneDNN's linear copies a strided input). The transpose of a contiguous fp32 CPU
    matrix (grad_weight's dY^T; onednn_copy's W^T and X^T) is copied by gptrain's transpose kernel
    (cpu_kernels.cpp) where it is built: ATen's copy took 9% of the baby config's step on a 2-core Zen 5
    (190 us for a 768 x 512 dY^T), the kernel a fifth of that. The copy is exact, so results do not
    depend on which one ran. Compiled graphs copy a strided b for onednn_copy with inductor's copy."""
    if a.is_contiguous():
        return a
    lib = library()[0]
    if (lib is None or a.device.type != "cpu" or a.dim() != 2 or a.dtype != torch.float32
            or a.stride() != (1, a.shape[0])):
        return a.contiguous()
    out = torch.empty(a.shape, dtype=a.dtype)
    lib.gptrain_transpose(a.data_ptr(), out.data_ptr(), a.shape[1], a.shape[0], torch.get_num_threads())
    return out


def _onednn_linear_shape(a: Tensor, b: Tensor, bias: Tensor | None) -> Tensor:
    return a.new_empty((*a.shape[:-1], b.shape[0]))


# The same call as an op of gptrain's own for compiled graphs: inductor lowers mkldnn._linear_pointwise
# only for frozen (constant) weights and fails on a trained one, while a custom op it calls as it is
# (GPT-2's default job shape on 2 Zen 4 cores, compiled: 542-559 -> 489-513 ms a step with the probed
# plan, against MKL for every matmul before). Eager calls skip the custom op's Python dispatch.
_ONEDNN_LINEAR_OP = torch.library.custom_op(
    "gptrain::onednn_linear", _onednn_linear, mutates_args=(), schema="(Tensor a, Tensor b, Tensor? bias) -> Tensor")
_ONEDNN_LINEAR_OP.register_fake(_onednn_linear_shape)


def matmul_t(a: Tensor, b: Tensor, kernel: str, bias: Tensor | None = None) -> Tensor:
    """a @ b.T (+ bias) with the given kernel; a is (..., K), b is (N, K)."""
    if kernel == "aten":
        return F.linear(a, b, bias)
    if torch.compiler.is_compiling():
        return _ONEDNN_LINEAR_OP(a, b.contiguous() if kernel == "onednn_copy" else b, bias)
    return _onednn_linear(a, contiguous(b) if kernel == "onednn_copy" else b, bias)


class _PlannedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, plan: LinearPlan) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.plan = bias is not None, plan
        return matmul_t(x, weight, plan.forward, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        plan = ctx.plan
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_t(g2, weight.t(), plan.grad_input).view(x.shape)  # dX = dY @ W
        if ctx.needs_input_grad[1]:
            grad_w = matmul_t(g2.t(), x.reshape(-1, x.shape[-1]).t(), plan.grad_weight)  # dW = dY^T @ X
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


def is_onednn_usable(x: Tensor, weight: Tensor) -> bool:
    return (
        _IS_ENABLED  # GPTRAIN_ONEDNN_LINEAR=0 turns oneDNN off whatever a plan says
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, plan: LinearPlan | None = None) -> Tensor:
    """F.linear, with each matmul on the plan's kernel for fp32 CPU tensors (an all-ATen plan is F.linear)."""
    plan = plan or default_plan()
    if plan.is_all_aten or not is_onednn_usable(x, weight):
        return F.linear(x, weight, bias)
    return _PlannedLinear.apply(x, weight, bias, plan)


class Linear(nn.Linear):
    """nn.Linear with a per-pass choice of CPU kernel (same parameters, same state_dict)."""

    plan: LinearPlan | None = None  # None: default_plan(); set_linear_plan() gives a model its probed plan

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.plan)


def set_linear_plan(model: nn.Module, plan: LinearPlan) -> None:
    for module in model.modules():
        if isinstance(module, Linear):
            module.plan = plan
