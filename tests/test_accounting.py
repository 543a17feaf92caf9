"""Parameters and FLOPs (notes §2.3): the exact counts against the model's own parameters,
PyTorch's FlopCounterMode, transformers' GPT-2, and the notes' formulas typed out here."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from llmlab import accounting as acc
from llmlab.cli import main
from llmlab.config import PRESETS, preset
from llmlab.errors import UserError
from llmlab.model import GPT
from tests.conftest import TINY_VARIANTS, run_cli

PATHS = ["sdpa", "explicit"]

# variants beyond the presets: every switch that changes a parameter or a FLOP
EXTRA = {
    "post-norm rmsnorm swiglu untied": replace(TINY_VARIANTS["notes"], norm="rmsnorm", activation="swiglu",
                                               tie_embeddings=False, final_norm=True),
    "rope without grouped heads": replace(TINY_VARIANTS["llama-tiny"], n_kv_heads=None, d_ff=100),
    "grouped heads, learned positions, bias": replace(TINY_VARIANTS["gpt2"], n_kv_heads=1, d_ff=72),
}  # fmt: skip
ALL_TINY = TINY_VARIANTS | EXTRA


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """A run directory as `llmlab train` writes it (config, char tokenizer, token cache, weights), untrained."""
    from llmlab.config import TrainConfig
    from llmlab.data import write_splits
    from llmlab.run_dir import config_json, save_weights, write_json, write_text
    from llmlab.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("runs") / "tiny"
    text = "def f(x):\n    return x * 2\n" * 20
    tokenizer = train_tokenizer("char", text)
    cfg = replace(TINY_VARIANTS["notes"], vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    write_splits(tokenizer.encode_array(text), out / "data", 0.2, tokenizer.vocab_size, cfg.block_size)
    save_weights(out / "model.safetensors", GPT(cfg))
    write_text(out / "tokenizer.json", tokenizer.to_json())
    write_json(out / "config.json", config_json(cfg, TrainConfig(batch_size=4)))
    return out


# --- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_param_shapes_are_the_models_own_parameters(name):
    """Reference: `named_parameters()` of the real model (on the meta device), name by name."""
    cfg = preset(name).model
    model = acc.meta_model(cfg)
    assert acc.param_shapes(cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert acc.count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert acc.param_counts(cfg) == acc.measured_param_counts(model)


@pytest.mark.parametrize("name", list(ALL_TINY))
def test_param_counts_of_variants_equal_the_real_model(name):
    """Reference: the parameters of a real (CPU) model, grouped by module."""
    cfg = ALL_TINY[name]
    model = GPT(cfg)
    assert acc.param_shapes(cfg) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert acc.param_counts(cfg) == acc.measured_param_counts(model)


def test_gpt2_has_124_439_808_parameters_as_transformers_counts():
    """Reference: transformers' GPT2LMHeadModel with its default (124M) config, tied head counted once."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config())
    assert acc.count_params(preset("gpt2").model) == sum(p.numel() for p in hf.parameters()) == 124_439_808


def test_a_tied_head_is_counted_once_and_an_untied_one_twice():
    """Reference: V·H, the size of the output matrix, from the config's letters."""
    cfg = TINY_VARIANTS["notes"]
    untied = replace(cfg, tie_embeddings=False)
    assert acc.param_counts(cfg)["head"] == 0
    assert acc.count_params(untied) - acc.count_params(cfg) == cfg.vocab_size * cfg.d_model


def test_non_embedding_params_leave_out_the_token_and_position_tables():
    """Reference: Kaplan et al.'s N, summed here from the model's parameters by name."""
    cfg = preset("gpt2").model
    model = acc.meta_model(cfg)
    n = sum(p.numel() for name, p in model.named_parameters() if name not in ("embed.weight", "pos_embed.weight"))
    assert acc.non_embedding_params(cfg) == n == 85_056_000


