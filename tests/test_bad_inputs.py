"""Every mistake: one line on stderr saying what is wrong and what to do, exit code 2, no traceback, and
no file changed — the run, the dataset and everything else in the folder hash the same before and after."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import make_corpus_text

from gptrain.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A trained run (with periodic checkpoints), its dataset, and damaged copies of both."""
    root = tmp_path_factory.mktemp("bad_inputs")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"play_{i}.txt").write_text(make_corpus_text(120, seed=i))
    args = ["train", "--data", str(corpus), "--data.data_dir", str(root / "ds"), "--data.val_fraction", "0.2",
            "--tokenizer", "char",
            "--embd", "16", "--layers", "1", "--heads", "2", "--context", "32", "--batch-size", "4", "--steps", "4",
            "--checkpoint.every_steps", "2", "--eval.every_steps=0", "--samples.every_steps=0", "--quiet",
            "--run-dir", str(root / "run")]
    assert main(args) == 0
    shutil.copytree(root / "run", root / "damaged_run")
    model = root / "damaged_run" / "checkpoints" / "final" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte inside the weights: the file is whole, its contents are not
    model.write_bytes(bytes(data))
    shutil.copytree(root / "ds", root / "damaged_ds")
    shard = sorted((root / "damaged_ds").glob("*_train_*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    (root / "bad_tokenizer.json").write_text('{"kind": "bpe", "oops"')
    (root / "not_llmc.bin").write_bytes(b"\0" * 2048)
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("mine")
    return root


def _tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


R = "{root}"  # replaced by the module's folder
CASES = [
    (["train", "--lr", "nan", "--run-dir", f"{R}/new"], "schedule.peak_lr must be a finite number"),
    (["train", "--seed", "-1", "--run-dir", f"{R}/new"], "seed must be >= 0"),
    (["train", "--samples.top_k", "-1", "--run-dir", f"{R}/new"], "samples.top_k must be >= 0"),
    (["train", "--steps", "3", "--schedule.num_warmup_steps", "10", "--run-dir", f"{R}/new"], "is not below"),
    (["train", "--schedule.decay_fraction", "1.5", "--run-dir", f"{R}/new"], "decay_fraction must be in (0, 1]"),
    (["train", "--data", f"{R}/corpus", "--data.data_dir", f"{R}/ds", "--tokenizer", "char", "--context", "32",
      "--batch-size", "4", "--train.batch_tokens", "100", "--run-dir", f"{R}/new"], "is not a multiple"),
    (["train", "--init-from", f"{R}/no_such_run", "--run-dir", f"{R}/new"], "does not exist"),
    (["train", "--resume", f"{R}/run", "--context", "16"], "its model.block_size is 32, not 16"),
    (["train", "--resume", f"{R}/run", "--seed", "5"], "its seed is 1337, not 5"),
    (["train", "--resume", f"{R}/run", "--steps", "10"], "--schedule.extend=hold"),
    (["train", "--resume", f"{R}/no_such_run"], "does not exist"),
    (["train", "--data", f"{R}/damaged_ds", "--tokenizer", "char", "--run-dir", f"{R}/new"], "is truncated"),
    (["train", "--data", f"{R}/corpus", "--tokenizer", f"{R}/bad_tokenizer.json", "--run-dir", f"{R}/new"],
     "bad_tokenizer.json"),
    (["generate", "--checkpoint", f"{R}/damaged_run", "--prompt", "KING"], "is damaged"),
    (["generate", "--checkpoint", f"{R}/run", "--temperature", "nan"], "temperature must be a finite number"),
    (["generate", "--checkpoint", f"{R}/run", "--num-samples", "0"], "--num-samples must be at least 1"),
    (["generate", "--checkpoint", f"{R}/run", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["eval", "--checkpoint", f"{R}/run", "--batch-size", "0"], "batch"),
    (["control", f"{R}/run", "lr", "nan"], "lr_scale must be > 0"),
    (["control", f"{R}/run", "eval-every", "2.5"], "a whole number of steps"),
    (["control", f"{R}/run", "pause"], "no trainer is running"),
    (["export", "--checkpoint", f"{R}/no_such_run", "--format", "hf", "--out", f"{R}/out"], "does not exist"),
    (["export", "--checkpoint", f"{R}/run", "--format", "hf", "--out", f"{R}/existing"], "not empty"),
    (["import", "--format", "llmc", "--from", f"{R}/not_llmc.bin", "--out", f"{R}/out"], "magic"),
    (["import", "--format", "nanogpt", "--from", f"{R}/no_such.pt", "--out", f"{R}/out"], "no_such.pt"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_a_mistake_is_one_line_exit_2_and_changes_nothing(world, argv, message, capsys, monkeypatch):
    monkeypatch.chdir(world)
    before = _tree_hash(world)
    code = main([a.replace(R, str(world)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("gptrain: error") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    assert _tree_hash(world) == before  # no run, dataset or output folder made or changed
