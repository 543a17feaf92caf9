"""Config: presets, type-checked overrides, TOML files, and an import that needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from llmlab.config import (
    PRESETS,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_toml,
    parse_sets,
    preset,
    to_dict,
)  # fmt: skip
from llmlab.errors import ConfigError


def test_presets_are_the_public_names_with_their_architectures():
    assert list(PRESETS) == ["notes", "nanogpt-shakespeare-char", "gpt2", "llama-tiny"]
    notes = preset("notes").model
    assert (notes.positions, notes.activation, notes.norm_placement, notes.tie_embeddings) == (
        "sinusoidal", "relu", "post", True,
    )  # fmt: skip
    nano = preset("nanogpt-shakespeare-char")
    assert (nano.model.n_layers, nano.model.n_heads, nano.model.d_model, nano.model.block_size) == (4, 4, 128, 64)
    t = nano.train
    assert (t.tokenizer, t.batch_size, t.max_steps, t.lr, t.min_lr, t.warmup_steps) == (
        "char",
        12,
        2000,
        1e-3,
        1e-4,
        100,
    )
    assert (t.beta2, t.weight_decay, t.grad_clip, nano.model.dropout) == (0.99, 0.1, 1.0, 0.0)
    llama = preset("llama-tiny").model
    assert (llama.positions, llama.activation, llama.norm, llama.norm_placement, llama.tie_embeddings) == (
        "rope", "swiglu", "rmsnorm", "pre", False,
    )  # fmt: skip


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*notes"):
        preset("gpt5")


def test_overrides_are_parsed_by_field_type():
    m, t = apply_overrides(ModelConfig(), TrainConfig(), parse_sets(
        ["n_layers=2", "dropout=0.1", "tie_embeddings=false", "d_ff=none", "lr=3e-4", "max_minutes=1.5",
         "norm=rmsnorm"]))  # fmt: skip
    assert (m.n_layers, m.dropout, m.tie_embeddings, m.d_ff, m.norm) == (2, 0.1, False, None, "rmsnorm")
    assert (t.lr, t.max_minutes) == (3e-4, 1.5)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("n_layrs=2", "unknown config key 'n_layrs'"),
        ("n_layers=two", "n_layers='two'"),
        ("n_layers=2.5", "n_layers='2.5'"),
        ("n_layers=0", "n_layers must be at least 1"),
        ("n_heads=5", "not divisible by n_heads=5"),
        ("norm=batchnorm", "expected one of layernorm, rmsnorm"),
        ("tie_embeddings=maybe", "expected true or false"),
        ("lr=-1", "lr"),
        ("dropout=1.5", "dropout must be in"),
        ("n_layers", "expects name=value"),
    ],
)
def test_bad_overrides_are_one_line_config_errors(pair, message):
    with pytest.raises(ConfigError, match=message) as e:
        apply_overrides(ModelConfig(), TrainConfig(), parse_sets([pair]))
    assert "\n" not in str(e.value)


def test_config_round_trips_through_a_dict():
    cfg = preset("llama-tiny").model
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_wrong_types_in_a_saved_config_are_rejected():
    with pytest.raises(ConfigError):
        ModelConfig(n_layers=2.0)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(ModelConfig, {"n_layers": 2, "colour": "blue"})


def test_toml_file_applies_on_top_of_a_preset(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nn_layers = 2\nactivation = "gelu"\n[train]\nlr = 0.01\n')
    p = load_toml(path, preset("notes"))
    assert (p.model.n_layers, p.model.activation, p.train.lr) == (2, "gelu", 0.01)
    path.write_text("[model]\nlr = 0.01\n")
    with pytest.raises(ConfigError, match="unknown config key 'lr' in ModelConfig"):
        load_toml(path, preset("notes"))
    path.write_text("[model\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_toml(path, preset("notes"))


def test_config_and_cli_import_without_torch():
    """`llmlab --help` and config errors must not pay for importing torch."""
    code = "import sys, llmlab.config, llmlab.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("text", ["model = 3\n", "[[model]]\nn_layers = 1\n", 'model = "abc"\n', "train = [1, 2]\n"])
def test_a_config_entry_that_is_no_table_is_one_error(tmp_path, text):
    """`model = 3` and `[[model]]` were TypeErrors; `model = "abc"` read as keys 'a', 'b', 'c'."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    name = text.strip("[").split()[0].strip("]")
    with pytest.raises(ConfigError, match=rf"{name} in .* must be a table, \[{name}\]"):
        load_toml(path, preset("notes"))
