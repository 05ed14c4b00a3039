import pytest
import torch
import torch.nn.functional as F

from gptrain.model import cpu_linear


@pytest.mark.parametrize("has_bias", [True, False])
def test_onednn_linear_matches_f_linear_values_and_gradients(has_bias):
    # Whichever path this PyTorch takes (oneDNN, or F.linear where the op is missing), results must agree.
    x = torch.randn(3, 7, 48, requires_grad=True)
    w = torch.randn(80, 48, requires_grad=True)
    b = torch.randn(80, requires_grad=True) if has_bias else None
    out = cpu_linear.linear(x, w, b)
    ref = F.linear(x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, [x, w] + ([b] if has_bias else []), grad)
    want = torch.autograd.grad(ref, [x, w] + ([b] if has_bias else []), grad)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_falls_back_to_f_linear_off_fp32():
    x = torch.randn(2, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    assert not cpu_linear.is_onednn_usable(x, w)
    torch.testing.assert_close(cpu_linear.linear(x, w), F.linear(x, w))


def test_linear_module_keeps_nn_linear_state_dict():
    layer = cpu_linear.Linear(8, 4)
    assert isinstance(layer, torch.nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}


def test_onednn_path_is_active_on_x86_linux():
    import platform
    import sys

    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        assert cpu_linear.is_onednn_usable(torch.zeros(2, 2), torch.zeros(2, 2))
    assert not cpu_linear.is_onednn_usable(torch.zeros(2, 2, dtype=torch.float16), torch.zeros(2, 2))
