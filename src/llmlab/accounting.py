"""Parameters and FLOPs (notes §2.3), exact for this implementation, beside the notes' formulas.

Letters as in the notes (§2.2): B batch, S sequence, H hidden, V vocabulary, h heads, F FFN width,
L layers; D = H/h, h_kv the heads of K and V (h_kv < h: grouped-query attention), P positions
already in the KV cache, T = P + S the keys each query sees.

FLOPs are those of matrix products, 2 per multiply-add, as `torch.utils.flop_counter` counts them
(biases, norms, activations and softmax are vector work that no one's formula counts). Forward:

    attention projections  2BSH·(h + 2h_kv)·D + 2BS·hD·H         notes: 8BSH²   (h_kv = h, D = H/h)
    attention scores       2BhSTD (QKᵀ) + 2BhSTD (·V)             notes: 4BS²H   (T = S)
    FFN                    2BSHF · (2, or 3 for SwiGLU)           notes: 16BSH²  (F = 4H, two matrices)
    logits                 2BSHV                                  notes: —       (left out)
    ×L for the first three; the embedding is a table lookup, 0 FLOPs (the notes' [B,S,V]·W would be 2BSVH).

The backward pass is twice the forward (each product Y = XW needs dX = dY·Wᵀ and dW = Xᵀ·dY), so a
training step is 3× forward: the model FLOPs of PaLM's MFU (Chowdhery et al. 2022, arXiv 2204.02311,
App. B), which counts no recomputation. Kaplan et al. 2020 (arXiv 2001.08361, §2.1) approximate it
per token as 6N, N the non-embedding parameters, leaving out the attention scores and the logits.

On CPU, `FlopCounterMode` has no formula for PyTorch's fused CPU attention kernel and counts it as
0 FLOPs; `SDPA_CPU_FLOPS` gives it one (`custom_mapping`). On the meta device SDPA runs its math
path (two batched products), which the counter sees as it is.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmlab.config import ModelConfig
from llmlab.errors import UserError
from llmlab.machine import cpuinfo

COMPONENTS = ("embedding", "positions", "attention", "ffn", "norms", "head")


# --- parameters --------------------------------------------------------------------------------


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `GPT(cfg)`, by its name in the module tree, with its shape.

    A tied head is the embedding's Parameter, so it appears once (as `embed.weight`); the
    sinusoidal table and RoPE's angles are buffers, not parameters.
    """
    H, V, F, h, kv, D = cfg.d_model, cfg.vocab_size, cfg.ff_width, cfg.n_heads, cfg.kv_heads, cfg.d_head
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (V, H)}
    if cfg.positions == "learned":
        shapes["pos_embed.weight"] = (cfg.block_size, H)
    for layer in range(cfg.n_layers):
        p = f"blocks.{layer}."
        shapes |= _norm(p + "ln1", cfg) | _norm(p + "ln2", cfg)
        shapes |= _linear(p + "attn.qkv", H, (h + 2 * kv) * D, cfg.bias) | _linear(p + "attn.out", h * D, H, cfg.bias)
        shapes |= _linear(p + "mlp.w1", H, F, cfg.bias) | _linear(p + "mlp.w2", F, H, cfg.bias)
        if cfg.activation == "swiglu":
            shapes |= _linear(p + "mlp.w3", H, F, cfg.bias)
    if cfg.final_norm:
        shapes |= _norm("ln_final", cfg)
    if not cfg.tie_embeddings:
        shapes["unembed.weight"] = (V, H)
    return shapes


def _linear(name: str, n_in: int, n_out: int, bias: bool) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (n_out, n_in)} | ({f"{name}.bias": (n_out,)} if bias else {})


