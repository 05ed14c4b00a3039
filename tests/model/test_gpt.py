import math

import pytest
import torch

from gptrain.errors import UserError
from gptrain.model.gpt import GPT, KVCache, ModelConfig, count_parameters


def test_logits_shape_and_vocab_cut(tiny_config):
    cfg = ModelConfig(**{**tiny_config.__dict__, "vocab_size": 50, "vocab_multiple": 64})
    model = GPT(cfg)
    assert model.transformer.wte.weight.shape[0] == 64
    logits = model(torch.randint(0, 50, (3, 10)))
    assert logits.shape == (3, 10, 50)


def test_initial_loss_is_about_ln_vocab(tiny_model):
    x = torch.randint(0, 64, (8, 16))
    loss = tiny_model(x, torch.randint(0, 64, (8, 16)))
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(64)) < 0.15


def test_causality_no_gradient_from_future_tokens(tiny_model):
    tiny_model.eval()
    x = torch.randint(0, 64, (1, 16))
    emb = tiny_model.transformer.wte(x).detach().requires_grad_(True)
    # Run the blocks on embeddings directly, so the gradient w.r.t. each position is visible.
    h = emb + tiny_model.transformer.wpe(torch.arange(16))
    for block in tiny_model.transformer.h:
        h = block(h)
    out = tiny_model.lm_head(tiny_model.transformer.ln_f(h))
    t = 7
    out[0, t].sum().backward()
    grad_per_pos = emb.grad[0].abs().sum(dim=-1)
    assert torch.all(grad_per_pos[t + 1 :] == 0)
    assert torch.all(grad_per_pos[: t + 1] > 0)


def test_overfits_one_batch(tiny_model):
    x = torch.randint(0, 64, (4, 16))
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = tiny_model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.1


def test_tied_weights_and_parameter_count(tiny_config):
    model = GPT(tiny_config)
    assert model.lm_head.weight is model.transformer.wte.weight
    actual = sum(p.numel() for p in model.parameters())
    assert actual == count_parameters(tiny_config)
    untied = GPT(ModelConfig(**{**tiny_config.__dict__, "tie_weights": False}))
    assert sum(p.numel() for p in untied.parameters()) == count_parameters(untied.config)


def test_gpt2_124m_parameter_count():
    cfg = ModelConfig(n_embd=768, n_layer=12, n_head=12, block_size=1024, vocab_size=50257)
    assert count_parameters(cfg) == 124_439_808  # the published GPT-2 small count


def test_kv_cache_matches_full_forward(tiny_model):
    tiny_model.eval()
    x = torch.randint(0, 64, (2, 12))
    full = tiny_model(x)
    cache = KVCache(tiny_model.config.n_layer)
    prefill = tiny_model(x[:, :8], cache=cache)
    steps = [tiny_model(x[:, t : t + 1], cache=cache) for t in range(8, 12)]
    torch.testing.assert_close(prefill, full[:, :8], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 8:], rtol=1e-5, atol=1e-5)


def test_invalid_sizes_are_user_errors():
    with pytest.raises(UserError, match="not divisible"):
        ModelConfig(n_embd=100, n_head=3)
    with pytest.raises(UserError, match="at least 1"):
        ModelConfig(n_layer=0)