def test_non_embedding_params_leave_out_an_untied_output_layer_so_6n_has_no_logits():
    """Kaplan et al. 2020, Table 1: the de-embedding costs 2·H·V FLOPs a token and no parameter of N
    (their head is tied). An untied one counted in N would put 3× the logits' FLOPs into 6N.
    Reference: N summed by name, and 6N = 3·(projections + FFN) + 6·(norm parameters) per token."""
    cfg = preset("llama-tiny").model
    assert not cfg.tie_embeddings
    model = acc.meta_model(cfg)
    n = sum(p.numel() for name, p in model.named_parameters() if name not in ("embed.weight", "unembed.weight"))
    assert acc.non_embedding_params(cfg) == n
    f = acc.forward_flops(cfg, 12, 128)
    norms = sum(p.numel() for name, p in model.named_parameters() if name.split(".")[-2].startswith("ln"))
    assert acc.kaplan_flops(cfg, 12, 128) == 3 * (f["attention projections"] + f["ffn"]) + 6 * norms * 12 * 128


# --- FLOPs: exact == FlopCounterMode -----------------------------------------------------------

GRID = [(1, 1), (2, 7), (3, None)]  # (B, S); None: the preset's full context


@pytest.mark.parametrize("attention", PATHS)
@pytest.mark.parametrize("name", list(PRESETS))
def test_exact_flops_equal_flop_counter_on_every_preset(name, attention):
    """Reference: torch.utils.flop_counter.FlopCounterMode on the meta device, forward and
    forward+backward, per component and in total, at every grid point."""
    cfg = replace(preset(name).model, attention=attention)
    model = acc.meta_model(cfg)
    for B, S in GRID:
        S = S or cfg.block_size
        measured = acc.measure_flops(model, B, S)
        exact = acc.forward_flops(cfg, B, S)
        assert measured.by_component == exact, (B, S)
        assert measured.forward == sum(exact.values())
        assert measured.train_step == acc.train_step_flops(cfg, B, S) == 3 * measured.forward


@pytest.mark.parametrize("name", list(ALL_TINY))
def test_exact_flops_equal_flop_counter_on_real_cpu_models(name):
    """Reference: FlopCounterMode on real CPU tensors, where attention runs PyTorch's fused CPU
    kernel (counted by our mapping); the explicit path is the same products as on meta."""
    cfg = ALL_TINY[name]
    torch.manual_seed(0)
    model = GPT(cfg)
    for B, S in [(1, 1), (3, 16)]:
        measured = acc.measure_flops(model, B, S)
        assert measured.forward == sum(acc.forward_flops(cfg, B, S).values())
        assert measured.train_step == acc.train_step_flops(cfg, B, S)


def test_flop_counter_alone_misses_cpu_fused_attention():
    """The gap: without our `custom_mapping`, FlopCounterMode on CPU counts the fused attention
    kernel as 0 FLOPs (torch 2.13), so it undercounts by exactly the attention-score term."""
    cfg = TINY_VARIANTS["notes"]
    model = GPT(cfg)
    idx = torch.zeros(2, 16, dtype=torch.long)
    with FlopCounterMode(display=False) as plain:
        model(idx)
    exact = acc.forward_flops(cfg, 2, 16)
    if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in plain.flop_registry:
        assert plain.get_total_flops() == sum(exact.values())  # a later torch learnt the formula
    else:
        assert plain.get_total_flops() == sum(exact.values()) - exact["attention scores"] > 0
        assert acc.measure_flops(model, 2, 16, backward=False).forward == sum(exact.values())


def test_cpu_attention_mapping_equals_the_two_products_it_fuses():
    """Reference: FlopCounterMode's own bmm formulas over softmax(QKᵀ/√D)·V written out,
    forward and backward, grouped K/V heads included."""
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k = torch.randn(2, 2, 9, 8, requires_grad=True)
    v = torch.randn(2, 2, 9, 8, requires_grad=True)
    with FlopCounterMode(display=False) as written:
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        ((q @ kk.transpose(-2, -1) / math.sqrt(8)).softmax(-1) @ vv).sum().backward()
    with FlopCounterMode(display=False, custom_mapping=acc.sdpa_cpu_flops()) as fused:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    assert fused.get_total_flops() == written.get_total_flops() == 3 * 2 * (2 * 2 * 4 * 9 * 9 * 8)


