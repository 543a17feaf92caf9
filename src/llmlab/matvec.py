"""Decoding one token is a matrix-vector product per weight: make it use every core.

Generating with a KV cache feeds one token per step, so each linear layer computes y = x·Wᵀ + b
with x a single row [1, H_in]: every weight is read once per token and the speed is the memory
bandwidth. PyTorch's CPU kernel for that product (MKL's gemv) runs on one thread. Measured on
this project's 2-core machine with GPT-2 124M's weights (`python -m benchmarks.bench_matvec`):
11-17 GB/s through `F.linear`, 16-32 GB/s when the rows of W are split into a batch of two and
multiplied by `torch.bmm` as x·Wᵢᵀ, which runs the batch on both threads (a plain `sum()`
reads 23-42 GB/s there, as the shared machine drifts). The layout matters: the same bmm
written as Wᵢ·x with x a column [n, K, 1] was a quarter as fast.

    W [N, K] ─ first n·⌊N/n⌋ rows as a view [n, N/n, K] ─ bmm: x [n, 1, K] · [n, K, N/n] ─► y [n · N/n]
             └ the N mod n rows left over ─ mm ───────────────────────────────► y [N mod n]

The split changes no arithmetic: each output is still the dot product of one row of W with x
(equal to `F.linear` up to float rounding, tested). It is used only where it pays: one input
row (or a few, below), on the CPU, with more than one thread, and a weight of at least
`MIN_ELEMENTS` (smaller ones sit in cache, where the plain kernel is faster); and only where no
gradient is taken, no `torch.func` transform (vmap, jvp) is active and no forward-mode level
(`torch.autograd.forward_ad.dual_level`) is open, because the blocks write into one output buffer
(`out=`), which neither autograd nor those transforms follow.

A few rows (up to `FEW_ROWS`: a speculative verification of γ + 1 drafts, a short prompt) have
the same trouble: MKL shares [M, K]·[K, N] out between the threads poorly when M is small. The
same split, x [parts, M, K]·[parts, K, N/parts], is 1.2-1.8× as fast as `F.linear` for 5-16
rows of GPT-2's matrices here, and the gain fades towards 64 rows (`bench_matvec`, the
`rows` columns). Its output [parts, M, N/parts] is copied once into [M, N].

A token's products are small enough that Python's share counts: for one row and a weight whose
rows split evenly (on 2 threads, all of GPT-2's but the output layer's 50,257), the batch's
output is already y's layout, and the call skips the buffer and the slicing (measured once
against the general path: about 20 of 140 µs for GPT-2's [2304, 768] W^QKV, 3-4% of a token).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn

MIN_ELEMENTS = 1 << 18  # 1 MiB of fp32: GPT-2 124M's matrices are 0.6-38.6 M elements, the tiny preset's 65 K
FEW_ROWS = 32  # rows: 1.1-1.3× `F.linear` at 32 in `bench_matvec`, 0.9-2.0× at 64


def split_matvec(x: Tensor, weight: Tensor, bias: Tensor | None, parts: int) -> Tensor:
    """x·Wᵀ + b for one row or a few, x [..., K] (M rows in all), W [N, K], with W's rows in
    `parts` blocks multiplied as one batch. → [..., N]."""
    N, K = weight.shape
    M = x.numel() // K
    n = N // parts  # rows per block
    rows = n * parts
    xs = x.reshape(1, M, K).expand(parts, M, K)  # [parts, M, K]
    if M == 1 and rows == N:  # the common case, a token through a weight whose rows split evenly:
        blocks = weight.view(parts, n, K).transpose(1, 2)  # [parts, K, n], a view
        z = torch.bmm(xs, blocks) if bias is None else torch.baddbmm(bias.view(parts, 1, n), xs, blocks)
        return z.view(*x.shape[:-1], N)  # [parts, 1, n] is already y's layout: no buffer, no slicing
    blocks = weight[:rows].view(parts, n, K).transpose(1, 2)  # [parts, K, n], a view
    y = x.new_empty(M, N)  # [M, N]: the blocks and the leftover rows write into it, no concatenation
    head = y[:, :rows].view(M, parts, n).transpose(0, 1)  # [parts, M, n], a view of y
    out = head if M == 1 else None  # bmm writes a strided `out=` slowly: for more rows, its own buffer, copied
    if bias is None:
        z = torch.bmm(xs, blocks, out=out)
    else:
        z = torch.baddbmm(bias[:rows].view(parts, 1, n), xs, blocks, out=out)  # b + x·Wᵢᵀ in one pass
    if out is None:
        head.copy_(z)  # [parts, M, n] → y's blocks of n columns
    if rows < N:
        tail, x2 = y[:, rows:], x.reshape(M, K)  # [M, N mod parts]
        if bias is None:
            torch.mm(x2, weight[rows:].T, out=tail)
        else:
            torch.addmm(bias[rows:], x2, weight[rows:].T, out=tail)
    return y.view(*x.shape[:-1], N)


def one_row(x: Tensor) -> bool:
    return x.numel() == x.shape[-1]


def rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def no_grad_taken(*tensors: Tensor | None) -> bool:
    """Whether autograd would record nothing of an op on these tensors."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def use_split(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> bool:
    return (
        0 < rows_of(x) <= FEW_ROWS  # fails first, for every call of many rows
        and weight.numel() >= MIN_ELEMENTS
        and x.device.type == "cpu"
        and torch.get_num_threads() > 1
        and weight.dtype == x.dtype
        and no_grad_taken(x, weight, bias)  # the split writes into a buffer (`out=`), which autograd does not follow,
        and not torch._C._are_functorch_transforms_active()  # nor do torch.func's vmap and jvp
        and no_dual_level()  # nor forward-mode AD's dual tensors
    )


