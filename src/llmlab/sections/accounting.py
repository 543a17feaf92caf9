"""Tour section for notes §2.2 and §2.3: the tour model's parameters, FLOPs and memory, exact and
measured, beside the notes' formulas; the MFU of its training; and the shape trace of a forward pass."""

from __future__ import annotations

from typing import Any

import torch

from llmlab import accounting as acc
from llmlab import memory
from llmlab.data import read_splits
from llmlab.machine import pick_device
from llmlab.model import KVCache
from llmlab.run_dir import load_run
from llmlab.sections import Section, Tour, html_table
from llmlab.trace import format_shape, trace

BUSY = (
    " Above 100%: the peak (cached in ~/.cache/llmlab/peak.json) was measured while other work shared the "
    "CPU; measure it again on an idle machine with <code>llmlab count --peak</code>."
)


def section(tour: Tour) -> Section:
    run = load_run(tour.notes_dir)
    S = run.model_cfg.block_size
    B = 4 if tour.quick else run.train_cfg.batch_size
    figures: dict[str, Any] = {"batch": B, "seq": S}
    rows = _params(run, figures) + _flops(run, B, S, figures) + _memory(run, B, S, figures)
    mfu_html = _mfu(tour, run, figures)
    trace_html = _trace(tour, run, figures)
    tour.log(f"params {figures['params']['exact']:,}; forward FLOPs {figures['flops']['forward_exact']:,} "
             f"(= measured: {figures['flops']['forward_exact'] == figures['flops']['forward_measured']}); "
             f"peak memory {figures['memory']['predicted'] / 2**20:.1f} MiB predicted, "
             f"{figures['memory']['measured'] / 2**20:.1f} MiB measured")  # fmt: skip
    body = (
        f"<p>The notes' model at B={B}, S={S}. Exact counts come from the config; measured ones from "
        "the model itself: its parameters, PyTorch's <code>FlopCounterMode</code> over a forward and "
        "backward pass, and one real training step's peak memory (the bytes of the tensors alive when "
        "the step starts plus the CPU allocator's peak during it, from the profiler). The notes' "
        "formulas (§2.3) stand beside them. <code>llmlab count</code> prints the same for any model.</p>"
        + html_table(rows, ("quantity", "exact / predicted", "measured", "the notes", "why they differ"))
        + mfu_html + trace_html
    )  # fmt: skip
    return Section("Parameters, FLOPs, memory and shapes (notes §2.2, §2.3)", body, figures)


def _params(run: Any, figures: dict[str, Any]) -> list[tuple[str, ...]]:
    exact, measured = acc.param_counts(run.model_cfg), acc.measured_param_counts(run.model)
    figures["params"] = {"exact": sum(exact.values()), "measured": sum(measured.values()), "by_component": exact}
    rows = [("parameters", f"{sum(exact.values()):,}", f"{sum(measured.values()):,}", "—",
             "the output layer is the embedding's Parameter (tied), counted once")]  # fmt: skip
    return rows + [(f"  {k}", f"{v:,}", f"{measured[k]:,}", "", "") for k, v in exact.items() if v]


def _flops(run: Any, B: int, S: int, figures: dict[str, Any]) -> list[tuple[str, ...]]:
    cfg = run.model_cfg
    measured = acc.measure_flops(run.model, B, S)
    comparison = acc.notes_comparison(cfg, B, S)
    exact, train = sum(r["exact"] for r in comparison), acc.train_step_flops(cfg, B, S)
    decode = (acc.decode_step_flops(cfg, 1, S), acc.measure_decode_flops(run.model, 1, S))
    figures["flops"] = {"forward_exact": exact, "forward_measured": measured.forward, "train_exact": train,
                        "train_measured": measured.train_step, "decode_exact": decode[0], "decode_measured": decode[1],
                        "components": comparison}  # fmt: skip
    rows = [(f"forward FLOPs: {r['component']}", f"{r['exact']:,}", f"{measured.by_component[r['component']]:,}",
             f"{r['notes']:,}" + ("" if r["diff_pct"] is None else f" ({r['diff_pct']:+.1f}%)"), r["reason"])
            for r in comparison]  # fmt: skip
    kaplan = acc.kaplan_flops(cfg, B, S)
    return [
        *rows,
        ("forward FLOPs", f"{exact:,}", f"{measured.forward:,}", f"{sum(r['notes'] for r in comparison):,}",
         "8BSH² + 4BS²H + 16BSH² per layer, ×L"),
        ("training-step FLOPs", f"{train:,}", f"{measured.train_step:,}", f"Kaplan 6N·B·S: {kaplan:,}",
         f"3× forward; 6N is {acc.pct_diff(kaplan, train):+.1f}% (no attention scores, no logits)"),
        ("one decoding step (KV cache)", f"{decode[0]:,}", f"{decode[1]:,}", "—", f"1 token per sequence, {S} keys"),
    ]  # fmt: skip


