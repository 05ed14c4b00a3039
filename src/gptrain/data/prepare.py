"""Corpus to token shards: choose the val set, fit the tokenizer on train, encode over all cores, write shards.

A dataset folder holds `<name>_train_NNNNNN.bin`, `<name>_val_NNNNNN.bin`, `tokenizer.json` and
`meta.json`. It is built in `<name>.partial-<host>/` (resumable from its manifest) and renamed, so a
dataset folder is whole or absent. Every step streams: memory does not grow with the corpus.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gptrain.data import catalogue
from gptrain.data.dataset import find_shard_folder
from gptrain.data.encode import read_manifest, write_manifest, write_shards
from gptrain.data.progress import PrepareProgress
from gptrain.data.shards import MAX_SHARD_TOKENS
from gptrain.data.sources import Source
from gptrain.data.split import SplitRule, labelled_documents, plan_split
from gptrain.errors import UserError
from gptrain.faults import fault_point
from gptrain.files import TMP_SUFFIX, fsync_dir, fsync_file, swap_in
from gptrain.tokenizer import Tokenizer, TokenizerConfig, build_tokenizer, load_tokenizer
from gptrain.tokenizer.base import save_tokenizer

IN_PROCESS_BYTES = 16 << 20  # smaller corpora are encoded without worker processes


@dataclass(kw_only=True)
class DataConfig:
    source: str = "shakespeare"  # a name from `gptrain data list`, or a path: a text, JSONL(.gz) or Parquet file,
    # a folder of them, or a folder of token shards
    val_source: str = ""  # an explicit validation set (name or path); empty: the source's official split, else a split
    text_field: str = "text"  # the JSONL key / Parquet column that holds the text
    data_dir: str = ""  # where the shards go; empty: data/<source>-<tokenizer>
    val_fraction: float = 0.1  # share of the corpus (by characters) held out, whole documents at a time
    val_tokens: int = 0  # > 0: the first val_tokens tokens are val instead (llm.c's FineWeb rule)
    shard_tokens: int = 100_000_000
    split_seed: int = 1337
    num_workers: int = 0  # tokenizer processes; 0: one per available core
    prepare_per_node: bool = False  # under torchrun: local rank 0 of every node prepares (no shared disk)
    prepare_timeout_seconds: int = 86_400  # how long other ranks wait for the preparing rank

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1) (got {self.val_fraction})")
        if self.prepare_timeout_seconds < 1:
            raise UserError("data.prepare_timeout_seconds must be at least 1")
        if not 1 <= self.shard_tokens <= MAX_SHARD_TOKENS:
            raise UserError(f"data.shard_tokens must be between 1 and {MAX_SHARD_TOKENS:,} (llm.c's header holds "
                            f"an int32 count; got {self.shard_tokens})")
        if self.val_tokens < 0 or self.num_workers < 0:
            raise UserError("data.val_tokens and data.num_workers must be >= 0")
        if not self.text_field:
            raise UserError("data.text_field must name a JSONL key or Parquet column")

    def workers_for(self, num_bytes: int) -> int:
        """data.num_workers, or for 0 one per core; a corpus under 16 MB is encoded in this process, where
        starting workers would cost more than it saves."""
        if self.num_workers:
            return self.num_workers
        return 1 if num_bytes < IN_PROCESS_BYTES else len(os.sched_getaffinity(0))


def source_key(source: str) -> str:
    """The source as stored in meta.json: a catalogue name, or the resolved absolute path."""
    entry = catalogue.find_entry(source) if source else None
    return entry.name if entry else str(Path(source).expanduser().resolve()) if source else ""


def source_slug(source: str) -> str:
    """A short name for a source: the catalogue's, or the file or folder name in lower-case-and-dashes."""
    if (entry := catalogue.find_entry(source)) is not None:
        return entry.name
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(source).expanduser().resolve().stem).strip("-").lower() or "corpus"


