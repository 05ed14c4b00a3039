"""Token shards in llm.c's .bin format: 256 int32 header words, then uint16 (v1) or uint32 (v2) tokens."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gptrain.errors import UserError

MAGIC = 20240520
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4


def dtype_for(vocab_size: int) -> tuple[int, type]:
    """(version, numpy dtype) for a vocabulary: uint16 while ids fit, uint32 beyond 65,535."""
    return (1, np.uint16) if vocab_size <= 65_536 else (2, np.uint32)


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens atomically: temp file, fsync, rename, so a shard is whole or absent."""
    path = Path(path)
    version, dtype = dtype_for(vocab_size)
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, version, len(tokens)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def open_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (never read whole); checks the header against the file size."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if len(header) < HEADER_WORDS or header[0] != MAGIC:
        raise UserError(f"{path} is not a token shard (bad magic number); re-run `gptrain prepare`")
    version, num_tokens = int(header[1]), int(header[2])
    if version not in (1, 2):
        raise UserError(f"{path} has shard version {version}; this gptrain reads versions 1 and 2")
    dtype = np.dtype(np.uint16 if version == 1 else np.uint32).newbyteorder("<")
    expected = HEADER_BYTES + num_tokens * dtype.itemsize
    if path.stat().st_size != expected:
        raise UserError(f"{path} is truncated ({path.stat().st_size} bytes, expected {expected})")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
