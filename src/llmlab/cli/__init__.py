"""The `llmlab` command: a table from subcommand to a thin handler over the library.

Each command is a module here with `add_args(parser)` and `run(args)`: parse, call the library,
print; with `--json`, one JSON object on stdout instead. A `UserError` from anywhere becomes
`llmlab: error: <one line>` and exit code 2, and so does an `OSError` that no command foresaw
(a directory where a file belongs, no permission, a full disk). torch is imported inside the handlers, so
`llmlab --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from llmlab.cli import count, export_hf, generate, import_hf, knowledge, rft, score, serve, tour, train
from llmlab.cli import trace as trace_cmd
from llmlab.cli.common import Parser, help_texts
from llmlab.errors import UserError

COMMANDS: dict[str, ModuleType] = {
    "train": train,
    "generate": generate,
    "rft": rft,
    "score": score,
    "run": tour,
    "import-hf": import_hf,
    "export-hf": export_hf,
    "knowledge": knowledge,
    "count": count,
    "trace": trace_cmd,
    "serve": serve,
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="llmlab", description="See and test how a large language model works.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, command in COMMANDS.items():
        summary, doc = help_texts(command.run)
        p = sub.add_parser(name, help=summary, description=doc)
        command.add_args(p)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(handler=command.run)
    return parser


TEXT_OPTIONS = ("prompt", "subject", "target", "text", "stop", "out")  # text, and the paths llmlab writes


def check_text_options(args: argparse.Namespace) -> None:
    """Bytes that are not UTF-8 reach Python as surrogate escapes: refuse them in a text option,
    and in `--out`, whose name goes into the JSON files a command writes."""
    for name in TEXT_OPTIONS:
        value = getattr(args, name, None)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise UserError(f"--{name} is not valid UTF-8") from None


def check_seed(args: argparse.Namespace) -> None:
    """Every command's --seed seeds torch (and numpy for data order): an integer in [0, 2**63)."""
    from llmlab.config import MAX_SEED

    seed = getattr(args, "seed", None)
    if isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be from 0 to 2**63 - 1, got {seed}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        check_text_options(args)
        check_seed(args)
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
    except MemoryError:
        print("llmlab: error: out of memory: the model or batch is too large for this machine", file=sys.stderr)
        return 2
    except RuntimeError as e:  # PyTorch reports a failed allocation as a RuntimeError
        if "can't allocate memory" not in str(e) and "out of memory" not in str(e):
            raise
        print(f"llmlab: error: out of memory: {' '.join(str(e).split())[:200]}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that is a directory, a file, unreadable, on a full disk...
        where = f": {e.filename}" if e.filename else ""
        print(f"llmlab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
