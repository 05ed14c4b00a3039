"""Optional metric sinks: TensorBoard event files and Weights & Biases runs, each behind its extra and
imported only when switched on (log.tensorboard, log.wandb_project). Rank 0 builds them (run_log.py)."""

from __future__ import annotations

import html
import importlib
import importlib.util
import secrets
import sys
from pathlib import Path

from gptrain.errors import UserError
from gptrain.files import write_atomic
from gptrain.metrics.console import LogConfig

SCALAR_KINDS = ("train", "val", "system")
WANDB_ID_FILE = "wandb_id"  # in the run directory: every launch of the run logs to this W&B run


def check_extras(log: LogConfig) -> None:
    """Before the run directory is made: a sink switched on whose package is not installed is a UserError."""
    if log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise missing_extra("log.tensorboard", "tensorboard")
    if log.wandb_project and importlib.util.find_spec("wandb") is None:
        raise missing_extra("log.wandb_project", "wandb")


def missing_extra(option: str, extra: str) -> UserError:
    return UserError(f"{option} needs its extra: pip install 'gptrain[{extra}]'")


def import_extra(module: str, option: str, extra: str):
    """The module, or a UserError naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(option, extra) from None


def scalars(row: dict) -> dict[str, float]:
    """A train, val or system row's figures as `<kind>/<name>` (val rows drop the val_ prefix: val/loss);
    text, flags and missing figures (None) are left out. Other kinds of row have none."""
    kind = row["kind"]
    if kind not in SCALAR_KINDS:
        return {}
    out = {}
    for key, value in row.items():
        if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[f"{kind}/{key.removeprefix('val_') if kind == 'val' else key}"] = float(value)
    return out


class TensorBoardSink:
    """<run_dir>/tensorboard: scalars by kind, samples and events as text (torch's SummaryWriter)."""

    def __init__(self, log_dir: Path, resumed_step: int) -> None:
        tensorboard = import_extra("torch.utils.tensorboard", "log.tensorboard", "tensorboard")
        # purge_step writes a restart marker: readers drop whatever earlier files hold from that step on,
        # i.e. the steps a crashed launch got past its checkpoint, which this launch redoes. The first
        # launch writes one too, since TensorBoard takes a run's first marker as its start, not a restart.
        self._writer = tensorboard.SummaryWriter(str(log_dir), purge_step=resumed_step + 1, flush_secs=10)

    def emit(self, row: dict) -> None:
        kind, step = row["kind"], row["step"]
        if kind == "sample":  # indented: markdown shows it as written (line breaks, no emphasis)
            self._writer.add_text("samples", "".join(f"    {line}\n" for line in row["text"].split("\n")), step,
                                  walltime=row["time"])
        elif kind == "event":
            self._writer.add_text("events", row["message"], step, walltime=row["time"])
        for tag, value in scalars(row).items():
            self._writer.add_scalar(tag, value, step, walltime=row["time"])

    def close(self) -> None:
        self._writer.close()


def saved_run_id(run_dir: Path) -> str:
    """The run directory's W&B run id: made and written at the first launch, read back by every resume.
    A file, not TrainState: it belongs to the folder (a copy of a checkpoint into another run gets its own)."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_id = secrets.token_hex(4)  # 8 characters from [0-9a-f], like the ids W&B makes
    write_atomic(path, run_id + "\n")
    return run_id


class WandbSink:
    """One W&B run per run directory; a resume continues it. The mode is W&B's own (WANDB_MODE: online,
    offline; `wandb sync` uploads an offline run), the entity WANDB_ENTITY's."""

    def __init__(self, run_dir: Path, project: str, config: dict) -> None:
        wandb = import_extra("wandb", "log.wandb_project", "wandb")
        self._html = wandb.Html
        try:
            # console="off": the terminal is not uploaded (it may show a dashboard URL with its token). W&B
            # gets the run's config and its own machine metadata; no environment variables.
            self._run = wandb.init(project=project, dir=str(run_dir), id=saved_run_id(run_dir),
                                   resume="allow", name=run_dir.name, config=config, save_code=False,
                                   settings=wandb.Settings(console="off"))
        except wandb.Error as e:
            reason = next(iter(str(e).splitlines()), type(e).__name__)  # a user error is one line
            raise UserError(f"W&B did not start ({reason}): run `wandb login`, or set WANDB_MODE=offline") from None
        # A resumed W&B run takes only steps after the last one it holds (its history only grows): the
        # steps a resume redoes keep the values W&B was sent first, instead of a warning per row.
        # Offline, each launch is its own file that `wandb sync` joins; the step W&B reports for it depends on
        # what the earlier launch's files held when this one started, so every row is sent (no skipping).
        self._first_step = 0 if self._run.offline else self._run.step

    def emit(self, row: dict) -> None:
        kind, step = row["kind"], row["step"]
        if step < self._first_step:
            return
        data = scalars(row)
        if kind == "sample":
            data["samples/text"] = self._html(f"<pre>{html.escape(row['text'])}</pre>", inject=False)
        if data:  # rows of one step (train, system, val, sample) are merged into W&B's one record of it
            self._run.log(data, step=step)

    def close(self) -> None:
        # Called from the loop's finally: while an exception propagates, the W&B run is marked failed.
        self._run.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
