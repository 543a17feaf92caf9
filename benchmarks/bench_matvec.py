"""One-row products with GPT-2 124M's weights: `F.linear` against `llmlab.matvec.split_matvec`, in GB/s
of weight read (the figures quoted in `llmlab/matvec.py` and the README), and what 16-bit weights
(half the bytes, `llmlab.matvec.weights_in`) take: `matvec16`'s time over `split_matvec`'s; and
for a few rows (`ROWS`, a speculative verification or a short prompt), `F.linear`'s time over the
split's.

    python -m benchmarks.bench_matvec

Each matrix is repeated until a pass over them outgrows the caches (≥ 256 MB), as in decoding.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import median_seconds
from llmlab.matvec import matvec16, split_matvec

SHAPES = {"attention qkv": (2304, 768), "attention out": (768, 768), "ffn up": (3072, 768),
          "ffn down": (768, 3072), "output layer": (50257, 768)}  # fmt: skip
ROWS = (5, 16, 32, 64)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Prints a markdown table.").parse_args(argv)
    table()


@torch.inference_mode()
def table() -> None:
    threads = torch.get_num_threads()
    print(f"| weight [N, K] | F.linear GB/s | split_matvec GB/s ({threads} threads) "
          "| matvec16 time ÷ split_matvec, bf16 | fp16 | "
          + " | ".join(f"{m} rows: F.linear time ÷ split" for m in ROWS) + " |\n|---|---|---|---|---|"
          + "---|" * len(ROWS))  # fmt: skip
    for name, (N, K) in SHAPES.items():
        copies = max(1, (256 << 20) // (N * K * 4))
        weights = [torch.randn(N, K) for _ in range(copies)]
        x = torch.randn(1, 1, K)
        gb = copies * N * K * 4 / 1e9
        plain = median_seconds(lambda x=x, ws=weights: [F.linear(x, w) for w in ws], 5)
        split = median_seconds(lambda x=x, ws=weights: [split_matvec(x, w, None, threads) for w in ws], 5)
        ratios = []
        for dtype in (torch.bfloat16, torch.float16):
            halves = [w.to(dtype) for w in weights]
            ratios.append(median_seconds(lambda x=x, ws=halves: [matvec16(x, w, None) for w in ws], 5) / split)
            del halves
        few = []
        for m in ROWS:
            xm = torch.randn(1, m, K)
            many = median_seconds(lambda x=xm, ws=weights: [F.linear(x, w) for w in ws], 5)
            split_many = median_seconds(lambda x=xm, ws=weights: [split_matvec(x, w, None, threads) for w in ws], 5)
            few.append(many / split_many)
        print(f"| {name} [{N}, {K}] | {gb / plain:.1f} | {gb / split:.1f} | {ratios[0]:.2f} | {ratios[1]:.2f} | "
              + " | ".join(f"{r:.2f}" for r in few) + " |")  # fmt: skip
    src = torch.ones(1 << 26)
    print(f"\nread bandwidth, tensor.sum() over 256 MB: {src.numel() * 4 / median_seconds(src.sum, 5) / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