def _memory(run: Any, B: int, S: int, figures: dict[str, Any]) -> list[tuple[str, ...]]:
    cfg = run.model_cfg
    predicted = memory.train_memory(cfg, B, S)
    measured = memory.measure_train_peak(cfg, B, S, run.train_cfg)
    cache = KVCache(cfg, 1)
    kv = (memory.kv_cache_bytes(cfg, 1, cfg.block_size), cache.k.nbytes + cache.v.nbytes)
    P = figures["params"]["exact"]
    figures["memory"] = {"predicted": predicted.predicted_peak, "measured": measured.peak,
                         "activations_predicted": predicted.activations.total,
                         "activations_measured": measured.saved_activations, "kv_cache": kv[0],
                         "kv_cache_measured": kv[1]}  # fmt: skip
    err, per_layer = acc.pct_diff(predicted.predicted_peak, measured.peak), predicted.activations.per_layer
    return [
        ("training peak memory (fp32 AdamW)", _mib(predicted.predicted_peak), f"{_mib(measured.peak)} ({err:+.2f}%)",
         f"16 B/param: {_mib(16 * P)} + activations",
         f"peak at the {predicted.peak_moment}; weights, m, v, the batch: {_mib(predicted.static)}"),
        ("  saved activations", _mib(predicted.activations.total), _mib(measured.saved_activations),
         "grow with B and S", "per layer: " + ", ".join(f"{k} {_mib(v)}" for k, v in per_layer.items())),
        ("KV cache (B=1, full context)", _mib(kv[0]), _mib(kv[1]), "2·L·B·S·H·4", "KVCache's k and v tensors"),
    ]  # fmt: skip


def _mfu(tour: Tour, run: Any, figures: dict[str, Any]) -> str:
    """The MFU of the tour's own training: tokens/s × exact FLOPs per token over the matmul peak."""
    s, cfg = tour.notes_summary, run.model_cfg
    per_token = acc.train_step_flops(cfg, 1, cfg.block_size) // cfg.block_size
    achieved = s["tokens_per_second"] * per_token
    device = pick_device(run.train_cfg.device).type  # where the tour trained
    peak = acc.peak_flops(device, "bfloat16" if run.train_cfg.dtype == "bfloat16" else "float32")
    mfu = acc.mfu(achieved, peak)
    figures["mfu"] = {"achieved_flops_per_s": achieved, "peak_flops_per_s": peak, "mfu": mfu}
    return (f"<p>Training ran at {s['tokens_per_second']:,.0f} tokens/s × {per_token:,} FLOPs/token (exact) = "
            f"{achieved / 1e9:.2f} GFLOP/s, against this machine's measured {run.train_cfg.dtype} matmul peak of "
            f"{peak / 1e9:.1f} GFLOP/s ({device}, {torch.get_num_threads()} threads): MFU {mfu:.1%}."
            + (BUSY if mfu > 1 else "") + "</p>")  # fmt: skip


def _trace(tour: Tour, run: Any, figures: dict[str, Any]) -> str:
    """Block 0's tensors on the first 8 tokens of the validation text, with the weights' real shapes."""
    ids = read_splits(tour.notes_dir / "data", run.model_cfg.vocab_size, checked=("val",)).val[:8].astype(int).tolist()
    rows = trace(run.model, torch.tensor([ids]))  # [1, 8]
    shown = [r for r in rows if not r.name.startswith("blocks.") or r.name.startswith("blocks.0.")]
    figures["trace"] = {"all_match": all(r.matches for r in rows), "rows": [r.to_json() for r in shown]}
    table = html_table([(r.name, format_shape(r.letters, r.shape), r.notes, r.remark) for r in shown],
                       ("tensor (hook point)", "shape", "the notes write (§2.2)", "remark"))  # fmt: skip
    H, h = run.model_cfg.d_model, run.model_cfg.n_heads
    return (f"<h3>The matrix view, traced (notes §2.2)</h3><p>A real forward pass of 8 tokens, block 0 of "
            f"{run.model_cfg.n_layers} (the others have the same shapes). Every shape matches its letters: "
            f"{figures['trace']['all_match']}. Each head is D = H/h = {H // h} wide, so the h heads' W^Q together "
            f"are [H, H] = [{H}, {H}], not the notes' [h·H, h·H] = [{h * H}, {h * H}].</p>" + table)  # fmt: skip


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"
