"""Character-level tokenizer: one id per distinct character of the training text, plus EOT."""

from __future__ import annotations

import json
from collections.abc import Iterable

from gptrain.errors import UserError
from gptrain.tokenizer.base import EOT_TEXT


class CharTokenizer:
    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + 1
        self.name = f"char{self.vocab_size}"
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        alphabet: set[str] = set()
        for text in texts:
            alphabet.update(text)
        return cls(sorted(alphabet))

    @classmethod
    def from_spec(cls, spec: dict) -> CharTokenizer:
        return cls(list(spec["chars"]))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise UserError(
                f"character {e.args[0]!r} is not in this character tokenizer's alphabet; "
                "use only characters that appear in the training corpus"
            ) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(EOT_TEXT if i == self.eot_id else self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"gptrain_tokenizer": "char", "chars": self.chars}, ensure_ascii=False)
