"""Text to token shards: split documents into train/val, fit the tokenizer on train, write shards.

A dataset folder holds `<name>_train_NNNNNN.bin`, `<name>_val_NNNNNN.bin`, `tokenizer.json` and
`meta.json`. It is written into a temp folder and renamed, so it appears whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptrain.data.shards import dtype_for, write_shard
from gptrain.data.sources import Document, load_documents, source_fingerprint
from gptrain.errors import UserError
from gptrain.tokenizer import Tokenizer, TokenizerConfig, build_tokenizer, load_tokenizer
from gptrain.tokenizer.base import save_tokenizer


@dataclass(kw_only=True)
class DataConfig:
    source: str = "shakespeare"  # 'shakespeare', or a path: text file, folder of text files, JSONL
    data_dir: str = ""  # where the shards go; empty: data/<source>-<tokenizer>
    val_fraction: float = 0.1  # share of the corpus (by characters) held out, whole documents at a time
    shard_tokens: int = 100_000_000
    split_seed: int = 1337
    prepare_per_node: bool = False  # under torchrun: local rank 0 of every node prepares (no shared disk)
    prepare_timeout_seconds: int = 86_400  # how long other ranks wait for the preparing rank

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1) (got {self.val_fraction})")
        if self.prepare_timeout_seconds < 1:
            raise UserError("data.prepare_timeout_seconds must be at least 1")
        if self.shard_tokens < 1:
            raise UserError(f"data.shard_tokens must be positive (got {self.shard_tokens})")


def source_key(source: str) -> str:
    """The source as stored in meta.json: a name, or the resolved absolute path."""
    return source if source == "shakespeare" else str(Path(source).expanduser().resolve())


def dataset_dir(data: DataConfig, spec: str) -> Path:
    """data/<source>-<tokenizer spec>: one folder per corpus and tokenizer (paths get a short hash)."""
    if data.source == "shakespeare":
        return Path("data") / f"shakespeare-{spec}"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(data.source).stem).strip("-").lower()
    digest = hashlib.sha256(source_key(data.source).encode()).hexdigest()[:6]
    return Path("data") / f"{slug}-{digest}-{spec}"


def fingerprint(data: DataConfig) -> str:
    """Changes when the corpus files or the split/shard settings change (then the dataset is rebuilt)."""
    settings = f"{data.val_fraction}:{data.split_seed}:{data.shard_tokens}"
    return hashlib.sha256(f"{source_fingerprint(data.source)}|{settings}".encode()).hexdigest()[:16]


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Train and val texts. Whole documents go to val (seeded choice) until it holds val_fraction of
    the characters; a single document is split at a line break instead."""
    if len(docs) == 1:
        text = docs[0].text
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    total = sum(len(d.text) for d in docs)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    val_ids, val_chars = set(), 0
    for i in order:
        if val_chars >= val_fraction * total or len(val_ids) == len(docs) - 1:
            break
        val_ids.add(i)
        val_chars += len(docs[i].text)
    train = [d.text for i, d in enumerate(docs) if i not in val_ids]
    val = [d.text for i, d in enumerate(docs) if i in val_ids]
    return train, val


def _write_split(folder: Path, name: str, texts: list[str], tok: Tokenizer, shard_tokens: int) -> int:
    """Encode texts (each preceded by EOT, as llm.c does) into shards; returns the token count."""
    buffer: list[np.ndarray] = []
    buffered, shard_index, total = 0, 0, 0
    _, dtype = dtype_for(tok.vocab_size)

    def flush(tokens: np.ndarray) -> None:
        nonlocal shard_index
        write_shard(folder / f"{name}_{shard_index:06d}.bin", tokens, tok.vocab_size)
        shard_index += 1

    for start in range(0, len(texts), 256):
        for ids in tok.encode_batch(texts[start : start + 256]):
            buffer.append(np.concatenate([np.array([tok.eot_id], dtype=dtype), np.asarray(ids, dtype=dtype)]))
            buffered += len(ids) + 1
            while buffered >= shard_tokens:
                joined = np.concatenate(buffer)
                flush(joined[:shard_tokens])
                buffer, buffered = [joined[shard_tokens:]], len(joined) - shard_tokens
            total += len(ids) + 1
    if buffered or shard_index == 0:
        flush(np.concatenate(buffer) if buffer else np.zeros(0, dtype=dtype))
    return total


def tokenizer_spec(tokenizer: Tokenizer) -> str:
    """What identifies a dataset made with a given tokenizer (not one fitted from the config): its hash."""
    return f"{tokenizer.name}-{hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:10]}"


def _holds_tokenizer(folder: Path, tokenizer: Tokenizer) -> bool:
    path = folder / "tokenizer.json"
    return path.is_file() and load_tokenizer(path).to_json() == tokenizer.to_json()


def _locate(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer | None) -> tuple[Path, str]:
    """The dataset folder and its tokenizer spec (a given tokenizer reuses a folder made with it)."""
    spec = tok_cfg.describe()
    folder = Path(data.data_dir) if data.data_dir else dataset_dir(data, spec)
    if tokenizer is None:
        return folder, spec
    if _holds_tokenizer(folder, tokenizer) and (folder / "meta.json").is_file():
        return folder, json.loads((folder / "meta.json").read_text()).get("tokenizer_spec", spec)
    spec = tokenizer_spec(tokenizer)
    return (Path(data.data_dir) if data.data_dir else dataset_dir(data, spec)), spec


