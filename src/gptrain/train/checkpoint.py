"""Checkpoints: safetensors + JSON folders, written atomically in a background thread; and loading.

A checkpoint folder (`step_000250/`, `best/`, `final/`) holds model.safetensors,
optimizer.safetensors, state.json (TrainState, loader position, RNG states, optimizer groups),
config.toml and tokenizer.json. No pickle: anyone's checkpoint is safe to open.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptrain.distributed.state import find_tied_names
from gptrain.errors import OutOfSpace, UserError
from gptrain.faults import fault_point
from gptrain.files import OLD_SUFFIX, swap_in, sync_folder, whole_folder

STEP_PREFIX = "step_"
STEP_NAME = re.compile(r"step_\d+")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 500  # periodic checkpoints; 0: none (best and final are still written)
    keep_last: int = 2  # periodic checkpoints kept; older ones are deleted
    save_best: bool = True  # keep best/ at the lowest val loss so far

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise UserError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")


@dataclass(kw_only=True)
class TrainState:
    """Everything besides weights, optimizer and loader that an exact resume needs."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    num_bad_evals: int = 0  # evaluations since the last best (early stopping)
    num_bad_steps: int = 0  # skipped steps (non-finite loss or gradient, loss spike) within the window
    loss_ema: float | None = None  # running mean of the train loss, for the spike guard
    bad_steps: list[int] = field(default_factory=list)  # the steps skipped within train.bad_step_window
    num_rollbacks: int = 0  # train/recovery.py
    recovery_start_step: int | None = None  # the last rollback's step: the lr ramps back from there
    elapsed_seconds: float = 0.0
    # Set by control commands (train/control.py), so a resume keeps them:
    lr_scale: float = 1.0  # the effective lr is schedule x lr_scale
    eval_every_steps: int | None = None  # None: the config's eval.every_steps
    samples_every_steps: int | None = None  # None: the config's samples.every_steps
    # The lr schedule's plan: the first launch's num_steps, and tails added by --schedule.extend=hold
    # (schedule.planned_lr); 0 in checkpoints written before it was recorded.
    schedule_steps: int = 0
    schedule_tails: list[dict] = field(default_factory=list)
    budget_plan: dict | None = None  # a --budget run's measured plan (train/budget.py): a resume keeps it
    fast_paths: dict | None = None  # the CPU linear kernels and compile, chosen once (train/fast_paths.py)


@dataclass
class Snapshot:
    """A consistent copy (on the CPU) of everything a checkpoint holds, safe to write in a thread."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict
    config_toml: str
    tokenizer_json: str


def _encode_bytes(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _decode_bytes(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng(device: str = "cpu") -> dict:
    """This process's RNG states: the CPU generator's, and the training CUDA device's when there is one."""
    rng = {"torch": _encode_bytes(torch.get_rng_state())}
    if device.startswith("cuda"):
        rng["cuda"] = [_encode_bytes(torch.cuda.get_rng_state(device))]
    return rng


def restore_rng(saved: dict | list, rank: int = 0, fallback_seed: int = 0, device: str = "cpu") -> None:
    """Restore this rank's RNG states; a rank the checkpoint did not have (more ranks now) is seeded."""
    per_rank = saved if isinstance(saved, list) else [saved]  # format 1 stored rank 0's dict alone
    if rank >= len(per_rank):
        torch.manual_seed(fallback_seed)
        return
    rng = per_rank[rank]
    torch.set_rng_state(_decode_bytes(rng["torch"]))
    if "cuda" in rng and device.startswith("cuda"):
        torch.cuda.set_rng_state(_decode_bytes(rng["cuda"][0]), device)