@pytest.mark.parametrize("name", list(PRESETS))
def test_decode_step_flops_equal_flop_counter_with_a_kv_cache(name):
    """Reference: FlopCounterMode over `model(idx[:, -1:], cache=...)` with context − 1 cached positions."""
    cfg = preset(name).model
    model = acc.meta_model(cfg)
    for context in (1, 5, cfg.block_size):
        assert acc.measure_decode_flops(model, 2, context) == acc.decode_step_flops(cfg, 2, context)


def test_notes_formulas_hold_exactly_where_their_assumptions_do():
    """Reference: the notes' 8BSH² + 4BS²H (attention) and 16BSH² (FFN), typed here; with h_kv = h,
    F = 4H and two FFN matrices the only difference is the logits, 2BSHV."""
    cfg = preset("gpt2").model
    B, S, H, V, L = 2, 100, cfg.d_model, cfg.vocab_size, cfg.n_layers
    exact = acc.forward_flops(cfg, B, S)
    assert exact["attention projections"] + exact["attention scores"] == L * (8 * B * S * H**2 + 4 * B * S**2 * H)
    assert exact["ffn"] == L * 16 * B * S * H**2
    notes = sum(acc.notes_flops(cfg, B, S).values())
    assert sum(exact.values()) - notes == 2 * B * S * H * V


def test_notes_comparison_names_each_difference_of_llama_tiny():
    """SwiGLU's third matrix, F ≠ 4H and grouped K/V heads each move the count away from the notes."""
    cfg = preset("llama-tiny").model
    rows = {r["component"]: r for r in acc.notes_comparison(cfg, 2, 64)}
    H, F, kv, D, B, S, L = cfg.d_model, cfg.ff_width, cfg.kv_heads, cfg.d_head, 2, 64, cfg.n_layers
    assert rows["ffn"]["exact"] == L * 3 * 2 * B * S * H * F and "SwiGLU" in rows["ffn"]["reason"]
    assert rows["attention projections"]["exact"] == L * (2 * B * S * H * (H + 2 * kv * D) + 2 * B * S * H * H)
    assert "h_kv=2" in rows["attention projections"]["reason"]
    assert rows["logits"]["notes"] == 0 and rows["logits"]["diff_pct"] == -100.0


def test_kaplan_6n_is_six_times_the_non_embedding_parameters_per_token():
    """Reference: C = 6N per token (Kaplan et al. 2020, §2.1), N summed from the model's parameters."""
    cfg = preset("nanogpt-shakespeare-char").model
    model = acc.meta_model(cfg)
    n = sum(p.numel() for name, p in model.named_parameters() if name not in ("embed.weight", "pos_embed.weight"))
    assert acc.kaplan_flops(cfg, 3, 64) == 6 * n * 3 * 64


# --- peak and MFU ------------------------------------------------------------------------------


def test_mfu_is_achieved_over_peak_and_refuses_a_zero_peak():
    assert acc.mfu(50e9, 200e9) == 0.25
    with pytest.raises(UserError, match="positive"):
        acc.mfu(1.0, 0.0)


def test_peak_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    calls = []

    def fake(device: str, dtype: str) -> float:
        calls.append((device, dtype))
        return 123.0

    assert acc.peak_flops("cpu", "float32", measure=fake) == 123.0
    assert acc.peak_flops("cpu", "float32", measure=lambda d, t: pytest.fail("measured again")) == 123.0
    assert acc.peak_flops("cpu", "float32", refresh=True, measure=lambda d, t: 7.0) == 7.0
    assert calls == [("cpu", "float32")]
    assert list(json.loads((tmp_path / "peak.json").read_text()).values()) == [7.0]


