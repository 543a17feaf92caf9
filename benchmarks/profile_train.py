"""Where one training step's time goes, operator by operator: the profile behind the training rows
of BENCHMARKS.md.

    python -m benchmarks.profile_train [--shape tiny|124M] [--steps 5] [--top 15]

Builds the two steps as `bench_train` does (forward, backward, gradient clipping, AdamW; the same
weights, batch and dtype), runs each a few times to warm up, then profiles `--steps` of each
with PyTorch's profiler and prints, per step, the time inside ATen operators and the operators
that take the most (self CPU time; under the profiler every call costs a little more).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.bench_train import steps
from benchmarks.common import at_least_one, operator_table, top_operators
from llmlab.memory import _native_stderr_silenced


def profile(step: Callable[[], None], n: int) -> list[tuple[str, float, float]]:
    """[(operator, ms per step, calls per step)], the most time first."""
    for _ in range(3):
        step()
    with _native_stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        for _ in range(n):
            step()
    return top_operators(p, n)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "124M"])
    p.add_argument("--steps", type=at_least_one, default=5, help="profiled steps per side")
    p.add_argument("--top", type=at_least_one, default=15, help="operators to list")
    args = p.parse_args(argv)
    ours, hf, _ = steps(args.shape)
    for name, step in {"llmlab": ours, "transformers": hf}.items():
        ops = profile(step, args.steps)
        print(f"\n{name}, {args.shape}: {sum(ms for _, ms, _ in ops):.1f} ms per step inside ATen operators")
        print(operator_table(ops, "step", args.top))


if __name__ == "__main__":
    main()
