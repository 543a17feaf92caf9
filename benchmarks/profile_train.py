"""Where one training step's time goes, operator by operator: the profile behind the training rows
of BENCHMARKS.md.

    python -m benchmarks.profile_train [--shape tiny|124M] [--steps 5] [--top 15] [--device cpu|cuda] [--bf16]

Builds the two steps as `bench_train` does (forward, backward, gradient clipping, AdamW; the same
weights, batch and dtype), runs each a few times to warm up, times `--steps` of each, then
profiles as many with PyTorch's profiler and prints, per step, the wall time, the time inside
ATen operators and the operators that take the most (self CPU time; under the profiler every
call costs a little more). On a GPU it also prints how long the GPU ran kernels in a step and
which kernels: a step whose wall time is far above its kernel time waits on the CPU, launching
them (`benchmarks/gpu.sh` runs this at GPT-2 124M under bf16 autocast).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.bench_train import steps
from benchmarks.common import (
    at_least_one,
    cuda_runtime,
    operator_table,
    profiler_activities,
    top_kernels,
    top_operators,
)
from llmlab.memory import _native_stderr_silenced


@dataclass
class Profile:
    wall_ms: float  # per step, timed without the profiler (median)
    ops: list[tuple[str, float, float]]  # (operator, ms per step, calls per step), the most CPU time first
    kernels: list[tuple[str, float, float]]  # (GPU kernel, ms per step, calls per step); empty on the CPU

    @property
    def gpu_busy_ms(self) -> float:
        return sum(ms for _, ms, _ in self.kernels)


def profile(call: Callable[[], object], timed: int, profiled: int, device: str = "cpu", warmup: int = 3,
            per_call: int = 1) -> Profile:  # fmt: skip
    """`warmup` calls, `timed` timed ones, then `profiled` under the profiler (each call waits for
    the GPU); the figures per unit of work, of which a call does `per_call` (a step; NEW tokens)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(timed):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    with _native_stderr_silenced(), torch.profiler.profile(activities=profiler_activities(device)) as p:
        for _ in range(profiled):
            call()
    units = profiled * per_call
    return Profile(statistics.median(times) / per_call * 1e3, top_operators(p, units), top_kernels(p, units))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "124M"])
    p.add_argument("--steps", type=at_least_one, default=5, help="timed and profiled steps per side")
    p.add_argument("--top", type=at_least_one, default=15, help="operators to list")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="under bf16 autocast, as `llmlab train --dtype bfloat16` runs")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    ours, hf, _ = steps(args.shape, args.device, args.bf16)
    setting = f"{args.shape}, {args.device}, {'bf16 autocast' if args.bf16 else 'fp32'}"
    for name, step in {"llmlab": ours, "transformers": hf}.items():
        prof = profile(step, args.steps, args.steps, args.device)
        ops, runtime = cuda_runtime(prof.ops)
        in_ops = sum(ms for _, ms, _ in ops)
        print(f"\n{name}, {setting}: {prof.wall_ms:.1f} ms per step wall; {in_ops:.1f} ms inside ATen operators "
              "(profiled)")  # fmt: skip
        if args.device == "cuda":
            busy = prof.gpu_busy_ms
            print(f"the GPU ran kernels for {busy:.1f} ms of the step ({busy / prof.wall_ms:.0%} of its wall time); "
                  f"the CPU spent {runtime:.1f} ms in the CUDA runtime, launching them and waiting")  # fmt: skip
        print(operator_table(ops, "step", args.top))
        if prof.kernels:
            print(operator_table(prof.kernels, "step", args.top, kind="GPU kernel"))


if __name__ == "__main__":
    main()
