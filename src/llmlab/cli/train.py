"""`llmlab train`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from llmlab import config as cfg_lib
from llmlab.cli.common import DEFAULT_PRESET, add_config_args, emit, resolve_config, table
from llmlab.config import ModelConfig, field_names, parse_sets
from llmlab.errors import UserError

if TYPE_CHECKING:
    from llmlab.train import TrainResult


def run(args: argparse.Namespace) -> None:
    """Train a model on a text source and write its run directory (--out)."""
    from llmlab.train import train

    if args.resume:
        return resume(args)
    if args.init_from and (args.tokenizer_from or args.tokenizer or args.vocab_size is not None):
        raise UserError("--init-from brings its run's tokenizer; drop --tokenizer-from, --tokenizer and --vocab-size")
    if args.init_from and args.config:
        raise UserError("--init-from keeps its run's model; give training settings with --set, not --config")
    if args.init_from and args.preset != DEFAULT_PRESET:
        cfg_lib.preset(args.preset)  # an unknown name is that error first
        raise UserError(f"--init-from keeps its run's model; --preset {args.preset} would change it (training "
                        f"settings start from the {DEFAULT_PRESET} preset's; change them with --set)")  # fmt: skip
    model_keys = sorted(set(parse_sets(args.sets)) & set(field_names(ModelConfig)))
    if args.init_from and model_keys:
        raise UserError(f"--init-from keeps its run's model; --set {model_keys[0]} would change it (only training "
                        "settings may be set)")  # fmt: skip
    preset = resolve_config(args)
    if args.tokenizer_from and (args.vocab_size is not None or args.tokenizer):
        raise UserError("--tokenizer-from brings its run's tokenizer and vocabulary; drop --tokenizer and "
                        "--vocab-size")  # fmt: skip
    if args.vocab_size is not None and preset.train.tokenizer != "bpe":
        raise UserError(f"--vocab-size sizes a BPE tokenizer; this run's tokenizer is {preset.train.tokenizer} "
                        "(add --tokenizer bpe)")  # fmt: skip
    report(args, train(preset.model, preset.train, args.data or "stdlib", args.out,
                       tokenizer_from=args.tokenizer_from, init_from=args.init_from, progress=not args.json,
                       extra={"preset": args.preset}))  # fmt: skip


RESUME_FIXED = ("sets", "config", "tokenizer", "vocab_size", "tokenizer_from", "init_from", "data", "seed", "dtype",
                "compile")  # fmt: skip


def resume(args: argparse.Namespace) -> None:
    """--resume: the saved configuration, with only --max-steps, --max-minutes and --device changed
    where they are given (the schedule's length is the saved one unless --max-steps says otherwise)."""
    from llmlab.run_dir import check_run_dir, read_config
    from llmlab.train import train

    if any(getattr(args, name) not in (None, []) for name in RESUME_FIXED) or args.preset != DEFAULT_PRESET:
        raise UserError("--resume continues the saved configuration and data; only --max-steps, --max-minutes "
                        "and --device may change")  # fmt: skip
    from llmlab.train import check_resumable

    check_resumable(Path(args.out))
    model_cfg, saved, _ = read_config(check_run_dir(args.out))
    given = {"max_steps": args.max_steps, "max_minutes": args.max_minutes, "device": args.device}
    _, train_cfg = cfg_lib.apply_overrides(model_cfg, saved, {k: v for k, v in given.items() if v is not None})
    report(args, train(model_cfg, train_cfg, "stdlib", args.out, resume=True, progress=not args.json))


def report(args: argparse.Namespace, result: TrainResult) -> None:
    """The run's summary, printed once: under torchrun only rank 0 reports."""
    from llmlab.accounting import peak_command

    if result.rank != 0:
        return
    emit(args, result.to_json(), lambda: table([
        ("run directory", result.run_dir),
        ("steps", f"{result.steps} (stopped by {result.stopped_by})"),
        ("parameters", f"{result.params:,}"),
        ("train loss", f"{result.train_loss:.4f} nats/token (mean of the last evaluation interval)"),
        ("val loss", f"{result.val_loss:.4f} nats/token on {result.val_tokens:,} validation tokens"),
        ("val perplexity", f"{result.val_perplexity:.3f}"),
        ("tokens/s", f"{result.tokens_per_second:,.0f} (training steps only)"),
        ("FLOP/s", f"{result.flops_per_second / 1e9:,.1f} G (exact model FLOPs, llmlab count), " + (
            f"MFU {result.mfu:.1%} of the measured matmul peak" if result.mfu is not None
            else f"MFU: run `{peak_command(result.device)}` once to measure the peak")),
        ("time", f"{result.elapsed_seconds:.1f} s"),
    ]))  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="stdlib (default), a text file, a folder or a glob")
    p.add_argument("--out", required=True, metavar="RUN", help="the run directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--tokenizer-from", metavar="RUN", help="reuse the tokenizer of another run")
    p.add_argument("--init-from", metavar="RUN", help="fine-tune: start from another run's weights and tokenizer")
    add_config_args(p)
