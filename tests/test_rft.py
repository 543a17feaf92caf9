"""Best-of-N and rejection-sampling fine-tuning with a verifier; tasks, verifiers, task files.

References: scipy's binomtest Wilson interval for the 95% CI; Python's own integer arithmetic
for the addition task's answers; plain Python re-computations of acceptance and best-of-N.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from scipy import stats as scipy_stats

from llmlab.errors import UserError
from llmlab.rft import (
    GREEDY,
    SAMPLE,
    RFTConfig,
    best_of_n,
    best_of_n_accuracy,
    completions,
    rejection_step,
    rft,
    select_best,
    verify,
    wilson_interval,
)
from llmlab.run_dir import load_run
from llmlab.tasks import Example, Task, addition_correct, addition_task, exact_match, load_task, load_verifier
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


# --- statistics and tasks -----------------------------------------------------------------------


@pytest.mark.parametrize(("k", "n"), [(0, 50), (7, 50), (156, 500), (500, 500), (1, 3)])
def test_wilson_interval_matches_scipy(k, n):
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_addition_task_answers_are_right_and_splits_disjoint():
    task = addition_task(digits=3, n_train=300, n_heldout=100, seed=5)
    assert len(task.train) == 300 and len(task.heldout) == 100
    assert not {e.prompt for e in task.train} & {e.prompt for e in task.heldout}
    for e in task.train + task.heldout:
        a, b = e.prompt.rstrip("=").split("+")
        assert e.answer == str(int(a) + int(b)) and max(len(a), len(b)) <= 3
        assert exact_match(e.prompt, e.answer, e.answer) and addition_correct(e.prompt, f" {e.answer} ")
        assert not exact_match(e.prompt, e.answer + "0", e.answer)
    assert task.corpus().splitlines()[0] == task.train[0].prompt + task.train[0].answer
    assert addition_task(digits=3, n_train=300, n_heldout=100, seed=5) == task  # deterministic
    few = addition_task(n_train=300, n_heldout=100, labelled=50)
    assert few.corpus() == "".join(f"{e.prompt}{e.answer}\n" for e in few.train[:50])  # the rest: prompts only


def test_verify_counts_exceptions_and_non_bools_as_rejections():
    def boom(prompt, completion, answer):
        raise ZeroDivisionError("no")

    assert verify(boom, Example("1+1="), "2") == (False, "ZeroDivisionError: no")
    assert verify(lambda *a: "yes", Example("1+1="), "2") == (False, "the verifier returned 'yes', not a bool")
    assert verify(exact_match, Example("1+1=", "2"), "2") == (True, None)

    def leaves(*args):
        raise SystemExit(3)  # ended the whole run with exit 3 and no message

    assert verify(leaves, Example("1+1="), "2") == (False, "SystemExit: 3")


def test_an_accuracy_names_its_verifier_errors():
    """best-of's and round 0's pass@1 printed 0.000 with no word of the verifier failing on every sample."""
    from llmlab.rft import format_accuracy

    h = {"rate": 0.0, "ci95": [0.0, 0.008], "correct": 0, "total": 500}
    assert format_accuracy(h) == "0.000 (95% CI 0.000–0.008, 0/500)"
    assert format_accuracy(h | {"verifier_errors": 500}) == "0.000 (95% CI 0.000–0.008, 0/500), 500 verifier errors"


def test_load_verifier_and_its_errors(tmp_path, monkeypatch):
    assert load_verifier("llmlab.tasks:exact_match") is exact_match
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('bad import')\nx = 1\n")
    (tmp_path / "ok_mod.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec, message in [("nocolon", "must be MODULE:FUNCTION"), ("no_such_mod_xyz:f", "cannot import"),
                          ("broken_mod:f", "RuntimeError: bad import"), ("ok_mod:f", "has no 'f'"),
                          ("ok_mod:x", "is not a function")]:  # fmt: skip
        with pytest.raises(UserError, match=message):
            load_verifier(spec)


def test_task_files_parse_and_malformed_lines_are_one_line_errors(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(10)))
    task = load_task(str(good))
    assert [e.prompt for e in task.heldout] == ["8+1=", "9+1="] and len(task.train) == 8
    bad = {
        '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "1+1="\n': "line 2 is not JSON",
        '{"answer": "2"}\n': 'line 1 needs a non-empty string "prompt"',
        '{"prompt": "1+1=", "answer": 2}\n': '"answer" must be a string, got 2',
        '{"prompt": "1+1=", "solution": "2"}\n': "unknown key 'solution'",
        '["1+1="]\n': 'needs a non-empty string "prompt"',
        '{"prompt": "1+1="}\n': "too few to hold out",
    }
    for text, message in bad.items():
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(UserError, match=message) as e:
            load_task(str(tmp_path / "bad.jsonl"))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="neither a built-in task"):
        load_task(str(tmp_path / "missing.jsonl"))
    for fraction in (0.0, 1.5, float("nan")):
        with pytest.raises(UserError, match="held-out fraction must be between 0 and 1"):
            load_task(str(good), fraction)


# --- sampling, best-of-N, the rejection step ----------------------------------------------------------


TASK_PROMPTS = [f"f{i}(x, y):\n    return x {'+-*'[i % 3]} y * " for i in range(30)]


def corpus_task() -> Task:
    """The test corpus's own task: the digit after "y * " is i mod 7 (conftest.make_corpus)."""
    examples = [Example(p, str(i % 7)) for i, p in enumerate(TASK_PROMPTS)]
    return Task("corpus", examples[:20], examples[20:], "llmlab.tasks:exact_match", 4)


