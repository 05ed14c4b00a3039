"""`gptrain check-equivalence`: one process vs N ranks under each strategy, and accumulation vs one
big batch, on a tiny model; prints the largest differences in loss and weights.

Users run it on their own cluster before a long run. Under torchrun it uses the ranks it was given
and rank 0 runs the one-process reference in a clean subprocess; alone, it trains the reference
itself and starts a 2-process gloo run on the CPU through torch's elastic launcher.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from gptrain.distributed.parallel import FSDP_CPU_MIN_TORCH, can_fsdp_run_on

LEARNING_RATE = 3e-3
LOSS_TOLERANCE = 2e-5  # fp32 sums in another order: a few ulps of a loss near 4, kept over a few steps
# Adam divides by the gradient's own scale, so rounding noise in tiny gradients moves a weight by a
# fraction of the learning rate: 1% of one step is the bound.
WEIGHT_TOLERANCE = 0.01 * LEARNING_RATE


@dataclass(frozen=True)
class Case:
    name: str
    world_size: int
    micro_batch: int
    num_micro_steps: int = 1
    strategy: str = "auto"
    compile_backend: str = ""  # empty: eager

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_").replace(",", "").replace("/", "-")


def build_cases(world_size: int, compile_backend: str = "", device: str = "cpu") -> list[Case]:
    """Every case trains on the same global batch of 2·W sequences (W: the distributed world size);
    with compile_backend, DDP and FSDP are also run under torch.compile with that backend. FSDP only
    where this torch runs it on the device (parallel.can_fsdp_run_on)."""
    sequences = 2 * world_size
    has_fsdp = can_fsdp_run_on(device)
    strategies = ("ddp", "zero1", "fsdp") if has_fsdp else ("ddp", "zero1")
    one = [Case("1 process (reference)", 1, sequences),
           Case("1 process, accumulation", 1, sequences // 2, num_micro_steps=2)]
    many = [Case(f"{world_size} ranks {s}", world_size, 2, strategy=s) for s in strategies]
    many += [Case(f"{world_size} ranks {s}, accumulation", world_size, 1, num_micro_steps=2, strategy=s)
             for s in strategies]
    if compile_backend:
        # With accumulation, so the gradient-sync switches are exercised through the compiled wrapper too.
        many += [Case(f"{world_size} ranks {s}, compiled, accum.", world_size, 1, num_micro_steps=2, strategy=s,
                      compile_backend=compile_backend) for s in strategies if s != "zero1"]
    return one + many


def write_corpus(folder: Path) -> Path:
    """A small fixed corpus of pseudo-verse (seeded), so every case reads the same tokens."""
    words = "thou art the king of all that doth lie before thee and thine own heart speak gentle lord".split()
    rng = random.Random(0)
    path = folder / "corpus.txt"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) + "." for _ in range(3000)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def case_values(case: Case, out: Path, corpus: Path, num_steps: int, device: str) -> dict:
    return {
        "data.source": str(corpus), "data.data_dir": str(out / "dataset"), "tokenizer.kind": "char",
        "embd": 32, "layers": 2, "heads": 2, "context": 32, "batch-size": case.micro_batch,
        "train.batch_tokens": 32 * case.micro_batch * case.world_size * case.num_micro_steps,
        "steps": num_steps, "lr": LEARNING_RATE, "schedule.num_warmup_steps": 2, "eval.every_steps": 3,
        "eval.num_tokens": 32 * 10, "samples.every_steps": 0, "samples.num_tokens": 8, "checkpoint.every_steps": 0,
        "parallel": case.strategy, "device": device, "train.compile": "on" if case.compile_backend else "off",
        "train.compile_backend": case.compile_backend or "inductor", "log.is_quiet": True,
        "log.live": "off", "run_dir": str(out / case.folder), "seed": 7,
        # Plain fp32 and the same kernels everywhere (micro batches differ, and so would probed kernels):
        # differences mean bugs.
        "train.precision": "fp32", "train.use_tf32": False, "train.cpu_linear": "aten",
        "train.cpu_attention": "sdpa", "train.cpu_gelu": "aten",
    }


def train_cases(out: Path, selected: list[Case], num_steps: int, device: str) -> None:
    """Train each case in turn in this process (all ranks call this under torchrun)."""
    from gptrain.config import resolve_config
    from gptrain.distributed.env import DistEnv
    from gptrain.train.loop import train

    corpus = out / "corpus.txt"
    env = DistEnv.start(device)  # one process group for all cases (train() joins it, it does not leave it)
    for case in selected:
        cfg = resolve_config(None, case_values(case, out, corpus, num_steps, device), environ={})
        train(cfg, should_overwrite=True, log=lambda *_: None)
    env.close()  # only on success: see train()


def _results(run_dir: Path) -> tuple[list[float], list[float], dict]:
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    val = [r["val_loss"] for r in rows if r["kind"] == "val"]
    return losses, val, load_file(str(run_dir / "checkpoints" / "final" / "model.safetensors"))


def compare(out: Path, all_cases: list[Case]) -> tuple[list[dict], bool]:
    """Largest differences of every case from the reference (the first case)."""
    ref_loss, ref_val, ref_weights = _results(out / all_cases[0].folder)
    rows, is_ok = [], True
    for case in all_cases[1:]:
        loss, val, weights = _results(out / case.folder)
        d_loss = max(abs(a - b) for a, b in zip(loss, ref_loss, strict=True))
        d_val = max(abs(a - b) for a, b in zip(val, ref_val, strict=True))
        d_weight = max(float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights)
        ok = d_loss <= LOSS_TOLERANCE and d_val <= LOSS_TOLERANCE and d_weight <= WEIGHT_TOLERANCE
        is_ok &= ok
        rows.append({"case": case.name, "ranks": case.world_size, "micro_batch": case.micro_batch,
                     "loss": d_loss, "val_loss": d_val, "weights": d_weight, "ok": ok})
    return rows, is_ok


def print_table(rows: list[dict], num_steps: int, final_loss: float) -> None:
    print(f"largest |difference| from one process with the whole batch, over {num_steps} steps "
          f"(final loss {final_loss:.4f}; tolerance {LOSS_TOLERANCE:g} loss, {WEIGHT_TOLERANCE:g} weights)")
    print(f"{'case':<31} {'ranks':>5} {'micro':>5} {'train loss':>11} {'val loss':>10} {'weights':>10}  ok")
    for r in rows:
        print(f"{r['case']:<31} {r['ranks']:>5} {r['micro_batch']:>5} {r['loss']:>11.2e} {r['val_loss']:>10.2e} "
              f"{r['weights']:>10.2e}  {'yes' if r['ok'] else 'NO'}")


def launch_two_ranks(out: Path, num_steps: int, compile_backend: str, device: str) -> None:
    """Two ranks on this machine through torch's elastic launcher (what torchrun itself uses)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, rdzv_backend="c10d",
                          rdzv_endpoint="127.0.0.1:0", run_id=f"gptrain-check-{os.getpid()}", max_restarts=0,
                          monitor_interval=0.2)
    args = ("-m", "gptrain.equivalence", "--worker", str(out), str(num_steps), compile_backend, device)
    elastic_launch(config, sys.executable)(*args)


