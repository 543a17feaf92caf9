"""Decoding one token is a matrix-vector product per weight: make it use every core.

Generating with a KV cache feeds one token per step, so each linear layer computes y = x·Wᵀ + b
with x a single row [1, H_in]: every weight is read once per token and the speed is the memory
bandwidth. PyTorch's CPU kernel for that product (MKL's gemv) runs on one thread on AMD CPUs
(on every thread on Intel ones: `MKL_MV`, below). Measured on this project's 2-core AMD machine
with GPT-2 124M's weights (`python -m benchmarks.bench_matvec`): 11-17 GB/s through `F.linear`,
16-32 GB/s when the rows of W are split into a batch of two and multiplied by `torch.bmm` as
x·Wᵢᵀ, which runs the batch on both threads (a plain `sum()` reads 23-42 GB/s there, as the
shared machine drifts). The layout matters: the same bmm written as Wᵢ·x with x a column
[n, K, 1] was a quarter as fast.

    W [N, K] ─ first n·⌊N/n⌋ rows as a view [n, N/n, K] ─ bmm: x [n, 1, K] · [n, K, N/n] ─► y [n · N/n]
             └ the N mod n rows left over ─ mm ───────────────────────────────► y [N mod n]

The split changes no arithmetic: each output is still the dot product of one row of W with x
(equal to `F.linear` up to float rounding, tested). It is used only where it pays: one input
row (or a few, below), on the CPU, with more than one thread, and a weight of at least
`MIN_ELEMENTS` (smaller ones sit in cache, where the plain kernel is faster); and only where no
gradient is taken, no `torch.func` transform (vmap, jvp) is active and no forward-mode level
(`torch.autograd.forward_ad.dual_level`) is open, because the blocks write into one output buffer
(`out=`), which neither autograd nor those transforms follow; and not while `torch.compile`
traces the model, which picks its own kernels (`untraced`).

A few rows (up to `FEW_ROWS`: a speculative verification of γ + 1 drafts, a short prompt) have
the same trouble: MKL shares [M, K]·[K, N] out between the threads poorly when M is small. The
same split, x [parts, M, K]·[parts, K, N/parts], is 1.2-1.8× as fast as `F.linear` for 5-16
rows of GPT-2's matrices here, and the gain fades towards 64 rows (`bench_matvec`, the
`rows` columns). Its output [parts, M, N/parts] is copied once into [M, N].

A token's products are small enough that Python's share counts: for one row and a weight whose
rows split evenly (on 2 threads, all of GPT-2's but the output layer's 50,257), the batch's
output is already y's layout, and the call skips the buffer and the slicing (measured once
against the general path: about 20 of 140 µs for GPT-2's [2304, 768] W^QKV, 3-4% of a token).

Where PyTorch is built with oneDNN (its x86 wheels are), fp32 products of a few rows go to
oneDNN's inner-product primitive instead (`onednn_linear`, the kernel `torch.compile` calls for
a CPU linear): it reads W as stored and runs on every thread. On a 2-core AMD EPYC (Zen 5,
AVX-512) `make bench` gave GPT-2 124M's decoding 1.59× transformers' tokens/s with the split
(at 26a15e4) and 1.74-1.75× with oneDNN; per matrix (`bench_matvec`) one row ran at 19-30 GB/s
against the split's 21-24, 5-32 rows 1.2-2.2× as fast as the split, and with one thread
(`OMP_NUM_THREADS=1`) one row 1.1-1.4× as fast as `F.linear` (15.7-20.5 GB/s against 13.0-19.1).
The split remains for other dtypes and for builds without oneDNN.

On Intel CPUs one fp32 row goes to `F.linear` after all (`MKL_MV`): MKL picks its code by the
CPU's vendor, and there its matrix-vector product runs on every thread. On a 2-core Xeon (model
167, two runs of `bench_matvec`) `F.linear` read GPT-2's matrices at 16-21 GB/s (8.5-12 with
`OMP_NUM_THREADS=1`, so it does use both), oneDNN at 10-20 and the split at 16-21; `make bench`
gave GPT-2 124M's decoding 1.09-1.16× transformers' tokens/s through `F.linear` (three runs),
0.94× through oneDNN the run before. A few rows still go to oneDNN, as on other CPUs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn

from llmlab.machine import cpuinfo

MIN_ELEMENTS = 1 << 18  # 1 MiB of fp32: GPT-2 124M's matrices are 0.6-38.6 M elements, the tiny preset's 65 K
FEW_ROWS = 32  # rows: at 32 the split was 1.1-1.3× `F.linear` (AVX2 machine), oneDNN 1.5-2.2× the split (Zen 5)


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


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x·Wᵀ + b through oneDNN's inner product, x [..., K] fp32, W [N, K] as stored or packed. → [..., N]."""
    bias = None if bias is None else bias.contiguous()  # oneDNN reads b as dense whatever its strides
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _has_onednn_linear() -> bool:
    try:  # a private op: if a later PyTorch renames it, the split takes over
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise is not None
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _has_onednn_linear()
MKL_MV = cpuinfo("vendor_id") == "GenuineIntel"  # one fp32 row through F.linear: MKL's gemv threads on Intel CPUs


