"""`gptrain bench`: one model shape's training step, timed by phase, against the reference and llm.c.

The figures (all from the same process and the same run): forward/backward/optimizer/step medians,
tokens/s, achieved FLOP/s (metrics.throughput.flops_per_token), the fp32 (or bf16) matmul rate this
machine measures for large matrices (the best of up to 64 repeats or about a second, before and after
the steps), MFU against the device's peak, and two ratios:
  step_time_ratio        gptrain's step time / the reference's (lower is faster);
  matmul_limit_fraction  step FLOP / (gptrain's step time x the measured matmul rate): how close the
                         step comes to doing nothing but large matmuls.
--compile also times both models under torch.compile, with and without the compile time, in turns
with eager twins of both (the machine's speed drifts between phases), and records the measurement
for the training's compile rule (train/fast_paths.py); with --compare it adds
compiled_step_time_ratio, gptrain compiled / the plain (eager) reference timed in turns with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from gptrain.bench.timing import autocast_for, build_pair, make_batches, run_alternating, synchronize
from gptrain.errors import UserError
from gptrain.metrics.machine import describe_machine
from gptrain.metrics.throughput import device_name, flops_per_token, measure_matmul_flops, peak_flops, raise_probed_peak
from gptrain.model.cpu_attention import set_attention_kernel
from gptrain.model.cpu_gelu import set_gelu_kernel
from gptrain.model.gpt import GPT, ModelConfig, count_parameters
from gptrain.train.fast_paths import (
    OWN_KERNELS,
    compile_key,
    has_cpp_compiler,
    record_compile_times,
    resolve_linear,
    resolve_own_kernel,
)

MATMUL_RATE_SECONDS = 1.0  # each of bench's two matmul rate measurements (before and after the steps)


@dataclass(kw_only=True)
class BenchOptions:
    model: ModelConfig  # block_size is the context benchmarked
    batch_size: int = 4
    device: str = "cpu"
    dtype: str = "fp32"  # fp32, or bf16 autocast (CUDA; the CPU, fast there with AMX or AVX-512 BF16)
    steps: int = 6  # timed steps per model
    warmup: int = 2  # steps per model before timing
    compare: str = ""  # "reference": time the plain PyTorch GPT-2 too
    llmc: str = ""  # path of an llm.c train_gpt2 binary to time
    compile: bool = False  # also time both under torch.compile
    compile_backend: str = "inductor"  # aot_eager: no code generation (for checks)
    cpu_linear: str = "auto"  # as train.cpu_linear
    cpu_attention: str = "auto"  # as train.cpu_attention
    cpu_gelu: str = "auto"  # as train.cpu_gelu

    def __post_init__(self) -> None:
        if self.steps < 1 or self.warmup < 0 or self.batch_size < 1:
            raise UserError("bench needs --steps >= 1, --warmup >= 0 and --batch-size >= 1")
        if self.compare not in ("", "reference"):
            raise UserError(f"--compare takes 'reference' (got {self.compare!r})")
        if self.dtype == "bf16" and not (self.device.startswith("cuda") or self.device == "cpu"):
            raise UserError(f"bench --dtype bf16 needs a CUDA GPU or the CPU (not {self.device})")
        if self.compile and self.device == "cpu" and self.compile_backend == "inductor" and not has_cpp_compiler():
            raise UserError("bench --compile needs a C++ compiler for inductor on the CPU: install g++")


def run_bench(opts: BenchOptions, log=print) -> dict:
    """Time the step(s) and return the result dict (what `gptrain bench` prints and writes as JSON)."""
    cfg, device = opts.model, opts.device
    if device.startswith("cuda"):  # as training does (train.use_tf32): fp32 matmuls on TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    rows = opts.batch_size * cfg.block_size
    plan, choices = choose_kernels(opts, log)
    kernels = {name: choices[name] for name in OWN_KERNELS}  # attention and GELU
    batches = make_batches(cfg.vocab_size, opts.batch_size, cfg.block_size, device)
    autocast = autocast_for(device, opts.dtype)
    torch.manual_seed(0)
    pair = build_pair(gptrain_model(cfg, device, kernels), device, plan, autocast,
                      with_reference=opts.compare == "reference")
    log(f"timing {', '.join(pair)}: {opts.warmup} warmup + {opts.steps} timed steps each, alternating")
    matmul_dtype = "bf16" if opts.dtype == "bf16" else "fp32"
    rates = [measure_matmul_rate(device, matmul_dtype)]
    run_alternating(pair, batches, opts.warmup + opts.steps)
    rates.append(measure_matmul_rate(device, matmul_dtype))
    matmul_rate = max(rates)
    step_flop = flops_per_token(cfg) * rows
    peak, peak_basis = peak_flops(device, matmul_dtype)
    peak = raise_probed_peak(device, matmul_dtype, matmul_rate) if peak_basis == "probe" else peak
    runs = {name: summarize(timed.medians(opts.warmup), rows, step_flop, peak) for name, timed in pair.items()}
    result = {
        "title": title(cfg, opts),
        "machine": describe_machine(device),
        "shape": {"n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "vocab_size": cfg.vocab_size,
                  "context": cfg.block_size, "batch_size": opts.batch_size, "bias": cfg.bias,
                  "parameters": count_parameters(cfg)},
        "device": device, "dtype": opts.dtype, "tf32": device.startswith("cuda"), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "timed_steps": opts.steps, "warmup_steps": opts.warmup,
        **choices,
        "step_flop": step_flop, "matmul_flops_per_s": matmul_rate, "matmul_flops_per_s_before_after": rates,
        "peak_flops_per_s": peak, "peak_basis": peak_basis,
        "runs": runs, "first_step_loss": {name: timed.losses[0] for name, timed in pair.items()},
        "matmul_limit_fraction": runs["gptrain"]["flops_per_s"] / matmul_rate,
    }
    if "reference" in runs:
        result["step_time_ratio"] = runs["gptrain"]["step_s"] / runs["reference"]["step_s"]
        result["steps_per_s_ratio"] = 1 / result["step_time_ratio"]
    del pair  # the eager models' memory back before the compiled phase builds four more (GPT-2 124M: 2 GB each)
    if opts.llmc:
        result |= bench_llmc(opts.llmc, opts.warmup + opts.steps, runs, rows, step_flop, peak, log)
    if opts.compile:
        result["compiled"], result["eager_beside_compiled"] = bench_compiled(opts, plan, kernels, batches,
                                                                            autocast, rows, step_flop, peak, log)
        if "reference" in runs:  # what a run that compiles gets against the plain (eager) reference, in turns
            result["compiled_step_time_ratio"] = (result["compiled"]["gptrain"]["step_s"]
                                                  / result["eager_beside_compiled"]["reference"]["step_s"])
    return result


def choose_kernels(opts: BenchOptions, log) -> tuple:
    """The linear plan and {"cpu_linear", "cpu_attention", "cpu_gelu" and each one's "_why"}, as training picks them."""
    cfg, is_autocast = opts.model, opts.dtype == "bf16"
    plan, plan_why = resolve_linear(opts.cpu_linear, {}, cfg, opts.batch_size * cfg.block_size, opts.device,
                                    is_autocast=is_autocast)
    log(f"linear kernels: {plan.to_text()} ({plan_why})")
    choices = {"cpu_linear": plan.to_text(), "cpu_linear_why": plan_why}
    for name in OWN_KERNELS:
        kernel, why = resolve_own_kernel(name, getattr(opts, name), {}, cfg, opts.batch_size, opts.device,
                                         is_autocast=is_autocast)
        log(f"{name.removeprefix('cpu_')} kernel: {kernel} ({why})")
        choices |= {name: kernel, f"{name}_why": why}
    return plan, choices


def measure_matmul_rate(device: str, dtype: str) -> float:
    """The machine's large-matrix matmul rate now, the best of up to 64 repeats or about a second: on a shared
    VM one short measurement can land in a slow moment (a 2-core Zen 3 gave 70 GFLOP/s once, 90-162 after),
    which would put the step nearer the limit than it is. Bench measures it before and after the steps
    and keeps the higher."""
    return measure_matmul_flops(device, dtype, budget_seconds=MATMUL_RATE_SECONDS, max_repeats=64)


def bench_llmc(binary: str, num_steps: int, runs: dict, rows: int, step_flop: float, peak, log) -> dict:
    """Time llm.c's train_gpt2 (after gptrain, so they do not share the cores) at its own fixed shape."""
    from gptrain.bench.llmc import run_llmc

    log(f"timing llm.c: {binary} ({num_steps} steps; step 0 is left out of the median)")
    timed = run_llmc(binary, steps=min(num_steps + 1, 41), num_threads=torch.get_num_threads())
    step_s = timed.median_step_s
    runs["llmc"] = {"step_s": step_s, "tokens_per_s": rows / step_s, "flops_per_s": step_flop / step_s,
                    "mfu": step_flop / step_s / peak if peak else None, "steps": timed.num_steps,
                    "first_loss": timed.losses[0] if timed.losses else None}
    return {"llmc_step_time_ratio": runs["gptrain"]["step_s"] / step_s}


def summarize(medians: dict[str, float], rows: int, step_flop: float, peak: float | None) -> dict:
    step_s = medians["step_s"]
    flops = step_flop / step_s
    return {**medians, "tokens_per_s": rows / step_s, "flops_per_s": flops, "mfu": flops / peak if peak else None}


def gptrain_model(cfg: ModelConfig, device: str, kernels: dict[str, str]) -> GPT:
    """gptrain's model on the chosen attention and GELU kernels (build_pair applies the linear plan)."""
    model = GPT(cfg).to(device)
    set_attention_kernel(model, kernels["cpu_attention"])
    set_gelu_kernel(model, kernels["cpu_gelu"])
    return model


def bench_compiled(opts: BenchOptions, plan, kernels: dict[str, str], batches, autocast, rows: int,
                   step_flop: float, peak, log) -> tuple[dict, dict]:
    """The models again under torch.compile, in turns with eager twins from the same weights (the machine's
    speed drifts between phases: compile's saving is taken within one). The first step (compile included)
    apart, then medians. Returns the compiled runs and their eager twins' runs, both by model name."""
    log("compiling (the first step of each model includes its compile time; eager twins run in turns)")
    torch.manual_seed(0)
    pair = build_pair(gptrain_model(opts.model, opts.device, kernels), opts.device, plan, autocast,
                      with_reference=opts.compare == "reference", compile_backend=opts.compile_backend, with_eager=True)
    run_alternating(pair, batches, 1 + opts.warmup + opts.steps)
    synchronize(opts.device)
    eager = {name.removesuffix("_eager"): summarize(pair.pop(name).medians(1 + opts.warmup), rows, step_flop, peak)
             for name in [name for name in pair if name.endswith("_eager")]}
    out = {}
    for name, timed in pair.items():
        first_s = timed.times[0][-1]
        summary = summarize(timed.medians(1 + opts.warmup), rows, step_flop, peak)
        compile_s = max(0.0, first_s - summary["step_s"])
        saving_s = eager[name]["step_s"] - summary["step_s"]
        all_seconds = sum(t[-1] for t in timed.times)  # every step this model ran, the compiling one included
        out[name] = {**summary, "compile_s": compile_s, "first_step_s": first_s,
                     "tokens_per_s_with_compile": rows * len(timed.times) / all_seconds,
                     "break_even_steps": math.ceil(compile_s / saving_s) if saving_s > 0 else None}
    ours = out["gptrain"]
    if opts.compile_backend == "inductor":  # the training's rule is about inductor
        key = compile_key(opts.model, opts.batch_size, opts.device, opts.dtype)
        record_compile_times(key, compile_seconds=ours["compile_s"], eager_step_seconds=eager["gptrain"]["step_s"],
                             compiled_step_seconds=ours["step_s"])
    return out, eager


def title(cfg: ModelConfig, opts: BenchOptions) -> str:
    shape = f"{cfg.n_layer}L {cfg.n_embd}w {cfg.n_head}h vocab {cfg.vocab_size}"
    return f"{shape}, B={opts.batch_size}, T={cfg.block_size}, {opts.dtype}, {device_name(opts.device)}"


def with_llmc_shape(cfg: ModelConfig) -> ModelConfig:
    """GPT-2 124M at T=64: the shape llm.c's train_gpt2 fixes (B=4 is set by the caller)."""
    return replace(cfg, n_embd=768, n_layer=12, n_head=12, block_size=64, vocab_size=50257, bias=True)