def _norm(name: str, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with_bias = cfg.norm == "layernorm" and cfg.bias  # RMSNorm has a gain only
    return {f"{name}.weight": (cfg.d_model,)} | ({f"{name}.bias": (cfg.d_model,)} if with_bias else {})


def component_of(name: str) -> str:
    """The component a parameter name belongs to (one of COMPONENTS)."""
    parts = name.split(".")
    if parts[0] in ("embed", "pos_embed", "unembed"):
        return {"embed": "embedding", "pos_embed": "positions", "unembed": "head"}[parts[0]]
    if "attn" in parts:
        return "attention"
    return "ffn" if "mlp" in parts else "norms"


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by component, all layers together; the values sum to `count_params(cfg)`."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, shape in param_shapes(cfg).items():
        counts[component_of(name)] += math.prod(shape)
    return counts


def count_params(cfg: ModelConfig) -> int:
    return sum(param_counts(cfg).values())


def non_embedding_params(cfg: ModelConfig) -> int:
    """Kaplan's N: every parameter but the embeddings, the token and position tables and an untied
    output layer's (their models tie it, so it adds none; §2.1 leaves the logits out of 6N)."""
    counts = param_counts(cfg)
    return counts["attention"] + counts["ffn"] + counts["norms"]


def measured_param_counts(model: Any) -> dict[str, int]:
    """The same grouping over a real model's `named_parameters()` (a shared Parameter once)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        counts[component_of(name)] += p.numel()
    return counts


# --- FLOPs -------------------------------------------------------------------------------------


def forward_flops(cfg: ModelConfig, batch: int, seq: int, past: int = 0) -> dict[str, int]:
    """Matrix-product FLOPs of one forward pass of `seq` new tokens after `past` cached ones."""
    B, S, T, L = batch, seq, past + seq, cfg.n_layers
    H, V, F, h, kv, D = cfg.d_model, cfg.vocab_size, cfg.ff_width, cfg.n_heads, cfg.kv_heads, cfg.d_head
    n_ffn = 3 if cfg.activation == "swiglu" else 2
    return {
        "attention projections": L * (2 * B * S * H * (h + 2 * kv) * D + 2 * B * S * h * D * H),
        "attention scores": L * 2 * (2 * B * h * S * T * D),
        "ffn": L * n_ffn * 2 * B * S * H * F,
        "logits": 2 * B * S * H * V,
    }


def train_step_flops(cfg: ModelConfig, batch: int, seq: int) -> int:
    """Forward + backward of one step on B×S tokens: 3× the forward (the backward is twice it)."""
    return 3 * sum(forward_flops(cfg, batch, seq).values())


def decode_step_flops(cfg: ModelConfig, batch: int, context: int) -> int:
    """One KV-cached decoding step: one new token per sequence that attends to `context` keys."""
    return sum(forward_flops(cfg, batch, 1, past=context - 1).values())


def notes_flops(cfg: ModelConfig, batch: int, seq: int) -> dict[str, int]:
    """The notes' formulas (§2.3), ×L: attention 8BSH² + 4BS²H, FFN 16BSH²; nothing else."""
    B, S, H, L = batch, seq, cfg.d_model, cfg.n_layers
    return {
        "attention projections": L * 8 * B * S * H * H,
        "attention scores": L * 4 * B * S * S * H,
        "ffn": L * 16 * B * S * H * H,
        "logits": 0,
    }


def kaplan_flops(cfg: ModelConfig, batch: int, seq: int) -> int:
    """Kaplan et al.'s C ≈ 6N per token for a training step, N = non-embedding parameters."""
    return 6 * non_embedding_params(cfg) * batch * seq


def notes_comparison(cfg: ModelConfig, batch: int, seq: int) -> list[dict[str, Any]]:
    """Per component: the exact count, the notes' formula, the difference in %, and why."""
    exact, notes = forward_flops(cfg, batch, seq), notes_flops(cfg, batch, seq)
    reasons = _reasons(cfg)
    return [
        {"component": k, "exact": exact[k], "notes": notes[k], "diff_pct": pct_diff(notes[k], exact[k]),
         "reason": reasons[k]}
        for k in exact
    ]  # fmt: skip


def pct_diff(approx: int, exact: int) -> float | None:
    """100 · (approx − exact) / exact, rounded to 0.01; None when exact is 0."""
    return None if exact == 0 else round(100 * (approx - exact) / exact, 2)


def _reasons(cfg: ModelConfig) -> dict[str, str]:
    H, F, h, kv, D = cfg.d_model, cfg.ff_width, cfg.n_heads, cfg.kv_heads, cfg.d_head
    proj = (
        "the same four H×H products"
        if kv == h
        else f"K and V have h_kv={kv} of h={h} heads, so 2·h_kv·D={2 * kv * D} < 2H"
    )
    n = 3 if cfg.activation == "swiglu" else 2
    ffn = [
        f"F={F}" + (" = 4H" if F == 4 * H else f", not 4H={4 * H}"),
        f"{n} matrices" + (" (SwiGLU)" if n == 3 else ""),
    ]
    return {
        "attention projections": proj,
        "attention scores": "the same: every query scores all S keys (the causal mask sets half of the "
        "scores to −∞ only after they are computed)",
        "ffn": ", ".join(ffn) + ("; the notes assume F=4H and two matrices" if (F, n) != (4 * H, 2) else ""),
        "logits": "the notes stop at the last layer; the output layer [B,S,H]·[H,V] costs 2BSHV",
    }  # fmt: skip


# --- measurement with FlopCounterMode ---------------------------------------------------------------


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any,
                             *args: Any, **kwargs: Any) -> int:  # fmt: skip
    """Twice the forward: dQ, dK, dV and d(scores). PyTorch's formula for the CUDA kernels adds the
    recomputation of QKᵀ (5 products, not 4); model FLOPs count no recomputation."""
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)


