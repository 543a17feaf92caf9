"""GPT-2 interop: llmlab's `gpt2` layout against Hugging Face transformers on the same weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llmlab.config import ModelConfig
from llmlab.errors import UserError
from llmlab.hf import config_from_hf, from_hf_model, to_hf_model
from llmlab.model import GPT

SMALL = dict(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**SMALL)).eval()  # random weights: nothing is downloaded


def test_imported_gpt2_gives_transformers_logits(hf_model):
    """Reference: transformers.GPT2LMHeadModel's own forward, fp32, within 1e-4."""
    ours = from_hf_model(hf_model)
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(idx).logits
    torch.testing.assert_close(ours(idx), ref, rtol=1e-4, atol=1e-4)
    assert ours.unembed.weight is ours.embed.weight


def test_export_round_trips_through_transformers(hf_model):
    torch.manual_seed(2)
    model = GPT(config_from_hf(hf_model.config.to_dict())).eval()
    exported = to_hf_model(model)
    idx = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, model(idx), rtol=1e-4, atol=1e-4)


def test_a_bias_free_model_exports_as_gpt2_with_zero_biases():
    """nanoGPT's bias=False layout (the nanogpt-shakespeare-char preset): transformers' logits on the
    exported weights equal ours within 1e-4, and every exported bias is zero."""
    from dataclasses import replace

    from llmlab.config import preset

    torch.manual_seed(3)
    cfg = replace(preset("nanogpt-shakespeare-char").model, vocab_size=65, n_layers=2, d_model=48, block_size=32)
    assert cfg.bias is False
    model = GPT(cfg).eval()
    exported = to_hf_model(model)
    idx = torch.randint(0, 65, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
    biases = [t for k, t in exported.state_dict().items() if k.endswith(".bias") and ".attn.bias" not in k]
    assert biases and all(not t.any() for t in biases)


def test_an_untied_gpt2_imports_and_exports_with_its_own_output_layer(tmp_path):
    """Reference: transformers' forward of a GPT2Config(tie_word_embeddings=False) model, whose
    lm_head differs from wte; then GPT2LMHeadModel.from_pretrained on `export-hf`'s directory."""
    from llmlab.hf import export_hf, import_hf
    from llmlab.run_dir import load_run

    torch.manual_seed(4)
    hf = GPT2LMHeadModel(GPT2Config(**SMALL, tie_word_embeddings=False)).eval()
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    ours = from_hf_model(hf)
    assert ours.cfg.tie_embeddings is False and ours.unembed.weight is not ours.embed.weight
    idx = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)
    save_hf_checkpoint(hf, tmp_path / "ckpt")
    import_hf(tmp_path / "ckpt", tmp_path / "run")
    export_hf(load_run(tmp_path / "run"), tmp_path / "out")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert again.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, rtol=1e-5, atol=1e-5)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(UserError, match="lacks the tensor for 'unembed.weight'"):
        from llmlab.hf import state_dict_from_hf

        state_dict_from_hf(sd, ours.cfg)


@pytest.mark.parametrize("option", [{"scale_attn_weights": False}, {"scale_attn_by_inverse_layer_idx": True}])
def test_attention_scalings_llmlab_does_not_have_are_refused(hf_model, option):
    """Each changes transformers' logits (checked here: by more than ten times the 1e-4 the import
    is held to), so importing without it would be wrong."""
    torch.manual_seed(0)
    other = GPT2LMHeadModel(GPT2Config(**SMALL, **option)).eval()
    other.load_state_dict(hf_model.state_dict())
    idx = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert (other(idx).logits - hf_model(idx).logits).abs().max() > 1e-3
    with pytest.raises(UserError, match=f"unsupported GPT-2 option {next(iter(option))}="):
        from_hf_model(other)


def test_only_gpt2_layout_models_export():
    with pytest.raises(UserError, match="only GPT-2-layout models export"):
        to_hf_model(GPT(ModelConfig(vocab_size=32, n_layers=1, d_model=32)))


def test_unknown_architectures_and_missing_tensors_are_errors(hf_model):
    with pytest.raises(UserError, match="unsupported architecture 'llama'"):
        config_from_hf({**hf_model.config.to_dict(), "model_type": "llama"})
    from llmlab.hf import state_dict_from_hf

    sd = {k: v for k, v in hf_model.state_dict().items() if "h.1.mlp" not in k}
    with pytest.raises(UserError, match=r"lacks the tensor for 'blocks.1.mlp.w1.weight' \(and 3 more\)"):
        state_dict_from_hf(sd, config_from_hf(hf_model.config.to_dict()))


