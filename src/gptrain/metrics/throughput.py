"""Model FLOPs per token, the device's peak FLOP/s (datasheet table or a cached matmul probe), and MFU."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from gptrain.files import write_atomic
from gptrain.model import cpu_linear
from gptrain.model.gpt import ModelConfig, count_parameters
from gptrain.tokenizer.gpt2_assets import cache_dir

# Dense (no 2:4 sparsity) peak FLOP/s per GPU, in TFLOP/s, by table dtype:
#   bf16: BF16 tensor cores with FP32 accumulate (what cuBLAS uses for torch bf16 matmuls; fp16 is the same
#         rate on every part listed);
#   tf32: FP32 matmuls on TF32 tensor cores (torch's fp32_precision="tf32" / allow_tf32=True);
#   fp32: plain IEEE FP32 on the CUDA cores (TF32 off, torch's default).
# Datasheets quote tensor rates "with sparsity"; the dense rate is half of that. Sources, at the entry:
#   [A100]  NVIDIA A100 datasheet (SXM4 and PCIe list the same): 312 | 156 | 19.5.
#   [H100]  NVIDIA H100 whitepaper, SXM5 at 1830 MHz: 989.4 | 494.7 | 66.9. PCIe and NVL: H100 datasheet,
#           sparse BF16 1,513 / 1,671 and TF32 756 / 835 halved; FP32 51 / 60.
#   [H200]  NVIDIA H200 datasheet: SXM sparse BF16 1,979, TF32 989, FP32 67 (the same GH100 compute as the
#           H100 SXM, so its whitepaper figures); NVL 1,671 / 835 / 60. [GH200] datasheet: as H100 SXM.
#   [Ada]   NVIDIA L4 datasheet: sparse BF16 242, TF32 120, FP32 30.3. L40 and L40S datasheets list dense |
#           sparse: L40 181.05 | 90.5 | 90.5, L40S 362.05 | 183 | 91.6 (the L40S runs tensor math at
#           twice the L40's rate on the same AD102 die).
#   [A10]   NVIDIA A10 datasheet: 125 | 62.5 | 31.2. The A10G is an AWS-only part with its own AWS
#           datasheet (quoted in Baseten's "NVIDIA A10 vs A10G for ML model inference"): 70 | 35 | 35;
#           it runs BF16 with FP32 accumulate at half rate, like a GeForce card.
#   [GeForce] Ada whitepaper appendix (RTX 4090) and Ampere GA102 whitepaper appendix (RTX 3090): the
#           "with FP32 accumulate" rows, half the FP16-accumulate headline: 165.2 | 82.6 | 82.6 and
#           71 | 35.6 | 35.6.
# Patterns are searched case-insensitively against torch.cuda.get_device_name(), first match wins, so a
# more specific name comes before any name it contains ("L40S" before "L40" before "L4").
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("H100 NVL", r"\bH100\b.*\bNVL\b", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", r"\bH100\b.*\bPCIe\b", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 SXM", r"\bH100\b", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # every other H100 is SXM
    ("H200 NVL", r"\bH200\b.*\bNVL\b", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", r"\bH200\b", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("GH200", r"\bGH200\b", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", r"\bA100\b", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", r"\bL40S\b", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("L40", r"\bL40\b", {"bf16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    ("L4", r"\bL4\b", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", r"\bA10G\b", {"bf16": 70.0, "tf32": 35.0, "fp32": 35.0}),
    ("A10", r"\bA10\b", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # The 4090 D and the laptop 4090 are different (slower) parts under the same name.
    ("RTX 4090", r"\bRTX 4090\b(?! D\b| Laptop\b)", {"bf16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    ("RTX 3090", r"\bRTX 3090\b(?! Ti\b)", {"bf16": 71.0, "tf32": 35.6, "fp32": 35.6}),
)
DTYPES = ("bf16", "fp16", "fp32", "tf32")
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
CACHE_FILE_NAME = "peak_flops.json"
RATE_VERSION = "rate v2"  # in the cache key; v2: the fastest of the step's kernels (ATen, oneDNN), not ATen's alone
# The probe doubles the matrix size until one matmul takes this long (or the size cap), then keeps the
# best of a few timed repeats: about 0.1-0.3 s on a 2-core CPU, a few ms on a GPU.
MIN_MATMUL_SECONDS = 0.01
PROBE_BUDGET_SECONDS = 0.12
MAX_PROBE_REPEATS = 8
MAX_PROBE_SIZE = {"cpu": 2048, "mps": 4096, "cuda": 8192}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter plus attention (PaLM appendix B)."""
    head_flops = 6 * cfg.n_embd * cfg.vocab_size
    attention = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return 6 * count_parameters(cfg, non_embedding=True) + head_flops + attention


