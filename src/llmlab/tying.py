"""Weight tying (notes §2.1): the output layer reuses the token embedding's matrix W [V, H], and
W gets one gradient, written once.

W is used twice in a forward pass, so autograd computes two gradients for it and adds them: the
output layer's, a dense product gᵀ·h [V, H], and the embedding lookup's, a [V, H] tensor of
zeros with the B·S looked-up rows filled in. For GPT-2 (V = 50257, H = 768) each is 154 MB and
so is their sum, all three freshly allocated every step. `TiedGradient` instead keeps the output
layer's gradient and adds the lookup's B·S rows into it in place:

    tie = TiedGradient()
    x = tie.lookup(idx, W)      # forward W[idx];  backward: grad_W[idx] += g, handed to autograd
    ...
    logits = tie.head(h, W)     # forward h·Wᵀ;    backward: grad_W = gᵀ·h, kept in the tie

The lookup's backward always runs after the head's, because the head reads what the lookup
produced; the gradient autograd accumulates is the same sum (tested against plain autograd). On
an AMD CPU the head also computes its product as (W·hᵀ)ᵀ (`TRANSPOSED_HEAD`): there MKL multiplied
[V, H]·[H, B·S] about 1.4× faster than [B·S, H]·[H, V], while on an Intel Sapphire Rapids the
plain h·Wᵀ made the whole 124M step 1.034× faster (930 against 962 ms, in turns). Together they
make a GPT-2 124M training step (B = 1, S = 256) 1.09–1.41× as fast on the 2-core AMD machine
(`python -m benchmarks.bench_tying`: 1.41×, 109 against 78 tokens/s, on 2026-12-01; 1.09×
inside that day's `make bench`) and 1.36× on the Intel one (252 against 185, 2026-12-02).

It pays only where [V, H] is large, so the model takes this path for matrices of at least
`MIN_ELEMENTS` (at nanoGPT's V = 65, H = 128 the two autograd.Functions cost as much as they
save), and only while training with gradients and not under torch.compile, which cannot trace the
hand-over. Inference, and `torch.autograd.grad` on an eval-mode model, use plain autograd.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.machine import cpuinfo

MIN_ELEMENTS = 1 << 20  # 4 MB of fp32; GPT-2's W_E is 38.6 M elements


TRANSPOSED_HEAD = cpuinfo("vendor_id") == "AuthenticAMD"  # the CPU head's product as (W·hᵀ)ᵀ; see above


class TiedGradient:
    """One forward pass's hand-over of W's gradient from the output layer to the lookup."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None  # [V, H], the output layer's part, until the lookup takes it

    def lookup(self, idx: Tensor, weight: Tensor) -> Tensor:
        """idx [B, S] → W[idx] [B, S, H]."""
        return _Lookup.apply(idx, weight, self)

    def head(self, h: Tensor, weight: Tensor) -> Tensor:
        """h [B, S, H] → logits h·Wᵀ [B, S, V]."""
        return _Head.apply(h, weight, self)


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, tie: TiedGradient) -> Tensor:
        kind = h.device.type
        autocast = (torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)  # not on "meta"
                    and weight.dtype != torch.float64)  # which autocast leaves alone  # fmt: skip
        dtype = torch.get_autocast_dtype(kind) if autocast else weight.dtype
        w = weight.to(dtype)  # [V, H]: under autocast its copy, cast once and kept for the backward
        ctx.save_for_backward(h, w)
        ctx.tie, ctx.weight_dtype = tie, weight.dtype
        rows = h.reshape(-1, h.shape[-1]).to(dtype)  # [B·S, H]
        transposed = TRANSPOSED_HEAD and kind == "cpu"
        logits = (w @ rows.T).T.contiguous() if transposed else rows @ w.T  # [B·S, V]
        return logits.view(*h.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        h, w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # [B·S, V]; bf16 under autocast, as the forward product was
        rows = h.reshape(-1, h.shape[-1]).to(g.dtype)  # [B·S, H]
        ctx.tie.grad = (g.T @ rows).to(ctx.weight_dtype)  # [V, H], fresh: the lookup adds into it in place
        return (g @ w.to(g.dtype)).view(h.shape).to(h.dtype), None, None


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, idx: Tensor, weight: Tensor, tie: TiedGradient) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.tie, ctx.weight_shape = tie, weight.shape
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        (idx,) = ctx.saved_tensors
        tie = ctx.tie
        total = tie.grad if tie.grad is not None else grad.new_zeros(ctx.weight_shape)  # [V, H]
        tie.grad = None
        total.index_add_(0, idx.reshape(-1), grad.reshape(-1, grad.shape[-1]))  # the B·S looked-up rows
        return None, total, None
