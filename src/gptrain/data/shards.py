"""Token shards in llm.c's .bin format: 256 little-endian int32 header words, then the tokens.

uint16 tokens under magic 20240520 version 1; uint32 tokens (vocabularies above 65,535) under magic
20240801 version 7, as llm.c's dev/data/data_common.py writes them. Older gptrain shards (uint32
under magic 20240520 version 2) are read, never written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import BinaryIO

import numpy as np

from gptrain.errors import UserError
from gptrain.files import fsync_dir

MAGIC_UINT16, VERSION_UINT16 = 20240520, 1
MAGIC_UINT32, VERSION_UINT32 = 20240801, 7
LEGACY_UINT32 = (20240520, 2)  # gptrain before llm.c's uint32 format: read with a note
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # header[2] is an int32
_FORMATS = {(MAGIC_UINT16, VERSION_UINT16): np.uint16, (MAGIC_UINT32, VERSION_UINT32): np.uint32,
            LEGACY_UINT32: np.uint32}
_noted_legacy: set[Path] = set()


def dtype_for(vocab_size: int) -> np.dtype:
    """Little-endian uint16 while every id fits, uint32 beyond 65,535."""
    return np.dtype("<u2" if vocab_size <= 65_536 else "<u4")


def header_for(num_tokens: int, dtype: np.dtype) -> np.ndarray:
    """The 256-word header llm.c writes for num_tokens tokens of dtype."""
    if not 0 <= num_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens (got {num_tokens})")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    is_uint16 = np.dtype(dtype).itemsize == 2
    header[0] = MAGIC_UINT16 if is_uint16 else MAGIC_UINT32
    header[1] = VERSION_UINT16 if is_uint16 else VERSION_UINT32
    header[2] = num_tokens
    return header


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write tokens atomically: temp file, fsync, rename, so a shard is whole or absent."""
    with ShardFile(path, dtype_for(vocab_size)) as shard:
        shard.append(np.asarray(tokens))
        shard.finish()


class ShardFile:
    """A shard written piece by piece into `<path>.part`, renamed to `path` by finish() once whole.

    Not files.atomic_path: its temp name holds the writer's pid, and a resumed preparation (another
    process) reopens this `.part` by name, so the shard keeps its own file and fsyncs the folder itself.

    Tokens go straight to the file, so writing a shard of 100M tokens holds none of them in memory.
    Reopening an existing .part with `keep_tokens` cuts it back to that many tokens (a resumed preparation).
    """

    def __init__(self, path: str | Path, dtype: np.dtype, keep_tokens: int = 0) -> None:
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.part = self.path.with_name(self.path.name + ".part")
        self.num_tokens = keep_tokens
        if keep_tokens:
            self._file: BinaryIO = open(self.part, "r+b")
            self._file.truncate(HEADER_BYTES + keep_tokens * self.dtype.itemsize)
            self._file.seek(0, os.SEEK_END)
        else:
            self._file = open(self.part, "wb")
            self._file.write(header_for(0, self.dtype).tobytes())

    def append(self, tokens: np.ndarray) -> None:
        if self.num_tokens + len(tokens) > MAX_SHARD_TOKENS:
            raise ValueError(f"a shard holds at most {MAX_SHARD_TOKENS} tokens")
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.num_tokens += len(tokens)

    def sync(self) -> None:
        """Make the tokens so far durable (before a manifest records them)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> None:
        """Write the header with the final count, fsync, rename into place, and fsync the folder."""
        self._file.seek(0)
        self._file.write(header_for(self.num_tokens, self.dtype).tobytes())
        self.sync()
        self._file.close()
        self.part.replace(self.path)
        fsync_dir(self.path.parent)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_header(path: str | Path) -> tuple[np.dtype, int, tuple[int, int]]:
    """(token dtype, token count, (magic, version)) of a shard; a UserError for anything else."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    key = (int(header[0]), int(header[1])) if len(header) == HEADER_WORDS else (0, 0)
    if key not in _FORMATS:
        if len(header) == HEADER_WORDS and key[0] in (MAGIC_UINT16, MAGIC_UINT32):
            raise UserError(f"{path} has shard version {key[1]} under magic {key[0]}; this gptrain reads "
                            "llm.c's uint16 (20240520 v1) and uint32 (20240801 v7) shards")
        raise UserError(f"{path} is not a token shard (bad magic number); re-run `gptrain data prepare`")
    return np.dtype(_FORMATS[key]).newbyteorder("<"), int(header[2]), key


def open_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens (never read whole); checks the header against the file size."""
    path = Path(path)
    dtype, num_tokens, key = read_header(path)
    expected = HEADER_BYTES + num_tokens * dtype.itemsize
    if path.stat().st_size != expected:
        raise UserError(f"{path} is truncated ({path.stat().st_size} bytes, expected {expected}): prepare it again")
    if key == LEGACY_UINT32 and path.parent not in _noted_legacy:
        _noted_legacy.add(path.parent)
        print(f"gptrain: note: {path.parent} holds gptrain's older uint32 shards (magic 20240520 v2), which llm.c "
              "does not read; `gptrain data prepare` writes llm.c's uint32 format (20240801 v7)", file=sys.stderr)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
