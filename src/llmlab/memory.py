"""Memory of training and inference (notes §2.3 "静态显存"), predicted from the config and measured.

The notes count 16 bytes per parameter for mixed-precision AdamW, then say that activations grow
with the batch B and the sequence S. Here both are exact for this implementation:

    static       weights + AdamW's m and v (+ one `step` scalar per tensor) + the batch (x, y int64)
    activations  the tensors autograd saves for the backward pass, per layer (fp32, dropout 0):
                     4u + 2·norm + attention + ffn,   u = B·S·H·4 bytes, uF = B·S·F·4
                 norm:       LayerNorm 2·B·S·4 (mean, rstd)  |  RMSNorm u + B·S·4 (x·rstd, rstd)
                 attention:  fused (sdpa)  B·S·(h+2h_kv)·D·4 (QKV) + u (output) + B·h·S·4 (logsumexp)
                                           RoPE adds the rotated Q, K and a copy of the output
                             explicit      4u (Q, K, V, heads) + B·h·S²·4, the softmax: the S² term
                                           (with B = 1 or h = 1, Q is saved as a view of QKV)
                 ffn:        ReLU uF  |  GELU 2uF  |  SwiGLU 4uF
                 head:       the final norm's tensors (or the unembedding's input) + log-probs B·S·V·4
    peak         static + the largest of five moments of the step: the log-softmax backward
                 (activations + 2·B·S·V·4), the output layer's backward (activations, less the
                 log-probs, + the logits' gradient B·S·V·4 + W's gradient V·H·4 + h's gradient
                 B·S·H·4), the first and the last block's FFN backward, and the
                 end of backward (all gradients, 4 bytes/param, + with a small tied head the
                 embedding's own gradient and its sum with the head's, 2·V·H·4; a large one,
                 V·H ≥ `tying.MIN_ELEMENTS`, gets its one gradient written once: llmlab.tying)

The CPU measurement (`measure_train_peak`) is what `torch.cuda.max_memory_allocated` would be on
a GPU: the bytes of the tensors alive at the start of a steady-state step (parameters, buffers,
AdamW state, the batch; their `nbytes`) plus the highest running total of PyTorch's CPU allocator
during the step, read from the profiler's allocation events. It does not see the Python heap,
memory that oneDNN/MKL allocate outside PyTorch's allocator, or malloc's fragmentation: the
process's RSS is higher.

Inference: weights + the KV cache, 2·L·B·S·h_kv·D·bytes (the notes' 2·L·B·S·H when h_kv = h).

References: Rajbhandari et al. 2019, ZeRO (arXiv 1910.02054) §3.1 for the 16 bytes/param of
mixed-precision Adam; Korthikanti et al. 2022 (arXiv 2205.05198) §4 for activation memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from llmlab.config import ModelConfig, TrainConfig
from llmlab.errors import UserError

FP32 = 4
INT64 = 8

# Bytes per parameter of training with AdamW, by scheme (notes §2.3; ZeRO §3.1; this code).
BYTES_PER_PARAM: dict[str, dict[str, int]] = {
    "notes: mixed-precision AdamW": {
        "fp16 weights": 2, "fp16 updated weights": 2, "fp16 gradients": 2, "fp16 gradient update": 2,
        "fp32 first moment": 4, "fp32 second moment": 4,
    },
    "ZeRO: mixed-precision Adam": {
        "fp16 weights": 2, "fp16 gradients": 2, "fp32 master weights": 4, "fp32 first moment": 4,
        "fp32 second moment": 4,
    },
    "llmlab: fp32 AdamW": {"fp32 weights": 4, "fp32 gradients": 4, "fp32 first moment": 4, "fp32 second moment": 4},
    "llmlab: bf16 autocast": {
        "fp32 weights": 4, "fp32 gradients": 4, "fp32 first moment": 4, "fp32 second moment": 4,
        "bf16 copy of each Linear weight (autocast, kept for backward)": 2,
    },
}  # fmt: skip


# --- activations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves in one forward pass of B×S tokens, by where they are saved."""

    per_layer: dict[str, int]  # one block: residual stream and norms, attention, FFN
    n_layers: int
    head: int  # final norm (or the unembedding's input) and the log-probabilities [B, S, V]
    positions: int  # learned: the position ids [S]; RoPE: cos and sin [S, D/2]
    log_probs: int  # B·S·V·4, part of `head`

    @property
    def layer(self) -> int:
        return sum(self.per_layer.values())

    @property
    def total(self) -> int:
        return self.n_layers * self.layer + self.head + self.positions


