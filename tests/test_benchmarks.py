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
