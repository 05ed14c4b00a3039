"""Fake run directories written by hand, row by row, as the train loop and `gptrain eval` write them
(imported by the tests here: tests/metrics/ is on sys.path, as each test module's folder is)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from gptrain.config import RunConfig, to_toml

BATCH_TOKENS = 1024
VAL_TOKENS = 40_960
T0 = 1_700_000_000.0
MACHINE = {"hostname": "box1", "platform": "Linux-6.1-x86_64", "python": "3.12.1", "torch": "2.5.1",
           "gptrain": "0.1.0", "cpu": "AMD EPYC 7763 64-Core Processor", "num_cpus": 16, "device": "cuda",
           "gpu": "NVIDIA H100 80GB HBM3", "num_gpus": 1}


def launch_rows(first_step: int, last_step: int, t0: float, *, val_set: str = "val-aaaa",
                val_every: int = 5, is_done: bool = True, hellaswag_at: int | None = None) -> list[dict]:
    """One launch: layout and machine events (and a resume event), then train rows with val rows."""
    rows = [{"kind": "event", "step": first_step, "time": t0, "message": "run ...", "strategy": "single",
             "world_size": 1, "micro_batch": 8, "num_micro_steps": 1, "batch_tokens": BATCH_TOKENS,
             "num_parameters": 1_234_567, "dataset": "shakespeare-bpe2048-abcd", "val_set": val_set},
            {"kind": "event", "step": first_step, "time": t0 + 0.01, "message": "machine", "machine": MACHINE}]
    if first_step:
        rows.append({"kind": "event", "step": first_step, "time": t0 + 0.02,
                     "message": f"resumed from step {first_step}", "resumed_from": first_step})
    for step in range(first_step + 1, last_step + 1):
        t = t0 + 2.0 * (step - first_step)
        rows.append({"kind": "train", "step": step, "time": t, "loss": 5.0 / math.sqrt(step), "lr": 1e-3 * step / 20,
                     "grad_norm": 0.5, "tokens_per_second": 1000.0 + 10 * step, "mfu": 0.1, "mfu_basis": "H100 SXM",
                     "tokens_seen": step * BATCH_TOKENS, "epoch": 0, "eta_seconds": 1.0})
        if step % val_every == 0:
            val_loss = 4.0 / math.sqrt(step) + 0.123456
            row = {"kind": "val", "step": step, "time": t + 0.5, "tokens_seen": step * BATCH_TOKENS,
                   "scope": "sample", "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
                   "val_bpb": val_loss / 1.7, "val_num_tokens": VAL_TOKENS}
            if step == hellaswag_at:
                row |= {"hellaswag_acc": 0.26123, "hellaswag_acc_norm": 0.27456, "hellaswag_acc_norm_bytes": 0.28789,
                        "hellaswag_num_items": 1000}
            rows.append(row)
    t_end = t0 + 2.0 * (last_step - first_step) + 1.0
    rows.append({"kind": "sample", "step": last_step, "time": t_end, "text": f"KING.\nstep {last_step} | ``` odd"})
    if is_done:
        rows.append({"kind": "event", "step": last_step, "time": t_end + 1.0, "message": f"done: {last_step} steps"})
    return rows


EVAL_ROWS = [
    {"kind": "eval", "scope": "full", "time": T0 + 99, "step": 20, "checkpoint": "runs/x/checkpoints/final",
     "split": "val", "data": "shakespeare", "loss": 1.98765, "perplexity": math.exp(1.98765), "bpb": 1.23456,
     "num_tokens": 123_456},
    {"kind": "hellaswag", "time": T0 + 100, "step": 20, "checkpoint": "runs/x/checkpoints/final",
     "file": "hellaswag_val.jsonl", "limit": 0, "acc": 0.25111, "acc_norm": 0.29876, "acc_norm_bytes": 0.30123,
     "num_items": 10042, "num_unencodable": 2, "acc_scored": 0.25116, "acc_norm_scored": 0.29882,
     "acc_norm_bytes_scored": 0.30129},
]


def append_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_run(root: Path, name: str, rows: list[dict], eval_rows: list[dict] | None = None,
             config: RunConfig | None = None) -> Path:
    """A run directory under root holding exactly these rows (and config.toml, checkpoints/)."""
    run_dir = root / "runs" / name
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.toml").write_text(to_toml(config or RunConfig()), encoding="utf-8")
    (run_dir / "metrics.jsonl").touch()
    append_rows(run_dir / "metrics.jsonl", rows)
    if eval_rows:
        append_rows(run_dir / "eval.jsonl", eval_rows)
    return run_dir
