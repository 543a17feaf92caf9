"""`llmlab count`: parameters, FLOPs and memory of a model, exact, measured, beside the notes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmlab.cli.common import check_writable, emit, table
from llmlab.config import ModelConfig
from llmlab.errors import UserError

SWEEP_AXES = ("seq", "layers", "width")


def run(args: argparse.Namespace) -> None:
    """Count parameters, FLOPs and memory exactly, beside the notes' formulas (notes §2.3)."""
    from llmlab import accounting as acc

    cfg, source, batch_default = _resolve(args)
    batch = batch_default if args.batch is None else args.batch
    seq = cfg.block_size if args.seq is None else args.seq
    acc.fit_context(cfg, batch, seq)  # B, S <= 0 and S beyond learned positions fail here, before any work
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    if not args.sweep and (args.repeats is not None or args.out is not None):
        raise UserError("--repeats and --out are options of --sweep")
    repeats = 3 if args.repeats is None else args.repeats
    if repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {repeats}")
    if args.sweep:
        axis, values = parse_sweep(args.sweep)
        out = args.out or f"sweep-{axis}.png"
        if Path(out).is_dir() or Path(out).suffix.lower() != ".png":
            raise UserError(f"--out is where the sweep's plot goes, a .png file; got {out}")
        check_writable(out, "--out")
        rows = sweep(cfg, axis, values, batch, seq, repeats=repeats, log=log)
        plot_sweep(rows, axis, out, title=f"{source}, B={batch}" + ("" if axis == "seq" else f", S={seq}"))
        emit(args, {"sweep": {"axis": axis, "batch": batch, "seq": seq, "rows": rows, "png": out}},
             lambda: _print_sweep(rows, axis, out))  # fmt: skip
        return
    if args.device is not None and not args.peak:
        raise UserError("--device is an option of --peak (--measure runs on the CPU)")
    device = args.device or "cpu"
    peak = _measure_peak(device) if args.peak else None
    report = acc.count_report(cfg, batch, seq, source, measure=args.measure, peak=peak, peak_device=device, log=log)
    emit(args, report, lambda: _print_report(report))


def _measure_peak(device: str) -> dict[str, float]:
    """fp32 and bf16 matmul peaks of `device`, measured now and cached for training's MFU."""
    import torch

    from llmlab import accounting as acc

    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device]:
        raise UserError(f"--peak --device {device}: this machine has no {device} device (torch {torch.__version__})")
    return {t: acc.peak_flops(device, t, refresh=True) for t in ("float32", "bfloat16")}


def _resolve(args: argparse.Namespace) -> tuple[Any, str, int]:
    """(model config, where it came from, default batch) from RUN | --preset | --config and --set."""
    from llmlab import config as cfg_lib

    if args.run and (args.preset or args.config):
        raise UserError("give a run directory or --preset/--config, not both")
    if args.run:
        from llmlab.run_dir import load_run

        loaded = load_run(args.run)  # the weights too: a corrupt run, or one they do not fit, is an error here too
        base, source = cfg_lib.Preset(loaded.model_cfg, loaded.train_cfg), str(args.run)
    else:
        base, source = cfg_lib.preset(args.preset or "notes"), f"preset {args.preset or 'notes'}"
        if args.config:
            base, source = cfg_lib.load_toml(args.config, base), f"{source} + {args.config}"
    model_cfg, train_cfg = cfg_lib.apply_overrides(base.model, base.train, cfg_lib.parse_sets(args.sets))
    return model_cfg, source, train_cfg.batch_size


# --- the scaling sweep ---------------------------------------------------------------------------


def parse_sweep(spec: str) -> tuple[str, list[int]]:
    """ "seq=64,128,...,1024" → ("seq", [64, 128, 256, 512, 1024]). With `...`, `a,2a,...,z` doubles
    up to z and any other `a,b,...,z` steps by b − a."""
    axis, sep, text = spec.partition("=")
    if not sep or axis not in SWEEP_AXES:
        raise UserError(f"--sweep expects one of {', '.join(f'{a}=V1,V2,...' for a in SWEEP_AXES)}, got {spec!r}")
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [int(p) for p in parts if p != "..."]
    except ValueError:
        raise UserError(f"--sweep values must be integers, got {text!r}") from None
    if "..." in parts:
        values = _expand(values, spec)
    if len(values) < 2 or min(values) < 1:
        raise UserError(f"--sweep needs at least two positive values, got {text!r}")
    return axis, values


