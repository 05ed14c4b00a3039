"""How much 50 dashboard clients on loopback slow a tiny CPU training, as a ratio measured in one run.

One `gptrain train` runs pinned to the first core with one torch thread; `gptrain dashboard` and the
clients (this process, asyncio + httpx) share the other core(s). The run goes through phases by time:
warm-up, baseline (no clients), load (--clients pages for --seconds), baseline again. Each client acts
like the page: GET /api/runs and /api/rows once, then keeps /api/stream open and re-fetches /api/runs
every --runs-every seconds. The speed of a step comes from the times of consecutive train rows in
metrics.jsonl (their tokens_per_second field is a 20-step mean, which would blur the phase edges); the
ratio is the median in the load phase over the median of both baselines. It prints, it asserts nothing.

    .venv/bin/python benchmarks/dashboard_clients.py                  # 50 clients, 30 s phases
    .venv/bin/python benchmarks/dashboard_clients.py --seconds 8 -- --batch-size 4
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]  # the trainer runs here, so it finds the prepared data/
TRAIN_FLAGS = ["--preset", "tiny", "--batch-size", "2", "--steps", "1000000", "--device", "cpu", "--compile", "off",
               "--quiet", "--log.live=off", "--eval.every_steps=0", "--samples.every_steps=0",
               "--checkpoint.every_steps=0"]  # no evals, samples or checkpoints in the measured phases
SLOWDOWN_LIMIT = 0.05
SSL_CONTEXT = ssl.create_default_context()  # unused on http://, but each client would load the CA file (20 ms)


@dataclass
class Counts:
    """What the clients got from the server."""

    requests: int = 0  # answered GET /api/runs and /api/rows
    events: int = 0  # server-sent events on /api/stream
    rows: int = 0  # metrics rows in those events
    errors: int = 0
    dashboard_cpu: float = 0.0  # share of one core the server used in the load phase
    clients_cpu: float = 0.0  # and the clients (this process)


def describe_machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    is_vm = re.search(r"^flags\s*:.*\bhypervisor\b", cpuinfo, re.M) is not None
    return (f"{model.group(1) if model else 'unknown CPU'}, {os.cpu_count()} cores{' (virtual machine)' * is_vm}, "
            f"load average {os.getloadavg()[0]:.2f} at start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_busy_seconds(core: int) -> tuple[float, float]:
    """(busy, steal) CPU seconds of one core since boot, from /proc/stat (steal: the hypervisor ran others)."""
    line = next(x for x in Path("/proc/stat").read_text().splitlines() if x.startswith(f"cpu{core} "))
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), steal / os.sysconf("SC_CLK_TCK")


def mark(core: int, trainer: subprocess.Popen) -> tuple[float, float, float, float]:
    """(time, core busy, core steal, trainer CPU) seconds: two marks give a phase and who used the core in it."""
    return time.time(), *core_busy_seconds(core), cpu_seconds(trainer.pid)


def start_process(cmd: list[str], log: Path, cores: set[int]) -> subprocess.Popen:
    """cmd pinned to cores, in its own session (a Ctrl-C reaches only this script, which stops it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTRAIN_")}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: os.sched_setaffinity(0, cores))


def wait_for(find, what: str, procs: list[subprocess.Popen], logs: list[Path], timeout_seconds: float = 300):
    """Poll find() until it returns something; exit with the logs' tails if a process ends or time runs out."""
    deadline = time.monotonic() + timeout_seconds
    while (found := find()) is None:
        ended = [p for p in procs if p.poll() is not None]
        if ended or time.monotonic() > deadline:
            tails = "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
            sys.exit(f"gave up waiting for {what} ({'a process ended' if ended else 'timed out'}):\n{tails}")
        time.sleep(0.2)
    return found


def read_rows(metrics: Path) -> list[dict]:
    if not metrics.is_file():
        return []
    text = metrics.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]  # whole lines only


def first_train_time(metrics: Path, since: float) -> float | None:
    """The time of the first train row written after since (rows left by an earlier run in --run-dir are older)."""
    return next((r["time"] for r in read_rows(metrics) if r.get("kind") == "train" and r["time"] > since), None)


def dashboard_up(log: Path, port: int) -> str | None:
    """The dashboard's token once it prints its URL and answers /api/runs, else None."""
    found = re.search(r"#token=(\S+)", log.read_text()) if log.is_file() else None
    if found is None:
        return None
    try:
        answer = httpx.get(f"http://127.0.0.1:{port}/api/runs", headers={"Authorization": f"Bearer {found[1]}"})
    except httpx.TransportError:
        return None
    return found[1] if answer.status_code == 200 else None


