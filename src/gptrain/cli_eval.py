"""`gptrain eval|report|plot|compare|control`: judging runs and steering a running one (the rest of
the command line is in cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from gptrain.errors import UserError


def add_eval_parsers(sub) -> None:
    """The eval, report, plot and compare commands."""
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte over a whole split; HellaSwag",
                       description="Scores a checkpoint. By default: every token of the run's own val split "
                       "(rows with scope: full, kept in the run's eval.jsonl). With --hellaswag: HellaSwag "
                       "(add --loss for both). The official HellaSwag val set is downloaded once from "
                       "$GPTRAIN_HELLASWAG_URL (default: the HellaSwag repository's).")
    p.add_argument("--checkpoint", required=True, metavar="RUN_OR_CKPT", help="a checkpoint folder or a run directory")
    p.add_argument("--data", metavar="NAME|PATH", help="evaluate on this corpus's split instead (prepared with the "
                   "checkpoint's tokenizer when needed)")
    p.add_argument("--split", default="val", choices=["val", "train"], help="which split (default val)")
    p.add_argument("--hellaswag", nargs="?", const="", metavar="FILE",
                   help="score HellaSwag: a local JSONL in the official format, or without FILE the official val set")
    p.add_argument("--limit", type=int, help="score only the first N HellaSwag items")
    p.add_argument("--loss", action="store_true", help="with --hellaswag: also the split's loss")
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: the run's micro batch; HellaSwag: "
                   "32, i.e. 8 items of 4 endings)")
    p.add_argument("--json", metavar="FILE", help="also write the results to this JSON file")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("report", help="write a run's report card (report.md, loss.png) from its run directory")
    p.add_argument("run_dir", metavar="RUN")
    p = sub.add_parser("plot", help="draw each run's loss, lr and tokens/s against tokens seen (RUN/loss.png)")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p = sub.add_parser("control", help="steer a running trainer: pause, resume, save, stop, lr SCALE, "
                       "eval-every N, sample-every N (waits for its acknowledgement)")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("verb", choices=["pause", "resume", "save", "stop", "lr", "eval-every", "sample-every"])
    p.add_argument("value", nargs="?", type=float, help="lr: the factor on the scheduled lr; eval-every, "
                   "sample-every: steps (0: only at the end)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the trainer's answer")
    p = sub.add_parser("dashboard", help="a live web page of runs: charts, samples, events, controls, a prompt box")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR|RUNS_FOLDER", default=["runs"],
                   help="run directories, or a folder of them (default: runs)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--host", default="127.0.0.1", help="the address to bind; anything but loopback lets other "
                   "machines reach it (the token still guards every request)")
    p.add_argument("--new-run", action="store_true", help=argparse.SUPPRESS)  # train --dashboard: not made yet
    p = sub.add_parser("compare", help="compare runs: a table of steps, tokens, val loss, bits per byte, HellaSwag, "
                       "time, and a PNG of their val curves")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--out", metavar="FILE.png", help="where to draw the val curves (default: no plot)")


def cmd_eval(args: argparse.Namespace) -> int:
    from gptrain.api import Checkpoint
    from gptrain.eval.checkpoint import eval_row, record_evals

    if args.limit is not None and args.limit < 1 or args.batch_size is not None and args.batch_size < 1:
        raise UserError("--limit and --batch-size must be at least 1")
    if args.hellaswag is None and (args.limit is not None or args.loss):
        raise UserError("--limit and --loss go with --hellaswag")
    json_path = _writable(args.json)
    checkpoint = Checkpoint.load(args.checkpoint, device=args.device)
    rows = []
    if args.hellaswag is None or args.loss:
        found = checkpoint.evaluate(args.data, args.split, args.batch_size, show_progress=None)
        rows.append(eval_row("eval", checkpoint.path, checkpoint.step, found, scope="full"))
        print(f"{found['split']} split (scope: full, {found['num_tokens']:,} tokens of {found['data']}): "
              f"loss {found['loss']:.4f} | perplexity {found['perplexity']:,.2f} | bits per byte {found['bpb']:.4f}")
    if args.hellaswag is not None:
        items_per_batch = max(1, args.batch_size // 4) if args.batch_size else 8  # 4 sequences per item
        found = checkpoint.hellaswag(args.hellaswag or None, args.limit, items_per_batch, show_progress=None)
        rows.append(eval_row("hellaswag", checkpoint.path, checkpoint.step, found,
                             file=str(Path(args.hellaswag).resolve()) if args.hellaswag else "official val",
                             limit=args.limit))
        print(_describe_hellaswag(found))
    where = record_evals(checkpoint.path, rows, json_path)
    if where is not None:
        print(f"recorded in {where}")
    return 0


def _writable(path: str | None) -> Path | None:
    """An output file's path, checked before any work: its folder must exist."""
    if path is None:
        return None
    if not Path(path).expanduser().parent.is_dir():
        raise UserError(f"cannot write {path}: its folder does not exist; create it or choose another path")
    return Path(path).expanduser()


