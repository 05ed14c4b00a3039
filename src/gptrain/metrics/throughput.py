"""Model FLOPs per token and MFU (model FLOPs utilisation) against the device's peak."""

from __future__ import annotations

import torch

from gptrain.model.gpt import ModelConfig, count_parameters

# Dense bf16 peak FLOP/s of common accelerators (no sparsity), matched by name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 6 per non-embedding parameter plus attention (PaLM appendix B)."""
    head_flops = 6 * cfg.n_embd * cfg.vocab_size
    attention = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    return 6 * count_parameters(cfg, non_embedding=True) + head_flops + attention


def peak_flops(device: str) -> float | None:
    """Peak FLOP/s of a known CUDA device (bf16), None elsewhere (MFU is then not reported)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def estimate_mfu(cfg: ModelConfig, tokens_per_second: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_token(cfg) * tokens_per_second / peak
