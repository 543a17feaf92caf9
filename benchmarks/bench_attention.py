"""bf16 attention on a CPU, forward and backward, two ways: PyTorch's flash kernel in bf16, and
the same kernel on q, k, v cast to fp32 (the result cast back), the route `llmlab.model.sdpa`
takes in bf16 training below S·D = `FP32_ATTENTION_BELOW` (`llmlab.model.attends_in_fp32`).
Causal, q, k, v [B, h, S, D]; the shapes of that function's docstring, the tiny training shape
first and GPT-2 124M's at S = 256 among them.

    python -m benchmarks.bench_attention [--reps 35] [--out BENCHMARKS.md]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import Row, ablation_main, interleaved_medians
from llmlab.model import attends_in_fp32

SHAPES = [(12, 4, 64, 32), (4, 12, 128, 64), (1, 12, 512, 32), (1, 12, 256, 64), (8, 12, 256, 64)]


def forward_backward(shape: tuple[int, ...], fp32: bool) -> Callable[[], None]:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(shape, generator=g).bfloat16()
    up = (lambda t: t.float()) if fp32 else (lambda t: t)

    def run() -> None:
        F.scaled_dot_product_attention(up(q), up(k), up(v), is_causal=True).bfloat16().backward(grad)

    return run


def rows(reps: int) -> list[Row]:
    out = []
    for shape in SHAPES:
        fp32_s, bf16_s = interleaved_medians([forward_backward(shape, True), forward_backward(shape, False)], reps)
        probe = torch.empty(shape, dtype=torch.bfloat16, requires_grad=True)
        takes = "fp32" if attends_in_fp32(probe) else "bf16"
        note = f"{fp32_s * 1e3:.2f} against {bf16_s * 1e3:.2f} ms; llmlab takes {takes}"
        out.append(Row(f"bf16 attention forward + backward, {list(shape)}: via fp32 vs bf16", 1 / fp32_s, 1 / bf16_s,
                       "calls/s", "–", note))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ablation_main("benchmarks.bench_attention", __doc__, "## bf16 attention: through fp32 or in bf16",
                  'medians of {reps} turns, the two ways taking turns; here "peer" is the flash kernel in bf16',
                  rows, argv)  # fmt: skip


if __name__ == "__main__":
    main()
