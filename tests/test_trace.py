"""The shape trace (notes §2.2): every hook point of a real forward pass, in the notes' letters,
checked against the model's hook registry, `run_with_cache` and the parameters' own shapes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from llmlab.config import PRESETS, TrainConfig, preset
from llmlab.model import GPT
from llmlab.trace import HOOKS, TraceRow, _row, letter_values, trace, weight_rows
from tests.conftest import TINY_VARIANTS, run_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A run directory as `llmlab train` writes it (config, char tokenizer, weights), untrained."""
    from llmlab.run_dir import config_json, save_weights, write_json, write_text
    from llmlab.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("runs") / "tiny"
    tokenizer = train_tokenizer("char", "def f(x):\n    return x * 2\n")
    cfg = replace(TINY_VARIANTS["notes"], vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    save_weights(out / "model.safetensors", GPT(cfg))
    write_text(out / "tokenizer.json", tokenizer.to_json())
    write_json(out / "config.json", config_json(cfg, TrainConfig()))
    return out


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_every_hook_point_is_traced_once_with_the_shape_run_with_cache_sees(name):
    """Reference: the model's own hook registry and `run_with_cache`'s tensors (the core's hooks)."""
    cfg = TINY_VARIANTS[name]
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    rows = trace(model, idx)
    traced = {r.name: r.shape for r in rows if r.name in model.hook_names()}
    _, cache = model.run_with_cache(idx)
    assert traced == {name: tuple(t.shape) for name, t in cache.items()}
    assert len([r for r in rows if r.name in traced]) == len(model.hook_names())  # each exactly once
    assert all(r.matches for r in rows)
    assert rows[0].shape == (3, 11) and rows[-1].name == "logits" and rows[-1].shape == (3, 11, cfg.vocab_size)


def test_trace_rows_read_in_the_notes_letters():
    """Reference: the notes' §2.2 letters, evaluated by hand for this config."""
    cfg = replace(TINY_VARIANTS["llama-tiny"], d_ff=40)  # h=4, h_kv=2, H=32, D=8, F=40, V=48
    rows = {r.name: r for r in trace(GPT(cfg).eval(), torch.zeros(2, 5, dtype=torch.long))}
    assert rows["blocks.0.attn.hook_q"].shape == (2, 5, 4, 8) and rows["blocks.0.attn.hook_q"].letters == (
        "B", "S", "h", "D")  # fmt: skip
    assert rows["blocks.0.attn.hook_k"].shape == (2, 5, 2, 8)
    assert rows["blocks.0.attn.hook_attn_scores"].shape == (2, 4, 5, 5)
    assert rows["blocks.0.attn.mask"].shape == (5, 5)
    assert rows["blocks.0.mlp.hook_pre"].shape == (2, 5, 40)
    assert rows["blocks.1.hook_resid_post"].shape == (2, 5, 32)


def test_a_shape_that_disagrees_with_its_letters_is_flagged():
    values = {"B": 2, "S": 5, "H": 32}
    assert _row("x", ("B", "S", "H"), (2, 5, 32), "", "", values).matches
    assert not _row("x", ("B", "S", "H"), (2, 5, 128), "", "", values).matches


def test_letters_cover_every_hook_name_of_the_model():
    names = {n.split(".", 2)[2] if n.startswith("blocks.") else n for n in GPT(TINY_VARIANTS["notes"]).hook_names()}
    assert names <= set(HOOKS)


@pytest.mark.parametrize("name", list(PRESETS))
def test_weight_rows_are_the_real_parameter_shapes_not_the_notes_h_times_h(name):
    """Reference: the parameters of the model (meta device). The notes write each of W^Q, W^K, W^V
    as [h·H, h·H]; the real fused one is [(h + 2h_kv)·D, H] with D = H/h."""
    from llmlab.accounting import meta_model

    cfg = preset(name).model
    params = dict(meta_model(cfg).named_parameters())
    rows = {w.name: w for w in weight_rows(cfg)}
    qkv = rows["blocks.0.attn.qkv.weight"]
    assert qkv.shape == tuple(params["blocks.0.attn.qkv.weight"].shape)
    assert qkv.shape[0] == (cfg.n_heads + 2 * cfg.kv_heads) * cfg.d_head and qkv.shape[1] == cfg.d_model
    assert qkv.shape != (cfg.n_heads * cfg.d_model, cfg.n_heads * cfg.d_model)
    assert f"[{cfg.n_heads * cfg.d_model}, {cfg.n_heads * cfg.d_model}]" in qkv.remark
    assert rows["unembed.weight"].shape == (cfg.vocab_size, cfg.d_model)


def test_letter_values_follow_the_config():
    v = letter_values(preset("llama-tiny").model, 3, 9)
    assert v == {"B": 3, "S": 9, "H": 128, "V": 256, "h": 4, "h_kv": 2, "D": 32, "F": 352, "L": 4}


def test_trace_json_from_a_preset(capsys):
    code, out, _ = run_cli(capsys, "trace", "--preset", "llama-tiny", "--batch", "2", "--seq", "6", "--json")
    r = json.loads(out)
    assert code == 0 and r["all_match"] and r["letters"]["S"] == 6
    rows = [TraceRow(**{**x, "letters": tuple(x["letters"]), "shape": tuple(x["shape"])}) for x in r["rows"]]
    assert rows[-1].shape == (2, 6, 256)
    assert {w["name"] for w in r["weights"]} >= {"embed.weight", "blocks.0.attn.qkv.weight", "unembed.weight"}


def test_trace_a_run_with_a_prompt(capsys, tiny_run):
    """Reference: the run's tokenizer: S is the number of tokens of the prompt."""
    from llmlab.run_dir import load_run

    code, out, _ = run_cli(capsys, "trace", str(tiny_run), "--prompt", "def f", "--json")
    n = len(load_run(tiny_run).tokenizer.encode("def f"))
    assert code == 0 and json.loads(out)["rows"][0]["shape"] == [1, n]


def test_trace_human_table_says_where_the_notes_differ(capsys):
    code, out, _ = run_cli(capsys, "trace", "--preset", "notes")
    assert code == 0
    assert "[B, S, h, D] = [1, 8, 4, 32]" in out and "[h·H, h·H] = [512, 512]" in out and "each matches" in out


@pytest.mark.parametrize("argv", [
    ["--preset", "gpt5"],
    ["--preset", "notes", "--prompt", "hi"],
    ["--preset", "notes", "--seq", "65"],
    ["--preset", "notes", "--batch", "0"],
    ["--preset", "notes", "--seq", "0"],
    ["--preset", "notes", "--set", "n_heads=3"],
    ["RUN", "--preset", "notes"],
    ["RUN", "--prompt", "def", "--seq", "3"],
    ["RUN", "--prompt", ""],
    ["RUN", "--prompt", "def " * 20],
    ["RUN", "--prompt", "€"],
    ["/nonexistent/run"],
])  # fmt: skip
def test_bad_trace_input_is_one_line_and_exit_2(capsys, tiny_run, argv):
    argv = [str(tiny_run) if a == "RUN" else a for a in argv]
    code, out, err = run_cli(capsys, "trace", *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("llmlab: error: ")
