"""Knowledge editing (notes §2.3; the survey arXiv 2401.01286): change one fact, leave the rest.

Every method edits W₂ (`blocks[l].mlp.w2.weight`, [H, F]), the FFN's value matrix: the MLP
output is W₂ k + b₂ with the key k = f(x W₁ + b₁) (`mlp.hook_post`, [F]). Where an edit acts
(`site`) is a choice that causal tracing informs:

    subject   the subject's last token, where causal tracing finds GPT-2's facts (ROME's choice):
              one key k*, and every later position reads the edited state through attention
    answer    every position whose next-token logits predict an answer token: the prompt's last
              token, then each answer token but the last (for a one-token answer, the prompt's
              last token alone). For a model that looks facts up late, where each token of a
              multi-token answer (" October", " 2", ",", " 1996") is looked up where it is predicted

FT-L (Zhu et al. 2020, arXiv 2012.00363; as ROME's baseline): fine-tune one layer's W₂ on the
new answer, each step projected back into an L∞ ball around the original weights:

    W ← clip(W − η · Adam(∇_W L), W₀ − ε, W₀ + ε),       L = −(1/T) Σ_j log p(o_j | prompt, o_<j)

ROME (Meng et al. 2022, arXiv 2202.05262, eq. 2): a rank-one update that maps k* to v*,

    W' = W + Λ (C⁻¹ k*)ᵀ,     Λ = (v* − W k* − b) / ((C⁻¹ k*)ᵀ k*)

so W' k* + b = v*, and W' k = W k for every key with (C⁻¹ k*)ᵀ k = 0. C = E[k kᵀ] is the second
moment of the layer's keys over the model's own training text (plus ρ · mean(diag C) · I, which
makes it invertible when ReLU neurons never fire). With P keys K* = [k*_1 … k*_P] ([F, P], the
`answer` site), the same constrained least squares (ROME's appendix A: keep W K ≈ V over the
training keys, subject to W' K* + b = V*) has the rank-P solution

    W' = W + (V* − W K* − b) (K*ᵀ C⁻¹ K*)⁻¹ (C⁻¹ K*)ᵀ

which is eq. 2 when P = 1. v* = W k* + b + δ, where δ minimises

    −log p(o | prompt; mlp_out + δ at s) + β · KL(p(· | s) ‖ p(· | s; + δ)) + γ ‖δ‖² / ‖W k* + b‖²

by Adam, with ‖δ‖ clamped to κ ‖W k* + b‖ (one δ per key): the answer becomes likely, what
follows the bare subject does not move, δ stays small. Several requests are applied one after
the other.

MEMIT (Meng et al. 2023, arXiv 2210.07229, eq. 14–16): many facts at once, spread over layers
R = {l₁ < … < l_m}. For each fact i (and each of its sites), a target z_i = h_i + δ_i for the
residual stream at the last layer of R (δ_i found as above), then for the j-th layer l_j of R (j = 1 … m) in order, with
the current model (edited at l_1 … l_{j−1}):

    r_i = (z_i − h_i^{l_m}) / (m − j + 1)         (this layer's share of the gap that is left)
    ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹                  R = [r_i] [H, n],  K = [k_i] [F, n]

With one fact and one layer, ΔW = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k): ROME's update as λ → 0.

Edits change the model in place; `snapshot`/`restore` undo them.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from llmlab import data as data_lib
from llmlab.errors import UserError
from llmlab.knowledge import Encoded, Fact, answer_logprob, encode, pad
from llmlab.model import GPT
from llmlab.run_dir import atomic_write
from llmlab.tokenizer import Tokenizer


@dataclass(frozen=True)
class EditParams:
    layers: tuple[int, ...] | None = None  # None: `default_layers`
    steps: int = 25  # optimisation steps (δ for ROME and MEMIT; the weights for FT-L)
    lr: float = 0.5  # Adam's learning rate for those steps
    kl_weight: float = 0.0625  # β
    weight_decay: float = 0.5  # γ
    clamp_norm: float = 4.0  # κ
    ridge: float = 1e-3  # ρ, added to C
    mom2_weight: float = 300.0  # λ, MEMIT's weight of the keys to preserve
    norm_constraint: float = 1e-3  # ε, FT-L's L∞ radius
    stats_tokens: int = 100_000  # training tokens over which C is estimated, at most (whole windows of the split)
    contexts: int = 0  # extra prefixes, cut from the training text, to average k* and fit δ over
    site: Literal["subject", "answer"] = "subject"  # where keys are read and δ added (module docstring)

    def __post_init__(self) -> None:
        for name in ("steps", "stats_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.contexts < 0:
            raise UserError(f"contexts must not be negative, got {self.contexts}")
        for name in ("lr", "clamp_norm", "norm_constraint"):
            if not 0 < getattr(self, name) < math.inf:  # also NaN
                raise UserError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        for name in ("kl_weight", "weight_decay", "ridge", "mom2_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                raise UserError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise UserError(f"give each --layer once, got {', '.join(map(str, self.layers))}")


DEFAULTS = {
    "ft-l": EditParams(lr=5e-3, norm_constraint=5e-3),
    "rome": EditParams(),
    "memit": EditParams(),
}


def default_layers(n_layers: int, method: str) -> tuple[int, ...]:
    """ROME and FT-L edit the middle layer m = ⌈L/2⌉ − 1; MEMIT layers m − 2 … m + 1 (those that exist)."""
    middle = max(0, (n_layers + 1) // 2 - 1)
    if method != "memit":
        return (middle,)
    return tuple(range(max(0, middle - 2), min(n_layers, middle + 2)))


@dataclass
class Request:
    """One fact to write, encoded: `rows` is the prompt itself, then the prompt after each context
    prefix; `essence` the bare subject, whose next-token distribution is kept (the KL term)."""

    fact: Fact
    rows: list[Encoded]
    essence: list[int]


def prepare(tokenizer: Tokenizer, fact: Fact, contexts: Sequence[str], block_size: int) -> Request:
    rows = [encode(tokenizer, fact, prefix, block_size) for prefix in ("", *contexts)]
    return Request(fact, rows, rows[0].ids[: rows[0].subject_last + 1])


def context_prefixes(tokenizer: Tokenizer, tokens: np.ndarray, n: int, length: int = 12, seed: int = 0) -> list[str]:
    """n short pieces of the training text, each ending in a space, to put before a prompt."""
    if n == 0 or len(tokens) <= length:
        return []
    starts = np.random.default_rng([seed, 11]).integers(0, len(tokens) - length, size=n)
    return [tokenizer.decode(tokens[s : s + length].tolist()).strip() + " " for s in starts]


# --- keys and their second moment C -------------------------------------------------------------


SITES = ("subject", "answer")


def positions(e: Encoded, site: str) -> list[int]:
    """The positions of `e.inputs` an edit acts on (module docstring): [subject's last] or the
    answer-predicting positions."""
    return [e.subject_last] if site == "subject" else list(e.answer_positions)


@torch.no_grad()
def keys_at(model: GPT, rows: Sequence[Encoded], layer: int, site: str = "subject") -> Tensor:
    """The keys (`mlp.hook_post` of `layer`) at the edit's sites, averaged over `rows` (one fact's
    prompt and its context-prefixed copies, which share their target). → [P, F]."""
    name = f"blocks.{layer}.mlp.hook_post"
    _, cache = model.run_with_cache(pad([e.inputs for e in rows]).to(_device(model)), names=[name])
    return torch.stack([cache[name][i, positions(e, site)] for i, e in enumerate(rows)]).double().mean(0)


@torch.no_grad()
def second_moments(model: GPT, tokens: np.ndarray, layers: Sequence[int], n_tokens: int,
                   batch_size: int = 16) -> dict[int, Tensor]:  # fmt: skip
    """C_l = (1/n) Σ_t k_t k_tᵀ over n tokens of the training text, in random windows. [F, F] each."""
    S = model.cfg.block_size
    starts = data_lib.batch_starts(len(tokens), S, max(1, n_tokens // S), seed=0, stream=7, index=0)
    names = [f"blocks.{layer}.mlp.hook_post" for layer in layers]
    F = model.cfg.ff_width
    sums = {layer: torch.zeros(F, F, dtype=torch.float64) for layer in layers}
    count = 0
    for i in range(0, len(starts), batch_size):
        x, _ = data_lib.get_batch(tokens, S, starts[i : i + batch_size])  # [B, S]
        _, cache = model.run_with_cache(x.to(_device(model)), names=names)
        for layer, name in zip(layers, names, strict=True):
            k = cache[name].reshape(-1, F).double().cpu()  # [B·S, F]
            sums[layer] += k.T @ k
        count += x.numel()
    return {layer: s / count for layer, s in sums.items()}


def keys_hash(model: GPT, layer: int) -> str:
    """A digest of every weight that a key at `layer` depends on (not W₂ of `layer`, nor later
    layers): an edit of W₂ leaves the layer's keys, and so their cached C, valid."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        parts = name.split(".")
        if name.startswith(("unembed.", "ln_final.")):
            continue
        if parts[0] == "blocks" and (int(parts[1]) > layer or (int(parts[1]) == layer and "mlp.w2" in name)):
            continue
        h.update(name.encode() + p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class KeyStatistics:
    """C_l for any layer: read from a cache file in `read_dirs` if one was computed for this model's
    keys (same `keys_hash`), else estimated from `tokens`. `save(folder)` caches them on disk."""

    model: GPT
    tokens: np.ndarray | None
    n_tokens: int = 100_000
    read_dirs: Sequence[Path] = ()
    log: Callable[[str], None] = lambda _: None
    memo: dict[int, tuple[str, Tensor]] = field(default_factory=dict)  # layer → (keys_hash, C)
    seconds: float = 0.0  # spent estimating

    def __call__(self, layer: int) -> Tensor:
        self.ensure([layer])
        return self.memo[layer][1]

    def ensure(self, layers: Sequence[int]) -> None:
        missing = [layer for layer in layers if layer not in self.memo and not self._read(layer)]
        if not missing:
            return
        if self.tokens is None:
            raise UserError("no training tokens to estimate the keys' second moment C from (the run has no "
                            "data/train.bin); ft-l needs none")  # fmt: skip
        t0 = time.perf_counter()
        n = min(self.n_tokens, len(self.tokens))
        for layer, C in second_moments(self.model, self.tokens, missing, n).items():
            self.memo[layer] = (keys_hash(self.model, layer), C)
        self.seconds += time.perf_counter() - t0
        S = self.model.cfg.block_size
        used = max(1, n // S) * S  # second_moments' whole windows
        self.log(f"C of layer(s) {missing} from {used:,} training tokens in {time.perf_counter() - t0:.1f} s")

    def _file(self, folder: Path, layer: int) -> Path:
        return folder / "knowledge" / f"keys_l{layer}_n{self.n_tokens}.safetensors"

    def _read(self, layer: int) -> bool:
        digest = keys_hash(self.model, layer)
        for folder in self.read_dirs:
            path = self._file(folder, layer)
            if path.is_file() and (stored := load_file(path)).get("hash_" + digest) is not None:
                self.memo[layer] = (digest, stored["C"])
                return True
        return False

    def save(self, folder: Path) -> None:
        for layer, (digest, C) in self.memo.items():
            tensors = {"C": C, "hash_" + digest: torch.zeros(0)}
            atomic_write(self._file(folder, layer), lambda tmp, t=tensors: save_file(t, str(tmp)))


def regularised_inverse_times(C: Tensor, ridge: float, rhs: Tensor) -> Tensor:
    """(C + ρ · mean(diag C) · I)⁻¹ · rhs, in float64."""
    F = C.shape[0]
    C = C.to(rhs.device)  # the statistics live on the CPU (cached as files); the keys on the model's device
    reg = C + ridge * C.diagonal().mean().clamp_min(1e-12) * torch.eye(F, dtype=C.dtype, device=C.device)
    return torch.linalg.solve(reg, rhs.to(C.dtype))


# --- δ: the change of a hidden state that makes the model say the new answer -------------------


def optimise_delta(model: GPT, req: Request, hook_name: str, p: EditParams) -> tuple[Tensor, Tensor]:
    """δ [P, H] added to `hook_name` at the P edit sites (module docstring), the same δ in every
    row; the bare subject gets δ₁ at its last token (the KL term). Returns (δ, h), h [P, H] the
    hidden states there in the first row before the change."""
    device = _device(model)
    rows = [*(e.inputs for e in req.rows), req.essence]
    idx = pad(rows).to(device)  # [n + 1, S]
    sites = [positions(e, p.site) for e in req.rows]
    ess = len(rows) - 1
    # (row, position, which δ) for every site of every row, then the bare subject's last token
    row = torch.tensor([i for i, s in enumerate(sites) for _ in s] + [ess], device=device)
    col = torch.tensor([j for s in sites for j in s] + [len(req.essence) - 1], device=device)
    which = torch.tensor([j for s in sites for j in range(len(s))] + [0], device=device)
    logits, cache = model.run_with_cache(idx, names=[hook_name])
    h = cache[hook_name][0, sites[0]].detach()  # [P, H]
    keep = torch.log_softmax(logits[ess, col[-1]].detach().float(), -1)  # [V]
    delta = torch.zeros_like(h, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=p.lr)

    def add(x: Tensor, hook: object) -> Tensor:
        return x.index_put((row, col), x[row, col] + delta[which])

    for _ in range(p.steps):
        with model.hooks([(hook_name, add)]):
            logits = model(idx)  # [n + 1, S, V]
        nll = torch.stack([-answer_logprob(logits[i, list(e.answer_positions)], e.target) / len(e.target)
                           for i, e in enumerate(req.rows)]).mean()  # fmt: skip
        new = torch.log_softmax(logits[ess, col[-1]].float(), -1)
        kl = torch.sum(keep.exp() * (keep - new))
        loss = nll + p.kl_weight * kl + p.weight_decay * delta.pow(2).sum() / h.pow(2).sum().clamp_min(1e-12)
        if nll.item() < 0.05:
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        opt.step()
        with torch.no_grad():  # ‖δ_j‖ ≤ κ ‖h_j‖
            scale = (p.clamp_norm * h.norm(dim=-1) / delta.norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)  # [P]
            delta.mul_(scale.unsqueeze(-1))
    return delta.detach(), h


# --- the three methods ---------------------------------------------------------------------------


def rome_update(W: Tensor, b: Tensor | None, k: Tensor, v: Tensor, C: Tensor, ridge: float) -> Tensor:
    """ΔW = (V − W K − b) (Kᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ, for one key the rank-one Λ (C⁻¹k)ᵀ with
    Λ = (v − W k − b) / ((C⁻¹k)ᵀ k). W [H, F]; k [F] and v [H], or K [F, P] and V [H, P] → [H, F]."""
    K, V = (k.double(), v.double()) if k.dim() == 2 else (k.double()[:, None], v.double()[:, None])
    U = regularised_inverse_times(C, ridge, K)  # [F, P]: C⁻¹ K
    residual = V - W.double() @ K - (b.double()[:, None] if b is not None else 0)  # [H, P]
    return (residual @ torch.linalg.solve(K.T @ U, U.T)).to(W.dtype)  # [H, P] [P, F]


def memit_update(R: Tensor, K: Tensor, C: Tensor, mom2_weight: float, ridge: float) -> Tensor:
    """ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹. R [H, n], K [F, n] → [H, F]."""
    A = mom2_weight * C.to(K.device, torch.float64) + K.double() @ K.double().T  # [F, F]
    return regularised_inverse_times(A, ridge, (R.double() @ K.double().T).T).T  # [H, F]


@dataclass
class EditResult:
    method: str
    layers: tuple[int, ...]
    seconds: float
    requests: int


def rome(model: GPT, requests: Sequence[Request], stats: Callable[[int], Tensor], p: EditParams) -> None:
    (layer,) = p.layers or (0,)
    mlp = model.blocks[layer].mlp
    for req in requests:
        K = keys_at(model, req.rows, layer, p.site).T  # [F, P]: k* (P = 1 at the subject)
        delta, _ = optimise_delta(model, req, f"blocks.{layer}.hook_mlp_out", p)  # [P, H]
        with torch.no_grad():
            b = mlp.w2.bias.double()[:, None] if mlp.w2.bias is not None else 0
            V = mlp.w2.weight.double() @ K + b + delta.double().T  # [H, P]: v*
            mlp.w2.weight += rome_update(mlp.w2.weight, mlp.w2.bias, K, V, stats(layer), p.ridge)


def memit(model: GPT, requests: Sequence[Request], stats: Callable[[int], Tensor], p: EditParams) -> None:
    layers = sorted(p.layers or ())
    z_name = f"blocks.{layers[-1]}.hook_resid_post"
    found = [optimise_delta(model, req, z_name, p) for req in requests]
    z = torch.cat([h + d for d, h in found]).double()  # [n, H]: targets for the last layer's stream, n sites
    mains = [req.rows[0] for req in requests]
    for i, layer in enumerate(layers):
        K = torch.cat([keys_at(model, req.rows, layer, p.site) for req in requests])  # [n, F]
        _, cache = model.run_with_cache(pad([e.inputs for e in mains]).to(_device(model)), names=[z_name])
        now = torch.cat([cache[z_name][j, positions(e, p.site)] for j, e in enumerate(mains)]).double()  # [n, H]
        R = (z - now) / (len(layers) - i)  # [n, H]
        with torch.no_grad():
            w = model.blocks[layer].mlp.w2.weight
            w += memit_update(R.T, K.T, stats(layer), p.mom2_weight, p.ridge).to(w.dtype)


def ft_l(model: GPT, requests: Sequence[Request], stats: Callable[[int], Tensor], p: EditParams) -> None:
    (layer,) = p.layers or (0,)
    w = model.blocks[layer].mlp.w2.weight
    w0 = w.detach().clone()
    opt = torch.optim.Adam([w], lr=p.lr)
    mains = [req.rows[0] for req in requests]
    idx = pad([e.inputs for e in mains]).to(_device(model))
    for _ in range(p.steps):
        logits = model(idx)  # [n, S, V]
        nll = torch.stack([-answer_logprob(logits[i, list(e.answer_positions)], e.target) / len(e.target)
                           for i, e in enumerate(mains)]).mean()  # fmt: skip
        (w.grad,) = torch.autograd.grad(nll, [w])
        opt.step()
        with torch.no_grad():
            w.copy_(w0 + (w - w0).clamp(-p.norm_constraint, p.norm_constraint))
    w.grad = None


EDITORS: dict[str, Callable[[GPT, Sequence[Request], Callable[[int], Tensor], EditParams], None]] = {
    "ft-l": ft_l,
    "rome": rome,
    "memit": memit,
}


def check_method(method: str) -> None:
    if method not in EDITORS:
        raise UserError(f"unknown editing method {method!r} (choose from: {', '.join(EDITORS)})")


def resolve_params(model: GPT, method: str, params: EditParams | None) -> EditParams:
    check_method(method)
    p = params or DEFAULTS[method]
    layers = p.layers or default_layers(model.cfg.n_layers, method)
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad:
        raise UserError(f"layer {bad[0]} does not exist (the model has layers 0 to {model.cfg.n_layers - 1})")
    if p.site not in SITES:
        raise UserError(f"unknown site {p.site!r} (choose from: {', '.join(SITES)})")
    if method != "memit" and len(layers) != 1:
        raise UserError(f"{method} edits one layer, got layers {list(layers)}")
    return replace(p, layers=tuple(layers))


def apply_edits(model: GPT, method: str, requests: Sequence[Request], stats: Callable[[int], Tensor],
                params: EditParams) -> EditResult:  # fmt: skip
    """Edit `model` in place with EDITORS[method]; params must come from `resolve_params`."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    EDITORS[method](model, requests, stats, params)
    model.train(was_training)
    return EditResult(method, params.layers or (), time.perf_counter() - t0, len(requests))


def snapshot(model: GPT, layers: Sequence[int]) -> dict[int, Tensor]:
    return {layer: model.blocks[layer].mlp.w2.weight.detach().clone() for layer in layers}


def restore(model: GPT, saved: dict[int, Tensor]) -> None:
    """Undo edits: each saved W₂ copied back, and any gradient an edit left on it dropped."""
    with torch.no_grad():
        for layer, w in saved.items():
            model.blocks[layer].mlp.w2.weight.copy_(w)
            model.blocks[layer].mlp.w2.weight.grad = None


def _device(model: GPT) -> torch.device:
    return next(model.parameters()).device
