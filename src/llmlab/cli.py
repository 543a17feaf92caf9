"""The `llmlab` command: a table from subcommand to a thin handler over the library.

Each handler parses, calls the library, and prints; with `--json` it prints one JSON object on
stdout instead. A `UserError` from anywhere becomes `llmlab: error: <one line>` and exit code 2.
torch is imported inside the handlers, so `llmlab --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from llmlab import config as cfg_lib
from llmlab.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}")


# --- shared options -------------------------------------------------------------------------


def add_config_args(p: argparse.ArgumentParser, default_preset: str = "notes") -> None:
    g = p.add_argument_group("model and training configuration")
    g.add_argument(
        "--preset", default=default_preset, help=f"one of: {', '.join(cfg_lib.PRESETS)} (default: %(default)s)"
    )
    g.add_argument(
        "--config", metavar="FILE", help="a TOML file with [model] and [train] tables, applied after the preset"
    )
    g.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one config field, e.g. --set n_layers=2 (repeatable, type-checked)",
    )
    g.add_argument("--tokenizer", choices=["char", "bpe"], help="character-level or byte-level BPE")
    g.add_argument("--vocab-size", type=int, metavar="N", help="vocabulary size of a BPE tokenizer")
    g.add_argument("--max-steps", type=int, metavar="N")
    g.add_argument(
        "--max-minutes", type=float, metavar="M", help="stop after M minutes (the LR schedule follows the clock)"
    )
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda, mps")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="bfloat16 trains under autocast")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model for training")


def resolve_config(args: argparse.Namespace) -> cfg_lib.Preset:
    """Preset, then --config file, then the dedicated flags, then --set overrides."""
    preset = cfg_lib.preset(args.preset)
    if args.config:
        preset = cfg_lib.load_toml(args.config, preset)
    flags = {
        "tokenizer": args.tokenizer, "bpe_vocab": args.vocab_size, "max_steps": args.max_steps,
        "max_minutes": args.max_minutes, "seed": args.seed, "device": args.device, "dtype": args.dtype,
        "compile": args.compile,
    }  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None} | cfg_lib.parse_sets(args.sets)
    return cfg_lib.Preset(*cfg_lib.apply_overrides(preset.model, preset.train, overrides))


def emit(args: argparse.Namespace, obj: dict[str, Any], human: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(obj, ensure_ascii=False))
    else:
        human()


def table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# --- train ----------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> None:
    """Train a model on a text source and write its run directory (--out)."""
    from llmlab.train import train

    if args.resume and (args.sets or args.config or args.tokenizer or args.tokenizer_from):
        raise UserError("--resume continues the saved configuration; only --max-steps, --max-minutes "
                        "and --device may change")  # fmt: skip
    preset = resolve_config(args)
    result = train(preset.model, preset.train, args.data, args.out, resume=args.resume,
                   tokenizer_from=args.tokenizer_from, progress=not args.json,
                   extra={"preset": args.preset})  # fmt: skip
    emit(args, result.to_json(), lambda: table([
        ("run directory", result.run_dir),
        ("steps", f"{result.steps} (stopped by {result.stopped_by})"),
        ("parameters", f"{result.params:,}"),
        ("train loss", f"{result.train_loss:.4f} nats/token (mean of the last evaluation interval)"),
        ("val loss", f"{result.val_loss:.4f} nats/token on {result.val_tokens:,} validation tokens"),
        ("val perplexity", f"{result.val_perplexity:.3f}"),
        ("tokens/s", f"{result.tokens_per_second:,.0f} (training steps only)"),
        ("time", f"{result.elapsed_seconds:.1f} s"),
    ]))  # fmt: skip


def args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="stdlib", help="stdlib (default), a text file, a folder or a glob")
    p.add_argument("--out", required=True, metavar="RUN", help="the run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--tokenizer-from", metavar="RUN", help="reuse the tokenizer of another run")
    add_config_args(p)


# --- generate -------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a prompt with a trained model (greedy, temperature, top-k, top-p)."""
    from llmlab.run_dir import load_run
    from llmlab.sampling import SamplingConfig, generate_text
    from llmlab.train import pick_device

    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise UserError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    prompt = _read_prompt(args)
    run = load_run(args.run, pick_device(args.device or "cpu"))
    samples = []
    for i in range(args.num_samples):
        if not args.json:
            print(("\n---\n" if i else "") + prompt, end="", flush=True)
        stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
        g = generate_text(run.model, run.tokenizer, prompt, args.max_new_tokens, sampling,
                          seed=args.seed + i, stop=args.stop, use_cache=not args.no_cache, on_text=stream)  # fmt: skip
        samples.append({"text": g.text, "token_ids": g.token_ids})
    if args.json:
        print(json.dumps({"prompt": prompt, **samples[0], "samples": samples}, ensure_ascii=False))
    else:
        print()


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    from llmlab.data import read_text_file

    return read_text_file(Path(args.prompt_file))


def args_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory written by `llmlab train`")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 = greedy (default: 1)")
    p.add_argument("--top-k", type=int, metavar="K")
    p.add_argument("--top-p", type=float, metavar="P")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument("--device", help="cpu (default), cuda, mps")


# --- run (the tour) -------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> None:
    """The tour: train the notes' model, then walk through the notes on it and write a report."""
    from llmlab.report import run_tour

    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    tour = run_tour(Path(args.out), quick=args.quick, data=args.data, minutes=args.minutes,
                    retrain=args.retrain, log=log, progress=not args.json)  # fmt: skip
    emit(args, tour.to_json(), lambda: print(f"\nreport: {tour.report}"))


def args_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/tour", metavar="DIR", help="where the tour writes (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a shorter tour: about a minute")
    p.add_argument("--data", default="stdlib", help="the text to train on (default: stdlib)")
    p.add_argument("--minutes", type=float, help="training time for the notes' model (default: 4, --quick 0.6)")
    p.add_argument("--retrain", action="store_true", help="train again even if DIR holds the tour's model")


# --- the table ------------------------------------------------------------------------------

Handler = Callable[[argparse.Namespace], None]
COMMANDS: dict[str, tuple[Handler, Callable[[argparse.ArgumentParser], None]]] = {
    "train": (cmd_train, args_train),
    "generate": (cmd_generate, args_generate),
    "run": (cmd_run, args_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="llmlab", description="See and test how a large language model works.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (handler, add_args) in COMMANDS.items():
        doc = (handler.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc)
        add_args(p)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        args.handler(args)
    except UserError as e:
        message = " ".join(str(e).split())  # always one line
        print(f"llmlab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llmlab generate ... | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
