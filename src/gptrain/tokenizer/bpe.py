"""Byte-level BPE trained on the user's corpus with Hugging Face `tokenizers` (GPT-2's scheme)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptrain.errors import UserError
from gptrain.tokenizer.base import EOT_TEXT


class BPETokenizer:
    def __init__(self, hf: HFTokenizer) -> None:
        self._hf = hf
        self.vocab_size = hf.get_vocab_size()
        eot = hf.token_to_id(EOT_TEXT)
        if eot is None:
            raise UserError(f"the tokenizer has no {EOT_TEXT} token, which gptrain uses to separate documents")
        self.eot_id = eot
        self.name = f"bpe{self.vocab_size}"
        self.unk_id = None  # byte-level: every text has ids

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a plain Exception for a JSON it cannot read
            raise UserError(f"not a tokenizer.json that Hugging Face tokenizers can read ({e})") from None
        return cls(hf)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_lenient(self, text: str) -> list[int]:
        return self.encode(text)  # byte-level: no text is unknown

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._hf.decode(ids, skip_special_tokens=False)

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes each id stands for; added tokens (the separator among them) count 0. A byte-level
        token spells one byte per character of the byte-to-unicode alphabet; for another kind of
        tokenizer.json the text each token decodes to alone is counted (an approximation: such decoders
        may add or drop a word's leading space)."""
        lengths = [0] * self.vocab_size
        added = set(self._hf.get_added_tokens_decoder())
        is_byte_level = isinstance(self._hf.decoder, decoders.ByteLevel)
        for token, i in self._hf.get_vocab(with_added_tokens=False).items():
            if i not in added and i < self.vocab_size:
                lengths[i] = len(token) if is_byte_level else len(self._hf.decode([i]).encode("utf-8"))
        return lengths

    def to_json(self) -> str:
        return self._hf.to_str()
