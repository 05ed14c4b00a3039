"""GPT-2: pre-LN blocks, tanh GELU, learned positions, tied embeddings. Single-device code, HF names.

Dims: B batch, T sequence, N rows (B * T), D width (n_embd), H heads, K head size, V vocab, P padded vocab
(embedding rows), S context (block_size), C cache length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from gptrain.errors import UserError
from gptrain.model import cpu_attention, cpu_gelu
from gptrain.model.chunked_loss import chunked_linear_cross_entropy, default_chunk_rows, should_chunk
from gptrain.model.cpu_linear import Linear

AUTO_VOCAB_MULTIPLE = 64  # model.vocab_multiple=0 pads to this where it adds at most 1/16 of the rows


@dataclass(kw_only=True)
class ModelConfig:
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 6
    block_size: int = 128  # context length in tokens
    vocab_size: int = 0  # 0: taken from the tokenizer
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    # embedding rows padded to a multiple of this (matmul speed), the extra logits never used; 0: auto, 64
    # where that adds at most 1/16 of the rows (GPT-2's 50257 -> 50304), none otherwise (see padded_vocab_size)
    vocab_multiple: int = 0

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "block_size"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} must be at least 1 (got {getattr(self, name)})")
        if self.vocab_multiple < 0:
            raise UserError(f"model.vocab_multiple must be 0 (auto) or at least 1 (got {self.vocab_multiple})")
        if self.n_embd % self.n_head:
            raise UserError(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                "pick sizes where n_embd is a multiple of n_head"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1) (got {self.dropout})")

    @property
    def resolved_vocab_multiple(self) -> int:
        """vocab_multiple, with auto (0) decided for this vocab_size: padding a small vocabulary to 64 would
        add more head work than the aligned matmul saves (char level, 65 -> 128 rows: the 4-layer width-128
        step 3% slower on 2 Xeon cores, compiled, alternating A/B; 65 -> 72 1.1-1.4% slower)."""
        if self.vocab_multiple:
            return self.vocab_multiple
        added = -self.vocab_size % AUTO_VOCAB_MULTIPLE
        return AUTO_VOCAB_MULTIPLE if added * 16 <= self.vocab_size else 1

    @property
    def padded_vocab_size(self) -> int:
        m = self.resolved_vocab_multiple
        return (self.vocab_size + m - 1) // m * m



def count_parameters(cfg: ModelConfig, *, non_embedding: bool = False) -> int:
    """Parameter count from the config alone (tied head counted once; padding rows not counted)."""
    d, layers = cfg.n_embd, cfg.n_layer
    bias = 1 if cfg.bias else 0
    ln = 2 * d if cfg.bias else d
    per_block = 2 * ln + (3 * d * d + 3 * d * bias) + (d * d + d * bias)
    per_block += (4 * d * d + 4 * d * bias) + (4 * d * d + d * bias)
    body = layers * per_block + ln
    if non_embedding:
        return body
    head = 0 if cfg.tie_weights else cfg.vocab_size * d
    return body + cfg.vocab_size * d + cfg.block_size * d + head


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1 on all paths)."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of every layer for incremental decoding; grows to the model's context."""

    def __init__(self, n_layer: int) -> None:
        self.k_BHCK: list[Tensor | None] = [None] * n_layer
        self.v_BHCK: list[Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        k = self.k_BHCK[0]
        return 0 if k is None else k.size(2)

    def update(self, layer: int, k_BHTK: Tensor, v_BHTK: Tensor) -> tuple[Tensor, Tensor]:
        if self.k_BHCK[layer] is not None:
            k_BHTK = torch.cat([self.k_BHCK[layer], k_BHTK], dim=2)
            v_BHTK = torch.cat([self.v_BHCK[layer], v_BHTK], dim=2)
        self.k_BHCK[layer], self.v_BHCK[layer] = k_BHTK, v_BHTK
        return k_BHTK, v_BHTK


class CausalSelfAttention(nn.Module):
    attention_kernel = "sdpa"  # or "gptrain": model/cpu_attention.py where it applies (set_attention_kernel)

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.layer, self.dropout = cfg.n_head, layer, cfg.dropout
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: Tensor, cache: KVCache | None = None) -> Tensor:
        B, T, D = x_BTD.shape
        H = self.n_head
        qkv_BT3D = self.c_attn(x_BTD)
        if (self.attention_kernel == "gptrain" and cache is None and not (self.training and self.dropout > 0)
                and cpu_attention.supports(qkv_BT3D, H)):
            return self.resid_dropout(self.c_proj(cpu_attention.causal_attention(qkv_BT3D, H)))
        q_BTD, k_BTD, v_BTD = qkv_BT3D.split(D, dim=2)
        q_BHTK = q_BTD.view(B, T, H, D // H).transpose(1, 2)
        k_BHTK = k_BTD.view(B, T, H, D // H).transpose(1, 2)
        v_BHTK = v_BTD.view(B, T, H, D // H).transpose(1, 2)
        is_causal = True
        if cache is not None:
            if T > 1 and cache.k_BHCK[self.layer] is not None:
                raise ValueError("a KV cache is extended one token at a time after the prefill")
            k_BHTK, v_BHTK = cache.update(self.layer, k_BHTK, v_BHTK)
            # One new token attends to every cached key; a prefill is an ordinary causal pass.
            is_causal = T > 1
        dropout = self.dropout if self.training else 0.0
        y_BHTK = attention(q_BHTK, k_BHTK, v_BHTK, dropout, is_causal)
        y_BTD = y_BHTK.transpose(1, 2).contiguous().view(B, T, D)
        return self.resid_dropout(self.c_proj(y_BTD))


def attention(q_BHTK: Tensor, k_BHTK: Tensor, v_BHTK: Tensor, dropout: float, is_causal: bool) -> Tensor:
    """Scaled dot-product attention; in fp32 under CPU bf16 autocast, whose bf16 flash attention backward
    is slow (4 layers, width 192, B=32, T=128 on 2 Xeon cores: the four layers' attention backward took
    196 ms a step in bf16, 39 ms in fp32)."""
    if q_BHTK.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            y_BHTK = F.scaled_dot_product_attention(q_BHTK.float(), k_BHTK.float(), v_BHTK.float(),
                                                    dropout_p=dropout, is_causal=is_causal)
        return y_BHTK
    return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, dropout_p=dropout, is_causal=is_causal)


_GELU_2C = 2 * math.sqrt(2 / math.pi)  # tanh GELU's sqrt(2/pi), doubled for the sigmoid form
_GELU_2CA = _GELU_2C * 0.044715


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3).

    Compiled for the CPU it is written x * sigmoid(2u), the same function (0.5 (1 + tanh u) =
    sigmoid(2u)) within fp32 rounding: inductor's C++ tanh is a slow polynomial while its exp is fast,
    so this form makes the fused kernels about twice as fast (forward + backward at 768 x 512 on 2
    Xeon cores: 0.93 -> 0.50 ms). Eager keeps ATen's fused gelu, which beats any composition of ops.
    """
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        return gelu_tanh_by_sigmoid(x)
    return F.gelu(x, approximate="tanh")


def gelu_tanh_by_sigmoid(x: Tensor) -> Tensor:
    return _GeluBySigmoid.apply(x)


class _GeluBySigmoid(torch.autograd.Function):
    """x * sigmoid(z), z = 2u, with the backward computed from the saved sigmoid: no second exp and
    division per element (4 layers, width 128, B=12, T=64 compiled on 2 Xeon cores: the step 3%
    faster, alternating A/B over 300 steps, twice). The partitioner may keep one more activation per MLP."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        # In fp32 whatever x is (bf16 under autocast): a bf16 sigmoid rounds to 1 from x ~ 2.5 on, which
        # would drop the s * (1 - s) term of the gradient. For fp32 x .float() is x: the same graph.
        x32 = x.float()
        s = torch.sigmoid(x32 * (_GELU_2C + _GELU_2CA * x32 * x32))
        ctx.save_for_backward(x, s)
        y = x32 * s
        # No .to() when it would return y itself: torch 2.11's dynamo then routes this output's
        # gradient to the wrong slot, silently (pytorch/pytorch#180642; compiled GELU grads off by up to 1.1).
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        x, s = ctx.saved_tensors
        x32 = x.float()
        slope = s + x32 * s * (1 - s) * (_GELU_2C + 3 * _GELU_2CA * x32 * x32)  # d/dx of x * sigmoid(z(x))
        return (grad.float() * slope).to(grad.dtype)


class MLP(nn.Module):
    gelu_kernel = "aten"  # or "gptrain": model/cpu_gelu.py where it applies (set_gelu_kernel)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTD: Tensor) -> Tensor:
        h_BTF = self.c_fc(x_BTD)
        if self.gelu_kernel == "gptrain" and cpu_gelu.supports(h_BTF):
            return self.dropout(self.c_proj(cpu_gelu.gelu(h_BTF)))
        return self.dropout(self.c_proj(gelu_tanh(h_BTF)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x_BTD: Tensor, cache: KVCache | None = None) -> Tensor:
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), cache)
        return x_BTD + self.mlp(self.ln_2(x_BTD))


