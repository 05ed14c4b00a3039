"""System use, sampled every few seconds at step boundaries as `kind: "system"` rows: the trainer's
CPU and memory, and the GPU's utilisation and memory where there is one (for the dashboard)."""

from __future__ import annotations

import os
import resource
import time

SYSTEM_EVERY_SECONDS = 5.0


def _total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _rss_bytes() -> int:
    """Resident memory now (Linux /proc), else the peak getrusage reports."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024


class SystemSampler:
    """The process's CPU use between samples (100 = one core busy), its memory, and the GPU's."""

    def __init__(self, device: str, every_seconds: float | None = None) -> None:
        self.device = device
        self.every = SYSTEM_EVERY_SECONDS if every_seconds is None else every_seconds
        self._wall, self._cpu = time.monotonic(), time.process_time()
        self._total = _total_memory_bytes()

    def is_due(self) -> bool:
        return time.monotonic() - self._wall >= self.every

    def sample(self) -> dict:
        wall, cpu = time.monotonic(), time.process_time()
        cpu_percent = 100.0 * (cpu - self._cpu) / max(wall - self._wall, 1e-9)
        self._wall, self._cpu = wall, cpu
        rss = _rss_bytes()
        row = {"cpu_percent": cpu_percent, "num_cpus": os.cpu_count(), "rss_bytes": rss,
               "memory_percent": 100.0 * rss / self._total if self._total else None}
        if self.device.startswith("cuda"):
            row |= self._gpu()
        return row

    def _gpu(self) -> dict:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        try:
            utilization = torch.cuda.utilization(self.device)  # needs NVML (the nvidia-ml-py package)
        except Exception:  # noqa: BLE001 -- no NVML: the figure is missing, training goes on
            utilization = None
        return {"gpu_utilization": utilization, "gpu_memory_used_bytes": total - free,
                "gpu_memory_total_bytes": total, "gpu_memory_percent": 100.0 * (total - free) / total,
                "gpu_memory_allocated_bytes": torch.cuda.memory_allocated(self.device)}
