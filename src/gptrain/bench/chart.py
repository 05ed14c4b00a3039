"""A PNG bar chart of a benchmark result: seconds per phase (forward, backward, optimizer, whole step)
for each run timed (gptrain, the plain PyTorch reference, llm.c).

matplotlib is imported inside the function, so importing this module stays light; the figure is drawn
with matplotlib.figure.Figure and Agg, never pyplot (see metrics/plots.py for why).
"""

from __future__ import annotations

import math
from pathlib import Path

from gptrain.files import atomic_path

FIGURE_DPI = 100
PHASES = ("forward", "backward", "optimizer", "step")  # result key: f"{phase}_s"
RUN_LABELS = {"gptrain": "gptrain", "reference": "plain PyTorch (reference)", "llmc": "llm.c train_gpt2"}
RUN_COLORS = {"gptrain": "tab:blue", "reference": "tab:orange", "llmc": "tab:green"}
OTHER_COLORS = ("tab:purple", "tab:brown", "tab:gray", "tab:olive")
RATIO_LABELS = {"step_time_ratio": "step time gptrain/reference", "matmul_limit_fraction": "fraction of matmul limit"}
GROUP_WIDTH = 0.8  # of the 1.0 between phase groups, the part the bars fill


def is_number(value) -> bool:
    """A finite int or float (bool, None, nan and strings are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def format_seconds(seconds: float) -> str:
    """'850 ms' below one second, '1.23 s' above."""
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def run_label(name: str, run: dict) -> str:
    """The legend entry: the run's name and, when known, its throughput."""
    label = RUN_LABELS.get(name, name)
    tokens_per_s = run.get("tokens_per_s")
    return f"{label} ({tokens_per_s:,.0f} tok/s)" if is_number(tokens_per_s) else label


def subtitle(result: dict) -> str:
    """The ratios the result has, joined: 'step time gptrain/reference 0.80 · fraction of matmul limit 0.70'."""
    parts = [f"{label} {result[key]:.2f}" for key, label in RATIO_LABELS.items() if is_number(result.get(key))]
    return " · ".join(parts)


def phase_bars(runs: dict[str, dict]) -> list[tuple[int, str, list[tuple[str, float]]]]:
    """For each phase some run has: (its group index, the phase, [(run name, seconds)...])."""
    groups = []
    for phase in PHASES:
        bars = [(name, run[f"{phase}_s"]) for name, run in runs.items() if is_number(run.get(f"{phase}_s"))]
        if bars:
            groups.append((len(groups), phase, bars))
    return groups


def draw_bars(ax, runs: dict[str, dict]) -> None:
    """Grouped bars, one group per phase, each run's bar in its own colour and labelled with its value."""
    colors = {name: RUN_COLORS.get(name) or OTHER_COLORS[i % len(OTHER_COLORS)] for i, name in enumerate(runs)}
    groups = phase_bars(runs)
    is_labelled = set()
    for x, _, bars in groups:
        width = GROUP_WIDTH / len(bars)
        for i, (name, seconds) in enumerate(bars):
            offset = (i - (len(bars) - 1) / 2) * width
            label = run_label(name, runs[name]) if name not in is_labelled else None
            is_labelled.add(name)
            drawn = ax.bar(x + offset, seconds, width, color=colors[name], label=label)
            ax.bar_label(drawn, labels=[format_seconds(seconds)], fontsize="x-small", padding=2)
    ax.set_xticks([x for x, _, _ in groups], [phase for _, phase, _ in groups])
    if groups:
        ax.legend(loc="upper left", fontsize="small")
        ax.margins(y=0.12)  # room for the value labels above the tallest bar
    else:
        ax.text(0.5, 0.5, "no timings", transform=ax.transAxes, ha="center", va="center", color="grey")


def write_bench_chart(result: dict, path: Path) -> Path:
    """Draw the result's runs as grouped bars of seconds per phase into a PNG at path (written atomically).

    result: {"title": str, "runs": {name: {"forward_s", "backward_s", "optimizer_s", "step_s",
    "tokens_per_s"}}, "step_time_ratio": float, "matmul_limit_fraction": float}; any run, phase or
    ratio may be missing.
    """
    from matplotlib.figure import Figure

    runs = {name: run for name, run in (result.get("runs") or {}).items() if isinstance(run, dict)}
    fig = Figure(figsize=(8, 4.5), dpi=FIGURE_DPI, layout="constrained")
    ax = fig.subplots()
    draw_bars(ax, runs)
    ax.set_ylabel("seconds")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(result.get("title") or "benchmark", fontsize="medium")
    if ratios := subtitle(result):
        ax.set_title(ratios, fontsize="small", color="dimgray")
    path = Path(path)
    with atomic_path(path) as tmp:
        # No "Software" text chunk: the same result gives the same bytes whatever matplotlib drew it.
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return path
