"""The benchmark suite's own bookkeeping (its measurements are in BENCHMARKS.md, never in tests)."""

from __future__ import annotations

import pytest
import torch
from benchmarks.common import Row, with_section


def test_make_bench_rewrites_its_own_section_and_keeps_the_others():
    old = "## Benchmarks on cpu\n\nold rows\n\n## Speculative decoding\n\nby hand\n"
    new = "## Benchmarks on cpu\n\nnew rows\n"
    assert with_section(old, new) == "## Benchmarks on cpu\n\nnew rows\n\n## Speculative decoding\n\nby hand\n"
    assert with_section("", new) == new
    cuda = "## Benchmarks on cuda\n\ngpu rows\n"
    assert with_section(old, cuda).startswith(cuda) and "old rows" in with_section(old, cuda)
    later = "## Speculative decoding\n\nagain\n"
    assert with_section(old, later) == "## Benchmarks on cpu\n\nold rows\n\n## Speculative decoding\n\nagain\n"
    ablation = "## GELU\n\nrows\n"
    assert with_section(old, ablation, first=False) == old + "\n" + ablation


def test_a_rerun_on_the_same_machine_replaces_its_section_of_an_earlier_day():
    old = ("## Benchmarks on cpu: AMD EPYC (family 25, model 17), L3 32 MiB (2026-12-03)\n\nold\n\n"
           "## Benchmarks on cpu: Intel Xeon (family 6, model 143), L3 105 MiB (2026-12-03)\n\nxeon\n\n"
           "## Benchmarks on cuda: NVIDIA H200, torch 2.11 (2026-12-01)\n\ngpu\n")  # fmt: skip
    new = "## Benchmarks on cpu: AMD EPYC (family 25, model 17), L3 32 MiB (2026-12-04)\n\nnew\n"
    assert with_section(old, new) == new + old[old.index("\n## Benchmarks on cpu: Intel") :]
    gpu = "## Benchmarks on cuda: NVIDIA H200, torch 2.11 (2026-12-05)\n\nagain\n"
    assert with_section(old, gpu, first=False) == old.replace(old[old.index("## Benchmarks on cuda") :], gpu)
    other = "## Benchmarks on cuda: NVIDIA H100, torch 2.11 (2026-12-05)\n\nh100\n"
    assert with_section(old, other, first=False) == old + "\n" + other  # another machine: a section of its own
    twice = old + "\n" + old.split("\n\n## Benchmarks on cpu: Intel")[0] + "\n"  # one heading twice: kept once
    assert with_section(twice, new) == with_section(old, new)


def test_a_section_heading_names_the_machine_from_what_it_reports(monkeypatch):
    """Reference: the fields of a /proc/cpuinfo as Linux writes them, and sysfs' cache size."""
    from benchmarks import common

    info = {"model name": "Intel(R) Xeon(R) Platinum 8480+", "cpu family": "6", "model": "143",
            "flags": "fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile"}  # fmt: skip
    monkeypatch.setattr(common, "cpuinfo", info.get)
    monkeypatch.setattr(common, "last_level_cache", lambda: "L3 105 MiB")
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(common.torch, "__version__", "2.13.0+cpu")
    assert common.machine_title("cpu") == ("Intel Xeon Platinum 8480+ (family 6, model 143), L3 105 MiB, AVX-512, AMX, "
                                           "2 cores, torch 2.13")  # fmt: skip
    info |= {"model name": "AMD EPYC 7B13", "cpu family": "25", "model": "1", "flags": "sse2 avx2"}
    monkeypatch.setattr(common, "last_level_cache", lambda: "-")
    assert common.machine_title("cpu") == "AMD EPYC 7B13 (family 25, model 1), AVX2, 2 cores, torch 2.13"


