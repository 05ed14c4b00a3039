"""The run's automatic speed choices, made once and kept: the CPU linear kernels, gptrain's own CPU attention
and GELU kernels or PyTorch's, torch.compile, and how the token embedding's gradient is summed.

All of them change the floating-point order of the math, so a resume must make the same choices to stay
bitwise: they are decided when a run first starts (on rank 0, then sent to every rank), stored in
TrainState.fast_paths with the machine they were made on, and a resume on the same kind of machine
(device name, torch version, threads) reuses them; on another machine it decides again, since its
results cannot be bitwise anyway. An explicit setting (train.cpu_linear=aten, train.compile=on)
always wins. A checkpoint from before fast paths were recorded resumes with what gptrain did then
(oneDNN for every pass on the CPU; compile on CUDA only; SDPA and ATen's GELU).

The compile rule on the CPU (where inductor generates C++ and the first step waits for it): compile
when the projected saving, (eager - compiled micro-batch time) x the run's micro batches, exceeds
twice the compile time, both taken from a measurement of this shape on this machine: one recorded by
`gptrain bench --compile` or an earlier run, else the compile probe measures it now (train/
compile_probe.py) if the run is long enough for that to matter, 5 minutes per layer or more (and that
run, having paid the compile, compiles if the compiled steps were faster); a shorter unmeasured run
stays eager.
On CUDA auto compiles.

The embedding gradient: a one-process eager CPU run adds the token embedding's rows straight into the
tied weight's gradient (model/gpt.py, _EmbeddingGradInPlace); anything else (DDP's hooks, compile, a
checkpoint from before this was recorded) sums it the autograd way.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import torch

from gptrain.errors import UserError
from gptrain.metrics.throughput import machine_id, read_cache, speed_cache_dir, write_cache
from gptrain.model.cpu_attention import set_attention_kernel
from gptrain.model.cpu_gelu import set_gelu_kernel
from gptrain.model.cpu_kernels import library
from gptrain.model.cpu_linear import LinearPlan, default_plan, set_linear_plan
from gptrain.model.gpt import ModelConfig
from gptrain.model.kernel_probe import choose_attention_kernel, choose_gelu_kernel
from gptrain.model.linear_probe import choose_linear_plan
from gptrain.train.budget import parse_duration
from gptrain.train.compile_probe import PROBE_MIN_MICRO_BATCHES, is_worth_probing, min_run_seconds, probe_compile
from gptrain.train.step import has_fast_cpu_bf16, uses_bf16

COMPILE_CACHE_FILE_NAME = "compile_times.json"
COMPILE_PAYBACK = 2.0  # the projected saving must exceed this many compile times
# v2: CPU inductor with the C++ wrapper and the sigmoid-form GELU; v3: that GELU's backward from its saved sigmoid;
# v4: compiled graphs keep the linear plan's oneDNN matmuls (they ran every matmul on ATen before)
# v5: gptrain's attention kernel in compiled graphs where the probe takes it (model/cpu_attention.py)
COMPILE_VERSION = "compile v5"


def machine_key(device: str) -> str:
    return f"{machine_id(device)} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def legacy_choices(device: str) -> dict:
    """What gptrain did before it recorded fast paths: a resume of such a checkpoint stays bitwise."""
    return {"cpu_linear": default_plan().to_text() if device == "cpu" else "aten",
            "compile": "on" if device.startswith("cuda") else "off", "embedding_grad": "dense",
            "cpu_attention": "sdpa", "cpu_gelu": "aten", "machine": machine_key(device)}


def resolve_linear(setting: str, saved: dict, cfg: ModelConfig, rows: int, device: str,
                   is_autocast: bool = False) -> tuple[LinearPlan, str]:
    """The linear plan and where it came from: the setting, the checkpoint, or the probe (or its cache).
    is_autocast: a bf16 CPU run, whose linears are F.linear under autocast (fp32 sampling would use a plan)."""
    if setting != "auto":
        return LinearPlan.parse(setting, name="train.cpu_linear"), "set"
    if saved.get("cpu_linear"):
        return LinearPlan.parse(saved["cpu_linear"]), "kept from the checkpoint"
    if device != "cpu":
        return LinearPlan(), f"{device}: F.linear"
    if is_autocast:
        return LinearPlan(), "bf16 autocast: F.linear"
    if default_plan().is_all_aten:
        return LinearPlan(), "no oneDNN here (or GPTRAIN_ONEDNN_LINEAR=0)"
    plan, found = choose_linear_plan(cfg, rows)
    return plan, "probed now" if found["source"] == "probe" else "probed before on this machine, cached"


# gptrain's own CPU kernels (model/cpu_kernels.py): the choice's key, PyTorch's kernel, and the probe
OWN_KERNELS = {"cpu_attention": ("sdpa", choose_attention_kernel), "cpu_gelu": ("aten", choose_gelu_kernel)}


def resolve_own_kernel(name: str, setting: str, saved: dict, cfg: ModelConfig, batch_size: int, device: str,
                       is_autocast: bool = False) -> tuple[str, str]:
    """The kernel of `name` (a key of OWN_KERNELS: "gptrain" or PyTorch's) and where it came from. saved: a
    resumed checkpoint's choices (one from before the choice existed ran PyTorch's)."""
    theirs, probe = OWN_KERNELS[name]
    if setting == "gptrain" and device == "cpu" and library()[0] is None:
        raise UserError(f"train.{name}=gptrain: gptrain's kernels are not available here ({library()[1]}); "
                        f"use train.{name}=auto or {theirs}")
    if setting != "auto":
        return setting, "set"
    if saved:
        kernel = saved.get(name, theirs)
        if kernel == "gptrain" and library()[0] is None:
            return theirs, f"the checkpoint's kernel is not available here ({library()[1]}): {theirs}, not bitwise"
        return kernel, "kept from the checkpoint"
    if device != "cpu":
        return theirs, f"{device}: {theirs}"
    if is_autocast:
        return theirs, f"bf16 autocast: {theirs}"
    return probe(cfg, batch_size)


def resolve_compile(setting: str, saved: dict, backend: str, device: str, key: str, num_micro_batches: int,
                    budget_seconds: float | None = None, probe: Callable[[], dict] | None = None,
                    min_run_s: float = 1200.0) -> tuple[bool, str]:
    """Whether to torch.compile the step model, and why. probe() measures compile when nothing was recorded
    and the run is at least min_run_s long (compile_probe.min_run_seconds of its shape)."""
    if setting == "off":
        return False, "set"
    if device == "cpu" and backend == "inductor" and not has_cpp_compiler():
        if setting == "on":
            raise UserError("train.compile=on needs a C++ compiler for inductor on the CPU: install g++, or use "
                            "train.compile_backend=aot_eager, or train.compile=off")
        return False, "auto: no C++ compiler found (inductor needs one on the CPU); running eager"
    if setting == "on":
        return True, "set"
    if "compile" in saved:
        return saved["compile"] == "on", "kept from the checkpoint"
    if device.startswith("cuda"):
        return True, "auto: CUDA"
    if device != "cpu":
        return False, f"auto: {device}"
    record = read_cache(speed_cache_dir() / COMPILE_CACHE_FILE_NAME).get(key)
    if isinstance(record, dict):
        return compile_pays(record, num_micro_batches, budget_seconds, "measured before")
    if probe is None:
        return False, "auto: off, no measurement for this shape here (`gptrain bench --compile` makes one)"
    short = f"auto: off, a short run (under {min_run_s / 60:g} min"
    if not is_worth_probing(num_micro_batches, budget_seconds, min_run_s):
        return False, (f"{short} or {PROBE_MIN_MICRO_BATCHES} micro batches) with no measurement for this "
                       "shape here")
    try:
        record = probe()
    except Exception as e:  # a toolchain inductor cannot use after all: run eager, and try again next time
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return False, f"auto: off, compiling failed while measuring it ({type(e).__name__}: {first_line})"
    if "compiled_step_seconds" not in record:  # timed eager only: too short to pay for measuring compile
        minutes = record["eager_step_seconds"] * num_micro_batches / 60
        return False, f"{short}: about {minutes:.1f} min eager) with no measurement for this shape here"
    record_compile_times(key, **record)
    # This run paid the compile while measuring it (its step model reuses the cached code): it compiles
    # if the compiled steps were faster at all. Later runs weigh the recorded compile time.
    return compile_pays({**record, "compile_seconds": 0.0}, num_micro_batches, budget_seconds,
                        "measured now, so already paid")


def resolve_embedding_grad(saved: dict, device: str, strategy: str, is_compiled: bool) -> str:
    """"in_place" for a one-process eager CPU run, else "dense". A resume that still qualifies keeps its
    checkpoint's (an older checkpoint's is "dense", what it ran with); one that does not (resumed on more
    ranks, or compiled) is dense whatever was saved: DDP would overwrite the rows added behind its hooks."""
    can_add_in_place = device == "cpu" and strategy == "none" and not is_compiled
    if not can_add_in_place:
        return "dense"
    return saved.get("embedding_grad", "dense") if saved else "in_place"


def compile_pays(record: dict, num_micro_batches: int, budget_seconds: float | None = None,
                 source: str = "measured") -> tuple[bool, str]:
    """The rule: (eager - compiled) seconds per micro batch x micro batches > COMPILE_PAYBACK x compile seconds.
    A --budget run's micro batches are projected from the budget at the compiled speed."""
    count = num_micro_batches if budget_seconds is None else budget_seconds / record["compiled_step_seconds"]
    saving = (record["eager_step_seconds"] - record["compiled_step_seconds"]) * count
    cost = COMPILE_PAYBACK * record["compile_seconds"]
    verdict = "on" if saving > cost else "off"
    return saving > cost, (f"auto: {verdict}, projected saving {saving:.0f}s over {count:.0f} micro batches vs "
                           f"{COMPILE_PAYBACK:g} x {record['compile_seconds']:.0f}s compile ({source})")