def save_hf_checkpoint(hf_model, path, weights="safetensors", tokenizer="tokenizer.json"):
    """A checkpoint as `save_pretrained` writes it, plus a byte-level BPE tokenizer.

    weights: "safetensors" (one model.safetensors), "shards" (`save_pretrained`'s
    model-0000k-of-0000n.safetensors and their index), or "bin" (pytorch_model.bin, the pickle
    transformers wrote before safetensors: transformers 5 writes safetensors whatever it is told,
    so the state dict is saved with torch.save). tokenizer: "tokenizer.json", or "vocab+merges"
    (GPT-2's original vocab.json and merges.txt)."""
    from llmlab.tokenizer import BPETokenizer

    hf_model.save_pretrained(path, max_shard_size="100KB" if weights == "shards" else "5GB")
    if weights == "bin":
        (path / "model.safetensors").unlink()
        torch.save(hf_model.state_dict(), path / "pytorch_model.bin")
    assert (weights == "shards") == (path / "model.safetensors.index.json").is_file()
    tok = BPETokenizer.train("def f(x):\n    return x + 1\n" * 20, vocab_size=300)
    if tokenizer == "tokenizer.json":
        (path / "tokenizer.json").write_text(tok.to_json())
    else:
        assert sorted(tok.tok.model.save(str(path))) == [str(path / "merges.txt"), str(path / "vocab.json")]
    return tok


@pytest.mark.parametrize(("weights", "tokenizer"), [("safetensors", "tokenizer.json"), ("shards", "tokenizer.json"),
                                                    ("bin", "vocab+merges")])  # fmt: skip
def test_import_hf_directory_gives_a_run_with_transformers_logits(tmp_path, hf_model, weights, tokenizer):
    """Reference: transformers' forward on the same weights, and the tokenizer that was saved."""
    from llmlab.hf import import_hf
    from llmlab.run_dir import load_run

    tok = save_hf_checkpoint(hf_model, tmp_path / "ckpt", weights, tokenizer)
    if weights == "shards":  # laid out as the Hub's cache is: each file a link into blobs/
        shards = sorted((tmp_path / "ckpt").glob("model-*-of-*.safetensors"))
        assert len(shards) > 1
        (tmp_path / "blobs").mkdir()
        for shard in shards:
            shard.rename(tmp_path / "blobs" / shard.name)
            shard.symlink_to(f"../blobs/{shard.name}")
    import_hf(tmp_path / "ckpt", tmp_path / "run")
    run = load_run(tmp_path / "run")
    idx = torch.tensor([tok.encode("def f(x):")])
    with torch.no_grad():
        torch.testing.assert_close(run.model(idx), hf_model(idx).logits, rtol=1e-4, atol=1e-4)
    text = "def f(x):\n    return x + 1 ünïcode"
    assert run.tokenizer.encode(text) == tok.encode(text) and run.tokenizer.decode(tok.encode(text)) == text


def test_export_hf_loads_with_from_pretrained(tmp_path, hf_model, capsys):
    """Reference: GPT2LMHeadModel.from_pretrained on what `llmlab export-hf` wrote."""
    from llmlab.cli import main
    from llmlab.hf import import_hf

    save_hf_checkpoint(hf_model, tmp_path / "ckpt")
    import_hf(tmp_path / "ckpt", tmp_path / "run")
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["config.json", "model.safetensors", "tokenizer.json"]
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf_model(idx).logits, rtol=1e-5, atol=1e-5)


def test_export_hf_refuses_a_taken_out_and_writes_nothing(tmp_path, hf_model, capsys):
    from llmlab.cli import main
    from llmlab.hf import import_hf

    save_hf_checkpoint(hf_model, tmp_path / "ckpt")
    import_hf(tmp_path / "ckpt", tmp_path / "run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    (tmp_path / "a_file").write_text("keep")
    capsys.readouterr()
    for out in ("full", "a_file"):
        assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "exists and is not an empty directory; choose another --out" in err, err
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["mine.txt"]
    assert (tmp_path / "a_file").read_text() == "keep"
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "empty")]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.json"]  # fmt: skip


def test_a_character_tokenizer_stays_behind_with_a_note(tmp_path, hf_model, capsys):
    from llmlab.cli import main
    from llmlab.hf import import_hf
    from llmlab.tokenizer import train_tokenizer

    save_hf_checkpoint(hf_model, tmp_path / "ckpt")
    import_hf(tmp_path / "ckpt", tmp_path / "run")
    chars = "".join(chr(0x100 + i) for i in range(hf_model.config.vocab_size))  # a character per row, as training makes
    (tmp_path / "run" / "tokenizer.json").write_text(train_tokenizer("char", chars, 0).to_json())
    capsys.readouterr()
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert out == f"wrote config.json, model.safetensors to {tmp_path / 'out'}\n"
    assert "character tokenizer has no GPT-2 equivalent and was not exported" in err


