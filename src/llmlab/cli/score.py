"""`llmlab score`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llmlab.cli.common import print_json, use_color
from llmlab.errors import UserError


def run(args: argparse.Namespace) -> None:
    """Score a text with a trained model: per token its surprisal, entropy and alternatives, as a heat map.

    Texts longer than the model's context are scored in sliding windows that advance by --stride
    tokens (default: half the context), so every token is predicted once, from at least
    context − stride tokens of context.
    """
    from llmlab.machine import pick_device
    from llmlab.run_dir import load_run
    from llmlab.score import render_html, score_text, score_tokens, token_json

    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if args.out and not args.calibration:
        raise UserError("--out holds the --calibration figures; add --calibration (or use --html OUT for the heat map)")
    html_path = _output_path(args.html, args.run, "--html") if args.html else None
    out_dir = _output_path(args.out, args.run, "--out") if args.out else None
    run_ = load_run(args.run, pick_device(args.device or "cpu"))
    common = dict(temperature=args.temperature, stride=args.stride, top_k=args.top_k, keep_logits=args.calibration)
    if args.val is not None:
        ids = _val_ids(Path(args.run), args.val, run_.model_cfg.vocab_size)
        scored = score_tokens(run_.model, run_.tokenizer, ids, **common)
    else:
        scored = score_text(run_.model, run_.tokenizer, _read_text(args), **common)
    result = _summary(args, scored)
    if args.calibration:
        result |= _calibration(scored, out_dir)
    if html_path is not None:
        from llmlab.run_dir import write_text

        write_text(html_path, render_html(scored, args.by, f"llmlab score · {Path(args.run).name}"))
        result["html"] = str(html_path)
    if not args.summary:
        result["tokens"] = [token_json(t) for t in scored.tokens]
    if args.json:
        print_json(result)
    else:
        _print_human(args, scored, result)


def _read_text(args: argparse.Namespace) -> str:
    if args.file is None:
        return args.text
    from llmlab.data import read_text_file

    return read_text_file(Path(args.file))


def _val_ids(run: Path, n: int, vocab_size: int) -> list[int]:
    """The first n tokens of the run's validation split: text the model never trained on."""
    from llmlab.data import read_splits

    if n < 2:
        raise UserError(f"--val needs at least 2 tokens, got {n}")
    if not (run / "data" / "meta.json").is_file():
        raise UserError(f"{run} has no token cache (data/meta.json), so no validation split to score")
    val = read_splits(run / "data", vocab_size, checked=("val",)).val
    if n > len(val):
        raise UserError(f"--val {n}: the validation split of {run} holds only {len(val):,} tokens")
    return val[:n].astype(int).tolist()


def _output_path(path: str, run: str, flag: str) -> Path:
    """An output path outside the source run (never write into it) and not an existing folder for --html."""
    p, source = Path(path).resolve(), Path(run).resolve()
    if p == source or source in p.parents:
        raise UserError(f"{flag} {path!r} is inside the run directory {run!r}; write somewhere else")
    if flag == "--html" and p.is_dir():
        raise UserError(f"--html {path!r} is a directory; give a file name such as score.html")
    if flag == "--out" and p.exists() and not p.is_dir():
        raise UserError(f"--out {path!r} is a file; give a directory")
    from llmlab.run_dir import check_makeable

    check_makeable(p, flag)  # before the scoring, not after it
    return p


def _summary(args: argparse.Namespace, scored: Any) -> dict[str, Any]:
    source = f"val:{args.val}" if args.val is not None else (args.file or "--text")
    return {"run": str(args.run), "source": source, **scored.to_json()}


def _calibration(scored: Any, out_dir: Path | None) -> dict[str, Any]:
    from llmlab.calibration import calibrate, error_prediction, plot_rejection, plot_reliability

    cal = calibrate(scored.logits, scored.targets)
    ep = error_prediction(scored.logits, scored.targets)
    result: dict[str, Any] = {"calibration": cal.to_json(), "error_prediction": ep.to_json()}
    if out_dir is not None:
        result["figures"] = {
            "reliability": str(plot_reliability(cal, out_dir / "reliability.png")),
            "rejection": str(plot_rejection(ep, out_dir / "rejection.png")),
        }
    return result


