"""OpenAI's GPT-2 BPE through tiktoken, built from the verified local ranks file (works offline)."""

from __future__ import annotations

import json

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from gptrain.tokenizer.base import EOT_TEXT
from gptrain.tokenizer.gpt2_assets import SHA256, encoding_path

# tiktoken's r50k_base / gpt2 pre-tokenizer pattern.
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_ENCODING: tiktoken.Encoding | None = None


def gpt2_encoding() -> tiktoken.Encoding:
    global _ENCODING
    if _ENCODING is None:
        ranks = load_tiktoken_bpe(str(encoding_path()))
        _ENCODING = tiktoken.Encoding(
            name="gpt2",
            pat_str=PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: 50256},
            explicit_n_vocab=50257,
        )
    return _ENCODING


class GPT2Tokenizer:
    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256
    unk_id = None  # byte-level: every text has ids

    def __init__(self) -> None:
        self._enc = gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_lenient(self, text: str) -> list[int]:
        return self.encode(text)  # byte-level: no text is unknown

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: data preparation runs one tokenizer process per core (tiktoken's batch threads
        # would only compete with them).
        return [self._enc.encode_ordinary(text) for text in texts]

    def encode_to_array(self, text: str) -> np.ndarray:
        """encode() as a uint32 array straight from tiktoken (no Python list): the data pipeline's path."""
        return self._enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for (0 for the separator)."""
        return [len(self._enc.decode_single_token_bytes(i)) for i in range(self.eot_id)] + [0]

    def to_json(self) -> str:
        return json.dumps({"gptrain_tokenizer": "gpt2", "encoding": "r50k_base", "ranks_sha256": SHA256})
