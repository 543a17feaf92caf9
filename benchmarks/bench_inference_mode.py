"""Greedy decoding under `torch.inference_mode` (what `generate_ids` runs under) against the same
loop under `torch.no_grad` (what it ran under before, and what transformers' `generate` uses), at
both shapes: batch 1, 16-token prompt, 128 new tokens, KV cache, the same weights and tokens.
Inference mode skips autograd's bookkeeping (version counters, view tracking) on every operator,
which counts where a token is hundreds of small operators.

    python -m benchmarks.bench_inference_mode --reps 7 [--out BENCHMARKS.md]   (35 by default: minutes at 124M)
"""

from __future__ import annotations

import torch

from benchmarks import bench_decode
from benchmarks.common import Row, ablation_main, interleaved_medians
from benchmarks.run import TINY_REPS
from benchmarks.shapes import model_pair
from llmlab.sampling import SamplingConfig, generate_ids

PLAIN = torch.no_grad()(generate_ids.__wrapped__)  # the same generator function under no_grad


def row(shape: str, reps: int) -> Row:
    model, _ = model_pair(shape, min_positions=bench_decode.PROMPT + bench_decode.NEW)
    model.eval()
    idx = torch.randint(0, model.cfg.vocab_size, (1, bench_decode.PROMPT), generator=torch.Generator().manual_seed(1))

    def decoder(fn):
        return lambda: torch.stack([t.clone() for t, _ in fn(model, idx, bench_decode.NEW, SamplingConfig(0.0))], 1)

    fast, plain = decoder(generate_ids), decoder(PLAIN)
    same = torch.equal(fast(), plain())
    fast_s, plain_s = interleaved_medians([fast, plain], reps * TINY_REPS if shape == "tiny" else reps)
    new = bench_decode.NEW
    return Row(f"greedy decoding, {shape}, B=1, fp32: inference_mode vs no_grad", new / fast_s, new / plain_s,
               "tokens/s", "–", f"{'same' if same else 'different'} tokens; {fast_s / new * 1e3:.2f} against "
               f"{plain_s / new * 1e3:.2f} ms a token")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ablation_main("benchmarks.bench_inference_mode", __doc__, "## inference_mode against no_grad",
                  f'medians of {{reps}} turns ({TINY_REPS}× as many at the tiny shape), the two sides taking '
                  'turns; here "peer" is the same decoding under no_grad', lambda reps: [row("tiny", reps),
                  row("124M", reps)], argv)  # fmt: skip


if __name__ == "__main__":
    main()
