"""Greedy decoding's argmax over the vocabulary, two ways: `llmlab.sampling.argmax` (NumPy's
argmax on the CPU) against PyTorch's `Tensor.argmax(-1)`, on rows of GPT-2's 50,257 logits and
of the tiny shape's 65. Both return the same indices (checked here on every shape).

    python -m benchmarks.bench_argmax [--reps 35] [--out BENCHMARKS.md]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import Row, ablation_main, interleaved_medians
from llmlab.sampling import NUMPY_ARGMAX_FROM, argmax

SHAPES = [(1, 50257), (8, 50257), (1, 65)]  # [B, V]: one row a decoded token, a batch of 8, the tiny vocabulary
CALLS = 200  # calls a turn: one is microseconds


def repeated(fn: Callable[[torch.Tensor], object], logits: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        for _ in range(CALLS):
            fn(logits)

    return run


def bench(reps: int = 35) -> list[Row]:
    rows = []
    for shape in SHAPES:
        logits = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        if not torch.equal(argmax(logits), logits.argmax(-1)):
            raise AssertionError(f"llmlab.sampling.argmax and Tensor.argmax differ on {list(shape)}")
        sides = [repeated(argmax, logits), repeated(lambda x: x.argmax(-1), logits)]
        ours_s, torch_s = (s / CALLS for s in interleaved_medians(sides, reps))  # seconds a call
        note = f"{ours_s * 1e6:.1f} against {torch_s * 1e6:.1f} µs; the same indices"
        if shape[-1] < NUMPY_ARGMAX_FROM:
            note += "; below NUMPY_ARGMAX_FROM: Tensor.argmax, after a check"
        name = f"argmax over the last dim, {list(shape)}: llmlab.sampling.argmax vs Tensor.argmax"
        rows.append(Row(name, 1 / ours_s, 1 / torch_s, "calls/s", "–", note))
    return rows


def main(argv: list[str] | None = None) -> None:
    with torch.inference_mode():  # as generate_ids calls it
        ablation_main("benchmarks.bench_argmax", __doc__, "## Greedy decoding's argmax",
                      f'medians of {{reps}} turns of {CALLS} calls, the two ways taking turns; here "peer" is '
                      "Tensor.argmax", bench, argv)  # fmt: skip


if __name__ == "__main__":
    main()