def sdpa_cpu_flops() -> dict[Any, Callable[..., int]]:
    """`custom_mapping` for FlopCounterMode: formulas for the fused CPU attention kernels."""
    import torch

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    }


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip weight initialisation: meta tensors hold no values, and meta `normal_` is slow."""
    from unittest import mock

    import torch

    noop = lambda t, *args, **kwargs: t  # noqa: E731
    names = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_")
    with mock.patch.multiple(torch.nn.init, **dict.fromkeys(names, noop)):
        yield


def meta_model(cfg: ModelConfig) -> Any:
    """`GPT(cfg)` on the meta device: shapes without storage, so a 70B shape costs nothing."""
    import torch

    from llmlab.model import GPT

    with torch.device("meta"), _no_init():
        return GPT(cfg).train()


@dataclass(frozen=True)
class MeasuredFlops:
    forward: int
    backward: int
    by_component: dict[str, int]  # forward, grouped like `forward_flops`

    @property
    def train_step(self) -> int:
        return self.forward + self.backward


def measure_flops(model: Any, batch: int, seq: int, backward: bool = True) -> MeasuredFlops:
    """Count one forward (and backward) pass of `model` with FlopCounterMode, on the model's device.
    The gradients it makes are dropped again (`.grad` set to None)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from llmlab.entropy import cross_entropy

    device = next(model.parameters()).device
    idx = torch.zeros(batch, seq, dtype=torch.long, device=device)  # [B, S]
    with FlopCounterMode(display=False, custom_mapping=sdpa_cpu_flops()) as fwd:
        loss = cross_entropy(model(idx), idx)
    counts = {k: sum(v.values()) for k, v in fwd.get_flop_counts().items()}
    with FlopCounterMode(display=False, custom_mapping=sdpa_cpu_flops()) as bwd:
        if backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return MeasuredFlops(fwd.get_total_flops(), bwd.get_total_flops(), _by_component(counts))


