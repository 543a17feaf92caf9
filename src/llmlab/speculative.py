"""Speculative decoding: a lossless speed-up of sampling, by rejection sampling (notes §二).

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding"
(arXiv 2211.17192), Algorithm 1; Chen et al. 2023, "Accelerating Large Language Model Decoding
with Speculative Sampling" (arXiv 2302.01318), Algorithm 2. A small draft model M_q guesses γ
tokens; the target M_p scores all of them in one forward pass; the rejection step of
`llmlab.rejection`, with envelope M = 1 per token, keeps a prefix of them:

    1. draft    for i = 1..γ:  q_i = M_q(prefix, x_<i),   x_i ~ q_i               (γ small forwards)
    2. score    p_1, …, p_{γ+1} = M_p(prefix, x_1 … x_γ)                          (one target forward)
    3. accept   r_i ~ U(0, 1); x_i is accepted if r_i < p_i(x_i) / q_i(x_i);
                n = the number accepted before the first rejection
    4. correct  n < γ:  t ~ norm(max(0, p_{n+1} − q_{n+1}))     (the residual: mass q under-proposed)
                n = γ:  t ~ p_{γ+1}                               (the bonus token)
    5. emit     x_1 … x_n, t;  roll both KV caches back to prefix + x_1 … x_n

Why it is exact. With β = Σ_x min(p(x), q(x)), the probability that a proposal is accepted,

    P(emit x) = q(x) · min(1, p(x)/q(x)) + (1 − β) · max(0, p(x) − q(x)) / (1 − β)
              = min(p(x), q(x)) + max(0, p(x) − q(x)) = p(x),

so every emitted token is a draw from the target given the tokens before it, whatever the draft
is; the draft only changes the speed. With α = E[β], one target call emits on average
(1 − α^(γ+1)) / (1 − α) tokens (Leviathan et al., eq. 1).

p and q are the distributions actually sampled: `sampling.probs_from_logits` (the one
implementation) applies temperature, top-k and top-p to both, so this reproduces plain sampling
with those settings. At temperature 0 both are one-hot: a draft token is accepted iff it is the
target's argmax, the residual is the target's one-hot, and the output is greedy decoding.

Batches (B > 1). Rows accept different numbers n_b of draft tokens. Every row keeps the batch's
smallest, m = min_b n_b, plus its own token at position m + 1: the row's accepted draft
x_{m+1} if n_b > m, else its correction. This stays exact, for each row's emitted token
at position i ≤ m + 1 is, given everything drawn before step i, a draw from p_i (its acceptance
test and correction use only its own fresh randomness), and the decision to stop after position
m + 1 depends only on acceptance outcomes at positions ≤ m + 1, never on tokens after it: the
discarded drafts of longer rows are thrown away unseen, and the next round draws afresh from
the same prefix. The rows then stay aligned, so the caches need no padding and no per-row
positions. The price is speed: a round emits min_b(n_b) + 1 tokens per row. `tests/
test_speculative.py` checks the joint distribution of whole batches against enumeration.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from llmlab.errors import UserError
from llmlab.hooks import direct_attributes
from llmlab.model import GPT, KVCache
from llmlab.run_dir import Run
from llmlab.sampling import Generation, SamplingConfig, generate_ids, generate_text, probs_from_logits, sample

DEFAULT_SAMPLING = SamplingConfig()  # temperature 1, no top-k or top-p: the model's own distribution


@dataclass
class SpeculativeStats:
    """What the draft bought. Counts add up over rows; `tokens` and `target_calls` are per row."""

    gamma: int
    proposed: int = 0  # draft tokens the target judged (up to and including each row's first rejection)
    accepted: int = 0
    target_calls: int = 0
    draft_calls: int = 0
    tokens: int = 0  # tokens emitted per row
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (γ used, tokens emitted) per target call

    @property
    def acceptance_rate(self) -> float:
        """α̂ = accepted / proposed: estimates α = E[Σ min(p, q)]."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        return self.tokens / self.target_calls if self.target_calls else float("nan")

    @property
    def expected_tokens_per_target_call(self) -> float:
        """The formula's 1 + α̂ + … + α̂^γᵣ averaged over the rounds, γᵣ the drafts of round r: γ,
        but fewer in the last rounds, where fewer tokens are left to make (batch 1)."""
        gammas = [g for g, _ in self.rounds] or [self.gamma]
        return sum(expected_tokens_per_call(self.acceptance_rate, g) for g in gammas) / len(gammas)

    def add(self, other: SpeculativeStats) -> None:
        """Accumulate another generation's counts (same γ)."""
        for name in ("proposed", "accepted", "target_calls", "draft_calls", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.rounds += other.rounds

    def to_json(self) -> dict[str, Any]:
        """The figures, with None where nothing was measured (no draft token judged yet)."""
        alpha = self.acceptance_rate
        return {
            "gamma": self.gamma, "acceptance_rate": _number(alpha),
            "tokens_per_target_call": _number(self.tokens_per_target_call),
            "expected_tokens_per_target_call": _number(self.expected_tokens_per_target_call),
            "proposed": self.proposed, "accepted": self.accepted, "target_calls": self.target_calls,
            "draft_calls": self.draft_calls, "tokens": self.tokens,
        }  # fmt: skip


def _number(x: float) -> float | None:
    return None if math.isnan(x) else x


def expected_tokens_per_call(alpha: float, gamma: int) -> float:
    """(1 − α^(γ+1)) / (1 − α) = 1 + α + … + α^γ: tokens per target call (Leviathan et al., eq. 1)."""
    return float(sum(alpha**i for i in range(gamma + 1)))


# --- the five steps -------------------------------------------------------------------------


def propose(draft: GPT, cache: KVCache, tokens: Tensor, gamma: int, cfg: SamplingConfig,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Step 1: γ tokens from the draft, each fed back. tokens [B, T] → x [B, γ], q [B, γ, V].

    The cache holds the first `cache.pos` tokens; x_γ is drawn but not fed (no one needs q_{γ+1}).
    """
    xs, qs = [], []
    new = tokens[:, cache.pos :]  # [B, T − P]: what the draft has not seen yet
    for _ in range(gamma):
        q = probs_from_logits(draft(new, cache=cache)[:, -1], cfg)  # [B, V]
        x = sample(q, generator)  # [B]
        xs.append(x)
        qs.append(q)
        new = x[:, None]  # [B, 1]
    if not xs:
        return tokens[:, :0], tokens.new_zeros(0)
    return torch.stack(xs, dim=1), torch.stack(qs, dim=1)  # [B, γ], [B, γ, V]


def score(target: GPT, cache: KVCache, tokens: Tensor, x: Tensor, cfg: SamplingConfig) -> Tensor:
    """Step 2: one target forward over its unseen tokens and the γ drafts → p [B, γ+1, V]."""
    new = torch.cat([tokens[:, cache.pos :], x], dim=1)  # [B, T − P + γ]
    logits = target(new, cache=cache)[:, -(x.shape[1] + 1) :]  # [B, γ+1, V]
    return probs_from_logits(logits, cfg)


def accept(p: Tensor, q: Tensor, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Step 3: ok [B, γ] = (r_i < p_i(x_i) / q_i(x_i)), tested as r·q < p, and n [B] = the
    number of accepted drafts before each row's first rejection."""
    px = p[:, :-1].gather(-1, x[..., None]).squeeze(-1)  # [B, γ]
    qx = q.gather(-1, x[..., None]).squeeze(-1)  # [B, γ]
    r = torch.rand(px.shape, generator=generator, device=px.device)  # [B, γ]
    ok = r * qx < px  # [B, γ]; p(x) = 0 is never accepted, p(x) ≥ q(x) always
    n = ok.long().cumprod(dim=1).sum(dim=1)  # [B]
    return ok, n


def residual(p: Tensor, q: Tensor) -> Tensor:
    """Step 4's distribution norm(max(0, p − q)). p, q [B, V] → [B, V].

    Its mass is 1 − β, the rejection probability; where rounding leaves none (p ≤ q everywhere,
    so a rejection had probability 0), it falls back to p.
    """
    r = (p - q).clamp(min=0)  # [B, V]
    mass = r.sum(dim=-1, keepdim=True)  # [B, 1]
    return torch.where(mass > 0, r / mass.clamp(min=torch.finfo(r.dtype).tiny), p)


def correct(p: Tensor, q: Tensor, x: Tensor, ok: Tensor, m: int,
            generator: torch.Generator | None) -> Tensor:  # fmt: skip
    """Step 4 for the batch cut at m: each row's token at position m + 1 → t [B].

    m = γ: the bonus token from p_{γ+1}. Otherwise the row's accepted draft x_{m+1} if it passed
    its test, else a draw from its residual.
    """
    gamma = x.shape[1]
    if m == gamma:
        return sample(p[:, gamma], generator)
    fix = sample(residual(p[:, m], q[:, m]), generator)  # [B]
    return torch.where(ok[:, m], x[:, m], fix)


# --- the loop -------------------------------------------------------------------------------


@torch.inference_mode()  # as `generate_ids`
def speculative_ids(target: GPT, draft: GPT, idx: Tensor, max_new_tokens: int, gamma: int = 4,
                    cfg: SamplingConfig = DEFAULT_SAMPLING, generator: torch.Generator | None = None,
                    stats: SpeculativeStats | None = None) -> Iterator[tuple[Tensor, Tensor]]:  # fmt: skip
    """Speculative decoding with the interface of `sampling.generate_ids`: idx [B, S₀] → yields
    (ids [B], p [B, V]) per position, p being the target distribution the token follows.

    `stats` (optional) is filled in as the rounds go. Both models keep a KV cache over the
    whole generation, so S₀ + max_new_tokens must fit both contexts. Like `generate_ids` it runs
    under `torch.inference_mode`: what it yields, and what hooks see, are inference tensors.
    """
    check_pair(target, draft, gamma, idx.shape[1] + max_new_tokens)
    stats = stats if stats is not None else SpeculativeStats(gamma)
    length = idx.shape[1] + max_new_tokens  # what the caches can come to hold
    cache_p, cache_q = (KVCache(m.cfg, idx.shape[0], idx.device, next(m.parameters()).dtype, length)
                        for m in (target, draft))  # fmt: skip
    tokens, done = idx, 0  # [B, T]
    with direct_attributes(target), direct_attributes(draft):  # as plain decoding does; see hooks.py
        while done < max_new_tokens:
            g = min(gamma, max_new_tokens - done - 1)  # the last round may need fewer drafts
            T = tokens.shape[1]
            x, q = propose(draft, cache_q, tokens, g, cfg, generator)  # [B, g], [B, g, V]
            p = score(target, cache_p, tokens, x, cfg)  # [B, g+1, V]
            ok, n = accept(p, q, x, generator) if g else (None, torch.zeros_like(idx[:, 0]))
            m = int(n.min())  # every row keeps m drafts (see the module docstring)
            t = correct(p, q, x, ok, m, generator)  # [B]
            emitted = torch.cat([x[:, :m], t[:, None]], dim=1)  # [B, m+1]
            cache_p.truncate(T + m)  # step 5: the target's cache keeps prefix + x_1 … x_m
            cache_q.truncate(min(cache_q.pos, T + m))
            tokens = torch.cat([tokens, emitted], dim=1)
            _count(stats, g, n, m)
            for i in range(m + 1):
                yield emitted[:, i], p[:, i]
            done += m + 1


def _count(stats: SpeculativeStats, g: int, n: Tensor, m: int) -> None:
    if g:
        stats.proposed += int(n.clamp(max=g - 1).sum()) + n.numel()  # min(n_b + 1, g) per row
    stats.accepted += int(n.sum())
    stats.target_calls += 1
    stats.draft_calls += g
    stats.tokens += m + 1
    stats.rounds.append((g, m + 1))


@torch.inference_mode()
def side_by_side(target: GPT, draft: GPT, prompts: list[list[int]], n: int, gamma: int, cfg: SamplingConfig,
                 generator: torch.Generator, stats: SpeculativeStats) -> tuple[float, float]:  # fmt: skip
    """(plain, speculative) tokens/s: each prompt decoded for n tokens plainly, then speculatively,
    one right after the other, so that a load on the machine hits both alike."""
    t_plain = t_spec = 0.0
    for ids in prompts:
        idx = torch.tensor([ids], device=next(target.parameters()).device)
        t0 = time.perf_counter()
        for _ in generate_ids(target, idx, n, cfg, generator):
            pass
        t1 = time.perf_counter()
        for _ in speculative_ids(target, draft, idx, n, gamma, cfg, generator, stats):
            pass
        t_plain, t_spec = t_plain + t1 - t0, t_spec + time.perf_counter() - t1
    return n * len(prompts) / t_plain, n * len(prompts) / t_spec


def check_pair(target: GPT, draft: GPT, gamma: int, length: int) -> None:
    """γ ≥ 1, one vocabulary, and prompt + new tokens within both contexts."""
    if gamma < 1:
        raise UserError(f"gamma (draft tokens per round) must be at least 1, got {gamma}")
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise UserError(
            f"the draft's vocabulary has {draft.cfg.vocab_size} tokens but the target's {target.cfg.vocab_size}: "
            "a draft must share its target's tokenizer (train it with --tokenizer-from TARGET_RUN)"
        )
    context = min(target.cfg.block_size, draft.cfg.block_size)
    if length > context:
        raise UserError(
            f"prompt + new tokens = {length} exceed the context of {context} tokens; speculative decoding keeps "
            "both KV caches over the whole generation (no sliding window): lower --max-new-tokens"
        )


def check_same_tokenizer(target: Run, draft: Run) -> None:
    """A draft must use its target's tokenizer: the same ids must mean the same text."""
    if draft.tokenizer.to_json() != target.tokenizer.to_json():
        raise UserError(
            f"the draft {str(draft.path)!r} has another tokenizer than the target {str(target.path)!r} "
            f"({draft.tokenizer.kind}, V={draft.tokenizer.vocab_size} vs {target.tokenizer.kind}, "
            f"V={target.tokenizer.vocab_size}); train the draft with --tokenizer-from TARGET_RUN"
        )
    check_pair(target.model, draft.model, 1, 0)


# --- text -----------------------------------------------------------------------------------


def speculative_text(target: Run, draft: Run, prompt: str, max_new_tokens: int = 200, gamma: int = 4,
                     cfg: SamplingConfig = DEFAULT_SAMPLING, seed: int | None = None, stop: Sequence[str] = (),
                     on_text: Callable[[str], None] | None = None) -> tuple[Generation, SpeculativeStats]:  # fmt: skip
    """`sampling.generate_text` with speculative decoding in place of plain decoding."""
    check_same_tokenizer(target, draft)
    stats = SpeculativeStats(gamma)

    def steps(idx: Tensor, generator: torch.Generator | None) -> Iterator[tuple[Tensor, Tensor]]:
        return speculative_ids(target.model, draft.model, idx, max_new_tokens, gamma, cfg, generator, stats)

    g = generate_text(target.model, target.tokenizer, prompt, max_new_tokens, cfg, seed=seed, stop=stop,
                      on_text=on_text, steps=steps)  # fmt: skip
    return g, stats
