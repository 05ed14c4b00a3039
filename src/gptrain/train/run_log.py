"""What a run writes about itself: rows to its sinks (metrics.jsonl, metrics.csv, samples.txt, the
terminal), the first event rows of every launch, and the report card."""

from __future__ import annotations

import time

from gptrain.config import to_dict
from gptrain.metrics.console import build_console_sink, log_file_sink
from gptrain.metrics.machine import describe_machine
from gptrain.metrics.report import write_report
from gptrain.metrics.sinks import CsvSink, JsonlSink, MetricSink, SamplesSink
from gptrain.train.setup import Run
from gptrain.train.step import uses_bf16


def emit(run: Run, row: dict) -> None:
    row = {"step": run.state.step, "time": time.time(), **row}
    for sink in run.sinks:
        sink.emit(row)


def build_sinks(run: Run) -> list[MetricSink]:
    if not run.env.is_main:
        return []
    optional = build_optional_sinks(run)  # first: when one cannot start, nothing else is open yet
    num_steps = 0 if run.cfg.train.budget and run.state.budget_plan is None else run.plan.num_steps  # 0: not yet
    console = build_console_sink(run.cfg.log, num_steps, run.cfg.train.log_every_steps,
                                 title=f"gptrain · {run.run_dir}")
    log_file = log_file_sink(run.run_dir / "train.log", num_steps, run.cfg.train.log_every_steps)
    return [JsonlSink(run.run_dir / "metrics.jsonl"), CsvSink(run.run_dir / "metrics.csv"),
            SamplesSink(run.run_dir / "samples.txt"), log_file, *optional, console]


def build_optional_sinks(run: Run) -> list[MetricSink]:
    """TensorBoard and W&B, when switched on (both are off by default). Built once a resume has set
    run.state.step, the step this launch continues from."""
    if not (run.cfg.log.tensorboard or run.cfg.log.wandb_project):
        return []
    from gptrain.integrations.loggers import TensorBoardSink, WandbSink

    sinks: list[MetricSink] = []
    try:
        if run.cfg.log.tensorboard:
            sinks.append(TensorBoardSink(run.run_dir / "tensorboard", run.state.step))
        if run.cfg.log.wandb_project:
            sinks.append(WandbSink(run.run_dir, run.cfg.log.wandb_project, to_dict(run.cfg)))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def log_layout(run: Run) -> None:
    """The first event rows of every launch: what trains where, how the global batch is made up, and on
    what machine (so the run directory alone holds what its report card needs)."""
    cfg, plan = run.cfg, run.plan
    is_unplanned = cfg.train.budget and run.state.budget_plan is None
    length = f"a budget of {cfg.train.budget} (steps planned once timed)" if is_unplanned else f"{plan.num_steps} steps"
    layout = dict(strategy=plan.strategy, world_size=plan.world_size, micro_batch=cfg.train.batch_size,
                  num_micro_steps=plan.num_micro_steps, batch_tokens=plan.tokens_per_step,
                  num_parameters=run.model.num_parameters(), dataset=run.train_loader.fingerprint, val_set=run.val_set,
                  precision="bf16" if uses_bf16(run.env.device, cfg.train.precision) else "fp32")
    emit(run, {"kind": "event", **layout, "message": (
        f"run {run.run_dir} | {run.model.num_parameters():,} parameters | device {run.env.device} "
        f"{layout['precision']} | "
        f"{plan.strategy} on {plan.world_size} rank(s) | micro batch {cfg.train.batch_size} x "
        f"{plan.num_micro_steps} accumulation steps | {length} of {plan.tokens_per_step:,} tokens | "
        f"{run.train_loader.num_tokens:,} train tokens")})
    machine = describe_machine(run.env.device)
    emit(run, {"kind": "event", "machine": machine, "message": (
        f"machine {machine['hostname']} | {machine['cpu']} x {machine['num_cpus']} | {machine['gpu'] or 'no GPU'} | "
        f"torch {machine['torch']} | gptrain {machine['gptrain']}")})


def write_report_card(run: Run) -> None:
    """report.md and loss.png from the run directory alone (metrics.jsonl is flushed at every row), on
    rank 0. The run is saved by then: a failure here (a full disk) is an event row, not a failed run."""
    if not run.env.is_main:
        return
    try:
        write_report(run.run_dir)
    except Exception as e:  # noqa: BLE001 -- whatever it is, the trained run stands
        emit(run, {"kind": "event", "message": f"the report card was not written ({type(e).__name__}: {e}); "
                                               f"write it later with: gptrain report {run.run_dir}"})
