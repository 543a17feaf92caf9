"""GPT-2's GELU ("gelu_new"), with a training path that never calls `tanh`.

    GELU(x) = ½x(1 + tanh z),   z = √(2/π)(x + 0.044715x³)
            = x·σ(2z),          since 1 + tanh z = 2σ(2z)

    GELU'(x) = σ(2z)·(1 + x·(1 − σ(2z))·2z'),   2z' = 2√(2/π)(1 + 3·0.044715x²)

On CPUs without AVX-512, PyTorch's fused `F.gelu(approximate="tanh")` spends most of its time
inside a vectorised `tanh`, and its backward computes that `tanh` again: forward and backward
of the tiny shape's [12, 64, 512] take 0.7–1.2 ms each, 17% of a training step's operator
time (`python -m benchmarks.profile_train`, before this module). `sigmoid` costs a third of
`tanh` there. `GeluTanh` computes σ(2z) once in the forward, and stores GELU'(x) instead of
x, so its backward is one multiplication. It stores as much for the backward as `F.gelu`,
which stores x: one [..., F] tensor (during the forward one buffer more is alive).

`gelu_tanh` takes this path only where it pays and its float32 error stays within a few
roundings (gradients within about twice `F.gelu`'s own error, and better in the negative tail):
a float32 CPU tensor that needs a gradient, with `FAST_PATH` on. Everywhere else (inference,
other dtypes, CUDA, where the fused kernel is one pass) it is `F.gelu`. The path is first-order
only, having no x to differentiate again: a second derivative through it (`create_graph=True`)
is an error that says to set `llmlab.gelu.FAST_PATH = False`. `tests/test_gelu.py` holds the
two equal; `python -m benchmarks.bench_activation` measures both, alone and in a training step.

With AVX-512 the fused kernel is no faster: on a 2-core Xeon model 167 forward and backward of
[12, 64, 512] took 1438 and 1758 µs through `GeluTanh` against 1608 and 1798 through `F.gelu`
(1.12× and 1.02×, two runs of `bench_activation`), and a training step of the tiny shape ran
1.00× and 0.99× (there the step's page faults, which the two allocations of the forward add to,
cost as much as the passes saved). Its forward makes ten passes over the tensor; the thirteen
before them were no faster (a one-off comparison in turns).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

C, A = math.sqrt(2 / math.pi), 0.044715
X2_MAX = 400.0  # x² is clamped here: σ(2z) is exactly 0 or 1 from |x| = 20 on, in float32
FAST_PATH = True  # False: always F.gelu (for second derivatives, or to compare)


class GeluTanh(torch.autograd.Function):
    """x·σ(2z), saving GELU'(x) for the backward. x [...] → [...]."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        # Ten passes over [..., F], two of them allocating (the output and the saved slope): each
        # pass reads and writes the whole tensor, so their number is the cost.
        u = (x * x).clamp_(max=X2_MAX)  # x², clamped so that x·2z' stays finite for |x| < 1e36
        w = torch.addcmul(x, x, u, value=A)  # x + 0.044715x³ = z/C
        torch.lerp(x, w, 3.0, out=u)  # 3w − 2x = x + 3·0.044715x³ = x·2z' / 2C, in x²'s buffer
        s = w.mul_(2 * C).sigmoid_()  # σ(2z), in w's buffer
        u.mul_(s).addcmul_(u, s, value=-1)  # σ(1 − σ)·x·2z' / 2C
        slope = torch.add(s, u, alpha=2 * C, out=u)  # σ + σ(1 − σ)·x·2z' = GELU'(x)
        ctx.save_for_backward(slope)
        return s.mul_(x)  # x·σ(2z), in σ's buffer

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: a second derivative would silently lack GELU''
            raise RuntimeError("llmlab.gelu.GeluTanh is first-order only; for second derivatives set "
                               "llmlab.gelu.FAST_PATH = False, which trains with F.gelu")  # fmt: skip
        (slope,) = ctx.saved_tensors
        return grad * slope


def takes_fast_path(x: Tensor) -> bool:
    return (FAST_PATH and x.requires_grad and torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32)  # fmt: skip


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU, `F.gelu(x, approximate="tanh")`; through `GeluTanh` when training on CPU."""
    return GeluTanh.apply(x) if takes_fast_path(x) else F.gelu(x, approximate="tanh")
