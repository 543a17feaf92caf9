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
another (`patch`); causal tracing is patching clean states into a corrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from llmlab.errors import UserError
from llmlab.hooks import HookPoint
from llmlab.knowledge import Encoded, Fact, answer_logprob, encode
from llmlab.model import GPT
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
        }  # fmt: skip


@torch.no_grad()
def causal_trace(model: GPT, tokenizer: Tokenizer, fact: Fact, noise: float = 3.0, samples: int = 10,
                 seed: int = 0, kinds: tuple[str, ...] = tuple(KINDS)) -> Trace:  # fmt: skip
    """Causal tracing of one fact (module docstring). noise is ν, the multiple of σ."""
    if noise < 0 or samples < 1:
        raise UserError(f"noise must be >= 0 and samples >= 1, got {noise} and {samples}")
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
    tokens = [tokenizer.decode([i]) for i in fact.ids]
    return Trace(tokens, fact.subject, p_clean, p_corrupt, restored, noise * sigma)


def _answer_prob(logits: Tensor, fact: Encoded) -> Tensor:
    """p(answer) per row. logits [B, T, V] → [B]."""
    return answer_logprob(logits[:, list(fact.answer_positions)], fact.target).exp()


# --- heat maps --------------------------------------------------------------------------------

TITLES = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}


def plot_trace(trace: Trace, out: Path, target: str = "") -> list[Path]:
    """One heat map per kind: p(answer) with h_i^(l) restored, tokens × layers, subject marked *."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    labels = [f"{t!r}*" if i in trace.subject else repr(t) for i, t in enumerate(trace.tokens)]
    paths = []
    for kind, grid in trace.restored.items():
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * grid.shape[1], 0.9 + 0.32 * grid.shape[0]), dpi=120)
        im = ax.imshow(grid.numpy(), cmap={"resid": "Purples", "mlp": "Greens", "attn": "Reds"}[kind],
                       vmin=min(trace.p_corrupt, float(grid.min())), aspect="auto")  # fmt: skip
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("layer")
        ax.set_title(f"restoring the {TITLES[kind]}", fontsize=10)
        fig.colorbar(im, ax=ax, label=f"p({target.strip() or 'answer'})")
        fig.tight_layout()
        path = out / f"trace_{kind}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
