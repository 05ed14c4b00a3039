"""gptrain's own CPU kernels (cpu_kernels.cpp: causal attention, the tanh GELU, a transpose), built for this machine.

The source ships with the package and is compiled the first time a run wants a kernel, with the C++
compiler inductor would use (CXX, g++, c++ or clang++), -O3 -march=native -fopenmp, into
$GPTRAIN_CACHE/kernels/, keyed by the source, the compiler and the CPU, written atomically (a
half-built library never loads); about 2 s. It is plain C++ (no PyTorch headers), loaded with ctypes;
its OpenMP is the libgomp torch already loaded (torch's wheels bundle theirs under that soname).
Without a compiler, or with GPTRAIN_CPU_KERNELS=0, library() says why and every caller uses PyTorch's
own ops instead (cpu_attention.py, cpu_gelu.py, cpu_linear.py's copies). A run on the default oneDNN
linear plan builds it at its first backward pass even where attention and GELU stay PyTorch's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-Wno-psabi")
ABI = 3  # gptrain_kernels_abi() of the source here
ENV = "GPTRAIN_CPU_KERNELS"
_P, _I64, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {
    "gptrain_attention_forward": [_P, _I64, _I64, _P, _I64, _I64, _P, _I, _I, _I, _I, _F, _I],
    "gptrain_attention_backward": [_P, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _P, _P, _I64, _I64, _I, _I, _I,
                                   _I, _F, _I],
    "gptrain_gelu_forward": [_P, _P, _I64, _I],
    "gptrain_gelu_backward": [_P, _P, _P, _I64, _I],
    "gptrain_transpose": [_P, _P, _I64, _I64, _I],
}


def set_model_kernel(model, attribute: str, kernel: str, kernels: tuple[str, ...], what: str) -> None:
    """Set `attribute` (a class attribute of the modules that have the choice) on every such module."""
    if kernel not in kernels:
        raise ValueError(f"unknown {what} kernel {kernel!r}")
    if kernel == "gptrain" and library()[0] is None:
        from gptrain.errors import UserError

        raise UserError(f"gptrain's CPU {what} kernel is not available here: {library()[1]}")
    for module in model.modules():
        if hasattr(type(module), attribute):
            setattr(module, attribute, kernel)


def compiler() -> str | None:
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((path for path in map(shutil.which, filter(None, names)) if path), None)


@functools.cache
def library() -> tuple[ctypes.CDLL | None, str]:
    """The compiled kernels (built now if this machine has none cached) and their path, or (None, why not)."""
    if os.environ.get(ENV, "1") == "0":
        return None, f"{ENV}=0"
    cxx = compiler()
    if cxx is None:
        return None, "no C++ compiler found (set CXX or install g++)"
    try:
        path = _build(cxx)
        lib = ctypes.CDLL(str(path))
        if lib.gptrain_kernels_abi() != ABI:
            return None, f"{path} is from another gptrain (delete it to rebuild)"
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        return None, f"building gptrain's CPU kernels failed: {first_line}"
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
    return lib, str(path)


def _build(cxx: str) -> Path:
    """Compile (once per source, compiler and CPU) into the cache, atomically."""
    from gptrain.metrics.throughput import machine_id
    from gptrain.tokenizer.gpt2_assets import cache_dir

    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cxx, version, machine_id("cpu"), *FLAGS]).encode())
    path = cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError((done.stderr.strip() or f"{cxx} exited with {done.returncode}").splitlines()[0])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
