"""Pick gptrain's own CPU kernels or PyTorch's for a run's attention and GELU, by timing both.

Attention: one layer's forward and backward at the run's micro batch, context and heads (gptrain's
kernel against SDPA, with the transposes and copies each needs in the model). GELU: forward and
backward of the (B*T, 4C) activation (gptrain's kernel against ATen's). The two kernels of each go in
turns so that machine load hits both alike, and gptrain's is used when it saves at least MIN_GAIN.
Cached per CPU model, torch version, thread count and shape in $GPTRAIN_SPEED_CACHE (like the linear
plans), so a machine probes a shape once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gptrain.metrics.throughput import machine_id, read_cache, speed_cache_dir, write_cache
from gptrain.model import cpu_attention, cpu_gelu
from gptrain.model.cpu_kernels import library
from gptrain.model.gpt import ModelConfig, attention
from gptrain.model.linear_probe import time_in_turns

CACHE_FILE_NAME = "cpu_kernels.json"
PROBE_VERSION = "kernel probe v1"
MIN_GAIN = 0.03  # gptrain's kernel must save this fraction of PyTorch's time
MIN_MEASURE_SECONDS = 0.005  # short passes are repeated until one measurement lasts this long
MAX_PROBE_ROWS = 8192  # bigger micro batches time the GELU at this many rows


def cache_key(what: str, cfg: ModelConfig, batch_size: int) -> str:
    """Also keyed by the built library's name, which hashes the kernels' source: a new source is timed again."""
    return (f"{PROBE_VERSION} | {Path(library()[1]).name} | {what} | {machine_id('cpu')} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads | batch {batch_size} ctx {cfg.block_size} heads {cfg.n_head} "
            f"width {cfg.n_embd}")


def choose_attention_kernel(cfg: ModelConfig, batch_size: int) -> tuple[str, str]:
    """("gptrain" | "sdpa", why) for this shape on this machine."""
    head_size = cfg.n_embd // cfg.n_head
    if library()[0] is not None and (head_size % 16 or head_size > cpu_attention.MAX_HEAD_SIZE):
        return "sdpa", f"head size {head_size} is not a multiple of 16 up to {cpu_attention.MAX_HEAD_SIZE}"
    return _choose("attention", "sdpa", cfg, batch_size, lambda: time_attention(cfg, batch_size))


def choose_gelu_kernel(cfg: ModelConfig, batch_size: int) -> tuple[str, str]:
    """("gptrain" | "aten", why) for this shape on this machine."""
    return _choose("gelu", "aten", cfg, batch_size, lambda: time_gelu(cfg, batch_size))


def _choose(what: str, theirs: str, cfg: ModelConfig, batch_size: int,
            measure: Callable[[], dict[str, float]]) -> tuple[str, str]:
    lib, lib_why = library()
    if lib is None:
        return theirs, lib_why
    path, key = speed_cache_dir() / CACHE_FILE_NAME, cache_key(what, cfg, batch_size)
    cached = read_cache(path)
    entry = cached.get(key)
    source = "probed before on this machine, cached"
    if not (isinstance(entry, dict) and {"gptrain", theirs} <= set(entry)):
        entry, source = measure(), "probed now"
        write_cache(path, {**cached, key: entry})
    kernel = "gptrain" if entry["gptrain"] <= (1 - MIN_GAIN) * entry[theirs] else theirs
    return kernel, f"{source}: gptrain's {entry['gptrain'] * 1e3:.2f} ms vs {theirs}'s {entry[theirs] * 1e3:.2f} ms"


def sdpa_attention(qkv_BT3C: torch.Tensor, n_head: int) -> torch.Tensor:
    """What the model runs when the kernel is SDPA (model/gpt.py, CausalSelfAttention.forward)."""
    B, T, C3 = qkv_BT3C.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv_BT3C.split(C, dim=2))
    return attention(q, k, v, 0.0, True).transpose(1, 2).contiguous().view(B, T, C)


def time_attention(cfg: ModelConfig, batch_size: int) -> dict[str, float]:
    """Median seconds of one layer's attention forward and backward with each kernel."""
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch_size, cfg.block_size, 3 * cfg.n_embd, generator=generator).requires_grad_(True)
    grad_y = torch.randn(batch_size, cfg.block_size, cfg.n_embd, generator=generator)
    runs = {"gptrain": cpu_attention.causal_attention, "sdpa": sdpa_attention}

    def call(kernel: str) -> None:
        runs[kernel](qkv, cfg.n_head).backward(grad_y)
        qkv.grad = None

    return time_in_turns(call, list(runs), MIN_MEASURE_SECONDS)


def time_gelu(cfg: ModelConfig, batch_size: int) -> dict[str, float]:
    """Median seconds of one MLP's GELU forward and backward with each kernel."""
    rows = min(batch_size * cfg.block_size, MAX_PROBE_ROWS)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4 * cfg.n_embd, generator=generator).requires_grad_(True)
    grad_y = torch.randn(rows, 4 * cfg.n_embd, generator=generator)
    runs = {"gptrain": cpu_gelu.gelu, "aten": lambda t: F.gelu(t, approximate="tanh")}

    def call(kernel: str) -> None:
        runs[kernel](x).backward(grad_y)
        x.grad = None

    return time_in_turns(call, list(runs), MIN_MEASURE_SECONDS)
