"""Weight tying's one-gradient path (llmlab.tying) against plain autograd on the same model.

Reference: PyTorch's own autograd, with the model forced onto its plain path (nn.Embedding for the
lookup, the Linear output layer sharing the Parameter), which sums the two [V, H] gradients itself.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmlab import tying
from llmlab.entropy import cross_entropy
from llmlab.model import GPT
from tests.conftest import TINY_VARIANTS


@pytest.fixture(autouse=True, params=[False, True], ids=["h·Wᵀ", "(W·hᵀ)ᵀ"])
def _every_size(monkeypatch, request):
    """These tiny models are below the size where the model takes the path on its own; each test
    runs with the head's product in both layouts (`TRANSPOSED_HEAD`: AMD CPUs, or the others)."""
    monkeypatch.setattr(tying, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(tying, "TRANSPOSED_HEAD", request.param)


def tied_model(name: str = "gpt2") -> GPT:
    torch.manual_seed(0)
    return GPT(replace(TINY_VARIANTS[name], vocab_size=97)).train()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (3, 16), generator=g), torch.randint(0, 97, (3, 16), generator=g)


def grads(model: GPT, plain: bool, monkeypatch: pytest.MonkeyPatch, steps: int = 1,
          autocast: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """Gradients after `steps` accumulated backward passes (one batch each)."""
    with monkeypatch.context() as m:
        if plain:
            m.setattr(GPT, "_tied_training", lambda self: False)
        model.zero_grad(set_to_none=True)
        for step in range(steps):
            x, y = batch(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = cross_entropy(model(x), y)
            loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["notes", "gpt2"])
@pytest.mark.parametrize("steps", [1, 2])
def test_gradients_equal_plain_autograd(name, steps, monkeypatch):
    model = tied_model(name)
    assert model.unembed.weight is model.embed.weight
    fast, plain = grads(model, False, monkeypatch, steps), grads(model, True, monkeypatch, steps)
    assert fast.keys() == plain.keys()
    for n in fast:
        torch.testing.assert_close(fast[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)


def test_gradients_equal_plain_autograd_under_bf16_autocast(monkeypatch):
    model = tied_model()
    fast, plain = grads(model, False, monkeypatch, autocast=True), grads(model, True, monkeypatch, autocast=True)
    for n in fast:
        assert fast[n].dtype == torch.float32
        torch.testing.assert_close(fast[n], plain[n], rtol=2e-2, atol=2e-3, msg=n)


def test_autograd_grad_on_the_weight_equals_plain(monkeypatch):
    model = tied_model()
    x, y = batch()
    (fast,) = torch.autograd.grad(cross_entropy(model(x), y), [model.embed.weight])
    monkeypatch.setattr(GPT, "_tied_training", lambda self: False)
    (plain,) = torch.autograd.grad(cross_entropy(model(x), y), [model.embed.weight])
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)


def test_the_tied_path_is_taken_only_when_training_with_gradients():
    model = tied_model()
    x, _ = batch()
    assert "_Head" in model(x).grad_fn.name()  # training: the one-gradient path
    with torch.no_grad():
        assert model(x).grad_fn is None
    assert "_Head" not in model.eval()(x).grad_fn.name()  # eval mode: plain autograd
    untied = GPT(replace(TINY_VARIANTS["llama-tiny"], vocab_size=97)).train()
    assert "_Head" not in untied(x).grad_fn.name()


def test_small_tied_matrices_take_plain_autograd(monkeypatch):
    model = tied_model()
    x, _ = batch()
    monkeypatch.setattr(tying, "MIN_ELEMENTS", model.embed.weight.numel() + 1)
    assert "_Head" not in model(x).grad_fn.name()


def test_logits_equal_the_plain_forward():
    model = tied_model()
    x, _ = batch()
    fast = model(x)
    torch.testing.assert_close(fast, model.eval()(x), rtol=1e-5, atol=1e-5)


def test_float64_under_autocast_stays_float64_as_plain_autograd_does():
    """Reference: h·Wᵀ by plain autograd, which autocast leaves in float64 (it lowers fp32 and fp16 only)."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    h = torch.randn(2, 3, 16, dtype=torch.float64, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, plain = tying.TiedGradient().head(h, W), h @ W.T
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
