"""The run directory: choose it (default name with a timestamp), check it, find a run to resume.

These run on rank 0 only; the loop broadcasts their answer, so every rank writes into one folder.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from gptrain.config import RunConfig, from_toml_text
from gptrain.errors import UserError
from gptrain.train import checkpoint as ckpt


def check_run_dir(cfg: RunConfig, *, is_resume: bool, should_overwrite: bool) -> Path:
    """The run directory to use; refuses (before any work) an existing one unless resuming or overwriting."""
    run_dir = Path(cfg.run_dir or f"runs/{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} is a file: choose another --run-dir")
    if is_resume:
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"{run_dir} is not a run directory (no config.toml in it)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not should_overwrite:
            raise UserError(f"run directory {run_dir} already exists: pass --resume {run_dir} to continue it, "
                            "--overwrite to replace it, or choose another --run-dir")
        if not is_run_dir(run_dir):
            raise UserError(f"{run_dir} is not a gptrain run (no config.toml and checkpoints/): --overwrite "
                            "only replaces runs; choose another --run-dir")
    return run_dir


def is_run_dir(path: Path) -> bool:
    """A folder gptrain made: config.toml that parses, checkpoints/, and not the working directory or above."""
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        return False
    if not ((path / "checkpoints").is_dir() and (path / "config.toml").is_file()):
        return False
    try:
        from_toml_text((path / "config.toml").read_text(encoding="utf-8"))
    except UserError:
        return False
    return True


def has_checkpoint(run_dir: Path) -> bool:
    try:
        ckpt.latest_checkpoint_dir(run_dir)
    except UserError:
        return False
    return True


def is_unstarted_run(run_dir: Path) -> bool:
    """A run killed before it wrote its first checkpoint: `--resume` starts it again at step 0, in place
    (never one a live trainer holds: that resume is refused as usual)."""
    from gptrain.train.control import is_trainer_running

    return is_run_dir(run_dir) and not has_checkpoint(run_dir) and not is_trainer_running(run_dir)


def find_auto_resume(cfg: RunConfig) -> tuple[Path | None, bool]:
    """For `--resume auto`: (run to resume, None to start one; whether starting may replace cfg.run_dir).

    With --run-dir, that run if it holds a checkpoint; a run killed before its first checkpoint starts
    again in the same folder. Without it, the newest runs/<name>-<time> that holds a checkpoint.
    """
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if is_run_dir(run_dir) and has_checkpoint(run_dir):
            return run_dir, False
        return None, is_run_dir(run_dir)
    # Exactly <name>-YYYYmmdd-HHMMSS: the runs of "gpt2" are not those of "gpt2-124m-fineweb".
    own = re.compile(re.escape(cfg.name) + r"-\d{8}-\d{6}")
    candidates = sorted((p for p in Path("runs").glob(f"{cfg.name}-*") if own.fullmatch(p.name)),
                        key=lambda p: p.name, reverse=True)
    return next((p for p in candidates if is_run_dir(p) and has_checkpoint(p)), None), False
