"""HellaSwag: fetch the val set, read its JSONL, and score a GPT on it with any gptrain tokenizer.

Rendered and scored as llm.c's dev/data/hellaswag.py (completion style): each row is the context's ids
followed by the ids of " " + ending, and an ending's loss covers its own tokens only, given the context.

Dims: B batch (rows, 4 per item), T sequence, I items, E endings (4).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gptrain.data.download import http_file
from gptrain.errors import UserError
from gptrain.metrics.console import progress_callback
from gptrain.tokenizer.base import Tokenizer, encode_lenient
from gptrain.tokenizer.gpt2_assets import cache_dir

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
URL_ENV = "GPTRAIN_HELLASWAG_URL"  # points the download elsewhere (a mirror, a test server)
NUM_ENDINGS = 4
DEFAULT_BATCH_ITEMS = 8  # items per forward: 32 rows
# The per-rank counts, summed over ranks; the accuracies are computed from them afterwards.
_COUNTS = ("num_items", "num_unencodable", "correct", "correct_norm", "correct_bytes",
           "num_truncated_contexts", "num_truncated_endings")


@dataclass(frozen=True)
class Item:
    ctx: str
    endings: tuple[str, ...]  # always NUM_ENDINGS of them
    label: int  # index of the right ending


def hellaswag_file(path: str | Path | None = None, log: Callable[[str], object] = print) -> Path:
    """The given HellaSwag JSONL, else the official val set downloaded once into the cache."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise UserError(f"HellaSwag file {path} does not exist; give the path of a HellaSwag JSONL "
                            f"or leave it out to download the val set")
        return path
    url = os.environ.get(URL_ENV) or HELLASWAG_URL
    return http_file(url, cache_dir=cache_dir() / "hellaswag", log=log)


def read_items(path: str | Path, limit: int | None = None) -> list[Item]:
    """The items of a HellaSwag JSONL file (the official format), the first `limit` of them if given."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise UserError(f"the HellaSwag item limit must be at least 1 (got {limit})")
    items: list[Item] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if limit is not None and len(items) >= limit:
                    break
                if not line.strip():
                    continue
                if (item := _parse_item(line)) is None:
                    raise UserError(f"{path}: line {number} is not a HellaSwag item (needs ctx, "
                                    f"{NUM_ENDINGS} endings and a label 0-3); use the official HellaSwag JSONL")
                items.append(item)
    except FileNotFoundError:
        raise UserError(f"HellaSwag file {path} does not exist; check the path") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; use the official HellaSwag JSONL") from None
    if not items:
        raise UserError(f"{path} holds no HellaSwag items; use the official HellaSwag JSONL")
    return items


def _parse_item(line: str) -> Item | None:
    """The item on one JSONL line, or None when the line is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
    # Exports through Hugging Face datasets store the label as a string ("2").
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    is_ok = (isinstance(ctx, str) and isinstance(endings, list) and len(endings) == NUM_ENDINGS
             and all(isinstance(e, str) for e in endings)
             and isinstance(label, int) and not isinstance(label, bool) and 0 <= label < NUM_ENDINGS)
    return Item(ctx=ctx, endings=tuple(endings), label=label) if is_ok else None


@dataclass(frozen=True)
class _Rendered:
    rows: list[list[int]]  # per ending: ids of context + ending, at most block_size + 1 of them
    score_from: list[int]  # per ending: the first input position whose target (an ending id) is scored
    num_bytes: list[int]  # per ending: UTF-8 bytes of " " + ending
    label: int
    is_context_truncated: bool
    num_endings_truncated: int


