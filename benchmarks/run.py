"""`make bench`: every side-by-side benchmark in one run, written to BENCHMARKS.md.

    python -m benchmarks.run [--reps N] [--quick] [--device cpu|cuda] [--append] [--out BENCHMARKS.md]

Each row is a ratio measured in this process, the sides taking turns in every repetition on the
same machine: llmlab against transformers (training, decoding), against the machine's measured
matmul peak (MFU), and against its measured memory bandwidth (decoding's ceiling). The tied-gradient
ablation runs in a fresh process of its own (`benchmarks.bench_tying`'s docstring says why).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import bench_adamw, bench_decode, bench_train
from benchmarks.common import (
    Row,
    at_commit,
    at_least_one,
    interleaved_medians,
    machine,
    machine_title,
    markdown_file,
    markdown_table,
    sync,
    write_section,
)
from benchmarks.shapes import GPU_BATCH, TRAIN_BATCH, model_pair
from llmlab import matvec
from llmlab.accounting import cpu_has_native_bf16, measure_matmul_peak, train_step_flops
from llmlab.errors import reason


def tying_in_own_process(reps: int, device: str, shape: str = "124M") -> tuple[float, float]:
    """`bench_tying` in a fresh Python: (tied, plain) tokens/s."""
    argv = [sys.executable, "-m", "benchmarks.bench_tying", "--shape", shape, "--reps", str(reps), "--device", device,
            "--json"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.bench_tying failed (exit {done.returncode}): {done.stderr[-2000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return got["tied"], got["plain"]


def read_pass(device: str = "cpu", nbytes: int | None = None) -> tuple[Callable[[], None], int]:
    """(fn, bytes): fn reads a tensor of `nbytes` once (a sum over it), what decoding does with
    the weights. (A copy also writes, and measures less.) 256 MB on a CPU; 2 GB on a GPU, whose
    4 TB/s would read 256 MB in about the time a launch and a synchronisation take."""
    nbytes = nbytes or (1 << 28 if device == "cpu" else 1 << 31)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)

    def fn() -> None:
        src.sum()
        sync(torch.device(device))

    return fn, nbytes


def matmul_pass(device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Callable[[], None], int]:
    """(fn, FLOPs): one n×n·n×n product, 2n³ FLOPs, as `llmlab.accounting.measure_matmul_peak` times it."""
    n = 2048 if device == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))

    def fn() -> None:
        a @ b
        sync(torch.device(device))

    return fn, 2 * n**3


def memory_bandwidth(device: str = "cpu", reps: int = 5) -> float:
    """Bytes/s of the fastest of `reps` read passes."""
    fn, nbytes = read_pass(device)
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


EMULATED = (
    "not run: this CPU has no bf16 instructions (no AVX512-BF16 or AMX), PyTorch emulates bf16 matmuls "
    "and one 124M bf16 step took 112 s against 2.8 s in fp32"
)


TINY_REPS = 5  # the tiny shape repeats 5x as often: its steps take milliseconds, and the machine's noise is as large
TRAIN_124M_REPS = 2  # and 124M training steps 2x: with 7 turns its fp32 ratio read 1.13-1.23 across runs of one commit
TRAIN_GOAL = {"tiny": 1.3, "124M": 1.15}  # issue 7's targets, llmlab / transformers
DECODE_GOAL = {"tiny": 2.0, "124M": 1.2}


@dataclass
class Training:
    """What the MFU rows need from the training rows at 124M, by (B, S, dtype): llmlab's tokens/s,
    and the matmul rate timed in the same turns as those steps (median FLOP/s)."""

    tokens_per_s: dict[tuple[int, int, str], float] = field(default_factory=dict)
    matmul_in_turn: dict[tuple[int, int, str], float] = field(default_factory=dict)


def training_rows(device: str, reps: int, shape: str, got: Training) -> list[Row]:
    """Each side is measured once: llmlab fp32, transformers fp32, llmlab bf16 autocast (compared
    with transformers' fp32, the setting its users get by default); at 124M a matmul pass takes
    its turn beside them (its rate goes into `got`, for the MFU rows)."""
    rows = []
    B, S = TRAIN_BATCH[shape]
    probe, flops = matmul_pass(device) if shape == "124M" else (None, 0)
    ours, hf, probe_s = bench_train.bench(shape, reps=_train_reps(shape, reps), device=device, probe=probe)
    goal = TRAIN_GOAL[shape]
    rows.append(Row(f"training step, {shape}, B={B} S={S}, fp32", ours, hf, "tokens/s", f"≥ {goal}×", goal=goal))
    if probe_s is not None:
        got.tokens_per_s[B, S, "float32"], got.matmul_in_turn[B, S, "float32"] = ours, flops / probe_s
    if device == "cpu" and cpu_has_native_bf16() is False:
        rows.append(Row(f"training step, {shape}, bf16 autocast vs transformers fp32", None, hf, "tokens/s",
                        "≥ 1.5×", EMULATED))  # fmt: skip
        return rows
    probe, flops = matmul_pass(device, torch.bfloat16) if shape == "124M" else (None, 0)
    bf16, _, probe_s = bench_train.bench(shape, bf16=True, reps=_train_reps(shape, reps), device=device, peer=False,
                                         probe=probe)  # fmt: skip
    rows.append(Row(f"training step, {shape}, bf16 autocast vs transformers fp32", bf16, hf, "tokens/s", "≥ 1.5×",
                    goal=1.5))  # fmt: skip
    if probe_s is not None:
        got.tokens_per_s[B, S, "bfloat16"], got.matmul_in_turn[B, S, "bfloat16"] = bf16, flops / probe_s
    return rows


def gpu_batch_rows(device: str, reps: int, got: Training, shape: str = "124M",
                   batch: tuple[int, int] = GPU_BATCH) -> list[Row]:  # fmt: skip
    """124M at nanoGPT's GPU batch (`GPU_BATCH`; `shape` and `batch` for a test), each dtype
    against transformers in the same dtype (bf16 autocast on both sides: on a GPU it is what
    either's users run), a matmul pass of that dtype in the same turns for the MFU rows."""
    B, S = batch
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        probe, flops = matmul_pass(device, dtype)
        ours, hf, probe_s = bench_train.bench(shape, bf16=dtype == torch.bfloat16, reps=reps, device=device,
                                              probe=probe, batch=batch)  # fmt: skip
        kind = "fp32" if dtype == torch.float32 else "bf16 autocast, both sides"
        rows.append(Row(f"training step, {shape}, B={B} S={S} (nanoGPT's GPU batch), {kind}", ours, hf, "tokens/s",
                        "–"))  # fmt: skip
        assert probe_s is not None
        name = str(dtype).removeprefix("torch.")
        got.tokens_per_s[B, S, name], got.matmul_in_turn[B, S, name] = ours, flops / probe_s
    return rows


def compiled_training_row(device: str, reps: int, shape: str, hf: float | None) -> list[Row]:
    """llmlab under bf16 autocast and `torch.compile`: on a CPU it gave no consistent gain
    (DESIGN.md), so only `--device cuda` runs it; `hf` is transformers' fp32 rate from its row."""
    compiled, _, _ = bench_train.bench(shape, bf16=True, reps=reps, device=device, compile=True, peer=False)
    return [Row(f"training step, {shape}, bf16 + torch.compile vs transformers fp32", compiled, hf, "tokens/s", "–")]


def tying_row(device: str, reps: int) -> list[Row]:
    """The tied-gradient ablation at 124M, in a fresh process (`bench_tying`'s docstring says why)."""
    tied, plain = tying_in_own_process(reps, device)
    name = "training step, 124M, fp32: one tied gradient vs plain autograd (llmlab.tying)"
    return [Row(name, tied, plain, "tokens/s", "–", "ablation, in a fresh process: the peer is llmlab, autograd "
                "summing two gradients")]  # fmt: skip


def _reps(shape: str, reps: int) -> int:
    return reps * TINY_REPS if shape == "tiny" else reps


def _train_reps(shape: str, reps: int) -> int:
    return reps * TRAIN_124M_REPS if shape == "124M" else _reps(shape, reps)


def adamw_rows(reps: int) -> list[Row]:
    """The optimizer step alone at 124M: llmlab's fused AdamW against torch.optim.AdamW's default,
    the per-tensor loop on a CPU (transformers' Trainer default before torch 2.8)."""
    ours_s, hf_s, ours_f, hf_f = bench_adamw.bench("124M", reps=reps)
    return [Row("AdamW step alone, 124M: fused vs torch.optim.AdamW's per-tensor default", 1 / ours_s, 1 / hf_s,
                "steps/s", "–", f"ablation; {ours_s * 1e3:.0f} against {hf_s * 1e3:.0f} ms, page faults a step: "
                f"{ours_f:,} against {hf_f:,} (the loop's temporaries)"),
            clip_row(reps)]  # fmt: skip


def clip_row(reps: int, shape: str = "124M") -> Row:
    """Gradient clipping and the fused AdamW step at 124M: the clip's scale inside the kernel
    (`llmlab.train.clip_and_step`) against `clip_grad_norm_` then the step, as transformers' Trainer."""
    inside_s, then_s = bench_adamw.bench_clip(shape, reps=reps)
    return Row(f"clip + AdamW step, {shape}: the clip inside the fused kernel vs clip_grad_norm_ then the step",
               1 / inside_s, 1 / then_s, "steps/s", "–",
               f"ablation; {inside_s * 1e3:.0f} against {then_s * 1e3:.0f} ms, each on its own copy of the "
               "gradients")  # fmt: skip


def mfu_rows(device: str, got: Training, batch: tuple[int, int] = TRAIN_BATCH["124M"],
             shape: str = "124M") -> list[Row]:  # fmt: skip
    """Training MFU at `shape` and `batch`: exact model FLOPs per step × measured steps/s over the
    matmul rate of an n×n product timed in turn with the steps (the median of as many passes). On
    a machine whose speed drifts, that is the peak of the same minutes; the note also gives the
    fastest product over one second afterwards (`measure_matmul_peak`, what `llmlab count --peak`
    caches)."""
    ours, _ = model_pair(shape)
    B, S = batch
    flops_per_token = train_step_flops(ours.cfg, B, S) / (B * S)
    at = "" if batch == TRAIN_BATCH[shape] else f" B={B} S={S},"
    rows = []
    for dtype in ("float32", "bfloat16"):
        best = measure_matmul_peak(device, dtype)
        if (B, S, dtype) not in got.tokens_per_s:
            rows.append(Row(f"training MFU, {shape},{at} {dtype}", None, None, "% of matmul peak", "–",
                            f"matmul peak {best / 1e9:.1f} GFLOP/s; {_why_no_steps(device, dtype)}"))  # fmt: skip
            continue
        achieved, peak = got.tokens_per_s[B, S, dtype] * flops_per_token, got.matmul_in_turn[B, S, dtype]
        goal = 58.0 if dtype == "float32" and not at else None
        rows.append(Row(f"training MFU, {shape},{at} {dtype}", 100 * achieved / peak, None, "% of matmul peak",
                        "≥ 58%" if goal else "–",
                        f"{achieved / 1e9:.1f} of the {peak / 1e9:.1f} GFLOP/s a matmul ran at in turn with the "
                        f"steps (median); {100 * achieved / best:.1f}% of the fastest product afterwards, "
                        f"{best / 1e9:.1f} GFLOP/s", goal=goal))  # fmt: skip
    return rows


def _why_no_steps(device: str, dtype: str) -> str:
    if device == "cpu" and dtype == "bfloat16" and cpu_has_native_bf16() is False:
        return EMULATED
    return "not run: the training row whose steps it counts failed (its row says how)"


def decoding_rows(device: str, reps: int, shape: str) -> list[Row]:
    """At 124M a read pass (`read_pass`) takes its turn beside the two decoders; the ceiling is the
    median read bandwidth of those passes, the note also gives the fastest of five afterwards."""
    probe, nbytes = read_pass(device) if shape == "124M" else (None, 0)
    d = bench_decode.bench(shape, reps=_reps(shape, reps), device=device, probe=probe)
    goal = DECODE_GOAL[shape]
    row = Row(f"greedy decoding, {shape}, B=1, fp32", d.ours, d.peer, "tokens/s", f"≥ {goal}×", _agreement(d.agree),
              goal=goal)  # fmt: skip
    if d.probe_s is None:
        return [row]
    best, per_token = memory_bandwidth(device), weight_bytes(shape)
    bandwidth = nbytes / d.probe_s
    ceiling = bandwidth / per_token
    if row.shortfall is not None:  # how near the peer already is to the ceiling both share
        row.note += (f"; transformers decodes at {100 * d.peer / ceiling:.0f}% of the bandwidth ceiling "
                     f"(next row), so {goal}× would take {100 * goal * d.peer / ceiling:.0f}% of it")  # fmt: skip
    return [row, Row("greedy decoding, 124M, against the bandwidth ceiling", 100 * d.ours / ceiling, None,
                     "% of ceiling", "≥ 70%",
                     f"{per_token / 1e6:.0f} MB read per token at the {bandwidth / 1e9:.1f} GB/s a read "
                     f"pass ran at in turn with decoding (median) = {ceiling:.1f} tokens/s; "
                     f"{100 * d.ours * per_token / best:.1f}% against the fastest pass afterwards, "
                     f"{best / 1e9:.1f} GB/s", goal=70.0)]  # fmt: skip


def graph_row(device: str, reps: int, shape: str) -> list[Row]:
    """On a GPU: llmlab's decoding with its CUDA graph (`cuda_graph=True`) against eager steps."""
    graphed, eager, same = bench_decode.bench_graph(shape, _reps(shape, reps), device)
    return [Row(f"greedy decoding, {shape}, B=1, fp32: one CUDA graph a token vs eager steps (llmlab.static_decode)",
                graphed, eager, "tokens/s", "–",
                "ablation: the peer is llmlab with cuda_graph=False; "
                + ("the same tokens" if same else "the tokens differ"))]  # fmt: skip


def weight_bytes(shape: str) -> int:
    """Bytes of the fp32 parameters at `shape`, what decoding one token reads (it builds the
    model: call it once)."""
    model, _ = model_pair(shape)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def copies_row(device: str, reps: int, dtype: torch.dtype, shape: str = "124M") -> list[Row]:
    """llmlab with copies of its matrices against transformers in fp32, a read pass in the same
    turns for the ceiling: fp32 packed for oneDNN (on a CPU with it), or 16-bit (the faster type
    here, `weights16`), half the bytes. transformers stays fp32: in 16 bits its `generate` runs
    every op in 16 bits, 6× slower than fp32 on an AVX2 CPU."""
    probe, nbytes = read_pass(device)
    h = bench_decode.bench(shape, reps=reps, device=device, probe=probe, weights=dtype)
    assert h.probe_s is not None and h.ours_fp32 is not None and h.copy_logits is not None
    ceiling = nbytes / h.probe_s / weight_bytes(shape)
    if dtype == torch.float32:
        name, own = "packed fp32 weights (generate --weights packed)", f"{100 * h.ours / ceiling:.1f}% of it"
    else:
        kind = str(dtype).removeprefix("torch.")
        name = f"{kind} weights (generate --weights {kind})"
        own = f"{50 * h.ours / ceiling:.1f}% of the 16-bit one (half the bytes)"
    return [Row(f"greedy decoding, {shape}, B=1, {name} vs transformers fp32", h.ours, h.peer, "tokens/s", "–",
                f"{_agreement(h.agree)}; {h.ours / h.ours_fp32:.2f}× llmlab in fp32 in the same turns "
                f"({h.ours_fp32:.1f} tokens/s); the fp32 ceiling in these turns {ceiling:.1f} tokens/s, "
                f"{own}; the copies took {h.copy_s:.2f} s to make, before timing; "
                f"{bench_decode.describe(h.copy_logits)}")]  # fmt: skip


def weights16(device: str, reps: int = 5) -> torch.dtype:
    """The 16-bit type whose one-row products run fastest here, timed in turns through llmlab's
    own `matvec16` on copies of GPT-2's [3072, 768] W1 that outgrow the caches (≥ 256 MB of fp32):
    bf16 on a GPU. CPU flags do not tell: with AVX512-BF16 bf16 was the faster on a Sapphire Rapids
    and fp16 twice as fast on a Zen 5 (`python -m benchmarks.bench_matvec`)."""
    if device != "cpu":
        return torch.bfloat16
    w = torch.randn(3072, 768)
    copies = (256 << 20) // (w.numel() * 4)
    x = torch.randn(1, 1, 768)
    dtypes = (torch.bfloat16, torch.float16)
    stacks = [[w.to(dtype) for _ in range(copies)] for dtype in dtypes]
    passes = [lambda ws=ws: [matvec.matvec16(x, w16, None) for w16 in ws] for ws in stacks]
    with torch.inference_mode():
        seconds = interleaved_medians(passes, reps, warmup=1)
    return dtypes[seconds.index(min(seconds))]


def _agreement(agree: int) -> str:
    if agree == bench_decode.NEW:
        return "same tokens as transformers"
    return f"the first {agree} of {bench_decode.NEW} tokens equal to transformers'"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=at_least_one, default=7, help="repetitions per measurement (the median is reported)")
    p.add_argument("--quick", action="store_true", help="only the tiny shape, 3 repetitions")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--append", action="store_true",
                   help="put a new section last, not first (one of the same heading is replaced in place)")  # fmt: skip
    p.add_argument("--out", type=markdown_file, default="BENCHMARKS.md", help="(default: %(default)s)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    reps, shapes = (3, ["tiny"]) if args.quick else (args.reps, ["tiny", "124M"])
    t0 = time.perf_counter()
    section, got, device = Section(), Training(), args.device
    for shape in shapes:
        section.add(f"training step, {shape}", training_rows, device, reps, shape, got)
        if device == "cuda":
            hf = next((r.peer for r in section.rows if r.benchmark.startswith(f"training step, {shape}, B=")), None)
            section.add(f"training step, {shape}, torch.compile", compiled_training_row, device, reps, shape, hf)
    if device == "cuda" and not args.quick:
        section.add("training step, 124M, nanoGPT's GPU batch", gpu_batch_rows, device, reps, got)
    if not args.quick:
        section.add("training step, 124M, tied-gradient ablation", tying_row, device, reps)
        if device == "cpu":
            section.add("AdamW step alone, 124M", adamw_rows, reps)
    for shape in shapes:
        section.add(f"greedy decoding, {shape}", decoding_rows, device, reps, shape)
        if device == "cuda":
            section.add(f"greedy decoding, {shape}, CUDA graph", graph_row, device, reps, shape)
    if not args.quick:
        copies = ([torch.float32] if device == "cpu" and matvec.ONEDNN else []) + [weights16(device)]
        for dtype in copies:  # packed fp32 (the same bytes, read faster), then 16 bits (half the bytes)
            section.add(f"greedy decoding, 124M, {dtype} copies", copies_row, device, reps, dtype)
        section.add("training MFU, 124M", mfu_rows, device, got)
        if device == "cuda":
            section.add("training MFU, 124M, nanoGPT's GPU batch", mfu_rows, device, got, GPU_BATCH)
    command = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(section.rows, command, reps, args.device, time.perf_counter() - t0)
    write_section(args.out, text, first=not args.append)
    if section.failed:
        print(f"benchmarks.run: {len(section.failed)} measurement(s) failed, their rows say how: "
              f"{', '.join(section.failed)}", file=sys.stderr)  # fmt: skip
        return 1
    return 0


@dataclass
class Section:
    """The rows measured so far, and the names of the measurements that failed."""

    rows: list[Row] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def add(self, name: str, measure: Callable[..., list[Row]], *args: object) -> None:
        """measure(*args)'s rows, also printed to stderr as they come; if it raises, one row `name`
        saying how (the traceback goes to stderr), so that one failure costs its own rows, not the
        minutes measured around it."""
        t0 = time.perf_counter()
        try:
            rows = measure(*args)
        except Exception as e:
            traceback.print_exc()
            self.failed.append(name)
            rows = [Row(name, None, None, "-", "–", f"failed: {reason(e, limit=200).replace('|', '/')}")]
        self.rows += rows
        table = markdown_table(rows).splitlines()[2:]  # a run cut short still shows what it measured
        print("\n".join(table) + f"\n  ({name}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)


def render(rows: list[Row], command: str, reps: int, device: str, seconds: float) -> str:
    facts = machine() | {"device": device if device == "cpu" else torch.cuda.get_device_name()}
    facts_md = "\n".join(f"- {k}: {v}" for k, v in facts.items())
    return f"""## Benchmarks on {device}: {machine_title(device)} ({datetime.date.today().isoformat()})

Produced by `{command.strip()}`{at_commit()} in {seconds:.0f} s; each figure is the median of {reps} repetitions
({reps * TINY_REPS} at the tiny shape, {reps * TRAIN_124M_REPS} of 124M training steps) after warm-up, llmlab and its
peer taking turns in every repetition (A B A B …) in the same process.

{facts_md}

{markdown_table(rows)}
"""


if __name__ == "__main__":
    sys.exit(main())