def test_rejection_step_keeps_exactly_what_the_verifier_accepts(trained_run):
    run = load_run(trained_run)
    task = corpus_task()
    drawn = completions(run.model, run.tokenizer, [e.prompt for e in task.train], 4, 4, SAMPLE, seed=3)
    assert all(len(ys) == 4 and all("\n" not in y for y in ys) for ys in drawn)
    v = rejection_step(run.model, run.tokenizer, task.train, exact_match, 4, 4, SAMPLE, seed=3)
    expected = [(e, y) for e, ys in zip(task.train, drawn, strict=True) for y in ys if y.strip() == e.answer]
    assert v.accepted == expected and v.drawn == 80 and v.rate == len(expected) / 80


def test_best_of_n_picks_the_highest_score(trained_run):
    run = load_run(trained_run)
    best = best_of_n(run.model, run.tokenizer, "def f", 6, score=len, max_new_tokens=12, seed=1)
    assert len(best.completions) == 6 and best.best_score == max(len(y) for y in best.completions)
    assert best.best == next(y for y in best.completions if len(y) == best.best_score)  # first of equals
    assert select_best(["a", "bb", "cc"], len).best == "bb"
    with pytest.raises(UserError, match="N >= 1"):
        best_of_n(run.model, run.tokenizer, "def f", 0, score=len)


def test_best_of_n_accuracy_is_the_share_of_prompts_with_a_right_sample(trained_run):
    """With the verifier as the score, best-of-N solves a prompt iff one of its N samples is right."""
    run = load_run(trained_run)
    task = corpus_task()
    acc = best_of_n_accuracy(run.model, run.tokenizer, task, exact_match, 5, SAMPLE, seed=2)
    drawn = completions(run.model, run.tokenizer, [e.prompt for e in task.heldout], 5, 4, SAMPLE, seed=2)
    solved = sum(any(y.strip() == e.answer for y in ys) for e, ys in zip(task.heldout, drawn, strict=True))
    assert (acc.correct, acc.total) == (solved, 10)


# --- the RFT loop and its command ---------------------------------------------------------------


VERIFIERS = textwrap.dedent("""
    def digit(prompt, completion, answer):
        return completion.strip()[:1].isdigit()

    def picky(prompt, completion, answer):
        if "f3(" in prompt:
            raise ValueError("cannot judge f3")
        return completion.strip()[:1].isdigit()

    def never(prompt, completion, answer):
        raise KeyError("always")
""")


@pytest.fixture
def verifiers(tmp_path, monkeypatch):
    (tmp_path / "my_verifiers.py").write_text(VERIFIERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    task_file = tmp_path / "task.jsonl"
    task_file.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer}) + "\n"
                                 for e in corpus_task().train + corpus_task().heldout))  # fmt: skip
    return task_file


def test_rft_round_fine_tunes_on_the_kept_samples_and_reports(trained_run, tmp_path, verifiers):
    import my_verifiers  # type: ignore[import-not-found]

    out = tmp_path / "rft"
    cfg = RFTConfig(samples=3, rounds=1, steps=4, eval_sampling=GREEDY)
    result = rft(trained_run, load_task(str(verifiers)), my_verifiers.picky, "my_verifiers:picky", out, cfg)
    r = result.rounds[0]
    assert r.drawn == 24 * 3 and r.verifier_errors == 3 and "cannot judge f3" in r.first_error
    assert r.acceptance_rate == r.kept / r.drawn and r.kept > 0
    kept = (out / "rounds" / "kept-1.txt").read_text().splitlines()
    assert all(line.split("y * ", 1)[1][:1].isdigit() for line in kept if "y * " in line)
    assert r.heldout["total"] == 6 and r.heldout["ci95"][0] <= r.heldout["rate"] <= r.heldout["ci95"][1]
    tuned = load_run(out)
    assert json.loads((out / "config.json").read_text())["init_from"] == str(trained_run)
    assert not torch.equal(tuned.model.embed.weight, load_run(trained_run).model.embed.weight)
    assert json.loads((out / "rft.json").read_text())["rounds"][0]["kept"] == r.kept


