"""`gptrain train|data|tokenizer|generate|eval|report|compare|...`: parse the command line, then call one function."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from gptrain.cli_bench import BENCH_COMMANDS, add_bench_parser
from gptrain.cli_eval import EVAL_COMMANDS, add_eval_parsers, dashboard_beside
from gptrain.cli_interop import INTEROP_COMMANDS, add_interop_parsers
from gptrain.errors import RunStopped, UserError, is_lost_peer, report_crash

TRAIN_EPILOG = """\
Any config field can be set as --section.field=value (or GPTRAIN_SECTION__FIELD=value in the
environment or a .env file), e.g. --model.dropout=0.1 --schedule.kind=wsd --eval.patience=3.
Precedence: defaults < --preset < recipe TOML < .env < environment < flags. A .env file may also use
TRAIN_DATA_PATH, EVAL_DATA_PATH, CHECKPOINT_DIR, EPOCHS, BATCH_SIZE, LEARNING_RATE (see `gptrain config`).
Sections: model, tokenizer, data, train, optim, schedule, eval, samples, checkpoint, parallel, log.
Run `gptrain config` to print every key with its default."""


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="a TOML recipe (e.g. configs/tiny.toml)")
    g = p.add_argument_group("common settings (aliases of config fields)")
    g.add_argument("--preset", "--model-size", dest="preset", help="a named size from `gptrain presets`")
    g.add_argument("--embd", type=int, help="model.n_embd: width")
    g.add_argument("--layers", type=int, help="model.n_layer: number of blocks")
    g.add_argument("--heads", type=int, help="model.n_head: attention heads (must divide --embd)")
    g.add_argument("--context", type=int, help="model.block_size: context length in tokens")
    g.add_argument("--vocab", type=int, help="tokenizer.vocab_size of a trained BPE")
    g.add_argument("--tokenizer", metavar="bpe|gpt2|char|FILE",
                   help="tokenizer.kind: a BPE fitted on the corpus, GPT-2's, characters, or a tokenizer.json")
    g.add_argument("--data", "--train-path", dest="data", metavar="NAME|PATH",
                   help="data.source: a name from `gptrain data list`, a text, JSONL(.gz) or Parquet file, a folder "
                   "of them, or a folder of token shards")
    g.add_argument("--val-data", "--eval-path", dest="val_data", metavar="NAME|PATH",
                   help="data.val_source: the validation set (default: the corpus's official split, else a seeded "
                   "split by document)")
    g.add_argument("--text-field", help="data.text_field: the JSONL key or Parquet column with the text (text)")
    g.add_argument("--workers", type=int, help="data.num_workers: tokenizer processes (0: one per core)")
    g.add_argument("--lr", "--learning-rate", dest="lr", type=float, help="schedule.peak_lr")
    g.add_argument("--batch-size", type=int, help="train.batch_size: sequences per micro batch")
    g.add_argument("--steps", type=int, help="train.num_steps: optimizer steps")
    g.add_argument("--epochs", type=float, help="train.num_epochs: passes over the data (instead of --steps)")
    g.add_argument("--budget", help="train.budget: a wall-clock time such as 10m, 90s or 1.5h instead of --steps "
                   "(the steps are planned from the speed measured over the first steps)")
    g.add_argument("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    g.add_argument("--seed", type=int)
    g.add_argument("--name", help="run name (run directory runs/<name>-<time>)")
    g.add_argument("--parallel", choices=["auto", "ddp", "zero1", "fsdp"],
                   help="parallel.strategy under torchrun (auto: ddp); one process ignores it")


def _config_values(args: argparse.Namespace, dotted: dict[str, str]) -> dict[str, object]:
    """The alias flags that were given (config.ALIASES names them), then the dotted keys."""
    from gptrain.config import ALIASES

    given = {a: getattr(args, a.replace("-", "_"), None) for a in ALIASES}
    return {a: v for a, v in given.items() if v is not None} | dotted


def split_dotted(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Take `--section.field=value` / `--section.field value` out of argv; returns the rest and the keys."""
    rest, dotted, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and "." in key:
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value")
                value, i = argv[i + 1], i + 1
            dotted[key.replace("-", "_")] = value
        else:
            rest.append(arg)
        i += 1
    return rest, dotted


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line, exit code 2, like every other user error."""

    def error(self, message: str) -> None:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gptrain", description="Train GPT-2 style models from scratch.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train a model (default: a small model on Shakespeare)", epilog=TRAIN_EPILOG,
                       formatter_class=fmt)
    _add_config_flags(p)
    p.add_argument("--run-dir", "--checkpoint-dir", dest="run_dir",
                   help="where this run writes (default runs/<name>-<YYYYmmdd-HHMMSS>)")
    p.add_argument("--resume", metavar="RUN_DIR|auto",
                   help="continue a run from its latest checkpoint; auto: the run --run-dir names (else the newest "
                        "runs/<name>-*) if it has a checkpoint, else start it (for torchrun --max-restarts, requeues)")
    p.add_argument("--init-from", metavar="CHECKPOINT", help="start from these weights (fine-tuning)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --run-dir")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--compile", choices=["auto", "on", "off"], help="torch.compile (auto: on CUDA; on the CPU when "
                   "measured to pay for itself, see README: Speed)")
    p.add_argument("--dashboard", "--serve-metrics", dest="dashboard", action="store_true",
                   help="also serve the web dashboard for this run (a separate process; needs gptrain[dashboard])")
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="where --dashboard listens (default 127.0.0.1:8765)")
    p.add_argument("--dry-run", action="store_true", help="build everything, run two steps, report peak memory per "
                   "rank and the largest micro batch that fits; writes no run")

    _add_data_parser(sub, fmt)
    _add_tokenizer_parser(sub, fmt)

    p = sub.add_parser("generate", aliases=["sample"], help="generate text from a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder or a run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0,
                   help="keep the k most likely tokens (0: no top-k cut, every token may be drawn)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this much mass")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")
    p.add_argument("--seed", type=int, help="makes sampling repeatable")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto")

    add_eval_parsers(sub)
    add_interop_parsers(sub)
    add_bench_parser(sub)

    p = sub.add_parser("check-equivalence", help="check that N ranks (DDP, ZeRO-1, FSDP) and accumulation train "
                       "like one process: a table of the largest differences; exit 0 when all match")
    p.add_argument("--out", default="", help="where the tiny runs go (default: a temporary folder; under torchrun "
                   "runs/check-equivalence, which every rank must see)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per case")
    p.add_argument("--compile", metavar="BACKEND", default="",
                   help="also run DDP and FSDP under torch.compile with this backend (inductor, aot_eager)")
    p.add_argument("--device", default="auto", help="auto: CUDA under torchrun (or alone with 2+ GPUs), else cpu")

    sub.add_parser("presets", help="list the named model sizes with their parameter counts")
    sub.add_parser("config", help="print every config key with its default value")
    p = sub.add_parser("demo", help="a one-minute tour: tokenize, forward, generate, evaluate, train a little")
    p.add_argument("--device", default="cpu")
    return parser


def _add_prepare_flags(p: argparse.ArgumentParser) -> None:
    _add_config_flags(p)
    p.add_argument("source", nargs="?", metavar="NAME|PATH", help="the corpus (same as --data)")
    p.add_argument("--out", metavar="DIR", help="data.data_dir: where the dataset goes (default data/<corpus>-<tok>)")


def _add_data_parser(sub, fmt) -> None:
    p = sub.add_parser("prepare", help="turn a corpus into token shards (= gptrain data prepare)",
                       epilog=TRAIN_EPILOG, formatter_class=fmt)
    _add_prepare_flags(p)
    data = sub.add_parser("data", help="the corpus catalogue, preparing token shards, and shard information")
    verbs = data.add_subparsers(dest="data_command", required=True)
    verbs.add_parser("list", help="the catalogue: name, size, licence, origin, validation split")
    p = verbs.add_parser("prepare", help="download (catalogue names), tokenize and write train/val shards",
                         epilog=TRAIN_EPILOG, formatter_class=fmt)
    _add_prepare_flags(p)
    p = verbs.add_parser("info", help="a shard's or a dataset folder's header, dtype, tokens, tokenizer, source")
    p.add_argument("path", help="a .bin shard or a dataset folder")


def _add_tokenizer_parser(sub, fmt) -> None:
    tok = sub.add_parser("tokenizer", help="train a byte-level BPE on a corpus")
    verbs = tok.add_subparsers(dest="tokenizer_command", required=True)
    p = verbs.add_parser("train", help="fit a byte-level BPE on a corpus's train split (streaming) and save it",
                         epilog=TRAIN_EPILOG, formatter_class=fmt)
    _add_config_flags(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the tokenizer.json to write")


def _rank() -> int:
    """This process's rank under torchrun (0 alone)."""
    return int(os.environ.get("RANK", 0)) if int(os.environ.get("WORLD_SIZE", 1)) > 1 else 0


