"""Training-step time of gptrain vs the plain PyTorch reference (nanoGPT's model and step), same run.

The reference and the timing live in gptrain.bench (what `gptrain bench --compare reference` runs):
both models start from the same weights, see the same batches, and alternate steps so that load on
the machine hits both alike; forward, backward and optimizer are timed separately (medians). Any
shape: GPT-2 124M by default, or --layers/--embd/--heads/--vocab.

    python benchmarks/step_time.py                 # GPT-2 124M, B=4, T=64, fp32, CPU
    python benchmarks/step_time.py --steps 10 --batch-size 8 --context 128
    python benchmarks/step_time.py --layers 4 --embd 128 --heads 4 --vocab 65 --batch-size 12 --no-bias --steps 40
"""

from __future__ import annotations

import argparse

import torch

from gptrain.bench.run import BenchOptions, run_bench
from gptrain.cli_bench import format_result
from gptrain.model.gpt import ModelConfig
from gptrain.runtime import tune_malloc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--no-bias", dest="bias", action="store_false")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--no-tune-malloc", action="store_true", help="leave glibc malloc as it is")
    args = parser.parse_args()
    if not args.no_tune_malloc:
        tune_malloc()  # process-wide: it speeds up the reference as much as gptrain
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ModelConfig(n_embd=args.embd, n_layer=args.layers, n_head=args.heads, block_size=args.context,
                        vocab_size=args.vocab, bias=args.bias)
    opts = BenchOptions(model=model, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                        compare="reference")
    result = run_bench(opts)
    print(format_result(result))
    losses = result["first_step_loss"]
    print(f"first-step loss: reference {losses['reference']:.5f}, gptrain {losses['gptrain']:.5f} "
          "(same weights and batch)")


if __name__ == "__main__":
    main()