def _is_current(folder: Path, data: DataConfig, spec: str, data_fingerprint: str, log) -> bool:
    """True when folder holds this very dataset; an error when it holds another one."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("source") != source_key(data.source) or meta.get("tokenizer_spec") != spec:
        raise UserError(
            f"{folder} holds a dataset of {meta.get('source')!r} / {meta.get('tokenizer_spec')}, not "
            f"{data.source!r} / {spec}: set data.data_dir elsewhere or delete it"
        )
    if meta.get("fingerprint") == data_fingerprint:
        return True
    log(f"prepare: the corpus or data settings changed since {folder} was made; rebuilding it")
    return False


def prepare_dataset(
    data: DataConfig, tok_cfg: TokenizerConfig, *, tokenizer: Tokenizer | None = None, log=print
) -> Path:
    """Build (or reuse, when source, settings and tokenizer match) the dataset folder; returns its path.

    With `tokenizer` given (a resumed run, a fine-tuned checkpoint), the corpus is encoded with it:
    the usual folder is reused if it was made with that very tokenizer, else a folder named by its hash.
    """
    if (shards := find_shard_folder(data.source)) is not None:
        return shards
    folder, spec = _locate(data, tok_cfg, tokenizer)
    data_fingerprint = fingerprint(data)
    if _is_current(folder, data, spec, data_fingerprint, log):
        return folder
    started = time.perf_counter()
    docs = load_documents(data.source)
    train_texts, val_texts = split_documents(docs, data.val_fraction, data.split_seed)
    log(f"prepare: {len(docs)} documents, {sum(map(len, train_texts)):,} train / "
        f"{sum(map(len, val_texts)):,} val characters; tokenizer {spec}")
    # BPE merges are fitted on train alone; a character alphabet must cover val too, or val can't encode.
    fit_texts = train_texts + val_texts if tok_cfg.kind == "char" else train_texts
    tokenizer = tokenizer or build_tokenizer(tok_cfg, fit_texts)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A name of this process's own: with data.prepare_per_node on a disk that nodes share after all,
    # two preparers never write into one folder.
    tmp = folder.with_name(f"{folder.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    prefix = folder.name
    num_train = _write_split(tmp, f"{prefix}_train", train_texts, tokenizer, data.shard_tokens)
    num_val = _write_split(tmp, f"{prefix}_val", val_texts, tokenizer, data.shard_tokens)
    save_tokenizer(tokenizer, tmp / "tokenizer.json")
    meta = {
        "source": source_key(data.source),
        "tokenizer_spec": spec,
        "fingerprint": data_fingerprint,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "num_documents": len(docs),
        "num_train_tokens": num_train,
        "num_val_tokens": num_val,
        "format": "llm.c token shards (magic 20240520)",
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _swap_in(tmp, folder)
    log(f"prepare: {num_train:,} train / {num_val:,} val tokens in {folder} "
        f"({time.perf_counter() - started:.1f}s)")
    return folder


def _swap_in(tmp: Path, folder: Path) -> None:
    """Replace folder by tmp; the old one (if any) is moved aside first and deleted after."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def failure_marker(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer | None) -> Path:
    """<dataset>.failed: written by the preparing rank when preparation fails, read by the waiting ranks."""
    folder, _ = _locate(data, tok_cfg, tokenizer)
    return folder.with_name(folder.name + ".failed")


def write_failure_marker(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer | None,
                         message: str) -> None:
    marker = failure_marker(data, tok_cfg, tokenizer)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(message, encoding="utf-8")
    tmp.replace(marker)


def wait_for_dataset(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer | None,
                     poll_seconds: float = 1.0) -> Path:
    """Poll until the preparing rank's dataset is complete (its meta.json is current) or it failed."""
    folder, spec = _locate(data, tok_cfg, tokenizer)
    marker = failure_marker(data, tok_cfg, tokenizer)
    data_fingerprint = fingerprint(data)
    deadline = time.monotonic() + data.prepare_timeout_seconds
    while True:
        if marker.is_file():
            raise UserError(f"data preparation failed on the preparing rank: {marker.read_text(encoding='utf-8')}",
                            is_echo=True)
        if _is_current(folder, data, spec, data_fingerprint, log=lambda *_: None):
            return folder
        if time.monotonic() > deadline:
            raise UserError(f"waited {data.prepare_timeout_seconds}s for {folder} to be prepared: raise "
                            "data.prepare_timeout_seconds, or set data.prepare_per_node=true if nodes do not share "
                            "a disk")
        time.sleep(poll_seconds)


def find_shard_folder(source: str) -> Path | None:
    """A folder that already holds train and val token shards (llm.c's, or a gptrain dataset): used as is."""
    path = Path(source).expanduser()
    if source == "shakespeare" or not path.is_dir():
        return None
    has_split = [any(path.glob(f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin")) for split in ("train", "val")]
    return path if all(has_split) else None


def load_dataset_tokenizer(folder: Path, tok_cfg: TokenizerConfig) -> Tokenizer:
    """The dataset's tokenizer.json; a folder of llm.c shards has none and takes tokenizer.kind=gpt2."""
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder / "tokenizer.json")
    if tok_cfg.kind != "gpt2":
        raise UserError(f"{folder} holds token shards without a tokenizer.json: pass --tokenizer gpt2 if they are "
                        "GPT-2 tokens (llm.c's are), or use the tokenizer that made them (--init-from its run)")
    return build_tokenizer(tok_cfg)


def shard_paths(folder: Path, split: str) -> list[Path]:
    paths = sorted(folder.glob(f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    if not paths:
        raise UserError(f"{folder} has no {split} shards: run `gptrain prepare` first")
    return paths
