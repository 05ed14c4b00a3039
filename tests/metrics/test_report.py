import math
import re
import statistics

import pytest
from fake_runs import EVAL_ROWS, MACHINE, T0, append_rows, launch_rows, make_run

from gptrain.config import RunConfig
from gptrain.errors import UserError
from gptrain.metrics.report import write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def report_items(text: str) -> dict[str, list[str]]:
    """Each markdown table row of the report, keyed by its first cell."""
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in text.splitlines()
            if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in rows}


def number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


def test_report_figures_equal_the_rows(tmp_path):
    rows = launch_rows(0, 20, T0, hellaswag_at=20)
    last_val = [r for r in rows if r["kind"] == "val"][-1]
    # A worse last evaluation, so the best val row (step 15) is not the final one.
    last_val |= {"val_loss": 2.5, "val_perplexity": math.exp(2.5), "val_bpb": 2.5 / 1.7}
    run_dir = make_run(tmp_path, "shakespeare-1", rows, EVAL_ROWS)
    report = write_report(run_dir).read_text(encoding="utf-8")
    items = report_items(report)
    val = [r for r in rows if r["kind"] == "val"]
    best = min(val, key=lambda r: r["val_loss"])
    assert items["steps"] == ["20"] and items["tokens seen"] == [f"{20 * 1024:,}"]
    assert items["final val loss"][1:] == ["sampled val (40,960 tokens)", "20"]
    assert number(items["final val loss"][0]) == pytest.approx(last_val["val_loss"], abs=5e-5)
    assert number(items["final val perplexity"][0]) == pytest.approx(last_val["val_perplexity"], abs=5e-3)
    assert number(items["final val bits per byte"][0]) == pytest.approx(last_val["val_bpb"], abs=5e-5)
    assert items["best val loss"][2] == str(best["step"]) == "15"
    assert number(items["best val loss"][0]) == pytest.approx(best["val_loss"], abs=5e-5)
    assert number(items["best val bits per byte"][0]) == pytest.approx(best["val_bpb"], abs=5e-5)
    full, hellaswag = EVAL_ROWS
    step, split, data, tokens, loss, ppl, bpb = items["final"]
    assert (step, split, data, number(tokens)) == ("20", "val", "shakespeare", full["num_tokens"])
    assert [number(loss), number(bpb)] == pytest.approx([full["loss"], full["bpb"]], abs=5e-5)
    assert number(ppl) == pytest.approx(full["perplexity"], abs=5e-3)
    during = items["during training"]
    assert during[:2] == ["20", "1,000"]
    assert [number(v) / 100 for v in during[2:]] == pytest.approx(
        [last_val["hellaswag_acc"], last_val["hellaswag_acc_norm"], last_val["hellaswag_acc_norm_bytes"]], abs=5e-5)
    evaluated = items["gptrain eval (final)"]
    assert evaluated[:2] == ["20", "10,042"]
    assert [number(v) / 100 for v in evaluated[2:]] == pytest.approx(
        [hellaswag["acc"], hellaswag["acc_norm"], hellaswag["acc_norm_bytes"]], abs=5e-5)
    scored = next(v for k, v in items.items() if k.startswith("gptrain eval, scored items only"))
    assert number(scored[1]) == 10_040 and number(scored[3]) / 100 == pytest.approx(0.29882, abs=5e-5)
    assert items["CPU"] == [f"{MACHINE['cpu']} (16 CPUs)"] and items["GPU"] == ["1 x NVIDIA H100 80GB HBM3"]
    assert items["torch"] == ["2.5.1"] and items["parameters"] == ["1,234,567"]
    assert items["n_layer"] == [str(RunConfig().model.n_layer)] and items["val set id"] == ["val-aaaa"]
    median = statistics.median(r["tokens_per_second"] for r in rows if r["kind"] == "train")
    assert items["throughput"] == [f"{median:,.0f} tokens/s (median of train rows)"]
    assert items["wall time"] == ["0m42s (42 s) over 1 launch(es)"]  # layout row at T0 to the done row
    assert "finished" in report and "![loss](loss.png)" in report
    assert "````text\nKING.\nstep 20 | ``` odd\n````" in report  # the fence outgrows the sample's backticks
    png = (run_dir / "loss.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_regenerating_after_a_resume_updates_the_figures(tmp_path):
    run_dir = make_run(tmp_path, "r", launch_rows(0, 10, T0, is_done=False))
    before = report_items(write_report(run_dir).read_text(encoding="utf-8"))
    # A resume from step 10, 1000 s later: its launch rows, then steps 11..20.
    append_rows(run_dir / "metrics.jsonl", launch_rows(10, 20, T0 + 1000))
    report = write_report(run_dir).read_text(encoding="utf-8")
    after = report_items(report)
    assert before["steps"] == ["10"] and after["steps"] == ["20"]
    assert before["best val loss"][2] == "10" and after["best val loss"][2] == "20"
    assert number(after["best val loss"][0]) < number(before["best val loss"][0])
    # Launch one: T0 .. its sample at T0+21; launch two: T0+1000 .. its done row at T0+1022. The gap is not counted.
    assert before["wall time"] == ["0m21s (21 s) over 1 launch(es)"]
    assert after["wall time"] == ["0m43s (43 s) over 2 launch(es)"]
    assert "Latest sample (step 20)" in report and "not finished" not in report


def test_a_run_that_has_only_started_still_gets_a_report(tmp_path):
    rows = launch_rows(0, 3, T0, val_every=100, is_done=False)
    rows[3]["loss"] = None  # a non-finite loss, written as null
    run_dir = make_run(tmp_path, "young", rows)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a row being written right now
    report = write_report(run_dir).read_text(encoding="utf-8")
    assert "No val rows yet." in report and "1 unreadable line(s)" in report and "not finished" in report
    assert report_items(report)["steps"] == ["3"]
    assert (run_dir / "loss.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_folder_that_is_not_a_run_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is not a run directory"):
        write_report(tmp_path / "empty")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.toml").write_text("")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        write_report(tmp_path / "half")
