"""One-row products with GPT-2 124M's weights, in GB/s of weight read: `F.linear` against
`llmlab.matvec.split_matvec` and oneDNN's inner product (`matvec.onednn_linear`) on the weight
as stored and packed (`matvec.pack`), the figures quoted in `llmlab/matvec.py` and the README;
what 16-bit weights (half the bytes, `llmlab.matvec.weights_in`) take: `matvec16`'s time over
the fp32 product llmlab uses; and for a few rows (`ROWS`, a speculative verification or a short
prompt), the split's time over oneDNN's.

    python -m benchmarks.bench_matvec

Each matrix is repeated until a pass over them outgrows the caches (≥ 256 MB), as in decoding;
the products take turns (A B A B …) in every repetition.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import interleaved_medians
from llmlab import matvec

SHAPES = {"attention qkv": (2304, 768), "attention out": (768, 768), "ffn up": (3072, 768),
          "ffn down": (768, 3072), "output layer": (50257, 768)}  # fmt: skip
ROWS = (5, 16, 32)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Prints a markdown table.").parse_args(argv)
    if not matvec.ONEDNN:
        raise SystemExit("bench_matvec: this PyTorch has no oneDNN (torch.backends.mkldnn)")
    table()


@torch.inference_mode()
def table() -> None:
    threads = torch.get_num_threads()
    print(f"| weight [N, K] | F.linear GB/s | split_matvec GB/s ({threads} threads) | oneDNN GB/s | oneDNN packed GB/s "
          "| matvec16 time ÷ llmlab's fp32, bf16 | fp16 | "
          + " | ".join(f"{m} rows: split time ÷ oneDNN" for m in ROWS) + " |\n|---|---|---|---|---|---|---|"
          + "---|" * len(ROWS))  # fmt: skip
    for name, (N, K) in SHAPES.items():
        print(f"| {name} [{N}, {K}] | " + " | ".join(shape_row(N, K, threads)) + " |")
    src = torch.ones(1 << 26)
    (t,) = interleaved_medians([src.sum], 5)
    print(f"\nread bandwidth, tensor.sum() over 256 MB: {src.numel() * 4 / t / 1e9:.1f} GB/s")


def shape_row(N: int, K: int, threads: int) -> list[str]:
    """One table row's cells for a weight [N, K]."""
    weights = [torch.randn(N, K) for _ in range(max(1, (256 << 20) // (N * K * 4)))]
    packed = [matvec.pack(w) for w in weights]
    x = torch.randn(1, 1, K)
    gb = len(weights) * N * K * 4 / 1e9

    def each(product: Callable[[Tensor, Tensor], Tensor], ws: list[Tensor] = weights, x: Tensor = x) -> Callable:
        return lambda: [product(x, w) for w in ws]

    def split(x: Tensor, w: Tensor) -> Tensor:
        return matvec.split_matvec(x, w, None, threads)

    def dnn(x: Tensor, w: Tensor) -> Tensor:
        return matvec.onednn_linear(x, w, None)

    fp32 = interleaved_medians([each(F.linear), each(split), each(dnn), each(dnn, packed)], 5)
    cells = [f"{gb / t:.1f}" for t in fp32]
    del packed
    for dtype in (torch.bfloat16, torch.float16):
        halves = [w.to(dtype) for w in weights]
        half, ours = interleaved_medians([each(lambda x, w: matvec.matvec16(x, w, None), halves), each(dnn)], 5)
        cells.append(f"{half / ours:.2f}")
    for m in ROWS:
        xm = torch.randn(1, m, K)
        t_split, t_dnn = interleaved_medians([each(split, x=xm), each(dnn, x=xm)], 5)
        cells.append(f"{t_split / t_dnn:.2f}")
    return cells


if __name__ == "__main__":
    main()
