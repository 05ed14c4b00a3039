"""The compile probe: how long torch.compile takes for this shape on this machine, and what it saves.

Run once per shape and machine when a CPU run with train.compile=auto is long enough for compiling to
matter and nothing was measured yet (by an earlier probe or `gptrain bench --compile`): a fresh model
of the run's shape, eager and then compiled, forward/backward passes on random tokens. The optimizer
step is left out (the same in both). The CPU RNG is restored after, so the run's weights and data
order are what they would have been without the probe. The compile time recorded is this first one's
(a cold inductor cache makes it several times a warm one's), so the rule leans to eager.

Long enough means a run of PROBE_MIN_RUN_S_PER_LAYER x n_layer or more (20 min for 4 layers, an hour
for GPT-2 124M's 12): the cold compile the measurement pays grows with the layers (45-50 s for 4 on a
slow 2-core Xeon VM) and is then a few percent of the run, while compiling saves 0-5% a step at the
default job's shape and about 20% at nanoGPT's baby shape there. A run given in steps is timed eager
first (a few passes) to project its length.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from gptrain.model.gpt import GPT, ModelConfig

PROBE_MIN_MICRO_BATCHES = 1000  # runs of fewer micro batches stay eager without measuring anything
PROBE_MIN_RUN_S_PER_LAYER = 300.0  # and so do runs (a budget, or projected from eager passes) shorter than
# this times the layers
PROBE_STEPS = 4  # timed forward/backward passes of each model (after one untimed)


def min_run_seconds(cfg: ModelConfig) -> float:
    """The shortest run that measures compile for this shape."""
    return PROBE_MIN_RUN_S_PER_LAYER * cfg.n_layer


def is_worth_probing(num_micro_batches: int, budget_seconds: float | None, min_run_s: float) -> bool:
    """Whether a run may be long enough to measure compile for (a run in steps is then timed eager)."""
    if budget_seconds is not None:
        return budget_seconds >= min_run_s
    return num_micro_batches >= PROBE_MIN_MICRO_BATCHES


def _pass_seconds(model, x: torch.Tensor, y: torch.Tensor, is_bf16: bool = False) -> float:
    """One forward/backward as a training step runs it (the gradients then dropped, as the step does)."""
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16) if is_bf16 else contextlib.nullcontext():
        loss = model(x, y)
    loss.backward()
    seconds = time.perf_counter() - started
    for p in model.parameters():
        p.grad = None
    return seconds


def probe_compile(cfg: ModelConfig, batch_size: int, prepare, compile_fn,
                  num_micro_batches: int | None = None, is_bf16: bool = False) -> dict:
    """Seconds per micro batch eager and compiled, and the compile seconds (the first compiled pass's
    excess over the others): the record compile_pays() judges. prepare(model) puts a fresh model on the
    run's kernels and compile_fn(model) compiles it as training does. The timed eager and compiled
    passes alternate, so the machine's drift (several percent over a minute on a shared VM) enters both
    alike. num_micro_batches (a run in steps): when that many eager
    passes would take under min_run_seconds(cfg), it stops before compiling and the record holds only
    eager_step_seconds. is_bf16: every pass under CPU bf16 autocast, as such a run trains."""
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: nothing else is touched
        torch.default_generator.manual_seed(0)
        model = GPT(cfg)
        prepare(model)  # the run's kernels (fast_paths.set_kernels)
        # As a one-process eager run sums it (a compiled model ignores it); multi-rank runs, which sum it
        # densely, reuse this record too, with an eager time a few percent faster than theirs.
        model.embedding_grad = "in_place"
        # Contiguous (B, T) int64 tokens, as the loader gives them: the compiled graph is the run's.
        x, y = (torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size)) for _ in range(2))
        _pass_seconds(model, x, y, is_bf16)  # first-touch allocations, the linear kernels' setup
        eager_s = statistics.median(_pass_seconds(model, x, y, is_bf16) for _ in range(PROBE_STEPS))
        if num_micro_batches is not None and eager_s * num_micro_batches < min_run_seconds(cfg):
            return {"eager_step_seconds": eager_s}
        compiled = compile_fn(model)
        first_s = _pass_seconds(compiled, x, y, is_bf16)
        eager, timed = [], []
        for _ in range(PROBE_STEPS):
            eager.append(_pass_seconds(model, x, y, is_bf16))
            timed.append(_pass_seconds(compiled, x, y, is_bf16))
    compiled_s = statistics.median(timed)
    return {"compile_seconds": max(0.0, first_s - compiled_s), "eager_step_seconds": statistics.median(eager),
            "compiled_step_seconds": compiled_s}
