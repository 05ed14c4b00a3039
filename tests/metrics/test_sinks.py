import csv
import io
import json
import math

from rich.console import Console

from gptrain.metrics.console import PlainConsoleSink, sparkline
from gptrain.metrics.sinks import CsvSink, JsonlSink, SamplesSink


def test_jsonl_is_strict_json_and_csv_has_the_contract_columns(tmp_path):
    rows = [
        {"kind": "train", "step": 1, "time": 1.0, "loss": float("nan"), "lr": 1e-3, "grad_norm": float("inf")},
        {"kind": "val", "step": 1, "time": 2.0, "val_loss": 2.0, "val_perplexity": math.exp(2.0)},
        {"kind": "sample", "step": 1, "time": 3.0, "text": "KING.\\nHo"},
        {"kind": "event", "step": 1, "time": 4.0, "message": "hello"},
    ]
    sinks = [JsonlSink(tmp_path / "m.jsonl"), CsvSink(tmp_path / "m.csv"), SamplesSink(tmp_path / "s.txt")]
    for row in rows:
        for sink in sinks:
            sink.emit(row)
    for sink in sinks:
        sink.close()
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    parsed = [json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c))) for line in lines]
    assert parsed[0]["loss"] is None and parsed[0]["grad_norm"] is None and len(parsed) == 4
    with open(tmp_path / "m.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["step", "lr", "train_loss", "val_loss", "train_perplexity", "val_perplexity",
                              "sample", "timestamp", "val_bpb", "hellaswag_acc", "hellaswag_acc_norm"]
    assert [r["val_loss"] for r in table] == ["", "2.0", ""] and table[2]["sample"] == "KING.\\nHo"
    assert (tmp_path / "s.txt").read_text().startswith("=== step 1 ===\nKING.")


def test_csv_of_a_resumed_older_run_keeps_its_columns(tmp_path):
    old = ["step", "lr", "train_loss", "val_loss", "train_perplexity", "val_perplexity", "sample", "timestamp"]
    (tmp_path / "m.csv").write_text(",".join(old) + "\n")
    sink = CsvSink(tmp_path / "m.csv")
    sink.emit({"kind": "val", "step": 2, "time": 5.0, "val_loss": 1.5, "val_perplexity": 4.5, "val_bpb": 2.0})
    sink.close()
    with open(tmp_path / "m.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == old and table[0]["val_loss"] == "1.5" and None not in table[0]


def test_plain_console_prints_at_the_log_interval(capsys):
    sink = PlainConsoleSink(num_steps=20, log_every_steps=10)
    for step in range(1, 21):
        sink.emit({"kind": "train", "step": step, "time": 0.0, "loss": 1.0, "lr": 1e-3, "grad_norm": 0.5,
                   "tokens_per_second": 1000.0, "mfu": None, "eta_seconds": 65.0})
    out = capsys.readouterr().out.splitlines()
    assert [line.split("|")[0].strip() for line in out] == ["step  1/20", "step 10/20", "step 20/20"]
    assert "ETA 1m05s" in out[0]


def test_sparkline_spans_the_range():
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"


def test_sparkline_summarises_long_series_into_its_width():
    line = sparkline([float(100 - i) for i in range(1000)], width=50)
    assert len(line) == 50 and line[0] == "█" and line[-1] == "▁"


def test_live_view_shows_a_paused_run_until_it_resumes():
    from gptrain.metrics.console import LiveConsoleSink

    sink = LiveConsoleSink(num_steps=10, title="t")

    def shown() -> str:
        screen = Console(file=io.StringIO(), width=120)
        screen.print(sink._render())
        return screen.file.getvalue()

    train = {"kind": "train", "step": 3, "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 100.0,
             "eta_seconds": 60.0}
    sink.emit(train)
    assert "ETA" in shown() and "PAUSED" not in shown()
    sink.emit({"kind": "event", "step": 3, "command": "pause", "message": "paused after step 3"})
    assert "PAUSED" in shown() and "ETA" not in shown()
    sink.emit({"kind": "event", "step": 3, "command": "resume", "message": "resumed after step 3"})
    assert "PAUSED" not in shown()
    sink.close()


def test_plain_lines_of_a_budget_run_show_its_length_once_planned(capsys):
    sink = PlainConsoleSink(num_steps=0, log_every_steps=1)  # 0: a --budget run before its plan
    train = {"kind": "train", "loss": 2.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 100.0,
             "eta_seconds": None}
    sink.emit(train | {"step": 1})
    sink.emit({"kind": "event", "step": 10, "message": "budget 10m: planned 50 steps", "budget_plan": {"num_steps": 50}})
    sink.emit(train | {"step": 11, "eta_seconds": 39.0})
    first, plan, later = capsys.readouterr().out.splitlines()
    assert first.startswith("step 1/? |") and first.endswith("ETA ?")
    assert later.startswith("step 11/50 |") and later.endswith("ETA 0m39s")
