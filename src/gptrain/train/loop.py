"""train(): the one explicit training loop, with resume, checkpoints, evaluation and samples (setup: setup.py)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from gptrain.config import ALIASES, RunConfig, resolve_config
from gptrain.distributed.env import DistEnv
from gptrain.errors import UserError
from gptrain.eval.hellaswag import evaluate_hellaswag
from gptrain.eval.val_loss import evaluate_loss
from gptrain.files import restore_swaps
from gptrain.interop import resolve_model_source
from gptrain.metrics.sinks import cut_back
from gptrain.metrics.system import SystemSampler
from gptrain.metrics.throughput import estimate_mfu, peak_flops, remeasure_peak
from gptrain.tokenizer import load_tokenizer
from gptrain.train import checkpoint as ckpt
from gptrain.train.budget import PROVISIONAL_STEPS, end_at_deadline, is_past_deadline, maybe_plan
from gptrain.train.control import PAUSE_POLL_SECONDS, ControlReader, TrainerLock
from gptrain.train.fast_paths import legacy_choices
from gptrain.train.recovery import note_bad_step, recovery_factor
from gptrain.train.run_dir import check_run_dir, find_auto_resume, is_unstarted_run
from gptrain.train.run_log import build_sinks, emit, log_layout, write_report_card
from gptrain.train.samples import write_sample
from gptrain.train.saving import (
    check_resume_config,
    read_resume_checkpoint,
    resume_command,
    resume_from,
    save_checkpoint,
    settle_checkpoints,
)
from gptrain.train.schedule import planned_lr
from gptrain.train.setup import Run, build_run, config_for_init, configure_device, create_run_dir, step_run
from gptrain.train.step import autocast_context, uses_bf16

PACE_WINDOW_STEPS = 20  # the shown tokens/s and ETA are the mean over this many recent steps


def validate(run: Run, *, is_final: bool = False) -> tuple[float, list[str]]:
    """Evaluate on all ranks (and score HellaSwag when due) and track the best val loss; returns the loss
    and ["best"] when best/ should be saved (the same answer on every rank: the loss is reduced over them)."""
    env, cfg = run.env, run.cfg
    autocast = autocast_context(env.device, cfg.train.precision)
    metrics = evaluate_loss(run.model, run.val_loader, run.val_windows, env.device,
                            byte_lengths=run.byte_lengths, eot_id=run.tokenizer.eot_id, autocast=autocast,
                            reduce_sum=env.all_reduce_sum)
    if run.hellaswag_items and (is_final or is_due(run.state.step, cfg.eval.hellaswag_every_steps)):
        metrics |= evaluate_hellaswag(run.model, run.tokenizer, run.hellaswag_items, env.device,
                                      batch_size=max(1, cfg.train.batch_size // 4), autocast=autocast,
                                      rank=env.rank, world_size=env.world_size, reduce_sum=env.all_reduce_sum)
    emit(run, {"kind": "val", "tokens_seen": run.state.tokens_seen, "scope": "sample", **metrics})
    run.last_val_loss = metrics["val_loss"]
    state = run.state
    if state.best_val_loss is None or metrics["val_loss"] < state.best_val_loss:
        state.best_val_loss, state.num_bad_evals = metrics["val_loss"], 0
        return metrics["val_loss"], ["best"] if run.cfg.checkpoint.save_best else []
    state.num_bad_evals += 1
    return metrics["val_loss"], []


def summarize(run: Run, train_loss: float, val_loss: float | None, text: str | None) -> dict:
    state = run.state
    return {"run_dir": str(run.run_dir), "step": state.step, "train_loss": train_loss, "val_loss": val_loss,
            "best_val_loss": state.best_val_loss, "elapsed_seconds": state.elapsed_seconds, "sample": text,
            "is_stopped": text is None, "stop_signal": run.stop_signal}


def sample(run: Run) -> str:
    """Every rank samples with the same seed and length (under FSDP each forward is a collective)."""
    text = write_sample(run.model, run.tokenizer, run.cfg.samples, run.env.device)
    emit(run, {"kind": "sample", "text": text})
    return text


def pace_window(recent: list[float], seconds: float, steps_this_launch: int) -> list[float]:
    """The recent step times that the shown tokens/s and ETA come from (the last PACE_WINDOW_STEPS). A
    launch's first step pays for compiling and first-touch allocations (12 s against 0.3 s in a compiled
    default job): it leaves the window once a second step exists, or the log would show an ETA of 46
    minutes for a 10-minute budget at step 10."""
    if steps_this_launch == 2:
        return [seconds]
    return (recent + [seconds])[-PACE_WINDOW_STEPS:]


def is_due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def train(
    cfg: RunConfig,
    *,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
    should_overwrite: bool = False,
    should_tune_malloc: bool = False,
    overrides: dict | None = None,
    started_at: float | None = None,
    log=print,
) -> dict:
    """Train a model as cfg says; returns a summary (run_dir, steps, losses, seconds, last sample).

    Under torchrun every rank calls this; it joins the process group (and leaves it if it joined).
    resume: a run directory to continue from its latest checkpoint; pass its own config
    (`resolve_config(run_dir / "config.toml", overrides)`), as `gptrain train --resume` does.
    "auto": the run cfg names (--run-dir, else the newest runs/<name>-*) if it has a checkpoint, with
    its stored config and `overrides` (the command line's values) on top; else a new run from cfg.
    init_from: a checkpoint (or run) whose weights, sizes and tokenizer to start from.
    should_tune_malloc: keep freed memory in the heap once the data is ready (see runtime.tune_malloc).
    started_at: the time.monotonic() a --budget counts from (`gptrain train`: its process's start);
    None: now.
    """
    started_at = time.monotonic() if started_at is None else started_at
    is_auto = str(resume) == "auto"
    is_joined = dist.is_initialized()
    env = DistEnv.start(cfg.device, cfg.parallel.timeout_seconds)
    if resume is not None and (should_overwrite or (init_from is not None and not is_auto)):
        raise UserError("--resume continues a run as it is: it cannot be combined with --overwrite or --init-from",
                        is_echo=not env.is_main)
    if is_auto:
        found, should_overwrite = env.on_main(find_auto_resume, cfg)
        resume = found
        if found is not None:
            cfg, init_from = resolve_config(found / "config.toml", overrides or {}), None
    elif resume is not None and env.on_main(is_unstarted_run, Path(resume)):  # killed before its first checkpoint
        cfg, resume, should_overwrite = replace(cfg, run_dir=str(resume)), None, True
    explicit = None if overrides is None else {ALIASES.get(k, k) for k in overrides}
    summary = _train(cfg, env, resume, init_from, should_overwrite, should_tune_malloc, explicit, log, started_at)
    # Left only on success: after an error, destroying an NCCL group can block on peers still inside a
    # collective; the process exits instead and torchrun ends the others.
    if not is_joined:
        # Rank 0 writes the report card after the last collective; a rank that tore its group down
        # meanwhile and exited was seen to abort in gloo (SIGABRT at exit): the ranks leave together.
        env.barrier()
        env.close()
    return summary


def _train(cfg: RunConfig, env: DistEnv, resume, init_from, should_overwrite: bool, should_tune_malloc: bool,
           explicit: set[str] | None, log, launched_at: float) -> dict:
    if resume is not None:
        cfg = replace(cfg, run_dir=str(resume))
    configure_device(cfg.train, env)
    torch.manual_seed(cfg.seed)
    if cfg.log.tensorboard or cfg.log.wandb_project:  # rank 0's optional sinks: a missing extra fails first
        from gptrain.integrations.loggers import check_extras

        env.on_main(check_extras, cfg.log)
    run_dir = env.on_main(check_run_dir, cfg, is_resume=resume is not None, should_overwrite=should_overwrite)
    fixed_tokenizer, weights, pieces = None, None, None
    if resume is not None:
        pieces = read_resume_checkpoint(run_dir, env)
        cfg = check_resume_config(cfg, pieces["config_toml"], env.is_main)
        fixed_tokenizer, weights = load_tokenizer(pieces["tokenizer_path"]), pieces["model"]
    elif init_from is not None:
        source = env.on_main(resolve_model_source, init_from)  # a gptrain checkpoint, or an HF model imported
        init_pieces = ckpt.read_checkpoint(source, with_optimizer=False)
        cfg, weights = config_for_init(cfg, init_pieces["config_toml"], init_pieces["model"], explicit,
                                       log if env.is_main else (lambda *_: None))
        fixed_tokenizer = load_tokenizer(init_pieces["tokenizer_path"])
    # A resume keeps the run's fast-path choices (legacy_choices: from before they were kept).
    saved_fast_paths = None if pieces is None else (pieces["state"]["train"].get("fast_paths")
                                                    or legacy_choices(env.device))
    run = build_run(cfg, env, run_dir, fixed_tokenizer, weights, log, saved_fast_paths,
                    should_tune_malloc=should_tune_malloc)
    run.launched_at = launched_at
    offsets, resumed = {}, None
    if pieces is not None:
        resume_from(run, pieces)
        offsets, resumed = pieces["state"].get("metrics_offsets", {}), pieces["tokenizer_path"].parent
    del pieces, weights
    run.state.schedule_steps = run.state.schedule_steps or run.plan.num_steps
    create_run_dir(run, should_overwrite=should_overwrite)
    lock = TrainerLock(run.run_dir)
    env.on_main(lock.acquire)  # before anything is cut back or appended: one trainer per run directory
    env.on_main(restore_swaps, run.run_dir / "checkpoints")  # a folder a crash left as <name>.old gets its name back
    if resumed is not None:  # and the folders a kill left older than the checkpoint resumed from
        env.on_main(settle_checkpoints, run.run_dir, resumed, cfg.checkpoint.keep_last)
    if env.is_main and run.state.step < run.plan.num_steps:  # a finished run keeps its closing rows
        cut_back(run.run_dir, offsets)
    if env.is_main:
        run.control, run.system = ControlReader.open(run.run_dir), SystemSampler(env.device)
        run.replays = run.control.replays(run.state.step) if resume is not None else []
    run.sinks = build_sinks(run)
    try:
        log_layout(run)  # the first event row of every launch, a resumed one too
        emit(run, {"kind": "event", "message": run.fast_paths_note, "fast_paths": run.state.fast_paths})
        if resume is not None:
            emit(run, {"kind": "event", "message": f"resumed from step {run.state.step}",
                       "resumed_from": run.state.step})
            if run.state.step >= run.plan.num_steps:  # a requeued job whose run had already finished
                emit(run, {"kind": "event", "message": f"the run is already complete ({run.plan.num_steps} steps)"})
                write_report_card(run)  # a kill after the final checkpoint came before the report card
                return summarize(run, float("nan"), run.state.best_val_loss, "") | {"is_already_complete": True}
        with stop_on_signals(run):
            return _loop(run)
    except Exception as e:
        e.run_dir = run.run_dir  # where the command line writes the traceback (cli.report_crash)
        raise
    finally:
        run.writer.wait()
        for sink in run.sinks:
            sink.close()
        lock.release()


@contextlib.contextmanager
def stop_on_signals(run: Run):
    """Ctrl-C, SIGTERM or SIGHUP (torchrun forwards them to every worker) asks the loop to stop at the next
    step boundary and checkpoint there, so the run resumes exactly; a second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        if run.should_stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        run.should_stop, run.stop_signal = True, run.stop_signal or signum

    # torchrun forwards SIGHUP too (a closed SSH session): it also saves and stops.
    signals = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, handle) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def after_step(run: Run, should_stop: bool) -> tuple[bool, bool]:
    """Evaluate, sample and checkpoint when due (on every rank: these are collectives under FSDP).
    Returns (is_early_stop, is_stopping); one snapshot serves every folder due at this step."""
    cfg, state = run.cfg, run.state
    run.writer.raise_if_failed()  # a checkpoint write that failed (a full disk) stops the run here
    names, is_early_stop = [], False
    # A stop skips evaluation and samples: torchrun kills workers that take longer than ~30 s to exit.
    eval_every = cfg.eval.every_steps if state.eval_every_steps is None else state.eval_every_steps
    samples_every = cfg.samples.every_steps if state.samples_every_steps is None else state.samples_every_steps
    if is_due(state.step, eval_every) and not should_stop:
        _, names = validate(run)
        is_early_stop = 0 < cfg.eval.patience <= state.num_bad_evals
        if is_early_stop:
            emit(run, {"kind": "event", "message": f"early stop: val loss has not improved for "
                                                   f"{state.num_bad_evals} evaluations"})
    if is_due(state.step, samples_every) and not should_stop:
        sample(run)
    is_periodic = is_due(state.step, cfg.checkpoint.every_steps)
    is_stopping = should_stop and not is_early_stop
    if is_periodic or is_stopping or run.is_save_requested:
        run.is_save_requested = False
        names = [f"{ckpt.STEP_PREFIX}{state.step:06d}", *names]
    if names:  # keep_last prunes after a stop's checkpoint too (it is the newest, so it stays)
        save_checkpoint(run, names, is_periodic=is_periodic or is_stopping)
    return is_early_stop, is_stopping


def _loop(run: Run) -> dict:
    cfg, env, state, plan = run.cfg, run.env, run.state, run.plan
    dtype = "bf16" if uses_bf16(env.device, cfg.train.precision) else "fp32"
    # Rank 0 measures (when the device is not in the table) while the others wait: probes would compete.
    peak, mfu_basis = env.on_main(peak_flops, env.device, dtype)
    # one CPU rank: no collective to keep in step, and no GPU memory taken mid-run by a large matmul
    should_recheck_peak = mfu_basis == "probe" and env.world_size == 1 and env.device == "cpu"

    is_early_stop, last_loss = False, float("nan")
    recent: list[float] = []
    probe: list[float] = []
    run.model.train()
    while state.step < plan.num_steps and not is_early_stop:
        started = time.perf_counter()
        lr = planned_lr(state.step, state.schedule_steps, state.schedule_tails, cfg.schedule) * state.lr_scale \
            * recovery_factor(run)
        is_guarded = cfg.train.spike_factor > 0 and state.loss_ema is not None and state.step >= 10
        max_loss = cfg.train.spike_factor * state.loss_ema if is_guarded else float("inf")
        result = step_run(run, lr, max_loss, has_commands=lambda: has_commands(run))
        state.step += 1
        state.tokens_seen += plan.tokens_per_step
        seconds = time.perf_counter() - started
        state.elapsed_seconds += seconds
        last_loss = result.loss
        if not result.is_applied:
            note_bad_step(run, last_loss, max_loss)  # and after too many, a rollback (train/recovery.py)
        else:
            state.loss_ema = last_loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * last_loss
        probe.append(seconds)
        recent = pace_window(recent, seconds, len(probe))
        maybe_plan(run, probe)  # a --budget run fixes its length after its first steps
        mean_step_seconds = sum(recent) / len(recent)
        tokens_per_second = plan.tokens_per_step / mean_step_seconds
        mfu = estimate_mfu(run.model.config, tokens_per_second, peak, num_devices=env.world_size)
        if mfu is not None and mfu > 1.0 and should_recheck_peak:  # once a run
            peak, should_recheck_peak = remeasure_peak(env.device, dtype), False
            emit(run, {"kind": "event", "message": f"MFU over 100%: the cached matmul peak was low; measured again: "
                                                   f"{peak / 1e9:,.0f} GFLOP/s"})
            mfu = estimate_mfu(run.model.config, tokens_per_second, peak)
        emit(run, {"kind": "train", "loss": last_loss, "lr": lr, "grad_norm": result.grad_norm,
                   "tokens_per_second": tokens_per_second, "mfu": mfu, "mfu_basis": mfu_basis,
                   "tokens_seen": state.tokens_seen, "epoch": run.train_loader.epochs_done,
                   "eta_seconds": None if plan.num_steps >= PROVISIONAL_STEPS  # a budget not planned yet
                   else (plan.num_steps - state.step) * mean_step_seconds})
        if run.system is not None and run.system.is_due():
            emit(run, {"kind": "system", **run.system.sample()})
        if result.has_commands:
            paused_from = time.monotonic()
            steer(run)
            run.paused_seconds += time.monotonic() - paused_from
        if state.step == plan.num_steps:
            break
        until_next_check = cfg.train.log_every_steps * mean_step_seconds
        if state.step % cfg.train.log_every_steps == 0 and is_past_deadline(run, until_next_check):
            end_at_deadline(run)
            break
        tail_from = time.monotonic()
        is_early_stop, is_stopping = after_step(run, result.should_stop or run.should_stop)
        run.longest_tail_seconds = max(run.longest_tail_seconds, time.monotonic() - tail_from)
        if is_stopping:
            emit(run, {"kind": "event", "message": f"stopped at step {state.step} (checkpoint saved); "
                                                   f"continue with: {resume_command(run)}"})
            write_report_card(run)
            return summarize(run, last_loss, None, None)
    # An early stop has just evaluated this step: its figures stand (no second val row for one step).
    final_val_loss, names = (run.last_val_loss, []) if is_early_stop else validate(run, is_final=True)
    text = sample(run)
    save_checkpoint(run, ["final", *names])  # one snapshot for both when the last evaluation is also the best
    run.writer.wait()
    emit(run, {"kind": "event", "message": f"done: {state.step} steps in {state.elapsed_seconds:.0f}s | "
                                           f"best val loss {state.best_val_loss:.4f} | {run.run_dir}"})
    write_report_card(run)
    return summarize(run, last_loss, final_val_loss, text)


def has_commands(run: Run) -> bool:
    """On rank 0: read new control commands, and state commands due again after a resume, into pending."""
    if run.control is None:
        return False
    run.pending += run.control.poll()
    due = [c for c in run.replays if c["step"] == run.state.step + 1]  # read before the step counter moves
    run.replays = [c for c in run.replays if c not in due]
    run.pending += due
    return bool(run.pending)


def steer(run: Run) -> None:
    """Apply rank 0's pending commands on every rank at this step boundary (one broadcast); while
    paused, every rank sleeps and the ranks agree again every PAUSE_POLL_SECONDS, so no rank sits
    in a collective long enough to time out."""
    while True:
        # Rank 0's stop request decides for all (a signal reaches the ranks at slightly different times).
        commands, is_stopping = run.env.broadcast_object((run.pending, run.should_stop) if run.env.is_main else None)
        run.pending = []
        for command in commands:
            apply_command(run, command)
        if not run.is_paused or is_stopping:
            run.should_stop = run.should_stop or is_stopping
            return
        time.sleep(PAUSE_POLL_SECONDS)
        if run.env.is_main:
            has_commands(run)


def apply_command(run: Run, command: dict) -> None:
    """One command on this rank (state, pause, save, stop); rank 0 acknowledges it and logs an event."""
    state, name, value = run.state, command.get("command"), command.get("value")
    if "error" in command:
        message, is_ok = f"control command refused: {command['error']}", False
    elif name == "pause":
        run.is_paused, message, is_ok = True, f"paused after step {state.step}", True
    elif name == "resume":
        run.is_paused, message, is_ok = False, f"resumed after step {state.step}", True
    elif name == "save":
        message, is_ok = f"checkpoint {ckpt.STEP_PREFIX}{state.step:06d} saved on request", True
        if run.is_paused:
            save_checkpoint(run, [f"{ckpt.STEP_PREFIX}{state.step:06d}"])
        else:
            run.is_save_requested = True
    elif name == "stop":
        run.should_stop, run.is_paused, message, is_ok = True, False, f"stopping after step {state.step}", True
    else:
        field = {"lr_scale": "lr_scale", "eval_every": "eval_every_steps", "sample_every": "samples_every_steps"}[name]
        setattr(state, field, value)
        again = f" (again: first applied at step {command['step']})" if command.get("is_replay") else ""
        message, is_ok = f"{name} = {value} from step {state.step + 1}{again}", True
    emit(run, {"kind": "event", "message": message, "command": name, "command_id": command.get("id")})
    if run.env.is_main and not command.get("is_replay"):
        run.control.acknowledge(command, state.step, message, is_ok)