def test_cli_rft_json_write_corpus_and_best_of(capsys, trained_run, tmp_path, verifiers):
    code, out, _ = run_cli(capsys, "rft", str(trained_run), "--task", str(verifiers), "--verifier",
                           "my_verifiers:digit", "--samples", "2", "--steps", "3", "--out", str(tmp_path / "o"),
                           "--json")  # fmt: skip
    result = json.loads(out)
    assert code == 0 and result["rounds"][0]["drawn"] == 48 and "rate" in result["baseline"]
    argv = ["rft", str(trained_run), "--task", str(verifiers), "--verifier", "my_verifiers:digit", "--samples", "2",
            "--steps", "3", "--out", str(tmp_path / "o2")]  # fmt: skip
    code, out, err = run_cli(capsys, *argv)
    table = [line.split()[:2] for line in out.splitlines()]
    assert code == 0 and table == [["round", "0"], ["round", "1"], ["run", "directory"]]  # the table only
    assert "round 1: kept" in err  # the progress is on stderr
    corpus = tmp_path / "addition.txt"
    code, out, _ = run_cli(capsys, "rft", "--task", "addition", "--write-corpus", str(corpus))
    assert code == 0 and corpus.read_text() == addition_task().corpus()
    code, out, _ = run_cli(capsys, "rft", str(trained_run), "--task", str(verifiers), "--best-of", "3", "--json")
    obj = json.loads(out)
    assert code == 0 and obj["n"] == 3 and obj["pass_at_1"]["total"] == obj["best_of_n"]["total"] == 6


def test_cli_rft_bad_inputs_are_one_line_exit_2(capsys, trained_run, tmp_path, verifiers):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\nnot json\n')
    (tmp_path / "exists.txt").write_text("x")
    (tmp_path / "unanswered.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n' * 3)
    base = ["rft", str(trained_run), "--task", str(verifiers), "--steps", "2", "--samples", "1"]
    out = ["--out", str(tmp_path / "new")]
    cases = [
        ([*base, *out, "--verifier", "no_such_module_q:f"], "cannot import the verifier's module"),
        ([*base, *out, "--verifier", "my_verifiers"], "--verifier must be MODULE:FUNCTION"),
        ([*base, *out, "--verifier", "my_verifiers:nope"], "has no 'nope'"),
        ([*base, *out, "--verifier", "my_verifiers:never"], "round 1 kept no sample"),
        (["rft", str(trained_run), "--task", str(tmp_path / "bad.jsonl"), *out], "bad.jsonl line 2 is not JSON"),
        (["rft", str(trained_run), "--task", "multiplication", *out], "neither a built-in task"),
        (
            ["rft", str(trained_run), "--task", str(tmp_path / "unanswered.jsonl"), *out],
            """3 of the 6 examples of unanswered.jsonl have no "answer" (the first: '2+2=')""",
        ),
        (["rft", str(trained_run), "--task", str(tmp_path / "unanswered.jsonl"), "--best-of", "2"], 'have no "answer"'),
        ([*base, *out, "--samples", "0"], "--samples, --rounds and --steps must be at least 1"),
        ([*base, *out, "--lr", "nan"], "--lr must be a positive finite number"),
        (["rft", str(trained_run), "--task", "addition", "--heldout-fraction", "0.5", *out], "applies to a task file"),
        ([*base, *out, "--lr", "-1"], "--lr must be a positive finite number"),
        ([*base, *out, "--temperature", "inf"], "temperature must be a finite number"),
        ([*base, "--out", str(trained_run)], "is the source run"),
        ([*base], "--out NEW_RUN is required"),
        (["rft", "--task", str(verifiers), *out], "RUN is required"),
        ([*base, "--best-of", "0"], "--best-of must be at least 1"),
        (["rft", "--task", "addition", "--write-corpus", str(tmp_path / "exists.txt")], "already exists"),
        (["rft", "--task", "addition", "--write-corpus", str(tmp_path)], "is a directory; give a file name"),
        (["rft", "--task", "addition", "--write-corpus", "/proc/llmlab-corpus.txt"], "/proc/llmlab-corpus.txt"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(capsys, *argv)
        *progress, last = err.splitlines()  # a round's progress lines may come before the error
        assert code == 2 and last.startswith("llmlab: error: ") and message in last, (argv, err)
        assert all(line.startswith("round ") for line in progress), (argv, err)
    assert not (tmp_path / "new" / "config.json").exists()
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").rglob("kept-*.txt"))
