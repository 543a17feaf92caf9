"""Calibration (ECE, Brier, temperature scaling) and error prediction (AUROC, PRR) against
independent implementations, scipy, and synthetic data whose answer is known in closed form."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from llmlab.calibration import (
    auroc,
    brier_top1,
    calibrate,
    error_prediction,
    expected_calibration_error,
    fit_temperature,
    plot_rejection,
    plot_reliability,
    prediction_rejection,
    reliability_bins,
    top1,
)
from llmlab.errors import UserError

RNG = np.random.default_rng(0)


def ece_loop(confidence: np.ndarray, right: np.ndarray, n_bins: int = 15) -> float:
    """ECE written independently: bin k holds c in (k/M, (k+1)/M], found with ceil; sums kept in lists."""
    count, conf_sum, right_sum = [0] * n_bins, [0.0] * n_bins, [0.0] * n_bins
    for c, r in zip(confidence.tolist(), right.tolist(), strict=True):
        k = max(0, math.ceil(c * n_bins) - 1)
        count[k] += 1
        conf_sum[k] += c
        right_sum[k] += float(r)
    return sum(abs(right_sum[k] - conf_sum[k]) for k in range(n_bins)) / len(confidence)


def synthetic_logits(n: int = 20000, v: int = 12, sharpen: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets drawn from softmax(z); the model reports z · sharpen, so T* = sharpen recalibrates it."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(n, v, generator=g) * 1.5
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(-1)
    return z * sharpen, y


def test_ece_equals_an_independent_loop_implementation():
    confidence = RNG.uniform(0, 1, 5000)
    right = RNG.uniform(0, 1, 5000) < confidence**1.5
    assert math.isclose(expected_calibration_error(confidence, right), ece_loop(confidence, right), rel_tol=1e-9)
    z, y = synthetic_logits(3000)
    c, r = top1(z, y)
    assert math.isclose(expected_calibration_error(c, r), ece_loop(c, r), rel_tol=1e-9)


def test_ece_of_known_miscalibration():
    """right ~ Bernoulli(c) is calibrated (ECE → 0); right ~ Bernoulli(c²) has ECE → E[c − c²] = 1/6
    for c ~ U(0, 1), up to the within-bin averaging (< 0.01 at 15 bins) and sampling noise."""
    c = RNG.uniform(0, 1, 200_000)
    assert expected_calibration_error(c, RNG.uniform(0, 1, c.size) < c) < 0.01
    assert abs(expected_calibration_error(c, RNG.uniform(0, 1, c.size) < c**2) - 1 / 6) < 0.01


def test_reliability_bins_partition_the_predictions():
    c = RNG.uniform(0, 1, 1000)
    bins = reliability_bins(c, c > 0.5)
    assert len(bins) == 15 and sum(b.count for b in bins) == 1000
    assert bins[0].lo == 0 and bins[-1].hi == 1
    for b in bins:
        inside = (c > b.lo) & (c <= b.hi)
        assert b.count == inside.sum() and math.isclose(b.confidence, c[inside].mean())


def test_brier_of_the_top1_prediction():
    """Reference: the definition (1/N) Σ (c − 1[right])², term by term."""
    c = RNG.uniform(0, 1, 100)
    r = RNG.uniform(0, 1, 100) < 0.5
    assert math.isclose(brier_top1(c, r), sum((ci - ri) ** 2 for ci, ri in zip(c, r, strict=True)) / 100)
    assert brier_top1(np.ones(5), np.ones(5, dtype=bool)) == 0


def test_fit_temperature_recovers_a_known_sharpening_and_matches_scipy():
    """Reference: scipy.optimize.minimize_scalar of the NLL over T; and the known T = 2 of the data."""
    z, y = synthetic_logits()
    t = fit_temperature(z, y)

    def nll(temp: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / temp, y))

    ref = optimize.minimize_scalar(nll, bounds=(0.05, 20), method="bounded", options={"xatol": 1e-6}).x
    assert math.isclose(t, ref, rel_tol=1e-3)
    assert abs(t - 2.0) < 0.1


def test_temperature_scaling_lowers_ece_on_held_out_predictions():
    z, y = synthetic_logits()
    cal = calibrate(z, y)
    assert cal.n_fit == cal.n_eval == 10000
    assert cal.ece > 0.05 and cal.ece_scaled < cal.ece / 3
    assert cal.nll_scaled < cal.nll and cal.brier_scaled < cal.brier
    c, r = top1(z[10000:], y[10000:])
    assert math.isclose(cal.ece, ece_loop(c, r), rel_tol=1e-9)


def test_auroc_equals_mann_whitney_u_with_ties():
    """Reference: scipy.stats.mannwhitneyu U / (n₊ n₋), ties counted ½."""
    scores = np.round(RNG.normal(size=400), 1)  # many ties
    positive = RNG.uniform(size=400) < 1 / (1 + np.exp(-2 * scores))
    u = stats.mannwhitneyu(scores[positive], scores[~positive]).statistic
    assert math.isclose(auroc(scores, positive), u / (positive.sum() * (~positive).sum()), rel_tol=1e-12)
    assert auroc(np.arange(10.0), np.arange(10) >= 5) == 1.0
    assert auroc(-np.arange(10.0), np.arange(10) >= 5) == 0.0


def prr_loop(uncertainty: np.ndarray, quality: np.ndarray) -> float:
    """PRR from the definition: for j = 0 … n−1 rejected (most uncertain first) the mean quality of the
    rest; the same for the oracle (worst quality first) and for 1000 random orders."""

    def area(order: np.ndarray) -> float:
        kept = [quality[order[: len(order) - j]].mean() for j in range(len(order))]
        return float(np.mean(kept))

    rng = np.random.default_rng(5)
    random = np.mean([area(rng.permutation(len(quality))) for _ in range(1000)])
    return (area(np.argsort(uncertainty, kind="stable")) - random) / (
        area(np.argsort(-quality, kind="stable")) - random
    )


def test_prr_equals_the_definition_with_random_orders():
    """The random baseline is used in closed form (the mean quality); the reference averages random orders."""
    u = RNG.normal(size=120)
    q = (RNG.uniform(size=120) > 1 / (1 + np.exp(-u))).astype(float)
    assert abs(prediction_rejection(u, q).prr - prr_loop(u, q)) < 0.02


def test_prr_of_oracle_random_and_reversed_uncertainty():
    q = (RNG.uniform(size=2000) < 0.7).astype(float)
    assert math.isclose(prediction_rejection(1 - q + RNG.uniform(0, 0.1, 2000), q).prr, 1.0)
    assert prediction_rejection(q, q).prr < -0.9
    randoms = [prediction_rejection(RNG.normal(size=2000), q).prr for _ in range(20)]
    assert abs(np.mean(randoms)) < 0.05
    curve = prediction_rejection(1 - q, q)
    assert curve.quality[0] == q.mean() and curve.quality[-1] == 1.0 and curve.rates[0] == 0


def test_error_prediction_on_logits_whose_entropy_is_informative():
    """Targets drawn from softmax(z): high-entropy rows miss more often, so AUROC > 0.5 and PRR > 0;
    the figures equal `auroc` and `prediction_rejection` applied by hand."""
    z, y = synthetic_logits(5000, sharpen=1.0)
    ep = error_prediction(z, y)
    r = (z.argmax(-1) == y).numpy()
    h = stats.entropy(torch.softmax(z, -1).numpy(), axis=-1)
    assert ep.auroc_entropy > 0.6 and ep.prr_entropy > 0.1
    assert math.isclose(ep.auroc_entropy, auroc(h, ~r), rel_tol=1e-6)
    assert math.isclose(ep.error_rate, 1 - r.mean())
    rates = [g["error_rate"] for g in ep.by_entropy]
    assert rates == sorted(rates) and sum(g["count"] for g in ep.by_entropy) == 5000


def test_figures_are_png_files(tmp_path):
    z, y = synthetic_logits(400)
    for path in (
        plot_reliability(calibrate(z, y), tmp_path / "r.png"),
        plot_rejection(error_prediction(z, y), tmp_path / "p.png"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_too_little_data_is_a_user_error():
    z, y = synthetic_logits(15)
    with pytest.raises(UserError, match="at least 10 predictions to fit and 10 to evaluate; this text has 15"):
        calibrate(z, y)
    with pytest.raises(UserError, match="needs both hits and misses"):
        auroc(np.arange(4.0), np.zeros(4, dtype=bool))
    with pytest.raises(UserError, match="at least 2 predictions"):
        prediction_rejection(np.ones(1), np.ones(1))


def test_tour_section_shows_heat_maps_and_held_out_figures(trained_run, tmp_path):
    from llmlab.run_dir import load_run
    from llmlab.sections import Tour
    from llmlab.sections.entropy import section
    from llmlab.sections.generation import prompts

    tour = Tour(tmp_path, quick=True, data="corpus", log=lambda _: None, notes_dir=trained_run)
    s = section(tour)
    n_prompts = len(prompts(load_run(trained_run).tokenizer))
    assert s.body.count('<div class="hm">') == n_prompts and s.body.count('class="legend"') == 1
    assert s.body.count("data:image/png;base64,") == 2
    held = s.figures["held_out"]
    assert held["calibration"]["n_fit"] + held["calibration"]["n_eval"] == 3999
    assert 0 <= held["calibration"]["ece"] <= 1 and held["error_prediction"]["auroc_entropy"] > 0.5
    assert all(f["mc_std_error"] > 0 for f in s.figures["samples"].values())


def test_json_of_empty_bins_is_null_not_nan():
    """With 12 tokens the confidence is at least 1/12, so the first bin (0, 1/15] is empty."""
    z, y = synthetic_logits(400)
    d = calibrate(z, y).to_json()
    assert d["bins"][0] == {"lo": 0.0, "hi": 1 / 15, "count": 0, "confidence": None, "accuracy": None}
    json.dumps(d, allow_nan=False)
    json.dumps(error_prediction(z, y).to_json(), allow_nan=False)
