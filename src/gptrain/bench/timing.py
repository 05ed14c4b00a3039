"""Training-step timing of gptrain against the plain PyTorch reference, in one process, alternating.

gptrain's step is what train/step.py does for one micro batch: forward, backward, the gradient norm
with one host sync for the loss and norm, the fused AdamW step (the clipping inside it) and zero_grad,
through the linear kernels the trainer's probe picks. The reference (bench/reference.py) runs nanoGPT's step. Both start
from the same weights, see the same batches and the same AdamW hyperparameters; steps alternate so
that load on the machine hits both alike. Each phase is timed separately (medians).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gptrain.bench.reference import reference_like
from gptrain.model.cpu_linear import LinearPlan, set_linear_plan
from gptrain.model.gpt import GPT
from gptrain.train.fast_paths import compile_model
from gptrain.train.optim import OptimConfig, build_optimizer
from gptrain.train.step import clip_gradients, step_optimizer

PHASES = ("forward", "backward", "optimizer", "step")
LR = 6e-4


@dataclass
class Timed:
    """One model's step function and the seconds of each phase of each step it ran."""

    step: Callable[[Tensor, Tensor], list[float]]  # returns [forward, backward, optimizer] seconds
    times: list[list[float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def medians(self, warmup: int) -> dict[str, float]:
        kept = self.times[warmup:] or self.times
        return {f"{name}_s": statistics.median(t[i] for t in kept) for i, name in enumerate(PHASES)}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_backward(model: nn.Module, x: Tensor, y: Tensor, device: str, autocast) -> tuple[Tensor, list[float]]:
    """The loss, and the seconds of its forward and of its backward pass (the device waited for)."""
    started = time.perf_counter()
    with autocast:
        loss = model(x, y)
    synchronize(device)
    forward_done = time.perf_counter()
    loss.backward()
    synchronize(device)
    return loss, [forward_done - started, time.perf_counter() - forward_done]


def gptrain_step(model: nn.Module, optimizer: torch.optim.Optimizer, device: str, autocast, timed: Timed):
    """train_step's work for one micro batch, timed by phase."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x: Tensor, y: Tensor) -> list[float]:
        loss, seconds = forward_backward(model, x, y, device, autocast)
        started = time.perf_counter()
        norm, unscale = clip_gradients(params, 1.0, optimizer)
        value, _ = torch.stack([loss.detach().float(), norm.float()]).tolist()
        step_optimizer(optimizer, unscale)
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        timed.losses.append(value)
        return [*seconds, time.perf_counter() - started]

    return step


def reference_step(model: nn.Module, optimizer: torch.optim.Optimizer, device: str, autocast, timed: Timed):
    """nanoGPT's train.py step with log_interval=1: forward, backward, clip_grad_norm_, step, loss.item()."""

    def step(x: Tensor, y: Tensor) -> list[float]:
        loss, seconds = forward_backward(model, x, y, device, autocast)
        started = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timed.losses.append(loss.item())
        return [*seconds, time.perf_counter() - started]

    return step


def reference_adamw(model: nn.Module, optim: OptimConfig, device: str) -> torch.optim.Optimizer:
    """nanoGPT's configure_optimizers: decay on 2-D tensors, fused on CUDA, PyTorch's default elsewhere."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = {"fused": True} if device.startswith("cuda") else {}
    return torch.optim.AdamW(groups, lr=LR, betas=(optim.beta1, optim.beta2), eps=optim.eps, **extra)


def build_pair(model: GPT, device: str, plan: LinearPlan, autocast, *, with_reference: bool,
               compile_backend: str = "", with_eager: bool = False) -> dict[str, Timed]:
    """gptrain's model (its plan applied; compiled with compile_backend if given) and, if asked, the
    reference beside it (compiled too: nanoGPT's --compile=True). with_eager: eager twins of both from
    the same weights as well ("gptrain_eager", "reference_eager"), to time the compiled ones against."""
    optim = OptimConfig()
    set_linear_plan(model, plan)
    if device == "cpu":  # what a one-process eager CPU run does (fast_paths.resolve_embedding_grad); compiled: dense
        model.embedding_grad = "in_place"
    models = {"gptrain": model}
    if with_reference:
        models["reference"] = reference_like(model)
    if with_eager:
        models |= {f"{name}_eager": copy.deepcopy(m) for name, m in models.items()}
    pair = {}
    for name, m in models.items():
        timed = pair[name] = Timed(step=lambda x, y: [])
        is_compiled = compile_backend and not name.endswith("_eager")
        if name.startswith("gptrain"):
            step_model = compile_model(m, compile_backend, device) if is_compiled else m
            timed.step = gptrain_step(step_model, build_optimizer(m, optim, lr=LR), device, autocast, timed)
        else:
            step_model = torch.compile(m, backend=compile_backend) if is_compiled else m
            timed.step = reference_step(step_model, reference_adamw(m, optim, device), device, autocast, timed)
    return pair


def run_alternating(pair: dict[str, Timed], batches: list[Tensor], num_steps: int) -> None:
    """num_steps steps of each model, in turns (which goes first alternates too), on the same batches."""
    for i in range(num_steps):
        batch = batches[i % len(batches)]
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        order = list(pair.values())
        for timed in order if i % 2 == 0 else order[::-1]:
            phases = timed.step(x, y)
            timed.times.append([*phases, sum(phases)])


def make_batches(vocab_size: int, batch_size: int, context: int, device: str, count: int = 4) -> list[Tensor]:
    generator = torch.Generator().manual_seed(42)
    return [torch.randint(0, vocab_size, (batch_size, context + 1), generator=generator).to(device)
            for _ in range(count)]


def autocast_for(device: str, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
