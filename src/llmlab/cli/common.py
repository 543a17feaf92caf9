"""What the commands share: the one-line-error parser, config options, and output helpers."""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from llmlab import config as cfg_lib
from llmlab import strict_json
from llmlab.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise UserError(message if self.prog == "llmlab" else f"{self.prog}: {message}")


DEFAULT_PRESET = "notes"


def add_config_args(p: argparse.ArgumentParser, default_preset: str = DEFAULT_PRESET) -> None:
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


def help_texts(fn: Callable[..., Any]) -> tuple[str | None, str]:
    """(the one-line help in a command list, the description of its --help) from fn's docstring:
    the first paragraph joined into one line, and the whole docstring dedented."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split()) or None, doc


def refuse_file_as_out(out: str) -> None:
    """--out names a directory to write into: an existing file there is a one-line error."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose another --out")
    from llmlab.run_dir import check_makeable  # here: run_dir imports torch, which --help does without

    check_makeable(out)


def print_json(obj: dict[str, Any]) -> None:
    """`--json`: one JSON object on one line of stdout."""
    print(strict_json.dumps(obj), flush=True)


def emit(args: argparse.Namespace, obj: dict[str, Any], human: Callable[[], None]) -> None:
    if args.json:
        print_json(obj)
    else:
        human()


def table(rows: list[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def use_color(mode: str) -> bool:
    """auto: colour when stdout is a terminal and NO_COLOR is unset (no-color.org)."""
    if mode == "auto":
        return sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return mode == "always"


def check_writable(path: str | Path, flag: str) -> None:
    """Fail before any long work if the file `path` could not be written: its folder is made now
    (an OSError names what is missing), and an empty file is made in it and removed. (Permission
    bits alone would not say: root passes `os.access` on a folder that refuses files, such as /sys.)"""
    from llmlab.run_dir import check_makeable

    parent = Path(path).parent
    check_makeable(path, flag)
    parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{Path(path).name}.", suffix=".probe"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {parent} ({e.strerror or e})") from None