async def get_json(http: httpx.AsyncClient, path: str, counts: Counts) -> dict | list:
    answer = await http.get(path)
    answer.raise_for_status()
    counts.requests += 1
    return answer.json()


async def follow(http: httpx.AsyncClient, offset: int, counts: Counts) -> None:
    """Keep /api/stream open, reading events the way app.js does; reconnect from the last offset on an error."""
    while True:
        try:
            async with http.stream("GET", f"/api/stream?run=0&offset={offset}") as answer:
                answer.raise_for_status()
                async for line in answer.aiter_lines():
                    if line.startswith("data: "):
                        payload = json.loads(line[6:])
                        counts.events += 1
                        counts.rows += len(payload["rows"])
                        offset = payload["offset"]
        except httpx.HTTPError:
            counts.errors += 1
            await asyncio.sleep(1.0)


async def refresh_runs(http: httpx.AsyncClient, every_seconds: float, counts: Counts) -> None:
    while True:
        await asyncio.sleep(every_seconds)
        try:
            await get_json(http, "/api/runs", counts)
        except httpx.HTTPError:
            counts.errors += 1


async def page(base: str, token: str, delay_seconds: float, runs_every: float, counts: Counts) -> None:
    """One open dashboard tab, with its own connections as a browser tab has."""
    await asyncio.sleep(delay_seconds)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=httpx.Timeout(10.0, read=None),
                                 verify=SSL_CONTEXT) as http:
        try:
            await get_json(http, "/api/runs", counts)
            offset = (await get_json(http, "/api/rows?run=0&offset=0", counts))["offset"]
        except httpx.HTTPError:
            counts.errors += 1
            return
        await asyncio.gather(follow(http, offset, counts), refresh_runs(http, runs_every, counts))


async def serve_clients(num_clients: int, base: str, token: str, seconds: float, runs_every: float) -> Counts:
    """num_clients pages for seconds (their starts spread over the first second, as tabs open one by one)."""
    counts = Counts()
    tasks = [asyncio.create_task(page(base, token, i / num_clients, runs_every, counts)) for i in range(num_clients)]
    await asyncio.sleep(seconds)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return counts


def step_rates(rows: list[dict]) -> list[tuple[float, float, float]]:
    """(start, end, tokens/s) of each step, from consecutive train rows."""
    train = [r for r in rows if r.get("kind") == "train"]
    return [(a["time"], b["time"], (b["tokens_seen"] - a["tokens_seen"]) / (b["time"] - a["time"]))
            for a, b in itertools.pairwise(train) if b["time"] > a["time"]]


def rates_in(rates: list[tuple[float, float, float]], phase: tuple[float, float]) -> list[float]:
    """Rates of the steps that lie wholly inside phase."""
    return [rate for start, end, rate in rates if phase[0] <= start and end <= phase[1]]