def compile_key(cfg: ModelConfig, batch_size: int, device: str, dtype: str = "fp32") -> str:
    """The record's key: machine, shape, micro batch, dtype (bf16: autocast) and COMPILE_VERSION (what
    gptrain compiles). One process's measurement: a multi-rank run on this machine uses it too."""
    precision = " | bf16" if dtype == "bf16" else ""
    return (f"{machine_key(device)} | {COMPILE_VERSION} | {cfg.n_layer}L {cfg.n_embd}w {cfg.n_head}h "
            f"ctx {cfg.block_size} vocab {cfg.padded_vocab_size} bias {cfg.bias} | batch {batch_size}{precision}")


def record_compile_times(key: str, *, compile_seconds: float, eager_step_seconds: float,
                         compiled_step_seconds: float) -> None:
    """What `gptrain bench --compile` measured (per micro batch), for the auto rule of later runs here."""
    path = speed_cache_dir() / COMPILE_CACHE_FILE_NAME
    write_cache(path, {**read_cache(path), key: {"compile_seconds": compile_seconds,
                                                 "eager_step_seconds": eager_step_seconds,
                                                 "compiled_step_seconds": compiled_step_seconds}})


def compile_model(model, backend: str, device: str):
    """torch.compile for training. On the CPU, inductor's C++ wrapper: the calls between kernels run in
    generated C++ instead of Python, which a small model's many short kernels notice (4 layers, width
    128, B=12, T=64 on 2 Xeon cores: 22.4 -> 20.0 ms a step)."""
    from torch.torch_version import TorchVersion

    # Not on torch 2.5: its C++ wrapper got the tied embedding's gradient wrong (vocab 37 padded to 64, seen on 2.5.1).
    is_cpu_inductor = device == "cpu" and backend == "inductor" and not torch.__version__.startswith("2.5.")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and TorchVersion(torch.__version__) < "2.6":
        # Before 2.6 dynamo's DDPOptimizer (one graph per gradient bucket) refuses graphs that hold our autograd
        # Functions; one graph for the whole model computes the same gradients, all-reduced after the backward.
        torch._dynamo.config.optimize_ddp = False
    return torch.compile(model, backend=backend, options={"cpp_wrapper": True} if is_cpu_inductor else None)