class _EmbeddingGradInPlace(torch.autograd.Function):
    """wte(idx) + wpe(pos), whose backward adds the token rows straight into wte.weight.grad.

    The token weight comes in detached, so the lookup adds no edge to that weight's AccumulateGrad node:
    the tied head's gradient (a full (V, D) matmul result) becomes .grad on its own, early in backward,
    and this backward, the last, adds B*T rows to it. Autograd's way builds a zero (V, D) tensor, adds the
    rows, then adds the two (V, D) gradients: 35 ms of a 0.87 s step for GPT-2 124M at B=4, T=64 on 2 CPU
    cores. Whichever comes first, the sum is the same up to fp32 rounding. The position weight is an
    ordinary input (its gradient is returned): it keeps this node in the graph. One process only: DDP's
    hooks fire on AccumulateGrad, before this adds. Only for loss.backward(): torch.autograd.grad would
    not see these rows (they go to .grad), so evaluation and tests that take gradients that way use "dense".
    """

    @staticmethod
    def forward(ctx, idx_BT: Tensor, pos_T: Tensor, wte_PD: Tensor, wpe_SD: Tensor, wte: nn.Embedding) -> Tensor:
        ctx.save_for_backward(idx_BT, pos_T)
        ctx.wte, ctx.wpe_shape = wte, wpe_SD.shape
        return F.embedding(idx_BT, wte_PD) + F.embedding(pos_T, wpe_SD)

    @staticmethod
    def backward(ctx, grad_BTD: Tensor):
        idx_BT, pos_T = ctx.saved_tensors
        weight = ctx.wte.weight
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        weight.grad.index_add_(0, idx_BT.reshape(-1), grad_BTD.reshape(-1, grad_BTD.size(-1)).to(weight.dtype))
        grad_wpe = None
        if ctx.needs_input_grad[3]:  # what autograd does: the batch summed, then the rows placed
            grad_wpe = grad_BTD.new_zeros(ctx.wpe_shape).index_add_(0, pos_T, grad_BTD.sum(0))
        return None, None, None, grad_wpe, None


