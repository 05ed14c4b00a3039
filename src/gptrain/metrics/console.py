"""The terminal: a live view (progress, loss/lr/throughput, ETA, loss plot) or plain log lines."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from gptrain.errors import UserError

LIVE_MODES = ("auto", "on", "off")
SPARK = "▁▂▃▄▅▆▇█"


@dataclass(kw_only=True)
class LogConfig:
    live: str = "auto"  # auto: the live view on an interactive terminal, plain lines otherwise
    is_quiet: bool = False  # only warnings, errors and the final summary
    tensorboard: bool = False  # also write <run_dir>/tensorboard event files (the tensorboard extra)
    wandb_project: str = ""  # also log to this W&B project (the wandb extra); WANDB_MODE=offline needs no account

    def __post_init__(self) -> None:
        if self.live not in LIVE_MODES:
            raise UserError(f"log.live must be one of {', '.join(LIVE_MODES)} (got {self.live!r})")
        if any(c in self.wandb_project for c in "/\\#?%:") or len(self.wandb_project) > 128:
            raise UserError(f"log.wandb_project must be a W&B project name: at most 128 characters, none of "
                            f"/ \\ # ? % : (got {self.wandb_project!r})")


@contextlib.contextmanager
def progress_callback(is_shown: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A callback(done, total) drawing a transient progress bar on the terminal; None when not shown."""
    if not is_shown:
        yield None
        return
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def sparkline(values: list[float], width: int = 60) -> str:
    """The whole series in at most `width` characters (bucket means), low ▁ to high █."""
    if not values:
        return ""
    if len(values) > width:
        edges = [len(values) * i // width for i in range(width + 1)]
        values = [sum(values[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


def describe_train(row: dict, num_steps: int) -> str:
    """One line for a train row; num_steps 0: not planned yet (a --budget run's first steps)."""
    total = str(num_steps) if num_steps else "?"
    parts = [f"step {row['step']:>{len(total)}}/{total}", f"loss {row['loss']:.4f}",
             f"lr {row['lr']:.2e}", f"norm {row['grad_norm']:.2f}", f"{row['tokens_per_second']:,.0f} tok/s"]
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    parts.append(f"ETA {format_seconds(row['eta_seconds'])}" if num_steps else "ETA ?")
    return " | ".join(parts)


def describe_val(row: dict) -> str:
    """One line for a val row: loss, perplexity, bits per byte, and HellaSwag when it ran."""
    text = f"step {row['step']} | val loss {row['val_loss']:.4f} | val ppl {row['val_perplexity']:.2f}"
    if isinstance(row.get("val_bpb"), float):
        text += f" | {row['val_bpb']:.4f} bits/byte"
    if isinstance(row.get("hellaswag_acc_norm"), float):
        text += f" | HellaSwag acc_norm {100 * row['hellaswag_acc_norm']:.2f}% ({row['hellaswag_num_items']} items)"
    return text


class PlainConsoleSink:
    """One line per log interval: good for CI logs, pipes and files (stream: stdout, else a file it closes)."""

    def __init__(self, num_steps: int, log_every_steps: int, is_quiet: bool = False, stream: TextIO | None = None):
        self.num_steps, self.every, self.is_quiet = num_steps, log_every_steps, is_quiet
        self._stream = stream

    def emit(self, row: dict) -> None:
        if "budget_plan" in row:  # a --budget run's length, fixed after its first steps
            self.num_steps = row["budget_plan"]["num_steps"]
        if self.is_quiet:
            return
        kind = row["kind"]
        if kind == "train" and (row["step"] % self.every == 0 or row["step"] in (1, self.num_steps)):
            self._print(describe_train(row, self.num_steps))
        elif kind == "val":
            self._print(describe_val(row))
        elif kind == "sample":
            self._print(f"--- sample at step {row['step']} ---\n{row['text']}\n---")
        elif kind == "event":
            self._print(row["message"])

    def _print(self, text: str) -> None:
        print(text, file=self._stream or sys.stdout, flush=True)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()


def log_file_sink(path: Path, num_steps: int, log_every_steps: int) -> PlainConsoleSink:
    """train.log: the plain console's lines, each prefixed with its time, appended across launches."""
    return PlainConsoleSink(num_steps, log_every_steps, stream=_TimestampedFile(path))


class _TimestampedFile:
    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", encoding="utf-8")

    def write(self, text: str) -> None:
        if text.strip():
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            text = "".join(f"{stamp} {line}\n" for line in text.rstrip("\n").split("\n"))
            self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class LiveConsoleSink:
    """A rich live panel redrawn a few times a second; samples and events scroll above it."""

    def __init__(self, num_steps: int, title: str) -> None:
        from rich.console import Console
        from rich.live import Live

        self.num_steps, self.title = num_steps, title
        self.losses: list[float] = []
        self.last_train: dict | None = None
        self.last_val: dict | None = None
        self.is_paused = False  # from the control commands' event rows
        self.console = Console()
        self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def _render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        row = self.last_train
        step = row["step"] if row else 0
        filled = int(40 * step / self.num_steps) if self.num_steps else 0
        progress = Text.assemble(("━" * filled, "green"), ("━" * (40 - filled), "grey37"),
                                 f" {step}/{self.num_steps or '?'}"
                                 + (f" ({100 * step / self.num_steps:.0f}%)" if self.num_steps else ""))
        if self.is_paused:
            progress.append("  PAUSED (resume: gptrain control RUN_DIR resume)", style="bold yellow")
        elif row and self.num_steps:
            progress.append(f"  ETA {format_seconds(row['eta_seconds'])}")
        lines = [progress]
        if row:
            mfu = f" | mfu {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else ""
            lines.append(Text(f"loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad norm {row['grad_norm']:.2f} | "
                              f"{row['tokens_per_second']:,.0f} tok/s{mfu}"))
        if self.last_val:
            lines.append(Text(f"val loss {self.last_val['val_loss']:.4f} | val ppl "
                              f"{self.last_val['val_perplexity']:.2f} (step {self.last_val['step']})"))
        if self.losses:
            lines.append(Text(f"loss {sparkline(list(self.losses))} {min(self.losses):.3f}..{max(self.losses):.3f}",
                              style="cyan"))
        return Panel(Group(*lines), title=self.title, expand=False)

    def emit(self, row: dict) -> None:
        kind = row["kind"]
        if "budget_plan" in row:
            self.num_steps = row["budget_plan"]["num_steps"]
        if kind == "train":
            self.last_train = row
            self.losses.append(row["loss"])
        elif kind == "val":
            self.last_val = row
        elif kind == "sample":
            from rich.text import Text

            self.console.print(Text.assemble((f"sample at step {row['step']}", "bold"), f"\n{row['text']}\n"))
        elif kind == "event":
            if row.get("command") in ("pause", "resume", "stop"):
                self.is_paused = row["command"] == "pause"
            self.console.print(row["message"], markup=False, highlight=False)
        self.live.update(self._render())

    def close(self) -> None:
        self.live.update(self._render())
        self.live.stop()


def build_console_sink(cfg: LogConfig, num_steps: int, log_every_steps: int, title: str):
    is_live = cfg.live == "on" or (cfg.live == "auto" and sys.stdout.isatty() and not cfg.is_quiet)
    if is_live:
        return LiveConsoleSink(num_steps, title)
    return PlainConsoleSink(num_steps, log_every_steps, cfg.is_quiet)