def test_the_peak_command_caches_the_peak_a_process_with_other_threads_looks_up(tmp_path, monkeypatch):
    """Reference: the cache's own key. torchrun runs each process with OMP_NUM_THREADS=1, and the
    peak is cached per thread count, so the command training names there must set the threads: run
    as printed, it caches the very key a 1-thread process reads."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        command = acc.peak_command("cpu")
        assert command == "OMP_NUM_THREADS=1 llmlab count --peak"
        assert acc.cached_peak("cpu", "float32") is None
        argv = [sys.executable, "-m", "llmlab", *command.split()[2:]]
        done = subprocess.run(argv, env=dict(os.environ), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "matmul peak (cpu): float32" in done.stdout
        assert acc.cached_peak("cpu", "float32") > 0 and acc.cached_peak("cpu", "bfloat16") > 0
    finally:
        torch.set_num_threads(threads)


def test_the_peak_command_is_plain_at_the_default_threads_and_names_an_accelerator(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(acc.os, "cpu_count", torch.get_num_threads)
    assert acc.peak_command("cpu") == "llmlab count --peak"
    assert acc.peak_command("cuda") == "llmlab count --peak --device cuda"
    monkeypatch.setattr(acc.os, "cpu_count", lambda: torch.get_num_threads() + 1)  # threads set below the cores
    assert acc.peak_command("cpu") == f"OMP_NUM_THREADS={torch.get_num_threads()} llmlab count --peak"


def test_matmul_peak_measures_a_positive_rate():
    assert acc.measure_matmul_peak("cpu", "float32", n=64, seconds=0.01) > 0


# --- the command --------------------------------------------------------------------------------


def test_count_gpt2_json_gives_the_published_count_and_exact_equals_measured(capsys):
    """The issue's acceptance: GPT-2 at B=1, S=1024 on the meta device."""
    code, out, _ = run_cli(capsys, "count", "--preset", "gpt2", "--batch", "1", "--seq", "1024", "--json")
    r = json.loads(out)
    assert code == 0 and r["params"]["total"] == 124_439_808 == r["params"]["measured"]
    assert r["flops"]["forward"]["exact"] == r["flops"]["forward"]["measured"]
    assert r["flops"]["train_step"]["exact"] == r["flops"]["train_step"]["measured"]
    assert r["flops"]["decode_step"]["exact"] == r["flops"]["decode_step"]["measured"]
    for key in ("by_component", "total"):
        assert key in r["params"]
    assert r["flops"]["forward"]["notes"] == 12 * (24 * 1024 * 768**2 + 4 * 1024**2 * 768)
    assert r["memory"]["kv_cache_bytes"] == r["memory"]["kv_cache_measured_bytes"] == 2 * 12 * 1024 * 768 * 4
    assert r["memory"]["train"]["predicted_bytes"] > 16 * 124_439_808 - 1


@pytest.mark.parametrize("name", ["notes", "llama-tiny"])
def test_a_deep_model_measured_on_one_and_two_layers_equals_the_whole_one(name, monkeypatch):
    """Reference: FlopCounterMode and the parameters of the whole 5-layer meta model, against
    measure_meta's extension of the 1- and 2-layer ones (forced here by lowering MEASURED_LAYERS)."""
    cfg = replace(TINY_VARIANTS[name], n_layers=5)
    model = acc.meta_model(cfg)
    whole = acc.measure_flops(model, 2, 16)
    params = sum(p.numel() for p in model.parameters())
    decode = acc.measure_decode_flops(model, 2, 16)
    assert acc.measure_meta(cfg, 2, 16) == (whole, params, decode, 5)
    monkeypatch.setattr(acc, "MEASURED_LAYERS", 2)
    assert acc.measure_meta(cfg, 2, 16) == (whole, params, decode, 2)


def test_count_of_a_deep_model_is_quick_and_says_how_it_was_measured(capsys):
    """1,000 layers: 1- and 2-layer models measured, the exact counts equal to their extension;
    above MAX_LAYERS, one line and exit 2."""
    code, out, _ = run_cli(capsys, "count", "--preset", "gpt2", "--set", "n_layers=1000", "--json")
    r = json.loads(out)
    assert code == 0 and r["measured_layers"] == 2
    assert r["params"]["total"] == r["params"]["measured"] == 38_597_376 + 786_432 + 1000 * 7_087_872 + 1536
    assert r["flops"]["train_step"]["exact"] == r["flops"]["train_step"]["measured"]
    assert r["flops"]["decode_step"]["exact"] == r["flops"]["decode_step"]["measured"]
    code, out, _ = run_cli(capsys, "count", "--preset", "gpt2", "--set", "n_layers=1000")
    assert code == 0 and "measured on models of 1 and 2 layers, extended to L: 7,127,257,344" in out
    code, _, err = run_cli(capsys, "count", "--preset", "gpt2", "--set", "n_layers=100000000000")
    assert code == 2 and err.strip() == "llmlab: error: n_layers must be at most 10,000, got 100,000,000,000"


