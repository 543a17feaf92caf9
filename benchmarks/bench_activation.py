"""GPT-2's GELU three ways, the source of llmlab's lead in tiny training (`profile_train`):
`F.gelu(approximate="tanh")` (PyTorch's fused kernel, what llmlab runs outside training),
transformers' `NewGELUActivation` (`pow`, `tanh` and `mul`s), and `llmlab.gelu.GeluTanh`, the
same function written with `sigmoid`, since 1 + tanh(z) = 2σ(2z), that stores its derivative
(what llmlab trains with on CPU):

    GELU(x) = ½x(1 + tanh z) = x·σ(2z),   z = √(2/π)(x + 0.044715x³)

Each is timed forward and backward on the tiny shape's FFN activation [12, 64, 512], fp32; then
llmlab's whole tiny training step with `GeluTanh` against the same step with `F.gelu`.

    python -m benchmarks.bench_activation [--reps 35] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.bench_train import steps
from benchmarks.common import Row, ablation_main, interleaved_medians
from benchmarks.shapes import SHAPES, TRAIN_BATCH
from llmlab import model as llmlab_model
from llmlab.gelu import GeluTanh


def torch_gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def hf_gelu() -> Callable[[Tensor], Tensor]:
    from transformers.activations import NewGELUActivation

    return NewGELUActivation()


def forward_backward(fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> Callable[[], None]:
    def run() -> None:
        leaf = x.detach().requires_grad_()
        fn(leaf).backward(grad)

    return run


@contextmanager
def activation(fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While inside, every llmlab model with activation "gelu_tanh" runs `fn`."""
    real = llmlab_model.ACTIVATIONS["gelu_tanh"]
    llmlab_model.ACTIVATIONS["gelu_tanh"] = fn
    try:
        yield
    finally:
        llmlab_model.ACTIVATIONS["gelu_tanh"] = real


def steady_medians(fns: list[Callable[[], object]], turns: int, per_turn: int) -> tuple[list[float], list[float]]:
    """(median seconds, mean page faults) of each fn's calls, each run `per_turn` times in a row
    per turn, the turns alternating; the first call of a turn is not counted. Unlike A B A B, a
    side runs in its own steady state: two steps whose buffers differ, alternating call by call,
    can free memory back to the system that the other then page-faults in again."""
    times: list[list[float]] = [[] for _ in fns]
    faults = [0] * len(fns)
    for _ in range(turns):
        for i, fn in enumerate(fns):
            fn()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(per_turn - 1):
                t0 = time.perf_counter()
                fn()
                times[i].append(time.perf_counter() - t0)
            faults[i] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return [statistics.median(t) for t in times], [f / len(t) for f, t in zip(faults, times, strict=True)]


def bench(reps: int = 35) -> list[Row]:
    B, S = TRAIN_BATCH["tiny"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, 4 * SHAPES["tiny"]["n_embd"], generator=g)  # [B, S, F]
    grad = torch.randn(x.shape, generator=g)
    ours = forward_backward(torch_gelu, x, grad)
    peer = forward_backward(hf_gelu(), x, grad)
    sig = forward_backward(GeluTanh.apply, x, grad)
    tanh_s, sigmoid_s, ours_s, peer_s, sig_s = interleaved_medians(
        [lambda: torch.tanh(x), lambda: torch.sigmoid(x), ours, peer, sig], reps
    )
    step, _, tokens = steps("tiny")

    def fused_step() -> None:
        with activation(torch_gelu):
            step()

    (step_s, fused_step_s), (step_faults, fused_faults) = steady_medians(
        [step, fused_step], turns=max(1, reps // 5), per_turn=6
    )
    shape = f"[{B}, {S}, {x.shape[-1]}]"
    us = "calls/s"
    return [
        Row(f"torch.sigmoid vs torch.tanh, {shape}", 1 / sigmoid_s, 1 / tanh_s, us, "–",
            f"{sigmoid_s * 1e6:.0f} against {tanh_s * 1e6:.0f} µs"),
        Row(f"GELU forward + backward, {shape}: F.gelu(tanh) vs transformers' NewGELUActivation", 1 / ours_s,
            1 / peer_s, us, "–", f"{ours_s * 1e6:.0f} against {peer_s * 1e6:.0f} µs; 4 a training step"),
        Row(f"GELU forward + backward, {shape}: llmlab.gelu.GeluTanh vs F.gelu(tanh)", 1 / sig_s, 1 / ours_s, us,
            "–", f"{sig_s * 1e6:.0f} against {ours_s * 1e6:.0f} µs"),
        Row("training step, tiny, fp32: llmlab with GeluTanh (its default) vs with F.gelu(tanh)", tokens / step_s,
            tokens / fused_step_s, "tokens/s", "–", f"{step_s * 1e3:.1f} against {fused_step_s * 1e3:.1f} ms, in "
            f"turns of 6 steps; page faults a step: {step_faults:,.0f} against {fused_faults:,.0f}"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ablation_main("benchmarks.bench_activation", __doc__, "## GPT-2's GELU, three ways",
                  'medians of {reps} turns, the sides taking turns; here "peer" is the other way of computing '
                  "the same function", bench, argv)  # fmt: skip


if __name__ == "__main__":
    main()
