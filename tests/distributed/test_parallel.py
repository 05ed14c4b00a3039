"""parallel.py in one process: activation checkpointing, strategy choice, the single-process sync context."""

import contextlib

import pytest
import torch

from gptrain.distributed import parallel
from gptrain.distributed.parallel import ParallelConfig, apply_activation_checkpointing, gradient_sync, resolve_strategy
from gptrain.errors import UserError
from gptrain.model.gpt import GPT


@pytest.fixture
def model_pair(tiny_config):
    """The same tiny GPT twice (dropout 0), the second with activation checkpointing."""
    plain = GPT(tiny_config)
    checkpointed = GPT(tiny_config)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed.transformer.h)
    return plain, checkpointed


def count_saved_tensors(fn) -> int:
    """How many tensors autograd keeps for backward while fn runs (checkpointed blocks keep their inputs only)."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


def test_checkpointing_keeps_loss_and_gradients(model_pair, tiny_config):
    plain, checkpointed = model_pair
    idx_BT = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size))
    targets_BT = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size))
    losses = []
    for model in model_pair:
        loss = model(idx_BT, targets_BT)
        loss.backward()
        losses.append(loss)
    # Exact: the recomputation runs the same fp32 CPU kernels on the same inputs.
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    grads = {name: p.grad for name, p in plain.named_parameters()}
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=0, atol=0, msg=f"gradient of {name}")


def test_checkpointing_recomputes_in_backward(model_pair, tiny_config):
    plain, checkpointed = model_pair
    idx_BT = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size))
    num_plain = count_saved_tensors(lambda: plain(idx_BT, idx_BT))
    num_checkpointed = count_saved_tensors(lambda: checkpointed(idx_BT, idx_BT))
    assert num_checkpointed < num_plain


def test_checkpointing_keeps_state_dict_keys(model_pair):
    plain, checkpointed = model_pair
    assert list(checkpointed.state_dict()) == list(plain.state_dict())


def test_checkpointing_is_off_without_grad(model_pair, tiny_config, monkeypatch):
    """Evaluation and sampling bypass torch's checkpoint, so the KV cache fills once per token."""
    plain, checkpointed = model_pair
    calls = []
    original = parallel.checkpoint
    monkeypatch.setattr(parallel, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    idx_BT = torch.randint(0, tiny_config.vocab_size, (2, 3))
    expected = plain.generate(idx_BT, 10, is_greedy=True)
    got = checkpointed.generate(idx_BT, 10, is_greedy=True)
    assert calls == []
    assert torch.equal(got, expected)
    assert got.shape == (2, 13)
    checkpointed(idx_BT, idx_BT).backward()  # with gradients, every block goes through checkpoint
    assert len(calls) == tiny_config.n_layer


def test_resolve_strategy():
    assert resolve_strategy(ParallelConfig(), 1) == "none"
    assert resolve_strategy(ParallelConfig(strategy="zero1"), 1) == "none"  # nothing to shard in one process
    assert resolve_strategy(ParallelConfig(), 2) == "ddp"
    assert resolve_strategy(ParallelConfig(strategy="fsdp"), 2) == "fsdp"
    assert resolve_strategy(ParallelConfig(strategy="zero1"), 8) == "zero1"


def test_unknown_strategy_is_a_user_error():
    with pytest.raises(UserError, match="parallel.strategy"):
        ParallelConfig(strategy="bogus")


def test_single_process_sync_is_a_no_op(tiny_model):
    ctx = gradient_sync(tiny_model, "none", ParallelConfig(), is_last=False)
    assert isinstance(ctx, contextlib.nullcontext)
    with ctx:
        tiny_model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in tiny_model.parameters())


@pytest.mark.parametrize("version, device, can_run", [("2.5.1", "cpu", False), ("2.4.1+cu121", "cpu", False),
                                                      ("2.6.0", "cpu", True), ("2.13.0+cpu", "cpu", True),
                                                      ("2.5.1", "cuda", True), ("2.5.1", "cuda:1", True)])
def test_fsdp_on_the_cpu_is_refused_before_torch_2_6_with_a_clear_error(monkeypatch, version, device, can_run):
    """Before 2.6 FSDP2 makes CUDA streams whatever the device: on the CPU it would crash in its first
    forward (seen on 2.4.1 and 2.5.1). The run is refused before anything is written, and
    check-equivalence leaves its fsdp rows out."""
    from gptrain.equivalence import build_cases

    monkeypatch.setattr(torch, "__version__", version)
    assert parallel.can_fsdp_run_on(device) is can_run
    strategies = {case.strategy for case in build_cases(2, "aot_eager", device)}
    assert ("fsdp" in strategies) is can_run and {"ddp", "zero1"} <= strategies
    parallel.check_strategy_supported("ddp", device)  # the others run anywhere
    if can_run:
        parallel.check_strategy_supported("fsdp", device)
    else:
        with pytest.raises(UserError, match=r"fsdp on the CPU needs torch >= 2\.6 .*use --parallel ddp or zero1"):
            parallel.check_strategy_supported("fsdp", device)