def dataset_dir(data: DataConfig, spec: str) -> Path:
    """data/<source>-<tokenizer spec>: one folder per corpus and tokenizer (paths get a short hash)."""
    if catalogue.find_entry(data.source) is not None:
        return Path("data") / f"{source_slug(data.source)}-{spec}"
    slug = source_slug(data.source)
    digest = hashlib.sha256(source_key(data.source).encode()).hexdigest()[:6]
    return Path("data") / f"{slug}-{digest}-{spec}"


def fingerprint(data: DataConfig) -> str:
    """Changes when the corpus files or the split/shard settings change (then the dataset is rebuilt)."""
    settings = (f"{data.val_fraction}:{data.split_seed}:{data.shard_tokens}:{data.val_tokens}:{data.text_field}"
                f":{source_key(data.val_source)}")
    sources = [catalogue.source_fingerprint(s, data.text_field) for s in (data.source, data.val_source) if s]
    return hashlib.sha256(f"{'|'.join(sources)}|{settings}".encode()).hexdigest()[:16]


def resolve_split(data: DataConfig, log) -> tuple[Source, SplitRule]:
    """The source (downloaded if it is a catalogue name) and its val rule: --val-data, the official split,
    the first-tokens rule (data.val_tokens or the catalogue's), or a seeded split."""
    source, official_val, entry_val_tokens = catalogue.resolve_source(data.source, data.text_field, log)
    val_source = catalogue.resolve_source(data.val_source, data.text_field, log)[0] if data.val_source else None
    val_tokens = data.val_tokens or entry_val_tokens
    rule = SplitRule(val_source=val_source or (None if val_tokens else official_val), val_tokens=val_tokens,
                     val_fraction=data.val_fraction, seed=data.split_seed)
    return source, plan_split(source, rule)  # measured once, for the tokenizer fit and the encoding alike


def _fit_texts(source: Source, rule: SplitRule, tok_cfg: TokenizerConfig) -> Iterator[str]:
    """What a tokenizer is fitted on: train documents for BPE; train and val for a character alphabet
    (else val could not be encoded); with the first-tokens rule, everything."""
    for label, doc in labelled_documents(source, rule):
        if label != "val" or tok_cfg.kind == "char":
            yield doc.text


def tokenizer_spec(tokenizer: Tokenizer) -> str:
    """What identifies a dataset made with a given tokenizer (not one fitted from the config): its hash."""
    return f"{tokenizer.name}-{hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:10]}"


def _holds_tokenizer(folder: Path, tokenizer: Tokenizer) -> bool:
    path = folder / "tokenizer.json"
    return path.is_file() and load_tokenizer(path).to_json() == tokenizer.to_json()


def locate_dataset(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer | None) -> tuple[Path, str]:
    """The dataset folder and its tokenizer spec (a given tokenizer reuses a folder made with it)."""
    spec = tok_cfg.describe()
    folder = _folder(data, spec)
    if tokenizer is None:
        return folder, spec
    if _holds_tokenizer(folder, tokenizer) and (folder / "meta.json").is_file():
        return folder, json.loads((folder / "meta.json").read_text()).get("tokenizer_spec", spec)
    spec = tokenizer_spec(tokenizer)
    return _folder(data, spec), spec


def _folder(data: DataConfig, spec: str) -> Path:
    return Path(data.data_dir).expanduser().resolve() if data.data_dir else dataset_dir(data, spec)


