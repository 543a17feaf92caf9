"""Is the model's uncertainty (notes §一) worth anything? Calibration and error prediction.

A next-token prediction is the top-1 token; its confidence is c = max p, and it is right when
the observed token is that argmax. Over N predictions:

    ECE     Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|, 15 equal-width bins of c on [0, 1]
            (Naeini et al. 2015; Guo et al. 2017, arXiv 1706.04599)
    Brier   (1/N) Σ (c − 1[right])², the Brier score (1950) of the top-1 prediction
    temperature scaling   T* = argmin_T NLL(softmax(z / T)) on one part of the text, then ECE and
            Brier measured on another part (Guo et al. 2017, §4.2)

Error prediction: does a high entropy H(p) flag a top-1 miss?

    AUROC   P(H of a random miss > H of a random hit), ties counting ½ (Mann–Whitney U / (n₊ n₋))
    PRR     reject the most uncertain predictions first; the prediction–rejection curve is the
            accuracy of what is kept at each rejection rate, its area AUC_PR.
            PRR = (AUC_unc − AUC_random) / (AUC_oracle − AUC_random): random = 0, oracle = 1
            (Malinin & Gales 2021, arXiv 2002.07650; LM-Polygraph, arXiv 2311.07383). The random
            curve's expectation is the overall accuracy at every rate, which is used exactly here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from llmlab.entropy import log_probs, predictive_entropy, surprisal
from llmlab.errors import UserError
from llmlab.run_dir import atomic_write

N_BINS = 15


def top1(logits: Tensor, targets: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(confidence = max p [N], right = argmax == target [N]) of logits [N, V], targets [N]."""
    logp = log_probs(logits)  # [N, V]
    conf, pred = logp.max(dim=-1)  # [N], [N]
    return conf.exp().double().numpy(), (pred == targets).numpy()


# --- calibration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bin:
    lo: float
    hi: float
    count: int
    confidence: float  # mean c in the bin (nan when empty)
    accuracy: float  # fraction right in the bin (nan when empty)


def reliability_bins(confidence: np.ndarray, right: np.ndarray, n_bins: int = N_BINS) -> list[Bin]:
    """Equal-width bins (lo, hi] of the confidence, the first one closed at 0."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)  # [N]
    bins = []
    for b in range(n_bins):
        mask = which == b
        n = int(mask.sum())
        conf = float(confidence[mask].mean()) if n else math.nan
        acc = float(right[mask].mean()) if n else math.nan
        bins.append(Bin(float(edges[b]), float(edges[b + 1]), n, conf, acc))
    return bins


def expected_calibration_error(confidence: np.ndarray, right: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE = Σ_b (|B_b| / N) · |acc(B_b) − conf(B_b)|."""
    n = len(confidence)
    if n == 0:
        raise UserError("calibration needs at least one prediction")
    return sum(b.count / n * abs(b.accuracy - b.confidence) for b in reliability_bins(confidence, right, n_bins)
               if b.count)  # fmt: skip


def brier_top1(confidence: np.ndarray, right: np.ndarray) -> float:
    """(1/N) Σ (c − 1[right])²."""
    return float(np.mean((confidence - right.astype(np.float64)) ** 2))


def fit_temperature(logits: Tensor, targets: Tensor, max_iter: int = 100) -> float:
    """T* = argmin_T (1/N) Σ −log softmax(z / T)_target, by L-BFGS on log T (so T stays > 0).

    The NLL is convex in 1/T, so the minimum found is the global one. logits [N, V], targets [N].
    """
    logits = logits.detach().float()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = surprisal(logits / log_t.exp(), targets).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


@dataclass(frozen=True)
class Calibration:
    """Top-1 calibration of the evaluation part, before and after temperature scaling fitted on the fit part."""

    n_fit: int
    n_eval: int
    temperature: float  # T*, fitted on the fit part
    ece: float
    ece_scaled: float
    brier: float
    brier_scaled: float
    nll: float  # mean NLL of the evaluation part, nats/token
    nll_scaled: float
    accuracy: float  # top-1 accuracy (temperature does not change the argmax)
    bins: list[Bin]
    bins_scaled: list[Bin]

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict: an empty bin's mean confidence and accuracy are null, not NaN."""
        return _json_safe(asdict(self))


