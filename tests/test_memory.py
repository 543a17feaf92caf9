"""Training and inference memory (notes §2.3): the activation formula against the tensors autograd
really saves, the predicted peak against the CPU allocator's measured peak, the KV cache against
its tensors, and the bytes per parameter against a real AdamW step."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from llmlab import memory, tying
from llmlab.config import PRESETS, TrainConfig, preset
from llmlab.entropy import cross_entropy
from llmlab.errors import UserError
from llmlab.model import GPT, KVCache
from llmlab.train import make_optimizer
from tests.conftest import TINY_VARIANTS

EXTRA = {
    "post-norm rmsnorm swiglu untied final norm": replace(TINY_VARIANTS["notes"], norm="rmsnorm",
                                                          activation="swiglu", tie_embeddings=False, final_norm=True),
    "rope without grouped heads": replace(TINY_VARIANTS["llama-tiny"], n_kv_heads=None, d_ff=100),
    "grouped heads, learned positions, gelu, bias": replace(TINY_VARIANTS["gpt2"], n_kv_heads=1, d_ff=72),
    "pre-norm without a final norm, relu": replace(TINY_VARIANTS["nanogpt-shakespeare-char"], final_norm=False,
                                                   activation="relu"),
    "one head": replace(TINY_VARIANTS["notes"], n_heads=1),
    "one head, rope": replace(TINY_VARIANTS["llama-tiny"], n_heads=1, n_kv_heads=None),
}  # fmt: skip
ALL_TINY = TINY_VARIANTS | EXTRA


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("name", list(ALL_TINY))
def test_activation_formula_equals_the_tensors_autograd_saves(name, attention):
    """Reference: torch.autograd.graph.saved_tensors_hooks: the distinct storages saved for backward
    in a real forward pass, byte for byte, at several B and S."""
    cfg = replace(ALL_TINY[name], attention=attention)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    for B, S in [(1, 1), (1, 5), (3, 1), (3, 7), (2, 16)]:
        x, y = (torch.randint(0, cfg.vocab_size, (B, S)) for _ in range(2))
        assert memory.activation_bytes(cfg, B, S).total == memory.saved_activation_bytes(model, x, y), (B, S)


def test_explicit_attention_saves_the_s_squared_softmax_and_sdpa_does_not():
    """The S² term: doubling S adds B·h·S²·4 bytes per layer more on the explicit path (its softmax
    [B, h, S, S]) than on the fused path, which keeps only the log-sum-exp [B, h, S]."""
    cfg = TINY_VARIANTS["notes"]
    B, h, L = 2, cfg.n_heads, cfg.n_layers

    def growth(path: str) -> int:
        c = replace(cfg, attention=path)
        return memory.activation_bytes(c, B, 16).total - 2 * memory.activation_bytes(c, B, 8).total

    assert growth("explicit") - growth("sdpa") == L * B * h * (16**2 - 2 * 8**2) * 4


NANO = replace(TINY_VARIANTS["nanogpt-shakespeare-char"], vocab_size=65)
MEASURED = {  # (config, B, S): the peak falls at a different moment of the step across these
    "nanogpt-shakespeare-char, FFN backward": (NANO, 8, 16),
    "notes, post-norm ReLU": (replace(TINY_VARIANTS["notes"], vocab_size=65), 8, 16),
    "llama-tiny, large vocabulary": (replace(TINY_VARIANTS["llama-tiny"], vocab_size=2048), 4, 16),
    "gpt2 style, explicit attention": (replace(TINY_VARIANTS["gpt2"], attention="explicit"), 4, 16),
    "tied head, one token": (replace(TINY_VARIANTS["notes"], vocab_size=1024, n_layers=4), 1, 2),
    "large tied head, one gradient": (replace(TINY_VARIANTS["gpt2"], vocab_size=1 << 15), 1, 2),  # V·H = 1 M
    "untied, many layers": (replace(TINY_VARIANTS["llama-tiny"], n_layers=6), 1, 4),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MEASURED))
def test_predicted_training_peak_is_within_10_percent_of_the_measured_peak(name):
    """Reference: the profiler's allocation events (the CPU allocator's running total) over a real
    training step as `llmlab train` runs it, plus the live tensors' nbytes at its start."""
    cfg, B, S = MEASURED[name]
    predicted = memory.train_memory(cfg, B, S)
    measured = memory.measure_train_peak(cfg, B, S)
    assert predicted.static == measured.live_at_start  # weights, buffers, AdamW state, batch: exact
    assert predicted.activations.total == measured.saved_activations
    assert abs(predicted.predicted_peak - measured.peak) <= 0.10 * measured.peak
    assert abs(predicted.predicted_peak - measured.peak) <= 0.01 * measured.peak  # in fact within 1%


def test_the_measured_configs_peak_at_four_different_moments():
    """The log-softmax backward (large V), the last block's FFN backward (large B·S), the end of
    backward (large model, small B·S), the output layer's backward (a large tied W written once,
    tiny B·S): the measurements above check each."""
    moments = {memory.train_memory(cfg, B, S).peak_moment for cfg, B, S in MEASURED.values()}
    assert len(moments) == 4


def test_allocator_peak_sees_a_known_allocation_pattern():
    """Reference: the sizes allocated: 4000 B, then 2000 B while the first is alive, then 800 B."""

    def pattern() -> None:
        a = torch.empty(1000)
        b = torch.empty(500)
        del a
        c = torch.empty(200)
        del b, c

    assert memory._allocator_peak(pattern) == 6000


