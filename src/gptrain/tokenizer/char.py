"""Character-level tokenizer: one id per distinct character of the training text, plus EOT and an
unknown-symbol id (the last id) that evaluation maps unseen characters to."""

from __future__ import annotations

import json
from collections.abc import Iterable

from gptrain.errors import UserError
from gptrain.tokenizer.base import EOT_TEXT


class CharTokenizer:
    def __init__(self, chars: list[str], *, has_unknown: bool = True) -> None:
        self.chars = chars
        self.eot_id = len(chars)
        # Tokenizers saved before the unknown id existed load without one (their models have no row for it).
        self.unk_id = len(chars) + 1 if has_unknown else None
        self.vocab_size = len(chars) + (2 if has_unknown else 1)
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
        return cls(list(spec["chars"]), has_unknown=bool(spec.get("unknown", False)))

    def encode(self, text: str) -> list[int]:
        """Ids of text; a character outside the alphabet is an error (a prompt must be in the corpus's)."""
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise UserError(
                f"character {e.args[0]!r} is not in this character tokenizer's alphabet; "
                "use only characters that appear in the training corpus"
            ) from None

    def encode_lenient(self, text: str) -> list[int]:
        """Ids of text with unseen characters mapped to the unknown id (for scoring others' text)."""
        if self.unk_id is None:
            return self.encode(text)
        return [self._ids.get(c, self.unk_id) for c in text]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return "".join(EOT_TEXT if i == self.eot_id else "\ufffd" if i == self.unk_id else self.chars[i] for i in ids)

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for: 0 for the separator and the unknown id."""
        return [len(c.encode("utf-8")) for c in self.chars] + [0] * (self.vocab_size - len(self.chars))

    def to_json(self) -> str:
        spec = {"gptrain_tokenizer": "char", "chars": self.chars, "unknown": self.unk_id is not None}
        return json.dumps(spec, ensure_ascii=False)