def _check_supported(cfg: ModelConfig) -> None:
    if cfg.dropout > 0:
        raise UserError(f"the activation formula covers dropout = 0 (every preset); got dropout={cfg.dropout}")


def _norm_saved(cfg: ModelConfig, batch: int, seq: int) -> int:
    """What a norm saves besides its input: LayerNorm mean and rstd; RMSNorm rstd and x·rstd."""
    stat = batch * seq * FP32
    return 2 * stat if cfg.norm == "layernorm" else batch * seq * cfg.d_model * FP32 + stat


def activation_bytes(cfg: ModelConfig, batch: int, seq: int) -> Activations:
    """The saved tensors of one training forward pass (fp32), by the formulas of the docstring."""
    _check_supported(cfg)
    B, S, H, F, h, kv, D = batch, seq, cfg.d_model, cfg.ff_width, cfg.n_heads, cfg.kv_heads, cfg.d_head
    u, uF = B * S * H * FP32, B * S * F * FP32
    norm = _norm_saved(cfg, B, S)
    qkv = B * S * (h + 2 * kv) * D * FP32
    if cfg.attention == "explicit":  # Q, K, V, the heads' output, and the softmax [B, h, S, S]
        # matmul copies the strided Q [B, h, S, D] unless B or h is 1 (then it saves a view of QKV)
        q = u if cfg.positions == "rope" or (B > 1 and h > 1) else qkv
        attention = q + 3 * u + B * h * S * S * FP32
    else:
        attention = qkv + u + B * h * S * FP32  # QKV (views), the output, the log-sum-exp [B, h, S]
        if cfg.positions == "rope":  # rotated Q [B,h,S,D] and K [B,h_kv,S,D]; the output, copied to [B,S,H]
            attention += u + u * kv // h + (u if h > 1 and S > 1 else 0)
    ffn = {"relu": 1, "gelu": 2, "gelu_tanh": 2, "swiglu": 4}[cfg.activation] * uF
    per_layer = {"residual stream and norms": 4 * u + 2 * norm, "attention": attention, "ffn": ffn}
    log_probs = B * S * cfg.vocab_size * FP32
    head = (2 * u + norm if cfg.final_norm else u) + log_probs
    positions = {"learned": S * INT64, "rope": 2 * S * (D // 2) * FP32, "sinusoidal": 0}[cfg.positions]
    return Activations(per_layer, cfg.n_layers, head, positions, log_probs)


# --- training: static part and peak --------------------------------------------------------------


@dataclass(frozen=True)
class TrainMemory:
    """Predicted memory of one steady-state training step with fp32 AdamW."""

    weights: int
    buffers: int  # sinusoidal table or RoPE angles
    optimizer: int  # AdamW's m and v, and a step counter per tensor
    gradients: int
    batch: int  # x and y, int64
    activations: Activations
    moments: dict[str, int] = field(default_factory=dict)  # bytes above `static` at each candidate peak

    @property
    def static(self) -> int:
        return self.weights + self.buffers + self.optimizer + self.batch

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=lambda k: self.moments[k])

    @property
    def predicted_peak(self) -> int:
        return self.static + self.moments[self.peak_moment]

    def to_json(self) -> dict[str, Any]:
        return {
            "predicted_bytes": self.predicted_peak, "peak_moment": self.peak_moment, "weights": self.weights,
            "buffers": self.buffers, "optimizer": self.optimizer, "gradients": self.gradients, "batch": self.batch,
            "activations": self.activations.total, "activations_per_layer": self.activations.per_layer,
            "moments": self.moments,
        }  # fmt: skip


def train_memory(cfg: ModelConfig, batch: int, seq: int) -> TrainMemory:
    """Weights, optimizer, gradients and activations of one step, and the step's peak."""
    from llmlab.accounting import param_shapes

    shapes = param_shapes(cfg)
    P = sum(math.prod(s) for s in shapes.values())
    acts = activation_bytes(cfg, batch, seq)
    H, V, F = cfg.d_model, cfg.vocab_size, cfg.ff_width
    u, uF = batch * seq * H * FP32, batch * seq * F * FP32
    layer_params = sum(math.prod(s) for n, s in shapes.items() if n.startswith("blocks.0."))
    head_grad = V * H * FP32 + sum(math.prod(s) for n, s in shapes.items() if n.startswith("ln_final")) * FP32
    # A block's backward peaks in its FFN: the incoming gradient, W₂'s gradient, the gradient of W₂'s
    # input, and with ReLU (whose saved output outlives W₂'s backward) or SwiGLU (two gradients from ⊙)
    # one more [B, S, F]. Post-norm blocks first run LN₂'s backward, which frees its input and statistics.
    ffn_backward = u + (F * H + (H if cfg.bias else 0)) * FP32 + uF * (2 if cfg.activation in ("relu", "swiglu") else 1)
    enter = ffn_backward - (u + _norm_saved(cfg, batch, seq) if cfg.norm_placement == "post" else 0)
    moments = {
        "log-softmax backward": acts.total + 2 * acts.log_probs,
        # the log-probs are freed; the logits' gradient, W's gradient [V, H] and h's gradient are alive
        "output layer's backward": acts.total + V * H * FP32 + u,
        "last block's FFN backward": acts.total - acts.head + head_grad + enter,
        "first block's FFN backward": acts.positions + acts.layer + head_grad
        + (cfg.n_layers - 1) * layer_params * FP32 + enter,
        # tied: the embedding's own gradient [V, H], then its sum with the head's, made out of place
        "end of backward, optimizer step": P * FP32 + (2 * V * H * FP32 if _two_tied_gradients(cfg) else 0),
    }  # fmt: skip
    return TrainMemory(
        weights=P * FP32, buffers=buffer_bytes(cfg), optimizer=2 * P * FP32 + len(shapes) * FP32,
        gradients=P * FP32, batch=2 * batch * seq * INT64, activations=acts, moments=moments,
    )  # fmt: skip


def _two_tied_gradients(cfg: ModelConfig) -> bool:
    """Whether autograd makes the tied matrix two [V, H] gradients and sums them (see llmlab.tying)."""
    from llmlab import tying

    return cfg.tie_embeddings and cfg.vocab_size * cfg.d_model < tying.MIN_ELEMENTS


def buffer_bytes(cfg: ModelConfig) -> int:
    """The sinusoidal table [S_max, H] or RoPE's cos and sin [S_max, D/2]: buffers, not parameters."""
    if cfg.positions == "sinusoidal":
        return cfg.block_size * cfg.d_model * FP32
    return 2 * cfg.block_size * (cfg.d_head // 2) * FP32 if cfg.positions == "rope" else 0


def static_bytes(cfg: ModelConfig) -> dict[str, int]:
    """Weights, gradients and optimizer states of this model under each scheme of BYTES_PER_PARAM;
    bf16 autocast's copies cover the weights of the Linear layers only (the head's included)."""
    from llmlab.accounting import count_params, param_shapes

    n = count_params(cfg)
    head = "embed.weight" if cfg.tie_embeddings else "unembed.weight"
    in_linear = lambda k: k == head or (k.endswith(".weight") and (".attn." in k or ".mlp." in k))  # noqa: E731
    linear = sum(math.prod(s) for k, s in param_shapes(cfg).items() if in_linear(k))
    totals = {}
    for scheme, parts in BYTES_PER_PARAM.items():
        totals[scheme] = sum(b * (linear if k.startswith("bf16 copy") else n) for k, b in parts.items())
    return totals


# --- inference -----------------------------------------------------------------------------------


def kv_cache_bytes(cfg: ModelConfig, batch: int, seq: int, dtype_bytes: int = FP32) -> int:
    """2 (K and V) · L · B · S · h_kv · D · bytes: the notes' 2·L·B·S·H when every head has its own K, V."""
    return 2 * cfg.n_layers * batch * seq * cfg.kv_heads * cfg.d_head * dtype_bytes


def inference_bytes(cfg: ModelConfig, batch: int, seq: int) -> dict[str, int]:
    from llmlab.accounting import count_params

    weights = count_params(cfg) * FP32
    kv = kv_cache_bytes(cfg, batch, seq)
    return {"weights": weights, "buffers": buffer_bytes(cfg), "kv_cache": kv, "total": weights + buffer_bytes(cfg) + kv}


def memory_report(cfg: ModelConfig, batch: int, seq: int) -> dict[str, Any]:
    """Training and inference memory, with the KV cache measured as `KVCache`'s tensors' nbytes."""
    from llmlab.model import KVCache

    cache = KVCache(cfg, batch, device="meta", max_len=seq)  # meta: shapes only, nothing allocated
    return {
        "train": train_memory(cfg, batch, seq).to_json(),
        "bytes_per_param": BYTES_PER_PARAM,
        "static_bytes": static_bytes(cfg),
        "kv_cache_bytes": kv_cache_bytes(cfg, batch, seq),
        "kv_cache_measured_bytes": cache.k.nbytes + cache.v.nbytes,
        "inference": inference_bytes(cfg, batch, seq),
    }


# --- measurement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredMemory:
    live_at_start: int  # nbytes of parameters, buffers, AdamW state and the batch
    allocated_peak: int  # highest running total of the CPU allocator during the step
    saved_activations: int  # what autograd saved in the forward pass, from saved-tensor hooks

    @property
    def peak(self) -> int:
        return self.live_at_start + self.allocated_peak


def available_bytes() -> int:
    """Memory the OS can give without swapping (Linux: MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(predicted_bytes: int, available: int | None = None) -> None:
    """Refuse a measurement that would not fit in memory (with room to spare) instead of swapping."""
    available = available_bytes() if available is None else available
    if predicted_bytes > 0.8 * available:
        raise UserError(
            f"--measure would need about {predicted_bytes / 2**30:.2f} GiB (predicted) but only "
            f"{available / 2**30:.2f} GiB is available; lower --batch or --seq"
        )


def measure_train_peak(cfg: ModelConfig, batch: int, seq: int, train_cfg: TrainConfig | None = None,
                       seed: int = 0) -> MeasuredMemory:  # fmt: skip
    """Run two training steps as `llmlab train` does (fp32, CPU) and measure the second one."""
    import torch

    from llmlab.model import GPT
    from llmlab.train import make_optimizer

    train_cfg = replace(train_cfg or TrainConfig(), dtype="float32")
    torch.manual_seed(seed)
    model = GPT(cfg).train()
    optimizer = make_optimizer(model, train_cfg)
    x, y = (torch.randint(0, cfg.vocab_size, (batch, seq)) for _ in range(2))  # [B, S]
    train_step(model, optimizer, x, y, train_cfg.grad_clip)  # creates AdamW's state
    live = _storage_bytes([*model.parameters(), *model.buffers(), *_state_tensors(optimizer), x, y])
    allocated = _allocator_peak(lambda: train_step(model, optimizer, x, y, train_cfg.grad_clip))
    saved = saved_activation_bytes(model, x, y)
    return MeasuredMemory(live, allocated, saved)


def saved_activation_bytes(model: Any, x: Any, y: Any) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters, buffers and the
    batch excluded (`torch.autograd.graph.saved_tensors_hooks`)."""
    import torch

    from llmlab.entropy import cross_entropy

    exclude = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), x, y]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in exclude:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = cross_entropy(model(x), y)
    del loss
    return sum(seen.values())


def train_step(model: Any, optimizer: Any, x: Any, y: Any, grad_clip: float) -> None:
    """The body of `train.py`'s step for one micro-batch: forward, loss, backward, clip, AdamW."""
    from llmlab.entropy import cross_entropy
    from llmlab.train import clip_and_step

    loss = cross_entropy(model(x), y)
    loss.backward()
    clip_and_step(optimizer, grad_clip)
    optimizer.zero_grad(set_to_none=True)


def _allocator_peak(fn: Any) -> int:
    """Highest running total of PyTorch's CPU allocator while `fn` runs, above where it started.

    With memory profiling on, every allocation and free of c10's CPU allocator is reported with
    the allocator's running total (`total_allocated`) of the bytes allocated since profiling began.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto writes "profiler_start"/"profiler_stop" lines to file descriptor 2 from C++ and no
    setting turns them off: point fd 2 at /dev/null while the profiler starts and stops."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _state_tensors(optimizer: Any) -> list[Any]:
    import torch

    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def _storage_key(t: Any) -> int:
    return t.untyped_storage()._cdata


def _storage_bytes(tensors: list[Any]) -> int:
    return sum({_storage_key(t): t.untyped_storage().nbytes() for t in tensors}.values())
