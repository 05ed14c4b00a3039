"""Pick the attention kernel for CPU training (model/cpu_attention.py's or SDPA) by timing both.

One attention layer's forward and backward at the run's micro batch, context and heads, the kernels
in turns so that machine load hits both alike; the faster one is used when it saves at least
MIN_GAIN. Cached per CPU model, torch version, thread count and shape in $GPTRAIN_SPEED_CACHE
(like the linear plans), so a machine probes a shape once.
"""

from __future__ import annotations

import statistics
import time

import torch

from gptrain.metrics.throughput import machine_id, read_cache, speed_cache_dir, write_cache
from gptrain.model import cpu_attention
from gptrain.model.gpt import ModelConfig, attention

CACHE_FILE_NAME = "attention_kernels.json"
PROBE_VERSION = "attention probe v2"  # v2: the kernel's backward by query chunks
MIN_GAIN = 0.03  # gptrain's kernel must save this fraction of SDPA's time
REPEATS = 5  # timed measurements per kernel (the median counts), the order swapped each time
MIN_MEASURE_SECONDS = 0.005  # short passes are repeated until one measurement lasts this long


def cache_key(cfg: ModelConfig, batch_size: int) -> str:
    return (f"{PROBE_VERSION} | {machine_id('cpu')} | torch {torch.__version__} | {torch.get_num_threads()} threads"
            f" | batch {batch_size} ctx {cfg.block_size} heads {cfg.n_head} width {cfg.n_embd}")


def choose_attention_kernel(cfg: ModelConfig, batch_size: int) -> tuple[str, str]:
    """The kernel for this shape on this machine and why: ("gptrain" | "sdpa", a few words)."""
    lib, lib_why = cpu_attention.library()
    if lib is None:
        return "sdpa", lib_why
    head_size = cfg.n_embd // cfg.n_head
    if head_size % 16 or head_size > cpu_attention.MAX_HEAD_SIZE:
        return "sdpa", f"head size {head_size} is not a multiple of 16 up to {cpu_attention.MAX_HEAD_SIZE}"
    path, key = speed_cache_dir() / CACHE_FILE_NAME, cache_key(cfg, batch_size)
    cached = read_cache(path)
    entry = cached.get(key)
    source = "probed before on this machine, cached"
    if not (isinstance(entry, dict) and set(entry) >= set(cpu_attention.KERNELS)):
        entry, source = time_kernels(cfg, batch_size), "probed now"
        write_cache(path, {**cached, key: entry})
    gain = 1 - entry["gptrain"] / entry["sdpa"]
    kernel = "gptrain" if gain >= MIN_GAIN else "sdpa"
    return kernel, (f"{source}: gptrain's {entry['gptrain'] * 1e3:.2f} ms vs SDPA's {entry['sdpa'] * 1e3:.2f} ms "
                    "a layer")


def sdpa_attention(qkv_BT3C: torch.Tensor, n_head: int) -> torch.Tensor:
    """What the model runs when the kernel is SDPA (model/gpt.py, CausalSelfAttention.forward)."""
    B, T, C3 = qkv_BT3C.shape
    C = C3 // 3
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in qkv_BT3C.split(C, dim=2))
    return attention(q, k, v, 0.0, True).transpose(1, 2).contiguous().view(B, T, C)


def time_kernels(cfg: ModelConfig, batch_size: int) -> dict[str, float]:
    """Median seconds of one layer's attention forward and backward with each kernel."""
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch_size, cfg.block_size, 3 * cfg.n_embd, generator=generator).requires_grad_(True)
    grad_y = torch.randn(batch_size, cfg.block_size, cfg.n_embd, generator=generator)
    runs = {"gptrain": cpu_attention.causal_attention, "sdpa": sdpa_attention}

    def call(kernel: str) -> None:
        runs[kernel](qkv, cfg.n_head).backward(grad_y)
        qkv.grad = None

    for kernel in runs:
        call(kernel)  # warm-up: first-touch allocations, the threads
    started = time.perf_counter()
    call("sdpa")
    loops = max(1, int(MIN_MEASURE_SECONDS / max(time.perf_counter() - started, 1e-7)))
    times = {kernel: [] for kernel in runs}
    for repeat in range(REPEATS):
        for kernel in list(runs) if repeat % 2 == 0 else list(runs)[::-1]:
            started = time.perf_counter()
            for _ in range(loops):
                call(kernel)
            times[kernel].append((time.perf_counter() - started) / loops)
    return {kernel: statistics.median(values) for kernel, values in times.items()}
