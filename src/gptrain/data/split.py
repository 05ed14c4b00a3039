"""Which documents are validation, as a stream of (label, document) pairs read once, in corpus order.

Rules, first match wins: an explicit or official val source (its documents are val, all of the
main source is train); the first N tokens of the corpus (llm.c's FineWeb rule: label "stream", cut
by the shard writer); else a seeded choice of whole documents. For corpora up to SMALL_CORPUS_BYTES
that choice reads the corpus one extra time for document sizes and takes documents in a seeded order
until val holds val_fraction of the characters (a one-document corpus is cut at a line break);
bigger corpora choose each document by a seeded coin drawn for its index, in the same single pass.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from gptrain.data.sources import Document, Source
from gptrain.errors import UserError

SMALL_CORPUS_BYTES = 64 << 20  # 64 MiB: Shakespeare (5 MB) and the like


@dataclass(frozen=True)
class SplitRule:
    val_source: Source | None = None  # its documents are the val set
    val_tokens: int = 0  # > 0: the first val_tokens tokens are the val set
    val_fraction: float = 0.1
    seed: int = 1337
    # Filled by plan_split for the exact seeded split, so the corpus is measured once, not per pass:
    val_ids: frozenset[int] | None = None  # the val documents' indices
    single_chars: int = 0  # > 0: one document of this many characters, cut at a line break


def plan_split(source: Source, rule: SplitRule) -> SplitRule:
    """The rule with the exact seeded split measured (one streaming pass) where it applies: corpora up
    to SMALL_CORPUS_BYTES, and a single text file of any size."""
    is_exact = source.num_bytes <= SMALL_CORPUS_BYTES or source.is_one_document
    if rule.val_source is not None or rule.val_tokens > 0 or not is_exact or rule.val_ids is not None \
            or rule.single_chars:
        return rule
    lengths = document_lengths(source)
    if not lengths:
        raise UserError(f"corpus {source.key!r} is empty: it has no text to train on")
    if len(lengths) == 1:
        return replace(rule, single_chars=lengths[0])
    return replace(rule, val_ids=frozenset(exact_val_ids(lengths, rule.val_fraction, rule.seed)))


def nonempty_documents(source: Source) -> Iterator[Document]:
    """A source's documents without the empty ones (a continuation always belongs to a non-empty one)."""
    for doc in source.documents():
        if doc.is_continuation or (doc.text and not doc.text.isspace()):  # isspace: no stripped copy
            yield doc


def document_lengths(source: Source) -> list[int]:
    """Characters of each (non-empty) document: one streaming pass."""
    lengths: list[int] = []
    for doc in nonempty_documents(source):
        if doc.is_continuation:
            lengths[-1] += len(doc.text)
        else:
            lengths.append(len(doc.text))
    return lengths


def exact_val_ids(lengths: list[int], val_fraction: float, seed: int) -> set[int]:
    """Whole documents in a seeded order until val holds val_fraction of the characters. A document that
    would take val past twice that share is passed over (one huge document must not become all of val),
    and at least one document stays in train."""
    total = sum(lengths)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    val_ids: set[int] = set()
    val_chars = 0
    for i in order:
        if val_chars >= val_fraction * total or len(val_ids) == len(lengths) - 1:
            break
        if val_chars + lengths[i] > 2 * val_fraction * total:
            continue
        val_ids.add(i)
        val_chars += lengths[i]
    return val_ids


class HashedChoice:
    """A seeded coin per document index, true with probability val_fraction, independent of the order
    documents are read in; drawn 65,536 at a time (one draw per document would dominate a fast pass)."""

    BLOCK = 65_536

    def __init__(self, val_fraction: float, seed: int) -> None:
        self.val_fraction, self.seed = val_fraction, seed
        self._block, self._coins = -1, np.zeros(0, dtype=bool)

    def __call__(self, index: int) -> bool:
        block = index // self.BLOCK
        if block != self._block:
            rng = np.random.default_rng([self.seed, block])
            self._block, self._coins = block, rng.random(self.BLOCK) < self.val_fraction
        return bool(self._coins[index % self.BLOCK])


def _cut_single(source: Source, total_chars: int, val_fraction: float) -> Iterator[tuple[str, Document]]:
    """One document: train up to the last line break before (1 - val_fraction) of it, val after."""
    target = int(total_chars * (1 - val_fraction))
    offset, is_val = 0, False
    for doc in nonempty_documents(source):
        end = offset + len(doc.text)
        if is_val or end < target:
            yield ("val" if is_val else "train"), doc
        else:
            local = doc.text.rfind("\n", 0, target - offset)
            cut = offset + local if offset + local > 0 else target
            head, tail = doc.text[: cut - offset], doc.text[cut - offset :]
            if head:
                yield "train", Document(doc.name, head, doc.is_continuation, doc.num_bytes)
            yield "val", Document(doc.name, tail, False, 0 if head else doc.num_bytes)
            is_val = True
        offset = end


def labelled_documents(source: Source, rule: SplitRule) -> Iterator[tuple[str, Document]]:
    """(label, document) pairs: 'train', 'val', or 'stream' (cut at rule.val_tokens by the writer)."""
    rule = plan_split(source, rule)
    if rule.val_source is not None:
        yield from (("val", d) for d in nonempty_documents(rule.val_source))
        yield from (("train", d) for d in nonempty_documents(source))
        return
    if rule.val_tokens > 0:
        yield from (("stream", d) for d in nonempty_documents(source))
        return
    if rule.single_chars:
        yield from _cut_single(source, rule.single_chars, rule.val_fraction)
        return
    is_val = rule.val_ids.__contains__ if rule.val_ids is not None else HashedChoice(rule.val_fraction, rule.seed)
    index, label = -1, "train"
    for doc in nonempty_documents(source):
        if not doc.is_continuation:
            index += 1
            label = "val" if is_val(index) else "train"
        yield label, doc
