"""compare_runs(): several runs side by side (a text table, warnings when they do not compare, val curves)."""

from __future__ import annotations

from pathlib import Path

from gptrain.errors import UserError
from gptrain.metrics.console import format_seconds
from gptrain.metrics.plots import plot_val_curves, run_labels
from gptrain.metrics.report import fmt_int, fmt_loss, fmt_pct
from gptrain.metrics.runs import RunRecord, read_run

COLUMNS = ["run", "steps", "tokens", "best val loss", "bpb", "hellaswag acc_norm", "wall time"]


def hellaswag_cell(record: RunRecord) -> str:
    """acc_norm with its item count: gptrain eval's latest if any, else the last one during training."""
    evaluated, during = record.last_hellaswag_eval, record.last_hellaswag
    if evaluated is not None:
        return f"{fmt_pct(evaluated['acc_norm'])} (n={fmt_int(evaluated.get('num_items'))})"
    if during is not None:
        return f"{fmt_pct(during['hellaswag_acc_norm'])} (n={fmt_int(during.get('hellaswag_num_items'))})"
    return "-"


def table_row(record: RunRecord, label: str) -> list[str]:
    best, best_bpb = record.best_val, record.best_bpb
    return [label, fmt_int(record.num_steps), fmt_int(record.tokens_seen),
            fmt_loss(best["val_loss"]) if best else "-", fmt_loss(best_bpb["val_bpb"]) if best_bpb else "-",
            hellaswag_cell(record), format_seconds(record.wall_seconds)]


def format_table(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the run name left-aligned, figures right-aligned."""
    widths = [max(len(r[i]) for r in [COLUMNS, *rows]) for i in range(len(COLUMNS))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                               strict=True)))

    return [line(COLUMNS), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def val_set_warnings(records: list[RunRecord], labels: list[str]) -> list[str]:
    """Lines warning that some runs' val losses were measured on different tokens (and noting unknowns)."""
    lines = []
    for record, label in zip(records, labels, strict=True):
        if len(record.val_sets) > 1:
            lines.append(f"warning: run {label} changed val set at a resume ({', '.join(record.val_sets)}): "
                         "its val curve mixes losses on different tokens")
    known = {label: r.val_sets[-1] for r, label in zip(records, labels, strict=True) if r.val_sets}
    if len(set(known.values())) > 1:
        groups: dict[str, list[str]] = {}
        for label, val_set in known.items():
            groups.setdefault(val_set, []).append(label)
        detail = "; ".join(f"{', '.join(names)}: {val_set}" for val_set, names in groups.items())
        lines.append(f"warning: runs {', '.join(known)} were validated on different tokens (val sets differ: "
                     f"{detail}): their val losses do not compare directly")
    unknown = [label for r, label in zip(records, labels, strict=True) if not r.val_sets]
    if unknown and len(records) > 1:
        lines.append(f"note: run(s) {', '.join(unknown)} record no val set id: whether they were validated on the "
                     "same tokens cannot be checked")
    return lines


def tokenizer_notes(records: list[RunRecord], labels: list[str]) -> list[str]:
    """A note when the runs' tokenizers differ: a loss per token then means different things."""
    kinds = {label: f"{r.config.tokenizer.kind} {fmt_int(r.config.model.vocab_size or None)}"
             for r, label in zip(records, labels, strict=True)}
    if len(set(kinds.values())) <= 1:
        return []
    detail = ", ".join(f"{label}: {kind}" for label, kind in kinds.items())
    return [f"note: the runs use different tokenizers ({detail}): compare bits per byte, not loss"]


def compare_runs(run_dirs: list[Path], out_png: Path | None = None) -> str:
    """A table of the runs (one line each), warnings where they do not compare, and their val curves in out_png."""
    if not run_dirs:
        raise UserError("give at least one run directory to compare (runs/<name>-<time>)")
    records = [read_run(Path(d)) for d in run_dirs]
    labels = run_labels(records)
    lines = format_table([table_row(r, label) for r, label in zip(records, labels, strict=True)])
    lines += val_set_warnings(records, labels) + tokenizer_notes(records, labels)
    if out_png is not None:
        plot_val_curves(records, Path(out_png))
        lines.append(f"val curves: {out_png}")
    return "\n".join(lines)
