"""Tokenizers behind one interface: exact GPT-2 BPE, byte-level BPE trained on the corpus, characters.

Every tokenizer saves to one `tokenizer.json` and `load_tokenizer` reads any of them back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gptrain.errors import UserError
from gptrain.tokenizer.base import EOT_TEXT, Tokenizer

KINDS = ("bpe", "gpt2", "char")


@dataclass(kw_only=True)
class TokenizerConfig:
    kind: str = "bpe"  # bpe: trained on the corpus; gpt2: OpenAI's exact BPE; char: one id per character;
    # or the path of a tokenizer.json (gptrain's, or any Hugging Face byte-level BPE with <|endoftext|>)
    vocab_size: int = 2048  # for bpe only; gpt2 is 50257 and char is the corpus's alphabet
    max_train_chars: int = 500_000_000  # a BPE is fitted on at most this many characters of the train split

    def __post_init__(self) -> None:
        if self.kind not in KINDS and not self.is_file:
            raise UserError(f"tokenizer.kind must be one of {', '.join(KINDS)} or a tokenizer.json file "
                            f"(got {self.kind!r})")
        if self.max_train_chars < 1:
            raise UserError(f"tokenizer.max_train_chars must be positive (got {self.max_train_chars})")
        if self.kind == "bpe" and not 260 <= self.vocab_size <= 65_535:
            raise UserError(
                f"tokenizer.vocab_size must be between 260 and 65535 for a trained BPE (got {self.vocab_size})"
            )

    @property
    def is_file(self) -> bool:
        return self.kind.endswith(".json")

    def describe(self) -> str:
        if self.is_file:
            path = Path(self.kind).expanduser()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "missing"
            return f"file-{digest}"
        return f"bpe{self.vocab_size}" if self.kind == "bpe" else self.kind


def capped(texts: Iterable[str], max_chars: int) -> Iterable[str]:
    """texts up to the one that takes the total past max_chars (that one included, cut to fit)."""
    total = 0
    for text in texts:
        if total + len(text) >= max_chars:
            yield text[: max_chars - total]
            return
        total += len(text)
        yield text


def build_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str] | None = None) -> Tokenizer:
    """The GPT-2 tokenizer, a tokenizer.json, or a BPE/char tokenizer fitted to train_texts (a stream:
    a BPE reads at most cfg.max_train_chars of it)."""
    if cfg.is_file:
        return load_tokenizer(Path(cfg.kind).expanduser())
    if cfg.kind == "gpt2":
        from gptrain.tokenizer.gpt2 import GPT2Tokenizer

        return GPT2Tokenizer()
    if train_texts is None:
        raise ValueError(f"a {cfg.kind} tokenizer needs texts to train on")
    if cfg.kind == "char":
        from gptrain.tokenizer.char import CharTokenizer

        return CharTokenizer.train(train_texts)
    from gptrain.tokenizer.bpe import BPETokenizer

    return BPETokenizer.train(capped(train_texts, cfg.max_train_chars), cfg.vocab_size)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json written by any gptrain tokenizer (or a Hugging Face tokenizer.json)."""
    path = Path(path)
    try:
        return parse_tokenizer(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokenizer file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a tokenizer.json (not valid JSON)") from None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def parse_tokenizer(text: str) -> Tokenizer:
    """The tokenizer a tokenizer.json text describes."""
    spec = json.loads(text)
    kind = spec.get("gptrain_tokenizer") if isinstance(spec, dict) else None
    if kind == "gpt2":
        from gptrain.tokenizer.gpt2 import GPT2Tokenizer

        return GPT2Tokenizer()
    if kind == "char":
        from gptrain.tokenizer.char import CharTokenizer

        return CharTokenizer.from_spec(spec)
    from gptrain.tokenizer.bpe import BPETokenizer

    return BPETokenizer.from_json(text)


__all__ = ["EOT_TEXT", "KINDS", "Tokenizer", "TokenizerConfig", "build_tokenizer", "load_tokenizer",
           "parse_tokenizer"]