def measure_decode_flops(model: Any, batch: int, context: int) -> int:
    """FlopCounterMode over one cached decoding step with `context - 1` positions in the cache."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from llmlab.model import KVCache

    device = next(model.parameters()).device
    cache = KVCache(model.cfg, batch, device=device, max_len=context)
    cache.pos = context - 1
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=sdpa_cpu_flops()) as counter:
        model(torch.zeros(batch, 1, dtype=torch.long, device=device), cache=cache)  # [B, 1] → [B, 1, V]
    return counter.get_total_flops()


MEASURED_LAYERS = 12  # deeper models are measured on 1 and 2 layers; see measure_meta


def measure_meta(cfg: ModelConfig, batch: int, seq: int) -> tuple[MeasuredFlops, int, int, int]:
    """(training-step FLOPs, parameters, decoding-step FLOPs, layers measured) of `GPT(cfg)`, counted
    on meta models: the whole model up to `MEASURED_LAYERS` layers, else models of one and two
    layers, extended to L as f(L) = f(1) + (L − 1)·(f(2) − f(1)). That is exact, because every
    block has the same shapes and nothing else depends on L, and it keeps `llmlab count` quick at
    any depth (a meta forward and backward costs a fraction of a second a layer)."""
    if cfg.n_layers <= MEASURED_LAYERS:
        model = meta_model(cfg)
        params = sum(p.numel() for p in model.parameters())
        return measure_flops(model, batch, seq), params, measure_decode_flops(model, batch, seq), cfg.n_layers
    one, two = (measure_meta(replace(cfg, n_layers=n), batch, seq) for n in (1, 2))
    more = cfg.n_layers - 1
    flops = MeasuredFlops(
        one[0].forward + more * (two[0].forward - one[0].forward),
        one[0].backward + more * (two[0].backward - one[0].backward),
        {k: v + more * (two[0].by_component[k] - v) for k, v in one[0].by_component.items()},
    )
    return flops, one[1] + more * (two[1] - one[1]), one[2] + more * (two[2] - one[2]), 2


def _by_component(counts: dict[str, int]) -> dict[str, int]:
    """FlopCounterMode's per-module totals ("GPT.blocks.0.attn.qkv", ...) grouped like forward_flops."""
    attn = sum(v for k, v in counts.items() if k.endswith(".attn"))
    proj = sum(v for k, v in counts.items() if k.endswith((".attn.qkv", ".attn.out")))
    return {
        "attention projections": proj,
        "attention scores": attn - proj,
        "ffn": sum(v for k, v in counts.items() if k.endswith(".mlp")),
        "logits": counts.get("GPT.unembed", 0),
    }


# --- the machine's matmul peak and MFU -------------------------------------------------------------


def cache_path() -> Path:
    """$LLMLAB_CACHE, else $XDG_CACHE_HOME/llmlab, else ~/.cache/llmlab; the file peak.json."""
    base = os.environ.get("LLMLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmlab"
    return Path(base) / "peak.json"


def _machine_key(device: str, dtype: str) -> str:
    import torch

    threads = torch.get_num_threads() if device == "cpu" else 0
    return f"{device}/{dtype}/{threads} threads/torch {torch.__version__}"


def measure_matmul_peak(device: str = "cpu", dtype: str = "float32", n: int | None = None,
                        seconds: float = 1.0) -> float:  # fmt: skip
    """FLOP/s of the fastest of repeated n×n·n×n products (2n³ FLOPs each) over about `seconds`;
    n = 2048 on a CPU, 8192 on an accelerator. A busy machine measures low: measure when idle."""
    import torch

    n = n or (2048 if device == "cpu" else 8192)
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))  # [n, n]
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))  # [n, n]
    kind = torch.device(device).type
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(kind, lambda: None)
    a @ b  # warm up
    sync()
    best, start = math.inf, time.perf_counter()
    while time.perf_counter() - start < seconds or best == math.inf:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16 in
    /proc/cpuinfo); None where that cannot be read. Without them PyTorch emulates bf16 matmuls:
    on this project's AVX2 machine at 1-16 GFLOP/s against 100-135 fp32."""
    flags = cpuinfo("flags")
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def peak_flops(device: str = "cpu", dtype: str = "float32", refresh: bool = False,
               measure: Callable[[str, str], float] | None = None) -> float:  # fmt: skip
    """This machine's matmul peak in FLOP/s, measured once and cached in `cache_path()`."""
    from llmlab.run_dir import write_json

    path, key = cache_path(), _machine_key(device, dtype)
    cached = _read_cache(path)
    if key not in cached or refresh:
        cached[key] = (measure or (lambda d, t: measure_matmul_peak(d, t)))(device, dtype)
        write_json(path, cached)
    return float(cached[key])


