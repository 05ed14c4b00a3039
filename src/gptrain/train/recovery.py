"""Bad steps and what follows them. A step whose loss or gradient is non-finite, or whose loss is a
spike (train.spike_factor), is skipped (train/step.py). After train.max_bad_steps of them within the
last train.bad_step_window steps the run rolls back to the weights and optimizer state of its newest
checkpoint (every checkpoint holds finite weights: save_checkpoint refuses others), or to a fresh
initialisation from the seed when it has none, while the step counter, the schedule and the loader
go on (the data that hurt is not seen again). The lr is then multiplied by train.recovery_factor,
ramping back to 1 over train.recovery_steps; after train.max_rollbacks rollbacks the run gives up
(exit 1). Each of these is an event row. The rollback state is in TrainState, so a resume continues it
exactly.
"""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from gptrain.distributed import state as dstate
from gptrain.errors import TrainingDiverged
from gptrain.model.gpt import GPT
from gptrain.train import checkpoint as ckpt
from gptrain.train.run_log import emit
from gptrain.train.setup import Run


def recovery_factor(run: Run) -> float:
    """The lr multiplier after a rollback: train.recovery_factor at the rollback, rising linearly to 1."""
    cfg, start = run.cfg.train, run.state.recovery_start_step
    if start is None:
        return 1.0
    progress = min(1.0, (run.state.step - start) / max(1, cfg.recovery_steps))
    return cfg.recovery_factor + (1.0 - cfg.recovery_factor) * progress


def note_bad_step(run: Run, loss: float, max_loss: float) -> None:
    """A skipped update (every rank sees the same loss, so every rank decides the same)."""
    state, cfg = run.state, run.cfg.train
    state.bad_steps = [s for s in state.bad_steps if s > state.step - cfg.bad_step_window] + [state.step]
    state.num_bad_steps = len(state.bad_steps)
    emit(run, {"kind": "event", "message": f"step {state.step}: loss {loss:.4g} is non-finite or a spike "
                                           f"(limit {max_loss:.4g}); update skipped", "is_bad_step": True})
    if len(state.bad_steps) >= cfg.max_bad_steps:
        roll_back(run)


def roll_back(run: Run) -> None:
    state, cfg = run.state, run.cfg.train
    if state.num_rollbacks >= cfg.max_rollbacks:
        raise TrainingDiverged(
            f"gave up at step {state.step}: {len(state.bad_steps)} bad steps within {cfg.bad_step_window} steps "
            f"again after {state.num_rollbacks} rollback(s); lower schedule.peak_lr (now "
            f"{run.cfg.schedule.peak_lr}), raise train.spike_factor or check the data")
    run.writer.wait()  # the newest checkpoint is whole on disk before it is chosen
    folder = run.env.on_main(_newest_checkpoint, run.run_dir)
    if folder is None:
        with torch.random.fork_rng(devices=[]):  # the weights the run started from, without touching its RNG
            torch.manual_seed(run.cfg.seed)
            model_sd, optim_sd, loss_ema = GPT(run.model.config).state_dict(), {"state": {}}, None
        source = f"a fresh initialisation (seed {run.cfg.seed})"
    else:
        pieces = ckpt.read_checkpoint(folder)
        model_sd, optim_sd = pieces["model"], pieces["optimizer"]
        if pieces["state"].get("format", 1) == 1:  # keyed by parameter index
            optim_sd = dstate.key_by_name(optim_sd, dstate.list_param_names(run.model, run.optimizer))
        loss_ema, source = pieces["state"]["train"].get("loss_ema"), f"checkpoint {folder.name}"
    _load_weights(run, model_sd)
    _load_optimizer(run, optim_sd)
    state.num_rollbacks += 1
    state.bad_steps, state.num_bad_steps, state.loss_ema = [], 0, loss_ema
    state.recovery_start_step = state.step
    emit(run, {"kind": "event", "rollback": state.num_rollbacks, "message": (
        f"step {state.step}: {cfg.max_bad_steps} bad steps within {cfg.bad_step_window}: rolled back to the weights "
        f"of {source}, data position kept; lr x {cfg.recovery_factor} rising to x1 over {cfg.recovery_steps} "
        f"steps (rollback {state.num_rollbacks} of at most {cfg.max_rollbacks})")})


def _newest_checkpoint(run_dir):
    try:
        return ckpt.latest_checkpoint_dir(run_dir)
    except Exception:  # noqa: BLE001 -- none (a UserError) or unreadable: start from step 0 instead
        return None


def _load_weights(run: Run, model_sd: dict) -> None:
    """Full weights into the live (possibly wrapped or sharded) model, in place."""
    if run.plan.strategy == "fsdp":
        tied = {name: model_sd[kept] for name, kept in _tied_pairs(run.model) if kept in model_sd}
        set_model_state_dict(run.model, model_sd | tied, options=StateDictOptions(full_state_dict=True))
    else:
        ckpt.load_model_weights(run.model, model_sd, run.run_dir)


def _tied_pairs(model) -> list[tuple[str, str]]:
    return [("lm_head.weight", "transformer.wte.weight")] if "lm_head.weight" in dstate.find_tied_names(model) else []


def _load_optimizer(run: Run, optim_sd: dict) -> None:
    if optim_sd["state"]:
        dstate.load_optimizer_state(run.model, run.optimizer, optim_sd)
        return
    inner = getattr(run.optimizer, "optim", run.optimizer)  # ZeRO-1 wraps the real optimizer
    inner.state.clear()
