"""A Run's checkpoints: saving one (gathered on rank 0, written in the background) and resuming from one
(optimizer, TrainState with its lr plan, loader position, RNG states)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from gptrain.config import RunConfig, from_toml_text, to_dict, to_toml
from gptrain.distributed import state as dstate
from gptrain.distributed.env import DistEnv
from gptrain.errors import UserError
from gptrain.files import OLD_SUFFIX, swap_in, sync_folder
from gptrain.metrics.sinks import file_offsets
from gptrain.train import checkpoint as ckpt
from gptrain.train.run_log import emit
from gptrain.train.schedule import extend_plan
from gptrain.train.setup import Run

# What a resume cannot change (the data, its split, the tokenizer, the model's shape, the seed); the
# micro batch, the number of ranks, the lr, dropout and the intervals may change.
RESUME_FIXED = ("seed", "data.source", "data.val_source", "data.text_field", "data.val_fraction", "data.val_tokens",
                "data.shard_tokens", "data.split_seed", "tokenizer.kind", "tokenizer.vocab_size",
                "tokenizer.max_train_chars", "model.n_embd", "model.n_layer", "model.n_head", "model.block_size",
                "model.bias", "model.tie_weights")


def check_resume_config(cfg: RunConfig, saved_toml: str, is_main: bool) -> RunConfig:
    """Before any data is prepared: refuse a resume whose flags change what the checkpoint was trained on.
    Returns cfg with the checkpoint's model.vocab_multiple (its embedding rows are part of the weights)."""
    saved_cfg = from_toml_text(saved_toml)
    saved_model = saved_cfg.model
    asked = replace(cfg.model, vocab_size=saved_model.vocab_size)
    if cfg.model.vocab_multiple and asked.padded_vocab_size != saved_model.padded_vocab_size:
        raise UserError(f"--resume continues the run as it was trained: its embedding has "
                        f"{saved_model.padded_vocab_size} rows ({saved_model.vocab_size} tokens, model.vocab_multiple "
                        f"{saved_model.vocab_multiple}), not {asked.padded_vocab_size}; drop --model.vocab_multiple",
                        is_echo=not is_main)
    cfg = replace(cfg, model=replace(cfg.model, vocab_multiple=saved_model.vocab_multiple))
    saved, now = _flat(to_dict(saved_cfg)), _flat(to_dict(cfg))
    for key in RESUME_FIXED:
        if key in saved and saved[key] != now.get(key):
            raise UserError(f"--resume continues the run as it was trained: its {key} is {saved[key]!r}, not "
                            f"{now.get(key)!r}; drop that flag, or fine-tune from it in a new run (--init-from)",
                            is_echo=not is_main)
    return cfg


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return out


def resume_from(run: Run, pieces: dict) -> None:
    """Load optimizer, TrainState, loader position and RNG states from a checkpoint (weights are in)."""
    saved = pieces["state"]["train"]
    if saved["step"] and saved["tokens_seen"] != saved["step"] * run.plan.tokens_per_step:
        raise UserError(f"this run trained on {saved['tokens_seen'] // saved['step']:,} tokens per step and would "
                        f"now take {run.plan.tokens_per_step:,}: keep train.batch_tokens (the global batch) when "
                        "resuming; the micro batch (--batch-size) and the number of ranks may change",
                        is_echo=not run.env.is_main)
    optim_sd = pieces["optimizer"]
    if pieces["state"].get("format", 1) == 1:  # keyed by parameter index in build_optimizer's order
        optim_sd = dstate.key_by_name(optim_sd, dstate.list_param_names(run.model, run.optimizer))
    dstate.load_optimizer_state(run.model, run.optimizer, optim_sd)
    # The stored param groups carry the old hyperparameters; the (possibly overridden) config wins.
    for group, decay in zip(run.optimizer.param_groups, (run.cfg.optim.weight_decay, 0.0), strict=True):
        group.update(weight_decay=decay, betas=(run.cfg.optim.beta1, run.cfg.optim.beta2), eps=run.cfg.optim.eps)
    fast_paths = run.state.fast_paths  # build_run applied the checkpoint's (or, from an older one, new ones)
    run.state = ckpt.TrainState(**pieces["state"]["train"])
    run.state.fast_paths = fast_paths
    if run.state.budget_plan is not None:  # a --budget run's length was measured once, and is kept
        run.plan.num_steps = run.state.budget_plan["num_steps"]
    if run.state.schedule_steps:  # a new --steps re-plans nothing silently (schedule.extend_plan)
        run.state.schedule_tails = extend_plan(run.state.step, run.state.schedule_steps, run.state.schedule_tails,
                                               run.plan.num_steps, run.cfg.schedule)
    run.train_loader.load_state_dict(pieces["state"]["loader"])
    ckpt.restore_rng(pieces["state"]["rng"], run.env.rank, fallback_seed=run.cfg.seed + run.env.rank,
                     device=run.env.device)