def estimate_mfu(cfg: ModelConfig, tokens_per_second: float, peak: float | None, *,
                 num_devices: int = 1) -> float | None:
    """MFU of the whole job: tokens_per_second over all ranks, peak per device (None: not reported)."""
    if not peak:
        return None
    return flops_per_token(cfg) * tokens_per_second / (peak * num_devices)


def peak_flops(device: str, dtype: str = "fp32") -> tuple[float, str]:
    """Peak FLOP/s of one device for matmuls in dtype, and its basis: "spec" (datasheet) or "probe".

    dtype "fp32" means whatever torch does with FP32 matmuls now: TF32 tensor cores if TF32 is on
    (so turn it on before calling), IEEE FP32 otherwise. Devices not in PEAK_TFLOPS get a measured
    matmul rate, cached per machine in $GPTRAIN_CACHE.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    name = device_name(device)
    table_dtype = _table_dtype(device, dtype)
    spec = spec_peak(name, table_dtype) if device.startswith("cuda") else None
    if spec is not None:
        return spec, "spec"
    return probe_peak(device, machine_id(device), table_dtype), "probe"


def spec_peak(name: str, dtype: str) -> float | None:
    """Datasheet dense peak FLOP/s for a CUDA device name and table dtype (bf16/fp16/tf32/fp32), or None."""
    # A MIG slice reports its parent's name plus "MIG 1g.10gb" but has only part of its SMs.
    if re.search(r"\bMIG\b", name):
        return None
    dtype = "bf16" if dtype == "fp16" else dtype
    for _, pattern, tflops in PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return tflops[dtype] * 1e12 if dtype in tflops else None
    return None


def device_name(device: str) -> str:
    """Human name of a device: "cpu: <model>", the CUDA device name, or "mps"."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    if device == "cpu":
        return f"cpu: {_cpu_model()}"
    return device


def machine_id(device: str) -> str:
    """device_name, and on the CPU what tells apart machines that report the same model (VMs often show a
    generic "Intel(R) Xeon(R) Processor"): CPUID family/model, L2 and L3 sizes, the widest vector ISA.
    Keys the speed caches, whose measurements are only valid on the machine that made them."""
    name = device_name(device)
    if device != "cpu":
        return name
    return f"{name} ({_cpu_details()})"


def _cpu_details() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    isa = next((name for name in ("amx_tile", "avx512f", "avx2", "asimd") if name in flags), "")
    caches = []
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, size = ((index / name).read_text().strip() for name in ("level", "size"))
        except OSError:
            continue
        if level in ("2", "3"):
            caches.append(f"L{level} {size}")
    cpuid = f"family {fields['cpu family']} model {fields.get('model', '?')}" if "cpu family" in fields else ""
    return ", ".join(part for part in (cpuid, *caches, isa) if part) or platform.machine()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        models = []
    return (models[0] if models else "") or platform.processor() or platform.machine() or "unknown"


def _table_dtype(device: str, dtype: str) -> str:
    if dtype == "fp32" and device.startswith("cuda") and _is_tf32_enabled():
        return "tf32"
    return dtype


def _is_tf32_enabled() -> bool:
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 replaces allow_tf32 with fp32_precision, where "none" inherits from the level above;
    # reading allow_tf32 after the new API was used raises, so read the new one when it exists.
    if not hasattr(matmul, "fp32_precision"):
        return bool(matmul.allow_tf32)
    for owner in (matmul, torch.backends.cuda, torch.backends):
        precision = getattr(owner, "fp32_precision", "none")
        if precision != "none":
            return precision == "tf32"
    return False


SPEED_CACHE_ENV = "GPTRAIN_SPEED_CACHE"


def speed_cache_dir() -> Path:
    """The folder of every speed measurement (peak rates, the linear and kernel probes, compile times):
    $GPTRAIN_SPEED_CACHE, else the asset cache (tests point it at a folder of their own)."""
    return Path(os.environ[SPEED_CACHE_ENV]) if os.environ.get(SPEED_CACHE_ENV) else cache_dir()