def is_current(folder: Path, data: DataConfig, spec: str, data_fingerprint: str, log) -> bool:
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
    data: DataConfig, tok_cfg: TokenizerConfig, *, tokenizer: Tokenizer | None = None, log=print,
    may_fork: bool = False,
) -> Path:
    """Build (or reuse, when source, settings and tokenizer match) the dataset folder; returns its path.

    With `tokenizer` given (a resumed run, a fine-tuned checkpoint), the corpus is encoded with it:
    the usual folder is reused if it was made with that very tokenizer, else a folder named by its hash.
    may_fork: the tokenizer workers may start by fork (see encode.start_method).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A tokenizer worker that is importing the user's script, which calls gptrain again: fail (the parent
        # then reports BrokenProcessPool as a UserError) rather than wait forever on the parent's lock.
        raise RuntimeError("gptrain was called while a worker process imported the main script")
    if (shards := find_shard_folder(data.source)) is not None:
        return shards
    for spec in filter(None, (data.source, data.val_source)):
        catalogue.check_source(spec)  # a mistake is reported before anything is written
    folder, spec = locate_dataset(data, tok_cfg, tokenizer)
    data_fingerprint = fingerprint(data)
    if is_current(folder, data, spec, data_fingerprint, log):
        return folder
    _check_replaceable(folder)
    is_new_parent = not folder.parent.exists()
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _exclusive(folder, log):
            if not is_current(folder, data, spec, data_fingerprint, lambda *_: None):  # or another process made it
                _build(folder, data, tok_cfg, spec, data_fingerprint, tokenizer, log, may_fork)
    except UserError:  # bad input: nothing to resume, so nothing is left (an interruption keeps its partial folder)
        shutil.rmtree(_partial_dir(folder), ignore_errors=True)
        _lock_path(folder).unlink(missing_ok=True)
        if is_new_parent and not any(folder.parent.iterdir()):
            folder.parent.rmdir()
        raise
    return folder


def _check_replaceable(folder: Path) -> None:
    """The dataset folder may be written only where nothing is, or where an older gptrain dataset is."""
    if folder.exists() and not (folder / "meta.json").is_file():
        what = "a file" if folder.is_file() else "a folder that is not a gptrain dataset (no meta.json)"
        raise UserError(f"{folder} is {what}; it is never overwritten: give a new folder for --out / data.data_dir")


def _partial_dir(folder: Path) -> Path:
    # The host in the name: with data.prepare_per_node on a disk that nodes share after all, two
    # preparers never write into one folder.
    return folder.with_name(f"{folder.name}.partial-{socket.gethostname()}")


def _lock_path(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


@contextmanager
def _exclusive(folder: Path, log):
    """One preparation of a folder at a time on this machine (a second process waits for the first)."""
    with open(_lock_path(folder), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"prepare: another process is preparing {folder}; waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _counting(items, counter: dict):
    for label, doc in items:
        counter[label] = counter.get(label, 0) + (not doc.is_continuation)
        yield label, doc


def _build(folder: Path, data: DataConfig, tok_cfg: TokenizerConfig, spec: str, data_fingerprint: str,
           tokenizer: Tokenizer | None, log, may_fork: bool) -> None:
    """Encode into <folder>.partial-<host>/ (resuming its manifest when it has one), then rename it."""
    started = time.perf_counter()
    source, rule = resolve_split(data, log)
    partial = _partial_dir(folder)
    manifest, tokenizer = _open_partial(partial, f"{data_fingerprint}:{spec}", source, rule, tok_cfg, tokenizer,
                                        log)
    num_bytes = source.num_bytes + (rule.val_source.num_bytes if rule.val_source else 0)
    num_workers = data.workers_for(num_bytes)
    progress = PrepareProgress(num_bytes, f"prepare {Path(source.key).name}", log)
    num_documents: dict[str, int] = {}
    try:
        done = write_shards(partial, folder.name, _counting(labelled_documents(source, rule), num_documents),
                            tokenizer, shard_tokens=data.shard_tokens, val_tokens=rule.val_tokens,
                            num_workers=num_workers, manifest=manifest, on_progress=progress.update,
                            may_fork=may_fork)
    finally:
        progress.close()
    writers = done["writers"]
    if not sum(num_documents.values()):
        raise UserError(f"corpus {data.source!r} is empty: it has no text to train on")
    for split, other in (("train", "val"), ("val", "train")):
        if not writers[split]["num_tokens"]:
            num_other = writers[other]["num_tokens"]
            raise UserError(f"the {split} split of {data.source!r} came out empty (all {num_other:,} tokens are "
                            f"{other}): change data.val_tokens / data.val_fraction, or give --val-data")
    meta = {
        "source": source_key(data.source),
        "val_source": source_key(data.val_source) or None,
        "val_rule": _describe_rule(rule, source),
        "tokenizer_spec": spec,
        "fingerprint": data_fingerprint,
        **_tokenizer_meta(tokenizer),
        "num_documents": sum(num_documents.values()),
        "num_train_tokens": writers["train"]["num_tokens"],
        "num_val_tokens": writers["val"]["num_tokens"],
        "shard_tokens": data.shard_tokens,
        "format": "llm.c token shards: uint16 under magic 20240520 v1, uint32 under 20240801 v7",
    }
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))
    (partial / "manifest.json").unlink()
    _make_durable(partial)
    fault_point("prepare.swap")
    swap_in(partial, folder)
    seconds = time.perf_counter() - started
    rate = progress.num_tokens / seconds / 1e6
    log(f"prepare: {meta['num_documents']:,} documents, {meta['num_train_tokens']:,} train / "
        f"{meta['num_val_tokens']:,} val tokens in {folder} ({seconds:.1f}s, {rate:.2f}M tokens/s on "
        f"{num_workers} worker(s))")


def _make_durable(partial: Path) -> None:
    """fsync every file of the finished partial folder and the folder itself, so that what swap_in names
    the dataset is on disk (tokenizer.json may come from an earlier, interrupted process); temp files
    left by an interrupted atomic write are dropped first."""
    for path in partial.glob(f".*{TMP_SUFFIX}"):
        path.unlink()
    for path in partial.iterdir():
        fsync_file(path)
    fsync_dir(partial)


def _open_partial(partial: Path, key: str, source: Source, rule: SplitRule, tok_cfg: TokenizerConfig,
                  tokenizer: Tokenizer | None, log) -> tuple[dict, Tokenizer]:
    """The manifest and tokenizer of an interrupted preparation of this dataset (key), or of a fresh
    one: an empty partial folder holding the tokenizer (fitted now unless given) and a first manifest."""
    manifest = read_manifest(partial, key)
    if manifest is not None:
        log(f"prepare: resuming the interrupted preparation in {partial} ({manifest['position']:,} documents done)")
        return manifest, load_tokenizer(partial / "tokenizer.json")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    if tokenizer is None:
        if tok_cfg.kind == "bpe":
            log(f"prepare: fitting a {tok_cfg.vocab_size}-token BPE on the train split")
        is_fitted = tok_cfg.kind in ("bpe", "char") and not tok_cfg.is_file
        tokenizer = build_tokenizer(tok_cfg, _fit_texts(source, rule, tok_cfg) if is_fitted else None)
    save_tokenizer(tokenizer, partial / "tokenizer.json")
    manifest = {"key": key, "position": 0, "writers": {}}
    write_manifest(partial, manifest)
    return manifest, tokenizer


def _tokenizer_meta(tokenizer: Tokenizer) -> dict:
    return {"tokenizer": tokenizer.name, "tokenizer_sha256": hashlib.sha256(tokenizer.to_json().encode()).hexdigest(),
            "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id}


def train_tokenizer(data: DataConfig, tok_cfg: TokenizerConfig, out: Path, log=print) -> Tokenizer:
    """Fit a BPE (or character) tokenizer on a corpus's train split, streaming, and save it to out."""
    if tok_cfg.kind not in ("bpe", "char"):
        raise UserError(f"only a bpe or char tokenizer is trained (got tokenizer.kind={tok_cfg.kind!r})")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: give the path of the tokenizer.json to write")
    source, rule = resolve_split(data, log)
    log(f"tokenizer: fitting {tok_cfg.describe()} on {source.key} (at most {tok_cfg.max_train_chars:,} characters)")
    tokenizer = build_tokenizer(tok_cfg, _fit_texts(source, rule, tok_cfg))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out)
    return tokenizer


def _describe_rule(rule: SplitRule, source: Source) -> str:
    if rule.val_source is not None:
        return f"val source {rule.val_source.key}"
    if rule.val_tokens:
        return f"first {rule.val_tokens} tokens"
    if source.is_one_document:
        return f"one document, cut at a line break: val_fraction {rule.val_fraction}"
    return f"seeded split by document: val_fraction {rule.val_fraction}, seed {rule.seed}"