def split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state dict as tensors `<param name>.<key>` (for safetensors) and JSON."""
    tensors, scalars = {}, {}
    for name, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{key}"] = value.contiguous()
            else:
                scalars[f"{name}.{key}"] = value
    return tensors, {"keyed_by": "name", "param_groups": state_dict["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of split_optimizer_state. Format-1 checkpoints are keyed by parameter index:
    meta["keyed_by"] tells (the loop maps indices to names with distributed.state.key_by_name)."""
    is_index = meta.get("keyed_by", "index") == "index"
    state: dict = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        if is_index:
            param, key = name.split(".", 1)
            state.setdefault(int(param), {})[key] = value
        else:
            param, key = name.rsplit(".", 1)
            state.setdefault(param, {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def write_checkpoint(snapshot: Snapshot, folder: Path) -> None:
    """Write into folder.tmp, fsync, then swap it in: the folder appears whole or not at all."""
    tmp = folder.with_name(folder.name + ".tmp")
    fault_point("checkpoint.start")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(snapshot.model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    fault_point("checkpoint.model")
    save_file(snapshot.optimizer, str(tmp / "optimizer.safetensors"), metadata={"format": "pt"})
    fault_point("checkpoint.optimizer")
    checksums = {name: _sha256(tmp / name) for name in ("model.safetensors", "optimizer.safetensors")}
    checksums |= {"config.toml": hashlib.sha256(snapshot.config_toml.encode()).hexdigest(),
                  "tokenizer.json": hashlib.sha256(snapshot.tokenizer_json.encode()).hexdigest()}
    state = snapshot.state | {"checksums": checksums}  # read_checkpoint finds damage a truncation check misses
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    fault_point("checkpoint.state")
    (tmp / "config.toml").write_text(snapshot.config_toml, encoding="utf-8")
    (tmp / "tokenizer.json").write_text(snapshot.tokenizer_json, encoding="utf-8")
    sync_folder(tmp)
    fault_point("checkpoint.swap")
    swap_in(tmp, folder)
    fault_point("checkpoint.swapped")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_checksums(folder: Path, state: dict, names: tuple[str, ...]) -> None:
    """Each named file against the sha256 state.json recorded when it was written (older checkpoints have
    none: nothing to check)."""
    recorded = state.get("checksums", {})
    for name in names:
        if name in recorded and _sha256(folder / name) != recorded[name]:
            raise UserError(f"{folder}/{name} is damaged (it does not match the checksum written with it): delete "
                            f"{folder} and resume again, from the checkpoint before it")


def periodic_dirs(checkpoints_dir: Path) -> list[Path]:
    """step_NNNNNN folders (never .tmp leftovers; a `.old` one only where a crash left it in place of its
    folder, see files.py), oldest first by step number."""
    names = {p.name.removesuffix(OLD_SUFFIX) for p in checkpoints_dir.glob(f"{STEP_PREFIX}*") if p.is_dir()}
    found = [whole_folder(checkpoints_dir / n) for n in names if STEP_NAME.fullmatch(n)]
    return sorted(found, key=lambda p: int(p.name.removesuffix(OLD_SUFFIX)[len(STEP_PREFIX):]))


def named_dir(checkpoints_dir: Path, name: str) -> Path:
    """best/ or final/, or its `.old` copy where a crash in the middle of replacing it left only that."""
    return whole_folder(checkpoints_dir / name)


def prune_periodic(checkpoints_dir: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last step_* folders; each is renamed to <name>.tmp first, so a kill
    in the middle of deleting leaves a leftover that no reader takes for a checkpoint."""
    for old in periodic_dirs(checkpoints_dir)[:-keep_last]:
        doomed = old.with_name(old.name + ".tmp")
        shutil.rmtree(doomed, ignore_errors=True)
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


class CheckpointWriter:
    """Writes snapshots in one background thread so training does not wait on the disk."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, snapshot: Snapshot, folders: list[Path], keep_last: int | None = None) -> None:
        """Start writing (after the previous write ended); refused with OutOfSpace, before anything is
        written, when the folders' estimated size does not fit in the free space."""
        self.wait()
        check_space(folders, snapshot_bytes(snapshot))

        def work() -> None:
            try:
                for folder in folders:
                    write_checkpoint(snapshot, folder)
                if keep_last is not None:
                    prune_periodic(folders[0].parent, keep_last)
            except OSError as e:
                self._error = _write_failed(e, folder)
            except BaseException as e:  # re-raised in the training thread by wait() or raise_if_failed()
                self._error = e

        self._thread = threading.Thread(target=work, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """The background write's error, if it failed (checked at every step: a failed save stops the run)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def snapshot_bytes(snapshot: Snapshot) -> int:
    tensors = [*snapshot.model.values(), *snapshot.optimizer.values()]
    texts = [json.dumps(snapshot.state), snapshot.config_toml, snapshot.tokenizer_json]
    return sum(t.numel() * t.element_size() for t in tensors) + sum(len(t) for t in texts) + 64 * 1024  # headers


def _format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TB"


def check_space(folders: list[Path], num_bytes: int) -> None:
    """Each folder is written whole before the old one of its name goes: it needs its full size free."""
    parent = folders[0].parent
    probe = next(p for p in [parent, *parent.parents] if p.exists())
    needed, free = num_bytes * len(folders), shutil.disk_usage(probe).free
    if free < needed:
        names = ", ".join(f.name for f in folders)
        raise OutOfSpace(f"not enough disk space for checkpoint {names} in {parent}: it needs about "
                         f"{_format_bytes(needed)} and {_format_bytes(free)} is free; free some space (or lower "
                         "checkpoint.keep_last) and --resume: the last checkpoint is intact")


def _write_failed(e: OSError, folder: Path) -> BaseException:
    """A write that failed midway leaves no partial folder; a full disk becomes one line (OutOfSpace)."""
    shutil.rmtree(folder.with_name(folder.name + ".tmp"), ignore_errors=True)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpace(f"ran out of disk space writing checkpoint {folder} ({e.strerror}); it was removed and "
                          "the last complete checkpoint is intact: free some space and --resume")
    return e


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint folder, or a run directory (its final/, else latest step_*/, else best/)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    ckpts = path / "checkpoints"
    if ckpts.is_dir():
        for candidate in [named_dir(ckpts, "final"), *reversed(periodic_dirs(ckpts)), named_dir(ckpts, "best")]:
            if (candidate / "state.json").is_file():
                return candidate
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist")
    raise UserError(f"{path} holds no checkpoint (no model.safetensors in it or in checkpoints/*)")


def step_of(folder: Path) -> int:
    try:
        return int(json.loads((folder / "state.json").read_text())["train"]["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"{folder}/state.json is damaged; delete that checkpoint folder and resume again") from None


def latest_checkpoint_dir(run_dir: Path) -> Path:
    """The checkpoint with the highest step in a run (to resume from), whatever its folder name."""
    ckpts = run_dir / "checkpoints"
    candidates = [p for p in [*periodic_dirs(ckpts), named_dir(ckpts, "best"), named_dir(ckpts, "final")]
                  if (p / "state.json").is_file()]
    if not candidates:
        raise UserError(f"{run_dir} has no checkpoint to resume from")
    return max(candidates, key=step_of)


def load_model_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load a checkpoint's weights, or fail with a clear message when they do not fit this model."""
    expected = model.state_dict()
    shared = find_tied_names(model)  # stored once, under the first name
    missing = [k for k in expected if k not in tensors and k not in shared]
    unexpected = [k for k in tensors if k not in expected]
    mismatched = [f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
                  for k in tensors if k in expected and tensors[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape {', '.join(mismatched[:3])}" if mismatched else ""]))
        raise UserError(f"the weights in {source} do not fit this model ({detail}): use the checkpoint's sizes")
    model.load_state_dict(tensors, strict=False)


def read_checkpoint(folder: Path, *, with_optimizer: bool = True) -> dict:
    """The raw pieces of a checkpoint: model tensors, optimizer state dict, state.json, config text."""
    try:
        state = json.loads((folder / "state.json").read_text())
        files = ("model.safetensors", "config.toml", "tokenizer.json")
        verify_checksums(folder, state, files + ("optimizer.safetensors",) if with_optimizer else files)
        out = {
            "model": load_file(str(folder / "model.safetensors")),
            "state": state,
            "config_toml": (folder / "config.toml").read_text(encoding="utf-8"),
            "tokenizer_path": folder / "tokenizer.json",
        }
        if with_optimizer:
            tensors = load_file(str(folder / "optimizer.safetensors"))
            out["optimizer"] = join_optimizer_state(tensors, state["optimizer"])
    except (FileNotFoundError, KeyError, json.JSONDecodeError, SafetensorError) as e:
        raise UserError(f"{folder} is not a complete gptrain checkpoint ({e})") from None
    return out


def make_state(train: TrainState, loader: dict, optimizer_meta: dict, rng_per_rank: list[dict],
               dataset_dir: Path | None = None, metrics_offsets: dict[str, int] | None = None,
               is_complete: bool = False, folders: list[str] | None = None) -> dict:
    """state.json: format 2 keys the optimizer by parameter name and keeps every rank's RNG states;
    dataset_dir (absolute) lets `gptrain eval` find the run's val split from any working directory;
    metrics_offsets are the metric files' sizes at this checkpoint (a resume cuts them back to these);
    is_complete: the run ended here (its last step, or an early stop), not a stop or a periodic save;
    folders: every folder this snapshot is written to (a resume completes the ones a kill left behind)."""
    return {"format": 2, "train": asdict(train), "loader": loader, "rng": rng_per_rank, "optimizer": optimizer_meta,
            "dataset_dir": str(dataset_dir.resolve()) if dataset_dir else None,
            "metrics_offsets": metrics_offsets or {}, "is_complete": is_complete, "folders": folders or []}
