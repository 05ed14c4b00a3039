"""Data preparation across ranks: the preparing rank's failure marker, and the other ranks' wait."""

from __future__ import annotations

import time
from pathlib import Path

from gptrain.data.prepare import DataConfig, fingerprint, is_current, locate_dataset
from gptrain.errors import UserError
from gptrain.files import write_atomic
from gptrain.tokenizer import Tokenizer, TokenizerConfig


def failure_marker(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer | None) -> Path:
    """<dataset>.failed: written by the preparing rank when preparation fails, read by the waiting ranks."""
    folder, _ = locate_dataset(data, tok_cfg, tokenizer)
    return folder.with_name(folder.name + ".failed")


def write_failure_marker(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer | None,
                         message: str) -> None:
    marker = failure_marker(data, tok_cfg, tokenizer)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, message)


def wait_for_dataset(data: DataConfig, tok_cfg: TokenizerConfig, tokenizer: Tokenizer | None,
                     poll_seconds: float = 1.0) -> Path:
    """Poll until the preparing rank's dataset is complete (its meta.json is current) or it failed."""
    folder, spec = locate_dataset(data, tok_cfg, tokenizer)
    marker = failure_marker(data, tok_cfg, tokenizer)
    data_fingerprint = fingerprint(data)
    deadline = time.monotonic() + data.prepare_timeout_seconds
    while True:
        if marker.is_file():
            raise UserError(f"data preparation failed on the preparing rank: {marker.read_text(encoding='utf-8')}",
                            is_echo=True)
        if is_current(folder, data, spec, data_fingerprint, log=lambda *_: None):
            return folder
        if time.monotonic() > deadline:
            raise UserError(f"waited {data.prepare_timeout_seconds}s for {folder} to be prepared: raise "
                            "data.prepare_timeout_seconds, or set data.prepare_per_node=true if nodes do not share "
                            "a disk")
        time.sleep(poll_seconds)
