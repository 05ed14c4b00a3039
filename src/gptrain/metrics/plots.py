"""PNG plots of runs (loss and lr curves; val curves of several runs), for report cards and the dashboard.

matplotlib is imported inside the functions, so `import gptrain` stays light. Figures are made with
matplotlib.figure.Figure and rendered by Agg for PNG, never through pyplot: pyplot keeps global state
(the current figure, the chosen backend) that is not thread-safe in a web server and would change the
backend of a notebook that imports gptrain.
"""

from __future__ import annotations

from pathlib import Path

from gptrain.files import atomic_path
from gptrain.metrics.runs import RunRecord, is_number

FIGURE_DPI = 100
TRAIN_COLOR, VAL_COLOR, FULL_COLOR = "tab:blue", "tab:orange", "tab:green"
LR_COLOR, SPEED_COLOR = "tab:purple", "tab:gray"


def smooth(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's), its span about 1/50 of the series."""
    span = max(1, len(values) // 50)
    beta = 1.0 - 1.0 / span
    out, ema = [], 0.0
    for i, v in enumerate(values, start=1):
        ema = beta * ema + (1.0 - beta) * v
        out.append(ema / (1.0 - beta**i) if beta else v)
    return out


def points(rows: list[dict], xs: list[int | None], key: str) -> tuple[list[float], list[float]]:
    """(x, y) pairs where both are numbers (null losses and unknown token counts are left out)."""
    pairs = [(x, r.get(key)) for r, x in zip(rows, xs, strict=True) if is_number(x) and is_number(r.get(key))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def new_figure(num_rows: int, height_ratios: list[int]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3 + num_rows), dpi=FIGURE_DPI, layout="constrained")
    axes = fig.subplots(num_rows, 1, sharex=True, height_ratios=height_ratios, squeeze=False)[:, 0]
    return fig, list(axes)


def format_tokens_axis(ax) -> None:
    from matplotlib.ticker import EngFormatter

    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_xlabel("tokens seen")


def save_png(fig, out_png: Path) -> Path:
    """Write the figure to out_png atomically (files.atomic_path)."""
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        # No "Software" text chunk: the same rows give the same bytes whatever matplotlib version drew them.
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return out_png


def mark_empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color="grey")


def plot_run(record: RunRecord, out_png: Path) -> Path:
    """Train loss (raw, light, and smoothed) and val loss against tokens seen, with the lr and the
    throughput (tokens/s) below."""
    fig, (ax_loss, ax_lr, ax_speed) = new_figure(3, [3, 1, 1])
    train = record.train_rows
    train_tokens = record.tokens_of(train)
    x, loss = points(train, train_tokens, "loss")
    if x:
        ax_loss.plot(x, loss, color=TRAIN_COLOR, alpha=0.25, linewidth=0.8, label="train loss")
        ax_loss.plot(x, smooth(loss), color=TRAIN_COLOR, linewidth=1.5, label="train loss (smoothed)")
    val = record.val_rows
    vx, vy = points(val, record.tokens_of(val), "val_loss")
    if vx:
        ax_loss.plot(vx, vy, "o-", color=VAL_COLOR, markersize=3, linewidth=1.2, label="val loss (sampled)")
    full = record.full_evals
    fx, fy = points(full, record.tokens_of(full), "loss")
    if fx:
        ax_loss.plot(fx, fy, "s", color=FULL_COLOR, markersize=6, label="val loss (full split)")
    if x or vx or fx:
        ax_loss.legend(loc="upper right", fontsize="small")
    else:
        mark_empty(ax_loss, "no train or val rows yet")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(record.name, fontsize="medium")
    ax_loss.grid(alpha=0.3)
    lx, lr = points(train, train_tokens, "lr")
    if lx:
        ax_lr.plot(lx, lr, color=LR_COLOR, linewidth=1.2)
    ax_lr.set_ylabel("lr")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.grid(alpha=0.3)
    sx, speed = points(train, train_tokens, "tokens_per_second")
    if sx:
        ax_speed.plot(sx, speed, color=SPEED_COLOR, linewidth=1.0)
    ax_speed.set_ylabel("tokens/s")
    ax_speed.grid(alpha=0.3)
    format_tokens_axis(ax_speed)
    return save_png(fig, out_png)


def run_labels(records: list[RunRecord]) -> list[str]:
    """Each run's folder name; the whole path where two runs share a folder name."""
    names = [r.name for r in records]
    return [str(r.run_dir) if names.count(r.name) > 1 else r.name for r in records]


def plot_val_curves(records: list[RunRecord], out_png: Path) -> Path:
    """Val loss (sampled) of several runs against tokens seen, one line each, labelled by run."""
    fig, (ax,) = new_figure(1, [1])
    has_line = False
    for record, label in zip(records, run_labels(records), strict=True):
        val = record.val_rows
        x, y = points(val, record.tokens_of(val), "val_loss")
        if x:
            ax.plot(x, y, "o-", markersize=3, linewidth=1.2, label=label)
            has_line = True
    if has_line:
        ax.legend(loc="upper right", fontsize="small")
    else:
        mark_empty(ax, "no val rows yet")
    ax.set_ylabel("val loss (sampled)")
    ax.grid(alpha=0.3)
    format_tokens_axis(ax)
    return save_png(fig, out_png)
