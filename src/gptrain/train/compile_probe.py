"""The compile probe: how long torch.compile takes for this shape on this machine, and what it saves.

Run once per shape and machine when a CPU run with train.compile=auto is long enough for compiling to
matter and nothing was measured yet (by an earlier probe or `gptrain bench --compile`): a fresh model
of the run's shape, eager and then compiled, a few forward/backward passes each on random tokens. The
optimizer step is left out (the same in both). The CPU RNG is restored after, so the run's weights
and data order are what they would have been without the probe. The compile time recorded is this
first one's (a cold inductor cache makes it several times a warm one's), so the rule leans to eager.
"""

from __future__ import annotations

import statistics
import time

import torch

from gptrain.model.cpu_linear import LinearPlan, set_linear_plan
from gptrain.model.gpt import GPT, ModelConfig

PROBE_MIN_MICRO_BATCHES = 1000  # shorter runs stay eager without probing: compiling rarely pays there
PROBE_MIN_BUDGET_S = 300.0  # the same for --budget runs
PROBE_STEPS = 4  # timed forward/backward passes of each model (after one untimed)


def is_worth_probing(num_micro_batches: int, budget_seconds: float | None) -> bool:
    if budget_seconds is not None:
        return budget_seconds >= PROBE_MIN_BUDGET_S
    return num_micro_batches >= PROBE_MIN_MICRO_BATCHES


def _median_pass_seconds(model, x: torch.Tensor, y: torch.Tensor, count: int) -> float:
    seconds = []
    for _ in range(count):
        started = time.perf_counter()
        model(x, y).backward()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def probe_compile(cfg: ModelConfig, batch_size: int, plan: LinearPlan, compile_fn) -> dict:
    """Seconds per micro batch eager and compiled, and the compile seconds (the first compiled pass's
    excess over the others): the record compile_pays() judges. compile_fn(model) compiles as training does."""
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: nothing else is touched
        torch.default_generator.manual_seed(0)
        model = GPT(cfg)
        set_linear_plan(model, plan)
        # As a one-process eager run sums it (a compiled model ignores it); multi-rank runs, which sum it
        # densely, reuse this record too, with an eager time a few percent faster than theirs.
        model.embedding_grad = "in_place"
        x, y = (torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size)) for _ in range(2))
        _median_pass_seconds(model, x, y, 1)  # first-touch allocations, the linear kernels' setup
        eager_s = _median_pass_seconds(model, x, y, PROBE_STEPS)
        compiled = compile_fn(model)
        first_s = _median_pass_seconds(compiled, x, y, 1)
        compiled_s = _median_pass_seconds(compiled, x, y, PROBE_STEPS)
    return {"compile_seconds": max(0.0, first_s - compiled_s), "eager_step_seconds": eager_s,
            "compiled_step_seconds": compiled_s}
