"""Activation patching and causal tracing: where in the network does a fact live? (notes §2.3)

Meng et al. 2022, "Locating and Editing Factual Associations in GPT" (ROME, arXiv 2202.05262), §2.
Three runs of the same prompt, e.g. "Anya Briar Forger was born in" → "Denver":

    clean       the model as it is:                               p* = p(Denver)
    corrupted   the subject's token embeddings plus noise ε ~ N(0, (ν σ)²), with σ the standard
                deviation of those embeddings and ν = 3:           p₀
    restored    corrupted, except that one hidden state h_i^(l) (token i, layer l) is set back to
                its clean value:                                   p_{i,l}

The indirect effect of h_i^(l) is IE = p_{i,l} − p₀: how much of the fact that one state alone
carries past the corruption. It is measured for the residual stream (`hook_resid_post`), the
MLP's output (`hook_mlp_out`) and the attention's output (`hook_attn_out`) at every layer and
token, averaged over `samples` draws of the noise. For an answer of several tokens, p is the
probability of all of them, Π_j p(t_j | prompt, t_<j).

Activation patching is the general operation: replace an activation of one run by that of
another (`patch`); causal tracing is patching clean states into a corrupted run. Over many
facts, `average_by_role` averages the effects by the token's role in the prompt (first, middle
and last subject token, the first token after it, further tokens, the last token), as ROME's
Figure 2 does for GPT-2 XL, where the MLPs' effect peaks at the last subject token in the middle
layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llmlab.errors import UserError
from llmlab.hooks import HookPoint
from llmlab.knowledge import Encoded, Fact, answer_logprob, encode
from llmlab.model import GPT
from llmlab.score import token_pieces
from llmlab.tokenizer import Tokenizer

KINDS = {"resid": "blocks.{}.hook_resid_post", "mlp": "blocks.{}.hook_mlp_out", "attn": "blocks.{}.hook_attn_out"}

HookFn = Callable[[Tensor, HookPoint], Tensor]


def patch(source: Tensor, positions: Tensor) -> HookFn:
    """A hook that sets x[r, positions[r]] = source[positions[r]] for every row r with
    positions[r] ≥ 0 (−1: leave the row alone). source [S, H] (one clean run), positions [B]."""

    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        rows = torch.nonzero(positions >= 0).squeeze(-1)  # [R]
        x = x.clone()
        x[rows, positions[rows]] = source[positions[rows]].to(x.dtype)
        return x

    return fn


def add_noise(noise: Tensor, positions: range) -> HookFn:
    """A hook that adds noise [B, len(positions), H] to x[:, positions]: the corruption."""

    def fn(x: Tensor, hook: HookPoint) -> Tensor:
        x = x.clone()
        x[:, positions.start : positions.stop] += noise.to(x.dtype)
        return x

    return fn


MAX_NOISE = 100  # ν, in standard deviations; ROME uses 3. Far beyond it the corrupted activations overflow


@dataclass
class Trace:
    tokens: list[str]  # the prompt's tokens, decoded
    subject: range  # their positions that are the subject
    p_clean: float  # p* = p(answer | prompt)
    p_corrupt: float  # p₀ = p(answer | prompt with the subject's embeddings corrupted)
    restored: dict[str, Tensor]  # kind → p_{i,l}, [S, L]: answer probability with h_i^(l) restored
    noise_std: float  # ν σ, the standard deviation of the noise added

    def effect(self, kind: str) -> Tensor:
        """Indirect effect IE = p_{i,l} − p₀, [S, L]."""
        return self.restored[kind] - self.p_corrupt

    def peak(self, kind: str) -> tuple[int, int, float]:
        """(token, layer, IE) where the indirect effect of `kind` is largest."""
        ie = self.effect(kind)
        flat = int(ie.argmax())
        token, layer = divmod(flat, ie.shape[1])
        return token, layer, float(ie[token, layer])

    def to_json(self) -> dict:
        peaks = {k: dict(zip(("token", "layer", "effect"), self.peak(k), strict=True)) for k in self.restored}
        for p in peaks.values():
            p["token_text"] = self.tokens[p["token"]]
            p["subject_last"] = p["token"] == self.subject[-1]
        return {
            "tokens": self.tokens, "subject": [self.subject.start, self.subject.stop], "p_clean": self.p_clean,
            "p_corrupt": self.p_corrupt, "noise_std": self.noise_std, "peaks": peaks,
            "restored": {k: v.tolist() for k, v in self.restored.items()},
            "effects": {k: self.effect(k).tolist() for k in self.restored},
        }  # fmt: skip


@torch.no_grad()
def causal_trace(model: GPT, tokenizer: Tokenizer, fact: Fact, noise: float = 3.0, samples: int = 10,
                 seed: int = 0, kinds: tuple[str, ...] = tuple(KINDS)) -> Trace:  # fmt: skip
    """Causal tracing of one fact (module docstring). noise is ν, the multiple of σ."""
    if not 0 <= noise <= MAX_NOISE or samples < 1:  # NaN fails too
        raise UserError(f"noise must be a number from 0 to {MAX_NOISE} (multiples of the embeddings' std) and "
                        f"samples >= 1, got {noise} and {samples}")  # fmt: skip
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UserError(f"unknown hidden state {unknown[0]!r} (choose from: {', '.join(KINDS)})")
    fact = encode(tokenizer, fact, block_size=model.cfg.block_size)
    device = next(model.parameters()).device
    idx = torch.tensor([fact.inputs], device=device)  # [1, T]
    S, L = len(fact.ids), model.cfg.n_layers
    names = [KINDS[k].format(layer) for k in kinds for layer in range(L)]
    logits, clean = model.run_with_cache(idx, names=["hook_embed", *names])
    p_clean = _answer_prob(logits, fact).item()
    subject_embeds = clean["hook_embed"][0, fact.subject.start : fact.subject.stop]  # [s, H]
    sigma = subject_embeds.float().std(correction=0).item() if subject_embeds.numel() > 1 else 0.0
    gen = torch.Generator(device=device).manual_seed(seed)
    eps = torch.randn(samples, len(fact.subject), model.cfg.d_model, generator=gen, device=device)  # [n, s, H]
    eps = eps * noise * sigma
    corrupt = add_noise(eps, fact.subject)
    with model.hooks([("hook_embed", corrupt)]):
        p_corrupt = _answer_prob(model(idx.expand(samples, -1)), fact).mean().item()
    restored = {}
    positions = torch.arange(S, device=device).repeat_interleave(samples)  # [S·n]: row group i restores token i
    batch = idx.expand(S * samples, -1)  # [S·n, T]
    noisy = add_noise(eps.repeat(S, 1, 1), fact.subject)
    for kind in kinds:
        grid = torch.zeros(S, L)
        for layer in range(L):
            name = KINDS[kind].format(layer)
            with model.hooks([("hook_embed", noisy), (name, patch(clean[name][0], positions))]):
                p = _answer_prob(model(batch), fact)  # [S·n]
            grid[:, layer] = p.view(S, samples).mean(1).cpu()
        restored[kind] = grid
    tokens = token_pieces(tokenizer, fact.ids)  # a byte token inside a character is "", the next completes it
    return Trace(tokens, fact.subject, p_clean, p_corrupt, restored, noise * sigma)


# --- many facts: the indirect effect by token role (ROME's Figure 2) -----------------------------

ROLES = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
         "further tokens", "last token")  # fmt: skip


def role_of(token: int, subject: range, n_tokens: int) -> int | None:
    """The index in ROLES of a prompt token; None for tokens before the subject. The prompt's last
    token is "last token" even when it is also the first after the subject; a one-token subject is
    its "last subject token"."""
    if token == n_tokens - 1:
        return 5
    if token in subject:
        return 2 if token == subject[-1] else 0 if token == subject[0] else 1
    if token < subject.start:
        return None
    return 3 if token == subject.stop else 4


@dataclass
class AverageTrace:
    facts: int
    p_clean: float  # mean p* over the facts
    p_corrupt: float  # mean p₀
    effects: dict[str, Tensor]  # kind → mean indirect effect [len(ROLES), L]; NaN where no fact has the role

    def peak(self, kind: str) -> tuple[str, int, float]:
        """(role, layer, mean IE) where the mean indirect effect of `kind` is largest."""
        ie = self.effects[kind].nan_to_num(float("-inf"))
        r, layer = divmod(int(ie.argmax()), ie.shape[1])
        return ROLES[r], layer, float(ie[r, layer])

    def to_json(self) -> dict:
        return {
            "facts": self.facts, "p_clean": self.p_clean, "p_corrupt": self.p_corrupt, "roles": list(ROLES),
            "peaks": {k: dict(zip(("role", "layer", "effect"), self.peak(k), strict=True)) for k in self.effects},
            "effects": {k: [[None if math.isnan(x) else x for x in row] for row in v.tolist()]
                        for k, v in self.effects.items()},
        }  # fmt: skip


def average_by_role(traces: Sequence[Trace]) -> AverageTrace:
    """Each trace's indirect effects averaged within each token role, then over the traces that
    have the role (a prompt with a two-token subject has no middle subject tokens)."""
    kinds = list(traces[0].restored)
    L = traces[0].restored[kinds[0]].shape[1]
    sums = {k: torch.zeros(len(ROLES), L) for k in kinds}
    counts = torch.zeros(len(ROLES), 1)
    for t in traces:
        roles = [role_of(i, t.subject, len(t.tokens)) for i in range(len(t.tokens))]
        for r in set(roles) - {None}:
            rows = [i for i, x in enumerate(roles) if x == r]
            counts[r] += 1
            for k in kinds:
                sums[k][r] += t.effect(k)[rows].mean(0)
    n = len(traces)
    return AverageTrace(n, sum(t.p_clean for t in traces) / n, sum(t.p_corrupt for t in traces) / n,
                        {k: v / counts for k, v in sums.items()})  # fmt: skip


def _answer_prob(logits: Tensor, fact: Encoded) -> Tensor:
    """p(answer) per row. logits [B, T, V] → [B]."""
    return answer_logprob(logits[:, list(fact.answer_positions)], fact.target).exp()


# --- heat maps --------------------------------------------------------------------------------

TITLES = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


def plot_trace(trace: Trace, out: Path, target: str = "") -> list[Path]:
    """One heat map per kind: p(answer) with h_i^(l) restored, tokens × layers, subject marked *."""
    labels = [f"{t!r}*" if i in trace.subject else repr(t) for i, t in enumerate(trace.tokens)]
    return [_heat_map(grid, labels, kind, f"p({target.strip() or 'answer'})", min(trace.p_corrupt, float(grid.min())),
                      out / f"trace_{kind}.png") for kind, grid in trace.restored.items()]  # fmt: skip


def plot_average(avg: AverageTrace, out: Path) -> list[Path]:
    """One heat map per kind: the mean indirect effect, token roles × layers."""
    return [_heat_map(grid, list(ROLES), kind, f"mean indirect effect ({avg.facts} facts)", None,
                      out / f"trace_average_{kind}.png") for kind, grid in avg.effects.items()]  # fmt: skip


def _heat_map(grid: Tensor, labels: list[str], kind: str, label: str, vmin: float | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(2.2 + 0.45 * grid.shape[1], 0.9 + 0.32 * grid.shape[0]), dpi=120)
    im = ax.imshow(grid.numpy(), cmap={"resid": "Purples", "mlp": "Greens", "attn": "Reds"}[kind], vmin=vmin,
                   aspect="auto")  # fmt: skip
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("layer")
    ax.set_title(f"restoring the {TITLES[kind]}", fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
