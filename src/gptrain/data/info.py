"""What `gptrain data list` and `gptrain data info` print: the catalogue, and a shard's or dataset's facts."""

from __future__ import annotations

import json
from pathlib import Path

from gptrain.data.catalogue import ENTRIES
from gptrain.data.shards import HEADER_BYTES, read_header
from gptrain.errors import UserError


def format_catalogue() -> str:
    """One block per entry: what it is, size, licence, origin with its pinned revision, validation split."""
    lines = []
    for e in ENTRIES.values():
        lines += [f"{e.name}  {e.description}",
                  f"    size        {e.size}",
                  f"    licence     {e.licence}",
                  f"    origin      {e.origin}",
                  f"    revision    {e.revision}",
                  f"    validation  {e.validation}"]
        if e.notes:
            lines.append(f"    notes       {e.notes}")
        lines.append(f"    tested      against local fixtures ({e.fixture}); the download needs the internet"
                     if e.reader != "package" else "    tested      offline (installed package)")
    lines.append("\nAlso: any local text file or folder, JSONL or JSONL.gz (--text-field for another key than "
                 "'text'), Parquet (pip install 'gptrain[data]'), or a folder of llm.c shards (--tokenizer gpt2).")
    return "\n".join(lines)


def _shard_line(path: Path) -> str:
    dtype, num_tokens, (magic, version) = read_header(path)
    size = path.stat().st_size
    state = "ok" if size == HEADER_BYTES + num_tokens * dtype.itemsize else f"TRUNCATED ({size:,} bytes)"
    return f"{path.name}: magic {magic} version {version}, {dtype.name}, {num_tokens:,} tokens, {state}"


def describe(path: Path) -> str:
    """A shard's header, dtype and token count; for a dataset folder also its meta.json and each split."""
    if not path.exists():
        raise UserError(f"{path} does not exist: give a .bin shard or a dataset folder")
    if path.is_file():
        return _shard_line(path)
    lines = [f"dataset {path}"]
    meta_path = path / "meta.json"
    if not meta_path.is_file() and not any(path.glob("*_[0-9][0-9][0-9][0-9][0-9][0-9].bin")):
        raise UserError(f"{path} is neither a shard nor a dataset folder (no meta.json, no *_NNNNNN.bin shards)")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        for key in ("source", "val_source", "val_rule", "tokenizer", "tokenizer_spec", "vocab_size", "eot_id",
                    "num_documents", "num_train_tokens", "num_val_tokens", "format"):
            if meta.get(key) is not None:
                value = meta[key]
                lines.append(f"  {key:<17} {value:,}" if isinstance(value, int) else f"  {key:<17} {value}")
    else:
        lines.append("  no meta.json (llm.c shards?): train with an explicit tokenizer, e.g. --tokenizer gpt2")
    for split in ("train", "val"):
        shards = sorted(path.glob(f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
        total = sum(read_header(s)[1] for s in shards)
        lines.append(f"  {split}: {len(shards)} shard(s), {total:,} tokens")
        lines += [f"    {_shard_line(s)}" for s in shards[:3]]
        if len(shards) > 3:
            lines.append(f"    ... {len(shards) - 3} more")
    return "\n".join(lines)