def render_item(item: Item, tokenizer: Tokenizer, block_size: int, pad_id: int) -> _Rendered | None:
    """The item's 4 rows fitted to the window, or None when the tokenizer cannot encode its text."""
    # An empty context still needs one id to predict the ending's first token from: the separator,
    # which is what the model saw before every document.
    ctx_ids = encode_lenient(tokenizer, item.ctx)
    ctx_ids = [pad_id] if ctx_ids == [] else ctx_ids
    texts = [" " + ending for ending in item.endings]
    ending_ids = [encode_lenient(tokenizer, text) for text in texts]
    if ctx_ids is None or any(ids is None for ids in ending_ids):
        return None
    fitted = [_fit(ctx_ids, ids, block_size) for ids in ending_ids]
    num_bytes = [_scored_bytes(text, ids, block_size) for text, ids in zip(texts, ending_ids, strict=True)]
    return _Rendered(rows=[row for row, _, _, _ in fitted], score_from=[start for _, start, _, _ in fitted],
                     num_bytes=num_bytes,
                     label=item.label, is_context_truncated=any(cut for _, _, cut, _ in fitted),
                     num_endings_truncated=sum(cut for _, _, _, cut in fitted))


def _scored_bytes(text: str, ending_ids: list[int], block_size: int) -> int:
    """UTF-8 bytes of the scored part of an ending: all of " " + ending, or for an ending scored on its
    last block_size tokens only, that share of its bytes (rounded; tokens are not all of one size)."""
    num_bytes = len(text.encode("utf-8"))
    if len(ending_ids) <= block_size:
        return num_bytes
    return max(1, round(num_bytes * block_size / len(ending_ids)))


def _fit(ctx_ids: list[int], ending_ids: list[int], block_size: int) -> tuple[list[int], int, bool, bool]:
    """Row, first scored input position, whether the context and whether the ending was cut.

    The forward reads row[:-1] and is scored on row[1:], so a row may hold block_size + 1 ids, as a
    training window does. Too long a context loses its left end; an ending longer than the window
    keeps only its last block_size + 1 ids (no context: the context counts as cut), of which the
    last block_size are scored.
    """
    if len(ending_ids) > block_size:
        return ending_ids[-(block_size + 1):], 0, True, True
    room = block_size + 1 - len(ending_ids)
    ctx = ctx_ids[-room:]
    return ctx + ending_ids, len(ctx) - 1, len(ctx) < len(ctx_ids), False


