"""Configuration: one dataclass for the model, one for training, and the named presets.

This module imports no torch, so `llmlab --help` and config errors answer instantly.

Letters follow the notes (§2.2): B batch, S sequence, H hidden, V vocabulary, h heads, F FFN
width, L layers; D = H/h is the width of one head (the notes write it as H too).

Presets are a public interface (DESIGN.md):

    notes                     the notes' Transformer: sinusoidal positions, ReLU FFN, post-LN
                              "Add & Norm", tied head, token embeddings scaled by √H
    nanogpt-shakespeare-char  nanoGPT's CPU recipe: GPT-2 style (learned positions, GELU, pre-LN),
                              4 layers, 4 heads, 128 wide, block 64
    gpt2                      GPT-2 124M, loadable from and exportable to Hugging Face's layout
    llama-tiny                Llama style: RoPE, SwiGLU, RMSNorm, pre-norm, untied, grouped KV heads
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from llmlab.errors import ConfigError

Positions = Literal["sinusoidal", "learned", "rope"]
Activation = Literal["relu", "gelu", "gelu_tanh", "swiglu"]
Norm = Literal["layernorm", "rmsnorm"]
NormPlacement = Literal["post", "pre"]
AttentionPath = Literal["sdpa", "explicit"]


MAX_SEED = 2**63 - 1  # what torch.manual_seed and numpy's SeedSequence both take
MAX_LAYERS = 10_000  # above it even counting the model's parameters name by name takes seconds


@dataclass(frozen=True)
class ModelConfig:
    """The shape and the variant of a decoder-only Transformer (notes §2.1)."""

    # --- sizes ---
    vocab_size: int = 256  # V
    block_size: int = 64  # S at most: the context length
    n_layers: int = 4  # L
    n_heads: int = 4  # h
    n_kv_heads: int | None = None  # heads of K and V; fewer than h = grouped-query attention
    d_model: int = 128  # H
    d_ff: int | None = None  # F; None means 4H

    # --- variants (each a name resolved by a small dict in model.py) ---
    positions: Positions = "sinusoidal"
    activation: Activation = "relu"
    norm: Norm = "layernorm"
    norm_placement: NormPlacement = "post"
    final_norm: bool = False  # pre-norm stacks need one; post-norm blocks already end in a norm
    tie_embeddings: bool = True  # output layer shares the embedding's Parameter (notes §2.1)
    bias: bool = True
    embed_scale: bool = True  # multiply token embeddings by √H (Vaswani et al. 2017, §3.4)
    attention: AttentionPath = "sdpa"  # same math; "explicit" spells out QKᵀ/√D + M, softmax, ·V

    # --- numerics and regularisation ---
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_base: float = 10000.0

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("vocab_size", "block_size", "n_layers", "n_heads", "d_model"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_layers > MAX_LAYERS:  # the deepest trained Transformer (DeepNet, 2022) has 1,000
            raise ConfigError(f"n_layers must be at most {MAX_LAYERS:,}, got {self.n_layers:,}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.d_ff is not None and self.d_ff < 1:
            raise ConfigError(f"d_ff must be at least 1, got {self.d_ff}")
        if self.positions == "rope" and self.d_head % 2:
            raise ConfigError(f"RoPE needs an even head width, got d_head={self.d_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps must be positive, got {self.norm_eps}")
        if self.rope_base <= 1:
            raise ConfigError(f"rope_base must be above 1, got {self.rope_base}")

    @property
    def d_head(self) -> int:
        """D = H / h, the width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ff_width(self) -> int:
        """F, the FFN's hidden width."""
        return self.d_ff or 4 * self.d_model

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        return replace(preset(name).model, **overrides)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: tokenizer, batch, optimiser, schedule, evaluation, device."""

    # --- data and tokenizer ---
    tokenizer: Literal["char", "bpe"] = "char"
    bpe_vocab: int = 2048  # vocabulary size of a BPE tokenizer trained on the data
    val_fraction: float = 0.1  # the last 10% of tokens, as nanoGPT splits

    # --- batch and length of the run ---
    batch_size: int = 12  # B per process and micro-step
    grad_accum: int = 1
    max_steps: int = 2000
    max_minutes: float | None = None  # stop early; the LR schedule then follows the clock

    # --- AdamW, warmup + cosine decay (nanoGPT's recipe) ---
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping

    # --- evaluation and checkpoints ---
    eval_interval: int = 250
    eval_iters: int = 20

    # --- machine ---
    dtype: Literal["float32", "bfloat16"] = "float32"  # bfloat16 = autocast
    compile: bool = False
    device: str = "auto"  # auto picks cuda, then mps, then cpu
    seed: int = 1337

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_iters < 1:
            raise ConfigError(f"eval_iters must be at least 1, got {self.eval_iters}")
        if self.bpe_vocab < 257:
            raise ConfigError(f"bpe_vocab must be at least 257 (the 256 bytes and one merge), got {self.bpe_vocab}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("warmup_steps, weight_decay and grad_clip must not be negative")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ConfigError(f"max_minutes must be positive, got {self.max_minutes}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be from 0 to 2**63 - 1, got {self.seed}")


@dataclass(frozen=True)
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


# --- overrides: `--set name=value`, type-checked against the dataclass fields -------------------


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """`["n_layers=2", "lr=3e-4"]` → `{"n_layers": "2", "lr": "3e-4"}`."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--set expects name=value, got {pair!r}")
        out[name.strip()] = value.strip()
    return out