def _print_human(args: argparse.Namespace, scored: Any, result: dict[str, Any]) -> None:
    from llmlab.cli.common import table
    from llmlab.score import render_terminal, token_table

    if not args.summary:
        if use_color(args.color):
            print(
                render_terminal([t.text for t in scored.tokens], [getattr(t, args.by) for t in scored.tokens], args.by)
            )
        else:
            print(token_table(scored))
        print()
    t = result["totals"]
    table([
        ("tokens", f"{t['tokens']:,} ({t['scored']:,} scored; the first is context only)"),
        ("windows", f"{result['windows']} of {result['context']} tokens, stride {result['stride']}"),
        ("temperature", f"{result['temperature']:g}"),
        ("cross-entropy", f"{t['mean_surprisal']:.4f} nats/token ({t['bits_per_token']:.4f} bits)"),
        ("perplexity", f"{t['perplexity']:.3f}"),
        ("sequence NLL", f"{t['sequence_nll']:.2f} nats (−log P(text), LM-Polygraph's MSP)"),
        ("entropy", f"mean {t['mean_entropy']:.4f}, max {t['max_entropy']:.4f} nats (token {t['max_entropy_at']})"),
        ("top-1 accuracy", f"{t['top1_accuracy']:.4f}"),
    ])  # fmt: skip
    if "calibration" in result:
        _print_calibration(result)
    if "html" in result:
        print(f"\nheat map: {result['html']}")


def _print_calibration(result: dict[str, Any]) -> None:
    from llmlab.cli.common import table

    c, e = result["calibration"], result["error_prediction"]
    print(f"\ncalibration of the top-1 prediction ({len(c['bins'])} bins; T* fitted on the first {c['n_fit']:,} "
          f"predictions, measured on the other {c['n_eval']:,})")  # fmt: skip
    table([
        ("ECE", f"{c['ece']:.4f} → {c['ece_scaled']:.4f} with T* = {c['temperature']:.3f}"),
        ("Brier (top-1)", f"{c['brier']:.4f} → {c['brier_scaled']:.4f}"),
        ("NLL", f"{c['nll']:.4f} → {c['nll_scaled']:.4f} nats/token"),
        ("top-1 accuracy", f"{c['accuracy']:.4f} (on the {c['n_eval']:,} measured)"),
    ])  # fmt: skip
    print(f"\ndoes entropy predict a top-1 miss? ({e['n']:,} predictions, error rate {e['error_rate']:.4f})")
    table([
        ("AUROC", f"{e['auroc_entropy']:.4f} (entropy)  {e['auroc_max_prob']:.4f} (1 − max p)"),
        ("PRR", f"{e['prr_entropy']:.4f} (entropy)  {e['prr_max_prob']:.4f} (1 − max p); random 0, oracle 1"),
        *[(f"entropy {g['entropy_lo']:.2f}–{g['entropy_hi']:.2f}", f"error rate {g['error_rate']:.3f} "
           f"({g['count']:,} tokens)") for g in e["by_entropy"]],
    ])  # fmt: skip
    if "figures" in result:
        print(f"\nreliability diagram: {result['figures']['reliability']}")
        print(f"prediction–rejection curve: {result['figures']['rejection']}")
    else:
        print("\n(pass --out DIR for the reliability diagram and the prediction–rejection curve as PNGs)")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory written by `llmlab train`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to score")
    src.add_argument("--file", metavar="F", help="score a UTF-8 text file")
    src.add_argument("--val", type=int, metavar="N", help="score the first N tokens of the run's validation split")
    p.add_argument(
        "--by", choices=["entropy", "surprisal"], default="entropy", help="colour tokens by (default: %(default)s)"
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, metavar="T", help="score p = softmax(logits / T), T >= 0.01"
    )
    p.add_argument(
        "--stride", type=int, metavar="N", help="sliding-window stride for long texts (default: context / 2)"
    )
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="alternatives shown per token (default: 5)")
    p.add_argument("--html", metavar="OUT", help="write a self-contained HTML heat map (alternatives on hover)")
    p.add_argument("--calibration", action="store_true",
                   help="ECE, Brier, temperature scaling, and AUROC / PRR of entropy for top-1 misses")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="with --calibration: write reliability.png and rejection.png here")
    p.add_argument("--summary", action="store_true", help="print the figures only, not every token")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="colour the heat map (auto: if stdout is a terminal; never: a plain token table)")  # fmt: skip
    p.add_argument("--device", help="cpu (default), auto (the first of cuda, mps, cpu), cuda or mps")