def pick_device(preference: str, world_size: int) -> str:
    """auto: under torchrun the usual choice (CUDA first); alone, two GPUs if there are, else the CPU."""
    from gptrain.distributed.env import resolve_device

    if preference != "auto":
        return resolve_device(preference)
    if world_size > 1:
        return resolve_device("auto")
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "cpu"


def check_equivalence(out: Path, num_steps: int = 6, compile_backend: str = "", device: str = "auto") -> int:
    """Run every case and print the table; 0 when all are within tolerance, 1 otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    device = pick_device(device, world_size)
    all_cases = build_cases(max(world_size, 2), compile_backend, device)
    single = [c for c in all_cases if c.world_size == 1]
    if world_size == 1:
        write_corpus(out)
        train_cases(out, single, num_steps, device)
        launch_two_ranks(out, num_steps, compile_backend, device)
    else:
        if rank == 0:
            write_corpus(out)
            clean = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_",
                     "MASTER_", "GROUP_", "ROLE_", "TORCHELASTIC", "LOCAL_WORLD_SIZE"))}
            subprocess.run([sys.executable, "-m", "gptrain.equivalence", "--single", str(out), str(num_steps), "",
                            device.split(":")[0]], env=clean, check=True)
        multi = [c for c in all_cases if c.world_size > 1]
        train_cases(out, multi, num_steps, device.split(":")[0])  # the group's first setup waits for rank 0
        if rank != 0:
            return 0
    rows, is_ok = compare(out, all_cases)
    print(f"device: {device} ({'NCCL' if device.startswith('cuda') else 'gloo'} between ranks), fp32 without TF32")
    if not can_fsdp_run_on(device):
        print(f"no fsdp rows: FSDP2 on the {device.upper()} needs torch >= {FSDP_CPU_MIN_TORCH} "
              f"(this is {torch.__version__})")
    print_table(rows, num_steps, _results(out / all_cases[0].folder)[0][-1])
    print("all equivalent" if is_ok else "NOT equivalent: see the rows marked NO")
    return 0 if is_ok else 1


if __name__ == "__main__":
    mode, folder, steps, backend, device_name = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6]
    world = int(os.environ.get("WORLD_SIZE", 1))
    cases = build_cases(max(world, 2), backend, device_name)
    chosen = [c for c in cases if (c.world_size == 1) == (mode == "--single")]
    train_cases(folder, chosen, steps, device_name)
