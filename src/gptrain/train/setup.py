"""Setting up a run: derived sizes, data (prepared once across ranks), model and its parallel wrapping,
optimizer and loaders. Nothing here writes into the run directory except create_run_dir."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from gptrain.config import RunConfig, from_toml_text, to_toml
from gptrain.data.dataset import (
    check_dataset_tokenizer,
    dataset_fingerprint,
    find_shard_folder,
    load_dataset_tokenizer,
    shard_paths,
)
from gptrain.data.loader import ShardLoader
from gptrain.data.prepare import DataConfig, prepare_dataset
from gptrain.data.ranks import failure_marker, wait_for_dataset, write_failure_marker
from gptrain.distributed import parallel
from gptrain.distributed.env import DistEnv
from gptrain.errors import UserError
from gptrain.eval.hellaswag import Item, hellaswag_file, read_items
from gptrain.eval.val_loss import EvalConfig, num_eval_windows, sample_windows, val_set_id
from gptrain.files import write_atomic
from gptrain.metrics.sinks import MetricSink
from gptrain.metrics.system import SystemSampler
from gptrain.model.gpt import GPT
from gptrain.runtime import tune_malloc
from gptrain.tokenizer import Tokenizer, TokenizerConfig
from gptrain.tokenizer.base import save_tokenizer
from gptrain.train import checkpoint as ckpt
from gptrain.train.budget import PROVISIONAL_STEPS
from gptrain.train.control import ControlReader
from gptrain.train.fast_paths import apply_fast_paths
from gptrain.train.optim import build_optimizer
from gptrain.train.run_dir import is_run_dir
from gptrain.train.samples import SamplesConfig
from gptrain.train.schedule import lr_at, resolve_warmup
from gptrain.train.step import StepResult, TrainConfig, autocast_context, train_step, uses_bf16


@dataclass
class Plan:
    """Derived sizes, computed once and logged."""

    num_steps: int
    num_micro_steps: int  # gradient accumulation
    tokens_per_step: int  # global batch, all ranks together
    strategy: str  # none (one process), ddp, zero1, fsdp
    world_size: int


@dataclass
class Run:
    cfg: RunConfig
    env: DistEnv
    run_dir: Path
    tokenizer: Tokenizer
    model: GPT  # the unwrapped model (FSDP2 shards it in place): evaluation, sampling, checkpoints
    step_model: torch.nn.Module  # the module the step calls: DDP-wrapped and/or compiled, or the model
    optimizer: torch.optim.Optimizer
    train_loader: ShardLoader
    val_loader: ShardLoader
    plan: Plan
    state: ckpt.TrainState = field(default_factory=ckpt.TrainState)
    sinks: list[MetricSink] = field(default_factory=list)
    writer: ckpt.CheckpointWriter = field(default_factory=ckpt.CheckpointWriter)
    should_stop: bool = False  # set by Ctrl-C/SIGTERM on this rank; all ranks agree at the step's end
    stop_signal: int = 0  # the signal that asked this rank to stop (0: none, or another rank's)
    last_val_loss: float | None = None
    dataset_dir: Path | None = None
    val_windows: np.ndarray | None = None  # the val sample: the same windows at every evaluation
    val_set: str = ""  # its id (eval.val_set_id): runs with equal ids were validated on the same tokens
    byte_lengths: list[int] = field(default_factory=list)  # UTF-8 bytes of each token id, for bits per byte
    hellaswag_items: list[Item] = field(default_factory=list)  # scored with validations when eval.hellaswag_*
    control: ControlReader | None = None  # rank 0: control.jsonl, read at step boundaries
    fast_paths_note: str = ""  # how the fast paths were chosen (logged once sinks exist)
    system: SystemSampler | None = None  # rank 0: system-use rows every few seconds
    pending: list[dict] = field(default_factory=list)  # rank 0: commands to apply at this step boundary
    replays: list[dict] = field(default_factory=list)  # rank 0: state commands to apply again after a resume
    is_paused: bool = False
    launched_at: float = 0.0  # time.monotonic() when train() began: a --budget counts from there
    paused_seconds: float = 0.0  # spent paused (left out of the budget)
    budget_planned_here: bool = False  # this launch planned the --budget run's steps (and keeps its deadline)
    longest_tail_seconds: float = 0.0  # this launch's longest evaluation, sample and save after a step
    is_save_requested: bool = False  # a save command: checkpoint at this step boundary


def check_before_data(cfg: RunConfig, world_size: int) -> None:
    """What can be refused before any data is prepared (so a refused run has changed no file): the batch
    layout, and the warmup against a run given in steps. Checks that need the data come after it."""
    global_batch_tokens(cfg, world_size)
    if cfg.train.num_epochs <= 0 and not cfg.train.budget:
        resolve_warmup(cfg.schedule, cfg.train.num_steps)


def global_batch_tokens(cfg: RunConfig, world_size: int) -> int:
    micro_tokens = cfg.train.batch_size * cfg.model.block_size * world_size
    batch_tokens = cfg.train.batch_tokens or micro_tokens
    if batch_tokens % micro_tokens:
        raise UserError(
            f"train.batch_tokens={batch_tokens} is not a multiple of batch_size x block_size x world_size "
            f"= {micro_tokens}: pick a multiple, or 0 for no accumulation"
        )
    return batch_tokens


def derive_plan(cfg: RunConfig, loader: ShardLoader, world_size: int) -> Plan:
    """Accumulation from the global batch (tokens), micro batch and world size; steps from epochs."""
    micro_tokens = cfg.train.batch_size * cfg.model.block_size * world_size
    batch_tokens = global_batch_tokens(cfg, world_size)
    num_micro_steps = batch_tokens // micro_tokens
    num_steps = cfg.train.num_steps
    if cfg.train.budget:  # fixed after the first steps are timed (train/budget.py)
        num_steps = PROVISIONAL_STEPS
    elif cfg.train.num_epochs > 0:
        sequences_per_step = batch_tokens // cfg.model.block_size
        num_steps = max(1, math.ceil(cfg.train.num_epochs * loader.windows_per_epoch / sequences_per_step))
    return Plan(num_steps=num_steps, num_micro_steps=num_micro_steps, tokens_per_step=batch_tokens,
                strategy=parallel.resolve_strategy(cfg.parallel, world_size), world_size=world_size)


def create_run_dir(run: Run, *, should_overwrite: bool) -> None:
    """Make the run directory once everything is known to work, and write config.toml and tokenizer.json."""
    if not run.env.is_main:
        return
    if should_overwrite and run.run_dir.exists() and is_run_dir(run.run_dir):
        shutil.rmtree(run.run_dir)
    (run.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_atomic(run.run_dir / "config.toml", to_toml(run.cfg))
    save_tokenizer(run.tokenizer, run.run_dir / "tokenizer.json")


SHAPE_KEYS = ("n_embd", "n_layer", "n_head", "bias", "tie_weights", "vocab_multiple")


def _describe(tok: TokenizerConfig) -> str:
    return f"{tok.kind} with vocabulary {tok.vocab_size}" if tok.kind == "bpe" else tok.kind


def config_for_init(cfg: RunConfig, config_toml: str, weights: dict, explicit: set[str] | None,
                    log) -> tuple[RunConfig, dict]:
    """Fine-tuning keeps the checkpoint's shape and tokenizer: a size or tokenizer given on the command
    line that differs is refused (not silently dropped); a smaller --context crops the position table,
    with a note. explicit: the keys the command line set (None: those that differ from the defaults)."""
    base, default = from_toml_text(config_toml), RunConfig()

    def given(section: str, name: str) -> bool:
        if explicit is not None:
            return f"{section}.{name}" in explicit
        return getattr(getattr(cfg, section), name) != getattr(getattr(default, section), name)

    for name in SHAPE_KEYS:
        if given("model", name) and getattr(cfg.model, name) != getattr(base.model, name):
            raise UserError(f"--init-from keeps the checkpoint's shape: its model.{name} is "
                            f"{getattr(base.model, name)}, not {getattr(cfg.model, name)}; drop that flag")
    tok_now, tok_base = cfg.tokenizer, base.tokenizer
    if given("tokenizer", "kind") and (tok_now.kind, tok_now.vocab_size) != (tok_base.kind, tok_base.vocab_size):
        if tok_now.kind != tok_base.kind or tok_now.kind == "bpe":
            raise UserError(f"--init-from keeps the checkpoint's tokenizer ({_describe(tok_base)}); a model cannot "
                            f"change to --tokenizer {_describe(tok_now)}: drop that flag")
    block_size = base.model.block_size
    if given("model", "block_size") and cfg.model.block_size != block_size:
        if cfg.model.block_size > block_size:
            raise UserError(f"the checkpoint's position table has {block_size} positions: --context "
                            f"{cfg.model.block_size} needs more; use --context {block_size} or less")
        block_size = cfg.model.block_size
        weights = dict(weights, **{"transformer.wpe.weight": weights["transformer.wpe.weight"][:block_size]})
        log(f"note: the position table is cropped from {base.model.block_size} to {block_size} positions")
    model = replace(base.model, dropout=cfg.model.dropout, block_size=block_size)
    return replace(cfg, model=model, tokenizer=base.tokenizer), weights


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


def prepare_data(data: DataConfig, tok_cfg: TokenizerConfig, env: DistEnv, fixed_tokenizer: Tokenizer | None,
                 log) -> Path:
    """One rank prepares (rank 0, or local rank 0 of each node with data.prepare_per_node); the others
    wait on its files, not on a collective, since preparing a big corpus outlasts any collective timeout."""
    is_preparer = env.is_main or (data.prepare_per_node and env.local_rank == 0)
    log = log if env.is_main else (lambda *_: None)  # only rank 0 writes to the console
    is_ready = env.on_main(find_shard_folder, data.source) is not None  # one answer for every rank
    if not env.is_distributed or is_ready:
        return prepare_dataset(data, tok_cfg, tokenizer=fixed_tokenizer, log=log)
    if is_preparer:
        failure_marker(data, tok_cfg, fixed_tokenizer).unlink(missing_ok=True)
    env.barrier()  # no rank may see the previous attempt's failure marker
    folder, error = None, None
    try:
        if is_preparer:
            folder = prepare_dataset(data, tok_cfg, tokenizer=fixed_tokenizer, log=log)
        else:
            folder = wait_for_dataset(data, tok_cfg, fixed_tokenizer)
    except Exception as e:
        if is_preparer:
            write_failure_marker(data, tok_cfg, fixed_tokenizer, str(e) or type(e).__name__)
        if not data.prepare_per_node:
            raise
        error = str(e) or type(e).__name__
    if data.prepare_per_node:
        # Nodes finish at different times and a failure marker stays on its node's disk: every rank
        # tells every other how it went, in a gloo group that waits as long as preparation may take.
        errors = [e for e in env.all_gather_objects(error, timeout_seconds=data.prepare_timeout_seconds) if e]
        if errors:
            raise UserError(f"data preparation failed on a node: {errors[0]}", is_echo=not env.is_main)
    return folder


def configure_device(train: TrainConfig, env: DistEnv) -> None:
    """Process-wide settings for the device: TF32 tensor cores for fp32 matmuls on CUDA."""
    if env.device.startswith("cuda") and train.use_tf32:
        torch.set_float32_matmul_precision("high")  # fp32 matmuls on TF32 (10-bit mantissa inputs)


def build_run(cfg: RunConfig, env: DistEnv, run_dir: Path, fixed_tokenizer: Tokenizer | None,
              weights: dict | None, log, saved_fast_paths: dict | None = None, *, should_tune_malloc: bool = False,
              can_probe: bool = True) -> Run:
    """Data (prepared if needed), tokenizer, model (with the given weights), its parallel wrapping,
    optimizer and loaders. Writes nothing in run_dir.

    fixed_tokenizer: the tokenizer a resumed run or a fine-tuned checkpoint already uses;
    saved_fast_paths: a resumed run's fast-path choices (train/fast_paths.py);
    should_tune_malloc: runtime.tune_malloc() once the data is ready (the corpus tokenizing's peak memory
    was returned to the OS) and before the model, so a speed probe times steps as training runs them;
    can_probe: whether an unmeasured long CPU run may measure torch.compile now (not in dry runs).
    """
    try:
        check_before_data(cfg, env.world_size)
    except UserError as e:  # every rank makes the same mistake: rank 0 says it
        e.is_echo = not env.is_main
        raise
    dataset = prepare_data(cfg.data, cfg.tokenizer, env, fixed_tokenizer, log)
    items = read_hellaswag(cfg.eval, env, log)
    if should_tune_malloc:
        tune_malloc()
    try:
        run = _build_on(dataset, cfg, env, run_dir, fixed_tokenizer, weights, saved_fast_paths, log, can_probe)
    except UserError as e:  # from here on, the same inputs give every rank the same mistake: rank 0 says it
        e.is_echo = not env.is_main
        raise
    run.hellaswag_items = items
    return run


def read_hellaswag(cfg: EvalConfig, env: DistEnv, log) -> list[Item]:
    """The HellaSwag items to score during training (none when off): rank 0 downloads and reads them
    and sends them to the others (a few MB), so nodes need not share a file system."""
    if not cfg.hellaswag_every_steps:
        return []
    return env.on_main(lambda: read_items(hellaswag_file(cfg.hellaswag_file or None, log), cfg.hellaswag_limit or None))


def _build_on(dataset: Path, cfg: RunConfig, env: DistEnv, run_dir: Path, fixed_tokenizer: Tokenizer | None,
              weights: dict | None, saved_fast_paths: dict | None, log, can_probe: bool) -> Run:
    tokenizer = fixed_tokenizer or load_dataset_tokenizer(dataset, cfg.tokenizer)
    check_dataset_tokenizer(dataset, tokenizer)
    model_cfg = replace(cfg.model, vocab_size=tokenizer.vocab_size)  # the padding stored resolved, as the shape is
    cfg = replace(cfg, model=replace(model_cfg, vocab_multiple=model_cfg.resolved_vocab_multiple))
    cfg = replace(cfg, samples=checked_sample_prompt(cfg.samples, tokenizer))
    loader_args = dict(batch_size=cfg.train.batch_size, block_size=cfg.model.block_size,
                       rank=env.rank, world_size=env.world_size)
    train_loader = ShardLoader(shard_paths(dataset, "train"), seed=cfg.seed, fingerprint=dataset_fingerprint(dataset),
                               **loader_args)
    val_loader = ShardLoader(shard_paths(dataset, "val"), shuffle=False, split="val", **loader_args)
    plan = derive_plan(cfg, train_loader, env.world_size)
    parallel.check_strategy_supported(plan.strategy, env.device)
    train_loader.global_batch_tokens = plan.tokens_per_step
    # The global batch and the val set are part of the run: stored resolved, so a resume on another
    # number of ranks or with another micro batch keeps both.
    eval_tokens = num_eval_windows(cfg.eval, cfg.train.batch_size, cfg.model.block_size) * cfg.model.block_size
    cfg = replace(cfg, train=replace(cfg.train, batch_tokens=plan.tokens_per_step),
                  eval=replace(cfg.eval, num_tokens=eval_tokens), schedule=resolve_warmup(cfg.schedule, plan.num_steps))
    val_windows = sample_windows(val_loader, eval_tokens // cfg.model.block_size)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (FSDP2 does not broadcast them)
    model = GPT(cfg.model)
    if plan.strategy != "fsdp":  # FSDP2 moves each block to the device as it shards it: a model bigger
        model.to(env.device)     # than one device never sits there whole
    if weights is not None:  # before wrapping: FSDP2 shards the weights the model holds
        ckpt.load_model_weights(model, weights, run_dir)
    if env.rank:  # distinct dropout masks per rank (rank 0 keeps the single-process stream)
        torch.manual_seed(cfg.seed + env.rank)
    if cfg.train.use_activation_checkpointing:
        parallel.apply_activation_checkpointing(model.transformer.h)
    is_bf16 = uses_bf16(env.device, cfg.train.precision)
    # FSDP's bf16 parameter casts on CUDA only: on the CPU bf16 is autocast over fp32 weights, as in one process
    wrapped = parallel.wrap_model(model, plan.strategy, cfg.parallel, env,
                                  use_bf16=is_bf16 and env.device.startswith("cuda"))
    optimizer = build_optimizer(model, cfg.optim, lr_at(0, plan.num_steps, cfg.schedule),
                                shard_state=plan.strategy == "zero1")
    run = Run(cfg=cfg, env=env, run_dir=run_dir, tokenizer=tokenizer, model=model, step_model=wrapped,
              optimizer=optimizer, train_loader=train_loader, val_loader=val_loader, plan=plan, dataset_dir=dataset,
              val_windows=val_windows, val_set=val_set_id(train_loader.fingerprint, val_windows, cfg.model.block_size),
              byte_lengths=tokenizer.byte_lengths())
    run.fast_paths_note = apply_fast_paths(run, saved_fast_paths, log, can_probe)  # linear kernels, compile
    return run


def step_run(run: Run, lr: float, max_loss: float = float("inf"), has_commands=lambda: False) -> StepResult:
    """One optimizer step of the run on every rank, through its strategy's gradient sync and reductions."""
    cfg, env, plan = run.cfg, run.env, run.plan

    def sync(is_last: bool):
        return parallel.gradient_sync(run.step_model, plan.strategy, cfg.parallel, is_last=is_last)

    return train_step(run.step_model, run.optimizer, run.train_loader, num_micro_steps=plan.num_micro_steps, lr=lr,
                      grad_clip=cfg.optim.grad_clip, device=env.device,
                      autocast=autocast_context(env.device, cfg.train.precision), max_loss=max_loss,
                      gradient_sync=sync, reduce_sum=env.all_reduce_sum, world_size=env.world_size,
                      is_stop_requested=lambda: run.should_stop, has_commands=has_commands)

