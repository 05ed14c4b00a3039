import contextlib

import torch

from gptrain.data.loader import ShardLoader
from gptrain.model.gpt import GPT
from gptrain.train.optim import OptimConfig, build_optimizer
from gptrain.train.step import train_step


def _grads_after_step(model, loader, micro_steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}
    orig_zero = opt.zero_grad

    def capture(set_to_none=True):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        orig_zero(set_to_none=set_to_none)

    opt.zero_grad = capture
    result = train_step(model, opt, loader, num_micro_steps=micro_steps, lr=0.0, grad_clip=0.0, device="cpu",
                        autocast=contextlib.nullcontext())
    return result, captured


def test_accumulating_4x_b_equals_one_4b_batch(tiny_config, shard_dir):
    paths = sorted(shard_dir.glob("*_train_*.bin"))
    model = GPT(tiny_config)
    big = ShardLoader(paths, batch_size=8, block_size=16, seed=5)
    small = ShardLoader(paths, batch_size=2, block_size=16, seed=5)
    r_big, g_big = _grads_after_step(model, big, 1)
    r_small, g_small = _grads_after_step(model, small, 4)
    torch.testing.assert_close(r_small.loss, r_big.loss, rtol=1e-5, atol=1e-6)
    for name in g_big:
        torch.testing.assert_close(g_small[name], g_big[name], rtol=1e-4, atol=1e-6)


def test_weight_decay_only_on_matrices(tiny_model):
    opt = build_optimizer(tiny_model, OptimConfig(weight_decay=0.1), lr=1e-3)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(tiny_model.parameters()))
    assert opt.defaults.get("fused") is True  # fused AdamW on the CPU too


def test_non_finite_step_is_skipped(tiny_model, shard_dir):
    loader = ShardLoader(sorted(shard_dir.glob("*_train_*.bin")), batch_size=2, block_size=16)
    opt = build_optimizer(tiny_model, OptimConfig(), lr=1e-3)
    with torch.no_grad():
        tiny_model.transformer.ln_f.weight[0] = float("nan")
    before = tiny_model.transformer.wpe.weight.clone()
    result = train_step(tiny_model, opt, loader, num_micro_steps=1, lr=1e-3, grad_clip=1.0, device="cpu",
                        autocast=contextlib.nullcontext())
    assert not result.is_applied
    assert torch.equal(tiny_model.transformer.wpe.weight, before)


def test_loss_spike_above_the_limit_is_skipped(tiny_model, shard_dir):
    loader = ShardLoader(sorted(shard_dir.glob("*_train_*.bin")), batch_size=2, block_size=16)
    opt = build_optimizer(tiny_model, OptimConfig(), lr=1e-3)
    before = tiny_model.transformer.wpe.weight.clone()
    args = dict(num_micro_steps=1, lr=1e-3, grad_clip=1.0, device="cpu", autocast=contextlib.nullcontext())
    assert not train_step(tiny_model, opt, loader, max_loss=1.0, **args).is_applied  # ln(64) > 1: a "spike"
    assert torch.equal(tiny_model.transformer.wpe.weight, before)
    assert train_step(tiny_model, opt, loader, max_loss=100.0, **args).is_applied
    assert not torch.equal(tiny_model.transformer.wpe.weight, before)


def test_clipping_inside_fused_adamw_equals_clip_grad_norm(tiny_config):
    """The fused path (the clip handed to AdamW's kernel as grad_scale) gives clip_grad_norm_'s update and
    leaves the clipped gradients behind, within fp32 rounding; other optimizers clip the usual way."""
    import copy

    from gptrain.train.step import can_unscale_in_optimizer, clip_gradients, step_optimizer

    torch.manual_seed(0)
    model = GPT(tiny_config)
    twin = copy.deepcopy(model)
    x = torch.randint(0, tiny_config.vocab_size, (4, 16))
    results = []
    for m in (model, twin):
        opt = build_optimizer(m, OptimConfig(), lr=1e-3)
        (m(x, x) * 50).backward()  # a norm far above 1: the clip matters
        params = [p for p in m.parameters() if p.grad is not None]
        if m is model:
            assert can_unscale_in_optimizer(opt, params) == hasattr(torch.nn.utils, "get_total_norm")
            norm, unscale = clip_gradients(params, 1.0, opt)
            step_optimizer(opt, unscale)
            assert not hasattr(opt, "grad_scale")  # nothing left behind for the next step
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
        results.append((float(norm), [p.grad.clone() for p in params], [p.detach().clone() for p in m.parameters()]))
    (norm_a, grads_a, weights_a), (norm_b, grads_b, weights_b) = results
    assert norm_a > 10 and abs(norm_a - norm_b) <= 1e-4 * norm_b
    for a, b in zip(grads_a + weights_a, grads_b + weights_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not can_unscale_in_optimizer(sgd, [p for p in model.parameters() if p.grad is not None])


def test_gradient_norm_on_the_cpu_is_the_float64_norm_within_fp32_rounding():
    from gptrain.train.step import gradient_norm

    torch.manual_seed(0)
    grads = [torch.randn(3000, 700), torch.randn(64, 48).t(), torch.randn(5), torch.zeros(0)]  # one not contiguous
    exact = torch.linalg.vector_norm(torch.cat([g.double().reshape(-1) for g in grads]))
    norm = gradient_norm(grads)
    assert norm.dtype == torch.float32 and norm.dim() == 0
    assert abs(norm.double() - exact) <= 2e-5 * exact  # 1.05e-5 on a 2-core Zen 3 (MKL's AVX2 dot); torch's: 3.0e-5
    # torch's own way (clip_grad_norm_'s, as get_total_norm of torch >= 2.6 does): the norm of per-tensor norms
    torch_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert abs(norm.double() - torch_norm.double()) <= 1e-4 * exact
