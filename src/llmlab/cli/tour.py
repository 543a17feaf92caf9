"""`llmlab run`: the tour."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from llmlab.cli.common import emit, refuse_file_as_out
from llmlab.errors import UserError


def run(args: argparse.Namespace) -> None:
    """The tour: train the notes' model, then walk through the notes on it and write a report."""
    from llmlab.report import run_tour

    refuse_file_as_out(args.out)
    if (Path(args.out) / "config.json").is_file():
        raise UserError(f"--out {args.out} holds a run written by `llmlab train`; the tour writes runs of its own "
                        "inside its --out: choose another")  # fmt: skip
    if args.minutes is not None and not 0 < args.minutes < math.inf:  # also NaN
        raise UserError(f"--minutes must be a positive finite number, got {args.minutes}")
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    tour = run_tour(Path(args.out), quick=args.quick, data=args.data, minutes=args.minutes,
                    retrain=args.retrain, log=log, progress=not args.json)  # fmt: skip
    llmlab = sys.argv[0] if Path(sys.argv[0]).name == "llmlab" else "llmlab"  # .venv/bin/llmlab under `make run`
    emit(args, tour.to_json(),
         lambda: print(f"\nreport: {tour.report}\nexplore the model: {llmlab} serve {tour.notes_dir}"))  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/tour", metavar="DIR", help="where the tour writes (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a shorter tour: about a minute and a quarter")
    p.add_argument("--data", default="stdlib", help="the text to train on (default: stdlib)")
    p.add_argument("--minutes", type=float, help="training time for the notes' model (default: 4, --quick 0.6)")
    p.add_argument("--retrain", action="store_true", help="train again even if DIR holds the tour's model")
