"""The generic rejection sampler (notes §二): accept x ~ q with probability p(x) / (M·q(x)).

References: the acceptance rate of a normalised p is 1/M (Robert & Casella 2004, §2.3); samples
are checked against p with scipy's chi-square (discrete) and Kolmogorov-Smirnov (continuous) tests.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from llmlab.errors import UserError
from llmlab.rejection import (
    EnvelopeViolation,
    check_envelope,
    discrete_envelope,
    rejection_sample,
    rejection_sample_discrete,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def within_3_se(rate: float, expected: float, proposed: int) -> bool:
    return abs(rate - expected) < 3 * math.sqrt(expected * (1 - expected) / proposed)


def test_discrete_samples_follow_p_and_acceptance_is_1_over_M():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(10, generator=gen, dtype=torch.float64)
    p = p / p.sum()  # seeded, and in float64: chisquare needs the expected counts to sum to n exactly
    q = torch.full((10,), 0.1, dtype=torch.float64)
    M = discrete_envelope(p, q)
    assert pytest.approx(float(np.max(p.numpy() / q.numpy()))) == M
    result = rejection_sample_discrete(p, q, M, 20_000, gen)
    assert result.accepted == 20_000
    assert within_3_se(result.acceptance_rate, 1 / M, result.proposed)
    counts = np.bincount(result.samples.numpy(), minlength=10)
    assert scipy_stats.chisquare(counts, 20_000 * p.numpy()).pvalue > 0.01


def test_a_loose_envelope_still_samples_p_at_a_lower_rate():
    gen = torch.Generator().manual_seed(1)
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    M = 2 * discrete_envelope(p, q)  # 5
    result = rejection_sample_discrete(p, q, M, 10_000, gen)
    assert within_3_se(result.acceptance_rate, 1 / M, result.proposed)
    counts = np.bincount(result.samples.numpy(), minlength=3)
    assert scipy_stats.chisquare(counts, 10_000 * p.numpy()).pvalue > 0.01


def test_continuous_beta_from_uniform_passes_ks_and_unnormalised_p_accepts_z_over_m():
    """p = Beta(2, 5) on [0, 1], q = U(0, 1), M = the density at the mode 1/5 (scipy.stats.beta)."""
    gen = torch.Generator().manual_seed(2)
    beta = torch.distributions.Beta(torch.tensor(2.0, dtype=torch.float64), torch.tensor(5.0, dtype=torch.float64))
    M = float(scipy_stats.beta.pdf(0.2, 2, 5))
    uniform = lambda x: torch.ones_like(x)  # noqa: E731
    draw = lambda n, g: torch.rand(n, generator=g, dtype=torch.float64)  # noqa: E731
    result = rejection_sample(lambda x: beta.log_prob(x).exp(), uniform, draw, M, 5000, gen)
    assert within_3_se(result.acceptance_rate, 1 / M, result.proposed)
    assert scipy_stats.kstest(result.samples.numpy(), scipy_stats.beta(2, 5).cdf).pvalue > 0.01
    half = rejection_sample(lambda x: 0.5 * beta.log_prob(x).exp(), uniform, draw, M, 5000, gen)  # Z = 0.5
    assert within_3_se(half.acceptance_rate, 0.5 / M, half.proposed)
    assert scipy_stats.kstest(half.samples.numpy(), scipy_stats.beta(2, 5).cdf).pvalue > 0.01


def test_proposals_are_counted_up_to_the_nth_acceptance():
    """With q = p and M = 1 every proposal is accepted: exactly n proposals, whatever the batch."""
    p = torch.tensor([0.25, 0.75], dtype=torch.float64)
    result = rejection_sample(lambda x: p[x], lambda x: p[x], lambda n, g: torch.multinomial(p, n, True, generator=g),
                              1.0, 37, torch.Generator().manual_seed(3), batch=10)  # fmt: skip
    assert result.proposed == 37 and result.accepted == 37 and result.acceptance_rate == 1.0


def test_a_violated_envelope_is_reported_not_silently_wrong():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    with pytest.raises(EnvelopeViolation, match=r"M = 1.2 is not an envelope: p/q reaches 1.5"):
        rejection_sample_discrete(p, q, 1.2, 100)
    zero = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    assert discrete_envelope(torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), zero) == math.inf
    beta_pdf = lambda x: torch.from_numpy(scipy_stats.beta.pdf(x.numpy(), 2, 5))  # noqa: E731
    with pytest.raises(EnvelopeViolation, match=r"M = 1.5 is not an envelope: p\(x\) = .* needs M >= "):
        rejection_sample(beta_pdf, torch.ones_like, lambda n, g: torch.rand(n, generator=g, dtype=torch.float64),
                         1.5, 1000, torch.Generator().manual_seed(4))  # fmt: skip


def test_an_exact_envelope_in_float32_is_not_refused_for_its_rounding():
    """float32's 0.4 is 0.40000000596: p/q = 1.6000000238 against M = 1.6, a rounding, not a violation
    (refused before, with "M must be >= 1.6"). Reference: the exact ratio 0.4 / 0.25 = 1.6; the
    acceptance rate is 1/M (Robert & Casella §2.3), and 1.59 is still refused."""
    p, q = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.full((4,), 0.25)
    result = rejection_sample_discrete(p, q, 1.6, 4000, torch.Generator().manual_seed(0))
    assert result.accepted == 4000 and abs(result.acceptance_rate - 1 / 1.6) < 0.02
    with pytest.raises(EnvelopeViolation, match="M = 1.59 is not an envelope"):
        rejection_sample_discrete(p, q, 1.59, 10)
    x = torch.tensor([3])
    check_envelope(x, p[x], q[x], 1.6)  # the per-proposal check allows the same rounding
    with pytest.raises(EnvelopeViolation):
        check_envelope(x, p[x], q[x], 1.6 * (1 - 1e-6))


BAD = [(0.0, 10, "positive finite"), (math.inf, 10, "positive finite"), (math.nan, 10, "positive finite"),
       (2.0, 0, "at least 1")]  # fmt: skip


@pytest.mark.parametrize(("M", "n", "message"), BAD)
def test_bad_arguments(M, n, message):
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with pytest.raises(UserError, match=message):
        rejection_sample(lambda x: p[x], lambda x: p[x], lambda k, g: torch.multinomial(p, k, True), M, n)


def test_an_envelope_too_large_to_finish_is_refused_before_any_work():
    """1/M of the proposals are accepted, so n samples need about n·M of them."""
    p = torch.tensor([0.5, 0.5], dtype=torch.float64)
    q = torch.tensor([1 - 1e-9, 1e-9], dtype=torch.float64)
    M = discrete_envelope(p, q)  # 5e8
    with pytest.raises(UserError, match=r"need about 5e\+09 proposals on average, more than 1/10 of the budget"):
        rejection_sample_discrete(p, q, M, 10)
    q = torch.tensor([1 - 1e-6, 1e-6], dtype=torch.float64)  # M = 5e5: 1 sample expects 5e5 of 1e7 proposals
    assert all(rejection_sample_discrete(p, q, discrete_envelope(p, q), 1, torch.Generator().manual_seed(s)).accepted
               == 1 for s in range(20))  # fmt: skip