def calibrate(logits: Tensor, targets: Tensor, fit_fraction: float = 0.5, n_bins: int = N_BINS) -> Calibration:
    """Fit T* on the first `fit_fraction` of the predictions, measure on the rest. logits [N, V], targets [N]."""
    n = len(targets)
    n_fit = int(n * fit_fraction)
    if n_fit < 10 or n - n_fit < 10:
        raise UserError(f"calibration needs at least 10 predictions to fit and 10 to evaluate; this text has {n}")
    t = fit_temperature(logits[:n_fit], targets[:n_fit])
    z, y = logits[n_fit:], targets[n_fit:]
    conf, right = top1(z, y)
    conf_t, right_t = top1(z / t, y)
    return Calibration(
        n_fit=n_fit, n_eval=n - n_fit, temperature=t,
        ece=expected_calibration_error(conf, right, n_bins),
        ece_scaled=expected_calibration_error(conf_t, right_t, n_bins),
        brier=brier_top1(conf, right), brier_scaled=brier_top1(conf_t, right_t),
        nll=float(surprisal(z, y).mean()), nll_scaled=float(surprisal(z / t, y).mean()),
        accuracy=float(right.mean()), bins=reliability_bins(conf, right, n_bins),
        bins_scaled=reliability_bins(conf_t, right_t, n_bins),
    )  # fmt: skip


# --- error prediction ------------------------------------------------------------------------


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for `positive` (bool), via ranks: (R₊ − n₊(n₊+1)/2) / (n₊ n₋),
    with tied scores given their average rank."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise UserError(f"AUROC needs both hits and misses; got {n_pos} misses and {n_neg} hits")
    return float((_average_ranks(np.asarray(scores, dtype=np.float64))[positive].sum() - n_pos * (n_pos + 1) / 2)
                 / (n_pos * n_neg))  # fmt: skip


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]  # start of each run of equal values
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2  # mean of the 1-based ranks starts+1 … ends
    ranks = np.empty(len(x))
    ranks[order] = mean_rank[group]
    return ranks


@dataclass(frozen=True)
class Rejection:
    rates: list[float]  # fraction rejected, 0 … (N−1)/N
    quality: list[float]  # accuracy of the kept predictions, most uncertain rejected first
    oracle: list[float]  # the same, rejecting the misses first
    random: float  # expected accuracy of a random rejection: the overall accuracy, at every rate
    auc: float
    auc_oracle: float
    prr: float  # (auc − random) / (auc_oracle − random)


def prediction_rejection(uncertainty: np.ndarray, quality: np.ndarray) -> Rejection:
    """The prediction–rejection curve: keep the n − j least uncertain, j = 0 … n−1, and report the mean
    quality kept; the area is the mean over the n points (LM-Polygraph's `PredictionRejectionArea`)."""
    quality = np.asarray(quality, dtype=np.float64)
    n = len(quality)
    if n < 2:
        raise UserError(f"a prediction–rejection curve needs at least 2 predictions, got {n}")
    curve = _kept_mean(quality[np.argsort(uncertainty, kind="stable")])
    oracle = _kept_mean(np.sort(quality)[::-1])
    random = float(quality.mean())
    auc, auc_oracle = float(curve.mean()), float(oracle.mean())
    prr = (auc - random) / (auc_oracle - random) if auc_oracle > random else math.nan
    return Rejection((np.arange(n) / n).tolist(), curve.tolist(), oracle.tolist(), random, auc, auc_oracle, prr)


def _kept_mean(sorted_quality: np.ndarray) -> np.ndarray:
    """Given qualities ordered most certain first, the mean of the first n − j, for j = 0 … n−1."""
    n = len(sorted_quality)
    return (np.cumsum(sorted_quality) / np.arange(1, n + 1))[::-1]


