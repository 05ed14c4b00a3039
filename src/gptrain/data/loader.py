"""Batches of (input, target) windows from memory-mapped shards; rank-aware and resumable.

Training walks epochs: each epoch cuts the token stream into windows of T+1 tokens at a seeded offset
and visits them in a seeded order, so an epoch sees every token once and the position is two integers.
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
            raise UserError(f"the {split} split has too few windows to give every one of {world_size} ranks one")

    def _epoch_windows(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        shift = int(rng.integers(0, self.block_size)) if self.shuffle and epoch > 0 else 0
        windows = _windows(self.shards, self.block_size, shift)
        if len(windows) == 0:
            windows = _windows(self.shards, self.block_size, 0)
        if self.shuffle:
            windows = windows[rng.permutation(len(windows))]
        return windows[self.rank :: self.world_size]

    @property
    def windows_per_epoch(self) -> int:
        return len(self._order)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / max(1, len(self._order))

    def _read(self, window: np.ndarray) -> np.ndarray:
        shard, start = int(window[0]), int(window[1])
        return self.shards[shard][start : start + self.block_size + 1]

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next (x, y) pair of int64 (B, T) tensors; y is x shifted by one token."""
        rows = []
        while len(rows) < self.batch_size:
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_windows(self.epoch)
            rows.append(self._read(self._order[self.position]))
            self.position += 1
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1], batch[:, 1:]

    def reset(self) -> None:
        self.load_state_dict({"epoch": 0, "position": 0})

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.seed = int(state.get("seed", self.seed))
        self._order = self._epoch_windows(self.epoch)
