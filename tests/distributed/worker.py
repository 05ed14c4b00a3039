"""`gptrain` with test hooks, for the torchrun tests: record the windows each rank reads, slow steps
down, fail on one rank. Hooks come from TEST_* variables; the rest of argv goes to gptrain's CLI."""

import json
import os
import sys
import time
from pathlib import Path

from gptrain import cli
from gptrain.data.loader import ShardLoader
from gptrain.train import setup  # step_run calls train_step from there

RANK = int(os.environ.get("RANK", 0))


def record_windows(path: Path) -> None:
    read = ShardLoader.read

    def recording(self, windows):
        if self.shuffle:  # the train loader (validation reads are not part of the order)
            with open(path, "a") as f:
                f.write(json.dumps([[int(s), int(t)] for s, t in windows]) + "\n")
        return read(self, windows)

    ShardLoader.read = recording


def wrap_step(sleep_seconds: float, fail_rank: int, fail_step: int) -> None:
    step = setup.train_step
    calls = {"n": 0}

    def hooked(*args, **kwargs):
        calls["n"] += 1
        if RANK == fail_rank and calls["n"] == fail_step:
            raise RuntimeError(f"injected failure on rank {RANK}")
        time.sleep(sleep_seconds)
        return step(*args, **kwargs)

    setup.train_step = hooked


if __name__ == "__main__":
    if os.environ.get("TEST_WINDOW_LOG"):
        record_windows(Path(f"{os.environ['TEST_WINDOW_LOG']}.rank{RANK}"))
    wrap_step(float(os.environ.get("TEST_STEP_SLEEP", 0)), int(os.environ.get("TEST_FAIL_RANK", -1)),
              int(os.environ.get("TEST_FAIL_STEP", -1)))
    code = cli.main(sys.argv[1:])
    if os.environ.get("TEST_EXIT_LOG"):
        Path(f"{os.environ['TEST_EXIT_LOG']}.rank{RANK}").write_text(str(code))
    sys.exit(code)
