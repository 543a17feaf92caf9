"""The tied embedding's one gradient (llmlab.tying) against plain autograd's sum of two, on the
same llmlab model: tokens/s of one training step (forward, backward, AdamW), the two paths taking
turns in one process. `make bench` runs it in a fresh process of its own (`--json`): after the
training rows in the same process, plain autograd's 124M step ran 118 → 147 tokens/s and the
ratio fell from 1.29× to 1.09×: a state that a user's training process does not start in.

    python -m benchmarks.bench_tying [--shape 124M] [--reps 7] [--device cpu|cuda] [--json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from benchmarks.bench_train import step_fn
from benchmarks.common import at_least_one, interleaved_medians
from benchmarks.shapes import TRAIN_BATCH, model_pair
from llmlab.config import TrainConfig
from llmlab.model import GPT
from llmlab.train import make_optimizer


@contextmanager
def plain_autograd(enabled: bool) -> Iterator[None]:
    """While enabled, every GPT takes plain autograd for its tied weight."""
    real = GPT._tied_training
    if enabled:
        GPT._tied_training = lambda self: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        GPT._tied_training = real  # type: ignore[method-assign]


def bench(shape: str = "124M", reps: int = 7, device: str = "cpu") -> tuple[float, float]:
    """Median tokens/s (one tied gradient, plain autograd)."""
    model, _ = model_pair(shape)
    model.to(device).train()
    B, S = TRAIN_BATCH[shape]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (B, S), generator=g).to(device)
    y = torch.randint(0, model.cfg.vocab_size, (B, S), generator=g).to(device)
    step = step_fn(model, make_optimizer(model, TrainConfig()), lambda m, t: m(t), x, y, bf16=False)

    def plain() -> None:
        with plain_autograd(True):
            step()

    tied_s, plain_s = interleaved_medians([step, plain], reps)
    return B * S / tied_s, B * S / plain_s


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="124M", choices=["tiny", "124M"])
    p.add_argument("--reps", type=at_least_one, default=7)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help='print {"tied": tokens/s, "plain": tokens/s}')
    args = p.parse_args(argv)
    tied, plain = bench(args.shape, args.reps, args.device)
    if args.json:
        print(json.dumps({"tied": tied, "plain": plain}))
        return
    print(f"{args.shape}: one tied gradient {tied:.1f} tokens/s, plain autograd {plain:.1f} tokens/s, "
          f"{tied / plain:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
