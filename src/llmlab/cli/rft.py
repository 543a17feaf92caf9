"""`llmlab rft`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab.cli.common import emit, table
from llmlab.errors import UserError

if TYPE_CHECKING:
    from llmlab.tasks import Task, Verifier

RECIPE = """\
recipe on the built-in task (2-digit addition; minutes on 2 CPU cores):
  llmlab rft --task addition --write-corpus addition.txt
  llmlab train --data addition.txt --out runs/add --set n_layers=3 --set d_model=96 --set n_heads=4 \\
      --set block_size=64 --set batch_size=32 --set lr=3e-3 --max-steps 1500
  llmlab rft runs/add --task addition --best-of 8
  llmlab rft runs/add --task addition --out runs/add-rft --rounds 3
"""


def run(args: argparse.Namespace) -> None:
    """Rejection-sampling fine-tuning: draw N completions per prompt, keep those a verifier
    accepts, fine-tune on them, repeat; reports each round's acceptance rate and held-out pass@1."""
    from llmlab.tasks import BUILTIN_TASKS, check_answers, load_task, load_verifier

    if args.heldout_fraction is not None and args.task in BUILTIN_TASKS:
        raise UserError(f"--heldout-fraction applies to a task file; {args.task!r} has its own held-out set")
    task = load_task(args.task, 0.2 if args.heldout_fraction is None else args.heldout_fraction)
    if args.write_corpus:
        return _write_corpus(args, task)
    if args.run is None:
        raise UserError("RUN is required (the run to fine-tune), unless --write-corpus is given")
    verifier_name = args.verifier or task.verifier
    verifier = load_verifier(verifier_name)
    check_answers(task, verifier, verifier_name)
    if args.best_of is not None:
        return _best_of(args, task, verifier)
    if args.out is None:
        raise UserError("--out NEW_RUN is required: RFT writes a new run and never changes RUN")
    from llmlab.rft import RFTConfig, rft
    from llmlab.sampling import SamplingConfig

    cfg = RFTConfig(args.samples, args.rounds, args.prompts, args.steps, args.lr, SamplingConfig(args.temperature),
                    SamplingConfig(args.eval_temperature), seed=args.seed)  # fmt: skip
    result = rft(args.run, task, verifier, verifier_name, args.out, cfg, _progress)
    rows = [("round 0 (start)", f"held-out pass@1 {_fmt(result.baseline)}")]
    for r in result.rounds:
        errors = f", {r.verifier_errors} verifier errors" if r.verifier_errors else ""
        rows.append((f"round {r.round}", f"kept {r.kept:,} of {r.drawn:,} ({r.acceptance_rate:.1%}{errors}); "
                                         f"held-out pass@1 {_fmt(r.heldout)}"))  # fmt: skip
    rows.append(("run directory", result.out))
    emit(args, result.to_json(), lambda: table(rows))


def _progress(line: str) -> None:
    """Each round's progress goes to stderr, with or without --json: stdout holds the result."""
    print(line, file=sys.stderr, flush=True)


def _write_corpus(args: argparse.Namespace, task: Task) -> None:
    from llmlab.run_dir import check_makeable, write_text

    path = Path(args.write_corpus)
    if path.is_dir():
        raise UserError(f"--write-corpus {path} is a directory; give a file name such as addition.txt")
    if path.exists():
        raise UserError(f"{path} already exists; --write-corpus never overwrites a file")
    check_makeable(path, "--write-corpus")
    text = task.corpus()
    write_text(path, text)
    lines = text.count("\n")
    emit(args, {"corpus": str(path), "examples": lines, "characters": len(text)},
         lambda: print(f"wrote {lines:,} examples ({len(text):,} characters) to {path}"))  # fmt: skip


def _best_of(args: argparse.Namespace, task: Task, verifier: Verifier) -> None:
    """Held-out pass@1 (greedy) and best-of-N (sampled, the verifier as the score), no training."""
    from llmlab.rft import best_of_n_accuracy, pass_at_1
    from llmlab.run_dir import load_run
    from llmlab.sampling import SamplingConfig

    if args.best_of < 1:
        raise UserError(f"--best-of must be at least 1, got {args.best_of}")
    run = load_run(args.run)
    one = pass_at_1(run.model, run.tokenizer, task, verifier, SamplingConfig(args.eval_temperature), args.seed)
    best = best_of_n_accuracy(run.model, run.tokenizer, task, verifier, args.best_of,
                              SamplingConfig(args.temperature), args.seed)  # fmt: skip
    obj = {"pass_at_1": one.to_json(), "best_of_n": best.to_json(), "n": args.best_of}
    emit(args, obj, lambda: table([(f"held-out pass@1 (T = {args.eval_temperature:g})", _fmt(obj["pass_at_1"])),
                                   (f"held-out best-of-{args.best_of}", _fmt(obj["best_of_n"]))]))  # fmt: skip


def _fmt(h: dict[str, Any]) -> str:
    from llmlab.rft import format_accuracy

    return format_accuracy(h)


def add_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = RECIPE
    p.add_argument("run", metavar="RUN", nargs="?", help="the run to fine-tune (written by `llmlab train`)")
    p.add_argument("--task", required=True, metavar="NAME|FILE",
                   help="built-in task (addition) or a JSON-lines file of {\"prompt\", \"answer\"}")  # fmt: skip
    p.add_argument("--verifier", metavar="MODULE:FUNCTION",
                   help="f(prompt, completion, answer) -> bool (default: llmlab.tasks:exact_match)")  # fmt: skip
    p.add_argument("--out", metavar="NEW_RUN", help="the run directory to write (never RUN itself)")
    p.add_argument("--samples", type=int, default=8, metavar="N", help="completions per prompt (default: 8)")
    p.add_argument("--rounds", type=int, default=1, metavar="R", help="sample-filter-fine-tune rounds (default: 1)")
    p.add_argument("--prompts", type=int, metavar="N", help="training prompts per round (default: all)")
    p.add_argument("--steps", type=int, default=300, metavar="N", help="fine-tuning steps per round (default: 300)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (default: 1e-3)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature (default: 1)")
    p.add_argument("--eval-temperature", type=float, default=1.0, metavar="T",
                   help="temperature of the one held-out completion per prompt (default: 1; 0 = greedy)")  # fmt: skip
    p.add_argument("--heldout-fraction", type=float, metavar="F",
                   help="share of a task file's last lines held out for pass@1 (default: 0.2)")  # fmt: skip
    p.add_argument("--best-of", type=int, metavar="N", help="only measure held-out pass@1 and best-of-N; no training")
    p.add_argument("--write-corpus", metavar="FILE", help="write the task's training text (prompt + answer lines)")
    p.add_argument("--seed", type=int, default=0)
