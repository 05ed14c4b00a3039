"""GPT-2 124M training-step time: gptrain vs a plain PyTorch reference, measured in the same run.

The reference is GPT-2 the way nanoGPT and most tutorials write it: eager nn.Linear / nn.LayerNorm,
F.scaled_dot_product_attention, tied embeddings, torch.optim.AdamW with its defaults. Both models
start from the same weights and see the same batches; steps alternate between them so that load
on the machine hits both alike. Forward, backward and optimizer are timed separately (medians).

    python benchmarks/step_time.py                 # B=4, T=64, fp32, CPU
    python benchmarks/step_time.py --steps 10 --batch-size 8 --context 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptrain.model.gpt import GPT, ModelConfig
from gptrain.runtime import tune_malloc
from gptrain.train.optim import OptimConfig, build_optimizer

N_EMBD, N_LAYER, N_HEAD, VOCAB, CONTEXT = 768, 12, 12, 50257, 1024


class RefBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Defined in the order of gptrain's parameters, so weights can be copied one to one.
        self.ln_1 = nn.LayerNorm(N_EMBD)
        self.c_attn, self.attn_proj = nn.Linear(N_EMBD, 3 * N_EMBD), nn.Linear(N_EMBD, N_EMBD)
        self.ln_2 = nn.LayerNorm(N_EMBD)
        self.c_fc, self.mlp_proj = nn.Linear(N_EMBD, 4 * N_EMBD), nn.Linear(4 * N_EMBD, N_EMBD)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, N_EMBD), nn.Embedding(CONTEXT, N_EMBD)
        self.h = nn.ModuleList(RefBlock() for _ in range(N_LAYER))
        self.ln_f = nn.LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def copy_weights(model: GPT, ref: RefGPT) -> None:
    """Give the reference gptrain's GPT-2 initialisation (gptrain's padded vocab rows are dropped)."""
    with torch.no_grad():
        for src, dst in zip(model.parameters(), ref.parameters(), strict=True):
            assert src.shape[1:] == dst.shape[1:], (src.shape, dst.shape)
            dst.copy_(src[: dst.shape[0]])


def timed_step(model, optimizer, x, y, times: list) -> float:
    t0 = time.perf_counter()
    loss = model(x, y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    times.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    parser.add_argument("--no-tune-malloc", action="store_true", help="leave glibc malloc as it is")
    args = parser.parse_args()
    if not args.no_tune_malloc:
        tune_malloc()  # process-wide: it speeds up the reference as much as gptrain
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = RefGPT()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=6e-4)
    model = GPT(ModelConfig(n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD, block_size=CONTEXT, vocab_size=VOCAB))
    copy_weights(model, ref)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.01, beta2=0.999), lr=6e-4)
    g = torch.Generator().manual_seed(42)
    batches = [torch.randint(0, VOCAB, (args.batch_size, args.context + 1), generator=g) for _ in range(4)]
    runs = {"reference": (ref, ref_opt, [], []), "gptrain": (model, opt, [], [])}
    print(f"GPT-2 124M, B={args.batch_size}, T={args.context}, fp32, CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {args.warmup} warmup + {args.steps} timed steps each, alternating")
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        for model_, optimizer, times, losses in runs.values():
            x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
            losses.append(timed_step(model_, optimizer, x, y, times))
    print(f"\n{'':10} {'forward':>8} {'backward':>9} {'optimizer':>10} {'step':>8}   (median seconds)")
    medians = {}
    for name, (_, _, times, _) in runs.items():
        med = [statistics.median(t[i] for t in times[args.warmup:]) for i in range(4)]
        medians[name] = med
        print(f"{name:10} {med[0]:8.3f} {med[1]:9.3f} {med[2]:10.3f} {med[3]:8.3f}")
    ref_med, our_med = medians["reference"], medians["gptrain"]
    print(f"{'ratio':10} {our_med[0] / ref_med[0]:8.2f} {our_med[1] / ref_med[1]:9.2f} "
          f"{our_med[2] / ref_med[2]:10.2f} {our_med[3] / ref_med[3]:8.2f}   (gptrain / reference; lower is faster)")
    drift = max(abs(a - b) for a, b in zip(runs["reference"][3], runs["gptrain"][3], strict=True))
    print(f"first-step loss: reference {runs['reference'][3][0]:.5f}, gptrain {runs['gptrain'][3][0]:.5f}; "
          f"largest loss difference over the run {drift:.1e} (gptrain decays only 2-D weights, so they drift)")


if __name__ == "__main__":
    main()