def test_a_row_says_by_how_much_it_misses_its_goal():
    missed = Row("x", 1.25, 1.0, "tokens/s", "≥ 1.3×", goal=1.3)
    assert missed.shortfall is not None and abs(missed.shortfall - (1 - 1.25 / 1.3)) < 1e-12
    assert "missed by 3.8% of the target" in missed.cells()[-1]
    assert Row("x", 1.4, 1.0, "tokens/s", "≥ 1.3×", goal=1.3).shortfall is None
    assert Row("ceiling", 65.0, None, "%", "≥ 70%", goal=70.0).cells()[-1].startswith("missed by 7.1%")


def test_make_bench_quick_writes_its_rows_into_an_existing_file(tmp_path, capsys):
    """`python -m benchmarks.run --quick` end to end (tiny shape, 3 repetitions): its section goes
    first, another section stays, and each row's ratio is the quotient of its two figures. The
    figures themselves are BENCHMARKS.md's business, not a test's."""
    import datetime
    import re

    from benchmarks import run

    from llmlab.accounting import cpu_has_native_bf16

    out = tmp_path / "B.md"
    out.write_text("## Speculative decoding\n\nby hand\n")
    days = [datetime.date.today().isoformat()]
    assert run.main(["--quick", "--out", str(out)]) == 0
    days.append(datetime.date.today().isoformat())  # a run across midnight is dated either day
    text = out.read_text()
    from benchmarks.common import machine_title

    assert any(text.startswith(f"## Benchmarks on cpu: {machine_title('cpu')} ({day})\n") for day in days)
    assert text.endswith("## Speculative decoding\n\nby hand\n")
    assert re.search(r"Produced by `python -m benchmarks.run --quick --out [^`]*`( at [0-9a-f]{7,}\+?)? in \d+ s", text)
    assert "- cores: " in text
    rows = {cells[0]: cells for line in text.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}  # fmt: skip
    for name in ["training step, tiny, B=12 S=64, fp32", "greedy decoding, tiny, B=1, fp32"]:
        ours, peer, ratio = float(rows[name][1].replace(",", "")), float(rows[name][2].replace(",", "")), rows[name][4]
        assert ours > 0 and peer > 0 and re.fullmatch(r"\*\*\d+\.\d\d×\*\*", ratio)
        assert abs(float(ratio.strip("*×")) - ours / peer) <= 0.006, (name, ours, peer, ratio)
    assert "same tokens as transformers" in rows["greedy decoding, tiny, B=1, fp32"][6]
    bf16 = rows["training step, tiny, bf16 autocast vs transformers fp32"]
    assert (bf16[1] == "not run") == (not cpu_has_native_bf16()), bf16  # emulated bf16 is not timed
    assert capsys.readouterr().out.strip().startswith("## Benchmarks on cpu")


def test_a_failed_measurement_costs_its_own_rows_only(tmp_path, monkeypatch, capsys):
    """One shot on a lent GPU must not end in nothing: a measurement that raises becomes a row
    saying how, the others are measured and written, the traceback goes to stderr, and the run
    exits 1 naming what failed. An MFU row whose training steps failed says that, not "emulated"."""
    from benchmarks import bench_train, run

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory | on purpose\nsecond line")

    monkeypatch.setattr(bench_train, "bench", broken)
    out = tmp_path / "B.md"
    assert run.main(["--quick", "--out", str(out)]) == 1
    text, err = out.read_text(), capsys.readouterr().err
    assert "| training step, tiny | not run | - | - | - | – | failed: RuntimeError: CUDA error: out of memory / on " \
           "purpose |" in text  # fmt: skip
    assert "second line" not in text and "Traceback" in err
    assert err.strip().splitlines()[-1] == "benchmarks.run: 1 measurement(s) failed, their rows say how: " \
                                           "training step, tiny"  # fmt: skip
    decoding = next(line for line in text.splitlines() if line.startswith("| greedy decoding, tiny, B=1, fp32 |"))
    assert float(decoding.split("|")[2].replace(",", "")) > 0  # measured after the failure
    fp32 = run.mfu_rows("cpu", run.Training())[0]
    assert fp32.ours is None and "the training row whose steps it counts failed" in fp32.note


