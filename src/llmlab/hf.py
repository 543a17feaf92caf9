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
    lm_head.weight                      [V, H]    unembed.weight          (only when untied: tie_word_embeddings=false)

GPT-2's attention options that change the function (`scale_attn_weights=false`,
`scale_attn_by_inverse_layer_idx=true`) have no llmlab equivalent: importing one is an error.

`import_hf` / `export_hf` move whole checkpoint directories (`llmlab import-hf`, `export-hf`).
`transformers` is imported only by the functions that build its objects.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from llmlab.config import ModelConfig, TrainConfig, preset
from llmlab.errors import UserError, reason
from llmlab.model import GPT
from llmlab.run_dir import (
    DIR_MODE,
    Run,
    atomic_write,
    check_makeable,
    check_weights,
    config_json,
    save_weights,
    write_json,
    write_text,
)
from llmlab.tokenizer import BPETokenizer, Tokenizer

_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers, which older checkpoints save
_ATTENTION_SCALING = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}  # GPT-2's values
_BLOCK_KEYS = {
    "ln_1": "ln1", "ln_2": "ln2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.out",
    "mlp.c_fc": "mlp.w1", "mlp.c_proj": "mlp.w2",
}  # fmt: skip


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A GPT-2 `config.json` (as a dict) → the `gpt2` preset with its sizes. It must say it is
    GPT-2: `model_type` "gpt2", and any `architectures` GPT-2's classes (a config naming neither
    is refused, as transformers' AutoConfig refuses one without a model_type)."""
    model_type = _get(hf, "model_type", str, None)
    architectures = _get(hf, "architectures", list, None) or []
    other = [a for a in architectures if not (isinstance(a, str) and a.startswith("GPT2"))]
    if model_type not in ("gpt2", None) or other:
        found = model_type if model_type not in ("gpt2", None) else other[0]
        raise UserError(f"unsupported architecture {found!r} (llmlab imports GPT-2 models)")
    if model_type is None and not architectures:
        raise UserError('config.json names no model_type (a GPT-2 config has "model_type": "gpt2")')
    act = _get(hf, "activation_function", str, "gelu_new")
    if act not in _ACTIVATIONS:
        raise UserError(f"unsupported GPT-2 activation {act!r} (known: {', '.join(_ACTIVATIONS)})")
    for option, gpt2 in _ATTENTION_SCALING.items():  # they change the function, so importing without them is wrong
        if _get(hf, option, bool, gpt2) != gpt2:
            raise UserError(f"unsupported GPT-2 option {option}={json.dumps(hf[option])} (llmlab's attention "
                            f"divides the scores by √D in every layer: {option}={json.dumps(gpt2)})")  # fmt: skip
    return ModelConfig.from_name(
        "gpt2", vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layers=hf["n_layer"],
        n_heads=hf["n_head"], d_model=hf["n_embd"], d_ff=_get(hf, "n_inner", int, None),
        activation=_ACTIVATIONS[act], norm_eps=_get(hf, "layer_norm_epsilon", float, 1e-5),
        tie_embeddings=_get(hf, "tie_word_embeddings", bool, True),
    )  # fmt: skip


