"""--budget: the number of steps is planned from the step time measured over the first steps (here a
fake clock and fake step times: no timed test), refused beside --steps, and kept by a resume."""

from __future__ import annotations

import importlib
import json
import time
from types import SimpleNamespace

import pytest
from conftest import copy_run_at, have_equal_final_weights

from gptrain import resolve_config, train
from gptrain.cli import main
from gptrain.errors import UserError
from gptrain.train import budget


@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0)])
def test_durations(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "-5m", "0s", "3d"])
def test_bad_durations_are_user_errors(text):
    with pytest.raises(UserError, match="train.budget must be a positive time"):
        budget.parse_duration(text)


def test_the_plan_fits_steps_evaluations_and_the_final_save_in_the_time_left():
    # 600 s budget, 60 s used, 0.5 s steps, an evaluation (2 s) every 100 steps, a 10 s final save.
    steps = budget.planned_steps(600, 60, 0.5, 10, eval_every=100, eval_seconds=2.0, save_seconds=10.0)
    per_step = 0.5 + 2.0 / 100
    assert steps == 10 + int((0.97 * 540 - 2.0 - 10.0) / per_step)
    total = 60 + (steps - 10) * per_step + 2.0 + 10.0
    assert 0.95 * 600 < total <= 600  # ends within the budget, without wasting much of it
    assert budget.planned_steps(600, 700, 0.5, 10, 100, 2.0, 10.0) == 10  # already over: stop now


def test_make_plan_reads_the_run_and_leaves_paused_time_out():
    run = SimpleNamespace(
        cfg=SimpleNamespace(train=SimpleNamespace(budget="10m"), eval=SimpleNamespace(num_tokens=0, every_steps=0)),
        plan=SimpleNamespace(tokens_per_step=1024), model=SimpleNamespace(num_parameters=lambda: 1_000_000),
        state=SimpleNamespace(step=10), launched_at=1000.0, paused_seconds=300.0)
    plan = budget.make_plan(run, [9.0, 9.0] + [0.5] * 8, now=1000.0 + 360.0)  # 60 s of it spent training
    assert plan["step_seconds"] == 0.5 and plan["elapsed_seconds"] == 60.0
    save = 1.0 + 16e6 / budget.SAVE_BYTES_PER_SECOND
    assert plan["num_steps"] == 10 + int((0.97 * 540 - save) / 0.5)


def test_a_run_whose_steps_slow_down_ends_within_five_percent_of_its_budget(monkeypatch):
    events = []
    run_log = importlib.import_module("gptrain.train.run_log")  # gptrain.train is also the train() function
    monkeypatch.setattr(run_log, "emit", lambda run, row: events.append(row))
    plan = {"num_steps": 1000, "step_seconds": 0.5, "budget_seconds": 600.0, "reserve_seconds": 20.0}
    run = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(budget="10m")),
                          state=SimpleNamespace(budget_plan=plan, step=800), plan=SimpleNamespace(num_steps=1000),
                          env=SimpleNamespace(is_main=True, broadcast_object=lambda obj: obj),
                          launched_at=1000.0, paused_seconds=30.0, budget_planned_here=True, longest_tail_seconds=0.0)
    assert not budget.is_past_deadline(run, now=1000.0 + 30 + 610)  # 610 + 20 s reserve = 630 s: not late yet
    assert budget.is_past_deadline(run, now=1000.0 + 30 + 611)  # paused time left out
    assert budget.is_past_deadline(run, 5.0, now=1000.0 + 30 + 606)  # the next check, 5 s away, would be late
    run.longest_tail_seconds = 25.0  # an evaluation, sample and save that took longer than the plan's estimate
    assert budget.is_past_deadline(run, now=1000.0 + 30 + 606)
    run.budget_planned_here = False  # a resumed launch finishes the plan's steps without a deadline
    assert not budget.is_past_deadline(run, now=1000.0 + 30 + 900)
    budget.end_at_deadline(run)
    assert run.plan.num_steps == 800 and run.state.budget_plan["num_steps"] == 800
    assert run.state.budget_plan["planned_steps"] == 1000  # the lr schedule stays the one planned
    assert "ending at step 800 of the 1000 planned" in events[0]["message"]


def test_the_clock_starts_at_the_process_start():
    started = budget.process_started_at()
    assert started is not None and 0 < time.monotonic() - started < 3600  # pytest started this process


def test_gptrain_train_passes_its_process_start_to_train(monkeypatch):
    seen = {}
    monkeypatch.setattr(budget, "process_started_at", lambda: 123.0)
    loop = importlib.import_module("gptrain.train.loop")
    monkeypatch.setattr(loop, "train", lambda cfg, **kwargs: seen.update(kwargs) or {
        "is_stopped": False, "is_already_complete": True, "run_dir": "runs/x"})
    assert main(["train", "--budget", "10m", "--log.live=off", "--log.is_quiet=true"]) == 0
    assert seen["started_at"] == 123.0


