"""Tokenizers behind one interface: exact GPT-2 BPE, byte-level BPE trained on the corpus, characters.

Every tokenizer saves to one `tokenizer.json` and `load_tokenizer` reads any of them back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gptrain.errors import UserError
from gptrain.tokenizer.base import EOT_TEXT, Tokenizer

KINDS = ("bpe", "gpt2", "char")


@dataclass(kw_only=True)
class TokenizerConfig:
    kind: str = "bpe"  # bpe: trained on the corpus; gpt2: OpenAI's exact BPE; char: one id per character
    vocab_size: int = 2048  # for bpe only; gpt2 is 50257 and char is the corpus's alphabet

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"tokenizer.kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.kind == "bpe" and not 260 <= self.vocab_size <= 65_535:
            raise UserError(
                f"tokenizer.vocab_size must be between 260 and 65535 for a trained BPE (got {self.vocab_size})"
            )

    def describe(self) -> str:
        return f"bpe{self.vocab_size}" if self.kind == "bpe" else self.kind


def build_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str] | None = None) -> Tokenizer:
    """The GPT-2 tokenizer, or a BPE/char tokenizer fitted to train_texts."""
    if cfg.kind == "gpt2":
        from gptrain.tokenizer.gpt2 import GPT2Tokenizer

        return GPT2Tokenizer()
    if train_texts is None:
        raise ValueError(f"a {cfg.kind} tokenizer needs texts to train on")
    if cfg.kind == "char":
        from gptrain.tokenizer.char import CharTokenizer

        return CharTokenizer.train(train_texts)
    from gptrain.tokenizer.bpe import BPETokenizer

    return BPETokenizer.train(train_texts, cfg.vocab_size)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json written by any gptrain tokenizer (or a Hugging Face tokenizer.json)."""
    path = Path(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokenizer file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a tokenizer.json (not valid JSON)") from None
    kind = spec.get("gptrain_tokenizer") if isinstance(spec, dict) else None
    if kind == "gpt2":
        from gptrain.tokenizer.gpt2 import GPT2Tokenizer

        return GPT2Tokenizer()
    if kind == "char":
        from gptrain.tokenizer.char import CharTokenizer

        return CharTokenizer.from_spec(spec)
    from gptrain.tokenizer.bpe import BPETokenizer

    return BPETokenizer.from_json(path.read_text(encoding="utf-8"))


__all__ = ["EOT_TEXT", "KINDS", "Tokenizer", "TokenizerConfig", "build_tokenizer", "load_tokenizer"]
