"""`llmlab trace`."""

from __future__ import annotations

import argparse
from typing import Any

from llmlab.cli.common import emit
from llmlab.errors import UserError


def run(args: argparse.Namespace) -> None:
    """Trace the shape of every tensor of a real forward pass, in the notes' letters (notes §2.2)."""
    import torch

    from llmlab.trace import trace_report

    model, idx, source = _model_and_input(args)
    if args.layer != "all" and args.layer not in {str(i) for i in range(model.cfg.n_layers)}:
        raise UserError(f"--layer must be all or a block from 0 to {model.cfg.n_layers - 1}, got {args.layer!r}")
    obj = trace_report(model, idx, source)
    with torch.no_grad():
        emit(args, obj, lambda: _print(obj, args.layer))


def _model_and_input(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """A real model (a run's weights, or a preset's random initialisation) and its input ids [B, S]."""
    import torch

    from llmlab import config as cfg_lib
    from llmlab.accounting import check_activation_size

    if args.run and (args.preset or args.sets):
        raise UserError("give a run directory or --preset (with --set), not both")
    if args.prompt is not None and (args.batch is not None or args.seq is not None):
        raise UserError("give --prompt or --batch/--seq, not both")
    if args.run:
        from llmlab.run_dir import load_run

        run = load_run(args.run)
        model, tokenizer, source = run.model, run.tokenizer, str(args.run)
    else:
        if args.prompt is not None:
            raise UserError("--prompt needs a run directory (a preset has no tokenizer); use --batch and --seq")
        p = cfg_lib.preset(args.preset or "notes")
        cfg, _ = cfg_lib.apply_overrides(p.model, p.train, cfg_lib.parse_sets(args.sets))
        torch.manual_seed(args.seed)
        from llmlab.model import GPT

        model, tokenizer, source = GPT(cfg).eval(), None, f"preset {args.preset or 'notes'}"
    if args.prompt is not None:
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise UserError("--prompt encodes to no tokens; give some text")
        if len(ids) > model.cfg.block_size:
            raise UserError(f"--prompt is {len(ids)} tokens, beyond the model's context of {model.cfg.block_size}")
        return model, torch.tensor([ids]), source  # [1, S]
    B = 1 if args.batch is None else args.batch
    S = min(8, model.cfg.block_size) if args.seq is None else args.seq
    if B < 1 or S < 1:
        raise UserError(f"--batch and --seq must be at least 1, got batch={B} seq={S}")
    if model.cfg.block_size < S:
        raise UserError(f"--seq {S} exceeds the model's context of {model.cfg.block_size} positions")
    check_activation_size(model.cfg, B, S)
    gen = torch.Generator().manual_seed(args.seed)
    return model, torch.randint(0, model.cfg.vocab_size, (B, S), generator=gen), source  # [B, S]


def _print(obj: dict[str, Any], layer: str) -> None:
    from llmlab.trace import format_shape

    v = obj["letters"]
    print(f"{obj['source']}: " + ", ".join(f"{k}={n}" for k, n in v.items()) + "  (D = H/h)\n")
    shown = [r for r in obj["rows"] if _in_layer(r["name"], layer)]
    width = max(len(r["name"]) for r in shown)
    shape_w = max(len(format_shape(r["letters"], r["shape"])) for r in shown)
    print(f"{'tensor':<{width}}  {'shape':<{shape_w}}  {'the notes write':<28}  remark")
    for r in shown:
        flag = "" if r["matches"] else "  (≠ the letters!)"
        print(f"{r['name']:<{width}}  {format_shape(r['letters'], r['shape']):<{shape_w}}  {r['notes']:<28}  "
              f"{r['remark']}{flag}")  # fmt: skip
    hidden = len(obj["rows"]) - len(shown)
    if hidden:
        ok = "each matches its letters" if obj["all_match"] else "NOT all match their letters"
        print(f"({hidden} more rows in the other blocks, {ok}; --layer all shows them)")
    print("\nweights (stored as nn.Linear keeps them, [out, in])")
    for w in obj["weights"]:
        print(f"  {w['name']:<26} {list(w['shape'])!s:<14} {w['math']:<32} notes: {w['notes']:<32} {w['remark']}")


def _in_layer(name: str, layer: str) -> bool:
    return layer == "all" or not name.startswith("blocks.") or name.split(".")[1] == layer


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", metavar="RUN", help="a run directory (or use --preset)")
    p.add_argument("--preset", help="a preset, randomly initialised (default: notes)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="override one field of the preset (repeatable)")  # fmt: skip
    p.add_argument("--prompt", help="text to trace (needs RUN for its tokenizer)")
    p.add_argument("--batch", type=int, metavar="B", help="random token ids: batch size (default: 1)")
    p.add_argument("--seq", type=int, metavar="S", help="random token ids: sequence length (default: 8)")
    p.add_argument("--layer", default="0", metavar="N|all", help="which block the table shows (default: 0)")
    p.add_argument("--seed", type=int, default=0)
