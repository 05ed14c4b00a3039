"""Times llm.c's CPU trainer (karpathy/llm.c, train_gpt2.c) that the user built: runs it, reads its
`step N: train loss L (took M ms)` lines and stops it after the steps asked for.

train_gpt2.c fixes its own shape (GPT-2 124M, B=4, T=64, fp32, AdamW) and reads gpt2_124M.bin,
gpt2_tokenizer.bin and dev/data/tinyshakespeare/*.bin (else dev/data/tinystories/) relative to its
working directory; it runs steps 0..40, printing `val loss` every 10 steps and generated text every 20.
Each step's time is measured by the binary itself (clock_gettime around batch, forward, zero_grad,
backward and update), so validation, sampling and pipe delays are not counted.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gptrain.errors import UserError

LLMC_SHAPE = {"preset": "gpt2", "batch_size": 4, "context": 64}
LLMC_NUM_STEPS = 41  # train_gpt2.c: for (int step = 0; step <= 40; step++)
BUILD_HINT = ("build it in a clone of github.com/karpathy/llm.c with `make train_gpt2` (after "
              "./dev/download_starter_pack.sh), then pass the path of the train_gpt2 binary")
DATA_HINT = ("it reads gpt2_124M.bin, gpt2_tokenizer.bin and dev/data/tinyshakespeare/*.bin from its working "
             "directory: run ./dev/download_starter_pack.sh in the llm.c folder, or pass that folder as cwd")
STOP_GRACE_S = 5.0  # after SIGTERM, how long to wait before SIGKILL
MAX_SHOWN_CHARS = 200  # of the last output line, in an error message

# printf("step %d: train loss %f (took %f ms)\n", ...); %f may print nan, -nan or inf.
STEP_LINE = re.compile(r"step\s+(\d+)\s*:\s*train\s+loss\s+(\S+)\s+\(\s*took\s+(\S+)\s+ms\s*\)")


@dataclass
class LlmcResult:
    """What one run printed: each step's time (ms, as printed) and train loss, in step order."""

    step_ms: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.step_ms)

    @property
    def median_step_s(self) -> float:
        """Median step time in seconds, without the first step when there are two or more (llm.c allocates
        its gradients and AdamW state lazily in step 0); nan when no step was read."""
        times = self.step_ms[1:] if len(self.step_ms) >= 2 else self.step_ms
        return statistics.median(times) / 1000.0 if times else math.nan

    @property
    def tokens_per_s(self) -> float:
        """Training throughput at the median step time: B*T tokens per step."""
        return LLMC_SHAPE["batch_size"] * LLMC_SHAPE["context"] / self.median_step_s


def parse_step_line(line: str) -> tuple[int, float, float] | None:
    """(step, train loss, step ms) from one of train_gpt2's step lines; None for any other line."""
    match = STEP_LINE.fullmatch(line.strip())
    if match is None:
        return None
    try:
        return int(match[1]), float(match[2]), float(match[3])
    except ValueError:  # "(took abc ms)": a line that only looks like a step line
        return None


def check_binary(binary: Path | str) -> Path:
    """The binary's absolute path, once it is known to be an executable file."""
    path = Path(binary).expanduser()
    if not path.is_file():
        raise UserError(f"llm.c binary {path} does not exist: {BUILD_HINT}")
    if not os.access(path, os.X_OK):
        raise UserError(f"llm.c binary {path} is not executable (chmod +x it, or {BUILD_HINT})")
    return path.resolve()


def line_buffered(command: list[str]) -> list[str]:
    """The command under `stdbuf -oL` where coreutils has it.

    C's stdout is block-buffered (4 KiB) into a pipe and train_gpt2 flushes only while sampling text
    (steps 20 and 40), so without this its step lines would arrive many steps late. stdbuf has no effect
    on a static binary; the times read are the same, only the stop comes later.
    """
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, "-oL", "-eL", *command] if stdbuf else command


def read_steps(lines: Iterable[str], num_steps: int) -> tuple[LlmcResult, str]:
    """Collect step lines until num_steps were read or the output ends; also the last non-empty line."""
    result, last_line = LlmcResult(), ""
    for line in lines:
        if line.strip():
            last_line = line.strip()
        parsed = parse_step_line(line)
        if parsed is None:
            continue
        _, loss, ms = parsed
        result.losses.append(loss)
        result.step_ms.append(ms)
        if result.num_steps >= num_steps:
            break
    return result, last_line


def stop(process: subprocess.Popen) -> None:
    """End the process if it still runs (SIGTERM, then SIGKILL after a grace period) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def describe_exit(returncode: int) -> str:
    """'exited with code 1' or 'was killed by signal 11 (SIGSEGV)'."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = f" ({signal.Signals(-returncode).name})"
    except ValueError:
        name = ""
    return f"was killed by signal {-returncode}{name}"


def failure_message(path: Path, returncode: int, last_line: str, *, timeout_s: float | None) -> str:
    """One line for a run that printed no step line: why it ended, its last output and what to do."""
    shown = (last_line[:MAX_SHOWN_CHARS] + "...") if len(last_line) > MAX_SHOWN_CHARS else last_line
    output = f"last output: {shown!r}" if shown else "it printed nothing"
    if timeout_s is not None:
        return (f"llm.c binary {path} printed no step line within {timeout_s:g} s ({output}): raise the timeout, "
                f"or check that it runs on its own in its folder")
    return f"llm.c binary {path} {describe_exit(returncode)} before its first step ({output}); {DATA_HINT}"


def run_llmc(binary: Path | str, *, steps: int = 10, timeout_s: float = 1800, cwd: Path | None = None,
             num_threads: int | None = None) -> LlmcResult:
    """Run llm.c's train_gpt2 until it has printed `steps` step lines, then stop it.

    Args:
        binary: the train_gpt2 executable built by `make train_gpt2`.
        steps: step lines to read (train_gpt2 runs 41 at most); fewer come back if it exits sooner.
        timeout_s: wall-clock limit for the whole run; the steps read by then are returned.
        cwd: where its data and model files are; the binary's folder by default.
        num_threads: OMP_NUM_THREADS for it (left as the environment has it when None).
    """
    path = check_binary(binary)
    if not 1 <= steps <= LLMC_NUM_STEPS:
        raise UserError(f"steps must be between 1 and {LLMC_NUM_STEPS} (train_gpt2 runs steps 0..40), got {steps}")
    env = dict(os.environ)
    if num_threads is not None:
        env["OMP_NUM_THREADS"] = str(num_threads)
    try:
        process = subprocess.Popen(line_buffered([str(path)]), cwd=cwd or path.parent, env=env, text=True,
                                   errors="replace", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, bufsize=1)
    except OSError as e:
        raise UserError(f"cannot run llm.c binary {path}: {e.strerror or e}; {BUILD_HINT}") from e
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        process.kill()  # ends the read loop: the pipe closes

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    try:
        timer.start()
        result, last_line = read_steps(process.stdout, steps)
    finally:
        timer.cancel()
        stop(process)
    if result.num_steps == 0:
        raise UserError(failure_message(path, process.returncode, last_line,
                                        timeout_s=timeout_s if timed_out.is_set() else None))
    return result
