"""A resume never re-plans the lr schedule silently: asking for other steps is refused with the two ways
on, and schedule.extend=hold continues the lr from where the run ended (hold, then decay)."""

from __future__ import annotations

import hashlib
import json

import pytest

from gptrain import resolve_config, train
from gptrain.errors import UserError
from gptrain.train.schedule import ScheduleConfig, extend_plan, lr_at, planned_lr


def test_a_hold_tail_starts_at_the_lr_reached_and_decays_to_the_floor():
    cfg = ScheduleConfig(peak_lr=1e-2, num_warmup_steps=2, final_lr_ratio=0.1, extend="hold", decay_fraction=0.5)
    tails = extend_plan(10, 10, [], 30, cfg)  # a finished 10-step run, extended to 30
    assert tails == [{"start": 10, "end": 30, "lr": lr_at(9, 10, cfg)}]
    lrs = [planned_lr(s, 10, tails, cfg) for s in range(30)]
    assert lrs[:10] == [lr_at(s, 10, cfg) for s in range(10)]  # the steps already done are untouched
    assert lrs[10:20] == [lrs[9]] * 10  # held at the lr the run ended at (here its floor)
    midway = extend_plan(5, 10, [], 30, cfg)  # stopped at step 5 of 10, extended: no jump either
    held = planned_lr(4, 10, [], cfg)
    assert planned_lr(5, 10, midway, cfg) == held and planned_lr(29, 10, midway, cfg) == pytest.approx(1e-3)
    assert extend_plan(5, 10, [], 10, ScheduleConfig()) == []  # the saved plan: nothing to extend


@pytest.mark.parametrize("steps, message", [(30, "--schedule.extend=hold"), (3, "already at step 5")])
def test_other_steps_on_resume_are_refused(steps, message):
    with pytest.raises(UserError, match=message) as refused:
        extend_plan(5, 10, [], steps, ScheduleConfig())
    assert steps == 3 or "--init-from" in str(refused.value)


def _tree_hash(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_resume_with_more_steps_refuses_then_extends_with_hold(tmp_path, corpus_dir):
    values = {"data.source": str(corpus_dir), "data.data_dir": str(tmp_path / "ds"), "tokenizer.kind": "char",
              "embd": 16, "layers": 1, "heads": 1, "context": 16, "batch-size": 4, "steps": 12, "lr": 1e-2,
              "schedule.num_warmup_steps": 2, "eval.every_steps": 0, "samples.every_steps": 0,
              "checkpoint.every_steps": 6, "log.live": "off", "log.is_quiet": True, "run_dir": str(tmp_path / "run")}
    run = tmp_path / "run"
    train(resolve_config(None, values, environ={}), log=lambda *_: None)
    before = _tree_hash(run)
    with pytest.raises(UserError, match="planned for 12 steps"):
        train(resolve_config(run / "config.toml", {"steps": 24}, environ={}), resume=run, log=lambda *_: None)
    assert _tree_hash(run) == before  # refused before anything was written
    extended = {"steps": 24, "schedule.extend": "hold"}
    train(resolve_config(run / "config.toml", extended, environ={}), resume=run, log=lambda *_: None)
    lrs = [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(lrs) == 24 and lrs[12] == lrs[11] and lrs[-1] <= lrs[11]  # continuous, never a jump
    again = train(resolve_config(run / "config.toml", {}, environ={}), resume=run, log=lambda *_: None)
    assert again.get("is_already_complete")  # the extended plan is the run's plan now