def _cli_values(args: argparse.Namespace, extra: dict[str, str]) -> dict[str, object]:
    """Every config value the command line sets (aliases, dotted keys, and the train flags that map to keys)."""
    cli = _config_values(args, extra)
    if getattr(args, "run_dir", None):
        cli["run_dir"] = args.run_dir
    if getattr(args, "quiet", False):
        cli["log.is_quiet"] = "true"
    if getattr(args, "compile", None):
        cli["train.compile"] = args.compile
    return cli


def _resolve(args: argparse.Namespace, extra: dict[str, str]):
    """The run's config: defaults, preset, recipe (or the resumed run's config.toml), .env, environment, flags.
    A mistake here is the same on every rank, so under torchrun only rank 0 reports it."""
    from gptrain.config import resolve_config

    try:
        return resolve_config(_recipe(args), _cli_values(args, extra))
    except UserError as e:
        e.is_echo = _rank() != 0
        raise


def _recipe(args: argparse.Namespace) -> Path | None:
    recipe = args.recipe
    if getattr(args, "resume", None) and args.resume != "auto":
        if recipe:
            raise UserError("--resume takes the run's own config.toml; pass overrides as flags, not a recipe")
        recipe = Path(args.resume) / "config.toml"
        if not Path(args.resume).exists():
            raise UserError(f"run directory {args.resume} does not exist: give the folder of the run to continue (a "
                            "run killed before its folder was made, while its data was prepared, starts again with "
                            f"its first command; job scripts can use --resume auto --run-dir {args.resume})")
        if not recipe.is_file():
            raise UserError(f"{args.resume} is not a run directory (no config.toml in it)")
    return recipe