def _peak_key(name: str, dtype: str) -> str:
    return f"{name} | {dtype} | torch {torch.__version__} | {torch.get_num_threads()} threads | {RATE_VERSION}"


def raise_probed_peak(device: str, dtype: str, rate: float) -> float:
    """A rate measured later (bench measures one each run) replaces a lower cached probe: a probe taken
    while the machine was busy would otherwise understate the peak, and overstate MFU, for good."""
    key, path = _peak_key(machine_id(device), _table_dtype(device, dtype)), speed_cache_dir() / CACHE_FILE_NAME
    cached = read_cache(path)
    if rate > float(cached.get(key) or 0.0):
        write_cache(path, {**cached, key: rate})
        return rate
    return float(cached[key])


def remeasure_peak(device: str, dtype: str) -> float:
    """The peak again after a training step outran the cached probe (MFU over 100%: its 0.12 s landed in a
    slow moment of a shared VM; a 2-core Zen 5 once read 222 GFLOP/s against 450-490 after): measured
    for about a second as bench does, cached if higher. Only measurements are cached: the steps' own
    rate is an estimate (flops_per_token counts all of causal attention's scores)."""
    return raise_probed_peak(device, dtype, measure_matmul_flops(device, dtype, budget_seconds=1.0, max_repeats=64))


def probe_peak(device: str, name: str, dtype: str) -> float:
    """Best measured square-matmul FLOP/s in dtype, cached by device name, dtype, torch and threads."""
    key = _peak_key(name, dtype)
    path = speed_cache_dir() / CACHE_FILE_NAME
    cached = read_cache(path)
    value = cached.get(key)
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    measured = measure_matmul_flops(device, dtype)
    write_cache(path, {**cached, key: measured})
    return measured


def matmul_kernels(device: str, dtype: str) -> tuple[str, ...]:
    """The kernels a training step's matmuls can run on here (model/cpu_linear.py): ATen's, and for fp32 on
    a CPU with the op, oneDNN's, which on AVX-512 AMD CPUs outruns MKL on large matrices too."""
    if torch.device(device).type == "cpu" and dtype == "fp32" and not cpu_linear.default_plan().is_all_aten:
        return ("aten", "onednn")  # ATen's first: it sizes the matrices
    return ("aten",)


def measure_matmul_flops(device: str, dtype: str, budget_seconds: float = PROBE_BUDGET_SECONDS,
                         max_repeats: int = MAX_PROBE_REPEATS) -> float:
    """Time square matmuls, growing the size until one is long enough to time; return the best FLOP/s of
    up to max_repeats timed repeats within about budget_seconds, the kernels (matmul_kernels) in turns:
    the machine's limit is its fastest kernel's."""
    torch_dtype = TORCH_DTYPES[dtype]
    max_size = MAX_PROBE_SIZE.get(torch.device(device).type, MAX_PROBE_SIZE["cpu"])
    size = 256
    while True:
        a, b = (torch.randn(size, size, device=device, dtype=torch_dtype) for _ in range(2))
        _time_matmul(a, b)  # warm-up: kernel selection, thread pool start, lazy init
        best_seconds = _time_matmul(a, b)
        if best_seconds >= MIN_MATMUL_SECONDS or size >= max_size:
            break
        size *= 2
    kernels = matmul_kernels(device, dtype)
    for kernel in kernels[1:]:
        _time_matmul(a, b, kernel)  # warm-up
    spent_seconds = best_seconds
    for repeat in range(max_repeats):
        if spent_seconds >= budget_seconds:
            break
        seconds = _time_matmul(a, b, kernels[repeat % len(kernels)])
        best_seconds, spent_seconds = min(best_seconds, seconds), spent_seconds + seconds
    return 2 * size**3 / max(best_seconds, 1e-9)


def _time_matmul(a: torch.Tensor, b: torch.Tensor, kernel: str = "aten") -> float:
    """Seconds for one a @ b (oneDNN: a @ b.T, the same work), waiting for the device before and after."""
    _synchronize(a.device)
    started = time.perf_counter()
    if kernel == "aten":
        torch.matmul(a, b)
    else:
        cpu_linear.matmul_t(a, b, kernel)
    _synchronize(a.device)
    return time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, data: dict) -> None:
    """Write atomically (files.write_atomic); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass  # A read-only home or full disk costs a re-measurement next run, never the run itself.
