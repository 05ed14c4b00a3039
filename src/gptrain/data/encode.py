"""Labelled documents to token shards over a pool of tokenizer processes: ordered, bounded, resumable.

Documents go out in tasks of about TASK_CHARS characters and come back as one token array per task,
in submission order, so the shards are byte-identical for any number of workers; at most two tasks
per worker are in flight, so memory does not grow with the corpus. Shards are written straight to
disk; after each finished shard a manifest records how far the stream got and how much of each open
shard is durable, and a preparation started again with the same manifest carries on from there.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from gptrain.data.shards import ShardFile, dtype_for
from gptrain.data.sources import Document
from gptrain.errors import UserError
from gptrain.faults import fault_point
from gptrain.files import write_atomic
from gptrain.runtime import die_with_parent
from gptrain.tokenizer import Tokenizer, parse_tokenizer

TASK_CHARS = 1 << 20
MANIFEST = "manifest.json"
_TOKENIZER: Tokenizer | None = None  # the worker process's tokenizer


@dataclass
class Task:
    labels: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    has_separator: list[bool] = field(default_factory=list)
    num_bytes: int = 0
    num_chars: int = 0


def _init_worker(tokenizer_json: str) -> None:
    global _TOKENIZER
    die_with_parent(signal.SIGKILL)  # a worker holds nothing worth saving
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _TOKENIZER = parse_tokenizer(tokenizer_json)


def encode_texts(texts: list[str], has_separator: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of all texts, each preceded by EOT where has_separator, as llm.c does; tokens per text)."""
    tok = _TOKENIZER
    to_array = getattr(tok, "encode_to_array", None)  # GPT-2: arrays straight from tiktoken
    encoded = [to_array(t) for t in texts] if to_array else tok.encode_batch(texts)
    eot = np.array([tok.eot_id], dtype=dtype_for(tok.vocab_size))
    pieces, counts = [], np.empty(len(texts), dtype=np.int64)
    for i, (ids, sep) in enumerate(zip(encoded, has_separator, strict=True)):
        if sep:
            pieces.append(eot)
        pieces.append(np.asarray(ids, dtype=eot.dtype))
        counts[i] = len(ids) + sep
    return (np.concatenate(pieces) if pieces else eot[:0]), counts


def make_tasks(items: Iterator[tuple[str, Document]]) -> Iterator[Task]:
    task = Task()
    for label, doc in items:
        task.labels.append(label)
        task.texts.append(doc.text)
        task.has_separator.append(not doc.is_continuation)
        task.num_bytes += doc.num_bytes
        task.num_chars += len(doc.text)
        if task.num_chars >= TASK_CHARS:
            yield task
            task = Task()
    if task.texts:
        yield task


class SplitWriter:
    """One split's shards, `<prefix>_<split>_NNNNNN.bin`, each of exactly shard_tokens but the last."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int, state: dict | None = None):
        self.folder, self.prefix, self.dtype, self.shard_tokens = folder, prefix, dtype, shard_tokens
        self.num_shards, self.num_tokens, self._shard = 0, 0, None
        if state:
            self._resume(state)

    def path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}_{index:06d}.bin"

    def _resume(self, state: dict) -> None:
        """Drop what the manifest does not cover: later shards, and the open shard's tokens past its count."""
        self.num_shards, self.num_tokens = state["num_shards"], state["num_tokens"]
        for stray in self.folder.glob(f"{self.prefix}_[0-9]*.bin*"):
            index = int(stray.name[len(self.prefix) + 1 :].split(".")[0])
            if index > self.num_shards or (index == self.num_shards and not state["part_tokens"]):
                stray.unlink()
        if state["part_tokens"]:
            path = self.path(self.num_shards)
            if path.exists():  # it was finished after the manifest was written: reopen it and cut it back
                path.replace(path.with_name(path.name + ".part"))
            self._shard = ShardFile(path, self.dtype, keep_tokens=state["part_tokens"])

    def write(self, tokens: np.ndarray) -> bool:
        """Append tokens, finishing shards as they fill; true when a shard was finished."""
        is_finished = False
        while len(tokens):
            if self._shard is None:
                self._shard = ShardFile(self.path(self.num_shards), self.dtype)
            room = self.shard_tokens - self._shard.num_tokens
            self._shard.append(tokens[:room])
            self.num_tokens += min(room, len(tokens))
            tokens = tokens[room:]
            if self._shard.num_tokens == self.shard_tokens:
                self._shard.finish()
                self._shard, self.num_shards, is_finished = None, self.num_shards + 1, True
                fault_point("prepare.shard")
        return is_finished

    def state(self) -> dict:
        if self._shard is not None:
            self._shard.sync()
        part = self._shard.num_tokens if self._shard is not None else 0
        return {"num_shards": self.num_shards, "num_tokens": self.num_tokens, "part_tokens": part}

    def finish(self) -> None:
        """Finish the open shard (an empty split still gets one, empty, shard)."""
        if self._shard is None and self.num_shards == 0:
            self._shard = ShardFile(self.path(0), self.dtype)
        if self._shard is not None:
            self._shard.finish()
            self._shard, self.num_shards = None, self.num_shards + 1

    def close(self) -> None:
        if self._shard is not None:
            self._shard.close()


