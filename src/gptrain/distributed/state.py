"""Model and optimizer state keyed by parameter names, gathered from (and loaded into) any strategy.

A checkpoint must not depend on how many ranks wrote it or how they were sharded: torch's own
`torch.distributed.checkpoint.state_dict` tools give full, name-keyed state for one process, DDP and
FSDP2. `ZeroRedundancyOptimizer` is outside them: it is consolidated on rank 0 and its parameter
indices are mapped to names here (`list_param_names`). gather_state and load_optimizer_state are
collective: call them on every rank.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def find_tied_names(model: nn.Module) -> set[str]:
    """Names that alias an earlier parameter (a tied lm_head.weight is transformer.wte.weight)."""
    seen: set[int] = set()
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def list_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter in the optimizer's flat index order (groups in turn)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def key_by_name(state_dict: dict, names: list[str]) -> dict:
    """An index-keyed optimizer state dict (torch's own format) re-keyed by parameter name."""
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state_dict["param_groups"]]
    return {"state": {names[i]: s for i, s in state_dict["state"].items()}, "param_groups": groups}


def key_by_index(state_dict: dict, names: list[str]) -> dict:
    """The inverse of key_by_name: a name-keyed optimizer state dict in torch's index-keyed format."""
    index = {n: i for i, n in enumerate(names)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state_dict["param_groups"]]
    return {"state": {index[n]: s for n, s in state_dict["state"].items()}, "param_groups": groups}


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    return hasattr(optimizer, "consolidate_state_dict")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def collect_live_pointers(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    """Storage addresses of the tensors training keeps updating (weights and optimizer state)."""
    tensors = [_local(p) for p in model.parameters()]
    for opt in (optimizer, getattr(optimizer, "optim", None)):  # ZeRO-1 keeps its shard's state inside
        for per_param in (opt.state.values() if opt is not None else []):
            if isinstance(per_param, dict):  # ZeroRedundancyOptimizer's own .state can hold None
                tensors += [_local(v) for v in per_param.values() if torch.is_tensor(v)]
    return {t.data_ptr() for t in tensors}


def detached_cpu_copy(t: torch.Tensor, live: set[int]) -> torch.Tensor:
    """t on the CPU, never sharing memory with a live tensor (a background thread writes it)."""
    if t.device.type != "cpu" or t.data_ptr() in live:
        return t.detach().to("cpu", copy=True)
    return t.detach()


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 is_main: bool) -> tuple[dict, dict] | tuple[None, None]:
    """Full model and optimizer state dicts keyed by name, on the CPU, on the main rank (None elsewhere).

    model: the unwrapped model (FSDP2 shards it in place; DDP's wrapper is not passed). The copies are
    independent of the live tensors, so a background thread can write them while training goes on.
    """
    if _is_zero(optimizer):
        optimizer.consolidate_state_dict(to=0)
        model_sd = model.state_dict() if is_main else None
        optim_sd = key_by_name(optimizer.state_dict(), list_param_names(model, optimizer)) if is_main else None
    elif not optimizer.state:
        # No update applied yet (every step so far skipped): get_state_dict would create the state with
        # a zero-lr step, which counts as one and changes every later update. Save the state as empty.
        model_sd = get_model_state_dict(model, options=FULL_ON_CPU)
        names = iter(list_param_names(model, optimizer))
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [next(names) for _ in g["params"]]}
                  for g in optimizer.param_groups]
        optim_sd = {"state": {}, "param_groups": groups}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=FULL_ON_CPU)
    if not is_main:
        return None, None
    live = collect_live_pointers(model, optimizer)
    tied = find_tied_names(model)
    model_sd = {k: detached_cpu_copy(v, live).contiguous() for k, v in model_sd.items() if k not in tied}
    optim_sd["state"] = {n: {k: detached_cpu_copy(v, live) if torch.is_tensor(v) else v for k, v in s.items()}
                         for n, s in optim_sd["state"].items()}
    return model_sd, optim_sd


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """Load a full name-keyed optimizer state dict (read by every rank) into any strategy's optimizer."""
    if not state_dict["state"]:
        return  # saved before any update: a fresh optimizer is exactly that (its settings come from the config)
    if _is_zero(optimizer):
        optimizer.load_state_dict(key_by_index(state_dict, list_param_names(model, optimizer)))
        # ZeroRedundancyOptimizer moves 0-dim state (Adam's step) to the CPU; fused and capturable
        # AdamW need it on the parameter's device (pytorch/pytorch#124133).
        for group in optimizer.optim.param_groups:
            if group.get("fused") or group.get("capturable"):
                for p in group["params"]:
                    state = optimizer.optim.state.get(p, {})
                    if torch.is_tensor(state.get("step")):
                        state["step"] = state["step"].to(p.device, torch.float32)
    else:
        set_optimizer_state_dict(model, optimizer, state_dict, options=StateDictOptions(full_state_dict=True))