def save_checkpoint(run: Run, names: list[str], *, is_periodic: bool = False) -> None:
    """Gather the full state on rank 0 (a collective: every rank calls this), then write it there in
    the background; periodic ones are pruned to keep_last."""
    model_sd, optim_sd = dstate.gather_state(run.model, run.optimizer, is_main=run.env.is_main)
    rngs = run.env.gather_objects(ckpt.capture_rng(run.env.device))
    if not run.env.is_main:
        return
    bad = next((name for name, t in model_sd.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:  # never a checkpoint a resume or rollback would load into a broken model
        emit(run, {"kind": "event", "message": f"step {run.state.step}: checkpoint {', '.join(names)} not written: "
                                               f"{bad} holds non-finite values"})
        return
    opt_tensors, opt_meta = ckpt.split_optimizer_state(optim_sd)
    snapshot = ckpt.Snapshot(
        model=model_sd,
        optimizer=opt_tensors,
        state=ckpt.make_state(run.state, run.train_loader.state_dict(), opt_meta, rngs, run.dataset_dir,
                              file_offsets(run.run_dir), is_complete="final" in names, folders=names),
        config_toml=to_toml(run.cfg),
        tokenizer_json=run.tokenizer.to_json(),
    )
    folders = [run.run_dir / "checkpoints" / n for n in names]
    run.writer.submit(snapshot, folders, run.cfg.checkpoint.keep_last if is_periodic else None)


def resume_command(run: Run) -> str:
    launcher = f"torchrun --nproc_per_node {run.env.world_size} -m gptrain" if run.env.is_distributed else "gptrain"
    return f"{launcher} train --resume {run.run_dir}"


def read_resume_checkpoint(run_dir: Path, env: DistEnv) -> dict:
    """The newest checkpoint, chosen by rank 0 (every rank then reads that same folder)."""
    folder = env.on_main(ckpt.latest_checkpoint_dir, run_dir)
    return ckpt.read_checkpoint(folder)


def settle_checkpoints(run_dir: Path, resumed: Path, keep_last: int) -> None:
    """On resume (rank 0, holding the run's lock): finish what a kill interrupted. Leftover `.tmp` folders
    go; each folder the resumed checkpoint's snapshot was meant for (final/ and best/ at the last step,
    step_N/ and best/ at a new best) that is missing or older is made a copy of it; periodic folders
    are pruned to keep_last (a kill may have come between a save and its pruning)."""
    ckpts = run_dir / "checkpoints"
    for leftover in ckpts.glob("*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    resumed = ckpts / resumed.name.removesuffix(OLD_SUFFIX)  # restore_swaps gave a `.old` its name back
    state = json.loads((resumed / "state.json").read_text())
    for name in state.get("folders", []):
        target = ckpts / name
        if target == resumed or _holds_step(target, state["train"]["step"]):
            continue
        tmp = target.with_name(name + ".tmp")
        shutil.copytree(resumed, tmp)
        sync_folder(tmp)
        swap_in(tmp, target)
    ckpt.prune_periodic(ckpts, keep_last)


def _holds_step(folder: Path, step: int) -> bool:
    """Whether folder is a readable checkpoint of this step or a later one (a damaged one is not)."""
    try:
        return (folder / "state.json").is_file() and ckpt.step_of(folder) >= step
    except UserError:
        return False
