"""Evaluating a trained checkpoint: find its run's val split (or prepare another corpus with its
tokenizer), score every token of a split, and record the results in the run's eval.jsonl."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from torch import nn

from gptrain.config import RunConfig
from gptrain.data.dataset import check_dataset_tokenizer, dataset_fingerprint, shard_paths
from gptrain.data.loader import ShardLoader
from gptrain.data.prepare import prepare_dataset
from gptrain.errors import UserError
from gptrain.eval.val_loss import evaluate_loss, full_split_windows
from gptrain.files import write_atomic
from gptrain.metrics.console import progress_callback
from gptrain.tokenizer import Tokenizer

EVAL_FILE = "eval.jsonl"  # in the run directory: one row per `gptrain eval` result


def find_eval_dataset(config: RunConfig, tokenizer: Tokenizer, state: dict, data: str | None = None,
                      log=print) -> Path:
    """The dataset folder to evaluate on: `data` prepared with the checkpoint's tokenizer, else the run's
    own (the folder its checkpoint names, from any working directory; else re-prepared from its corpus)."""
    if data is not None:
        other = replace(config.data, source=data, val_source="", data_dir="")
        try:
            folder = prepare_dataset(other, config.tokenizer, tokenizer=tokenizer, log=log)
        except UserError as e:
            if "character tokenizer's alphabet" not in str(e):
                raise
            raise UserError(f"{data} holds characters this character model never saw ({e}): a character model "
                            "is evaluated on text in its own alphabet (HellaSwag maps unseen ones to an unknown id)"
                            ) from None
    else:
        folder = Path(state.get("dataset_dir") or "")
        saved = state.get("loader", {}).get("fingerprint")
        if not (state.get("dataset_dir") and folder.is_dir() and dataset_fingerprint(folder) == saved):
            log(f"eval: the run's dataset {state.get('dataset_dir') or '(not recorded)'} is not there; preparing "
                f"{config.data.source!r} with the checkpoint's tokenizer")
            try:
                folder = prepare_dataset(config.data, config.tokenizer, tokenizer=tokenizer, log=log)
            except UserError as e:
                raise UserError(f"the run's dataset is not where it was and its corpus {config.data.source!r} "
                                f"cannot be prepared from here ({e}): pass --data NAME|PATH, or run from the "
                                "folder the run was started in") from None
    check_dataset_tokenizer(folder, tokenizer)
    return folder


def evaluate_split(model: nn.Module, tokenizer: Tokenizer, folder: Path, split: str, device: str, *,
                   batch_size: int, autocast=None, show_progress: bool | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte over every token of a split (but each shard's first)."""
    loader = ShardLoader(shard_paths(folder, split), batch_size=batch_size, block_size=model.config.block_size,
                         shuffle=False, split=split)
    windows = full_split_windows(loader)
    is_shown = sys.stderr.isatty() if show_progress is None else show_progress
    label = f"{split} split ({loader.num_tokens:,} tokens)"
    with progress_callback(is_shown, label) as on_forward:
        metrics = evaluate_loss(model, loader, windows, device, byte_lengths=tokenizer.byte_lengths(),
                                eot_id=tokenizer.eot_id, autocast=autocast,
                                on_batch=on_forward and (lambda done: on_forward(done, len(windows))))
    return {"loss": metrics["val_loss"], "perplexity": metrics["val_perplexity"], "bpb": metrics["val_bpb"],
            "num_tokens": metrics["val_num_tokens"]}


def run_dir_of(checkpoint_dir: Path) -> Path | None:
    """The run directory a checkpoint folder sits in (<run>/checkpoints/<name>), if any."""
    run = checkpoint_dir.resolve().parent.parent
    return run if checkpoint_dir.resolve().parent.name == "checkpoints" and (run / "config.toml").is_file() else None


def record_evals(checkpoint_dir: Path, rows: list[dict], json_path: Path | None = None) -> Path | None:
    """Append rows to the run's eval.jsonl (returned; None outside a run), then write them to json_path
    as one object keyed by kind (written whole: files.write_atomic)."""
    clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
    run_dir = run_dir_of(checkpoint_dir)
    if run_dir is not None:
        with open(run_dir / EVAL_FILE, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in clean))
    if json_path is not None:
        write_atomic(json_path, json.dumps({r["kind"]: r for r in clean}, indent=1) + "\n")
    return None if run_dir is None else run_dir / EVAL_FILE


def eval_row(kind: str, checkpoint_dir: Path, step: int, metrics: dict, **context) -> dict:
    """An eval.jsonl row: what was measured, on which checkpoint, when."""
    return {"kind": kind, "time": time.time(), "step": step, "checkpoint": str(checkpoint_dir.resolve()),
            **context, **metrics}
