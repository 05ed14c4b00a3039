import itertools

import pytest
import torch
import torch.nn.functional as F

from gptrain.errors import UserError
from gptrain.model import cpu_linear
from gptrain.model.cpu_linear import KERNELS, LinearPlan

ALL_PLANS = [LinearPlan(*kernels) for kernels in itertools.product(KERNELS, repeat=3)]


@pytest.mark.parametrize("plan", ALL_PLANS, ids=lambda p: p.to_text())
@pytest.mark.parametrize("has_bias", [True, False])
def test_every_plan_matches_f_linear_values_and_gradients(plan, has_bias):
    # Whichever kernel each pass takes (oneDNN, or F.linear where the op is missing), results must agree.
    x = torch.randn(3, 7, 48, requires_grad=True)
    w = torch.randn(80, 48, requires_grad=True)
    b = torch.randn(80, requires_grad=True) if has_bias else None
    out = cpu_linear.linear(x, w, b, plan)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, w] + ([b] if has_bias else []), grad)
    want = torch.autograd.grad(ref, [x, w] + ([b] if has_bias else []), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "aten"])
def test_grad_weights_transposed_operand_is_copied_exactly(monkeypatch, use_kernel):
    # oneDNN's grad_weight takes dY^T contiguous: gptrain's transpose kernel where it is built, else ATen's copy.
    from gptrain.model import cpu_kernels

    if use_kernel and cpu_kernels.library()[0] is None:
        pytest.skip(f"gptrain's CPU kernels are not built here: {cpu_kernels.library()[1]}")
    calls = []

    class Spy:  # the library, counting the transposes it runs
        def gptrain_transpose(self, *args):
            calls.append(args[2:4])
            cpu_kernels.library()[0].gptrain_transpose(*args)

    monkeypatch.setattr(cpu_linear, "library", lambda: (Spy(), "spy") if use_kernel else (None, "off"))
    for rows, cols in [(768, 512), (21, 80), (8, 8), (9, 17), (1, 5), (40, 65), (3, 1)]:
        g = torch.randn(rows, cols)
        got = cpu_linear.contiguous(g.t())
        assert got.is_contiguous() and got.shape == (cols, rows)
        assert torch.equal(got, g.t())
    # (1, 5)^T and (3, 1)^T are contiguous already: no copy
    assert calls == ([(768, 512), (21, 80), (8, 8), (9, 17), (40, 65)] if use_kernel else [])
    assert cpu_linear.contiguous(g) is g
    sliced = torch.randn(40, 66)[:, 1:]  # a transpose of a strided matrix: ATen's copy
    assert torch.equal(cpu_linear.contiguous(sliced.t()), sliced.t()) and len(calls) == (5 if use_kernel else 0)


def test_plan_text_round_trips_and_bad_text_is_a_user_error():
    for plan in ALL_PLANS:
        assert LinearPlan.parse(plan.to_text()) == plan
    assert LinearPlan.parse("onednn") == LinearPlan("onednn", "onednn", "onednn")
    assert LinearPlan.parse("forward=onednn") == LinearPlan(forward="onednn")
    for bad, message in (("backward=onednn", "is not PASS=KERNEL"), ("", "is not PASS=KERNEL"),
                         ("forward=onednn,forward=aten", "is given twice"), ("forward=mkl", "must be one of onednn")):
        with pytest.raises(UserError, match=message) as raised:
            LinearPlan.parse(bad)
        assert str(raised.value).startswith("train.cpu_linear:")


def test_falls_back_to_f_linear_off_fp32():
    x = torch.randn(2, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    assert not cpu_linear.is_onednn_usable(x, w)
    torch.testing.assert_close(cpu_linear.linear(x, w, plan=LinearPlan.parse("onednn")), F.linear(x, w))


def test_linear_module_keeps_nn_linear_state_dict_and_takes_a_plan():
    model = torch.nn.Sequential(cpu_linear.Linear(8, 4), torch.nn.ReLU(), cpu_linear.Linear(4, 2))
    assert set(model[0].state_dict()) == {"weight", "bias"}
    plan = LinearPlan(grad_weight="onednn")
    cpu_linear.set_linear_plan(model, plan)
    assert model[0].plan == plan and model[2].plan == plan


def test_onednn_path_is_active_on_x86_linux():
    import platform
    import sys

    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        assert cpu_linear.is_onednn_usable(torch.zeros(2, 2), torch.zeros(2, 2))
    assert not cpu_linear.is_onednn_usable(torch.zeros(2, 2, dtype=torch.float16), torch.zeros(2, 2))



@pytest.mark.parametrize("plan, num_onednn_calls", [
    (LinearPlan(forward="onednn", grad_input="onednn", grad_weight="aten"), 3),
    (LinearPlan(forward="onednn", grad_input="onednn_copy", grad_weight="onednn_copy"), 5),
], ids=["grad_weight-aten", "backward-onednn_copy"])
def test_a_compiled_model_keeps_its_plan_and_eager_values_and_gradients(plan, num_onednn_calls):
    # Compiled graphs call oneDNN through gptrain::onednn_linear (inductor cannot lower the mkldnn op for a
    # trained weight); aot_eager captures the same graph without generating code.
    from torch.profiler import profile

    torch.manual_seed(0)
    model = torch.nn.Sequential(cpu_linear.Linear(16, 32), torch.nn.GELU(), cpu_linear.Linear(32, 8))
    cpu_linear.set_linear_plan(model, plan)
    x = torch.randn(4, 5, 16)
    eager_loss = model(x).square().mean()
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    compiled = torch.compile(model, backend="aot_eager")
    torch.autograd.grad(compiled(x).square().mean(), list(model.parameters()))  # compiles, outside the count
    with profile() as prof:
        loss = compiled(x).square().mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    calls = sum(event.name == "gptrain::onednn_linear" for event in prof.events())
    # Two forwards, one grad_input (the first layer's input needs none) and, on oneDNN, two grad_weights.
    assert calls == (num_onednn_calls if cpu_linear.is_onednn_usable(x, model[0].weight) else 0)
