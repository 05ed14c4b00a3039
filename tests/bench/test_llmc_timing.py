"""bench/llmc.py against stand-ins for llm.c's train_gpt2 that print its lines (train_gpt2.c's printf formats).

Named test_llmc_timing.py, not test_llmc.py: tests/ has no __init__.py files, and tests/interop/test_llmc.py
already takes that module name.
"""

import os
import stat
import sys
import time

import pytest

from gptrain.bench.llmc import LlmcResult, parse_step_line, run_llmc
from gptrain.errors import UserError

HEADER = """[GPT-2]
max_seq_len: 1024
vocab_size: 50257
padded_vocab_size: 50304
num_layers: 12
num_heads: 12
channels: 768
num_parameters: 124475904
train dataset num_batches: 1192
val dataset num_batches: 128
num_activations: 73347840
"""
STEP_MS = [1452.121, 1288.673, 1369.394, 1290.761, 1300.5]
LOSSES = [5.356189, 4.301069, 4.623322, 4.600470, 4.5]


def write_stand_in(tmp_path, body: str):
    """An executable Python script standing in for train_gpt2 (it writes its pid to pid.txt)."""
    path = tmp_path / "train_gpt2"
    path.write_text(f"#!{sys.executable}\nimport os, sys, time\n"
                    f"open('pid.txt', 'w').write(str(os.getpid()))\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def training_body(num_steps: int, then: str) -> str:
    """Print the header, `val loss`, generated text (raw token bytes, a split UTF-8 character) and steps."""
    lines = [f"sys.stdout.write({HEADER!r})", "print('val loss 5.252026', flush=True)"]
    for step in range(num_steps):
        if step == 2:  # what train_gpt2 prints at step % 20 == 0, here sooner
            lines.append("print('generating:\\n---', flush=True)")
            lines.append("sys.stdout.buffer.write(b'Come Running Away,\\nstep 9: loss \\xe2\\x80\\n---\\n')")
        ms, loss = STEP_MS[step % len(STEP_MS)], LOSSES[step % len(LOSSES)]
        lines.append(f"print('step {step}: train loss {loss:f} (took {ms:f} ms)', flush=True)")
    return "\n".join(lines + ["sys.stdout.flush()", then])


def test_step_lines_parse_with_extra_spaces_and_nothing_else_does():
    assert parse_step_line("step 3: train loss 4.600470 (took 1290.761000 ms)\n") == (3, 4.60047, 1290.761)
    assert parse_step_line("  step  12 :  train loss  3.9  ( took  80.5  ms ) ") == (12, 3.9, 80.5)
    assert parse_step_line("step 0: train loss -nan (took 1.0 ms)")[0] == 0
    for line in ("val loss 5.252026", "step 9: loss", "generating:", "", "step x: train loss 1 (took 2 ms)",
                 "step 1: train loss 1.0 (took abc ms)"):
        assert parse_step_line(line) is None


def test_the_median_leaves_out_the_first_step():
    assert LlmcResult([1000.0, 200.0, 100.0, 300.0], [1.0] * 4).median_step_s == pytest.approx(0.2)
    assert LlmcResult([1500.0], [1.0]).median_step_s == pytest.approx(1.5)
    assert LlmcResult([1000.0, 256.0], [1.0, 1.0]).tokens_per_s == pytest.approx(1000.0)


def test_run_reads_the_steps_asked_for_then_stops_and_reaps_the_binary(tmp_path):
    binary = write_stand_in(tmp_path, training_body(5, then="time.sleep(120)"))
    start = time.monotonic()
    result = run_llmc(binary, steps=4)
    assert time.monotonic() - start < 10  # it did not wait for the stand-in's sleep
    assert result.step_ms == STEP_MS[:4] and result.losses == pytest.approx(LOSSES[:4])
    assert result.num_steps == 4 and result.median_step_s == pytest.approx(1.290761)
    pid = int((tmp_path / "pid.txt").read_text())  # written in its working directory: the binary's folder
    with pytest.raises(ProcessLookupError):  # not even a zombie: it was waited for
        os.kill(pid, 0)


def test_a_run_that_ends_early_returns_the_steps_it_printed(tmp_path):
    binary = write_stand_in(tmp_path, training_body(2, then="sys.exit(0)"))
    assert run_llmc(binary, steps=10).step_ms == STEP_MS[:2]


def test_a_binary_that_fails_before_its_first_step_names_its_exit_code_and_last_line(tmp_path):
    header = "".join(HEADER.splitlines(keepends=True)[:8])  # what it prints before opening the data
    body = (f"sys.stdout.write({header!r})\nsys.stdout.flush()\n"
            "print('Error opening tokens file', file=sys.stderr)\nsys.exit(1)")
    binary = write_stand_in(tmp_path, body)
    with pytest.raises(UserError, match=r"exited with code 1 .*'Error opening tokens file'.*cwd"):
        run_llmc(binary, cwd=tmp_path)


def test_a_binary_that_prints_no_step_in_time_is_stopped(tmp_path):
    binary = write_stand_in(tmp_path, "print('[GPT-2]', flush=True)\ntime.sleep(120)")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"no step line within 0.5 s .*'\[GPT-2\]'"):
        run_llmc(binary, timeout_s=0.5)
    assert time.monotonic() - start < 10
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid.txt").read_text()), 0)


def test_a_missing_or_unusable_binary_says_how_to_build_it(tmp_path):
    with pytest.raises(UserError, match="does not exist: .*make train_gpt2"):
        run_llmc(tmp_path / "train_gpt2")
    source = tmp_path / "train_gpt2.c"
    source.write_text("int main() {}\n")
    with pytest.raises(UserError, match="not executable"):
        run_llmc(source)
    binary = write_stand_in(tmp_path, "")
    with pytest.raises(UserError, match="steps must be between 1 and 41"):
        run_llmc(binary, steps=0)