def one_row(x: Tensor) -> bool:
    return x.numel() == x.shape[-1]


def rows_of(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def no_grad_taken(*tensors: Tensor | None) -> bool:
    """Whether autograd would record nothing of an op on these tensors."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def few_row_product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> str | None:
    """Which fast product x·Wᵀ + b takes: "onednn", "split", or None for `F.linear`."""
    if not (
        0 < rows_of(x) <= FEW_ROWS  # fails first, for every call of many rows
        and weight.numel() >= MIN_ELEMENTS
        and x.device.type == "cpu"
        and weight.dtype == x.dtype
        and no_grad_taken(x, weight, bias)  # neither product has a gradient formula,
        and untraced()  # nor a vmap or forward-mode rule,
        and not torch.is_autocast_enabled("cpu")  # nor casts as autocast would
    ):
        return None
    if MKL_MV and one_row(x) and x.dtype == torch.float32:
        return None  # MKL's own matrix-vector product, on every thread
    if onednn_enabled() and x.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        return "onednn"
    return "split" if torch.get_num_threads() > 1 else None


def untraced() -> bool:
    """Whether neither torch.func's vmap and jvp nor forward-mode AD's dual tensors are active:
    the fast products have no rules for them (and the split writes `out=`, which they do not
    follow); nor is `torch.compile` tracing, whose Inductor lowers oneDNN's inner product only
    for weights it has frozen into constants (an `InductorError` on GPT-2 124M's first one-row
    product, torch 2.13) and picks its own kernel for `F.linear`."""
    return not torch._C._are_functorch_transforms_active() and no_dual_level() and not torch.compiler.is_compiling()


def onednn_enabled() -> bool:
    """oneDNN is built in and not switched off (`torch.backends.mkldnn.flags(enabled=False)`)."""
    return ONEDNN and torch._C._get_mkldnn_enabled()


def no_dual_level() -> bool:
    """Whether no `forward_ad.dual_level()` is open (its tangents do not follow `out=` either)."""
    return getattr(forward_ad, "_current_level", 0) < 0  # the module's own count; if it is renamed, no split


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict), with a fast product for a few input rows."""

    weight_copy: Tensor | None = None  # a 16-bit or a packed fp32 copy of the weight, set inside `weights_in`

    def forward(self, x: Tensor) -> Tensor:
        copy = self.weight_copy  # inside `weights_in`
        if copy is not None and one_row(x) and no_grad_taken(x, self.weight, self.bias) and untraced():
            if not copy.is_mkldnn:
                return matvec16(x, copy, self.bias)
            if x.dtype == torch.float32 and x.device.type == "cpu" and onednn_enabled():  # what the packing assumed
                return onednn_linear(x, copy, self.bias)
        product = few_row_product(x, self.weight, self.bias)
        if product == "onednn":
            return onednn_linear(x, self.weight, self.bias)
        if product == "split":
            return split_matvec(x, self.weight, self.bias, torch.get_num_threads())
        return F.linear(x, self.weight, self.bias)


# --- 16-bit weights: half the bytes per token -------------------------------------------------

BF16_MV = cpuinfo("vendor_id") == "GenuineIntel"  # bf16 one-row products through torch.mv; see matvec16


def matvec16(x: Tensor, weight16: Tensor, bias: Tensor | None) -> Tensor:
    """x·Wᵀ + b for one fp32 row x [..., K], with W [N, K] stored in fp16 or bf16. → [..., N] fp32.

    x is rounded to W's dtype, PyTorch's 16-bit matrix-vector kernel accumulates in fp32 on every
    thread, and its result is rounded to 16 bits, then widened back; b is added in fp32. On an
    Intel CPU bf16 goes through `torch.mv`, which on a 2-core Sapphire Rapids read GPT-2's bf16
    weights at 20-27 GB/s against `F.linear`'s 14-22 (torch 2.13); elsewhere through `F.linear`
    (`BF16_MV`): on a 2-core Zen 5 `torch.mv` read 8-14 GB/s against its 14-19. fp16 goes through
    `F.linear`, as fast as `torch.mv` or faster on every machine measured (30-33 GB/s on the Zen 5).
    On a 2-core Xeon model 167 (L3 105 MiB) 16-bit weights gain less: `bench_matvec` timed bf16 at
    0.67-0.97 and fp16 at 0.51-0.94 of fp32's time, and `make bench`'s fp16 decoding of GPT-2 124M
    ran 1.08-1.39× llmlab's fp32, at 43-46% of the 16-bit bandwidth ceiling.
    """
    if weight16.dtype == torch.bfloat16 and BF16_MV:
        y = torch.mv(weight16, x.reshape(-1).to(weight16.dtype)).to(x.dtype).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x.to(weight16.dtype), weight16).to(x.dtype)
    return y if bias is None else y + bias