def _collate(batch: list[_Rendered], pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets of every row, right-padded; targets are -1 outside the endings."""
    rows = [(row, start) for r in batch for row, start in zip(r.rows, r.score_from, strict=True)]
    T = max(len(row) for row, _ in rows) - 1
    idx_BT = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets_BT = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, (row, start) in enumerate(rows):
        idx_BT[b, : len(row) - 1] = torch.tensor(row[:-1])
        targets_BT[b, start : len(row) - 1] = torch.tensor(row[start + 1 :])
    return idx_BT, targets_BT


def _count_correct(model: nn.Module, batch: list[_Rendered], pad_id: int, device: str,
                   autocast: contextlib.AbstractContextManager | None) -> Tensor:
    """Items of the batch right by sum of ending loss, by mean per token, and by loss per byte."""
    idx_BT, targets_BT = (t.to(device) for t in _collate(batch, pad_id))
    with autocast or contextlib.nullcontext():
        loss_BT = model(idx_BT, targets_BT, reduction="none").float()
    sum_IE = loss_BT.sum(1).view(-1, NUM_ENDINGS)
    num_tokens_IE = (targets_BT != -1).sum(1).view(-1, NUM_ENDINGS)
    num_bytes_IE = torch.tensor([r.num_bytes for r in batch], device=device)
    label_I = torch.tensor([r.label for r in batch], device=device)
    # argmin breaks ties toward the first ending, as llm.c's does.
    scores = (sum_IE, sum_IE / num_tokens_IE, sum_IE / num_bytes_IE)
    return torch.stack([(score_IE.argmin(1) == label_I).sum() for score_IE in scores])


def _dummy_forward(model: nn.Module, pad_id: int, device: str,
                   autocast: contextlib.AbstractContextManager | None) -> None:
    """One forward whose result is thrown away, so that every rank joins the same collectives."""
    idx_BT = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    with autocast or contextlib.nullcontext():
        model(idx_BT, torch.full_like(idx_BT, -1), reduction="none")


def _model_block_size(model: nn.Module) -> int:
    """The window of a GPT, also behind a DDP wrapper (torch.compile forwards attribute reads itself)."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config.block_size


@torch.no_grad()
def evaluate_hellaswag(
    model: nn.Module,
    tokenizer: Tokenizer,
    items: list[Item],
    device: str,
    *,
    batch_size: int = DEFAULT_BATCH_ITEMS,
    autocast: contextlib.AbstractContextManager | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: Callable[[Tensor], object] | None = None,
    on_forward: Callable[[int, int], object] | None = None,
) -> dict[str, float]:
    """HellaSwag accuracies (by sum, mean per token and per byte of ending loss) and counts.

    Every rank passes the same items and scores items[rank::world_size], batch_size items (4 rows
    each) per forward; every rank runs the same number of forwards (under FSDP each is a collective)
    and reduce_sum sums the counts over ranks in place, so the result does not depend on world_size.
    Items the tokenizer cannot encode count as wrong. on_forward(done, total) follows progress.
    """
    if batch_size < 1:
        raise UserError(f"the HellaSwag batch size must be at least 1 (got {batch_size})")
    was_training = model.training
    model.eval()
    block_size, pad_id = _model_block_size(model), tokenizer.eot_id
    mine = items[rank::world_size]
    num_items_per_rank = -(-len(items) // world_size)
    num_forwards = -(-num_items_per_rank // batch_size)
    counts = torch.zeros(len(_COUNTS), dtype=torch.long, device=device)
    for step in range(num_forwards):
        chunk = mine[step * batch_size : (step + 1) * batch_size]
        rendered = [render_item(item, tokenizer, block_size, pad_id) for item in chunk]
        batch = [r for r in rendered if r is not None]
        if batch:
            correct = _count_correct(model, batch, pad_id, device, autocast)
        else:
            _dummy_forward(model, pad_id, device, autocast)
            correct = torch.zeros(3, dtype=torch.long, device=device)
        counts += torch.cat([
            torch.tensor([len(chunk), len(chunk) - len(batch)], device=device), correct,
            torch.tensor([sum(r.is_context_truncated for r in batch),
                          sum(r.num_endings_truncated for r in batch)], device=device),
        ])
        if on_forward is not None:
            on_forward(step + 1, num_forwards)
    if reduce_sum is not None:
        reduce_sum(counts)
    model.train(was_training)
    return _summarize(dict(zip(_COUNTS, counts.tolist(), strict=True)))


def _summarize(counts: dict[str, int]) -> dict[str, float]:
    """Accuracies over all items and over the items the tokenizer could encode, with the counts."""
    num_items, num_unencodable = counts["num_items"], counts["num_unencodable"]
    num_scored = num_items - num_unencodable
    metrics: dict[str, float] = {}
    for key, name in (("correct", "acc"), ("correct_norm", "acc_norm"), ("correct_bytes", "acc_norm_bytes")):
        metrics[f"hellaswag_{name}"] = counts[key] / num_items if num_items else math.nan
        metrics[f"hellaswag_{name}_scored"] = counts[key] / num_scored if num_scored else math.nan
    for key in ("num_items", "num_unencodable", "num_truncated_contexts", "num_truncated_endings"):
        metrics[f"hellaswag_{key}"] = counts[key]
    return metrics


def run_hellaswag(
    model: nn.Module,
    tokenizer: Tokenizer,
    device: str,
    *,
    file: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_ITEMS,
    autocast: contextlib.AbstractContextManager | None = None,
    rank: int = 0,
    world_size: int = 1,
    reduce_sum: Callable[[Tensor], object] | None = None,
    log: Callable[[str], object] = print,
    show_progress: bool | None = None,
) -> dict[str, float]:
    """Read HellaSwag (the given file, else the cached or downloaded val set) and evaluate the model.

    show_progress: a progress bar on rank 0; None shows it when stderr is a terminal.
    """
    items = read_items(hellaswag_file(file, log=log), limit=limit)
    if show_progress is None:
        show_progress = rank == 0 and sys.stderr.isatty()
    with progress_callback(show_progress, f"HellaSwag ({len(items):,} items)") as on_forward:
        return evaluate_hellaswag(model, tokenizer, items, device, batch_size=batch_size, autocast=autocast,
                                  rank=rank, world_size=world_size, reduce_sum=reduce_sum, on_forward=on_forward)
