"""Shared fixtures: a tiny model config, a small corpus, and synthetic shards in tmp_path."""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptrain.data.shards import write_shard
from gptrain.model.gpt import GPT, ModelConfig

WORDS = ("thou art the king of all that doth lie before thee and thine own heart "
         "speak gentle lord what news from rome my sword shall fall upon the field").split()


# Tiny models run fastest on one thread, and CI machines have few cores.
torch.set_num_threads(1)

# The linear probe's and compile rule's measurements go to a folder of this session (subprocesses too):
# a test never reads what an earlier run measured on this machine, nor leaves its one-thread timings.
if not os.environ.get("GPTRAIN_SPEED_CACHE"):
    os.environ["GPTRAIN_SPEED_CACHE"] = tempfile.mkdtemp(prefix="gptrain-speed-cache-")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return ModelConfig(n_embd=32, n_layer=2, n_head=2, block_size=16, vocab_size=64, vocab_multiple=1)


@pytest.fixture
def tiny_model(tiny_config) -> GPT:
    return GPT(tiny_config)


def wait_for(predicate, seconds: float = 30.0) -> None:
    """Poll predicate() until it is true; fail after `seconds` (for tests that watch a live run)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def make_corpus_text(num_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        speaker = rng.choice(["KING", "LORD", "QUEEN", "FOOL"])
        lines.append(f"{speaker}.\n" + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) + ".\n")
    return "\n".join(lines)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """A folder of five small 'plays' (documents) of pseudo-Shakespeare."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(5):
        (folder / f"play_{i}.txt").write_text(make_corpus_text(120, seed=i))
    return folder


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """Synthetic train/val shards of a repeating pattern over a vocabulary of 64."""
    folder = tmp_path / "shards"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_shard(folder / "synth_train_000000.bin", rng.integers(0, 64, 5000), 64)
    write_shard(folder / "synth_train_000001.bin", rng.integers(0, 64, 3000), 64)
    write_shard(folder / "synth_val_000000.bin", rng.integers(0, 64, 1000), 64)
    return folder


def copy_run_at(run_dir: Path, checkpoint: str, out: Path) -> Path:
    """A run directory holding only run_dir's config and one of its checkpoints: as if killed there."""
    import shutil

    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.toml", out / "config.toml")
    shutil.copytree(run_dir / "checkpoints" / checkpoint, out / "checkpoints" / checkpoint)
    return out


def have_equal_final_weights(run_a: Path, run_b: Path) -> bool:
    from safetensors.torch import load_file

    a = load_file(str(run_a / "checkpoints" / "final" / "model.safetensors"))
    b = load_file(str(run_b / "checkpoints" / "final" / "model.safetensors"))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