def no_dual_level() -> bool:
    """Whether no `forward_ad.dual_level()` is open (its tangents do not follow `out=` either)."""
    return getattr(forward_ad, "_current_level", 0) < 0  # the module's own count; if it is renamed, no split


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict), with `split_matvec` for a few input rows."""

    weight16: Tensor | None = None  # a 16-bit copy of the weight, set inside `weights_in`

    def forward(self, x: Tensor) -> Tensor:
        if self.weight16 is not None and one_row(x) and no_grad_taken(x, self.weight, self.bias):
            return matvec16(x, self.weight16, self.bias)  # inside `weights_in`; the copy has no gradient
        if use_split(x, self.weight, self.bias):
            return split_matvec(x, self.weight, self.bias, torch.get_num_threads())
        return F.linear(x, self.weight, self.bias)


# --- 16-bit weights: half the bytes per token -------------------------------------------------


def matvec16(x: Tensor, weight16: Tensor, bias: Tensor | None) -> Tensor:
    """x·Wᵀ + b for one fp32 row x [..., K], with W [N, K] stored in fp16 or bf16. → [..., N] fp32.

    x is rounded to W's dtype, PyTorch's 16-bit matrix-vector kernel accumulates in fp32 on every
    thread, and its result is rounded to 16 bits, then widened back; b is added in fp32. bf16 goes
    through `torch.mv`, which on a CPU with AVX512-BF16 read GPT-2's bf16 weights at 20-27 GB/s
    against `F.linear`'s 14-22 (a 2-core Sapphire Rapids, torch 2.13); fp16 through `F.linear`,
    faster than `torch.mv` on both machines measured (11 against 8 GB/s there).
    """
    if weight16.dtype == torch.bfloat16:
        y = torch.mv(weight16, x.reshape(-1).to(weight16.dtype)).to(x.dtype).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x.to(weight16.dtype), weight16).to(x.dtype)
    return y if bias is None else y + bias


@contextmanager
def weights_in(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Inside the block, the large `Linear`s of `model` (≥ `MIN_ELEMENTS`) multiply one input row
    by a copy of their weight in `dtype` (torch.float16 or torch.bfloat16).

    Decoding a token reads every weight once, so its time is bytes over bandwidth, and 16 bits
    halve the bytes. On an AVX2 CPU fp16 pays most: the F16C instructions widen it in hardware,
    while bf16 is widened in software; with AVX512-BF16 bf16 pays, and fp16 runs at half its
    speed (`python -m benchmarks.bench_matvec`, the `matvec16` columns). Only one-row products
    change: a prompt's rows still multiply by the fp32 parameter (without 16-bit matrix
    instructions PyTorch runs those 2-3× slower), and biases, norms, embeddings, attention, the
    KV cache and the softmax stay fp32, and so does any product
    whose gradient is taken. The copies are made on entry, so edits to the parameters inside the
    block are not seen, and are dropped on exit (an enclosing block's copies come back). fp16
    overflows above 65,504: a model whose activations grow that large needs bf16.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"16-bit weights are torch.float16 or torch.bfloat16, got {dtype}")
    large = [m for m in model.modules() if isinstance(m, Linear) and m.weight.numel() >= MIN_ELEMENTS]
    before = [m.__dict__.get("weight16") for m in large]  # a block around this one keeps its copies
    try:
        copies: dict[int, Tensor] = {}  # one copy per weight: Linears that share a weight share it
        for module in large:
            w = module.weight
            if id(w) not in copies:
                copies[id(w)] = w.detach().to(dtype)
            module.weight16 = copies[id(w)]
        yield model
    finally:
        for module, copy in zip(large, before, strict=True):
            module.__dict__.pop("weight16", None)
            if copy is not None:
                module.weight16 = copy