def _get(hf: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    """config.json's `key`, which must be JSON of `kind` (or null where the default is null): a
    string "false" is no false, and a list is no activation's name."""
    value = hf.get(key, default)
    if value is None and default is None:
        return None
    plain = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))  # true is no number
    if not (plain or (kind is float and isinstance(value, int) and not isinstance(value, bool))):
        names = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list"}
        raise UserError(f"config.json's {key} must be {names[kind]}, got {json.dumps(value)}")
    return value


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The `GPT2Config` fields of a GPT-2-layout llmlab config; other layouts are an error. A
    bias-free model (nanoGPT's `bias=False`) is GPT-2 with zero biases: it exports as such."""
    gpt2 = preset("gpt2").model
    layout = (
        "positions",
        "norm",
        "norm_placement",
        "final_norm",
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
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings,
        # GPT-2's <|endoftext|> is id 50256; a vocabulary of our own has no such token
        bos_token_id=50256 if cfg.vocab_size > 50256 else None, eos_token_id=50256 if cfg.vocab_size > 50256 else None,
    )  # fmt: skip


def state_dict_from_hf(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Hugging Face GPT-2 tensors → llmlab's, checking that every expected tensor is there."""
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    used = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"}
    used |= {f"h.{i}.{name}.{p}" for i in range(cfg.n_layers) for name in _BLOCK_KEYS for p in ("weight", "bias")}
    unknown = sorted(k for k in sd if k not in used and not k.endswith(MASK_BUFFERS))
    if unknown:
        raise UserError(f"the checkpoint holds a tensor {unknown[0]!r} that GPT-2 with n_layer={cfg.n_layers} "
                        f"does not have ({len(unknown)} in all)")  # fmt: skip
    out = {"embed.weight": sd.get("wte.weight"), "pos_embed.weight": sd.get("wpe.weight")}
    out |= {f"ln_final.{p}": sd.get(f"ln_f.{p}") for p in ("weight", "bias")}
    for layer in range(cfg.n_layers):
        for hf_name, ours in _BLOCK_KEYS.items():
            for p in ("weight", "bias"):
                t = sd.get(f"h.{layer}.{hf_name}.{p}")
                conv = f"{hf_name}.{p}" in _CONV1D
                out[f"blocks.{layer}.{ours}.{p}"] = t.t().contiguous() if conv and t is not None else t
    # tied (GPT-2's default): the output layer is the embedding, and a saved lm_head.weight is its copy
    out["unembed.weight"] = out["embed.weight"] if cfg.tie_embeddings else sd.get("lm_head.weight")
    head, wte = sd.get("lm_head.weight"), sd.get("wte.weight")
    if cfg.tie_embeddings and head is not None and wte is not None and head.shape != wte.shape:
        raise UserError(f"lm_head.weight has shape {tuple(head.shape)}, but the config ties it to wte, "
                        f"{tuple(wte.shape)}")  # fmt: skip
    missing = [k for k, v in out.items() if v is None]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"the checkpoint lacks the tensor for {missing[0]!r}{more}")
    return out


def state_dict_to_hf(model: GPT) -> dict[str, Tensor]:
    """llmlab GPT-2-layout weights → Hugging Face `GPT2LMHeadModel` keys."""
    config_to_hf(model.cfg)  # raises for other layouts
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["embed.weight"], "transformer.wpe.weight": sd["pos_embed.weight"]}
    out |= {f"transformer.ln_f.{p}": _bias_or_zeros(sd, f"ln_final.{p}") for p in ("weight", "bias")}
    for layer in range(model.cfg.n_layers):
        for hf_name, ours in _BLOCK_KEYS.items():
            for p in ("weight", "bias"):
                t = _bias_or_zeros(sd, f"blocks.{layer}.{ours}.{p}")
                conv = f"{hf_name}.{p}" in _CONV1D
                out[f"transformer.h.{layer}.{hf_name}.{p}"] = t.t().contiguous() if conv else t
    out["lm_head.weight"] = sd["unembed.weight"]  # with tied embeddings, the same tensor as wte
    return out


def _bias_or_zeros(sd: dict[str, Tensor], name: str) -> Tensor:
    """sd[name], or for the missing bias of a bias-free model zeros [out] (the same function)."""
    if name in sd or not name.endswith(".bias"):
        return sd[name]
    weight = sd[name.removesuffix(".bias") + ".weight"]  # [out, in] (Linear) or [H] (LayerNorm)
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


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
    missing = [k for k in missing if not k.endswith(MASK_BUFFERS)]  # buffers, not weights
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 key map out of date: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def _load(model: GPT, sd: dict[str, Tensor]) -> bool:
    expected = model.state_dict()
    if any(sd[k].shape != v.shape for k, v in expected.items()):
        return False
    model.load_state_dict(sd)
    return True


# --- checkpoint directories -------------------------------------------------------------------