def test_the_gpu_batch_rows_time_each_dtype_against_transformers_in_it_and_feed_mfu():
    """`--device cuda`'s rows at nanoGPT's GPU batch, run here at the tiny shape and a small batch
    on the CPU: both sides timed in each dtype, and the MFU rows divide exactly those steps' FLOPs
    (llmlab.accounting.train_step_flops) by the matmul rate timed beside them."""
    from benchmarks import run
    from benchmarks.shapes import model_pair

    from llmlab.accounting import train_step_flops

    got = run.Training()
    rows = run.gpu_batch_rows("cpu", 1, got, shape="tiny", batch=(2, 16))
    assert [r.benchmark for r in rows] == [
        "training step, tiny, B=2 S=16 (nanoGPT's GPU batch), fp32",
        "training step, tiny, B=2 S=16 (nanoGPT's GPU batch), bf16 autocast, both sides",
    ]
    assert all(r.ours > 0 and r.peer > 0 for r in rows)
    assert set(got.tokens_per_s) == set(got.matmul_in_turn) == {(2, 16, "float32"), (2, 16, "bfloat16")}
    mfu = run.mfu_rows("cpu", got, (2, 16), shape="tiny")
    assert [r.benchmark for r in mfu] == [f"training MFU, tiny, B=2 S=16, {t}" for t in ("float32", "bfloat16")]
    per_token = train_step_flops(model_pair("tiny")[0].cfg, 2, 16) / 32
    expected = 100 * rows[0].ours * per_token / got.matmul_in_turn[2, 16, "float32"]
    assert abs(mfu[0].ours - expected) < 1e-9 * expected and mfu[0].goal is None


def test_make_bench_repeats_the_noisiest_measurements_more_often():
    """--reps 7: the tiny shape's millisecond steps and decoding 5x as often, 124M training steps
    2x (their fp32 ratio read 1.13-1.23 across 7-turn runs of one commit), 124M decoding as asked."""
    from benchmarks.run import _reps, _train_reps

    assert (_train_reps("tiny", 7), _train_reps("124M", 7)) == (35, 14)
    assert (_reps("tiny", 7), _reps("124M", 7)) == (35, 7)


def test_the_tying_ablation_runs_in_a_fresh_process_and_reports_both_sides():
    """The subprocess `make bench` starts for the tied-gradient ablation (at the tiny shape here,
    one repetition): its JSON line is read back as two step rates."""
    import math

    from benchmarks.run import tying_in_own_process

    tied, plain = tying_in_own_process(reps=1, device="cpu", shape="tiny")
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in (tied, plain)), (tied, plain)


def test_the_clip_ablation_times_both_clipped_steps():
    """`make bench`'s clip row, at the tiny shape: both sides timed, the note in milliseconds."""
    from benchmarks.run import clip_row

    row = clip_row(reps=1, shape="tiny")
    assert row.benchmark.startswith("clip + AdamW step, tiny")
    assert row.ours > 0 and row.peer > 0
    assert row.note.startswith("ablation; ") and f"{1e3 / row.ours:.0f} against {1e3 / row.peer:.0f} ms" in row.note


