"""Batches of (input, target) windows from memory-mapped shards; rank-aware and resumable.

Training walks epochs: each epoch cuts the token stream into windows of T+1 tokens at a seeded offset
and visits them in a seeded order. All ranks walk one global order, whatever their number: a micro
step takes the next W·B windows of it and rank r reads the B at offset r·B, so step s of a run with
M micro steps consumes windows [s·G, (s+1)·G), G = M·W·B, and the position is one number (windows of
the epoch consumed by all ranks together). A run saved with N ranks resumes with M ranks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gptrain.data.shards import open_shard
from gptrain.errors import UserError


def _windows(shards: list[np.ndarray], block_size: int, shift: int) -> np.ndarray:
    """(shard index, start) of every whole window of block_size + 1 tokens, starting at shift."""
    parts = []
    for i, tokens in enumerate(shards):
        count = max(0, (len(tokens) - shift - 1) // block_size)
        starts = shift + block_size * np.arange(count, dtype=np.int64)
        parts.append(np.stack([np.full(count, i, dtype=np.int64), starts], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)


class ShardLoader:
    """Shuffled windows for training (shuffle=True) or the same sequential windows every time."""

    def __init__(
        self,
        paths: list[Path],
        batch_size: int,
        block_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        split: str = "train",
        fingerprint: str = "",
    ) -> None:
        self.shards = [open_shard(p) for p in paths]
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        num_tokens = sum(len(s) for s in self.shards)
        if num_tokens < block_size + 1:
            raise UserError(
                f"the {split} split has {num_tokens} tokens, fewer than one context window "
                f"({block_size} + 1): use a bigger corpus or a smaller model.block_size"
            )
        self.num_tokens = num_tokens
        self.epoch, self.position = 0, 0
        self._order = self._epoch_windows(0)
        if len(self._order) == 0:
            raise UserError(f"no {split} shard holds a whole context window ({block_size} + 1 tokens): use "
                            "bigger shards (data.shard_tokens) or a smaller model.block_size")
        self.fingerprint = fingerprint  # the dataset's: a saved position is for one dataset only
        self.global_batch_tokens = 0  # set by the run: a saved position is for one global batch only
        self.on_windows = None  # test hook: called with the (shard, start) pairs this rank reads

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        """The epoch's global order of windows (the same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(0, self.block_size)) if self.shuffle and epoch > 0 else 0
        windows = _windows(self.shards, self.block_size, shift)
        if len(windows) == 0:
            windows = _windows(self.shards, self.block_size, 0)
        if self.shuffle:
            windows = windows[rng.permutation(len(windows))]
        return windows

    def split_windows(self) -> np.ndarray:
        """(shard, start) of every whole window from offset 0, in order: what evaluation picks from."""
        return _windows(self.shards, self.block_size, 0)

    @property
    def windows_per_epoch(self) -> int:
        """Windows in one epoch, over all ranks together."""
        return len(self._order)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / max(1, len(self._order))

    def take_windows(self, count: int) -> np.ndarray:
        """The next count windows of the global order, crossing into the next epoch when needed."""
        parts = []
        while count > 0:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_windows(self.epoch)
            part = self._order[self.position : self.position + count]
            parts.append(part)
            self.position += len(part)
            count -= len(part)
        return np.concatenate(parts)

    def read(self, windows: np.ndarray) -> tuple[Tensor, Tensor]:
        """(x, y) contiguous int64 tensors of shape (len(windows), T) for the given (shard, start) pairs.
        Contiguous: a compiled model is specialised on its inputs' strides, and the compile probe and
        bench pass contiguous ones (views of one (B, T + 1) block made the first training step compile
        a second graph: 26 s on 2 Xeon cores)."""
        if self.on_windows is not None:
            self.on_windows(windows)
        T = self.block_size
        rows = [self.shards[int(shard)][int(start) : int(start) + T + 1] for shard, start in windows]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """This rank's next (x, y) pair of int64 (B, T) tensors; y is x shifted by one token."""
        B = self.batch_size
        group = self.take_windows(B * self.world_size)
        return self.read(group[self.rank * B : (self.rank + 1) * B])

    def reset(self) -> None:
        self.load_state_dict({"epoch": 0, "position": 0})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "block_size": self.block_size,
                "num_tokens": self.num_tokens, "fingerprint": self.fingerprint,
                "global_batch_tokens": self.global_batch_tokens}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; one saved for another dataset, block size, seed or global batch
        is refused (another number of ranks or micro batch is fine: the position is global)."""
        for key, what in (("fingerprint", "dataset"), ("num_tokens", "dataset size"), ("block_size", "block size"),
                          ("seed", "seed"), ("global_batch_tokens", "global batch (tokens)")):
            saved, current = state.get(key), getattr(self, key)
            if saved not in (None, "", 0) and current not in ("", 0) and saved != current:
                raise UserError(f"the saved data position is for {what} {saved}, but this run has {current}: resume "
                                "with the run's own data, seed, model.block_size and train.batch_tokens")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_windows(self.epoch)