def peak_command(device: str = "cpu") -> str:
    """The command that caches the peak `cached_peak(device, ...)` looks up from this process.
    On a CPU the cache is per thread count, so where this process runs other than the default
    threads (torchrun sets OMP_NUM_THREADS=1 in each of its processes) the command sets them too."""
    if device != "cpu":
        return f"llmlab count --peak --device {device}"
    import torch

    threads = torch.get_num_threads()
    pinned = "OMP_NUM_THREADS" in os.environ or threads != (os.cpu_count() or threads)
    return f"OMP_NUM_THREADS={threads} llmlab count --peak" if pinned else "llmlab count --peak"


def cached_peak(device: str = "cpu", dtype: str = "float32") -> float | None:
    """The cached peak if `llmlab count --peak` (or `peak_flops`) measured it here, else None.
    Training reports MFU with it and never measures on its own."""
    value = _read_cache(cache_path()).get(_machine_key(device, dtype))
    return float(value) if value else None


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, int | float)} if isinstance(data, dict) else {}


def mfu(achieved_flops_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the machine's peak (PaLM, App. B)."""
    if peak <= 0:
        raise UserError(f"the peak must be positive, got {peak}")
    return achieved_flops_per_s / peak


# --- checks ----------------------------------------------------------------------------------------


MAX_EXPONENT = 48
MAX_ELEMENTS = 1 << MAX_EXPONENT  # numbers in one activation: 1 PiB of fp32, far beyond any machine, within int64


def check_activation_size(cfg: ModelConfig, batch: int, seq: int) -> None:
    """UserError if the largest activation of a [batch, seq] forward pass (the attention scores
    [B, h, S, S], the logits [B, S, V] or the FFN's [B, S, F]) would hold more than MAX_ELEMENTS
    numbers: PyTorch's size arithmetic overflows int64 not far beyond, even on the meta device."""
    largest = batch * seq * max(cfg.n_heads * seq, cfg.vocab_size, cfg.ff_width, cfg.d_model)
    if largest > MAX_ELEMENTS:
        raise UserError(f"batch={batch} seq={seq} is too large: one activation would hold {largest:.3g} numbers "
                        f"(at most 2**{MAX_EXPONENT} are counted)")  # fmt: skip


def fit_context(cfg: ModelConfig, batch: int, seq: int) -> ModelConfig:
    """Check B and S; a model with sinusoidal or RoPE positions is counted at any S (its tables are
    buffers, so no parameter changes), a learned-position model only up to its block_size."""
    from dataclasses import replace

    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be at least 1, got batch={batch} seq={seq}")
    check_activation_size(cfg, batch, seq)
    if seq <= cfg.block_size:
        return cfg
    if cfg.positions == "learned":
        raise UserError(f"seq={seq} exceeds the context of {cfg.block_size} positions this model has learned")
    return replace(cfg, block_size=seq)


# --- step time --------------------------------------------------------------------------------------


def time_train_step(cfg: ModelConfig, batch: int, seq: int, repeats: int = 3, optimizer: bool = False) -> float:
    """Seconds of a real fp32 forward + backward (+ AdamW step) on the CPU: the fastest of `repeats`
    after a warm-up, the least disturbed by other work on the machine."""
    import torch

    from llmlab.config import TrainConfig
    from llmlab.memory import train_step
    from llmlab.model import GPT
    from llmlab.train import make_optimizer

    torch.manual_seed(0)
    model = GPT(cfg).train()
    opt = make_optimizer(model, TrainConfig()) if optimizer else None
    x, y = (torch.randint(0, cfg.vocab_size, (batch, seq)) for _ in range(2))  # [B, S]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        if opt is not None:
            train_step(model, opt, x, y, grad_clip=1.0)
        else:
            _forward_backward(model, x, y)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _forward_backward(model: Any, x: Any, y: Any) -> None:
    from llmlab.entropy import cross_entropy

    cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


# --- the report of `llmlab count` ---------------------------------------------------------------


def count_report(cfg: ModelConfig, batch: int, seq: int, source: str, measure: bool = False,
                 peak: dict[str, float] | None = None, peak_device: str = "cpu",
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Everything `llmlab count` prints (and the web app's Count tab shows): params, FLOPs, memory,
    measured on a meta model (FLOPs, params) and, with `measure`, on a real one (memory, step
    time, MFU). `source` names where the config came from; `peak` holds the matmul peaks of
    `peak_device`, against which the CPU step's MFU is taken only when that device is the CPU."""
    from llmlab import memory
    from llmlab.config import to_dict

    cfg = fit_context(cfg, batch, seq)
    measured, measured_params, measured_decode, layers = measure_meta(cfg, batch, seq)
    rows = notes_comparison(cfg, batch, seq)
    for row in rows:
        row["measured"] = measured.by_component[row["component"]]
    exact, notes = sum(r["exact"] for r in rows), sum(r["notes"] for r in rows)
    train, kaplan = train_step_flops(cfg, batch, seq), kaplan_flops(cfg, batch, seq)
    counts = param_counts(cfg)
    report: dict[str, Any] = {
        "model": {"source": source, **to_dict(cfg)}, "batch": batch, "seq": seq,
        "params": {"total": sum(counts.values()), "measured": measured_params,
                   "by_component": counts, "non_embedding": non_embedding_params(cfg)},
        "measured_layers": layers,
        "flops": {
            "forward": {"exact": exact, "measured": measured.forward, "notes": notes,
                        "notes_diff_pct": pct_diff(notes, exact), "by_component": rows},
            "train_step": {"exact": train, "measured": measured.train_step, "kaplan_6n": kaplan,
                           "kaplan_diff_pct": pct_diff(kaplan, train)},
            "decode_step": {"context": seq, "exact": decode_step_flops(cfg, batch, seq),
                            "measured": measured_decode},
        },
        "memory": memory.memory_report(cfg, batch, seq),
    }  # fmt: skip
    if measure:
        cpu_peak = peak if peak_device == "cpu" else None
        report |= _measure_report(cfg, batch, seq, report["memory"]["train"], train, cpu_peak, log or (lambda _: None))
    if peak:
        report |= {"peak": peak, "peak_device": peak_device}
    return report


def _measure_report(cfg: ModelConfig, batch: int, seq: int, train_mem: dict[str, Any], train_flops: int,
                    peak: dict[str, float] | None, log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """Measured peak memory (in place in `train_mem`), step time, achieved FLOP/s and MFU."""
    from llmlab import memory

    memory.check_fits(train_mem["predicted_bytes"])
    log(f"measuring one training step on the CPU (B={batch}, S={seq}) ...")
    m = memory.measure_train_peak(cfg, batch, seq)
    train_mem |= {
        "measured_bytes": m.peak, "measured_activations": m.saved_activations,
        "error_pct": pct_diff(train_mem["predicted_bytes"], m.peak),
        "measured_how": "(live tensors at the step's start + the CPU allocator's peak, profiler)",
    }  # fmt: skip
    seconds = time_train_step(cfg, batch, seq, repeats=3, optimizer=True)
    fp32_peak = (peak or {}).get("float32") or peak_flops("cpu", "float32")
    achieved = train_flops / seconds
    return {"step_seconds": seconds, "achieved_flops_per_s": achieved, "mfu": mfu(achieved, fp32_peak)}
