"""`gptrain bench`: a model shape's training-step time by phase, tokens/s, FLOP/s, the measured matmul
rate and MFU; against the plain PyTorch reference (--compare reference) and llm.c (--llmc)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

from gptrain.errors import UserError

BENCH_EPILOG = """\
examples:
  gptrain bench                                      # GPT-2 124M, B=4, T=64, fp32 (CPU here)
  gptrain bench --compare reference                  # ... against plain PyTorch, alternating steps
  gptrain bench --layers 4 --embd 128 --heads 4 --context 64 --vocab 65 --batch-size 12 --no-bias \\
      --compare reference --steps 40                 # nanoGPT's CPU "baby" shape
  gptrain bench --compile --compare reference        # also compiled, with and without compile time
  gptrain bench --llmc ~/llm.c/train_gpt2            # llm.c's CPU trainer at its own shape (B=4, T=64)
  gptrain bench --device cuda --dtype bf16 --context 1024 --batch-size 16 --compare reference --compile
"""


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time a model's training step (forward, backward, optimizer), against "
                       "plain PyTorch or llm.c", epilog=BENCH_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", "--model-size", dest="preset", default="gpt2", help="a named size from `gptrain "
                   "presets` (default gpt2, 124M); the flags below override it")
    p.add_argument("--embd", type=int, help="model.n_embd: width")
    p.add_argument("--layers", type=int, help="model.n_layer")
    p.add_argument("--heads", type=int, help="model.n_head")
    p.add_argument("--context", type=int, default=64, help="sequence length timed (default 64)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the preset's; 50257 for GPT-2's)")
    p.add_argument("--no-bias", dest="bias", action="store_false", help="linear layers and norms without biases")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="fp32, or bf16 autocast (CUDA; the CPU, fast there with AMX or AVX-512 BF16)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per model (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default 2)")
    p.add_argument("--compare", choices=["reference"], help="also time the plain PyTorch GPT-2 (nanoGPT's step)")
    p.add_argument("--llmc", metavar="PATH", help="also time llm.c's CPU train_gpt2 binary (it fixes GPT-2 124M, "
                   "B=4, T=64, so gptrain is run at that shape)")
    p.add_argument("--compile", action="store_true", help="also time under torch.compile (and record it for "
                   "train.compile=auto on this machine)")
    p.add_argument("--cpu-linear", default="auto", help="train.cpu_linear: auto (probe), aten, onednn, onednn_copy, "
                   "or forward=K,grad_input=K,grad_weight=K")
    p.add_argument("--cpu-attention", default="auto", choices=["auto", "gptrain", "sdpa"],
                   help="train.cpu_attention: auto (probe), gptrain (its C++ kernel) or sdpa")
    p.add_argument("--cpu-gelu", default="auto", choices=["auto", "gptrain", "aten"],
                   help="train.cpu_gelu: auto (probe), gptrain (its C++ kernel) or aten")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--out", metavar="FILE.json", help="where the JSON result goes, a PNG chart beside it "
                   "(default runs/bench/bench-<time>.json)")


def bench_options(args: argparse.Namespace):
    from gptrain.bench.run import BenchOptions, with_llmc_shape
    from gptrain.model.gpt import ModelConfig
    from gptrain.presets import get_preset

    preset = get_preset(args.preset)
    vocab = args.vocab or (50257 if preset.vocab == "gpt2" else int(preset.vocab))
    model = ModelConfig(n_embd=args.embd or preset.n_embd, n_layer=args.layers or preset.n_layer,
                        n_head=args.heads or preset.n_head, block_size=args.context, vocab_size=vocab, bias=args.bias)
    batch_size = args.batch_size
    if args.llmc:
        from gptrain.bench.llmc import check_binary

        check_binary(args.llmc)  # before minutes of timing gptrain
        llmc_model = with_llmc_shape(model)
        if llmc_model != model or batch_size != 4:
            print("bench: --llmc times llm.c at its fixed shape, so gptrain runs GPT-2 124M at B=4, T=64 too")
        model, batch_size = llmc_model, 4
    return BenchOptions(model=model, batch_size=batch_size, device=args.device, dtype=args.dtype, steps=args.steps,
                        warmup=args.warmup, compare=args.compare or "", llmc=args.llmc or "", compile=args.compile,
                        cpu_linear=args.cpu_linear, cpu_attention=args.cpu_attention,
                        cpu_gelu=args.cpu_gelu)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from gptrain.bench.chart import write_bench_chart
    from gptrain.bench.run import run_bench
    from gptrain.distributed.env import resolve_device
    from gptrain.files import write_atomic
    from gptrain.runtime import tune_malloc

    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (got {args.threads})")
    args.device = resolve_device(args.device)
    opts = bench_options(args)
    tune_malloc()  # process-wide, as training does: it speeds up the reference as much as gptrain
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/bench/bench-{datetime.now():%Y%m%d-%H%M%S}.json")
    result = run_bench(opts, log=lambda message: print(f"bench: {message}", flush=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=1))
    chart = write_bench_chart(result, out.with_suffix(".png"))
    print(format_result(result))
    print(f"\nwrote {out} and {chart}")
    return 0


def format_result(result: dict) -> str:
    """The table `gptrain bench` prints: one row per run, then the ratios."""
    lines = [f"\n{result['title']}, {result['threads']} threads, torch {result['torch']}, "
             f"linear kernels {result['cpu_linear']}, attention {result.get('cpu_attention', 'sdpa')}, "
             f"gelu {result.get('cpu_gelu', 'aten')}",
             f"{'':22} {'forward':>9} {'backward':>9} {'optimizer':>9} {'step':>9} {'tokens/s':>10} "
             f"{'GFLOP/s':>9} {'MFU':>6}"]
    rows = [(name, run) for name, run in result["runs"].items()]
    rows += [(f"{name} compiled", run) for name, run in result.get("compiled", {}).items()]
    rows += [(f"{name}, eager again", run) for name, run in result.get("eager_beside_compiled", {}).items()]
    for name, run in rows:
        cells = [f"{run[f'{phase}_s']:9.4f}" if f"{phase}_s" in run else f"{'':9}"
                 for phase in ("forward", "backward", "optimizer", "step")]
        mfu = f"{run['mfu']:6.1%}" if run.get("mfu") is not None else f"{'':6}"
        lines.append(f"{name:22} {' '.join(cells)} {run['tokens_per_s']:10,.0f} {run['flops_per_s'] / 1e9:9.1f} {mfu}")
    lines.append(f"\nstep FLOP {result['step_flop'] / 1e9:.2f} G; measured matmul rate "
                 f"{result['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (large {result['dtype']} matrices)")
    lines.append(f"matmul_limit_fraction {result['matmul_limit_fraction']:.3f}  "
                 "(step FLOP / (step time x matmul rate))")
    if "step_time_ratio" in result:
        lines.append(f"step_time_ratio {result['step_time_ratio']:.3f}  (gptrain / reference; lower is faster), "
                     f"steps/s {result['steps_per_s_ratio']:.2f}x the reference's")
    if "llmc_step_time_ratio" in result:
        lines.append(f"llmc_step_time_ratio {result['llmc_step_time_ratio']:.3f}  (gptrain / llm.c)")
    if "compiled_step_time_ratio" in result:
        ratio = result["compiled_step_time_ratio"]
        lines.append(f"compiled_step_time_ratio {ratio:.3f}  (gptrain compiled / the eager reference, timed in turns), "
                     f"steps/s {1 / ratio:.2f}x the reference's")
    for name, run in result.get("compiled", {}).items():
        even = run["break_even_steps"]
        lines.append(f"{name} compiled: compile {run['compile_s']:.1f}s, first step {run['first_step_s']:.1f}s, "
                     f"{run['tokens_per_s_with_compile']:,.0f} tokens/s over these steps with it; "
                     + (f"pays for itself after {even} steps" if even else "no faster than eager: never pays"))
    return "\n".join(lines)


BENCH_COMMANDS = {"bench": cmd_bench}
