"""Notes §一: cross-entropy, predictive entropy and LM-Polygraph's sequence scores against PyTorch,
scipy and exact enumeration."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from llmlab.config import ModelConfig
from llmlab.entropy import (
    cross_entropy,
    entropy_of_probs,
    maximum_sequence_probability,
    mean_nll,
    mean_token_entropy,
    monte_carlo_sequence_entropy,
    nats_to_bits,
    perplexity,
    predictive_entropy,
    sampling_entropy,
    surprisal,
    top_alternatives,
)
from llmlab.errors import UserError
from llmlab.model import GPT
from llmlab.sampling import SamplingConfig, probs_from_logits

G = torch.Generator().manual_seed(0)
LOGITS = torch.randn(4, 7, 50, generator=G) * 3
TARGETS = torch.randint(0, 50, (4, 7), generator=G)


def test_cross_entropy_equals_torch():
    """Reference: torch.nn.functional.cross_entropy."""
    ref = F.cross_entropy(LOGITS.reshape(-1, 50), TARGETS.reshape(-1))
    torch.testing.assert_close(cross_entropy(LOGITS, TARGETS), ref)


def test_cross_entropy_is_minus_sum_y_log_p_with_one_hot_y():
    """The notes' formula L = −Σ yᵢ log pᵢ, written out with a one-hot y."""
    y = F.one_hot(TARGETS, 50).float()
    ref = -(y * torch.log(torch.softmax(LOGITS, -1))).sum(-1)
    torch.testing.assert_close(surprisal(LOGITS, TARGETS), ref, rtol=1e-5, atol=1e-5)


def test_predictive_entropy_equals_scipy():
    """Reference: scipy.stats.entropy of the softmax."""
    probs = torch.softmax(LOGITS, -1).numpy().reshape(-1, 50)
    ref = np.array([stats.entropy(p) for p in probs]).reshape(4, 7)
    np.testing.assert_allclose(predictive_entropy(LOGITS).numpy(), ref, rtol=1e-5)


def test_entropy_extremes_uniform_is_log_v_and_one_hot_is_zero():
    assert math.isclose(predictive_entropy(torch.zeros(50)).item(), math.log(50), rel_tol=1e-6)
    one_hot = torch.full((50,), -1e4)
    one_hot[3] = 1e4
    assert predictive_entropy(one_hot).item() == 0.0


def test_perplexity_and_bits():
    assert math.isclose(perplexity(math.log(65)), 65.0)
    assert math.isclose(nats_to_bits(math.log(2)), 1.0)
    assert perplexity(1000.0) == math.inf  # exp(1000) is beyond the largest float, not an OverflowError


@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e-300])
def test_a_tiny_temperature_is_the_one_hot_limit_not_nan(temperature):
    """Reference: the T → 0 limit, a one-hot at the argmax: entropy 0, surprisal 0 at the argmax and
    +inf elsewhere (z / T on z itself would overflow to ±inf and give NaN)."""
    h, s = predictive_entropy(LOGITS, temperature), surprisal(LOGITS, TARGETS, temperature)
    hit = LOGITS.argmax(-1) == TARGETS
    assert not h.isnan().any() and not s.isnan().any()
    assert torch.allclose(h, torch.zeros_like(h), atol=1e-4) and bool((s[hit] == 0).all())
    assert bool((s[~hit] > 0).all())  # −log p of a token the limit gives no mass: (z_max − z) / T, or inf


# --- temperature, alternatives, batches ------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_tempered_entropy_and_surprisal_equal_scipy_and_torch(temperature):
    """References: scipy.stats.entropy of softmax(z / T); F.cross_entropy of z / T per position."""
    probs = torch.softmax(LOGITS / temperature, -1).numpy().reshape(-1, 50)
    ref_h = np.array([stats.entropy(p) for p in probs]).reshape(4, 7)
    np.testing.assert_allclose(predictive_entropy(LOGITS, temperature).numpy(), ref_h, rtol=1e-5, atol=1e-6)
    ref_s = F.cross_entropy((LOGITS / temperature).reshape(-1, 50), TARGETS.reshape(-1), reduction="none")
    torch.testing.assert_close(surprisal(LOGITS, TARGETS, temperature), ref_s.reshape(4, 7))


def test_batch_equals_one_by_one():
    """Each row of a batch gives what it gives alone."""
    h, s = predictive_entropy(LOGITS, 0.7), surprisal(LOGITS, TARGETS, 0.7)
    for b in range(4):
        for t in range(7):
            torch.testing.assert_close(predictive_entropy(LOGITS[b, t], 0.7), h[b, t])
            torch.testing.assert_close(surprisal(LOGITS[b, t], TARGETS[b, t], 0.7), s[b, t])


def test_perplexity_is_exp_of_torch_cross_entropy():
    ref = torch.exp(F.cross_entropy(LOGITS.reshape(-1, 50), TARGETS.reshape(-1))).item()
    assert math.isclose(perplexity(cross_entropy(LOGITS, TARGETS).item()), ref, rel_tol=1e-6)


def test_uniform_logits_at_any_temperature_have_entropy_log_v():
    assert math.isclose(predictive_entropy(torch.zeros(50), 3.0).item(), math.log(50), rel_tol=1e-6)


