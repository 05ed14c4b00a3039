"""Synthetic corpora of pseudo-words, for preparation benchmarks and memory tests (not for training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_jsonl_corpus(path: Path, num_bytes: int, seed: int = 0) -> None:
    """A JSONL corpus of about num_bytes: documents of about 2 KB of pseudo-words from a 20,000-word list."""
    rng = np.random.default_rng(seed)
    letters = list("etaoinshrdlucmfwypvbgk")
    words = np.array(["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(20_000)])
    written = 0
    with open(path, "w") as f:
        while written < num_bytes:
            text = " ".join(words[rng.integers(0, len(words), 100_000)])
            for start in range(0, len(text), 2000):
                line = json.dumps({"text": text[start : start + 2000] + ".\n"}) + "\n"
                f.write(line)
                written += len(line)