def _expand(values: list[int], spec: str) -> list[int]:
    if len(values) != 3 or not values[0] < values[1] <= values[2]:
        raise UserError(f"write '...' as A,B,...,Z with A < B <= Z, got {spec!r}")
    a, b, z = values
    if b == 2 * a and z // a & (z // a - 1) == 0 and z % a == 0:  # doubling lands on z
        return [a * 2**i for i in range((z // a).bit_length())]
    if (z - a) % (b - a) == 0:
        return list(range(a, z + 1, b - a))
    raise UserError(f"{a},{b},... does not reach {z} by doubling or by steps of {b - a} in {spec!r}")


def sweep(cfg: ModelConfig, axis: str, values: list[int], batch: int, seq: int, repeats: int = 3,
          log: Callable[[str], None] = lambda _: None) -> list[dict[str, Any]]:  # fmt: skip
    """Predicted training-step FLOPs and measured forward+backward time at each value of the axis."""
    from llmlab import accounting as acc

    rows = []
    for value in values:
        c, s = _swept(cfg, axis, value, seq)
        c = acc.fit_context(c, batch, s)
        f = acc.forward_flops(c, batch, s)
        log(f"{axis}={value}: timing {repeats} steps ...")
        rows.append({
            "value": value, "train_flops": 3 * sum(f.values()), "attention_scores_flops": 3 * f["attention scores"],
            "step_seconds": acc.time_train_step(c, batch, s, repeats),
        })  # fmt: skip
    return rows


def _swept(cfg: ModelConfig, axis: str, value: int, seq: int) -> tuple[ModelConfig, int]:
    from dataclasses import replace

    from llmlab.errors import ConfigError

    if axis == "seq":
        return cfg, value
    if axis == "layers":
        return replace(cfg, n_layers=value), seq
    d_ff = None if cfg.d_ff is None else max(1, round(cfg.d_ff * value / cfg.d_model))  # keep F/H
    try:
        return replace(cfg, d_model=value, d_ff=d_ff), seq
    except ConfigError as e:
        raise UserError(f"--sweep width={value}: {e}") from None


def plot_sweep(rows: list[dict[str, Any]], axis: str, path: str | Path, title: str = "") -> None:
    """Predicted FLOPs (the S² attention-score part shaded) and measured step time against the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmlab.run_dir import atomic_write

    x = [r["value"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    total = [r["train_flops"] / 1e9 for r in rows]
    scores = [r["attention_scores_flops"] / 1e9 for r in rows]
    ax.stackplot(x, [t - s for t, s in zip(total, scores, strict=True)], scores, alpha=0.5,
                 labels=["predicted: projections, FFN, logits", "predicted: attention scores, 3·L·4BS²H"])  # fmt: skip
    ax.set_xlabel({"seq": "S (sequence length)", "layers": "L (layers)", "width": "H (width)"}[axis])
    ax.set_ylabel("training-step GFLOPs (exact)")
    twin = ax.twinx()
    twin.plot(x, [r["step_seconds"] for r in rows], "ko-", label="measured forward+backward (fastest of the repeats)")
    twin.set_ylabel("seconds per step (measured)")
    twin.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = twin.get_legend_handles_labels()
    ax.legend(lines + lines2, labels + labels2, loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


# --- printing ------------------------------------------------------------------------------------


def _print_report(r: dict[str, Any]) -> None:
    p, f, m = r["params"], r["flops"], r["memory"]
    print(f"{r['model']['source']}: B={r['batch']}, S={r['seq']}\n")
    on = "the model" if r["measured_layers"] == r["model"]["n_layers"] else "models of 1 and 2 layers, extended to L"
    rows = [("parameters", f"{p['total']:,} (measured on {on}: {p['measured']:,})")]
    rows += [(f"  {k}", f"{v:,}") for k, v in p["by_component"].items() if v]
    table(rows)
    print(f"\n{'forward FLOPs':<24} {'exact':<17} {'measured':<17} {'notes formula':<17} notes vs exact")
    for c in f["forward"]["by_component"]:
        diff = "" if c["diff_pct"] is None else f"{c['diff_pct']:+.1f}%"
        print(f"  {c['component']:<22} {c['exact']:<17,} {c['measured']:<17,} {c['notes']:<17,} {diff}")
        print(f"  {'':<22} {c['reason']}")
    fw, ts = f["forward"], f["train_step"]
    table([
        ("forward total", f"{fw['exact']:,} exact, {fw['measured']:,} measured, notes {fw['notes']:,} "
                          f"({fw['notes_diff_pct']:+.1f}%)"),
        ("training step", f"{ts['exact']:,} exact (3× forward), {ts['measured']:,} measured"),
        ("Kaplan's 6N·B·S", f"{ts['kaplan_6n']:,} ({ts['kaplan_diff_pct']:+.1f}%: no attention scores, no logits)"),
        ("decode step", f"{f['decode_step']['exact']:,} exact, {f['decode_step']['measured']:,} measured "
                        f"(one token per sequence, {f['decode_step']['context']} keys in view)"),
    ])  # fmt: skip
    _print_memory(m)
    if r.get("peak"):
        rates = ", ".join(f"{k} {v / 1e9:,.1f} GFLOP/s" for k, v in r["peak"].items())
        print(f"\nmatmul peak ({r['peak_device']}): {rates}")
    if r.get("mfu") is not None:
        busy = " (above 100%: the cached peak was measured on a busy machine; rerun --peak)" if r["mfu"] > 1 else ""
        print(f"step time {r['step_seconds']:.3f} s: {r['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s, "
              f"MFU {r['mfu']:.1%} of the fp32 matmul peak{busy}")  # fmt: skip


def _print_memory(m: dict[str, Any]) -> None:
    t = m["train"]
    print("\ntraining memory (fp32 AdamW, one step)")
    rows = [(f"  {k}", _mib(t[k])) for k in ("weights", "gradients", "optimizer", "activations", "buffers", "batch")]
    rows.append(("  activations per layer", ", ".join(f"{k} {_mib(v)}" for k, v in t["activations_per_layer"].items())))
    rows.append(("  predicted peak", f"{_mib(t['predicted_bytes'])} at the {t['peak_moment']}"))
    if "measured_bytes" in t:
        rows.append(("  measured peak", f"{_mib(t['measured_bytes'])} ({t['error_pct']:+.2f}%) {t['measured_how']}"))
        rows.append(("  saved activations", f"{_mib(t['measured_activations'])} measured (saved-tensor hooks)"))
    table(rows)
    print("\nweights, gradients and optimizer states, bytes per parameter")
    table([(f"  {k}", f"{_mib(m['static_bytes'][k])}: " + " + ".join(f"{b} {n}" for n, b in v.items()))
           for k, v in m["bytes_per_param"].items()])  # fmt: skip
    inf = m["inference"]
    table([("inference", f"weights {_mib(inf['weights'])} + KV cache {_mib(m['kv_cache_bytes'])} "
                         f"(2·L·B·S·h_kv·D·4; KVCache tensors: {_mib(m['kv_cache_measured_bytes'])})")])  # fmt: skip


def _print_sweep(rows: list[dict[str, Any]], axis: str, out: str) -> None:
    print(f"{axis:>8}  {'train FLOPs':>16}  {'S² share':>8}  {'step (s)':>9}  {'GFLOP/s':>8}")
    for r in rows:
        share = r["attention_scores_flops"] / r["train_flops"]
        gf = r["train_flops"] / r["step_seconds"] / 1e9
        print(f"{r['value']:>8}  {r['train_flops']:>16,}  {share:>8.1%}  {r['step_seconds']:>9.4f}  {gf:>8.1f}")
    print(f"\nplot: {out}")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", metavar="RUN", help="a run directory (or use --preset / --config)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", help="a preset name (default: notes)")
    g.add_argument("--config", metavar="FILE", help="a TOML file with [model] and [train] tables")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                   help="override one config field, e.g. --set n_layers=48 (repeatable)")  # fmt: skip
    g.add_argument("--batch", type=int, metavar="B", help="batch size (default: the config's batch_size)")
    g.add_argument("--seq", type=int, metavar="S", help="sequence length (default: block_size)")
    g = p.add_argument_group("measurements")
    g.add_argument("--measure", action="store_true",
                   help="run two real training steps on the CPU: measured peak memory, step time and MFU")  # fmt: skip
    g.add_argument("--peak", action="store_true",
                   help="measure this machine's fp32 and bf16 matmul peak and cache it for training's MFU")  # fmt: skip
    g.add_argument("--device", choices=["cpu", "cuda", "mps"],
                   help="the device whose peak --peak measures (default: cpu)")  # fmt: skip
    g.add_argument("--sweep", metavar="AXIS=V1,V2,...",
                   help="seq=64,128,...,1024 | layers=... | width=...: FLOPs and step time as a PNG")  # fmt: skip
    g.add_argument("--repeats", type=int, metavar="N", help="timed steps per sweep point (default: 3)")
    g.add_argument("--out", metavar="FILE", help="where --sweep writes its PNG (default: sweep-AXIS.png)")
