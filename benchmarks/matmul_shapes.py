"""How fast can a training step's matmuls run, alone, at the model's shapes? The bound behind
`matmul_limit_fraction`.

`gptrain bench` divides the step's FLOP by the step time times the fp32 rate this machine measures for
large square matrices. A step's matmuls are not square: every linear layer multiplies B*T rows, which
at GPT-2 124M with B=4, T=64 is 256. This script times, in isolation and in the same run as the large
square ones (before and after), each matmul of one training step: for every linear layer its forward
(x W^T), grad_input (dY W) and grad_weight (dY^T X), in the layouts autograd hands them (transposed
views), on each kernel the trainer can pick (ATen's MKL, and oneDNN where the op exists), keeping the
faster, as the large-matrix rate does. The ratio it prints, isolated shape rate / large-matrix rate, is the
matmul_limit_fraction a step would reach if everything but its matmuls took no time at all.

    python benchmarks/matmul_shapes.py                               # GPT-2 124M, B=4, T=64
    python benchmarks/matmul_shapes.py --layers 4 --embd 128 --vocab 65 --batch-size 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptrain.metrics.throughput import matmul_kernels, measure_matmul_flops
from gptrain.model.cpu_linear import matmul_t
from gptrain.runtime import tune_malloc


def layer_shapes(embd: int, vocab: int) -> list[tuple[str, int, int, bool]]:
    """(name, in_features, out_features, whether every block has one) of each linear layer."""
    return [("qkv", embd, 3 * embd, True), ("attn proj", embd, embd, True), ("mlp fc", embd, 4 * embd, True),
            ("mlp proj", 4 * embd, embd, True), ("lm head", embd, vocab, False)]


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: kernel choice, packing buffers
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def time_linear(rows: int, fan_in: int, fan_out: int, repeats: int) -> dict[str, tuple[float, str]]:
    """Median seconds of the three matmuls of one linear layer, laid out as autograd hands them to
    cpu_linear, on the faster kernel of each (what the trainer's probe would pick), and that kernel."""
    x, weight, grad_y = torch.randn(rows, fan_in), torch.randn(fan_out, fan_in), torch.randn(rows, fan_out)
    operands = {"forward": (x, weight), "grad_input": (grad_y, weight.t()), "grad_weight": (grad_y.t(), x.t())}
    timed = {}
    for name, (a, b) in operands.items():
        seconds = {kernel: median_seconds(lambda a=a, b=b, kernel=kernel: matmul_t(a, b, kernel), repeats)
                   for kernel in matmul_kernels("cpu", "fp32")}
        fastest = min(seconds, key=seconds.get)
        timed[name] = seconds[fastest], fastest
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    tune_malloc()
    rows = args.batch_size * args.context
    rate_before = measure_matmul_flops("cpu", "fp32", 1.0, 64)
    total_seconds = total_flop = 0.0
    print(f"{args.layers}L {args.embd}w vocab {args.vocab}, {rows} rows, {torch.get_num_threads()} threads")
    for name, fan_in, fan_out, per_block in layer_shapes(args.embd, args.vocab):
        count = args.layers if per_block else 1
        flop = 2 * rows * fan_in * fan_out
        for matmul, (seconds, kernel) in time_linear(rows, fan_in, fan_out, args.repeats).items():
            total_seconds += count * seconds
            total_flop += count * flop
            print(f"  {name:<10} {matmul:<12} x{count:<3} {flop / seconds / 1e9:7.1f} GFLOP/s  {kernel}")
    rate_after = measure_matmul_flops("cpu", "fp32", 1.0, 64)
    large_rate = max(rate_before, rate_after)
    shape_rate = total_flop / total_seconds
    print(f"step matmuls alone: {total_seconds:.3f} s for {total_flop / 1e9:.3f} GFLOP "
          f"= {shape_rate / 1e9:.1f} GFLOP/s")
    print(f"large square matrices: {rate_before / 1e9:.1f} GFLOP/s before, {rate_after / 1e9:.1f} after")
    print(f"shape rate / large-matrix rate {shape_rate / large_rate:.3f}  (the highest matmul_limit_fraction "
          "a step of these shapes reaches with nothing but its matmuls)")


if __name__ == "__main__":
    main()
