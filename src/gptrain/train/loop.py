"""train(): the one explicit training loop, with setup in small build_* functions."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch

from gptrain.config import RunConfig, from_toml_text, to_toml
from gptrain.data.loader import ShardLoader
from gptrain.data.prepare import load_dataset_tokenizer, prepare_dataset, shard_paths
from gptrain.distributed.env import DistEnv
from gptrain.errors import UserError
from gptrain.eval.val_loss import evaluate_loss
from gptrain.metrics.console import build_console_sink
from gptrain.metrics.sinks import CsvSink, JsonlSink, MetricSink, SamplesSink
from gptrain.metrics.throughput import estimate_mfu, peak_flops
from gptrain.model.gpt import GPT
from gptrain.runtime import tune_malloc
from gptrain.tokenizer import Tokenizer, load_tokenizer
from gptrain.tokenizer.base import save_tokenizer
from gptrain.train import checkpoint as ckpt
from gptrain.train.optim import build_optimizer
from gptrain.train.samples import SamplesConfig, write_sample
from gptrain.train.schedule import lr_at
from gptrain.train.step import autocast_context, train_step


@dataclass
class Plan:
    """Derived sizes, computed once and logged."""

    num_steps: int
    num_micro_steps: int  # gradient accumulation
    tokens_per_step: int


@dataclass
class Run:
    cfg: RunConfig
    env: DistEnv
    run_dir: Path
    tokenizer: Tokenizer
    model: GPT
    step_model: torch.nn.Module  # the model the step calls: compiled or not
    optimizer: torch.optim.Optimizer
    train_loader: ShardLoader
    val_loader: ShardLoader
    plan: Plan
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)
    sinks: list[MetricSink] = field(default_factory=list)
    writer: ckpt.CheckpointWriter = field(default_factory=ckpt.CheckpointWriter)
    should_stop: bool = False  # set by Ctrl-C; the loop stops at the next step boundary


def derive_plan(cfg: RunConfig, loader: ShardLoader, world_size: int) -> Plan:
    """Accumulation from the global batch (tokens), micro batch and world size; steps from epochs."""
    micro_tokens = cfg.train.batch_size * cfg.model.block_size * world_size
    batch_tokens = cfg.train.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise UserError(
            f"train.batch_tokens={batch_tokens} is not a multiple of batch_size x block_size x world_size "
            f"= {micro_tokens}: pick a multiple, or 0 for no accumulation"
        )
    num_micro_steps = batch_tokens // micro_tokens
    num_steps = cfg.train.num_steps
    if cfg.train.num_epochs > 0:
        sequences_per_step = cfg.train.batch_size * num_micro_steps
        num_steps = max(1, math.ceil(cfg.train.num_epochs * loader.windows_per_epoch / sequences_per_step))
    return Plan(num_steps=num_steps, num_micro_steps=num_micro_steps, tokens_per_step=batch_tokens)


def check_run_dir(cfg: RunConfig, *, is_resume: bool, should_overwrite: bool) -> Path:
    """The run directory to use; refuses (before any work) an existing one unless resuming or overwriting."""
    run_dir = Path(cfg.run_dir or f"runs/{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} is a file: choose another --run-dir")
    if is_resume:
        if not (run_dir / "config.toml").is_file():
            raise UserError(f"{run_dir} is not a run directory (no config.toml in it)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not should_overwrite:
            raise UserError(f"run directory {run_dir} already exists: pass --resume {run_dir} to continue it, "
                            "--overwrite to replace it, or choose another --run-dir")
        if not is_run_dir(run_dir):
            raise UserError(f"{run_dir} is not a gptrain run (no config.toml and checkpoints/): --overwrite "
                            "only replaces runs; choose another --run-dir")
    return run_dir


def is_run_dir(path: Path) -> bool:
    """A folder gptrain made: config.toml that parses, checkpoints/, and not the working directory or above."""
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        return False
    if not ((path / "checkpoints").is_dir() and (path / "config.toml").is_file()):
        return False
    try:
        from_toml_text((path / "config.toml").read_text(encoding="utf-8"))
    except UserError:
        return False
    return True


def create_run_dir(run: Run, *, should_overwrite: bool) -> None:
    """Make the run directory once everything is known to work, and write config.toml and tokenizer.json."""
    if not run.env.is_main:
        return
    if should_overwrite and run.run_dir.exists() and is_run_dir(run.run_dir):
        shutil.rmtree(run.run_dir)
    (run.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    tmp = run.run_dir / "config.toml.tmp"
    tmp.write_text(to_toml(run.cfg), encoding="utf-8")
    tmp.replace(run.run_dir / "config.toml")
    save_tokenizer(run.tokenizer, run.run_dir / "tokenizer.json")


def base_config_for_init(cfg: RunConfig, config_toml: str) -> RunConfig:
    """Fine-tuning keeps the checkpoint's architecture and tokenizer; only dropout may change."""
    base = from_toml_text(config_toml)
    return replace(cfg, model=replace(base.model, dropout=cfg.model.dropout), tokenizer=base.tokenizer)