def cmd_train(args: argparse.Namespace, extra: dict[str, str]) -> int:
    from gptrain.train.budget import process_started_at  # a --budget counts from the process's start
    from gptrain.train.loop import train

    cfg = _resolve(args, extra)
    log = (lambda *_: None) if cfg.log.is_quiet else print
    if args.dry_run:
        if args.resume or args.init_from:
            raise UserError("--dry-run measures a new run: it cannot be combined with --resume or --init-from",
                            is_echo=_rank() != 0)
        from gptrain.train.dry_run import dry_run

        dry_run(cfg, log=log)
        return 0
    with dashboard_beside(args, cfg, _rank()) as cfg:
        summary = train(cfg, resume=args.resume, init_from=args.init_from, should_overwrite=args.overwrite, log=log,
                        should_tune_malloc=True, overrides=_cli_values(args, extra), started_at=process_started_at())
    if summary["is_stopped"]:
        # Saved and stopped (EXIT_CODES): 0, so a scheduler that sent SIGTERM sees a clean end; 130 for a
        # Ctrl-C typed at a terminal (a shell's `&&` chain stops there), except under torchrun.
        is_ctrl_c = summary["stop_signal"] == signal.SIGINT and "TORCHELASTIC_RUN_ID" not in os.environ
        return 130 if is_ctrl_c else 0
    if _rank() != 0:
        return 0
    if summary.get("is_already_complete"):
        print(f"run directory: {summary['run_dir']} (already complete: nothing to train)")
        return 0
    print(f"run directory: {summary['run_dir']}\nfinal train loss {summary['train_loss']:.4f} | "
          f"val loss {summary['val_loss']:.4f} | {summary['elapsed_seconds']:.0f}s of training")
    return 0


def cmd_prepare(args: argparse.Namespace, extra: dict[str, str]) -> int:
    from gptrain.data.prepare import prepare_dataset

    if args.recipe and not args.recipe.endswith(".toml") and not args.source:  # one positional: the corpus
        args.recipe, args.source = None, args.recipe
    if args.source and args.data and args.source != args.data:
        raise UserError(f"two corpora given ({args.source!r} and --data {args.data!r}): give one")
    args.data = args.data or args.source
    if args.out:
        extra = extra | {"data.data_dir": args.out}
    cfg = _resolve(args, extra)
    folder = prepare_dataset(cfg.data, cfg.tokenizer, may_fork=True)  # this process does nothing else
    print(f"dataset ready: {folder}")
    return 0