@pytest.mark.parametrize("cfg", [SamplingConfig(1.0), SamplingConfig(0.8, top_k=5), SamplingConfig(1.3, top_p=0.9)])
def test_sampling_entropy_is_the_entropy_of_what_sampling_draws_from(cfg):
    """Reference: scipy.stats.entropy of `probs_from_logits` (the distribution `generate_ids` samples)."""
    probs = probs_from_logits(LOGITS, cfg).numpy().reshape(-1, 50)
    ref = np.array([stats.entropy(p) for p in probs]).reshape(4, 7)
    np.testing.assert_allclose(sampling_entropy(LOGITS, cfg).numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(entropy_of_probs(torch.from_numpy(probs)).numpy(), ref.reshape(-1), rtol=1e-5, atol=1e-6)


def test_greedy_sampling_has_zero_entropy():
    assert (sampling_entropy(LOGITS, SamplingConfig(0.0)) == 0).all()


def test_top_alternatives_are_the_largest_softmax_probabilities():
    """Reference: numpy argsort of the softmax."""
    probs, ids = top_alternatives(LOGITS, 4, temperature=1.5)
    ref = torch.softmax(LOGITS / 1.5, -1).numpy()
    order = np.argsort(-ref, axis=-1)[..., :4]
    np.testing.assert_array_equal(ids.numpy(), order)
    np.testing.assert_allclose(probs.numpy(), np.take_along_axis(ref, order, -1), rtol=1e-5)
    assert top_alternatives(LOGITS, 80)[1].shape == (4, 7, 50)  # k is capped at V


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_temperature_is_a_user_error(temperature):
    with pytest.raises(UserError, match="temperature must be a positive number"):
        predictive_entropy(LOGITS, temperature)


# --- sequence level (LM-Polygraph) -----------------------------------------------------------


def test_sequence_scores_follow_lm_polygraph_definitions():
    """MSP = −Σ log p, PPL = −mean log p (F.cross_entropy sum / mean), MTE = mean of scipy entropies."""
    z, y = LOGITS[0], TARGETS[0]  # one sequence of 7 tokens
    s = surprisal(z, y)
    assert math.isclose(maximum_sequence_probability(s), F.cross_entropy(z, y, reduction="sum").item(), rel_tol=1e-5)
    assert math.isclose(mean_nll(s.tolist()), F.cross_entropy(z, y).item(), rel_tol=1e-5)
    ref = np.mean([stats.entropy(p) for p in torch.softmax(z, -1).numpy()])
    assert math.isclose(mean_token_entropy(predictive_entropy(z)), ref, rel_tol=1e-5)


def tiny_model(vocab: int = 4) -> GPT:
    torch.manual_seed(3)
    model = GPT(ModelConfig(vocab_size=vocab, block_size=8, n_layers=1, n_heads=2, d_model=16)).eval()
    with torch.no_grad():
        model.unembed.weight.mul_(10)  # tied: sharper, more varied next-token distributions (H ≈ 2.3 of log 64)
    return model


def exact_sequence_log_probs(model: GPT, prompt: list[int], length: int, temperature: float) -> dict:
    """log P(y | prompt) of every continuation y, enumerated, from one full forward pass (all y as a batch)."""
    ys = torch.tensor(list(itertools.product(range(model.cfg.vocab_size), repeat=length)))  # [V^length, length]
    idx = torch.cat([torch.tensor(prompt).expand(len(ys), -1), ys], dim=1)  # [V^length, S₀ + length]
    with torch.no_grad():
        logits = model(idx)[:, len(prompt) - 1 : -1]  # [V^length, length, V]
    logp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, ys[..., None]).squeeze(-1).sum(-1)
    return {tuple(y): float(lp) for y, lp in zip(ys.tolist(), logp, strict=True)}


def test_monte_carlo_sample_log_probs_equal_a_full_forward_pass():
    """Each sampled continuation's log P (accumulated while sampling, with the KV cache) equals the one
    computed afresh by enumeration, so the estimator averages the right quantity."""
    model = tiny_model()
    mc = monte_carlo_sequence_entropy(model, [1], 16, 3, SamplingConfig(0.9), seed=1)
    exact = exact_sequence_log_probs(model, [1], 3, 0.9)
    for ids, lp in zip(mc.samples, mc.sample_log_probs, strict=True):
        assert math.isclose(lp, exact[tuple(ids)], abs_tol=1e-4)
    assert math.isclose(mc.estimate, -np.mean(mc.sample_log_probs), rel_tol=1e-9)
    assert math.isclose(mc.normalized, mc.estimate / 3, rel_tol=1e-9)


def test_monte_carlo_sequence_entropy_converges_to_the_exact_entropy():
    """Reference: H(Y|x) = −Σ_y P(y) log P(y) over all 4³ continuations, enumerated."""
    model = tiny_model()
    exact = exact_sequence_log_probs(model, [1], 3, 1.0)
    p = np.exp(np.array(list(exact.values())))
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-6)
    h = float(-(p * np.log(p)).sum())
    mc = monte_carlo_sequence_entropy(model, [1], 4000, 3, SamplingConfig(1.0), seed=0)
    assert abs(mc.estimate - h) < 4 * mc.std_error
    assert 0.01 < mc.std_error < 0.05


def test_monte_carlo_entropy_of_greedy_decoding_is_zero_and_bad_sizes_are_errors():
    model = tiny_model()
    assert monte_carlo_sequence_entropy(model, [1], 4, 3, SamplingConfig(0.0)).estimate == 0
    with pytest.raises(UserError, match="needs >= 2 samples"):
        monte_carlo_sequence_entropy(model, [1], 1, 3, SamplingConfig(1.0))