def checked_sample_prompt(cfg: SamplesConfig, tokenizer: Tokenizer) -> SamplesConfig:
    """A prompt the tokenizer cannot encode fails now, not at the first sample; the default prompt
    (a line break) falls back to the start of a document for corpora without line breaks."""
    try:
        tokenizer.encode(cfg.prompt)
    except UserError:
        if cfg.prompt != SamplesConfig().prompt:
            raise
        return replace(cfg, prompt="")
    return cfg


def build_run(cfg: RunConfig, env: DistEnv, run_dir: Path, fixed_tokenizer: Tokenizer | None, log) -> Run:
    """Data (prepared if needed), tokenizer, model, optimizer and loaders. Writes nothing in run_dir.

    fixed_tokenizer: the tokenizer a resumed run or a fine-tuned checkpoint already uses.
    """
    dataset = prepare_dataset(cfg.data, cfg.tokenizer, tokenizer=fixed_tokenizer, log=log)
    tokenizer = fixed_tokenizer or load_dataset_tokenizer(dataset)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=tokenizer.vocab_size))
    cfg = replace(cfg, samples=checked_sample_prompt(cfg.samples, tokenizer))
    model = GPT(cfg.model).to(env.device)
    loader_args = dict(batch_size=cfg.train.batch_size, block_size=cfg.model.block_size,
                       rank=env.rank, world_size=env.world_size)
    train_loader = ShardLoader(shard_paths(dataset, "train"), seed=cfg.seed, **loader_args)
    val_loader = ShardLoader(shard_paths(dataset, "val"), shuffle=False, split="val", **loader_args)
    plan = derive_plan(cfg, train_loader, env.world_size)
    optimizer = build_optimizer(model, cfg.optim, lr_at(0, plan.num_steps, cfg.schedule))
    use_compile = cfg.train.compile == "on" or (cfg.train.compile == "auto" and env.device.startswith("cuda"))
    step_model = torch.compile(model) if use_compile else model
    return Run(cfg=cfg, env=env, run_dir=run_dir, tokenizer=tokenizer, model=model, step_model=step_model,
               optimizer=optimizer, train_loader=train_loader, val_loader=val_loader, plan=plan)


def resume_from(run: Run, folder: Path) -> None:
    """Load weights, optimizer, TrainState, loader position and RNG states from a checkpoint."""
    pieces = ckpt.read_checkpoint(folder)
    ckpt.load_model_weights(run.model, pieces["model"], folder)
    run.optimizer.load_state_dict(pieces["optimizer"])
    # The stored param groups carry the old hyperparameters; the (possibly overridden) config wins.
    for group, decay in zip(run.optimizer.param_groups, (run.cfg.optim.weight_decay, 0.0), strict=True):
        group.update(weight_decay=decay, betas=(run.cfg.optim.beta1, run.cfg.optim.beta2), eps=run.cfg.optim.eps)
    run.state = ckpt.TrainState(**pieces["state"]["train"])
    run.train_loader.load_state_dict(pieces["state"]["loader"])
    ckpt.restore_rng(pieces["state"]["rng"])


def save(run: Run, names: list[str], *, is_periodic: bool = False) -> None:
    """Snapshot now (CPU copies), write in the background; periodic ones are pruned to keep_last."""
    if not run.env.is_main:
        return
    opt_tensors, opt_meta = ckpt.optimizer_snapshot(run.optimizer)
    snapshot = ckpt.Snapshot(
        model=ckpt.model_tensors(run.model),
        optimizer=opt_tensors,
        state=ckpt.make_state(run.state, run.train_loader.state_dict(), opt_meta),
        config_toml=to_toml(run.cfg),
        tokenizer_json=run.tokenizer.to_json(),
    )
    folders = [run.run_dir / "checkpoints" / n for n in names]
    run.writer.submit(snapshot, folders, run.cfg.checkpoint.keep_last if is_periodic else None)


