"""The plain PyTorch GPT-2 that gptrain is measured against: what nanoGPT and most tutorials write.

Eager nn.Linear / nn.LayerNorm, F.scaled_dot_product_attention, tanh GELU, tied embeddings, no vocab
padding, torch.optim.AdamW with its defaults (foreach on CPU), and nanoGPT's training step: forward,
backward, clip the global norm at 1.0, step, zero the gradients, read the loss (``loss.item()``).
Any shape: it takes gptrain's ModelConfig, so both models can start from the same weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptrain.model.gpt import GPT, ModelConfig


class RefBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, bias = cfg.n_embd, cfg.bias
        self.n_head = cfg.n_head
        # Defined in the order of gptrain's parameters, so weights can be copied one to one.
        self.ln_1 = nn.LayerNorm(d, bias=bias)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d, bias=bias), nn.Linear(d, d, bias=bias)
        self.ln_2 = nn.LayerNorm(d, bias=bias)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=bias), nn.Linear(4 * d, d, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class RefGPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.n_embd), nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(RefBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def reference_like(model: GPT) -> RefGPT:
    """A reference model of the same shape holding the same weights (gptrain's padded vocab rows dropped)."""
    ref = RefGPT(model.config).to(model.lm_head.weight.device)
    with torch.no_grad():
        for src, dst in zip(model.parameters(), ref.parameters(), strict=True):
            assert src.shape[1:] == dst.shape[1:], (src.shape, dst.shape)
            dst.copy_(src[: dst.shape[0]])
    return ref