def test_gpu_sh_says_in_one_line_what_it_lacks(tmp_path):
    """benchmarks/gpu.sh on this CPU machine: no CUDA device, one line and a non-zero exit before any
    benchmark runs; with a Python that lacks a package it needs (here: site-packages switched off by
    -S), it names the package. BENCHMARKS.md is left as it was."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    root = Path(__file__).parent.parent
    before = (root / "BENCHMARKS.md").read_bytes()
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    for py, expected in ((sys.executable, "gpu.sh: no CUDA device"), (str(bare), "has no torch")):
        if py == sys.executable and torch.cuda.is_available():
            continue  # a GPU machine would run the suite
        done = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh")], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "PY": py}, timeout=120)  # fmt: skip
        assert done.returncode == 1 and done.stdout == "", done
        assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr
    helped = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--help"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PY": sys.executable}, timeout=120)  # fmt: skip
    assert helped.returncode == 0 and helped.stderr == "", helped
    assert helped.stdout.startswith("On a CUDA machine, in one go:") and "  --reps REPS " in helped.stdout
    assert "#" not in helped.stdout and "set -euo" not in helped.stdout  # the comment, without the script
    assert (root / "BENCHMARKS.md").read_bytes() == before


def test_benchmark_arguments_are_checked_before_any_measuring(tmp_path, capsys):
    """Repetitions below 1, an --out that is a folder, in a missing folder or not text, CUDA
    without a device and packed weights off the CPU are argparse errors (exit 2, one line) before
    anything is timed; before, they were tracebacks after the run, which lost its figures."""
    import pytest
    import torch
    from benchmarks import bench_attention, bench_compile, bench_decode, bench_speculative, bench_train
    from benchmarks import run as bench_run

    (tmp_path / "binary.md").write_bytes(b"\xff\xfe")
    cases = [
        (bench_run.main, ["--reps", "0"], "argument --reps: must be at least 1, got 0"),
        (bench_run.main, ["--reps", "x"], "invalid int value: 'x'"),
        (bench_run.main, ["--out", str(tmp_path)], "is a directory; name a Markdown file"),
        (bench_run.main, ["--out", str(tmp_path / "no" / "B.md")], f"there is no folder {tmp_path / 'no'}"),
        (bench_run.main, ["--out", str(tmp_path / "binary.md")], "binary.md: 'utf-8' codec can't decode"),
        (bench_compile.main, ["--reps", "-1"], "must be at least 1, got -1"),
        (bench_attention.main, ["--reps", "0"], "must be at least 1, got 0"),
        (bench_speculative.main, ["--gamma", "0"], "argument --gamma: must be at least 1"),
        (bench_speculative.main, ["--target", str(tmp_path / "none")], "does not exist"),
        (bench_train.main, ["--device", "tpu"], "invalid choice: 'tpu'"),
        (bench_decode.main, ["--weights", "packed", "--device", "cuda"], "--weights packed is for the CPU"),
    ]
    if not torch.cuda.is_available():
        cases.append((bench_run.main, ["--device", "cuda"], "--device cuda: no CUDA device is available"))
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and message in err, (argv, err)


def test_a_section_is_printed_before_it_is_written(tmp_path, capsys):
    """`write_section`: the figures reach stdout first, so a write that fails loses nothing, and
    the failure is one line naming the file."""
    import pytest
    from benchmarks.common import write_section

    out = tmp_path / "B.md"
    out.write_text("## Other\n\nkept\n")
    write_section(out, "## Benchmarks on cpu\n\nrows\n", first=True)
    assert capsys.readouterr().out == "## Benchmarks on cpu\n\nrows\n\n"
    assert out.read_text() == "## Benchmarks on cpu\n\nrows\n\n## Other\n\nkept\n"
    out.unlink()
    out.mkdir()  # the file became a folder during the run
    with pytest.raises(SystemExit) as exit_:
        write_section(out, "## Benchmarks on cpu\n\nrows\n", first=True)
    assert "rows" in capsys.readouterr().out
    assert str(exit_.value.code).startswith(f"could not write {out} (") and "printed above" in str(exit_.value.code)


def test_bench_speculative_runs_on_a_pair_with_a_short_context(trained_run, capsys):
    """The pair's context (32 here) bounds the decoding and the timed calls' cache; before, the
    calls assumed 64 cached tokens and raised after the table was printed."""
    from benchmarks import bench_speculative

    pair = ["--target", str(trained_run), "--draft", str(trained_run)]
    bench_speculative.main([*pair, "--repeats", "1", "--new-tokens", "4", "--gamma", "3", "--prompt", "def ",
                            "--prompt", "    return "])  # fmt: skip
    out = capsys.readouterr().out
    assert "| 3 |" in out and "4 new tokens × 2 prompts" in out
    assert "one cached target call after 28 tokens:" in out and out.rstrip().splitlines()[-1].startswith("command:")


def test_the_16_bit_decoding_row_checks_its_logits_against_fp32():
    """bench_decode's agreement: the next-token logits fed one at a time equal the model's own
    whole-sequence forward (the reference), and `agreement` counts top tokens and the largest
    difference as torch.argmax and a max over |Δ| do, here on hand-made logits."""
    import torch
    from benchmarks.bench_decode import agreement, stepwise_logits
    from benchmarks.shapes import model_pair

    model, _ = model_pair("tiny")
    ids = torch.randint(0, 65, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = model.eval()(ids)[0]  # [S, V]
    torch.testing.assert_close(stepwise_logits(model, ids), whole, rtol=1e-5, atol=1e-5)
    fp32 = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 5.0], [2.0, 2.5, 0.0]])
    half = fp32 + torch.tensor([[0.0, 2.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -0.25], [0.75, 0.0, 0.0]])
    a = agreement(fp32, half)
    assert (a.top1, a.max_abs) == (0.5, 2.5)  # rows 0 and 3 change their top token
    assert abs(a.scale - fp32.std().item()) < 1e-12


def test_the_last_level_cache_is_the_largest_of_the_highest_level(monkeypatch, tmp_path):
    """Reference: a sysfs cache directory written here (sizes compared as numbers, not strings)."""
    from benchmarks import common

    def write(caches: list[tuple[str, str]]) -> None:
        for i, (level, size) in enumerate(caches):
            (tmp_path / f"index{i}").mkdir(exist_ok=True)
            (tmp_path / f"index{i}" / "level").write_text(level + "\n")
            (tmp_path / f"index{i}" / "size").write_text(size + "\n")

    real_path = common.Path
    monkeypatch.setattr(common, "Path", lambda p: tmp_path if p.endswith("/cache") else real_path(p))
    assert common.last_level_cache() == "-"
    write([("1", "48K"), ("1", "32K"), ("2", "8K"), ("2", "16K")])
    assert common.last_level_cache() == "L2 16 KiB"
    write([("1", "48K"), ("1", "32K"), ("2", "8K"), ("2", "16K"), ("3", "480M")])
    assert common.last_level_cache() == "L3 480 MiB"


def test_the_attention_ablation_names_the_route_llmlab_takes_at_each_shape():
    """bench_attention's rows: one per shape, each saying whether llmlab's bf16 training attends
    through fp32, which is S·D < 16,384 (llmlab.model.FP32_ATTENTION_BELOW)."""
    from benchmarks import bench_attention

    rows = bench_attention.rows(1)
    assert len(rows) == len(bench_attention.SHAPES)
    for (_, _, S, D), row in zip(bench_attention.SHAPES, rows, strict=True):
        assert row.note.endswith("llmlab takes " + ("fp32" if S * D < 16_384 else "bf16"))
        assert row.ours > 0 and row.peer > 0


def test_the_argmax_ablation_checks_both_ways_agree_and_times_each_shape(monkeypatch):
    """bench_argmax's rows: one per shape, timed; and a disagreement between the two ways is an
    error, not a row (a wrong argmax patched in, on one shape)."""
    from benchmarks import bench_argmax

    rows = bench_argmax.bench(1)
    named = [r.benchmark.split(": ")[0] for r in rows]
    assert named == [f"argmax over the last dim, {list(shape)}" for shape in bench_argmax.SHAPES]
    for row in rows:
        assert row.ours > 0 and row.peer > 0 and "µs; the same indices" in row.note
    assert [row.note.endswith("Tensor.argmax, after a check") for row in rows] == [False, False, True]
    monkeypatch.setattr(bench_argmax, "argmax", lambda x: x.argmin(-1))
    with pytest.raises(AssertionError, match=r"differ on \[1, 50257\]"):
        bench_argmax.bench(1)


def test_the_profiles_print_per_step_figures_that_add_up(capsys):
    """`benchmarks.profile_train` and `profile_decode` at the tiny shape on the CPU: each side's
    operator table is sorted, its rows are per step (or token) and sum to no more than the total
    it prints; there is no GPU table on a CPU."""
    import re

    from benchmarks import profile_decode, profile_train

    profile_train.main(["--steps", "1", "--top", "200"])
    profile_decode.main(["--top", "200"])
    out = capsys.readouterr().out
    heads = re.findall(r"^(llmlab|transformers), tiny, cpu(?:, fp32)?: ([\d.]+) ms per (step|token) wall; "
                       r"([\d.]+) ms inside ATen operators", out, re.M)  # fmt: skip
    assert [(h[0], h[2]) for h in heads] == [("llmlab", "step"), ("transformers", "step"), ("llmlab", "token")]
    tables = re.split(r"^(?:llmlab|transformers), tiny", out, flags=re.M)[1:]
    for (_, wall, _, inside), table in zip(heads, tables, strict=True):
        ms = [float(m) for m in re.findall(r"^\| [^|]+ \| ([\d.]+) \| [\d.]+ \|$", table, re.M)]
        assert ms and ms == sorted(ms, reverse=True) and float(wall) > 0
        assert sum(ms) == pytest.approx(float(inside), abs=0.002 * len(ms) + 0.1)  # every row shown: the total's parts
    assert "GPU kernel" not in out


def test_gpu_kernels_are_summed_per_step_most_time_first():
    """`top_kernels` on a stand-in for a GPU profile: the profiler's own sum ("Self CUDA time
    total") is the sum over its CUDA events, here 3 steps of 6 and 1.5 ms, user annotations apart."""
    from types import SimpleNamespace

    from benchmarks.common import top_kernels

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(key="aten::mm", device_type=cpu, self_device_time_total=0.0, count=30),
              SimpleNamespace(key="gemm", device_type=cuda, self_device_time_total=4500.0, count=30),
              SimpleNamespace(key="softmax", device_type=cuda, self_device_time_total=18000.0, count=3),
              SimpleNamespace(key="step", device_type=cuda, self_device_time_total=9e9, count=3,
                              is_user_annotation=True)]  # fmt: skip
    prof = SimpleNamespace(key_averages=lambda: events)
    assert top_kernels(prof, per=3) == [("softmax", 6.0, 1.0), ("gemm", 1.5, 10.0)]


