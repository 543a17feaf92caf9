"""`llmlab knowledge locate|neurons|edit|eval`: where a fact lives, how to change it, what changed."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from llmlab.cli.common import Parser, emit, help_texts, refuse_file_as_out, table
from llmlab.errors import UserError


def run(args: argparse.Namespace) -> None:
    """Knowledge storage and editing: causal tracing, FFN memories, FT-L / ROME / MEMIT edits and their scores."""
    if getattr(args, "action", None) is None:
        raise UserError("knowledge: choose an action: locate, neurons, edit or eval (see llmlab knowledge --help)")
    args.action(args)


def locate(args: argparse.Namespace) -> None:
    """Causal tracing: the indirect effect of every hidden state on the answer; writes heat maps."""
    from llmlab.knowledge import Fact
    from llmlab.knowledge.patching import causal_trace, plot_trace

    if args.facts is not None:
        if args.prompt or args.subject or args.target:
            raise UserError("give either --facts N or --prompt/--subject/--target, not both")
        return locate_average(args)
    missing = [f"--{k}" for k in ("prompt", "subject", "target") if getattr(args, k) is None]
    if missing:
        raise UserError(f"locate needs {', '.join(missing)} (or --facts N on a bios run)")
    refuse_file_as_out(args.out)
    run = _load(args)
    trace = causal_trace(run.model, run.tokenizer, Fact(args.prompt, args.subject, args.target), args.noise,
                         args.samples, args.seed)  # fmt: skip
    paths = plot_trace(trace, Path(args.out), args.target)
    out = {**trace.to_json(), "plots": [str(p) for p in paths]}

    def human() -> None:
        print(f"p({args.target}) clean {trace.p_clean:.4f}, subject corrupted {trace.p_corrupt:.4f} "
              f"(noise std {trace.noise_std:.3f})")  # fmt: skip
        table([(f"peak, {kind}", f"layer {p['layer']}, token {p['token']} {p['token_text']!r}"
                + (" (subject's last)" if p["subject_last"] else "") + f", indirect effect {p['effect']:+.4f}")
               for kind, p in out["peaks"].items()])  # fmt: skip
        print("heat maps: " + ", ".join(out["plots"]))

    emit(args, out, human)


def locate_average(args: argparse.Namespace) -> None:
    """Causal tracing of --facts random facts of a bios run, averaged by token role (ROME's Figure 2)."""
    import random

    from llmlab import bios
    from llmlab.knowledge import Fact
    from llmlab.knowledge.patching import ROLES, average_by_role, causal_trace, plot_average

    refuse_file_as_out(args.out)
    if args.facts < 1:
        raise UserError(f"--facts must be at least 1, got {args.facts}")
    run = _load(args)
    world = bios.world_of(run.meta.get("data", ""))
    if world is None:
        raise UserError(f"{run.path} was not trained on bios data; trace one fact with --prompt/--subject/--target")
    rng = random.Random(f"locate-{args.seed}")
    pairs = [(rng.choice(world.people), rng.choice(bios.BASE_ATTRIBUTES)) for _ in range(args.facts)]
    facts = [Fact(bios.prompt(p, a), p.name, p.facts[a]) for p, a in pairs]
    avg = average_by_role([causal_trace(run.model, run.tokenizer, f, args.noise, args.samples, args.seed)
                           for f in facts])  # fmt: skip
    out = {**avg.to_json(), "plots": [str(p) for p in plot_average(avg, Path(args.out))]}

    def human() -> None:
        print(f"{avg.facts} facts: mean p(answer) clean {avg.p_clean:.4f}, subject corrupted {avg.p_corrupt:.4f}")
        for kind, grid in avg.effects.items():
            print(f"\nmean indirect effect, restoring the {kind} (rows: token role, columns: layer)")
            print(f"{'':<24}" + "".join(f"{layer:>8}" for layer in range(grid.shape[1])))
            for role, row in zip(ROLES, grid.tolist(), strict=True):
                print(f"{role:<24}" + "".join(f"{'–' if math.isnan(x) else f'{x:+.3f}':>8}" for x in row))
        print()
        table([(f"peak, {kind}", f"{p['role']}, layer {p['layer']}, mean indirect effect {p['effect']:+.4f}")
               for kind, p in out["peaks"].items()])  # fmt: skip
        print("heat maps: " + ", ".join(out["plots"]))

    emit(args, out, human)


def neurons(args: argparse.Namespace) -> None:
    """The most active FFN neurons of each layer and the tokens their value vectors promote."""
    from llmlab.knowledge.keyvalue import memories_json, top_memories

    run = _load(args)
    layers = top_memories(run.model, run.tokenizer, args.prompt, args.position, args.top, args.tokens)
    out = memories_json(args.prompt, args.position, layers)

    def human() -> None:
        for ms in layers:
            for m in ms:
                print(f"layer {m.layer} neuron {m.neuron:>4}  m = {m.activation:7.3f}  promotes "
                      + " ".join(repr(t) for t in m.promotes))  # fmt: skip

    emit(args, out, human)


def edit(args: argparse.Namespace) -> None:
    """Edit facts with FT-L, ROME or MEMIT and write the edited model to --out (never the source run)."""
    from llmlab.knowledge.scores import edit_run

    report = edit_run(args.run, Path(args.out), args.method, _facts(args), _params(args), _device(args))
    emit(args, report, lambda: table([(k, _fmt(v)) for k, v in report.items()]))


def evaluate(args: argparse.Namespace) -> None:
    """Score a model: extraction accuracy, or edits (random bios edits, a file of edits or one fact, or a run's own)."""
    from llmlab.knowledge.scores import evaluate_run

    edit_options = {"--requests": args.requests, "--prompt": args.prompt, "--subject": args.subject,
                    "--target": args.target, "--edits": args.edits, "--mode": args.mode, "--seed": args.seed,
                    "--set": args.sets, "--layer": args.layer}  # fmt: skip
    given = [flag for flag, value in edit_options.items() if value not in (None, [])]
    if not args.method and given:  # without a method nothing is edited: these would be ignored
        raise UserError(f"{given[0]} applies to edits; add --method ft-l, rome or memit")
    facts = _facts(args) if any(edit_options[f] for f in ("--requests", "--prompt", "--subject", "--target")) else None
    report = evaluate_run(args.run, args.method, facts, args.edits, args.mode or "single", args.seed or 0,
                          _params(args) if args.method else None, _device(args))  # fmt: skip
    emit(args, report, lambda: _print_eval(report))


def _print_eval(report: dict[str, Any]) -> None:
    if "qa_heldout" in report:  # extraction accuracy: one row per group, one column per attribute
        from llmlab.bios import ATTRIBUTES

        print(f"{'exact match':<12} {'all':>6} " + " ".join(f"{a:>11}" for a in ATTRIBUTES))
        for group in ("completion", "qa_train", "qa_heldout"):
            row = report[group]
            print(f"{group:<12} {row['all']:>6.1%} " + " ".join(f"{row[a]:>11.1%}" for a in ATTRIBUTES))
        return
    labels = report.pop("by_label", {})
    table([(k, _fmt(v)) for k, v in report.items()])
    for label, scores in labels.items():
        print(f"  {label:<11} " + "  ".join(f"{k} {_fmt(v)}" for k, v in scores.items()))


# --- arguments -----------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> Any:
    from llmlab.machine import pick_device
    from llmlab.run_dir import load_run

    return load_run(args.run, pick_device(_device(args)))


def _device(args: argparse.Namespace) -> str:
    return args.device or "cpu"


def _facts(args: argparse.Namespace) -> list:
    from llmlab.knowledge import Fact, read_requests

    if args.requests:
        if args.prompt or args.subject or args.target:
            raise UserError("give either --requests FILE or --prompt/--subject/--target, not both")
        return read_requests(args.requests)
    missing = [f"--{k}" for k in ("prompt", "subject", "target") if getattr(args, k) is None]
    if missing:
        raise UserError(f"an edit needs {', '.join(missing)} (or --requests FILE)")
    return [Fact(args.prompt, args.subject, args.target)]


def _params(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from llmlab.config import coerce, parse_sets
    from llmlab.knowledge.edit import DEFAULTS, EditParams, check_method

    check_method(args.method)
    sets = parse_sets(args.sets)
    known = set(EditParams.__dataclass_fields__) - {"layers"}
    unknown = sorted(set(sets) - known)
    if unknown:
        raise UserError(f"unknown edit parameter {unknown[0]!r} (known: {', '.join(sorted(known))})")
    values = {k: coerce(EditParams, k, v) for k, v in sets.items()}
    layers = tuple(args.layer) if args.layer else None
    return replace(DEFAULTS[args.method], **values, layers=layers)


def _fmt(v: Any) -> str:
    """Three decimals, or three significant digits below 0.001 (a p(target) of 9.1e-05 is not 0.000)."""
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.3f}"
    return "–" if v is None else str(v)


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="knowledge", metavar="ACTION", parser_class=Parser)
    for name, fn in (("locate", locate), ("neurons", neurons), ("edit", edit), ("eval", evaluate)):
        summary, doc = help_texts(fn)
        s = sub.add_parser(name, help=summary, description=doc)
        s.add_argument("run", metavar="RUN", help="a run directory written by `llmlab train`")
        s.add_argument("--device", help="cpu (default), auto (the first of cuda, mps, cpu), cuda or mps")
        s.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON object")
        s.set_defaults(action=fn)
        ARGS[name](s)