def emit(run: Run, row: dict) -> None:
    row = {"step": run.state.step, "time": time.time(), **row}
    for sink in run.sinks:
        sink.emit(row)


def validate(run: Run) -> tuple[float, list[str]]:
    """Evaluate and track the best val loss; returns the loss and ["best"] when best/ should be saved."""
    autocast = autocast_context(run.env.device, run.cfg.train.precision)
    metrics = evaluate_loss(run.model, run.val_loader, run.cfg.eval.num_batches, run.env.device, autocast)
    emit(run, {"kind": "val", **metrics})
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
            "is_stopped": text is None}


def sample(run: Run) -> str:
    text = write_sample(run.model, run.tokenizer, run.cfg.samples, run.env.device)
    emit(run, {"kind": "sample", "text": text})
    return text


def is_due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def build_sinks(run: Run) -> list[MetricSink]:
    if not run.env.is_main:
        return []
    console = build_console_sink(run.cfg.log, run.plan.num_steps, run.cfg.train.log_every_steps,
                                 title=f"gptrain · {run.run_dir}")
    return [JsonlSink(run.run_dir / "metrics.jsonl"), CsvSink(run.run_dir / "metrics.csv"),
            SamplesSink(run.run_dir / "samples.txt"), console]


def train(
    cfg: RunConfig,
    *,
    resume: str | Path | None = None,
    init_from: str | Path | None = None,
    should_overwrite: bool = False,
    should_tune_malloc: bool = False,
    log=print,
) -> dict:
    """Train a model as cfg says; returns a summary (run_dir, steps, losses, seconds, last sample).

    resume: a run directory to continue from its latest checkpoint; pass its own config
    (`resolve_config(run_dir / "config.toml", overrides)`), as `gptrain train --resume` does.
    init_from: a checkpoint (or run) whose weights, sizes and tokenizer to start from.
    should_tune_malloc: keep freed memory in the heap once setup is done (see runtime.tune_malloc).
    """
    if resume is not None:
        if should_overwrite or init_from is not None:
            raise UserError("--resume continues a run as it is: it cannot be combined with --overwrite or --init-from")
        cfg = replace(cfg, run_dir=str(resume))
    env = DistEnv.from_environment(cfg.device)
    if env.world_size > 1:
        # TODO(torchrun issue): DDP / ZeRO-1 / FSDP; until then, ranks would train unsynchronised copies.
        raise UserError("multi-process training (torchrun) is not supported yet: run one process")
    torch.manual_seed(cfg.seed)
    run_dir = check_run_dir(cfg, is_resume=resume is not None, should_overwrite=should_overwrite)
    fixed_tokenizer = None
    if resume is not None:
        resume_dir = ckpt.latest_checkpoint_dir(run_dir)
        fixed_tokenizer = load_tokenizer(resume_dir / "tokenizer.json")
    elif init_from is not None:
        init_dir = ckpt.resolve_checkpoint_dir(init_from)
        init_pieces = ckpt.read_checkpoint(init_dir, with_optimizer=False)
        cfg = base_config_for_init(cfg, init_pieces["config_toml"])
        fixed_tokenizer = load_tokenizer(init_pieces["tokenizer_path"])
    run = build_run(cfg, env, run_dir, fixed_tokenizer, log)
    if should_tune_malloc:
        tune_malloc()  # after setup, so the corpus tokenizing's peak memory was returned to the OS
    if resume is not None:
        resume_from(run, resume_dir)
    elif init_from is not None:
        ckpt.load_model_weights(run.model, init_pieces["model"], init_dir)
    create_run_dir(run, should_overwrite=should_overwrite)
    run.sinks = build_sinks(run)
    if resume is not None:
        emit(run, {"kind": "event", "message": f"resumed from step {run.state.step}", "resumed_from": run.state.step})
    try:
        with stop_on_interrupt(run):
            return _loop(run)
    finally:
        run.writer.wait()
        for sink in run.sinks:
            sink.close()


