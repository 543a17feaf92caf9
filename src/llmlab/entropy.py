"""Entropy (notes §一): the training objective and the model's uncertainty, as pure functions.

    cross-entropy        L(y, p) = −Σᵢ yᵢ log pᵢ   = −log p_target for a one-hot y (the surprisal)
    predictive entropy   H(p)    = −Σᵢ pᵢ log pᵢ
    perplexity           exp(mean L)
    temperature          p_T = softmax(z / T): the distribution actually sampled from at temperature T

Sequence-level uncertainty of y = y₁ … y_n given x, with LM-Polygraph's definitions (Fadeeva et al.
2023, arXiv 2311.07383; higher = more uncertain):

    maximum sequence probability   MSP  = −log P(y|x) = −Σₜ log p(yₜ | y<ₜ, x)
    perplexity                     PPL  = −(1/n) Σₜ log p(yₜ | y<ₜ, x)      (the mean NLL, not its exp)
    mean token entropy             MTE  = (1/n) Σₜ H(p(· | y<ₜ, x))
    Monte-Carlo sequence entropy   MCSE = −(1/N) Σₖ log P(y⁽ᵏ⁾|x),  y⁽ᵏ⁾ ~ P(·|x)   (Kuhn et al. 2023,
                                   arXiv 2302.09664): an unbiased estimate of H(Y|x)

All in nats (natural log) unless a function says bits. Every function works from logits through
`log_softmax`, which is stable where softmax followed by log is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.errors import UserError

if TYPE_CHECKING:
    from llmlab.model import GPT
    from llmlab.sampling import SamplingConfig


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of −log p(target) over all positions: the language-model loss.

    Args: logits [..., V], targets [...] (ids). Returns: a scalar tensor, in nats.
    """
    return surprisal(logits, targets).mean()