def test_count_measure_and_peak_with_a_run(capsys, tiny_run, tmp_path, monkeypatch):
    """--measure on a run's config: measured memory within 10% of the prediction; --peak cached."""
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(acc, "measure_matmul_peak", lambda device, dtype: 1e11)
    code, out, _ = run_cli(capsys, "count", str(tiny_run), "--measure", "--peak", "--json")
    r = json.loads(out)
    assert code == 0 and r["model"]["source"] == str(tiny_run) and r["batch"] == 4  # the run's batch_size
    t = r["memory"]["train"]
    assert abs(t["measured_bytes"] - t["predicted_bytes"]) <= 0.1 * t["measured_bytes"]
    assert r["peak"] == {"float32": 1e11, "bfloat16": 1e11} and (tmp_path / "peak.json").exists()
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / 1e11)
    assert r["achieved_flops_per_s"] == pytest.approx(r["flops"]["train_step"]["exact"] / r["step_seconds"])


def test_count_peak_of_an_accelerator_is_cached_under_its_device_and_not_taken_for_the_cpu_mfu(
        capsys, tiny_run, tmp_path, monkeypatch):  # fmt: skip
    """--peak --device cuda caches cuda's peaks (what a CUDA run's MFU reads); --measure's CPU step still
    divides by the CPU's peak, not the accelerator's."""
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(acc, "measure_matmul_peak", lambda device, dtype: {"cuda": 1e15, "cpu": 1e11}[device])
    code, out, _ = run_cli(capsys, "count", str(tiny_run), "--measure", "--peak", "--device", "cuda", "--json")
    r = json.loads(out)
    assert code == 0 and r["peak"] == {"float32": 1e15, "bfloat16": 1e15} and r["peak_device"] == "cuda"
    assert acc.cached_peak("cuda", "bfloat16") == 1e15
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / 1e11)


def test_count_peak_on_a_missing_or_unknown_device_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_cli(capsys, "count", "--peak", "--device", "cuda")
    assert code == 2 and out == "" and err.startswith("llmlab: error: --peak --device cuda: this machine has no cuda")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "peak.json").exists()
    code, _, err = run_cli(capsys, "count", "--device", "cuda")
    assert code == 2 and err.strip() == "llmlab: error: --device is an option of --peak (--measure runs on the CPU)"
    code, _, err = run_cli(capsys, "count", "--peak", "--device", "tpu")
    assert code == 2 and "invalid choice: 'tpu'" in err and len(err.strip().splitlines()) == 1


def test_count_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["count", "--help"])
    out = capsys.readouterr().out
    for option in ("RUN", "--preset", "--config", "--set NAME=VALUE", "--batch", "--seq", "--measure", "--peak",
                   "--device", "--sweep", "--out", "--json"):  # fmt: skip
        assert option in out


def test_count_human_output_shows_the_notes_beside_the_exact_counts(capsys):
    code, out, _ = run_cli(capsys, "count", "--preset", "llama-tiny", "--seq", "32")
    assert code == 0
    for text in (
        "parameters",
        "notes formula",
        "Kaplan",
        "decode step",
        "2 fp16 weights + 2 fp16 updated weights",
        "KV cache",
    ):
        assert text in out