def read_hf_dir(path: str | Path) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """A local Hugging Face GPT-2 checkpoint directory → (config, llmlab tensors, tokenizer).

    Weights from `model.safetensors` (or shards listed in `model.safetensors.index.json`), else
    `pytorch_model.bin` read with `weights_only=True`; the tokenizer from `tokenizer.json`, else
    `vocab.json` + `merges.txt`. Nothing here executes code from the directory.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory")
    try:
        hf_cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} has no config.json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(hf_cfg, dict):
        raise UserError(f"{path / 'config.json'} holds no JSON object")
    lacking = [k for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd") if k not in hf_cfg]
    if lacking:
        raise UserError(f"{path / 'config.json'} lacks {lacking[0]!r}, which a GPT-2 config has")
    cfg = config_from_hf(hf_cfg)
    sd = state_dict_from_hf(_read_weights(path), cfg)
    expected = {k: v.shape for k, v in GPT(cfg).to("meta").state_dict().items()}
    for k, shape in expected.items():
        if sd[k].shape != shape:
            raise UserError(f"{k} has shape {tuple(sd[k].shape)} in the checkpoint but {tuple(shape)} in its config")
    tokenizer = _read_tokenizer(path)
    check_weights(f"the checkpoint in {path}", sd, tokenizer, cfg.vocab_size)
    return cfg, sd, tokenizer


def _read_weights(path: Path) -> dict[str, Tensor]:
    """{name: tensor}, every tensor of a float dtype (an integer embedding would import as garbage)."""
    sd = _read_weight_files(path)
    if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items())):
        raise UserError(f"the weights in {path} are not a dictionary of named tensors")
    for name, tensor in sd.items():
        if not tensor.is_floating_point() and not name.endswith(MASK_BUFFERS):
            raise UserError(f"the checkpoint's tensor {name!r} holds {tensor.dtype}, not floating-point weights")
    return sd


def _read_weight_files(path: Path) -> Any:
    """The tensors of `model.safetensors`, of the shards an index lists (each inside `path`), or of
    `pytorch_model.bin`, in that order of preference."""
    file = path / "model.safetensors"  # the file being read, for the error message
    try:
        if file.is_file():
            return load_file(file)
        if (path / "model.safetensors.index.json").is_file():
            file = path / "model.safetensors.index.json"
            index = json.loads(file.read_text(encoding="utf-8"))
            if not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)):
                raise UserError(f'{file} holds no "weight_map" object')
            sd: dict[str, Tensor] = {}
            for shard in sorted({str(s) for s in index["weight_map"].values()}):
                # a name inside DIR, which may be a link: the Hub's cache links each file to its blobs/
                if Path(shard).is_absolute() or ".." in Path(shard).parts:
                    raise UserError(f"{path / 'model.safetensors.index.json'} lists a shard outside {path}: {shard!r}")
                file = path / shard
                sd |= load_file(file)
            return sd
        file = path / "pytorch_model.bin"
        if file.is_file():
            with warnings.catch_warnings():  # torch warns about old pickle protocols before refusing or reading
                warnings.simplefilter("ignore")
                return torch.load(file, weights_only=True, map_location="cpu")
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        # a cut-off file: torch.load fails with EOFError, EINVAL or a zip without its central
        # directory, safetensors with a header longer than the file
        cut = (isinstance(e, EOFError) or (isinstance(e, OSError) and e.errno == errno.EINVAL)
               or any(m in str(e) for m in CUT_OFF))  # fmt: skip
        truncated = ", which looks truncated or corrupt" if cut else ""
        raise UserError(f"cannot read the weights in {file}{truncated} ({reason(e)})") from None
    raise UserError(f"{path} has no model.safetensors or pytorch_model.bin")


CUT_OFF = ("failed reading zip archive", "file not fully covered", "header too small")  # torch's, safetensors' words


def _read_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    try:
        if (path / "tokenizer.json").is_file():
            return BPETokenizer(HFTokenizer.from_file(str(path / "tokenizer.json")))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            return BPETokenizer(tok)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"cannot read the tokenizer in {path} ({reason(e)})") from None
    raise UserError(f"{path} has no tokenizer.json (or vocab.json and merges.txt)")


def check_import_out(out: str | Path) -> Path:
    """`out` as a Path, if an import can write it there: it must not exist, and its parent must be makeable."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out")
    check_makeable(out)
    return out


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Write a run directory for a Hugging Face GPT-2 checkpoint. `out` must not exist; it is
    filled in a temporary folder and renamed at the end, so a failure leaves nothing behind."""
    out = check_import_out(out)
    cfg, sd, tokenizer = read_hf_dir(src)
    model = GPT(cfg)
    model.load_state_dict(sd)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".importing"))  # a name of its own
    try:
        tmp.chmod(DIR_MODE)  # mkdtemp makes 0700; a run directory is as mkdir makes it
        save_weights(tmp / "model.safetensors", model)
        write_text(tmp / "tokenizer.json", tokenizer.to_json())
        train_cfg = TrainConfig(tokenizer="bpe", bpe_vocab=max(257, tokenizer.vocab_size))
        write_json(tmp / "config.json", config_json(cfg, train_cfg, source=f"hf:{Path(src).resolve()}"))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_hf(run: Run, out: str | Path) -> list[str]:
    """Write `run` as a directory that `GPT2LMHeadModel.from_pretrained(out)` loads. Returns the
    files written. A character tokenizer has no GPT-2 equivalent and is not exported."""
    from transformers import GPT2Config

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory; choose another --out")
    check_makeable(out)
    hf_cfg = GPT2Config(**config_to_hf(run.model_cfg)).to_dict() | {"architectures": ["GPT2LMHeadModel"]}
    tied = run.model_cfg.tie_embeddings  # then lm_head.weight is wte's: transformers ties it on loading
    sd = {k: v.contiguous() for k, v in state_dict_to_hf(run.model).items() if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", hf_cfg)
    atomic_write(out / "model.safetensors", lambda tmp: save_file(sd, str(tmp), metadata={"format": "pt"}))
    written = ["config.json", "model.safetensors"]
    if run.tokenizer.kind == "bpe":
        write_text(out / "tokenizer.json", run.tokenizer.to_json())
        written.append("tokenizer.json")
    return written