class Router:
    """Sends each labelled run of tokens to its split; 'stream' tokens fill val up to val_tokens, then train."""

    def __init__(self, writers: dict[str, SplitWriter], val_tokens: int) -> None:
        self.writers, self.val_tokens = writers, val_tokens

    def write(self, label: str, tokens: np.ndarray) -> bool:
        if label != "stream":
            return self.writers[label].write(tokens)
        room = max(0, self.val_tokens - self.writers["val"].num_tokens)
        is_finished = self.writers["val"].write(tokens[:room]) if room else False
        return self.writers["train"].write(tokens[room:]) or is_finished

    def write_task(self, labels: list[str], tokens: np.ndarray, counts: np.ndarray) -> bool:
        """Route a task's tokens run by run (consecutive texts with one label)."""
        ends = np.cumsum(counts)
        is_finished, start, run_start = False, 0, 0
        for i in range(1, len(labels) + 1):
            if i == len(labels) or labels[i] != labels[run_start]:
                end = int(ends[i - 1])
                is_finished = self.write(labels[run_start], tokens[start:end]) or is_finished
                start, run_start = end, i
        return is_finished


def read_manifest(folder: Path, key: str) -> dict | None:
    """The manifest of an interrupted preparation of this very dataset (key), or None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("key") == key else None


def write_manifest(folder: Path, manifest: dict) -> None:
    fault_point("prepare.manifest")
    write_atomic(folder / MANIFEST, json.dumps(manifest))


def start_method(may_fork: bool) -> str:
    """fork when the caller allows it (`gptrain data prepare`, which has run nothing but the preparation)
    on Linux with no other Python thread: the workers then start at once with the tokenizer loaded.
    Else spawn: a fork of a process that has run torch (OpenMP, CUDA, process groups) can deadlock."""
    return "fork" if may_fork and sys.platform == "linux" and threading.active_count() == 1 else "spawn"


def _results(tasks: Iterator[Task], tokenizer: Tokenizer, num_workers: int, may_fork: bool):
    """(task, tokens, counts) in task order: in this process for one worker, else over a process pool."""
    global _TOKENIZER
    if num_workers <= 1:
        _TOKENIZER = tokenizer
        for task in tasks:
            yield task, *encode_texts(task.texts, task.has_separator)
        return
    context = multiprocessing.get_context(start_method(may_fork))
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker,
                             initargs=(tokenizer.to_json(),)) as pool:
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append((task, pool.submit(encode_texts, task.texts, task.has_separator)))
                if len(pending) >= 2 * num_workers:
                    task, future = pending.popleft()
                    yield task, *future.result()
            while pending:
                task, future = pending.popleft()
                yield task, *future.result()
        except BrokenProcessPool:
            raise UserError("a tokenizer worker process died. From a Python script, put the call under "
                            "`if __name__ == \"__main__\":` (workers start by importing the script), or set "
                            "data.num_workers=1") from None
        finally:
            for _, future in pending:
                future.cancel()


def write_shards(folder: Path, prefix: str, items: Iterator[tuple[str, Document]], tokenizer: Tokenizer, *,
                 shard_tokens: int, val_tokens: int, num_workers: int, manifest: dict,
                 on_progress: Callable[[int, int], None] = lambda num_bytes, num_tokens: None,
                 may_fork: bool = False) -> dict:
    """Encode every item into train and val shards in folder; returns the manifest of the finished splits.

    manifest: {"key": ..., "position": items already written, "writers": {split: state}}; written back
    to folder after every finished shard, so an interrupted run resumes from it.
    """
    dtype = dtype_for(tokenizer.vocab_size)
    states = manifest.get("writers", {})
    writers = {split: SplitWriter(folder, f"{prefix}_{split}", dtype, shard_tokens, states.get(split))
               for split in ("train", "val")}
    router = Router(writers, val_tokens)
    position = manifest.get("position", 0)
    on_progress(sum(doc.num_bytes for _, doc in islice(items, position)), 0)  # what a resumed run skips
    try:
        for task, tokens, counts in _results(make_tasks(items), tokenizer, num_workers, may_fork):
            is_finished = router.write_task(task.labels, tokens, counts)
            position += len(task.labels)
            on_progress(task.num_bytes, len(tokens))
            if is_finished:
                write_manifest(folder, manifest | {"position": position,
                                                   "writers": {s: w.state() for s, w in writers.items()}})
        for writer in writers.values():
            writer.finish()
    finally:
        for writer in writers.values():
            writer.close()
    return manifest | {"position": position, "writers": {s: w.state() for s, w in writers.items()}}
