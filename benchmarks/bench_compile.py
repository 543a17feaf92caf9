"""`torch.compile` against eager llmlab at the tiny shape, on the same weights: one training step
(forward, backward, AdamW; `llmlab train --compile` compiles the same way) and greedy decoding
(`Module.compile()`, 16-token prompt, 128 new tokens, KV cache). Each compiled side's first call,
the compile, is timed apart (Inductor keeps what it built in an on-disk cache, so a second run
compiles faster); then the two sides take turns.

    python -m benchmarks.bench_compile [--reps 35] [--out BENCHMARKS.md]

Decoding recompiles as the cache grows: each step's cache position is a new constant to dynamo,
which warns when its limit of 8 recompiles is reached and runs the later steps uncompiled.
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks import bench_decode
from benchmarks.bench_train import steps
from benchmarks.common import Row, ablation_main, interleaved_medians
from benchmarks.shapes import model_pair
from llmlab.sampling import SamplingConfig, generate_ids


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def training(reps: int) -> Row:
    eager, _, tokens = steps("tiny")
    compiled, _, _ = steps("tiny", compile=True)
    compile_s = timed(compiled)
    eager_s, compiled_s = interleaved_medians([eager, compiled], reps)
    note = f"{compiled_s * 1e3:.1f} against {eager_s * 1e3:.1f} ms; the first call, compiling, took {compile_s:.0f} s"
    return Row("training step, tiny, fp32: torch.compile vs eager", tokens / compiled_s, tokens / eager_s, "tokens/s",
               "–", note)  # fmt: skip


def decoding(reps: int) -> Row:
    eager, _ = model_pair("tiny", min_positions=bench_decode.PROMPT + bench_decode.NEW)
    eager.eval()
    compiled = copy.deepcopy(eager)
    compiled.compile()
    idx = torch.randint(0, eager.cfg.vocab_size, (1, bench_decode.PROMPT), generator=torch.Generator().manual_seed(1))

    def decoder(model: torch.nn.Module):
        def run() -> torch.Tensor:
            return torch.stack([t for t, _ in generate_ids(model, idx, bench_decode.NEW, SamplingConfig(0.0))], 1)

        return run

    compile_s = timed(decoder(compiled))
    same = torch.equal(decoder(compiled)(), decoder(eager)())
    eager_s, compiled_s = interleaved_medians([decoder(eager), decoder(compiled)], reps)
    new = bench_decode.NEW
    return Row("greedy decoding, tiny, B=1, fp32: Module.compile() vs eager", new / compiled_s, new / eager_s,
               "tokens/s", "–", f"{'same' if same else 'different'} tokens; the first call, compiling, took "
               f"{compile_s:.0f} s")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ablation_main("benchmarks.bench_compile", __doc__, "## torch.compile against eager",
                  'medians of {reps} turns after the compile, the two sides taking turns; here "peer" is llmlab '
                  "uncompiled", lambda reps: [training(reps), decoding(reps)], argv)  # fmt: skip


if __name__ == "__main__":
    main()