def cmd_data(args: argparse.Namespace, extra: dict[str, str]) -> int:
    if args.data_command == "prepare":
        return cmd_prepare(args, extra)
    if extra:
        raise UserError(f"data {args.data_command} takes no config keys (got --{next(iter(extra))})")
    from gptrain.data import info

    if args.data_command == "list":
        print(info.format_catalogue())
    else:
        print(info.describe(Path(args.path)))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace, extra: dict[str, str]) -> int:
    from gptrain.data.prepare import train_tokenizer

    cfg = _resolve(args, extra)
    tokenizer = train_tokenizer(cfg.data, cfg.tokenizer, Path(args.out))
    print(f"tokenizer written: {args.out} ({tokenizer.name}, vocabulary {tokenizer.vocab_size:,})")
    if cfg.tokenizer.kind == "bpe" and tokenizer.vocab_size < cfg.tokenizer.vocab_size:
        print(f"note: the corpus ran out of merges before {cfg.tokenizer.vocab_size:,} tokens; a bigger corpus "
              "gives the full vocabulary")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from gptrain.api import Checkpoint

    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1 (got {args.num_samples})")
    checkpoint = Checkpoint.load(args.checkpoint, device=args.device)
    options = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, is_greedy=args.greedy)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        sys.stdout.write(args.prompt)
        for piece in checkpoint.stream(args.prompt, args.max_tokens, seed=seed, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n" if args.num_samples == 1 else "\n---\n")
    return 0


def cmd_check_equivalence(args: argparse.Namespace) -> int:
    import tempfile

    from gptrain.equivalence import check_equivalence

    if args.steps < 1:
        raise UserError("--steps must be at least 1", is_echo=_rank() != 0)
    if args.out or int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return check_equivalence(Path(args.out or "runs/check-equivalence"), args.steps, args.compile, args.device)
    with tempfile.TemporaryDirectory(prefix="gptrain-check-") as tmp:
        return check_equivalence(Path(tmp), args.steps, args.compile, args.device)


def cmd_presets() -> int:
    from gptrain.model.gpt import ModelConfig, count_parameters
    from gptrain.presets import PRESETS

    print(f"{'preset':<14} {'params':>10} {'embd':>5} {'layers':>6} {'heads':>5} {'context':>7} {'vocab':>11}  origin")
    for name, p in PRESETS.items():
        vocab = 50257 if p.vocab == "gpt2" else int(p.vocab)
        cfg = ModelConfig(n_embd=p.n_embd, n_layer=p.n_layer, n_head=p.n_head, block_size=p.block_size,
                          vocab_size=vocab)
        vocab_text = "GPT-2 50257" if p.vocab == "gpt2" else f"BPE {vocab}"
        print(f"{name:<14} {count_parameters(cfg) / 1e6:>9.2f}M {p.n_embd:>5} {p.n_layer:>6} {p.n_head:>5} "
              f"{p.block_size:>7} {vocab_text:>11}  {p.origin}")
    print("\nCounts include the (tied) embeddings; BPE presets train a tokenizer of that size on the corpus.")
    return 0


def cmd_config() -> int:
    from gptrain.config import ALIASES, DOTENV_BARE_KEYS, RunConfig, to_toml

    print(to_toml(RunConfig()), end="")
    print("\n# flag aliases: " + ", ".join(f"--{a} = {k}" for a, k in ALIASES.items()))
    print("# bare .env keys (a .env file only; GPTRAIN_ keys win): "
          + ", ".join(f"{name} = {k}" for name, k in DOTENV_BARE_KEYS.items())
          + ", METRICS_SERVER_ADDR = train --metrics-addr (loopback addresses only)")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            rest, extra = split_dotted(sys.argv[1:] if argv is None else argv)
            args = build_parser().parse_args(rest)
        except UserError as e:
            e.is_echo = _rank() != 0  # the same command on every rank: rank 0 reports it
            raise
        if args.command in ("train", "prepare", "data", "tokenizer"):
            command = {"train": cmd_train, "prepare": cmd_prepare, "data": cmd_data, "tokenizer": cmd_tokenizer_train}
            return command[args.command](args, extra)
        if extra:
            raise UserError(f"{args.command} takes no config keys (got --{next(iter(extra))})")
        if args.command in ("generate", "sample"):
            return cmd_generate(args)
        others = {**EVAL_COMMANDS, **INTEROP_COMMANDS, **BENCH_COMMANDS, "check-equivalence": cmd_check_equivalence}
        if args.command in others:
            return others[args.command](args)
        if args.command == "presets":
            return cmd_presets()
        if args.command == "config":
            return cmd_config()
        from gptrain.demo import run_demo

        return run_demo(args.device)
    except UserError as e:
        if not e.is_echo:  # an echo is rank 0's error, which rank 0 prints
            rank = f" (rank {_rank()})" if _rank() else ""
            print(f"gptrain: error{rank}: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a diverged run, a full disk: one line, exit 1
        if _rank() == 0:
            print(f"gptrain: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gptrain: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gptrain data list | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun's summary follows; this names the rank first
            if is_lost_peer(e):
                print(f"gptrain: rank {_rank()} stopped: another rank failed or was killed (see torchrun's summary "
                      f"for which one): {str(e).splitlines()[0][:200]}", file=sys.stderr)
                return 1
        return report_crash(e)
