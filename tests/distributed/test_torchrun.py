"""Real torchrun launches on the CPU (gloo): equivalence of strategies, two nodes, kill and resume with
other ranks and strategies, SIGTERM, a failing rank. Each launch costs a few seconds; runs are shared."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import make_corpus_text
from safetensors.torch import load_file

from gptrain import Checkpoint
from gptrain.equivalence import WEIGHT_TOLERANCE
from gptrain.train import checkpoint as ckpt

WORKER = str(Path(__file__).with_name("worker.py"))
TIMEOUT = 180


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPTRAIN_", "TEST_", "RANK", "WORLD_SIZE",
                                                                     "LOCAL_RANK", "MASTER_", "TORCHELASTIC"))}
    return env | {"OMP_NUM_THREADS": "1"} | {k: str(v) for k, v in extra.items()}


def torchrun_cmd(nproc: int, *args: str, nodes: str = "") -> list[str]:
    launch = nodes.split() if nodes else ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *launch, WORKER, *args]


def run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    # Both ends of stderr: the workers' own lines come first, torchrun's summary last.
    assert done.returncode == 0, done.stderr[:3000] + "\n...\n" + done.stderr[-1500:]
    return done


HELLASWAG = Path(__file__).parent.parent / "fixtures" / "hellaswag_fixture.jsonl"


def train_args(root: Path, run_dir: str, steps: int = 12, *extra: str) -> list[str]:
    return ["train", "--data", str(root / "corpus.txt"), "--data.data_dir", str(root / "dataset"),
            "--tokenizer", "char", "--embd", "32", "--layers", "2", "--heads", "2", "--context", "32",
            "--batch-size", "2", "--train.batch_tokens", "128", "--steps", str(steps), "--lr", "3e-3",
            "--schedule.num_warmup_steps", "2", "--eval.every_steps", "4", "--eval.num_tokens", "320",
            "--samples.every_steps", "0", "--samples.num_tokens", "8", "--checkpoint.every_steps", "4",
            "--checkpoint.keep_last", "5", "--device", "cpu", "--compile", "off", "--quiet", "--seed", "7",
            "--eval.hellaswag_every_steps", "4", "--eval.hellaswag_file", str(HELLASWAG), "--eval.hellaswag_limit", "6",
            "--run-dir", str(root / run_dir), *extra]


def wait_for_train_rows(proc: subprocess.Popen, run_dir: Path, count: int) -> None:
    """Until the running job has written count train rows (it must not have ended)."""
    deadline = time.monotonic() + TIMEOUT
    while not (run_dir / "metrics.jsonl").is_file() or len(rows(run_dir, "train")) < count:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))


def windows(log: Path, rank: int, first: int | None = None) -> list[tuple]:
    reads = [json.loads(line) for line in Path(f"{log}.rank{rank}").read_text().splitlines()][:first]
    return [tuple(w) for batch in reads for w in batch]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("torchrun")
    (folder / "corpus.txt").write_text(make_corpus_text(400))
    return folder


@pytest.fixture(scope="module")
def reference(root) -> Path:
    """An uninterrupted 2-rank DDP run of 12 steps (it also prepares the dataset on rank 0 while rank 1 waits)."""
    run(torchrun_cmd(2, *train_args(root, "reference")), root, TEST_WINDOW_LOG=root / "reference.windows")
    return root / "reference"


@pytest.mark.dist
def test_check_equivalence_all_strategies_and_accumulation(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gptrain", "check-equivalence", "--out", str(tmp_path),
                           "--compile", "aot_eager"], env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.rstrip().endswith(("yes", "NO"))]
    assert len(table) == 9 and all(line.rstrip().endswith("yes") for line in table)
    assert "zero1" in done.stdout and "fsdp, accumulation" in done.stdout and "ddp, compiled, accum." in done.stdout


@pytest.mark.dist
def test_reference_run_logs_its_layout_and_one_global_window_order(reference):
    first = rows(reference, "event")[0]
    assert (first["strategy"], first["world_size"], first["micro_batch"], first["num_micro_steps"],
            first["batch_tokens"]) == ("ddp", 2, 2, 1, 128)
    losses = [r["loss"] for r in rows(reference, "train")]
    assert len(losses) == 12 and losses[-1] < losses[0]
    seen = windows(reference.parent / "reference.windows", 0) + windows(reference.parent / "reference.windows", 1)
    assert len(seen) == 12 * 4 and len(set(seen)) == len(seen)  # disjoint across ranks, none twice


@pytest.mark.dist
def test_two_nodes_equal_one_node(root, reference):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = f"--nnodes 2 --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} --rdzv-id two-nodes"
    procs = [subprocess.Popen(torchrun_cmd(1, *train_args(root, "two_nodes"), nodes=f"{nodes} --node_rank {i}"),
                              cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    a, b = weights(reference), weights(root / "two_nodes")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(root / "two_nodes", "train")] == [r["loss"] for r in rows(reference, "train")]


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers at once (torchrun starts each worker in a session of its own, so
    killing torchrun's process group alone would leave them running)."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in [proc.pid, *map(int, children)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kill_after_first_checkpoint(root: Path) -> Path:
    """A 2-rank run SIGKILLed (torchrun and every worker) once its step-4 checkpoint is on disk."""
    proc = subprocess.Popen(torchrun_cmd(2, *train_args(root, "killed")), cwd=root, start_new_session=True,
                            env=_env(TEST_STEP_SLEEP=0.25, TEST_WINDOW_LOG=root / "killed.windows"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while not (root / "killed" / "checkpoints" / "step_000004" / "state.json").is_file():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    _kill_job(proc)
    proc.wait()
    time.sleep(0.5)  # the workers' exits are not waited for by anyone here
    assert not (root / "killed" / "checkpoints" / "final").exists()
    return root / "killed"


@pytest.mark.dist
def test_sigkill_then_resume_with_other_ranks_and_strategy(root, reference):
    killed = _kill_after_first_checkpoint(root)
    step = json.loads((ckpt.latest_checkpoint_dir(killed) / "state.json").read_text())["train"]["step"]
    for name in ("one_rank", "fsdp", "zero1", "same", "other_batch"):
        shutil.copytree(killed, root / name)
    one = [sys.executable, WORKER, "train", "--resume", str(root / "one_rank"), "--quiet"]
    run(one, root, TEST_WINDOW_LOG=root / "one_rank.windows")
    run(torchrun_cmd(2, "train", "--resume", str(root / "fsdp"), "--parallel", "fsdp", "--quiet"), root,
        TEST_WINDOW_LOG=root / "fsdp.windows")
    # ZeRO-1 and half the micro batch (so two accumulation micro steps): the same global batch.
    run(torchrun_cmd(2, "train", "--resume", str(root / "zero1"), "--parallel", "zero1", "--batch-size", "1",
                     "--quiet"), root, TEST_WINDOW_LOG=root / "zero1.windows")
    run(torchrun_cmd(2, "train", "--resume", str(root / "same"), "--quiet"), root)
    refused = subprocess.run([sys.executable, WORKER, "train", "--resume", str(root / "other_batch"),
                              "--train.batch_tokens", "256"], cwd=root, env=_env(), capture_output=True, text=True)
    assert refused.returncode == 2 and "keep train.batch_tokens (the global batch)" in refused.stderr

    # A checkpoint written by FSDP ranks loads in one plain process, and its weights are the saved ones.
    plain = Checkpoint.load(root / "fsdp", device="cpu")
    saved = weights(root / "fsdp")
    assert all(torch.equal(plain.model.state_dict()[k], saved[k]) for k in saved)
    assert len(plain.generate("KING", max_new_tokens=5, is_greedy=True)) == 5

    expected_loss = rows(reference, "train")[-1]["loss"]
    ref_weights = weights(reference)
    same = weights(root / "same")  # same ranks and strategy: bitwise
    assert all(torch.equal(same[k], ref_weights[k]) for k in ref_weights)
    assert rows(root / "same", "val")[-1] | {"time": 0} == rows(reference, "val")[-1] | {"time": 0}
    expected_layouts = {"one_rank": (1, "none", 2, 2), "fsdp": (2, "fsdp", 2, 1), "zero1": (2, "zero1", 1, 2)}
    for name, expected_layout in expected_layouts.items():
        layout = [r for r in rows(root / name, "event") if "world_size" in r][-1]  # the resumed launch's
        assert (layout["world_size"], layout["strategy"], layout["micro_batch"], layout["num_micro_steps"]) == \
            expected_layout
        assert rows(root / name, "train")[-1]["loss"] == pytest.approx(expected_loss, rel=1e-5)
        # The rows the killed launch wrote after its checkpoint were cut back: one train row per step.
        assert [r["step"] for r in rows(root / name, "train")] == [r["step"] for r in rows(reference, "train")]
        # The val sample and HellaSwag are scored alike on any number of ranks and with any strategy.
        val, ref_val = rows(root / name, "val")[-1], rows(reference, "val")[-1]
        assert val["val_num_tokens"] == ref_val["val_num_tokens"] and val["hellaswag_num_items"] == 6
        assert val["val_loss"] == pytest.approx(ref_val["val_loss"], rel=1e-5)
        assert val["val_bpb"] == pytest.approx(ref_val["val_bpb"], rel=1e-5)
        resumed = weights(root / name)
        assert max(float((resumed[k] - ref_weights[k]).abs().max()) for k in ref_weights) <= WEIGHT_TOLERANCE
        # Windows read before the checkpoint (2 ranks, one micro batch per step) and after the resume
        # are exactly the uninterrupted run's: none twice, none skipped.
        before = windows(root / "killed.windows", 0, step) + windows(root / "killed.windows", 1, step)
        ranks = expected_layout[0]
        after = [w for r in range(ranks) for w in windows(root / f"{name}.windows", r)]
        full = windows(root / "reference.windows", 0) + windows(root / "reference.windows", 1)
        assert Counter(before + after) == Counter(full)


@pytest.mark.dist
def test_sigterm_to_torchrun_saves_and_every_worker_exits_cleanly(root):
    run_dir = root / "terminated"
    proc = subprocess.Popen(torchrun_cmd(2, *train_args(root, "terminated", 500, "--checkpoint.every_steps", "0")),
                            cwd=root, env=_env(TEST_STEP_SLEEP=0.1, TEST_EXIT_LOG=root / "terminated.exit"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_train_rows(proc, run_dir, 3)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    saved = ckpt.latest_checkpoint_dir(run_dir)
    step = ckpt.read_checkpoint(saved)["state"]["train"]["step"]
    assert 3 <= step < 500 and any("stopped at step" in r["message"] for r in rows(run_dir, "event"))
    assert [Path(f"{root}/terminated.exit.rank{r}").read_text() for r in (0, 1)] == ["0", "0"]


@pytest.mark.dist
def test_control_commands_reach_every_rank_at_the_same_step(root):
    from gptrain.train.control import send_command

    run_dir = root / "steered"
    args = train_args(root, "steered", 500, "--checkpoint.every_steps", "0", "--eval.every_steps", "0",
                      "--eval.hellaswag_every_steps", "0")
    proc = subprocess.Popen(torchrun_cmd(2, *args),
                            cwd=root, env=_env(TEST_STEP_SLEEP=0.05, TEST_EXIT_LOG=root / "steered.exit"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_train_rows(proc, run_dir, 3)
    paused = send_command(run_dir, "pause")
    count = len(rows(run_dir, "train"))
    time.sleep(1.5)  # three pause rounds: the ranks agree again every 0.5 s without timing out
    assert len(rows(run_dir, "train")) == count and paused["step"] == count
    saved = send_command(run_dir, "save")  # a checkpoint while paused is a collective of both ranks
    scaled = send_command(run_dir, "lr_scale", 0.5)
    send_command(run_dir, "resume")
    stopped = send_command(run_dir, "stop")
    proc.communicate(timeout=60)
    assert proc.returncode == 0 and (run_dir / "checkpoints" / f"step_{saved['step']:06d}").is_dir()
    assert (run_dir / "checkpoints" / f"step_{stopped['step']:06d}").is_dir()
    lrs = {r["step"]: r["lr"] for r in rows(run_dir, "train")}
    assert lrs[scaled["step"] + 1] < 0.6 * lrs[scaled["step"]]  # the warm-up lr halved on both ranks
    assert [Path(f"{root}/steered.exit.rank{r}").read_text() for r in (0, 1)] == ["0", "0"]


@pytest.mark.dist
def test_a_rank_that_raises_ends_the_whole_job(root):
    started = time.monotonic()
    done = subprocess.run(torchrun_cmd(2, *train_args(root, "failing", 50)), cwd=root, capture_output=True,
                          text=True, env=_env(TEST_FAIL_RANK=1, TEST_FAIL_STEP=3), timeout=TIMEOUT)
    assert done.returncode != 0
    assert "gptrain: crashed (rank 1): RuntimeError: injected failure on rank 1 (the traceback is in" in done.stderr
    assert "injected failure" in (root / "failing" / "crash-rank1.log").read_text()
    assert time.monotonic() - started < 90  # torchrun stopped rank 0 instead of letting it hang


@pytest.mark.dist
def test_a_mistake_every_rank_makes_is_printed_once(root):
    done = subprocess.run(torchrun_cmd(2, *train_args(root, "mistake", 5, "--train.batch_tokens", "6000")),
                          cwd=root, capture_output=True, text=True, env=_env(), timeout=TIMEOUT)
    assert done.returncode != 0
    assert done.stderr.count("gptrain: error") == 1 and "is not a multiple of batch_size x block_size" in done.stderr
    assert not (root / "mistake").exists()
