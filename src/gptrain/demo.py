"""`gptrain demo`: a one-minute tour of the parts on a built-in sonnet, with no files written."""

from __future__ import annotations

import math
import time

import torch

from gptrain.distributed.env import resolve_device
from gptrain.errors import UserError
from gptrain.model.generate import generate
from gptrain.model.gpt import GPT, ModelConfig
from gptrain.tokenizer import TokenizerConfig, build_tokenizer
from gptrain.train.optim import OptimConfig, build_optimizer

SONNET_18 = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance, or nature's changing course, untrimm'd;
But thy eternal summer shall not fade
Nor lose possession of that fair thou owest;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou growest;
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _show_tokens() -> None:
    _section("1. tokenizers: how text becomes ids")
    line = SONNET_18.splitlines()[0]
    kinds = [("char", TokenizerConfig(kind="char")), ("bpe (trained here, 300)", TokenizerConfig(vocab_size=300)),
             ("gpt2 (OpenAI's 50257)", TokenizerConfig(kind="gpt2"))]
    for label, cfg in kinds:
        try:
            tok = build_tokenizer(cfg, [SONNET_18 * 4])
        except UserError as e:
            print(f"{label:<24} unavailable: {e}")
            continue
        ids = tok.encode(line)
        pieces = [tok.decode([i]) for i in ids]
        print(f"{label:<24} {len(ids):>3} tokens: {'|'.join(pieces)}")
        print(f"{'':<24} ids {ids[:12]}{' ...' if len(ids) > 12 else ''}")


def _batches(ids: torch.Tensor, block: int, num: int, generator: torch.Generator):
    starts = torch.randint(0, len(ids) - block - 1, (num,), generator=generator)
    x = torch.stack([ids[s : s + block] for s in starts])
    y = torch.stack([ids[s + 1 : s + block + 1] for s in starts])
    return x, y


@torch.no_grad()
def _val_loss(model: GPT, val_ids: torch.Tensor, block: int) -> float:
    model.eval()
    windows = [val_ids[s : s + block + 1] for s in range(0, len(val_ids) - block - 1, block)]
    batch = torch.stack(windows)
    loss = model(batch[:, :-1], batch[:, 1:]).item()
    model.train()
    return loss


def run_demo(device: str = "cpu") -> int:
    started = time.perf_counter()
    device = resolve_device(device)
    torch.manual_seed(0)
    _show_tokens()

    _section("2. a tiny GPT-2 (pre-LN, GELU, learned positions, tied embeddings)")
    tok = build_tokenizer(TokenizerConfig(kind="char"), [SONNET_18])
    cfg = ModelConfig(n_embd=64, n_layer=2, n_head=4, block_size=32, vocab_size=tok.vocab_size, vocab_multiple=1)
    model = GPT(cfg).to(device)
    print(f"char vocab {tok.vocab_size}, n_embd {cfg.n_embd}, {cfg.n_layer} layers, {cfg.n_head} heads, "
          f"context {cfg.block_size}: {model.num_parameters():,} parameters")
    lines = SONNET_18.splitlines(keepends=True)
    train_ids = torch.tensor(tok.encode("".join(lines[:12])), device=device)
    val_ids = torch.tensor(tok.encode("".join(lines[12:])), device=device)

    _section("3. forward pass")
    g = torch.Generator(device="cpu").manual_seed(0)
    x, y = (t.to(device) for t in _batches(train_ids.cpu(), cfg.block_size, 8, g))
    logits = model(x)
    loss = model(x, y)
    print(f"input {tuple(x.shape)} -> logits {tuple(logits.shape)}; loss {loss.item():.3f} "
          f"(ln V = {math.log(tok.vocab_size):.3f}: an untrained model guesses uniformly)")

    _section("4. generation with random weights (top-k 10, temperature 1.0)")
    prompt = torch.tensor([tok.encode("Shall I")], device=device)
    print(repr(tok.decode(generate(model, prompt, 60, top_k=10, temperature=1.0, seed=0)[0].tolist())))

    _section("5. evaluation on held-out lines (the couplet)")
    before = _val_loss(model, val_ids, cfg.block_size)
    print(f"val loss {before:.3f}, perplexity {math.exp(before):.1f}")

    _section("6. training 150 steps of AdamW (fused) on the first twelve lines")
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.0), lr=2e-3)
    best = before
    for step in range(1, 151):
        x, y = (t.to(device) for t in _batches(train_ids.cpu(), cfg.block_size, 16, g))
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            val = _val_loss(model, val_ids, cfg.block_size)
            best = min(best, val)
            print(f"step {step:>3} | train loss {loss.item():.3f} | val loss {val:.3f}")
    print(f"val loss {before:.3f} -> best {best:.3f}. Twelve lines are a tiny corpus: once the model "
          "memorises them, val loss rises again (overfitting), which early stopping guards against.")
    print(repr(tok.decode(generate(model, prompt, 60, top_k=10, temperature=0.8, seed=0)[0].tolist())))
    print(f"\ndemo done in {time.perf_counter() - started:.1f}s. Next: `gptrain train` (Shakespeare, ~10 min on a CPU)")
    return 0