def _describe_hellaswag(found: dict) -> str:
    text = (f"HellaSwag ({found['num_items']:,} items): acc {100 * found['acc']:.2f}% | acc_norm "
            f"{100 * found['acc_norm']:.2f}% | acc_norm_bytes {100 * found['acc_norm_bytes']:.2f}%")
    if found["num_unencodable"]:
        text += (f"\n  {found['num_unencodable']:,} items the tokenizer cannot encode count as wrong; over the "
                 f"{found['num_items'] - found['num_unencodable']:,} scored: acc {100 * found['acc_scored']:.2f}% "
                 f"| acc_norm {100 * found['acc_norm_scored']:.2f}% | acc_norm_bytes "
                 f"{100 * found['acc_norm_bytes_scored']:.2f}%")
    cuts = found["num_truncated_contexts"], found["num_truncated_endings"]
    if any(cuts):
        text += f"\n  longer than the window: {cuts[0]:,} contexts cut from the left, {cuts[1]:,} endings scored on " \
                "their last window"
    return text


def cmd_report(args: argparse.Namespace) -> int:
    from gptrain.metrics.report import write_report

    print(f"report card written: {write_report(Path(args.run_dir))}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gptrain.metrics.plots import plot_run
    from gptrain.metrics.report import PLOT_NAME
    from gptrain.metrics.runs import read_run

    for run_dir in map(Path, args.runs):
        print(f"plot written: {plot_run(read_run(run_dir), run_dir / PLOT_NAME)}")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    from gptrain.train.control import send_command

    name = {"lr": "lr_scale", "eval-every": "eval_every", "sample-every": "sample_every"}.get(args.verb, args.verb)
    if (args.value is None) != (name in ("pause", "resume", "save", "stop")):
        raise UserError(f"{args.verb} {'needs a value' if args.value is None else 'takes no value'}")
    answer = send_command(Path(args.run_dir), name, args.value, args.timeout)  # it checks the value
    print(f"trainer: {answer['message']}")
    return 0 if answer["ok"] else 2


def _dashboard_runs(paths: list[str], is_new_run: bool = False) -> list[Path]:
    """Run directories: each path that is one (or, for train --dashboard, is about to be), and the runs
    inside a path that is a folder of them."""
    runs = []
    for path in map(Path, paths):
        if (path / "config.toml").is_file() or is_new_run:
            runs.append(path)
        elif path.is_dir():
            is_run = [p for p in path.iterdir() if (p / "config.toml").is_file() and (p / "metrics.jsonl").is_file()]
            runs += sorted(is_run)
    if not runs:
        raise UserError(f"no run directory in {' '.join(paths)}: give runs made by `gptrain train`")
    return runs


def cmd_dashboard(args: argparse.Namespace) -> int:
    import secrets

    try:
        import uvicorn

        from gptrain.dashboard.server import create_app
    except ImportError:
        raise UserError("the dashboard needs its extra: pip install 'gptrain[dashboard]'") from None
    runs = _dashboard_runs(args.runs, args.new_run)
    token = secrets.token_urlsafe(24)
    hosts = {"127.0.0.1", "localhost", "::1", args.host}
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: binding {args.host}: other machines can reach the dashboard (requests still need the token)")
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(f"dashboard for {len(runs)} run(s): http://{shown}:{args.port}/#token={token}", flush=True)
    uvicorn.run(create_app(runs, token, hosts), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from gptrain.metrics.compare import compare_runs

    print(compare_runs([Path(r) for r in args.runs], _writable(args.out)))
    return 0


@contextlib.contextmanager
def dashboard_beside(args: argparse.Namespace, cfg, rank: int):
    """With --dashboard (or --metrics-addr, or METRICS_SERVER_ADDR in .env): `gptrain dashboard` for this run in
    its own process (prompts are sampled there, never in the trainer), ended with the training. Yields cfg
    with its run directory fixed."""
    address = args.metrics_addr or dotenv_metrics_addr()
    if not (args.dashboard or address) or rank != 0:
        yield cfg
        return
    if args.resume == "auto" and not cfg.run_dir:
        raise UserError("--dashboard with --resume auto needs --run-dir (the run to show)")
    host, port = split_address(address or "127.0.0.1:8765", "--metrics-addr")
    run_dir = args.resume or cfg.run_dir or f"runs/{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    cmd = [sys.executable, "-m", "gptrain", "dashboard", str(run_dir), "--host", host, "--port", port,
           "--new-run"]
    server = subprocess.Popen(cmd)
    try:
        yield dataclasses.replace(cfg, run_dir=str(run_dir)) if not args.resume else cfg
    finally:
        server.terminate()
        server.wait(timeout=10)


def split_address(address: str, what: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not host:
        raise UserError(f"{what} must be HOST:PORT (got {address!r})")
    return host.strip("[]"), port


def dotenv_metrics_addr(path: Path = Path(".env")) -> str | None:
    """METRICS_SERVER_ADDR from a .env file (other trainers' key; never the process environment): a loopback
    address only, since only an explicit --metrics-addr or --host may open the dashboard to other machines."""
    from gptrain.config import read_dotenv

    address = read_dotenv(path).get("METRICS_SERVER_ADDR")
    if not address:
        return None
    host, _ = split_address(address, "METRICS_SERVER_ADDR in .env")
    try:
        is_loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = False
    if not is_loopback:
        raise UserError(f"METRICS_SERVER_ADDR in .env must be a loopback address such as 127.0.0.1:8765 (got "
                        f"{address!r}); to serve other machines pass --metrics-addr on the command line")
    return address


EVAL_COMMANDS = {"eval": cmd_eval, "report": cmd_report, "plot": cmd_plot, "compare": cmd_compare,
                 "control": cmd_control, "dashboard": cmd_dashboard}