def has_cpp_compiler() -> bool:
    """Whether inductor's CPU backend can find a C++ compiler (its configured one, or the usual names)."""
    try:
        from torch._inductor import config as inductor_config

        configured = inductor_config.cpp.cxx
    except Exception:  # an inductor without this setting: look for the usual names
        configured = (None, "g++")
    names = [name for name in (configured if isinstance(configured, tuple) else (configured,)) if name]
    return any(shutil.which(name) for name in [*names, "g++", "clang++", "c++"])


def apply_fast_paths(run, saved: dict | None, log=lambda line: None, can_probe: bool = True) -> str:
    """Decide (rank 0, sent to all) or reuse (saved: a resumed checkpoint's; None: not a resume) the run's
    fast paths, apply them to run.model and run.step_model, keep them in run.state, return a log line.
    can_probe=False: an unmeasured compile stays off instead of being measured (dry runs)."""
    cfg, env = run.cfg, run.env
    precision = "bf16" if uses_bf16(env.device, cfg.train.precision) else "fp32"
    note = ""
    if saved and saved.get("machine") != machine_key(env.device):
        note = f" (the checkpoint's were made on {saved.get('machine', 'another machine')}: decided again)"
        saved = {}
    if saved and saved.get("precision", precision) != precision:  # older checkpoints: as they ran
        note, saved = f" (the checkpoint's were made for {saved['precision']}: decided again)", {}
    chosen = env.on_main(lambda: decide_fast_paths(run, saved or {}, precision, log, can_probe))
    run.state.fast_paths = chosen
    set_kernels(run.model, chosen["cpu_linear"], chosen.get("cpu_attention", "sdpa"), chosen.get("cpu_gelu", "aten"))
    run.model.embedding_grad = chosen.get("embedding_grad", "dense")
    if chosen["compile"] == "on":
        run.step_model = compile_model(run.step_model, cfg.train.compile_backend, env.device)
    return (f"fast paths: cpu linear {chosen['cpu_linear']} ({chosen['cpu_linear_why']}); "
            f"attention {chosen.get('cpu_attention', 'sdpa')} ({chosen.get('cpu_attention_why', 'set')}); "
            f"gelu {chosen.get('cpu_gelu', 'aten')} ({chosen.get('cpu_gelu_why', 'set')}); "
            f"compile {chosen['compile']} ({chosen['compile_why']}); "
            f"embedding grad {chosen.get('embedding_grad', 'dense')}{note}"
            f"{cpu_precision_hint(env.device, cfg.train.precision)}")