def test_sweep_writes_a_png_with_the_exact_flops_of_each_point(capsys, tmp_path):
    png = tmp_path / "s.png"
    code, out, _ = run_cli(capsys, "count", "--preset", "notes", "--set", "n_layers=1", "--batch", "1",
                           "--sweep", "seq=8,16,...,32", "--repeats", "1", "--out", str(png), "--json")  # fmt: skip
    rows = json.loads(out)["sweep"]["rows"]
    cfg = replace(preset("notes").model, n_layers=1)
    assert code == 0 and [r["value"] for r in rows] == [8, 16, 32]
    assert [r["train_flops"] for r in rows] == [acc.train_step_flops(cfg, 1, s) for s in (8, 16, 32)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("spec", "values"), [
    ("seq=64,128,...,1024", [64, 128, 256, 512, 1024]),
    ("layers=1,3,...,9", [1, 3, 5, 7, 9]),
    ("width=32, 64, 96", [32, 64, 96]),
])  # fmt: skip
def test_sweep_values_continue_geometrically_or_arithmetically(spec, values):
    from llmlab.cli.count import parse_sweep

    assert parse_sweep(spec)[1] == values


def bad_count_inputs(run: str) -> list[list[str]]:
    return [
        ["--preset", "gpt5"],
        ["--set", "n_layers=0"],
        ["--set", "n_heads=5"],
        ["--batch", "0"],
        ["--seq", "-3"],
        ["--preset", "gpt2", "--seq", "2048"],
        [run, "--preset", "notes"],
        ["/nonexistent/run"],
        ["--sweep", "depth=1,2"],
        ["--sweep", "seq=8,x"],
        ["--sweep", "seq=8,12,...,30"],  # neither doubling nor steps of 4 reach 30
        ["--sweep", "width=30,31", "--preset", "notes"],
    ]


@pytest.mark.parametrize("index", range(12))
def test_bad_count_input_is_one_line_and_exit_2(capsys, tiny_run, index):
    argv = bad_count_inputs(str(tiny_run))[index]
    code, out, err = run_cli(capsys, "count", *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("llmlab: error: ")


def test_measure_that_would_not_fit_is_refused_with_the_prediction(capsys, monkeypatch):
    from llmlab import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 10**6)
    code, out, err = run_cli(capsys, "count", "--preset", "notes", "--measure")
    assert code == 2 and out == "" and "GiB (predicted)" in err and len(err.strip().splitlines()) == 1


def test_fit_context_lets_sinusoidal_and_rope_models_count_any_length():
    """Their tables are buffers: a longer S changes no parameter."""
    cfg = preset("notes").model
    longer = acc.fit_context(cfg, 1, 4 * cfg.block_size)
    assert longer.block_size == 4 * cfg.block_size and acc.count_params(longer) == acc.count_params(cfg)
    with pytest.raises(UserError, match="learned"):
        acc.fit_context(preset("gpt2").model, 1, 1025)


def test_tour_section_tables_exact_beside_measured(tiny_run, tmp_path, monkeypatch):
    """The tour's section on a run: every exact figure equals its measurement, memory within 1%."""
    from llmlab.sections import Tour
    from llmlab.sections.accounting import section

    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(acc, "measure_matmul_peak", lambda device, dtype: 1e11)
    tour = Tour(tmp_path, quick=True, data="", log=lambda _: None, notes_dir=tiny_run,
                notes_summary={"tokens_per_second": 1000.0})  # fmt: skip
    s = section(tour)
    f = s.figures
    assert f["params"]["exact"] == f["params"]["measured"] == acc.count_params(load_cfg(tiny_run))
    assert f["flops"]["forward_exact"] == f["flops"]["forward_measured"]
    assert f["flops"]["train_exact"] == f["flops"]["train_measured"]
    assert f["flops"]["decode_exact"] == f["flops"]["decode_measured"]
    assert abs(f["memory"]["predicted"] - f["memory"]["measured"]) <= 0.01 * f["memory"]["measured"]
    assert f["memory"]["kv_cache"] == f["memory"]["kv_cache_measured"]
    assert f["trace"]["all_match"] and f["mfu"]["peak_flops_per_s"] == 1e11
    assert "[h·H, h·H]" in s.body and "MFU" in s.body


def load_cfg(run):
    from llmlab.run_dir import read_config

    return read_config(run)[0]
