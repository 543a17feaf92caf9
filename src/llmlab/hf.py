"""GPT-2 interop: the same weights in llmlab's layout and in Hugging Face's.

Hugging Face's GPT-2 stores its linear layers as `Conv1D`, whose weight is [in, out] (the
transpose of `nn.Linear`'s [out, in]); everything else maps one to one:

    transformer.wte.weight              [V, H]    embed.weight (and the tied unembed.weight)
    transformer.wpe.weight              [S, H]    pos_embed.weight
    transformer.h.{l}.ln_1.*            [H]       blocks.{l}.ln1.*
    transformer.h.{l}.attn.c_attn.*     [H, 3H]   blocks.{l}.attn.qkv.*   (transposed; Q, K, V in that order)
    transformer.h.{l}.attn.c_proj.*     [H, H]    blocks.{l}.attn.out.*   (transposed)
    transformer.h.{l}.ln_2.*            [H]       blocks.{l}.ln2.*
    transformer.h.{l}.mlp.c_fc.*        [H, F]    blocks.{l}.mlp.w1.*     (transposed)
    transformer.h.{l}.mlp.c_proj.*      [F, H]    blocks.{l}.mlp.w2.*     (transposed)
    transformer.ln_f.*                  [H]       ln_final.*

`transformers` is imported only by the functions that build or read its objects.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from llmlab.config import ModelConfig, preset
from llmlab.errors import UserError
from llmlab.model import GPT

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_BLOCK_KEYS = {
    "ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out",
    "mlp.c_fc": "mlp.w1", "mlp.c_proj": "mlp.w2",
}  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A GPT-2 `config.json` (as a dict) → the `gpt2` preset with its sizes."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"unsupported architecture {hf.get('model_type')!r} (llmlab imports GPT-2 models)")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise UserError(f"unsupported GPT-2 activation {act!r} (known: {', '.join(_ACTIVATIONS)})")
    return ModelConfig.from_name(
        "gpt2", vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layers=hf["n_layer"],
        n_heads=hf["n_head"], d_model=hf["n_embd"], d_ff=hf.get("n_inner"), activation=_ACTIVATIONS[act],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )  # fmt: skip


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The `GPT2Config` fields of a GPT-2-layout llmlab config; other layouts are an error."""
    gpt2 = preset("gpt2").model
    layout = (
        "positions",
        "norm",
        "norm_placement",
        "final_norm",
        "tie_embeddings",
        "bias",
        "embed_scale",
        "n_kv_heads",
    )
    different = [f for f in layout if getattr(cfg, f) != getattr(gpt2, f)]
    if different or cfg.activation not in ("gelu_tanh", "gelu", "relu"):
        name = different[0] if different else "activation"
        raise UserError(f"only GPT-2-layout models export to Hugging Face; this one differs in {name}")
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
    return dict(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.d_ff, activation_function=act, layer_norm_epsilon=cfg.norm_eps,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, tie_word_embeddings=True,
    )  # fmt: skip


def state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Hugging Face GPT-2 tensors → llmlab's, checking that every expected tensor is there."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    out = {"embed.weight": sd.get("wte.weight"), "pos_embed.weight": sd.get("wpe.weight")}
    out |= {f"ln_final.{p}": sd.get(f"ln_f.{p}") for p in ("weight", "bias")}
    for layer in range(cfg.n_layers):
        for hf_name, ours in _BLOCK_KEYS.items():
            for p in ("weight", "bias"):
                t = sd.get(f"h.{layer}.{hf_name}.{p}")
                conv = f"{hf_name}.{p}" in _CONV1D
                out[f"blocks.{layer}.{ours}.{p}"] = t.t().contiguous() if conv and t is not None else t
    missing = [k for k, v in out.items() if v is None]
    if missing:
        raise UserError(f"the checkpoint lacks tensors for {missing[0]!r} (and {len(missing) - 1} more)")
    out["unembed.weight"] = out["embed.weight"]
    return out


def state_dict_to_hf(model: GPT) -> dict[str, Tensor]:
    """llmlab GPT-2-layout weights → Hugging Face `GPT2LMHeadModel` keys."""
    config_to_hf(model.cfg)  # raises for other layouts
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"]}
    out |= {f"transformer.ln_f.{p}": sd[f"ln_final.{p}"] for p in ("weight", "bias")}
    for layer in range(model.cfg.n_layers):
        for hf_name, ours in _BLOCK_KEYS.items():
            for p in ("weight", "bias"):
                t = sd[f"blocks.{layer}.{ours}.{p}"]
                conv = f"{hf_name}.{p}" in _CONV1D
                out[f"transformer.h.{layer}.{hf_name}.{p}"] = t.t().contiguous() if conv else t
    out["lm_head.weight"] = sd["embed.weight"]
    return out


def from_hf_model(hf_model: Any) -> GPT:
    """A `transformers.GPT2LMHeadModel` (in memory) → an llmlab `GPT` with the same weights."""
    cfg = config_from_hf(hf_model.config.to_dict())
    model = GPT(cfg)
    shapes_ok = _load(model, state_dict_from_hf(hf_model.state_dict(), cfg))
    if not shapes_ok:
        raise UserError("the checkpoint's tensor shapes do not match its config")
    return model.eval()


def to_hf_model(model: GPT) -> Any:
    """An llmlab GPT-2-layout `GPT` → a `transformers.GPT2LMHeadModel` with the same weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(model.cfg)))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model), strict=False)
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]  # buffers, not weights
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 key map out of date: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def _load(model: GPT, sd: dict[str, Tensor]) -> bool:
    expected = model.state_dict()
    if any(sd[k].shape != v.shape for k, v in expected.items()):
        return False
    model.load_state_dict(sd)
    return True
