"""The benchmark suite's own bookkeeping (its measurements are in BENCHMARKS.md, never in tests)."""

from __future__ import annotations

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
    import re

    from benchmarks import run

    from llmlab.accounting import cpu_has_native_bf16

    out = tmp_path / "B.md"
    out.write_text("## Speculative decoding\n\nby hand\n")
    assert run.main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("## Benchmarks on cpu\n") and text.endswith("## Speculative decoding\n\nby hand\n")
    assert "Produced by `python -m benchmarks.run --quick --out " in text and "- cores: " in text
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


def test_the_tying_ablation_runs_in_a_fresh_process_and_reports_both_sides():
    """The subprocess `make bench` starts for the tied-gradient ablation (at the tiny shape here,
    one repetition): its JSON line is read back as two step rates."""
    import math

    from benchmarks.run import tying_in_own_process

    tied, plain = tying_in_own_process(reps=1, device="cpu", shape="tiny")
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in (tied, plain)), (tied, plain)


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
    assert (root / "BENCHMARKS.md").read_bytes() == before
