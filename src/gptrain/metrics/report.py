"""write_report(): a run's report card (report.md and loss.png), regenerated from its run directory alone.

Figures are formatted one way everywhere, so a test (or a person) can check them against the rows:
losses and bits per byte to 4 decimals, perplexities to 2, accuracies as percent to 2, counts with commas.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from gptrain.files import write_atomic
from gptrain.metrics.console import format_seconds
from gptrain.metrics.plots import plot_run
from gptrain.metrics.runs import RunRecord, is_number, read_run

REPORT_NAME, PLOT_NAME = "report.md", "loss.png"


def fmt_loss(x: float | None) -> str:
    return f"{x:.4f}" if is_number(x) else "-"


def fmt_ppl(x: float | None) -> str:
    return f"{x:,.2f}" if is_number(x) else "-"


def fmt_pct(x: float | None) -> str:
    return f"{100 * x:.2f}%" if is_number(x) else "-"


def fmt_int(x: int | None) -> str:
    return f"{int(x):,}" if is_number(x) else "-"


def fmt_duration(seconds: float) -> str:
    return f"{format_seconds(seconds)} ({seconds:,.0f} s)"


def cell(value: object) -> str:
    """A markdown table cell: pipes escaped, on one line."""
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def fenced(text: str) -> list[str]:
    """A code block whose fence is longer than any run of backticks in the text."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def header_section(record: RunRecord) -> list[str]:
    status = "finished" if record.is_done else f"not finished (last step {record.num_steps:,})"
    lines = [f"# Report card: {record.name}", "",
             f"Run directory `{record.run_dir}`, {status}. Regenerated from the run directory's files alone "
             "(config.toml, metrics.jsonl, eval.jsonl)."]
    if record.num_unreadable_lines:
        lines.append(f"{record.num_unreadable_lines} unreadable line(s) in metrics.jsonl or eval.jsonl were skipped.")
    return lines


def machine_section(record: RunRecord) -> list[str]:
    m = record.machine
    if m is None:
        return ["## Machine", "", "No machine event row in metrics.jsonl (a run from before gptrain recorded one)."]
    gpu = f"{m.get('num_gpus', 1)} x {m['gpu']}" if m.get("gpu") else "none"
    rows = [["host", m.get("hostname", "-")], ["CPU", f"{m.get('cpu', '-')} ({m.get('num_cpus', '-')} CPUs)"],
            ["GPU", gpu], ["device", m.get("device", "-")], ["torch", m.get("torch", "-")],
            ["python", m.get("python", "-")], ["platform", m.get("platform", "-")],
            ["gptrain", m.get("gptrain", "-")]]
    lines = ["## Machine", "", *table(["item", "value"], rows)]
    others = {(o.get("hostname"), o.get("gpu")) for o in
              (r["machine"] for r in record.event_rows if isinstance(r.get("machine"), dict))} - {
        (m.get("hostname"), m.get("gpu"))}
    if others:
        seen = ", ".join(sorted(f"{h} ({g or 'no GPU'})" for h, g in others))
        lines += ["", f"Earlier launches of this run ran elsewhere: {seen}."]
    return lines


def model_section(record: RunRecord) -> list[str]:
    cfg = record.config
    model, tok, data = cfg.model, cfg.tokenizer, cfg.data
    rows = [["parameters", fmt_int(record.num_parameters)], ["preset", cfg.preset or "-"],
            ["n_layer", model.n_layer], ["n_head", model.n_head], ["n_embd", model.n_embd],
            ["block_size", model.block_size], ["vocab_size", fmt_int(model.vocab_size or None)],
            ["tied embeddings", "yes" if model.tie_weights else "no"], ["dropout", model.dropout],
            ["tokenizer", tok.kind + (f" ({tok.vocab_size:,} trained)" if tok.kind == "bpe" else "")],
            ["data", data.source], ["val data", data.val_source or f"held out from data ({data.val_fraction:g})"]]
    layout = record.layout or {}
    if layout.get("dataset"):
        rows.append(["dataset fingerprint", layout["dataset"]])
    if layout.get("val_set"):
        rows.append(["val set id", layout["val_set"]])
    return ["## Model and data", "", *table(["item", "value"], rows)]


def training_section(record: RunRecord) -> list[str]:
    rows = [["steps", fmt_int(record.num_steps)], ["tokens seen", fmt_int(record.tokens_seen)]]
    layout = record.layout
    if layout:
        rows.append(["batch", f"{fmt_int(layout.get('batch_tokens'))} tokens per step (micro batch "
                              f"{layout.get('micro_batch')} x {layout.get('num_micro_steps')} accumulation steps, "
                              f"{layout.get('strategy')} on {layout.get('world_size')} rank(s))"])
        if layout.get("precision"):
            rows.append(["precision", "bf16 autocast (fp32 weights)" if layout["precision"] == "bf16" else "fp32"])
    rows.append(["wall time", f"{fmt_duration(record.wall_seconds)} over {record.num_launches} launch(es)"])
    if record.step_seconds is not None:
        rows.append(["time in steps", fmt_duration(record.step_seconds)])
    tps = record.tokens_per_second
    rows.append(["throughput", f"{tps:,.0f} tokens/s (median of train rows)" if tps is not None else "-"])
    if record.mfu is not None:
        basis = next((r.get("mfu_basis") for r in reversed(record.train_rows) if r.get("mfu_basis")), None)
        of = f" of the {layout['precision']} peak" if layout and layout.get("precision") else ""
        rows.append(["MFU", fmt_pct(record.mfu) + (f" (peak: {basis}{of})" if basis else "")])
    return ["## Training", "", *table(["item", "value"], rows)]


