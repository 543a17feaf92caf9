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

from benchmarks.bench_train import step_fn
from benchmarks.shapes import TRAIN_BATCH, model_pair
from llmlab.config import TrainConfig
from llmlab.memory import _native_stderr_silenced
from llmlab.train import make_optimizer


def steps(shape: str) -> dict[str, Callable[[], None]]:
    ours, hf = model_pair(shape)
    ours.train()
    hf.train()
    B, S = TRAIN_BATCH[shape]
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, ours.cfg.vocab_size, (B, S), generator=g) for _ in range(2))
    cfg = TrainConfig()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=0.1, fused=True)
    return {
        "llmlab": step_fn(ours, make_optimizer(ours, cfg), lambda m, t: m(t), x, y, bf16=False),
        "transformers": step_fn(hf, hf_opt, lambda m, t: m(t).logits, x, y, bf16=False),
    }


def profile(step: Callable[[], None], n: int) -> list[tuple[str, float, float]]:
    """[(operator, ms per step, calls per step)], the most time first."""
    for _ in range(3):
        step()
    with _native_stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
        for _ in range(n):
            step()
    rows = [(e.key, e.self_cpu_time_total / 1e3 / n, e.count / n) for e in p.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "124M"])
    p.add_argument("--steps", type=int, default=5, help="profiled steps per side")
    p.add_argument("--top", type=int, default=15, help="operators to list")
    args = p.parse_args(argv)
    for name, step in steps(args.shape).items():
        ops = profile(step, args.steps)
        print(f"\n{name}, {args.shape}: {sum(ms for _, ms, _ in ops):.1f} ms per step inside ATen operators")
        print("| operator | ms per step | calls per step |\n|---|---|---|")
        for key, ms, calls in ops[: args.top]:
            print(f"| {key} | {ms:.2f} | {calls:.1f} |")


if __name__ == "__main__":
    main()