@contextlib.contextmanager
def stop_on_interrupt(run: Run):
    """The first Ctrl-C asks the loop to stop at the next step boundary (and checkpoint there, so the
    run resumes exactly); a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        if run.should_stop:
            raise KeyboardInterrupt
        run.should_stop = True

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _loop(run: Run) -> dict:
    cfg, env, state, plan = run.cfg, run.env, run.state, run.plan
    autocast = autocast_context(env.device, cfg.train.precision)
    peak = peak_flops(env.device)
    n_params = run.model.num_parameters()
    emit(run, {"kind": "event", "message": (
        f"run {run.run_dir} | {n_params:,} parameters | device {env.device} | {plan.num_steps} steps of "
        f"{plan.tokens_per_step:,} tokens ({plan.num_micro_steps} micro steps) | "
        f"{run.train_loader.num_tokens:,} train tokens")})
    is_early_stop, last_loss = False, float("nan")
    recent: list[float] = []
    run.model.train()
    while state.step < plan.num_steps and not is_early_stop:
        started = time.perf_counter()
        lr = lr_at(state.step, plan.num_steps, cfg.schedule)
        is_guarded = cfg.train.spike_factor > 0 and state.loss_ema is not None and state.step >= 10
        max_loss = cfg.train.spike_factor * state.loss_ema if is_guarded else float("inf")
        result = train_step(run.step_model, run.optimizer, run.train_loader, num_micro_steps=plan.num_micro_steps,
                            lr=lr, grad_clip=cfg.optim.grad_clip, device=env.device, autocast=autocast,
                            max_loss=max_loss)
        state.step += 1
        state.tokens_seen += plan.tokens_per_step
        seconds = time.perf_counter() - started
        state.elapsed_seconds += seconds
        last_loss = result.loss
        if not result.is_applied:
            state.num_bad_steps += 1
            emit(run, {"kind": "event", "message": f"step {state.step}: loss {last_loss:.4g} is non-finite or a "
                                                   f"spike (limit {max_loss:.4g}); update skipped"})
            if state.num_bad_steps >= cfg.train.max_bad_steps:
                raise UserError(f"{state.num_bad_steps} bad steps in a row: lower schedule.peak_lr "
                                f"(now {cfg.schedule.peak_lr}) or check the data")
        else:
            state.num_bad_steps = 0
            state.loss_ema = last_loss if state.loss_ema is None else 0.9 * state.loss_ema + 0.1 * last_loss
        recent = (recent + [seconds])[-20:]
        mean_step_seconds = sum(recent) / len(recent)
        tokens_per_second = plan.tokens_per_step / mean_step_seconds
        emit(run, {"kind": "train", "loss": last_loss, "lr": lr, "grad_norm": result.grad_norm,
                   "tokens_per_second": tokens_per_second, "mfu": estimate_mfu(run.model.config, tokens_per_second,
                   peak), "tokens_seen": state.tokens_seen, "epoch": run.train_loader.epochs_done,
                   "eta_seconds": (plan.num_steps - state.step) * mean_step_seconds})
        if state.step == plan.num_steps:
            break
        if is_due(state.step, cfg.eval.every_steps):
            _, names = validate(run)
            if names:
                save(run, names)
            is_early_stop = 0 < cfg.eval.patience <= state.num_bad_evals
            if is_early_stop:
                emit(run, {"kind": "event", "message": f"early stop: val loss has not improved for "
                                                       f"{state.num_bad_evals} evaluations"})
        if is_due(state.step, cfg.samples.every_steps):
            sample(run)
        is_periodic = is_due(state.step, cfg.checkpoint.every_steps)
        is_stopping = run.should_stop and not is_early_stop
        if is_periodic or is_stopping:
            save(run, [f"{ckpt.STEP_PREFIX}{state.step:06d}"], is_periodic=is_periodic)
        if is_stopping:
            emit(run, {"kind": "event", "message": f"stopped at step {state.step} (checkpoint saved); "
                                                   f"continue with: gptrain train --resume {run.run_dir}"})
            return summarize(run, last_loss, None, None)
    final_val_loss, names = validate(run)
    text = sample(run)
    save(run, ["final", *names])  # one snapshot for both when the last evaluation is also the best
    run.writer.wait()
    emit(run, {"kind": "event", "message": f"done: {state.step} steps in {state.elapsed_seconds:.0f}s | "
                                           f"best val loss {state.best_val_loss:.4f} | {run.run_dir}"})
    return summarize(run, last_loss, final_val_loss, text)