def check_temperature(temperature: float) -> float:
    """A temperature that defines a distribution: T > 0 (T = 0 is argmax, whose log p is −∞)."""
    if not temperature > 0 or math.isinf(temperature):  # also rejects NaN
        raise UserError(f"temperature must be a positive number, got {temperature}")
    return temperature


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log p_T = log_softmax(z / T). logits [..., V] → [..., V].

    z − max z is divided instead of z (softmax is unchanged by the shift), so a tiny T sends the
    other logits to −∞ rather than overflowing every logit to ±∞, which would make NaN.
    """
    logits = logits.float()
    if temperature != 1.0:
        T = max(check_temperature(temperature), torch.finfo(logits.dtype).tiny)  # a float32 T, not 0
        logits = (logits - logits.amax(-1, keepdim=True)) / T
    return F.log_softmax(logits, dim=-1)


def entropy_of_log_probs(logp: Tensor) -> Tensor:
    """H = −Σ p log p from log p (log_softmax's output). logp [..., V] → [...].

    A token with p = 0 has log p = −∞ and contributes 0 (0 · log 0 = 0): log p is clamped to the
    most negative finite float first, so the product is 0, not NaN.
    """
    return -(logp.exp() * logp.clamp(min=torch.finfo(logp.dtype).min)).sum(-1)


def surprisal(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """−log p_T(target) for each position. logits [..., V], targets [...] → [...] nats."""
    logp = log_probs(logits, temperature)  # [..., V]
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def predictive_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H(p_T) = −Σ p log p of the next-token distribution at temperature T. logits [..., V] → [...] nats.

    Written as −Σ p · log p with log p from log_softmax; terms with p = 0 contribute 0.
    """
    return entropy_of_log_probs(log_probs(logits, temperature))


def entropy_of_probs(probs: Tensor) -> Tensor:
    """H(p) of probabilities that may hold exact zeros (after top-k / top-p). probs [..., V] → [...].

    Uses entr(p) = −p log p with entr(0) = 0, so a truncated or one-hot distribution is exact.
    """
    return torch.special.entr(probs.float()).sum(-1)


def sampling_entropy(logits: Tensor, cfg: SamplingConfig) -> Tensor:
    """The entropy of the distribution `llmlab.sampling` actually draws from under `cfg`
    (temperature, then top-k, then top-p; temperature 0 is greedy, entropy 0). logits [..., V] → [...]."""
    from llmlab.sampling import probs_from_logits

    return entropy_of_probs(probs_from_logits(logits, cfg))


def top_alternatives(logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The k most likely next tokens and their probabilities p_T, most likely first.

    logits [..., V] → (probs [..., k], ids [..., k]); k is capped at V.
    """
    if k < 0:
        raise UserError(f"the number of alternatives must be >= 0, got {k}")
    logp = log_probs(logits, temperature)  # [..., V]
    top = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)
    return top.values.exp(), top.indices


def perplexity(mean_cross_entropy: float) -> float:
    """exp(mean cross-entropy in nats): the effective number of equally likely next tokens.
    Above ~709 nats (a tiny temperature) it exceeds the largest float: inf."""
    try:
        return math.exp(mean_cross_entropy)
    except OverflowError:
        return math.inf


def nats_to_bits(x: Tensor | float) -> Tensor | float:
    return x / math.log(2)


# --- sequence level (LM-Polygraph) -----------------------------------------------------------


def maximum_sequence_probability(surprisals: Sequence[float] | Tensor) -> float:
    """MSP = −log P(y|x) = Σₜ surprisalₜ (LM-Polygraph's `MaximumSequenceProbability`)."""
    return float(torch.as_tensor(surprisals, dtype=torch.float64).sum())


def mean_nll(surprisals: Sequence[float] | Tensor) -> float:
    """PPL = (1/n) Σₜ surprisalₜ, LM-Polygraph's `Perplexity` estimator; exp of it is the perplexity."""
    return float(torch.as_tensor(surprisals, dtype=torch.float64).mean())


def mean_token_entropy(entropies: Sequence[float] | Tensor) -> float:
    """MTE = (1/n) Σₜ H(pₜ) (LM-Polygraph's `MeanTokenEntropy`)."""
    return float(torch.as_tensor(entropies, dtype=torch.float64).mean())


@dataclass(frozen=True)
class MonteCarloEntropy:
    estimate: float  # MCSE = −(1/N) Σₖ log P(y⁽ᵏ⁾|x), nats per continuation
    std_error: float  # of the estimate: std(−log P(y⁽ᵏ⁾|x)) / √N
    normalized: float  # −(1/N) Σₖ (1/nₖ) log P(y⁽ᵏ⁾|x), nats per token (LM-Polygraph's normalized MCSE)
    sample_log_probs: list[float]  # log P(y⁽ᵏ⁾|x) of each continuation
    samples: list[list[int]]  # the continuations' ids


def monte_carlo_sequence_entropy(model: GPT, prompt_ids: Sequence[int], n_samples: int, max_new_tokens: int,
                                 cfg: SamplingConfig, seed: int = 0) -> MonteCarloEntropy:  # fmt: skip
    """Draw N continuations of `max_new_tokens` tokens with `llmlab.sampling` (all N as one batch)
    and average −log P(y⁽ᵏ⁾|x), where log P sums the log-probability of each drawn token under the
    distribution it was drawn from (so temperature, top-k and top-p count).

    E[−log P(Y|x)] = H(Y|x) exactly, so MCSE is an unbiased estimate of the sequence entropy.
    """
    from llmlab.sampling import generate_ids

    if n_samples < 2 or max_new_tokens < 1:
        raise UserError(f"Monte-Carlo entropy needs >= 2 samples of >= 1 token, got {n_samples} × {max_new_tokens}")
    device = next(model.parameters()).device
    idx = torch.tensor([list(prompt_ids)] * n_samples, device=device)  # [N, S₀]
    generator = torch.Generator(device=device).manual_seed(seed)
    drawn, logp = [], torch.zeros(n_samples, dtype=torch.float64, device=device)  # [N]
    for nxt, probs in generate_ids(model, idx, max_new_tokens, cfg, generator):
        logp += probs.gather(-1, nxt[:, None]).squeeze(-1).double().log()  # [N]
        drawn.append(nxt)
    nll = -logp.cpu()  # [N]
    return MonteCarloEntropy(
        estimate=float(nll.mean()), std_error=float(nll.std() / math.sqrt(n_samples)),
        normalized=float((nll / max_new_tokens).mean()), sample_log_probs=logp.cpu().tolist(),
        samples=torch.stack(drawn, dim=1).tolist(),
    )  # fmt: skip
