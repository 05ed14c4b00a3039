"""The Tokenizer protocol that the data pipeline, training and generation rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gptrain.errors import UserError
from gptrain.files import write_atomic

EOT_TEXT = "<|endoftext|>"  # document separator, GPT-2's own; every tokenizer here has it


class Tokenizer(Protocol):
    name: str  # e.g. "gpt2", "bpe2048", "char65"
    vocab_size: int
    eot_id: int
    unk_id: int | None  # the id unseen characters map to when scoring others' text (char only); None: none

    def encode(self, text: str) -> list[int]:
        """Ids of text. A literal "<|endoftext|>" in the text is plain text for gpt2 and char, and the
        separator id for a trained BPE (HF tokenizers matches added tokens); corpora are split into
        documents before encoding, so this only matters for text that spells the marker out."""

    def encode_lenient(self, text: str) -> list[int]:
        """Ids of others' text to score (HellaSwag): unseen characters become unk_id; a UserError when
        the tokenizer has no such id and cannot encode the text."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() over many texts, in parallel where the backend can."""

    def decode(self, ids: list[int]) -> str:
        """Text of ids (the separator decodes to EOT_TEXT)."""

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for, for bits per byte (0 for the separator and the unknown id)."""

    def to_json(self) -> str:
        """The tokenizer.json text from which load_tokenizer rebuilds this tokenizer."""


def encode_lenient(tokenizer: Tokenizer, text: str) -> list[int] | None:
    """Ids of text for scoring: unseen characters become the unknown id where the tokenizer has one;
    None when it cannot encode text at all (an old character tokenizer without that id)."""
    try:
        return tokenizer.encode_lenient(text)
    except UserError:
        return None


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Ids to start generation from: the prompt's, or the document separator for an empty prompt."""
    return (tokenizer.encode(prompt) if prompt else []) or [tokenizer.eot_id]


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    """Write tokenizer.json atomically (files.write_atomic)."""
    write_atomic(Path(path), tokenizer.to_json())