def test_budget_beside_steps_is_refused(capsys):
    assert main(["train", "--budget", "10m", "--steps", "100"]) == 2
    assert "--budget sets the run's length itself" in capsys.readouterr().err


def _values(tmp_path, corpus_dir, run):
    return {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"), "tokenizer.kind": "char",
            "embd": 16, "layers": 1, "heads": 2, "context": 16, "batch-size": 4, "train.budget": "1h",
            "schedule.num_warmup_steps": 5, "eval.every_steps": 0, "samples.every_steps": 0,
            "checkpoint.every_steps": 20, "checkpoint.keep_last": 10, "log.live": "off", "log.is_quiet": True,
            "train.compile": "off",  # an hour's budget would measure compile first (the compile probe)
            "run_dir": str(tmp_path / run)}


def test_a_budget_run_plans_once_and_a_resume_keeps_the_plan_bitwise(tmp_path, corpus_dir, monkeypatch):
    real = budget.make_plan
    # As if each step took 40 s and 3,000 s of the hour had gone: about 14 steps are left after the probe.
    monkeypatch.setattr(budget, "make_plan", lambda run, times: real(run, [40.0] * 10, now=run.launched_at + 3000))
    train(resolve_config(None, _values(tmp_path, corpus_dir, "full"), environ={}), log=lambda *_: None)
    full = tmp_path / "full"
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    (plan,) = [r["budget_plan"] for r in rows if "budget_plan" in r]
    assert plan["num_steps"] == 10 + 14  # (0.97 x 600 s left - a ~1 s save) / 40 s per step, after the 10 timed
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, plan["num_steps"] + 1))
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    assert lrs[-1] < lrs[9]  # the schedule decays over the planned steps
    # A resume from step 20 finishes the same plan without measuring again, bit for bit.
    cut = copy_run_at(full, "step_000020", tmp_path / "cut")
    monkeypatch.setattr(budget, "make_plan", lambda run, times: pytest.fail("a resume measured again"))
    train(resolve_config(cut / "config.toml", {}, environ={}), resume=cut, log=lambda *_: None)
    assert have_equal_final_weights(full, cut)


def test_a_budget_run_plans_again_once_its_warmup_is_done(tmp_path, corpus_dir, monkeypatch):
    real, calls = budget.make_plan, []

    def fake_plan(run, times):  # 40 s steps at the first plan (step 10), 20 s over the warmup's 12
        calls.append(run.state.step)
        return real(run, [40.0 if len(calls) == 1 else 20.0] * len(times), now=run.launched_at + 3000)

    monkeypatch.setattr(budget, "make_plan", fake_plan)
    values = {**_values(tmp_path, corpus_dir, "again"), "schedule.num_warmup_steps": 12}
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    first, second = [r["budget_plan"] for r in rows if "budget_plan" in r]
    assert calls == [10, 12] and first["num_steps"] == 24 and second["first_num_steps"] == 24
    assert second["step_seconds"] == 20.0 and second["num_steps"] > 2 * (first["num_steps"] - 10)  # twice the pace
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == second["num_steps"]


def test_a_budget_run_past_its_deadline_ends_complete_at_that_step(tmp_path, corpus_dir, monkeypatch):
    real = budget.make_plan
    # Planned for 14 more steps, but as if the final evaluation and save needed all the budget and more.
    monkeypatch.setattr(budget, "make_plan", lambda run, times: {
        **real(run, [40.0] * 10, now=run.launched_at + 3000), "reserve_seconds": 3600 * (1 + budget.OVERRUN)})
    train(resolve_config(None, _values(tmp_path, corpus_dir, "late"), environ={}), log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "late" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == 10  # ended at the first check after the plan
    assert any("ending at step 10 of the 24 planned" in r.get("message", "") for r in rows)
    state = json.loads((tmp_path / "late" / "checkpoints" / "final" / "state.json").read_text())
    assert state["train"]["step"] == 10 and state["train"]["budget_plan"]["num_steps"] == 10


def test_the_shown_pace_leaves_out_a_launch_s_first_step():
    from gptrain.train.loop import PACE_WINDOW_STEPS, pace_window

    window: list[float] = []
    step_seconds = [12.0] + [0.3] * (PACE_WINDOW_STEPS + 5)  # a compile, then the real pace
    for count, seconds in enumerate(step_seconds, start=1):
        window = pace_window(window, seconds, count)
        if count == 1:
            assert window == [12.0]  # all there is to show yet
        else:
            assert 12.0 not in window and len(window) == min(count - 1, PACE_WINDOW_STEPS)
    assert sum(window) / len(window) == pytest.approx(0.3)
