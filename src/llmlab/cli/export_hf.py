"""`llmlab export-hf`."""

from __future__ import annotations

import argparse
import sys

from llmlab.cli.common import emit


def run(args: argparse.Namespace) -> None:
    """Write a GPT-2-layout run as a Hugging Face checkpoint that transformers loads (--out)."""
    from llmlab.hf import export_hf
    from llmlab.run_dir import load_run

    written = export_hf(load_run(args.run), args.out)
    if "tokenizer.json" not in written:
        print(f"llmlab: the run's character tokenizer has no GPT-2 equivalent and was not exported; without one "
              f"{args.out} does not import back", file=sys.stderr)  # fmt: skip
    emit(args, {"out": args.out, "files": written},
         lambda: print(f"wrote {', '.join(written)} to {args.out}"))  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory of a GPT-2-layout model (e.g. preset gpt2)")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to write")
