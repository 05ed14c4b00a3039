"""Data preparation throughput (tokens/s) with the GPT-2 tokenizer, against a single-thread reference.

The corpus is synthetic JSONL (about 2 KB documents of pseudo-words, --mb of it). The reference, measured
in the same run, reads the same file and calls tiktoken's encode_ordinary once per document on one thread;
gptrain runs `prepare_dataset` as `gptrain data prepare` does (read, split, encode over --workers forked
processes, write shards). Runs
alternate, --repeats of each, and the medians are compared. Shakespeare (5 MB) is reported, not compared.

    .venv/bin/python benchmarks/prepare_throughput.py [--mb 200] [--workers 0] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from gptrain.data.prepare import DataConfig, prepare_dataset
from gptrain.data.synthetic import write_jsonl_corpus
from gptrain.tokenizer import TokenizerConfig
from gptrain.tokenizer.gpt2 import gpt2_encoding


def reference(path: Path) -> tuple[int, float]:
    """(tokens, seconds): one document at a time, one thread."""
    enc = gpt2_encoding()
    started = time.perf_counter()
    num_tokens = 0
    with open(path, "rb") as f:
        for line in f:
            num_tokens += len(enc.encode_ordinary(json.loads(line)["text"])) + 1  # + the separator
    return num_tokens, time.perf_counter() - started


def gptrain_prepare(source: str, out: Path, workers: int) -> tuple[int, float]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    folder = prepare_dataset(DataConfig(source=source, data_dir=str(out), num_workers=workers),
                             TokenizerConfig(kind="gpt2"), log=lambda *_: None, may_fork=True)  # as the CLI
    seconds = time.perf_counter() - started
    meta = json.loads((folder / "meta.json").read_text())
    return meta["num_train_tokens"] + meta["num_val_tokens"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="synthetic corpus size in MB")
    parser.add_argument("--workers", type=int, default=0, help="gptrain's tokenizer processes (0: one per core)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="gptrain-prepare-bench-") as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        write_jsonl_corpus(corpus, args.mb << 20)
        print(f"corpus: {corpus.stat().st_size / 1e6:.0f} MB of JSONL; {cores} core(s); gptrain workers "
              f"{args.workers or cores}")
        ref, ours = [], []
        for _ in range(args.repeats):
            ref.append(reference(corpus))
            ours.append(gptrain_prepare(str(corpus), Path(tmp) / "ds", args.workers))
        assert ref[0][0] == ours[0][0], f"token counts differ: {ref[0][0]} vs {ours[0][0]}"
        ref_rate = statistics.median(n / s for n, s in ref)
        our_rate = statistics.median(n / s for n, s in ours)
        print(f"reference (encode_ordinary per document, 1 thread): {ref_rate / 1e6:.2f}M tokens/s")
        print(f"gptrain prepare_dataset:                            {our_rate / 1e6:.2f}M tokens/s")
        print(f"ratio: {our_rate / ref_rate:.2f}x  ({ref[0][0]:,} tokens; medians of {args.repeats})")
        num_tokens, seconds = gptrain_prepare("shakespeare", Path(tmp) / "sh", args.workers)
        print(f"shakespeare (report only, too small to compare): {num_tokens:,} tokens in {seconds:.2f}s")


if __name__ == "__main__":
    main()
