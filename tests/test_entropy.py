"""Notes §一: cross-entropy and predictive entropy against PyTorch and scipy."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from llmlab.entropy import cross_entropy, nats_to_bits, perplexity, predictive_entropy, surprisal

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