def test_the_cuda_runtime_is_told_apart_from_operators():
    from benchmarks.common import cuda_runtime

    ops = [("cudaDeviceSynchronize", 9.0, 1.0), ("aten::mm", 2.0, 30.0), ("cudaLaunchKernel", 1.5, 200.0),
           ("Optimizer.step#AdamW.step", 0.5, 1.0), ("cuLaunchKernel", 0.25, 4.0)]  # fmt: skip
    assert cuda_runtime(ops) == ([("aten::mm", 2.0, 30.0), ("Optimizer.step#AdamW.step", 0.5, 1.0)], 10.75)


def test_produced_by_names_the_checkouts_commit_and_only_its_own(tmp_path, monkeypatch):
    """Reference: git's own `rev-parse --short HEAD`. A copy of the code outside any checkout, or
    inside another checkout (a folder of this one), names no commit."""
    import subprocess
    from pathlib import Path

    from benchmarks import common

    root = Path(common.__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    assert common.commit() in (head.stdout.strip(), head.stdout.strip() + "+")
    for outer in (tmp_path / "plain", tmp_path / "repo"):
        (outer / "copy" / "benchmarks").mkdir(parents=True)
        monkeypatch.setattr(common, "__file__", str(outer / "copy" / "benchmarks" / "common.py"))
        if outer.name == "repo":  # a checkout with a commit, the copy a folder of it
            git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(outer)]
            subprocess.run([*git, "init", "-q"], check=True)
            subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
        assert common.commit() is None, outer
