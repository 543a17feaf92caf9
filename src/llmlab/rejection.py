"""Rejection sampling (notes §二 拒绝采样; the notes leave the section empty, this module writes it).

To draw from a target density p when only a proposal q can be sampled, pick an envelope M with
p(x) ≤ M·q(x) for every x, then repeat

    1. draw x ~ q and u ~ U(0, 1)
    2. accept x if u · M · q(x) < p(x), else go back to 1

Accepted draws are distributed exactly as p: P(x drawn and accepted) = q(x) · p(x) / (M·q(x)) =
p(x) / M, so the acceptance rate is 1/M (Z/M when p is unnormalised with total mass Z) and a
sample costs M proposals on average. Where p(x) > M·q(x) the accepted draws follow
min(p, M·q) instead of p, which is silently wrong; so every proposal is checked and an envelope
that fails raises `EnvelopeViolation`, quoting the x and the M it needs.

The same accept/reject step is at the heart of two other instruments: speculative decoding
(`llmlab.speculative`: M = 1 per token, plus a residual distribution for the rejected mass) and
rejection-sampling fine-tuning (`llmlab.rft`: a verifier in place of the ratio p/(M·q)).

References: von Neumann 1951 ("Various techniques used in connection with random digits");
Robert & Casella, *Monte Carlo Statistical Methods* (2004), §2.3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from llmlab.errors import UserError

Density = Callable[[Tensor], Tensor]  # x [N, ...] → p(x) [N]
Proposal = Callable[[int, "torch.Generator | None"], Tensor]  # (N, generator) → x [N, ...], drawn from q


MAX_BATCH = 1 << 20  # proposals drawn at once
# The number of proposals until the n-th acceptance is negative-binomial with mean n·M; for n = 1 it
# exceeds k times the mean with probability e^(−k). Requests expecting more than 1/10 of the budget
# are refused up front, so an accepted one runs out of budget with probability at most e^(−10).
BUDGET_MARGIN = 10


class EnvelopeViolation(UserError):
    """p(x) > M·q(x) at a proposed x: M is not an envelope, and the samples would be wrong."""


@dataclass
class RejectionResult:
    samples: Tensor  # [n, ...] draws from p
    proposed: int  # proposals drawn up to and including the n-th acceptance

    @property
    def accepted(self) -> int:
        return self.samples.shape[0]

    @property
    def acceptance_rate(self) -> float:
        """accepted / proposed; its expectation is 1/M for a normalised p."""
        return self.accepted / self.proposed if self.proposed else float("nan")


def rejection_sample(p: Density, q: Density, propose: Proposal, M: float, n: int,
                     generator: torch.Generator | None = None, batch: int | None = None,
                     max_proposals: int = 10_000_000) -> RejectionResult:  # fmt: skip
    """Draw n samples from p with proposals from q and envelope M (p ≤ M·q).

    Proposals are drawn `batch` at a time (default: about n·M), and the count stops at the n-th
    acceptance, so `proposed` is exactly what the one-at-a-time algorithm would have used.
    Raises EnvelopeViolation at the first proposal with p(x) > M·q(x).
    """
    if not (M > 0 and math.isfinite(M)):
        raise UserError(f"the envelope M must be a positive finite number, got {M}")
    if n < 1:
        raise UserError(f"the number of samples must be at least 1, got {n}")
    if BUDGET_MARGIN * n * M > max_proposals:  # a normalised p accepts 1/M of the proposals
        raise UserError(f"{n:,} samples at an acceptance rate of 1/M = {1 / M:.3g} need about {n * M:.3g} "
                        f"proposals on average, more than 1/{BUDGET_MARGIN} of the budget of {max_proposals:,}: "
                        "use a proposal closer to p")  # fmt: skip
    batch = batch or min(MAX_BATCH, max(64, math.ceil(1.2 * n * M)))
    kept: list[Tensor] = []
    have, proposed = 0, 0
    while have < n:
        if proposed >= max_proposals:
            raise UserError(f"only {have} of {n} samples accepted after {proposed:,} proposals (acceptance ≈ 1/M)")
        x = propose(batch, generator)  # [batch, ...]
        px, qx = p(x), q(x)  # [batch]
        check_envelope(x, px, qx, M)  # in their own dtype, whose rounding it allows
        px, qx = px.double(), qx.double()
        u = torch.rand(px.shape, generator=generator, dtype=torch.float64, device=px.device)  # [batch]
        ok = u * M * qx < px  # [batch]
        need = n - have
        hits = ok.nonzero().squeeze(-1)  # [accepted]
        if len(hits) >= need:  # stop the count at the n-th acceptance
            proposed += int(hits[need - 1]) + 1
            kept.append(x[hits[:need]])
            have = n
        else:
            proposed += batch
            kept.append(x[hits])
            have += len(hits)
    return RejectionResult(torch.cat(kept), proposed)


def rounding(*tensors: Tensor) -> float:
    """The relative error p/q may carry from rounding: a few ulps of the coarsest floating dtype
    (float32's 0.4 is 0.40000000596, so p/q = 0.4/0.25 reads 1.6000000238), at least 1e-9."""
    return max([1e-9] + [4 * torch.finfo(t.dtype).eps for t in tensors if t.is_floating_point()])


def check_envelope(x: Tensor, px: Tensor, qx: Tensor, M: float) -> None:
    """Raise EnvelopeViolation if p(x) > M·q(x) (beyond rounding) for any proposal x."""
    bad = px > M * qx * (1 + rounding(px, qx))  # [N]
    if bad.any():
        i = int(bad.nonzero()[0])
        need = float(px[i] / qx[i]) if qx[i] > 0 else math.inf
        where = x[i].tolist()
        raise EnvelopeViolation(
            f"M = {M:g} is not an envelope: p(x) = {float(px[i]):.6g} > M·q(x) = {float(M * qx[i]):.6g} "
            f"at x = {where}; this x needs M >= {need:.6g}"
        )


# --- discrete distributions -----------------------------------------------------------------


def discrete_envelope(p: Tensor, q: Tensor) -> float:
    """The smallest valid M for probability vectors p, q [K]: max over p's support of p/q
    (∞ if q is 0 where p is not)."""
    support = p > 0
    if (q[support] <= 0).any():
        return math.inf
    return float((p[support] / q[support]).max())


def rejection_sample_discrete(p: Tensor, q: Tensor, M: float, n: int,
                              generator: torch.Generator | None = None) -> RejectionResult:  # fmt: skip
    """Rejection sampling of categories 0..K−1 from p [K] with proposals from q [K].

    The envelope is checked up front over the whole support (a discrete p lets us), not only
    at the categories that happen to be proposed.
    """
    needed = discrete_envelope(p, q)
    if needed > M * (1 + rounding(p, q)):
        raise EnvelopeViolation(f"M = {M:g} is not an envelope: p/q reaches {needed:.6g}, so M must be >= that")
    return rejection_sample(
        p=lambda x: p[x],
        q=lambda x: q[x],
        propose=lambda size, g: torch.multinomial(q, size, replacement=True, generator=g),
        M=M, n=n, generator=generator,
    )  # fmt: skip
