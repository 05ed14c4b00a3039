"""DistEnv: rank, world size, device and the few collectives the loop needs.

Outside torchrun it is a trivial single-process object whose collectives return their input. Under
torchrun (`WORLD_SIZE` > 1) `DistEnv.start()` joins the process group: NCCL on CUDA, gloo elsewhere.
"""

from __future__ import annotations

import gc
import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gptrain.errors import UserError
from gptrain.runtime import die_with_parent

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(preference: str) -> str:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit device must exist."""
    if preference not in DEVICES and not preference.startswith("cuda:"):
        raise UserError(f"device must be one of {', '.join(DEVICES)} (got {preference!r})")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if preference == "mps" and not has_mps:
        raise UserError("device mps was asked for but Apple MPS is not available: use --device cpu or auto")
    return preference


def stop_with_launcher() -> None:
    """Under torchrun on Linux, get SIGTERM when the launcher dies. torchrun starts each worker in a
    session of its own, so a torchrun killed with SIGKILL (or by the OOM killer) would otherwise leave
    its workers training on, orphaned; SIGTERM makes them save together and stop."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(signal.SIGTERM)


_meshes: list[Any] = []  # the device meshes made by DistEnv.device_mesh, released by close()


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device_preference: str = "auto") -> DistEnv:
        """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK if present (the process group is joined by start())."""
        device = resolve_device(device_preference)
        rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device.startswith("cuda") and world_size > 1:
            device = f"cuda:{local_rank}"
        if device == "mps" and world_size > 1 and device_preference == "auto":
            device = "cpu"  # torch.distributed has no MPS backend: several processes on a Mac use gloo on the CPU
        return cls(rank=rank, local_rank=local_rank, world_size=world_size, device=device)

    @classmethod
    def start(cls, device_preference: str = "auto", timeout_seconds: float = 1800) -> DistEnv:
        """from_environment(), then join the process group when launched by torchrun with several ranks."""
        try:
            env = cls.from_environment(device_preference)
        except UserError as e:  # the same device setting on every rank: rank 0 reports it
            e.is_echo = int(os.environ.get("RANK", 0)) != 0
            raise
        if not env.is_distributed or dist.is_initialized():
            return env
        stop_with_launcher()
        if env.device == "mps":
            raise UserError("multi-process training on Apple MPS is not supported: use --device cpu under torchrun")
        if env.device.startswith("cuda"):
            if env.local_rank >= torch.cuda.device_count():
                raise UserError(f"local rank {env.local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                                "start at most one process per GPU (--nproc_per_node)")
            torch.cuda.set_device(env.local_rank)
        backend = "nccl" if env.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
        return env

    def device_mesh(self) -> Any:
        """A 1-D device mesh over every rank (FSDP2's); close() lets go of it with the process group."""
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(self.device.split(":")[0], (self.world_size,))
        _meshes.append(mesh)
        return mesh

    def close(self) -> None:
        if self.is_distributed and dist.is_initialized():
            dist.destroy_process_group()
        # The group must be gone before the interpreter finalizes. FSDP2's DeviceMesh holds it (_pg_registry;
        # torch's DTensor caches hold the mesh to exit) and so does the model's FSDP state (a reference cycle,
        # garbage once the run is over): destroy_process_group left the gloo group alive. Its worker threads,
        # each keeping the last work it ran, then met Python's finalization, which frees the group: a worker
        # freeing that work's tensor must take the GIL and is ended by Python (pthread_exit through a noexcept
        # destructor: "terminate called without an active exception", SIGABRT, no traceback). Dropping the
        # mesh's references and collecting the cycle tear the group down here, its threads joined while
        # Python runs (a DDP group is, by destroy_process_group).
        while _meshes:
            getattr(_meshes.pop(), "_pg_registry", {}).clear()
            gc.collect()

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_gather_objects(self, obj: Any, timeout_seconds: float) -> list[Any]:
        """Every rank's obj on every rank, through a gloo group of its own that waits up to timeout_seconds
        (the default group's timeout is meant for collectives, not for ranks doing long work in between)."""
        if not self.is_distributed:
            return [obj]
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=group)
        dist.destroy_process_group(group)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place (and return it)."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's obj on every rank (picklable; only ever our own values, never user files)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Every rank's obj, in rank order, on rank 0; None elsewhere."""
        if not self.is_distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def on_main(self, fn, *args, **kwargs) -> Any:
        """fn() run on rank 0 only, its result broadcast; a UserError there is raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except UserError as e:
                if not self.is_distributed:
                    raise
                error = str(e)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise UserError(error, is_echo=not self.is_main)
        return result