def stop(proc: subprocess.Popen | None, timeout_seconds: float = 60) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()  # the trainer saves a checkpoint and writes its report first
    try:
        proc.wait(timeout=timeout_seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(args: argparse.Namespace, tmp: Path, trainer_cores: set[int], other_cores: set[int]) -> tuple:
    """Run the phases; returns (metrics rows, {phase: (its first mark, its last)}, client counts)."""
    run_dir = Path(args.run_dir).resolve() if args.run_dir else tmp / "run"
    metrics, port = run_dir / "metrics.jsonl", args.port or free_port()
    logs = [tmp / "trainer.log", tmp / "dashboard.log"]
    trainer = dashboard = None
    launched = time.time()
    try:
        trainer = start_process([sys.executable, "-m", "gptrain", "train", *TRAIN_FLAGS, "--run-dir", str(run_dir),
                                 *args.extra], logs[0], trainer_cores)
        started = wait_for(lambda: first_train_time(metrics, launched), "the first train row", [trainer], logs[:1])
        dashboard = start_process([sys.executable, "-m", "gptrain", "dashboard", str(run_dir), "--port", str(port)],
                                  logs[1], other_cores)
        token = wait_for(lambda: dashboard_up(logs[1], port), "the dashboard", [trainer, dashboard], logs, 60)
        time.sleep(max(0.0, started + args.warmup - time.time()))
        core = min(trainer_cores)
        marks = [mark(core, trainer)]
        time.sleep(args.seconds)
        marks.append(mark(core, trainer))
        cpu_before = cpu_seconds(dashboard.pid), time.process_time()
        counts = asyncio.run(serve_clients(args.clients, f"http://127.0.0.1:{port}", token, args.seconds,
                                           args.runs_every))
        marks.append(mark(core, trainer))
        counts.dashboard_cpu = (cpu_seconds(dashboard.pid) - cpu_before[0]) / (marks[2][0] - marks[1][0])
        counts.clients_cpu = (time.process_time() - cpu_before[1]) / (marks[2][0] - marks[1][0])
        time.sleep(args.seconds)
        if trainer.poll() is not None:
            sys.exit(f"the trainer ended early:\n{logs[0].read_text(errors='replace')[-3000:]}")
        marks.append(mark(core, trainer))
    finally:
        stop(dashboard, 10)
        stop(trainer)
    return read_rows(metrics), dict(zip(("before", "load", "after"), itertools.pairwise(marks), strict=True)), counts


def report(rows: list[dict], phases: dict, counts: Counts, args: argparse.Namespace) -> None:
    rates = step_rates(rows)
    before, load, after = (rates_in(rates, (a[0], b[0])) for a, b in phases.values())
    if not (before and load and after):
        sys.exit(f"too few steps to compare ({len(before)} before, {len(load)} loaded, {len(after)} after): "
                 f"give more --seconds or a faster training (e.g. -- --batch-size 1)")
    base, loaded = statistics.median(before + after), statistics.median(load)
    ratio = loaded / base
    verdict = "PASS" if 1 - ratio < SLOWDOWN_LIMIT else "FAIL"
    print(f"baseline  : {base:,.0f} tokens/s median over {len(before) + len(after)} steps "
          f"(before {statistics.median(before):,.0f}, after {statistics.median(after):,.0f})")
    print(f"loaded    : {loaded:,.0f} tokens/s median over {len(load)} steps")
    print(f"ratio loaded / baseline: {ratio:.3f}  (slowdown {100 * (1 - ratio):.1f}%; "
          f"{verdict} against {100 * SLOWDOWN_LIMIT:.0f}%, for information)")
    print(f"clients served: {counts.events:,} stream events (at most about {args.clients * args.seconds:,.0f}: one "
          f"a second per client) with {counts.rows:,} rows, {counts.requests:,} requests, {counts.errors} errors")
    others = ", ".join(f"{name} {100 * ((b[1] - a[1]) - (b[3] - a[3])) / (b[0] - a[0]):.0f}% (steal "
                       f"{100 * (b[2] - a[2]) / (b[0] - a[0]):.0f}%)" for name, (a, b) in phases.items())
    print(f"other work on the trainer's core (noise if not ~0): {others}")
    print(f"CPU in the load phase: dashboard {100 * counts.dashboard_cpu:.0f}%, clients "
          f"{100 * counts.clients_cpu:.0f}% of one core (their core is not saturated if the sum is well under 100%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase: baseline, load, baseline")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after the first step left out")
    parser.add_argument("--runs-every", type=float, default=5.0, help="seconds between a client's GET /api/runs")
    parser.add_argument("--port", type=int, default=0, help="the dashboard's port (0: a free one)")
    parser.add_argument("--run-dir", help="where the training writes (default: a temporary folder)")
    parser.add_argument("extra", nargs="*", help="more gptrain train flags (after --); later ones win")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        sys.exit(f"needs two cores to pin the trainer and the clients apart; this process may use {cores}")
    trainer_cores, other_cores = {cores[0]}, set(cores[1:])
    os.sched_setaffinity(0, other_cores)  # the clients run in this process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up in measure()'s finally
    print(f"machine: {describe_machine()}")
    print(f"trainer on core {cores[0]} (1 thread): gptrain train {' '.join(TRAIN_FLAGS[:4] + args.extra)} | "
          f"dashboard and {args.clients} clients on core(s) {','.join(map(str, sorted(other_cores)))}")
    print(f"phases: warm-up {args.warmup:g} s, baseline {args.seconds:g} s, load {args.seconds:g} s, "
          f"baseline {args.seconds:g} s; a client re-fetches /api/runs every {args.runs_every:g} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="gptrain-dashboard-bench-") as tmp:
        rows, phases, counts = measure(args, Path(tmp), trainer_cores, other_cores)
    report(rows, phases, counts, args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (the trainer and the dashboard were stopped)")
