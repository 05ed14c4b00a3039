"""describe_machine(): what a run trains on (host, CPU, GPU, versions), for the machine event row."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo on Linux, sysctl on macOS, else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=2, check=True).stdout.strip()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    # ARM Linux often has no "model name" line; the architecture is still worth reporting.
    return platform.processor() or platform.machine() or "unknown"


def num_usable_cpus() -> int:
    """CPUs this process may run on (a container's or Slurm job's cpuset), not every core of the host."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gptrain_version() -> str:
    try:
        return metadata.version("gptrain")
    except metadata.PackageNotFoundError:
        return "unknown"


def describe_gpu(device: str, cpu: str) -> tuple[str | None, int]:
    """(GPU name or None, number of GPUs visible) for a torch device string."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device), torch.cuda.device_count()
    if device.startswith("mps"):
        # Apple silicon has one integrated GPU, named after the chip (sysctl's "Apple M2 Pro").
        return (f"{cpu} GPU" if cpu.startswith("Apple") else "Apple GPU") + " (MPS)", 1
    return None, torch.cuda.device_count() if torch.cuda.is_available() else 0


def describe_machine(device: str) -> dict:
    """The machine dict of the machine event row: host, platform, versions, CPU and GPU (no benchmarking)."""
    import torch

    cpu = cpu_model()
    gpu, num_gpus = describe_gpu(device, cpu)
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA toolkit torch was built with (None on CPU-only builds)
        "gptrain": gptrain_version(),
        "cpu": cpu,
        "num_cpus": num_usable_cpus(),
        "device": device,
        "gpu": gpu,
        "num_gpus": num_gpus,
    }