class GPT(nn.Module):
    # "in_place": training adds the token embedding's gradient rows straight into wte.weight.grad
    # (_EmbeddingGradInPlace; the trainer's fast paths choose it for one-process eager CPU runs).
    embedding_grad: str = "dense"

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size < 1:
            raise UserError("model.vocab_size is not set: it comes from the tokenizer")
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=LayerNorm(cfg.n_embd, cfg.bias),
            )
        )
        self.lm_head = Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream stays O(1).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = False) -> int:
        return count_parameters(self.config, non_embedding=non_embedding)

    def forward(
        self, idx_BT: Tensor, targets_BT: Tensor | None = None, cache: KVCache | None = None, *,
        reduction: str = "mean",
    ) -> Tensor:
        """Logits (B, T, V) without targets; with them the mean cross-entropy (a scalar), or with
        reduction="none" each target's negative log-likelihood (B, T) for evaluation (no gradient)."""
        B, T = idx_BT.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context {self.config.block_size}")
        pos_T = torch.arange(start, start + T, device=idx_BT.device)
        x_BTD = self.transformer.drop(self.embed(idx_BT, pos_T))
        for block in self.transformer.h:
            x_BTD = block(x_BTD, cache)
        x_BTD = self.transformer.ln_f(x_BTD)
        if targets_BT is None:
            return self.lm_head(x_BTD)[..., : self.config.vocab_size]
        if reduction == "none":
            return self.token_losses(x_BTD, targets_BT)
        return self.loss(x_BTD, targets_BT)

    def embed(self, idx_BT: Tensor, pos_T: Tensor) -> Tensor:
        """Token plus position embeddings."""
        wte, wpe = self.transformer.wte, self.transformer.wpe
        is_in_place = (self.embedding_grad == "in_place" and torch.is_grad_enabled() and wte.weight.requires_grad
                       and wpe.weight.requires_grad and not torch.compiler.is_compiling())
        if is_in_place:
            return _EmbeddingGradInPlace.apply(idx_BT, pos_T, wte.weight.detach(), wpe.weight, wte)
        return wte(idx_BT) + wpe(pos_T)

    @torch.no_grad()
    def token_losses(self, x_BTD: Tensor, targets_BT: Tensor) -> Tensor:
        """Each target's loss in nats (0 where the target is -1), in row chunks: no (B*T, V) logits."""
        x_ND, targets_N = x_BTD.reshape(-1, x_BTD.size(-1)), targets_BT.reshape(-1)
        rows = default_chunk_rows(self.lm_head.weight.size(0))
        parts = [F.cross_entropy(self.lm_head(x_ND[i : i + rows])[:, : self.config.vocab_size].float(),
                                 targets_N[i : i + rows], ignore_index=-1, reduction="none")
                 for i in range(0, x_ND.size(0), rows)]
        return torch.cat(parts).view_as(targets_BT)

    def loss(self, x_BTD: Tensor, targets_BT: Tensor) -> Tensor:
        """Cross-entropy of the head on final hidden states; padded vocab rows never get probability."""
        x_ND, targets_N = x_BTD.reshape(-1, x_BTD.size(-1)), targets_BT.reshape(-1)
        V = self.config.vocab_size
        if should_chunk(x_ND, self.lm_head.weight):
            # Never holds the (N, V) logits: several GB at GPT-2 scale (see chunked_loss.py).
            return chunked_linear_cross_entropy(x_ND, self.lm_head.weight, targets_N, V)
        logits_NP = self.lm_head(x_ND)
        if V < logits_NP.size(1):
            # -inf on the padded columns instead of slicing them off: the same softmax (exp(-inf) = 0) and
            # gradient, without copying the strided (N, V) slice out and a zero (N, P) tensor back in
            # backward (GPT-2 124M at B=4, T=64 on 2 CPU cores: loss forward + backward 35 -> 26 ms).
            # (Targets are token ids below V; a softmax that sums log-probabilities, as label smoothing
            # would, must leave the -inf columns out.)
            padding_P = logits_NP.new_zeros(logits_NP.size(1))
            padding_P[V:] = float("-inf")
            logits_NP = logits_NP + padding_P
        return F.cross_entropy(logits_NP.float(), targets_N, ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx_BT: Tensor, max_new_tokens: int, **sampling) -> Tensor:
        """Extend idx_BT by max_new_tokens sampled tokens (see gptrain.model.generate for options)."""
        from gptrain.model.generate import generate

        return generate(self, idx_BT.to(self.lm_head.weight.device), max_new_tokens, **sampling)
