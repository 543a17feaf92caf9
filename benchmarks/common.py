"""Timing, machine facts, and the Markdown that BENCHMARKS.md is made of."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llmlab.machine import cpuinfo


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `reps` runs after `warmup` unmeasured ones."""
    return interleaved_medians([fn], reps, warmup)[0]


def interleaved_medians(fns: Sequence[Callable[[], object]], reps: int, warmup: int = 2) -> list[float]:
    """Median wall time of each fn over `reps` runs, taken in turn (A B A B …) after `warmup`
    unmeasured rounds. On a shared machine whose speed drifts by tens of percent over minutes
    (this project's does), taking turns puts a slow spell on every side alike, so the ratio of
    the medians holds still where back-to-back blocks of repetitions would not."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, spent in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
    return [statistics.median(spent) for spent in times]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall time measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine() -> dict[str, str]:
    flags = set((cpuinfo("flags") or "").split())
    model = cpuinfo("model name") or platform.processor() or platform.machine()
    interesting = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return {
        "cpu": model, "cores": str(os.cpu_count()), "torch threads": str(torch.get_num_threads()),
        "cpu flags": " ".join(interesting) or "-", "last-level cache": last_level_cache(),
        "torch": torch.__version__, "python": platform.python_version(),
    }  # fmt: skip


def machine_title(device: str) -> str:
    """What a section's heading calls the machine, from what it reports: "AMD EPYC (family 25,
    model 17), L3 32 MiB, AVX-512, 2 cores, torch 2.13" on a CPU, "NVIDIA H200, torch 2.11" on
    CUDA. A rerun on the same machine and torch replaces the section with this title (`with_section`)."""
    torch_version = f"torch {'.'.join(torch.__version__.split('.')[:2])}"
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, {torch_version}"
    name = re.sub(r"\((R|TM)\)", "", cpuinfo("model name") or platform.processor() or platform.machine()).strip()
    family, model = cpuinfo("cpu family"), cpuinfo("model")
    flags = set((cpuinfo("flags") or "").split())
    isa = [label for flag, label in (("avx512f", "AVX-512"), ("amx_tile", "AMX")) if flag in flags]
    isa = isa or (["AVX2"] if "avx2" in flags else [])
    llc = last_level_cache()
    parts = [name + (f" (family {family}, model {model})" if family and model else ""), *([llc] if llc != "-" else [])]
    return ", ".join([*parts, *isa, f"{os.cpu_count()} cores", torch_version])


def last_level_cache() -> str:
    """The last-level CPU cache as Linux reports it ("L3 480 MiB"; on a VM, the host's, shared); "-" where
    unknown. Beside the bandwidth ceiling: a model whose weights fit in it reads them from cache."""
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    caches = []  # (level, KiB)
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, size = (index / "level").read_text().strip(), (index / "size").read_text().strip()
            caches.append((int(level), int(size[:-1]) * units[size[-1]]))
        except (OSError, ValueError, KeyError, IndexError):
            continue
    if not caches:
        return "-"
    level, kib = max(caches)
    return f"L{level} {kib / 1024:g} MiB" if kib >= 1024 else f"L{level} {kib} KiB"


@dataclass
class Row:
    benchmark: str
    ours: float | None  # None: not run (the note says why)
    peer: float | None  # None when the row is against a ceiling, not a library
    unit: str
    target: str
    note: str = ""
    goal: float | None = None  # what the ratio (or, without a peer, the value) must reach

    @property
    def shortfall(self) -> float | None:
        """How far below its goal the row is, as a fraction of the goal; None if it meets it or has none."""
        got = self.ratio if self.peer is not None else self.ours
        if self.goal is None or got is None or got >= self.goal:
            return None
        return 1 - got / self.goal

    @property
    def ratio(self) -> float | None:
        return self.ours / self.peer if self.peer and self.ours is not None else None

    def cells(self) -> list[str]:
        ratio = f"**{self.ratio:.2f}×**" if self.ratio is not None else "-"
        peer = f"{self.peer:,.1f}" if self.peer is not None else "-"
        ours = f"{self.ours:,.1f}" if self.ours is not None else "not run"
        missed = f"missed by {self.shortfall:.1%} of the target" if self.shortfall is not None else ""
        return [self.benchmark, ours, peer, self.unit, ratio, self.target, "; ".join(filter(None, (missed, self.note)))]


def markdown_table(rows: list[Row]) -> str:
    head = ["benchmark", "llmlab", "peer", "unit", "llmlab / peer", "target", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def top_operators(prof: torch.profiler.profile, per: int) -> list[tuple[str, float, float]]:
    """A finished profile's operators as [(name, ms, calls)] per `per` (steps or tokens), the
    most self CPU time first; their sum is the time spent inside operators."""
    rows = [(e.key, e.self_cpu_time_total / 1e3 / per, e.count / per) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def cuda_runtime(ops: list[tuple[str, float, float]]) -> tuple[list[tuple[str, float, float]], float]:
    """`top_operators`' rows without the CUDA runtime's calls (cudaLaunchKernel, the waits of
    cudaDeviceSynchronize, …), and those calls' ms: on a GPU they are the CPU launching kernels
    and waiting for them, not operators' own work."""
    runtime = [r for r in ops if r[0].startswith("cu") and "::" not in r[0]]
    return [r for r in ops if r not in runtime], sum(ms for _, ms, _ in runtime)


def top_kernels(prof: torch.profiler.profile, per: int) -> list[tuple[str, float, float]]:
    """A finished profile's GPU work (kernels, copies, memsets) as [(name, ms, calls)] per `per`,
    the most GPU time first; their sum is the time the GPU was busy (on one stream), what the
    profiler's table sums as "Self CUDA time total". Empty without a GPU."""
    cuda = torch.autograd.DeviceType.CUDA
    gpu = [e for e in prof.key_averages() if e.device_type == cuda and not getattr(e, "is_user_annotation", False)]
    rows = [(e.key, e.self_device_time_total / 1e3 / per, e.count / per) for e in gpu]
    return sorted(rows, key=lambda r: -r[1])


def profiler_activities(device: torch.device | str) -> list[torch.profiler.ProfilerActivity]:
    """What to record: the CPU's operators, and on a GPU its kernels too."""
    cuda = torch.device(device).type == "cuda"
    return [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])