def _fact_args(s: argparse.ArgumentParser, required: bool) -> None:
    s.add_argument("--prompt", required=required, help='a template with {} for the subject: "{} was born in"')
    s.add_argument("--subject", required=required, help="the subject, e.g. a person's full name")
    s.add_argument("--target", required=required, help="the answer; it follows the prompt after one space")


def _locate_args(s: argparse.ArgumentParser) -> None:
    _fact_args(s, required=False)
    s.add_argument("--facts", type=int, metavar="N", help="instead: average N random facts of a bios run by token role")
    s.add_argument("--noise", type=float, default=3.0, help="noise std as a multiple of the subject embeddings' std")
    s.add_argument("--samples", type=int, default=10, help="noise draws averaged (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="runs/causal-trace", metavar="DIR", help="heat maps go here (%(default)s)")


def _neuron_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--prompt", required=True, help="the text to read the FFN memories on")
    s.add_argument("--position", type=int, default=-1, help="the token to read (default: the last)")
    s.add_argument("--top", type=int, default=5, help="neurons per layer (default: %(default)s)")
    s.add_argument("--tokens", type=int, default=5, help="promoted tokens per neuron (default: %(default)s)")


def _edit_args(s: argparse.ArgumentParser, for_eval: bool = False) -> None:
    s.add_argument("--method", required=not for_eval, help="ft-l, rome or memit")
    _fact_args(s, required=False)
    s.add_argument("--requests", metavar="FILE", help='JSONL edits: {"prompt": ..., "subject": ..., "target": ...}')
    s.add_argument("--layer", type=int, action="append", metavar="L", help="layer to edit (repeat for MEMIT)")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="an edit parameter: steps, lr, kl_weight, weight_decay, clamp_norm, ridge, mom2_weight, "
                        "norm_constraint, stats_tokens, contexts, site (subject|answer)")  # fmt: skip
    if for_eval:
        s.add_argument("--edits", type=int,
                       help="random bios edits to make (default: 100, or all the run's facts if fewer)")  # fmt: skip
        s.add_argument("--mode", help="single (default), sequential or batch")
        s.add_argument("--seed", type=int, help="which random edits (default: 0)")
    else:
        s.add_argument("--out", required=True, metavar="NEW_RUN", help="the edited run to write")


ARGS = {"locate": _locate_args, "neurons": _neuron_args, "edit": _edit_args,
        "eval": lambda s: _edit_args(s, for_eval=True)}  # fmt: skip