def error_rate_by_entropy(entropy: np.ndarray, right: np.ndarray, n_groups: int = 5) -> list[dict[str, float]]:
    """Predictions sorted by entropy and cut into equal-count groups: each group's entropy range and
    top-1 error rate. If entropy is informative, the error rate rises from group to group."""
    order = np.argsort(entropy, kind="stable")
    return [{"entropy_lo": float(entropy[g[0]]), "entropy_hi": float(entropy[g[-1]]), "count": len(g),
             "error_rate": float(1 - right[g].mean())}
            for g in np.array_split(order, n_groups) if len(g)]  # fmt: skip


@dataclass(frozen=True)
class ErrorPrediction:
    n: int
    error_rate: float
    auroc_entropy: float  # entropy as the score for "top-1 miss"
    auroc_max_prob: float  # 1 − max p, the baseline score (LM-Polygraph's MaximumTokenProbability)
    prr_entropy: float
    prr_max_prob: float
    by_entropy: list[dict[str, float]]
    rejection: Rejection

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "rejection"}
        r = self.rejection
        return _json_safe(d | {"auc_rejection": r.auc, "auc_oracle": r.auc_oracle, "auc_random": r.random})


def _json_safe(obj: Any) -> Any:
    """NaN → None, recursively (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def error_prediction(logits: Tensor, targets: Tensor) -> ErrorPrediction:
    """How well the predictive entropy of each next-token distribution predicts a top-1 miss."""
    conf, right = top1(logits, targets)
    entropy = predictive_entropy(logits).double().numpy()  # [N]
    rejection = prediction_rejection(entropy, right)
    return ErrorPrediction(
        n=len(right), error_rate=float(1 - right.mean()), auroc_entropy=auroc(entropy, ~right),
        auroc_max_prob=auroc(1 - conf, ~right), prr_entropy=rejection.prr,
        prr_max_prob=prediction_rejection(1 - conf, right).prr, by_entropy=error_rate_by_entropy(entropy, right),
        rejection=rejection,
    )  # fmt: skip


# --- figures ---------------------------------------------------------------------------------


def plot_reliability(cal: Calibration, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, before and after temperature scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--", label="perfect calibration")
    curves = [(cal.bins, "T = 1", "#d62728", cal.ece),
              (cal.bins_scaled, f"T* = {cal.temperature:.2f}", "#1f77b4", cal.ece_scaled)]  # fmt: skip
    for bins, label, colour, ece in curves:
        kept = [b for b in bins if b.count]
        ax.plot([b.confidence for b in kept], [b.accuracy for b in kept], "o-", color=colour, ms=4,
                label=f"{label}: ECE {ece:.4f}")  # fmt: skip
    width = 1 / len(cal.bins)
    ax.bar([b.lo for b in cal.bins], [b.count / cal.n_eval for b in cal.bins], width=width, align="edge",
           color="#ccc", alpha=0.6, label="share of tokens per bin")  # fmt: skip
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="top-1 accuracy",
           title=f"Reliability, {len(cal.bins)} bins, {cal.n_eval:,} held-out tokens")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_rejection(ep: ErrorPrediction, path: Path) -> Path:
    """Prediction–rejection curve of entropy, with the oracle and random curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = ep.rejection
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=120)
    ax.plot(r.rates, r.oracle, color="#2ca02c", label=f"oracle (AUC {r.auc_oracle:.3f})")
    ax.plot(r.rates, r.quality, color="#1f77b4", label=f"entropy (AUC {r.auc:.3f}, PRR {r.prr:.3f})")
    ax.axhline(r.random, color="#999", ls="--", label=f"random (AUC {r.random:.3f})")
    ax.set(xlim=(0, 1), ylim=(min(r.random, min(r.quality)) - 0.02, 1.01), xlabel="fraction of tokens rejected",
           ylabel="top-1 accuracy of the kept tokens",
           title=f"Prediction–rejection, {ep.n:,} tokens, AUROC {ep.auroc_entropy:.3f}")  # fmt: skip
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
