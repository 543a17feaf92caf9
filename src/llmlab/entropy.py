"""Entropy (notes §一): the training objective and the model's uncertainty, as pure functions.

    cross-entropy        L(y, p) = −Σᵢ yᵢ log pᵢ   = −log p_target for a one-hot y (the surprisal)
    predictive entropy   H(p)    = −Σᵢ pᵢ log pᵢ
    perplexity           exp(mean L)

All in nats (natural log) unless a function says bits. Every function works from logits through
`log_softmax`, which is stable where softmax followed by log is not.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean of −log p(target) over all positions: the language-model loss.

    Args: logits [..., V], targets [...] (ids). Returns: a scalar tensor, in nats.
    """
    return surprisal(logits, targets).mean()


def surprisal(logits: Tensor, targets: Tensor) -> Tensor:
    """−log p(target) for each position. logits [..., V], targets [...] → [...] nats."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [..., V]
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def predictive_entropy(logits: Tensor) -> Tensor:
    """H(p) = −Σ p log p of the next-token distribution. logits [..., V] → [...] nats.

    Written as −Σ p · log p with log p from log_softmax; terms with p = 0 contribute 0.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # [..., V]
    return -(logp.exp() * logp).sum(-1)


def perplexity(mean_cross_entropy: float) -> float:
    """exp(mean cross-entropy in nats): the effective number of equally likely next tokens."""
    return math.exp(mean_cross_entropy)


def nats_to_bits(x: Tensor | float) -> Tensor | float:
    return x / math.log(2)
