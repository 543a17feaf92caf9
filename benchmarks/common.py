"""Timing, machine facts, and the Markdown that BENCHMARKS.md is made of."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `reps` runs after `warmup` unmeasured ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> dict[str, str]:
    flags = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    interesting = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {
        "cpu": model, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
        "cpu flags": " ".join(interesting) or "-", "torch": torch.__version__, "python": platform.python_version(),
    }  # fmt: skip


@dataclass
class Row:
    benchmark: str
    ours: float
    peer: float | None  # None when the row is against a ceiling, not a library
    unit: str
    target: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer if self.peer else None

    def cells(self) -> list[str]:
        ratio = f"**{self.ratio:.2f}×**" if self.ratio is not None else "-"
        peer = f"{self.peer:,.1f}" if self.peer is not None else "-"
        return [self.benchmark, f"{self.ours:,.1f}", peer, self.unit, ratio, self.target, self.note]


def markdown_table(rows: list[Row]) -> str:
    head = ["benchmark", "llmlab", "peer", "unit", "llmlab / peer", "target", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)