def sampled_label(row: dict) -> str:
    return f"sampled val ({fmt_int(row.get('val_num_tokens'))} tokens)"


def val_section(record: RunRecord) -> list[str]:
    final, best, best_bpb = record.final_val, record.best_val, record.best_bpb
    if final is None:
        return ["## Validation", "", "No val rows yet."]
    rows = []
    for which, row in (("final", final), ("best", best)):
        ppl = row.get("val_perplexity") if is_number(row.get("val_perplexity")) else math.exp(min(row["val_loss"], 700))
        rows += [[f"{which} val loss", fmt_loss(row["val_loss"]), sampled_label(row), row["step"]],
                 [f"{which} val perplexity", fmt_ppl(ppl), sampled_label(row), row["step"]]]
        bpb_row = final if which == "final" else best_bpb
        if bpb_row is not None and is_number(bpb_row.get("val_bpb")):
            rows.append([f"{which} val bits per byte", fmt_loss(bpb_row["val_bpb"]), sampled_label(bpb_row),
                         bpb_row["step"]])
    return ["## Validation", "", *table(["figure", "value", "measured on", "step"], rows)]


def full_eval_section(record: RunRecord) -> list[str]:
    evals = record.full_evals
    if not evals:
        return []
    rows = [[Path(str(r.get("checkpoint", "-"))).name, r.get("step", "-"), r.get("split", "-"), r.get("data", "-"),
             fmt_int(r.get("num_tokens")), fmt_loss(r["loss"]), fmt_ppl(r.get("perplexity")), fmt_loss(r.get("bpb"))]
            for r in evals]
    header = ["checkpoint", "step", "split", "data", "tokens", "loss", "perplexity", "bits per byte"]
    return ["## Full val split (gptrain eval)", "", *table(header, rows)]


def hellaswag_section(record: RunRecord) -> list[str]:
    rows = []
    during = record.last_hellaswag
    if during is not None:
        rows.append(["during training", during["step"], fmt_int(during.get("hellaswag_num_items")),
                     fmt_pct(during.get("hellaswag_acc")), fmt_pct(during.get("hellaswag_acc_norm")),
                     fmt_pct(during.get("hellaswag_acc_norm_bytes"))])
    evaluated = record.last_hellaswag_eval
    if evaluated is not None:
        r = evaluated
        rows.append([f"gptrain eval ({Path(str(r.get('checkpoint', '-'))).name})", r.get("step", "-"),
                     fmt_int(r.get("num_items")), fmt_pct(r.get("acc")), fmt_pct(r["acc_norm"]),
                     fmt_pct(r.get("acc_norm_bytes"))])
        num_unencodable = r.get("num_unencodable") or 0
        if num_unencodable and is_number(r.get("num_items")):
            rows.append([f"gptrain eval, scored items only ({num_unencodable:,} unencodable left out)",
                         r.get("step", "-"), fmt_int(r["num_items"] - num_unencodable), fmt_pct(r.get("acc_scored")),
                         fmt_pct(r.get("acc_norm_scored")), fmt_pct(r.get("acc_norm_bytes_scored"))])
    if not rows:
        return []
    header = ["when", "step", "items", "acc", "acc_norm", "acc_norm (bytes)"]
    return ["## HellaSwag", "", *table(header, rows)]


def sample_section(record: RunRecord) -> list[str]:
    latest = record.latest_sample
    if latest is None:
        return []
    step, text = latest
    title = f"## Latest sample (step {step})" if step is not None else "## Latest sample"
    return [title, "", *fenced(text)]


def render_report(record: RunRecord, plot_name: str = PLOT_NAME) -> str:
    """The report card's markdown text."""
    sections = [header_section(record), machine_section(record), model_section(record),
                training_section(record), val_section(record), full_eval_section(record),
                hellaswag_section(record), ["## Loss curve", "", f"![loss]({plot_name})"], sample_section(record)]
    return "\n\n".join("\n".join(s) for s in sections if s) + "\n"


def write_report(run_dir: Path) -> Path:
    """Write <run_dir>/report.md and <run_dir>/loss.png from the run directory's files; returns report.md."""
    record = read_run(Path(run_dir))
    plot_run(record, record.run_dir / PLOT_NAME)
    path = record.run_dir / REPORT_NAME
    write_atomic(path, render_report(record))
    return path
