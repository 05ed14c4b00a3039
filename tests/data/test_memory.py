"""Preparation streams: peak memory does not grow with the corpus (100 MB vs 5 MB, same tokenizer)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptrain.data.synthetic import write_jsonl_corpus

# Runs in a fresh interpreter: the memory of the preparing process and its tokenizer workers together
# (PSS, so pages they share count once), sampled every 20 ms, above the level right after the imports.
MEASURE = r"""
import json, os, sys, threading, time
from gptrain.data.prepare import DataConfig, prepare_dataset
from gptrain.tokenizer import TokenizerConfig
from gptrain.tokenizer.gpt2 import GPT2Tokenizer

def tree_pss_kb(pid):
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except (OSError, StopIteration):
        return total
    return total + sum(tree_pss_kb(int(c)) for c in children)

GPT2Tokenizer()
base = tree_pss_kb(os.getpid())
peak, done = base, False
def sample():
    global peak
    while not done:
        peak = max(peak, tree_pss_kb(os.getpid()))
        time.sleep(0.02)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
prepare_dataset(DataConfig(source=sys.argv[1], data_dir=sys.argv[2], num_workers=2, shard_tokens=10_000_000),
                TokenizerConfig(kind="gpt2"), log=lambda *_: None)
done = True
thread.join()
print(json.dumps({"base_kb": base, "peak_kb": peak}))
"""


def _peak_above_base_mb(tmp_path: Path, num_bytes: int) -> float:
    corpus = tmp_path / f"corpus{num_bytes}.jsonl"
    write_jsonl_corpus(corpus, num_bytes)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(corpus), str(tmp_path / f"ds{num_bytes}")],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.splitlines()[-1])
    return (result["peak_kb"] - result["base_kb"]) / 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.fail("this test measures PSS through /proc/<pid>/smaps_rollup (Linux)")
    small = _peak_above_base_mb(tmp_path, 5 << 20)
    large = _peak_above_base_mb(tmp_path, 100 << 20)
    print(f"peak above baseline: 5 MB corpus {small:.1f} MB, 100 MB corpus {large:.1f} MB")
    assert large <= 1.3 * small, (small, large)