def test_a_failed_hub_download_is_one_line_with_its_reason(tmp_path, monkeypatch, capsys):
    """No network here: the Hub client's own error is stood in for, as it reads offline."""
    import huggingface_hub

    from llmlab.cli import main

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot reach the Hub: no network.\nMore detail.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["import-hf", "--hub", "gpt2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == ("llmlab: error: cannot download 'gpt2' from the Hugging Face Hub (LocalEntryNotFoundError: "
                   "Cannot reach the Hub: no network.)\n")  # fmt: skip
    assert not (tmp_path / "r").exists() and len(calls) == 1
    (tmp_path / "taken").mkdir()
    assert main(["import-hf", "--hub", "gpt2", "--out", str(tmp_path / "taken")]) == 2
    assert "taken already exists; choose another --out" in capsys.readouterr().err
    assert len(calls) == 1  # refused before downloading anything


def test_a_long_reason_is_cut_with_an_ellipsis():
    from llmlab.errors import reason

    long = RuntimeError("x" * 300 + "\nsecond line")
    assert reason(long) == "RuntimeError: " + "x" * 239 + "…"
    assert reason(OSError("\x1b[1mbold\x1b[0m reason\nmore")) == "OSError: bold reason"


def test_bad_checkpoint_directories_are_one_line_errors_and_write_nothing(tmp_path, hf_model, capsys):
    from safetensors.torch import load_file, save_file

    from llmlab.cli import main

    save_hf_checkpoint(hf_model, tmp_path / "good")
    cases = {}
    for name in ("no_weights", "no_config", "llama", "bad_shape", "no_tokenizer", "not_object", "no_vocab",
                 "garbage_bin", "stray_tensor", "nan_weights", "tensor_bin", "index_list", "int_weights", "act_list",
                 "tie_string", "eps_bool", "head_shape", "no_model_type", "llama_class", "shard_outside",
                 "truncated_bin", "cut_bin", "cut_safetensors", "absolute_shard"):  # fmt: skip
        shutil.copytree(tmp_path / "good", tmp_path / name)
        cases[name] = tmp_path / name
    (cases["no_weights"] / "model.safetensors").unlink()
    (cases["no_config"] / "config.json").unlink()
    (cases["no_tokenizer"] / "tokenizer.json").unlink()
    cfg = json.loads((tmp_path / "good" / "config.json").read_text())
    (cases["llama"] / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    (cases["bad_shape"] / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    (cases["not_object"] / "config.json").write_text("[]")
    (cases["no_vocab"] / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "vocab_size"}))
    (cases["garbage_bin"] / "model.safetensors").unlink()
    (cases["garbage_bin"] / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    stray = load_file(cases["stray_tensor"] / "model.safetensors") | {"transformer.h.5.foo": torch.zeros(2)}
    save_file(stray, cases["stray_tensor"] / "model.safetensors")
    nan_file = cases["nan_weights"] / "model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(nan_file).items()}, nan_file)
    (cases["tensor_bin"] / "model.safetensors").unlink()
    torch.save(torch.zeros(3), cases["tensor_bin"] / "pytorch_model.bin")  # a pickle, but of one tensor
    (cases["index_list"] / "model.safetensors").unlink()
    (cases["index_list"] / "model.safetensors.index.json").write_text("[1]")
    (cases["act_list"] / "config.json").write_text(json.dumps({**cfg, "activation_function": ["gelu"]}))
    (cases["tie_string"] / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": "false"}))
    (cases["eps_bool"] / "config.json").write_text(json.dumps({**cfg, "layer_norm_epsilon": True}))
    head = cases["head_shape"] / "model.safetensors"  # tied, with a saved lm_head.weight that cannot be wte's copy
    save_file(load_file(head) | {"lm_head.weight": torch.zeros(3, SMALL["n_embd"])}, head)
    unnamed = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}  # neither says GPT-2
    (cases["no_model_type"] / "config.json").write_text(json.dumps(unnamed))
    (cases["llama_class"] / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    (cases["shard_outside"] / "model.safetensors").unlink()  # an index whose shard lies in another checkpoint
    index = {"weight_map": {"transformer.wte.weight": "../good/model.safetensors"}}
    (cases["shard_outside"] / "model.safetensors.index.json").write_text(json.dumps(index))
    (cases["absolute_shard"] / "model.safetensors").unlink()
    index = {"weight_map": {"transformer.wte.weight": str(tmp_path / "good" / "model.safetensors")}}
    (cases["absolute_shard"] / "model.safetensors.index.json").write_text(json.dumps(index))
    cut = cases["cut_safetensors"] / "model.safetensors"  # an interrupted download
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (cases["truncated_bin"] / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), tmp_path / "whole.bin")
    whole = (tmp_path / "whole.bin").read_bytes()
    (cases["truncated_bin"] / "pytorch_model.bin").write_bytes(whole[: len(whole) // 50])  # cut in its data: EINVAL
    (cases["cut_bin"] / "model.safetensors").unlink()
    (cases["cut_bin"] / "pytorch_model.bin").write_bytes(whole[: len(whole) * 9 // 10])  # no zip directory
    ints = cases["int_weights"] / "model.safetensors"
    save_file({k: v.long() if "wte" in k else v for k, v in load_file(ints).items()}, ints)
    torch.manual_seed(0)
    small = GPT2Config(**{**SMALL, "vocab_size": 100}, bos_token_id=None, eos_token_id=None)
    tok = save_hf_checkpoint(GPT2LMHeadModel(small), tmp_path / "big_tokenizer")
    cases["big_tokenizer"] = tmp_path / "big_tokenizer"  # a 100-token model with a larger tokenizer
    capsys.readouterr()  # drop transformers' progress bars
    expected = {
        "no_weights": "has no model.safetensors or pytorch_model.bin", "no_config": "has no config.json",
        "llama": "unsupported architecture 'llama'", "bad_shape": "has shape (300, 48) in the checkpoint but (300, 64)",
        "no_tokenizer": "has no tokenizer.json", "not_object": "config.json holds no JSON object",
        "no_vocab": "lacks 'vocab_size'", "garbage_bin": "cannot read the weights",
        "stray_tensor": "holds a tensor 'h.5.foo' that GPT-2 with n_layer=2 does not have",
        "nan_weights": "is corrupt: 'embed.weight' holds NaN or infinite values",
        "big_tokenizer": f"the tokenizer has {tok.vocab_size} tokens but the model only 100",
        "tensor_bin": "are not a dictionary of named tensors",
        "index_list": 'model.safetensors.index.json holds no "weight_map" object',
        "int_weights": "tensor 'transformer.wte.weight' holds torch.int64, not floating-point weights",
        "act_list": 'config.json\'s activation_function must be a string, got ["gelu"]',
        "tie_string": 'config.json\'s tie_word_embeddings must be true or false, got "false"',
        "eps_bool": "config.json's layer_norm_epsilon must be a number, got true",
        "head_shape": f"lm_head.weight has shape (3, {SMALL['n_embd']}), but the config ties it to wte",
        "no_model_type": 'config.json names no model_type (a GPT-2 config has "model_type": "gpt2")',
        "llama_class": "unsupported architecture 'LlamaForCausalLM'",
        "shard_outside": "lists a shard outside",
        "absolute_shard": "lists a shard outside",
        "cut_safetensors": "model.safetensors, which looks truncated or corrupt (SafetensorError: ",
        "truncated_bin": "pytorch_model.bin, which looks truncated or corrupt (OSError: [Errno 22] Invalid argument)",
        "cut_bin": "pytorch_model.bin, which looks truncated or corrupt (RuntimeError: PytorchStreamReader failed",
    }  # fmt: skip
    for name, message in expected.items():
        out = tmp_path / f"out_{name}"
        assert main(["import-hf", str(cases[name]), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (name, err)
        assert not out.exists() and not any(p.name.startswith(f".out_{name}") for p in tmp_path.iterdir())
    numpy_bin = tmp_path / "numpy_bin"  # weights_only refuses a numpy array, in a message bolded with ANSI codes
    shutil.copytree(tmp_path / "good", numpy_bin)
    (numpy_bin / "model.safetensors").unlink()
    import numpy as np

    torch.save({"wte": np.zeros(3)}, numpy_bin / "pytorch_model.bin")
    assert main(["import-hf", str(numpy_bin), "--out", str(tmp_path / "out_numpy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the weights" in err and "\x1b" not in err, err
    (tmp_path / "a_file").write_text("x")
    assert main(["import-hf", str(cases["no_weights"].parent / "good"), "--out", str(tmp_path / "a_file" / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a_file is a file, so" in err and ".importing" not in err, err


def test_a_hugging_face_directory_given_as_a_run_says_to_import_it(tmp_path, hf_model, capsys):
    from llmlab.cli import main

    save_hf_checkpoint(hf_model, tmp_path / "ckpt")
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "ckpt"), "--prompt", "def"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a Hugging Face checkpoint, not an llmlab run; `llmlab import-hf" in err


def test_import_hf_builds_in_a_folder_of_its_own(tmp_path, hf_model):
    """The run is assembled in a fresh temporary folder beside --out and renamed: a folder that
    happens to carry the name a fixed scheme would pick (`.NAME.importing`) is left alone (it was
    deleted), and the run's folder has mkdir's mode, not mkdtemp's 0700."""
    from llmlab.cli import main
    from llmlab.run_dir import DIR_MODE

    save_hf_checkpoint(hf_model, tmp_path / "hf")
    theirs = tmp_path / ".run.importing"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("keep")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert (theirs / "precious.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.importing", "hf", "run"]
    assert (tmp_path / "run").stat().st_mode & 0o777 == DIR_MODE
