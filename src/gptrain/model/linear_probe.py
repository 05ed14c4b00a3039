"""Pick the CPU linear kernels (cpu_linear.LinearPlan) for a model by timing its own matmuls.

For each of a layer's three matmuls (forward, grad_input, grad_weight) both kernels are timed at
every linear shape the model has (the four of a block and the head), weighted by how often each
occurs, alternating so that machine load hits both alike; each pass gets the faster kernel. When
oneDNN saves less than MIN_GAIN of the matmul time, the plan is all ATen: plain F.linear, which
also skips the autograd.Function's Python overhead. The result is cached per CPU model, torch
version, thread count and shapes in $GPTRAIN_CACHE, so a machine probes a shape once.
"""

from __future__ import annotations

import statistics
import time

import torch

from gptrain.metrics.throughput import machine_id, read_cache, speed_cache_dir, write_cache
from gptrain.model import cpu_linear
from gptrain.model.chunked_loss import CHUNKED_MIN_CPU_LOGITS
from gptrain.model.cpu_linear import PASSES, LinearPlan
from gptrain.model.gpt import ModelConfig

CACHE_FILE_NAME = "linear_plans.json"
MIN_GAIN = 0.03  # oneDNN must save this fraction of the all-ATen matmul time to be used at all
# timed measurements per kernel, pass and shape, the kernels' order swapped each time (the median counts): with
# 3 in a fixed order, one probe on a 2-core Zen 3 picked ATen for GPT-2's forward, whose oneDNN is 20-25% faster
# there (three probes after it agreed)
REPEATS = 5
PROBE_VERSION = "probe v4"  # in the cache key: plans cached before (3 repeats; v2: ATen's dY^T copy; v3: no
# onednn_copy) are measured again
MIN_MEASURE_SECONDS = 0.002  # small matmuls are repeated until one measurement lasts this long
MAX_PROBE_ROWS = 4096  # bigger micro batches are timed at this many rows (matmul time grows with rows)
# the kernels each pass is timed on: the forward's W is contiguous, so onednn_copy would be onednn again there
PASS_KERNELS = {"forward": ("onednn", "aten"), "grad_input": ("onednn", "aten", "onednn_copy"),
                "grad_weight": ("onednn", "aten", "onednn_copy")}


def linear_shapes(cfg: ModelConfig, rows: int) -> list[tuple[int, int, int]]:
    """(in, out, count) of every linear layer that runs on `rows` rows (B * T) per micro batch through the
    plan: the four of each block, and the head unless the loss takes it in chunks (chunked_loss.py)."""
    d = cfg.n_embd
    block = [(k, n, cfg.n_layer) for k, n in [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]]
    if rows * cfg.padded_vocab_size >= CHUNKED_MIN_CPU_LOGITS:
        return block
    return block + [(d, cfg.padded_vocab_size, 1)]


def cache_key(cfg: ModelConfig, rows: int) -> str:
    shapes = ";".join(f"{k}x{n}" for k, n, _ in linear_shapes(cfg, rows))
    return (f"{PROBE_VERSION} | {machine_id('cpu')} | torch {torch.__version__} | {torch.get_num_threads()} threads | "
            f"rows {rows} | bias {cfg.bias} | {shapes}")


def choose_linear_plan(cfg: ModelConfig, rows: int) -> tuple[LinearPlan, dict]:
    """The plan for this model on this machine (cached), and how it was found: {"source", "seconds"}."""
    if cpu_linear.default_plan().is_all_aten:  # no oneDNN op here (or GPTRAIN_ONEDNN_LINEAR=0): nothing to probe
        return LinearPlan(), {"source": "no oneDNN"}
    path, key = speed_cache_dir() / CACHE_FILE_NAME, cache_key(cfg, rows)
    cached = read_cache(path)
    entry = cached.get(key)
    if isinstance(entry, dict) and "plan" in entry:
        try:
            return LinearPlan.parse(entry["plan"]), {**entry, "source": "cache"}
        except Exception:
            pass  # an unreadable entry is measured again
    seconds = time_passes(cfg, rows)
    plan = plan_from_times(seconds)
    entry = {"plan": plan.to_text(), "seconds": seconds}
    write_cache(path, {**cached, key: entry})
    return plan, {**entry, "source": "probe"}


def plan_from_times(seconds: dict[str, dict[str, float]]) -> LinearPlan:
    """seconds[pass][kernel] -> the faster kernel per pass, or all ATen when oneDNN gains < MIN_GAIN."""
    best = {name: min(seconds[name], key=seconds[name].get) for name in PASSES}
    aten_total = sum(seconds[name]["aten"] for name in PASSES)
    best_total = sum(seconds[name][best[name]] for name in PASSES)
    if aten_total - best_total < MIN_GAIN * aten_total:
        return LinearPlan()
    return LinearPlan(**best)


def time_passes(cfg: ModelConfig, rows: int) -> dict[str, dict[str, float]]:
    """Seconds per micro batch spent in each pass's matmuls with each kernel (count-weighted medians)."""
    totals = {name: dict.fromkeys(PASS_KERNELS[name], 0.0) for name in PASSES}
    generator = torch.Generator().manual_seed(0)
    shapes = linear_shapes(cfg, rows)
    rows = min(rows, MAX_PROBE_ROWS)
    for k, n, count in shapes:
        x = torch.randn(rows, k, generator=generator)
        w = torch.randn(n, k, generator=generator)
        g = torch.randn(rows, n, generator=generator)
        bias = torch.randn(n, generator=generator) if cfg.bias else None
        operands = {  # each pass's matmul as cpu_linear runs it: a @ b.T (+ bias)
            "forward": (x, w, bias),
            "grad_input": (g, w.t(), None),
            "grad_weight": (g.t(), x.t(), None),
        }
        for name, (a, b, c) in operands.items():
            for kernel, seconds in _time_alternating(a, b, c, PASS_KERNELS[name]).items():
                totals[name][kernel] += count * seconds
    return totals


def _time_alternating(a, b, bias, kernels: tuple[str, ...]) -> dict[str, float]:
    """Median seconds of a @ b.T (+ bias) on each kernel, measured in turns."""
    return time_in_turns(lambda kernel: cpu_linear.matmul_t(a, b, kernel, bias), list(kernels), MIN_MEASURE_SECONDS)


def time_in_turns(call, kernels: list[str], min_seconds: float, repeats: int = REPEATS) -> dict[str, float]:
    """Median seconds of call(kernel) for each kernel: after one warm-up call each (oneDNN builds its
    primitive, MKL its thread pool, first-touch allocations), `repeats` measurements each, the kernels'
    order swapped every time, each measurement repeating short calls until it lasts min_seconds."""
    for kernel in kernels:
        call(kernel)
    started = time.perf_counter()
    call(kernels[0])
    loops = max(1, int(min_seconds / max(time.perf_counter() - started, 1e-7)))
    times = {kernel: [] for kernel in kernels}
    for repeat in range(repeats):
        for kernel in kernels if repeat % 2 == 0 else kernels[::-1]:
            started = time.perf_counter()
            for _ in range(loops):
                call(kernel)
            times[kernel].append((time.perf_counter() - started) / loops)
    return {kernel: statistics.median(values) for kernel, values in times.items()}