def operator_table(ops: list[tuple[str, float, float]], per: str, top: int, kind: str = "operator") -> str:
    lines = [f"| {kind} | ms per {per} | calls per {per} |", "|---|---|---|"]
    return "\n".join(lines + [f"| {shortened(key)} | {ms:.3f} | {calls:.1f} |" for key, ms, calls in ops[:top]])


def shortened(name: str, limit: int = 100) -> str:
    """A long (templated) kernel name cut in its middle, so that both its kind and its end show."""
    name = name.replace("|", "/")
    return name if len(name) <= limit else name[: limit // 2] + " … " + name[-(limit // 2 - 3) :]


def with_section(old: str, section: str, first: bool = True) -> str:
    """`old` (markdown) with its `## ` section of the same heading as `section` replaced by it in
    place, or, if it has none, `section` put first (or last); the other sections stay. A heading's
    date, a trailing "(YYYY-MM-DD)", is not compared: a rerun on the same machine replaces its
    section of an earlier day."""
    parts = [p.rstrip("\n") for p in re.split(r"(?m)^(?=## )", old) if p.strip()]
    heading = undated(section.splitlines()[0])
    section = section.rstrip("\n")
    same = [i for i, p in enumerate(parts) if undated(p.splitlines()[0]) == heading]
    if same:
        parts[same[0]] = section  # in place of the first; any later one with that heading goes
        parts = [p for i, p in enumerate(parts) if i not in same[1:]]
    else:
        parts = [section, *parts] if first else [*parts, section]
    return "\n\n".join(parts) + "\n"


def undated(heading: str) -> str:
    """A heading without its trailing date: "## Benchmarks on cpu: X (2026-12-04)" → "## Benchmarks on cpu: X"."""
    return re.sub(r" \(\d{4}-\d{2}-\d{2}\)$", "", heading)


def commit() -> str | None:
    """The short commit of the checkout this code is in, with "+" if its code (src/, benchmarks/)
    differs from it, new files included; None if it is in no git checkout of its own (a copy,
    or no git)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top, head = git("rev-parse", "--show-toplevel"), git("rev-parse", "--short", "HEAD")
    if not top or not head or Path(top).resolve() != root:  # not a checkout, or a copy inside another one
        return None
    return head + ("+" if git("status", "--porcelain", "--", "src", "benchmarks") else "")


def at_commit() -> str:
    """The words " at <commit>" for a section's "Produced by" line; "" outside a checkout (`commit`)."""
    c = commit()
    return f" at {c}" if c else ""


def at_least_one(text: str) -> int:
    """argparse type: an integer ≥ 1 (repetitions, steps, threads, γ)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def markdown_file(text: str) -> Path:
    """argparse type: the Markdown file a run's section goes into at its end, checked now, so that
    minutes of measuring cannot end in a failed write: not a folder, in a folder that takes a new
    file, and readable text if it exists (its other sections are kept)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; name a Markdown file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: there is no folder {path.parent}")
    try:
        if path.exists():
            path.read_text(encoding="utf-8")
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{text}: {getattr(e, 'strerror', None) or e}") from None
    return path


def write_section(path: Path, text: str, first: bool) -> None:
    """Print `text`, then put it into the Markdown file `path` as a section (`with_section`):
    printed first, so that a write that fails after all (a full disk) loses no figures."""
    print(text, flush=True)
    try:
        path.write_text(with_section(path.read_text(encoding="utf-8") if path.exists() else "", text, first=first))
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"could not write {path} ({getattr(e, 'strerror', None) or e}); the section is printed above")


def ablation_main(script: str, doc: str, heading: str, method: str, rows_of: Callable[[int], list[Row]],
                  argv: list[str] | None = None) -> None:  # fmt: skip
    """The command line of a one-table ablation script such as `benchmarks.bench_compile`:
    `--reps N`, and `--out FILE`, which writes the section last into that Markdown file (or
    replaces it there, for the same machine). `heading` names the comparison ("## GPT-2's GELU,
    three ways"); the machine and the date follow it. `method` says how the sides were timed and
    what "peer" is."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--reps", type=at_least_one, default=35)
    p.add_argument("--out", type=markdown_file, help="also write this section into a Markdown file (BENCHMARKS.md)")
    args = p.parse_args(argv)
    facts = ", ".join(f"{k} {v}" for k, v in machine().items())
    text = f"""{heading}, on cpu: {machine_title("cpu")} ({datetime.date.today().isoformat()})

Produced by `python -m {script} --reps {args.reps}`{at_commit()}: {method.format(reps=args.reps)}. {facts}.

{markdown_table(rows_of(args.reps))}
"""
    if args.out:
        write_section(args.out, text, first=False)
    else:
        print(text)