@contextmanager
def weights_in(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Inside the block, the large `Linear`s of `model` (≥ `MIN_ELEMENTS`) multiply one input row
    by a copy of their weight: in `dtype` for torch.float16 or torch.bfloat16, or for
    torch.float32 the same numbers in oneDNN's blocked layout (`pack`).

    Decoding a token reads every weight once, so its time is bytes over bandwidth, and 16 bits
    halve the bytes. Which 16-bit type pays depends on the CPU, not on its flags alone: on an
    AVX2 CPU fp16, which F16C widens in hardware, while bf16 is widened in software; on a
    Sapphire Rapids (AVX512-BF16) bf16, with fp16 at half its speed; on a Zen 5 (AVX512-BF16
    too) fp16, twice as fast as bf16 (`python -m benchmarks.bench_matvec`, the `matvec16`
    columns). Packed fp32 reads the same bytes, faster (see `pack`). Only one-row products
    change: a prompt's rows still multiply by the fp32 parameter (without 16-bit matrix
    instructions PyTorch runs those 2-3× slower), and biases, norms, embeddings, attention, the
    KV cache and the softmax stay fp32, and so does any product whose gradient is taken or that
    `torch.compile` traces (it multiplies by the fp32 parameter, `untraced`). The
    copies are made on entry, so edits to the parameters inside the block are not seen, and are
    dropped on exit (an enclosing block's copies come back). fp16 overflows above 65,504: a
    model whose activations grow that large needs bf16. A packed copy is opaque: inside such a
    block `copy.deepcopy(model)` and `torch.save(model)` fail; save the state dict instead.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"copies of the weights are torch.float16, torch.bfloat16 or torch.float32 (packed), got {dtype}"
        )
    if dtype == torch.float32 and not ONEDNN:
        raise ValueError("packed fp32 weights need PyTorch built with oneDNN (torch.backends.mkldnn)")
    large = [m for m in model.modules() if isinstance(m, Linear) and m.weight.numel() >= MIN_ELEMENTS]
    if dtype == torch.float32 and any(m.weight.device.type != "cpu" or m.weight.dtype != dtype for m in large):
        raise ValueError("packed fp32 weights are for a model in fp32 on the CPU")
    before = [m.__dict__.get("weight_copy") for m in large]  # a block around this one keeps its copies
    try:
        copies: dict[int, tuple[Tensor, Tensor]] = {}  # one copy per weight: Linears that share one share it
        for module in large:
            # `copies` keeps w alive, so that its id is not reused: a parametrized weight is new at each access
            w = module.weight
            if id(w) not in copies:
                copies[id(w)] = (w, pack(w.detach()) if dtype == torch.float32 else w.detach().to(dtype))
            module.weight_copy = copies[id(w)][1]
        yield model
    finally:
        for module, copy in zip(large, before, strict=True):
            module.__dict__.pop("weight_copy", None)
            if copy is not None:
                module.weight_copy = copy


def pack(weight: Tensor) -> Tensor:
    """W [N, K] fp32 → the same numbers in oneDNN's blocked layout for its inner product (an
    opaque `torch._mkldnn` tensor, what `torch.compile` freezes a CPU linear's weight into).

    oneDNN reads a packed weight faster than one as stored: on a 2-core Zen 5, 27-36 GB/s
    against 19-30 for GPT-2's matrices (`bench_matvec`), and GPT-2 124M decoded 1.12-1.14× as
    fast as from the weights as stored (`make bench`, the packed row). Packing costs a copy of the
    weights, and time: 0.5-1.1 s for 124M's 498 MB there, as long as decoding 20-50 tokens (0.10 s
    on a Zen 4, 0.21 s on a Xeon model 167, where packed weights decode no faster: `make bench`)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)
