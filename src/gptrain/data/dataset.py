"""A prepared dataset as training reads it: its shard files, its tokenizer, the fingerprint a saved data
position is tied to, and the check that the shards are the run's tokenizer's. Works for gptrain's
datasets (with meta.json) and for a folder of llm.c shards alike."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from gptrain.errors import UserError
from gptrain.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer
from gptrain.tokenizer.base import Tokenizer


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


def dataset_fingerprint(folder: Path) -> str:
    """What a saved data position is tied to: meta.json's fingerprint, or the shards' names and sizes."""
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text()).get("fingerprint", "")
    stats = [f"{p.name}:{p.stat().st_size}" for split in ("train", "val") for p in shard_paths(folder, split)]
    return hashlib.sha256("\n".join(stats).encode()).hexdigest()[:16]


def check_dataset_tokenizer(folder: Path, tokenizer: Tokenizer) -> None:
    """The shards must be the run's tokenizer's: meta.json's vocabulary size and tokenizer hash, or for
    llm.c shards (no meta.json) token ids below the vocabulary size in the first million tokens."""
    meta_path = folder / "meta.json"
    fix = "prepare the corpus with this run's tokenizer, or train on the dataset with its own"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        digest = hashlib.sha256(tokenizer.to_json().encode()).hexdigest()
        if meta.get("vocab_size") != tokenizer.vocab_size or meta.get("tokenizer_sha256", digest) != digest:
            raise UserError(f"{folder} was made with tokenizer {meta.get('tokenizer')} (vocabulary "
                            f"{meta.get('vocab_size')}), but this run uses {tokenizer.name} (vocabulary "
                            f"{tokenizer.vocab_size}): {fix}")
        return
    from gptrain.data.shards import open_shard

    head = np.asarray(open_shard(shard_paths(folder, "train")[0])[:1_000_000])
    if len(head) and int(head.max()) >= tokenizer.vocab_size:
        raise UserError(f"{folder} holds token id {int(head.max())}, beyond the vocabulary of {tokenizer.name} "
                        f"({tokenizer.vocab_size}): {fix}")


def shard_paths(folder: Path, split: str) -> list[Path]:
    paths = sorted(folder.glob(f"*_{split}_[0-9][0-9][0-9][0-9][0-9][0-9].bin"))
    if not paths:
        raise UserError(f"{folder} has no {split} shards: run `gptrain data prepare` first")
    return paths