def test_fp32_adamw_holds_16_bytes_per_parameter():
    """Reference: a real AdamW step: weights, gradients and the m, v states, by nbytes (the notes'
    16 B/param, reached with fp32 everything)."""
    cfg = TINY_VARIANTS["llama-tiny"]
    model = GPT(cfg)
    opt = make_optimizer(model, TrainConfig())
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    cross_entropy(model(x), x).backward()
    opt.step()
    params = list(model.parameters())
    states = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    total = sum(t.nbytes for t in params + [p.grad for p in params] + states)
    n = sum(p.numel() for p in params)
    assert total == 16 * n == sum(memory.BYTES_PER_PARAM["llmlab: fp32 AdamW"].values()) * n


def test_notes_and_zero_breakdowns_both_sum_to_16():
    """Reference: the notes' six items (2+2+2+2+4+4) and ZeRO §3.1's 2Ψ + 2Ψ + KΨ with K = 12."""
    notes, zero = (
        memory.BYTES_PER_PARAM["notes: mixed-precision AdamW"],
        memory.BYTES_PER_PARAM["ZeRO: mixed-precision Adam"],
    )
    assert list(notes.values()) == [2, 2, 2, 2, 4, 4] and sum(notes.values()) == 16
    assert zero["fp16 weights"] + zero["fp16 gradients"] == 4 and sum(zero.values()) - 4 == 12


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2"])
@pytest.mark.parametrize("tied_path", [False, True])
def test_bf16_autocast_keeps_a_bf16_copy_of_every_linear_weight(name, tied_path, monkeypatch):
    """Reference: saved_tensors_hooks under torch.autocast(bfloat16): the bf16 tensors shaped like a
    Linear weight (or its transpose) add up to 2 bytes per Linear weight, the tied head included,
    also through llmlab.tying's one-gradient path (which keeps its own bf16 copy of W)."""
    monkeypatch.setattr(tying, "MIN_ELEMENTS", 0 if tied_path else 1 << 40)
    cfg = replace(TINY_VARIANTS[name], vocab_size=37, d_model=40, n_heads=4)
    model = GPT(cfg).train()
    assert model._tied_training() == (tied_path and cfg.tie_embeddings)
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    shapes = {tuple(w.shape) for w in linear} | {tuple(w.shape)[::-1] for w in linear}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, 37, (2, 6))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        cross_entropy(model(x), x)
    per_weight = memory.BYTES_PER_PARAM["llmlab: bf16 autocast"][
        "bf16 copy of each Linear weight (autocast, kept for backward)"
    ]
    assert sum(saved.values()) == per_weight * sum(w.numel() for w in linear)


@pytest.mark.parametrize("name", list(PRESETS))
def test_kv_cache_bytes_equal_the_cache_tensors(name):
    """Reference: KVCache's own k and v tensors' nbytes (meta device: shapes only), and the notes'
    2·L·B·S·H·4 wherever every head has its own K and V."""
    cfg = preset(name).model
    for B, S in [(1, 1), (3, cfg.block_size)]:
        cache = KVCache(cfg, B, device="meta", max_len=S)
        assert memory.kv_cache_bytes(cfg, B, S) == cache.k.nbytes + cache.v.nbytes
        if cfg.kv_heads == cfg.n_heads:
            assert memory.kv_cache_bytes(cfg, B, S) == 2 * cfg.n_layers * B * S * cfg.d_model * 4


def test_inference_memory_is_weights_plus_buffers_plus_cache():
    """Reference: the real model's parameters and buffers, by nbytes."""
    cfg = TINY_VARIANTS["notes"]
    model = GPT(cfg)
    inf = memory.inference_bytes(cfg, 2, 16)
    assert inf["weights"] == sum(p.nbytes for p in model.parameters())
    assert inf["buffers"] == sum(b.nbytes for b in model.buffers())
    assert inf["total"] == inf["weights"] + inf["buffers"] + inf["kv_cache"]


def test_a_measurement_that_would_not_fit_is_refused():
    with pytest.raises(UserError, match="predicted"):
        memory.check_fits(10 * 2**30, available=2**30)
    memory.check_fits(2**20, available=2**30)


def test_dropout_is_outside_the_activation_formula():
    with pytest.raises(UserError, match="dropout"):
        memory.activation_bytes(replace(TINY_VARIANTS["notes"], dropout=0.1), 1, 4)


def test_activations_grow_linearly_in_b_and_in_s_on_the_fused_path():
    """B·S enters every saved tensor once (no S² term with sdpa): doubling B or S doubles the total
    (sinusoidal positions save nothing that depends on S alone)."""
    cfg = preset("notes").model
    a1, a2 = memory.activation_bytes(cfg, 1, 512).total, memory.activation_bytes(cfg, 2, 512).total
    assert a2 == 2 * a1
    assert math.isclose(memory.activation_bytes(cfg, 1, 1024).total, 2 * a1, rel_tol=1e-9)


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_static_bytes_are_16_per_parameter_plus_bf16_copies_of_linear_weights(name):
    """Reference: the real model's parameters and its nn.Linear modules' weights (a tied head's once)."""
    cfg = TINY_VARIANTS[name]
    model = GPT(cfg)
    n = sum(p.numel() for p in model.parameters())
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    totals = memory.static_bytes(cfg)
    assert totals["notes: mixed-precision AdamW"] == totals["llmlab: fp32 AdamW"] == 16 * n
    assert totals["llmlab: bf16 autocast"] == 16 * n + 2 * sum(linear.values())
