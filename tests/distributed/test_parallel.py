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
