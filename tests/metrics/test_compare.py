from dataclasses import replace

import pytest
from fake_runs import T0, launch_rows, make_run

from gptrain.config import RunConfig
from gptrain.errors import UserError
from gptrain.metrics.compare import compare_runs
from gptrain.tokenizer import TokenizerConfig


def test_table_lists_each_run_and_warns_only_when_val_sets_differ(tmp_path):
    a = make_run(tmp_path, "a-1", launch_rows(0, 20, T0, hellaswag_at=20))
    b = make_run(tmp_path, "b-1", launch_rows(0, 10, T0))
    c = make_run(tmp_path, "c-1", launch_rows(0, 10, T0, val_set="val-bbbb"))
    lines = compare_runs([a, b], tmp_path / "val.png").splitlines()
    assert lines[0].split()[:2] == ["run", "steps"]
    row_a, row_b = lines[2].split(), lines[3].split()
    assert row_a[:3] == ["a-1", "20", "20,480"] and row_b[:3] == ["b-1", "10", "10,240"]
    assert "27.46%" in row_a and row_b[-2] == "-"
    assert not [line for line in lines if line.startswith(("warning", "note"))]
    assert lines[-1] == f"val curves: {tmp_path / 'val.png'}"
    assert (tmp_path / "val.png").read_bytes().startswith(b"\x89PNG")
    warnings = [line for line in compare_runs([a, b, c], None).splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and "val sets differ" in warnings[0]
    assert "a-1, b-1: val-aaaa" in warnings[0] and "c-1: val-bbbb" in warnings[0]


def test_different_tokenizers_are_noted(tmp_path):
    a = make_run(tmp_path, "a", launch_rows(0, 5, T0))
    b = make_run(tmp_path, "b", launch_rows(0, 5, T0), config=replace(RunConfig(), tokenizer=TokenizerConfig(
        kind="char")))
    notes = [line for line in compare_runs([a, b], None).splitlines() if line.startswith("note")]
    assert len(notes) == 1 and "compare bits per byte" in notes[0]


def test_no_runs_or_a_non_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="at least one run"):
        compare_runs([], None)
    with pytest.raises(UserError, match="is not a run directory"):
        compare_runs([tmp_path], None)