def decide_fast_paths(run, saved: dict, precision: str, log, can_probe: bool) -> dict:
    """Every choice with its reason (saved: the resumed checkpoint's, or {} to decide them now)."""
    cfg, device = run.cfg, run.env.device
    is_bf16 = precision == "bf16"
    budget_seconds = parse_duration(cfg.train.budget) if cfg.train.budget else None
    rows = cfg.train.batch_size * cfg.model.block_size
    plan, linear_why = resolve_linear(cfg.train.cpu_linear, saved, cfg.model, rows, device, is_autocast=is_bf16)
    own = {name: resolve_own_kernel(name, getattr(cfg.train, name), saved, cfg.model, cfg.train.batch_size, device,
                                    is_autocast=is_bf16) for name in OWN_KERNELS}
    backend = cfg.train.compile_backend
    num_micro_batches = run.plan.num_steps * run.plan.num_micro_steps

    def probe() -> dict:
        log("measuring whether torch.compile pays for this shape (once per shape and machine)")
        return probe_compile(cfg.model, cfg.train.batch_size,
                             lambda model: set_kernels(model, plan.to_text(), own["cpu_attention"][0],
                                                       own["cpu_gelu"][0]),
                             lambda model: compile_model(model, backend, device),
                             num_micro_batches=None if budget_seconds is not None else num_micro_batches,
                             is_bf16=is_bf16)

    key = compile_key(cfg.model, cfg.train.batch_size, device, precision)
    is_compiled, compile_why = resolve_compile(cfg.train.compile, saved, backend, device, key, num_micro_batches,
                                               budget_seconds, probe if can_probe else None,
                                               min_run_seconds(cfg.model))
    chosen = {"cpu_linear": plan.to_text(), "cpu_linear_why": linear_why}
    for name, (kernel, why) in own.items():
        chosen |= {name: kernel, f"{name}_why": why}
    return chosen | {"compile": "on" if is_compiled else "off", "compile_why": compile_why,
                     "embedding_grad": resolve_embedding_grad(saved, device, run.plan.strategy, is_compiled),
                     "machine": machine_key(device), "precision": precision}


def set_kernels(model, linear_plan: str, attention: str, gelu: str) -> None:
    """The model's linears, attention and GELU on the chosen kernels."""
    set_linear_plan(model, LinearPlan.parse(linear_plan))
    set_attention_kernel(model, attention)
    set_gelu_kernel(model, gelu)


def cpu_precision_hint(device: str, precision: str) -> str:
    """A word on bf16 for a CPU run: that this CPU has fast bf16 (when the run left precision to auto),
    or that it emulates it (when the run asked for bf16)."""
    if device != "cpu" or precision == "fp32":
        return ""
    is_native = has_fast_cpu_bf16()
    if precision == "auto" and is_native:
        return "; this CPU multiplies bf16 natively: --train.precision=bf16 (mixed precision) trains 1.1-1.9x faster"
    if precision == "bf16" and not is_native:
        return "; bf16 is emulated on this CPU (no AMX or AVX-512 BF16): expect it slower than fp32"
    return ""
