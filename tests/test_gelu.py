"""llmlab.gelu's training path against PyTorch's own fused F.gelu(approximate="tanh") and its
gelu_backward (the independent reference), in float64 and float32, and against finite
differences (torch.autograd.gradcheck)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmlab import gelu
from llmlab.gelu import GeluTanh, gelu_tanh, takes_fast_path


def value_and_grad(fn, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().requires_grad_()
    out = fn(leaf)
    (g,) = torch.autograd.grad(out, leaf, grad)
    return out.detach(), g


def reference(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def test_equals_torchs_gelu_in_float64_and_passes_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, dtype=torch.float64, generator=g) * 4
    grad = torch.randn(x.shape, dtype=torch.float64, generator=g)
    (ours, g_ours), (ref, g_ref) = value_and_grad(GeluTanh.apply, x, grad), value_and_grad(reference, x, grad)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(GeluTanh.apply, (x[:1, :16].clone().requires_grad_(),))


def test_float32_is_as_close_to_float64_as_torchs_own_kernel():
    """Against GELU in float64, the fast path's error is within a few float32 roundings, like
    F.gelu's: values and gradients over the range pre-activations take."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 64, 512, generator=g) * 3
    grad = torch.randn(x.shape, generator=g)
    exact, g_exact = value_and_grad(reference, x.double(), grad.double())
    ours, g_ours = value_and_grad(GeluTanh.apply, x, grad)
    torch_out, g_torch = value_and_grad(reference, x, grad)
    for got, want, theirs in [(ours, exact, torch_out), (g_ours, g_exact, g_torch)]:
        ours_err, torch_err = (got.double() - want).abs().max().item(), (theirs.double() - want).abs().max().item()
        assert ours_err < 1e-5 and ours_err < 4 * torch_err + 1e-6, (ours_err, torch_err)


def test_extreme_inputs_saturate_and_the_tails_keep_their_precision():
    """Against float64 GELU: where σ(2z) is 0 or 1 the slope is exactly 0 or 1, up to |x| = 1e19
    and past it (where F.gelu's own backward gives NaN, x³ having overflowed); in the negative
    tail the fast path keeps its relative precision, where F.gelu's float32 backward, computing
    1 − tanh², loses it (at x = −5 it is 30% off; at −6 it is 0)."""
    x = torch.tensor([-1e19, -1e13, -50, -20, -10, -6, -5, -0.75, 0, 0.75, 5, 10, 20, 50, 1e13, 1e19])
    ones = torch.ones_like(x)
    ours, g_ours = value_and_grad(GeluTanh.apply, x, ones)
    exact, g_exact = value_and_grad(reference, x.double(), ones.double())
    torch.testing.assert_close(ours.double(), exact, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours.double(), g_exact, rtol=1e-5, atol=1e-7)
    tail = (x == -5) | (x == -6)
    torch.testing.assert_close(g_ours[tail].double(), g_exact[tail], rtol=1e-5, atol=0)
    assert g_ours[x >= 10].eq(1).all() and g_ours[x <= -20].eq(0).all()
    _, g_torch = value_and_grad(reference, x, ones)
    assert abs(g_torch[x == -5].item() / g_exact[x == -5].item() - 1) > 0.2  # the reference's own float32 error
    huge = torch.tensor([-1e30, 1e30])
    _, g_huge = value_and_grad(GeluTanh.apply, huge, torch.ones(2))
    assert g_huge.tolist() == [0.0, 1.0]


def test_the_fast_path_is_taken_only_when_training_float32_on_cpu():
    x = torch.randn(3, 8)
    assert takes_fast_path(x.clone().requires_grad_())
    assert not takes_fast_path(x)  # inference: F.gelu, one fused pass
    assert not takes_fast_path(x.double().requires_grad_())
    assert not takes_fast_path(x.bfloat16().requires_grad_())
    with torch.no_grad():
        assert not takes_fast_path(x.clone().requires_grad_())
    leaf = x.clone().requires_grad_()
    assert type(gelu_tanh(leaf).grad_fn).__name__ == "GeluTanhBackward"
    assert torch.equal(gelu_tanh(x), reference(x))


def test_a_second_derivative_is_an_error_and_without_the_fast_path_equals_torchs(monkeypatch):
    """Hessian-vector style double backward (create_graph=True): the fast path refuses it rather
    than drop GELU''; with FAST_PATH off the model's activation is F.gelu, whose result it equals."""
    g = torch.Generator().manual_seed(2)
    x, w1, w2 = (torch.randn(*s, generator=g).requires_grad_() for s in [(3, 4), (5, 4), (2, 5)])

    def second(act) -> torch.Tensor:
        loss = F.linear(act(F.linear(x, w1)), w2).pow(2).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), w1)[0]

    with pytest.raises(RuntimeError, match="first-order only; for second derivatives set llmlab.gelu.FAST_PATH"):
        second(gelu_tanh)
    monkeypatch.setattr(gelu, "FAST_PATH", False)
    torch.testing.assert_close(second(gelu_tanh), second(reference))