def apply_overrides(
    model: ModelConfig, train: TrainConfig, overrides: dict[str, Any]
) -> tuple[ModelConfig, TrainConfig]:
    """Route each override to the dataclass that has the field; strings are parsed by type."""
    known_model, known_train = set(field_names(ModelConfig)), set(field_names(TrainConfig))
    m_kw: dict[str, Any] = {}
    t_kw: dict[str, Any] = {}
    for name, value in overrides.items():
        if name in known_model:
            m_kw[name] = coerce(ModelConfig, name, value)
        elif name in known_train:
            t_kw[name] = coerce(TrainConfig, name, value)
        else:
            known = ", ".join(sorted(known_model | known_train))
            raise ConfigError(f"unknown config key {name!r} (known keys: {known})")
    return replace(model, **m_kw), replace(train, **t_kw)


def coerce(cls: type, name: str, value: Any) -> Any:
    """Parse `value` (a string from the command line, or a TOML/JSON value) as field `name`."""
    hint = typing.get_type_hints(cls)[name]
    try:
        return _coerce(hint, value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name}={value!r}: {e}") from None


def _coerce(hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # `int | None`
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(next(a for a in args if a is not type(None)), value)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"expected one of {', '.join(map(str, args))}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        return int(value) if not isinstance(value, str) else int(value, 10)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    if hint is str:
        return str(value)
    raise TypeError(f"unsupported field type {hint}")


def _check_types(obj: Any) -> None:
    """Reject values of the wrong type, so that a bad config.json fails here, not mid-training."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _is_instance(hints[f.name], value):
            raise ConfigError(f"{f.name}={value!r} has the wrong type (expected {hints[f.name]})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value}")


def _is_instance(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(a, value) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    return _override(cls(), data)


def load_toml(path: str | Path, base: Preset) -> Preset:
    """A TOML file with `[model]` and `[train]` tables, applied on top of `base`."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot parse {str(path)!r}: {e}") from None
    extra = set(data) - {"model", "train"}
    if extra:
        raise ConfigError(f"unknown table {sorted(extra)[0]!r} in {path} (expected [model], [train])")
    for name in ("model", "train"):
        if not isinstance(data.get(name, {}), dict):  # `model = 3`, or `[[model]]`, an array of tables
            raise ConfigError(f"{name} in {path} must be a table, [{name}], with name = value lines")
    return Preset(_override(base.model, data.get("model", {})), _override(base.train, data.get("train", {})))


def _override(cfg: Any, table: dict[str, Any]) -> Any:
    unknown = set(table) - set(field_names(type(cfg)))
    if unknown:
        raise ConfigError(f"unknown config key {sorted(unknown)[0]!r} in {type(cfg).__name__}")
    return replace(cfg, **{k: coerce(type(cfg), k, v) for k, v in table.items()})


# --- presets (names are a public interface) -----------------------------------------------

_GPT2_STYLE = dict(
    positions="learned", activation="gelu", norm_placement="pre", final_norm=True,
    embed_scale=False,
)  # fmt: skip

PRESETS: dict[str, Preset] = {
    "notes": Preset(ModelConfig()),
    "nanogpt-shakespeare-char": Preset(ModelConfig(**_GPT2_STYLE, bias=False)),
    "gpt2": Preset(
        ModelConfig(
            vocab_size=50257, block_size=1024, n_layers=12, n_heads=12, d_model=768,
            **{**_GPT2_STYLE, "activation": "gelu_tanh"},
        ),
        TrainConfig(tokenizer="bpe", bpe_vocab=50257, batch_size=8, lr=6e-4, min_lr=6e-5,
                    beta2=0.95, warmup_steps=200),
    ),
    "llama-tiny": Preset(
        ModelConfig(
            block_size=128, n_kv_heads=2, d_ff=352, positions="rope", activation="swiglu",
            norm="rmsnorm", norm_placement="pre", final_norm=True, tie_embeddings=False,
            bias=False, embed_scale=False, norm_eps=1e-6,
        ),
        TrainConfig(tokenizer="bpe"),
    ),
}  # fmt: skip


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})") from None
