"""The command line: help, --json, and every bad input as one line with exit code 2."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmlab.cli import main
from llmlab.run_dir import load_run
from llmlab.sampling import SamplingConfig, generate_text
from tests.conftest import run_cli

TINY = ["--set", "n_layers=2", "--set", "d_model=32", "--set", "block_size=16", "--set", "eval_iters=2"]


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "generate", "run"):
        assert command in out


def test_train_help_documents_the_shared_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for option in ("--preset", "--set NAME=VALUE", "--tokenizer", "--seed", "--json", "--out", "--resume"):
        assert option in out


def test_train_json_reports_the_run(capsys, tmp_path, corpus_file):
    code, out, _ = run_cli(
        capsys, "train", "--data", str(corpus_file), "--out", str(tmp_path / "r"), "--max-steps", "6", *TINY, "--json"
    )
    assert code == 0
    result = json.loads(out)
    for key in ("run_dir", "steps", "train_loss", "val_loss", "tokens_per_second"):
        assert key in result
    assert result["steps"] == 6 and result["run_dir"] == str(tmp_path / "r")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["model"]["n_layers"] == 2


def test_generate_json_is_reproducible_and_decodes_to_its_text(capsys, trained_run):
    argv = ["generate", str(trained_run), "--prompt", "def f", "--max-new-tokens", "20", "--seed", "7", "--json"]
    first, second = json.loads(run_cli(capsys, *argv)[1]), json.loads(run_cli(capsys, *argv)[1])
    assert first == second
    assert len(first["token_ids"]) == 20
    assert load_run(trained_run).tokenizer.decode(first["token_ids"]) == first["text"]


def test_generate_greedy_streams_what_the_library_returns(capsys, trained_run):
    code, out, _ = run_cli(capsys, "generate", str(trained_run), "--prompt", "def f", "--temperature", "0",
                           "--max-new-tokens", "30")  # fmt: skip
    run = load_run(trained_run)
    expected = generate_text(run.model, run.tokenizer, "def f", 30, SamplingConfig(0.0)).text
    assert code == 0 and out == "def f" + expected + "\n"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "packed"])
def test_generate_weights_decodes_with_copies(capsys, monkeypatch, trained_run, dtype):
    """Reference: generate_text inside llmlab.matvec.weights_in (tested against fp32 in test_matvec)."""
    from llmlab import matvec

    if dtype == "packed" and not matvec.ONEDNN:
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(matvec, "MIN_ELEMENTS", 1)  # the tiny run's matrices count as large
    calls = []
    name = "onednn_linear" if dtype == "packed" else "matvec16"
    real = getattr(matvec, name)

    def counted(x, weight, bias):
        if x.numel() == x.shape[-1]:  # one row: a new token (the prompt's rows may take oneDNN on the parameter)
            calls.append(weight.is_mkldnn or weight.dtype)
        return real(x, weight, bias)

    monkeypatch.setattr(matvec, name, counted)
    argv = ["generate", str(trained_run), "--prompt", "def f", "--temperature", "0", "--max-new-tokens", "20"]
    out = json.loads(run_cli(capsys, *argv, "--weights", dtype, "--json")[1])
    assert calls and set(calls) == ({True} if dtype == "packed" else {getattr(torch, dtype)})  # every one-row product
    run = load_run(trained_run)
    with matvec.weights_in(run.model, torch.float32 if dtype == "packed" else getattr(torch, dtype)):
        expected = generate_text(run.model, run.tokenizer, "def f", 20, SamplingConfig(0.0))
    assert out["token_ids"] == expected.token_ids


def test_generate_weights_packed_off_the_cpu_is_one_line(capsys, monkeypatch, trained_run):
    import llmlab.run_dir

    real = llmlab.run_dir.load_run

    def on_meta(path, device="cpu"):  # a run loaded onto a device that is not the CPU
        run = real(path, device)
        run.model.to("meta")
        return run

    monkeypatch.setattr(llmlab.run_dir, "load_run", on_meta)
    code, _, err = run_cli(capsys, "generate", str(trained_run), "--prompt", "a", "--weights", "packed")
    assert code == 2 and err.strip().splitlines() == [
        "llmlab: error: --weights packed is for decoding on the CPU, not on meta"
    ]


def test_generate_weights_packed_without_onednn_is_one_line(capsys, monkeypatch, trained_run):
    from llmlab import matvec

    monkeypatch.setattr(matvec, "ONEDNN", False)
    code, _, err = run_cli(capsys, "generate", str(trained_run), "--prompt", "a", "--weights", "packed")
    assert code == 2 and err.strip().splitlines() == [
        "llmlab: error: --weights packed needs PyTorch built with oneDNN (torch.backends.mkldnn); this one is not"
    ]


def test_a_streamed_sample_cut_short_ends_its_line_before_the_message(capsys, monkeypatch, trained_run):
    """Ctrl-C (or an allocation failing) mid-sample: stdout's line is ended before stderr's message,
    which in a terminal was glued to the text ("def fllmlab: interrupted")."""
    import llmlab.sampling

    def cut_short(*args, on_text=None, **kwargs):
        on_text("(x")
        raise KeyboardInterrupt

    monkeypatch.setattr(llmlab.sampling, "generate_text", cut_short)
    code, out, err = run_cli(capsys, "generate", str(trained_run), "--prompt", "def")
    assert (code, out, err) == (130, "def(x\n", "llmlab: interrupted\n")


def test_generate_stop_string(capsys, trained_run):
    out = json.loads(run_cli(capsys, "generate", str(trained_run), "--prompt", "def f", "--temperature", "0",
                             "--stop", "\n", "--json")[1])  # fmt: skip
    assert "\n" not in out["text"] and len(out["text"]) < 200


def bad_inputs(tmp: Path, corpus: Path, run: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty.txt").write_text("")
    (tmp / "binary.bin").write_bytes(b"\x7fELF\x00\x00\x01")
    (tmp / "latin1.txt").write_bytes(b"na\xefve")
    (tmp / "incomplete").mkdir()
    (tmp / "incomplete" / "config.json").write_text("{}")
    corrupt = tmp / "corrupt"
    shutil.copytree(run, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    nan = tmp / "nan"
    shutil.copytree(run, nan)
    weights = load_file(nan / "model.safetensors")
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, nan / "model.safetensors")
    (tmp / "not-a-run").mkdir()
    (tmp / "not-a-run" / "notes.txt").write_text("mine")
    train = ["train", "--data", str(corpus), "--out", str(tmp / "new")]
    gen = ["generate", str(run)]
    return [
        ([*train, "--preset", "gpt5"], "unknown preset 'gpt5'"),
        ([*train, "--set", "colour=blue"], "unknown config key 'colour'"),
        ([*train, "--set", "n_layers=two"], "n_layers='two'"),
        ([*train, "--set", "n_heads=5"], "d_model=128 is not divisible by n_heads=5"),
        ([*train, "--config", str(tmp / "none.toml")], "does not exist"),
        (["train", "--data", str(tmp / "missing.txt"), "--out", str(tmp / "n1")], "not found"),
        (["train", "--data", str(tmp / "empty.txt"), "--out", str(tmp / "n2")], "is empty"),
        (["train", "--data", str(tmp / "binary.bin"), "--out", str(tmp / "n3")], "looks binary"),
        (["train", "--data", str(tmp / "latin1.txt"), "--out", str(tmp / "n4")], "not valid UTF-8"),
        (["train", "--data", str(corpus), "--out", str(run)], "already holds a run"),
        (["train", "--out", str(run), "--resume", "--set", "lr=1"], "--resume continues the saved configuration"),
        (["train", "--data", str(corpus)], "the following arguments are required: --out"),
        (["generate", str(tmp / "nope")], "does not exist"),
        (["generate", str(tmp / "incomplete")], "not a complete run directory"),
        (["generate", str(corrupt)], "model.safetensors is corrupt"),
        ([*gen, "--prompt", "d" * 40], "40 tokens long, but the model's context is 32"),
        ([*gen, "--prompt", ""], "the prompt is empty"),
        ([*gen, "--prompt", "ü"], "not in this character tokenizer's vocabulary"),
        ([*gen, "--prompt-file", str(tmp / "latin1.txt")], "not valid UTF-8"),
        ([*gen, "--temperature", "-1"], "temperature must be a finite number >= 0"),
        ([*gen, "--temperature", "inf"], "temperature must be a finite number >= 0"),
        ([*gen, "--stop", ""], "--stop needs some text"),
        (["generate", str(nan)], "'embed.weight' holds NaN or infinite values"),
        ([*train, "--set", "lr=nan"], "lr must be a finite number, got nan"),
        ([*train, "--set", "grad_clip=inf"], "grad_clip must be a finite number, got inf"),
        ([*train, "--set", "positions=rope", "--set", "rope_base=0"], "rope_base must be above 1"),
        ([*train, "--config", str(tmp)], "is a directory"),
        (["train", "--data", str(corpus), "--out", str(tmp / "empty.txt")], "is a file, not a directory"),
        (["train", "--data", str(corpus), "--out", str(tmp / "empty.txt" / "r")], "empty.txt is a file, so"),
        ([*train, "--set", "d_model=65536"], "parameters: training it on the CPU needs"),  # 206 G parameters
        ([*train, "--set", "n_layers=100000000"], "n_layers must be at most 10,000, got 100,000,000"),  # hung before
        (["run", "--out", str(tmp / "empty.txt" / "tour")], "empty.txt is a file, so"),  # was "Not a directory"
        (["export-hf", str(run), "--out", str(tmp / "empty.txt" / "hf")], "empty.txt is a file, so"),
        (["count", "--sweep", "seq=8,16", "--out", str(tmp / "empty.txt" / "s.png")], "empty.txt is a file, so"),
        (["score", str(run), "--text", "x", "--html", str(tmp / "empty.txt" / "s.html")], "empty.txt is a file, so"),
        (["score", str(run), "--val", "50", "--calibration", "--out", str(tmp / "empty.txt" / "c")], "is a file, so"),
        (["rft", "--task", "addition", "--write-corpus", str(tmp / "empty.txt" / "a.txt")], "empty.txt is a file, so"),
        (["train", "--data", str(corpus), "--out", str(tmp / "not-a-run")], "is a directory that is not empty"),
        (["train", "--out", str(run), "--resume", "--data", str(corpus)], "continues the saved configuration and data"),
        (["train", "--out", str(run), "--resume", "--seed", "3"], "continues the saved configuration and data"),
        (["train", "--out", str(run), "--resume", "--dtype", "bfloat16"], "continues the saved configuration"),
        (["train", "--out", str(run), "--resume", "--preset", "gpt2"], "continues the saved configuration"),
        (["train", "--out", str(tmp / "nope"), "--resume"], "does not exist"),
        ([*train, "--init-from", str(run), "--set", "n_layers=2"], "--init-from keeps its run's model; --set n_layers"),
        ([*train, "--init-from", str(run), "--tokenizer-from", str(run)], "--init-from brings its run's tokenizer"),
        (["trace", str(run), "--layer", "5"], "--layer must be all or a block from 0 to 1, got '5'"),
        (["trace", str(run), "--set", "n_layers=3"], "give a run directory or --preset (with --set), not both"),
        (["trace", str(run), "--prompt", "caf\udce9"], "--prompt is not valid UTF-8"),
        (["count", "--sweep", "seq=8,16", "--repeats", "0"], "--repeats must be at least 1"),
        (["count", "--repeats", "2"], "--repeats and --out are options of --sweep"),
        (["count", str(corrupt)], "model.safetensors is corrupt"),
        ([*train, "--out", "caf\udce9"], "--out is not valid UTF-8"),
        ([*train, "--init-from", str(run), "--tokenizer", "bpe"], "--init-from brings its run's tokenizer"),
        ([*train, "--init-from", str(run), "--config", str(tmp / "none.toml")], "not --config"),
        ([*train, "--init-from", str(run), "--preset", "gpt2"], "--init-from keeps its run's model; --preset gpt2"),
        ([*train, "--init-from", str(run), "--preset", "gpt5"], "unknown preset 'gpt5'"),
        (["trace", "--set", "d_model=1000000", "--set", "n_layers=1", "--seq", "1"], "out of memory"),
        (["count", "--sweep", "seq=8,16", "--out", str(tmp)], "a .png file"),
        (["count", "--sweep", "seq=8,16", "--out", "/proc/llmlab/s.png"], "No such file or directory: /proc/llmlab"),
        (["count", "--sweep", "seq=8,16", "--out", "/sys/s.png"], "--out /sys/s.png: cannot write in /sys"),  # root too
        (["count", "--seq", "99999999999999999999"], "is too large: one activation would hold 4.8e+41 numbers"),
        (["count", "--batch", "99999999999999999999"], "batch=99999999999999999999 seq=64 is too large"),
        (["trace", "--batch", "99999999999999999999"], "batch=99999999999999999999 seq=8 is too large"),
        (["run", "--minutes", "nan", "--out", str(tmp / "tour")], "--minutes must be a positive finite number"),
        ([*gen, "--top-p", "0"], "top_p must be in (0, 1]"),
        ([*gen, "--top-p", "1.5"], "top_p must be in (0, 1]"),
        ([*gen, "--top-k", "0"], "top_k must be at least 1"),
        ([*gen, "--max-new-tokens", "x"], "invalid int value"),
        ([*gen, "--weights", "int8"], "invalid choice: 'int8'"),
        ([*gen, "--weights", "float16", "--draft", str(run)], "--weights applies to plain decoding"),
        ([*gen, "--prompt", "d" * 32, "--draft", str(run)], "the prompt is 32 tokens and fills the pair's context (32"),
        (["run", "--out", str(run), "--quick"], "holds a run written by `llmlab train`"),
        ([*gen, "--weights", "float16", "--no-cache"], "--weights needs the KV cache"),
        ([*train, "--seed", "-1"], "--seed must be from 0 to 2**63 - 1, got -1"),
        ([*train, "--tokenizer", "bpe", "--vocab-size", "0"], "bpe_vocab must be at least 257 (the 256 bytes"),
        ([*train, "--tokenizer", "bpe", "--vocab-size", "10"], "bpe_vocab must be at least 257 (the 256 bytes"),
        ([*train, "--vocab-size", "300"], "--vocab-size sizes a BPE tokenizer; this run's tokenizer is char"),
        ([*train, "--vocab-size", "300", "--tokenizer-from", str(run)], "--tokenizer-from brings its run's tokenizer"),
        ([*train, "--set", "seed=-1"], "seed must be from 0 to 2**63 - 1, got -1"),
        ([*gen, "--seed", str(2**70)], "--seed must be from 0 to 2**63 - 1"),
        (
            [
                "knowledge",
                "locate",
                str(run),
                "--prompt",
                "{} f",
                "--subject",
                "def",
                "--target",
                "x",
                "--noise",
                "1e308",
            ],
            "noise must be a number from 0 to 100",
        ),
        (["serve", str(tmp / "nope")], "does not exist"),
        (["fly"], "invalid choice: 'fly'"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_damages_nothing(capsys, tmp_path, corpus_file, trained_run):
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in trained_run.iterdir() if p.is_file()}
    for argv, message in bad_inputs(tmp_path, corpus_file, trained_run):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, (argv, err)
        assert err.startswith("llmlab: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in trained_run.iterdir() if p.is_file()}
    assert after == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "tour").exists()  # nothing half-written
    assert [p.name for p in (tmp_path / "not-a-run").iterdir()] == ["notes.txt"]


def test_a_real_process_exits_2_without_a_traceback_even_for_non_utf8_arguments(trained_run):
    """Bytes that are not UTF-8 reach Python as surrogate escapes; they must not crash it."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmlab", "generate", str(trained_run), "--prompt", b"caf\xe9"],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == b"llmlab: error: --prompt is not valid UTF-8\n"


def test_ctrl_c_during_training_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus_file):
    out = tmp_path / "r"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmlab", "train", "--data", str(corpus_file), "--out", str(out), "--max-steps",
         "100000", "--set", "eval_interval=5", *TINY, "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (out / "metrics.csv").exists() and time.time() < deadline:  # written at step 5: training runs
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    assert result["stopped_by"] == "interrupt" and result["steps"] > 0
    assert load_run(out).model is not None


def test_generate_entropy_reports_every_tokens_entropy(capsys, trained_run):
    """Reference: generate_text's own Generation.entropies (checked against scipy in test_sampling)."""
    argv = ["generate", str(trained_run), "--prompt", "def f", "--max-new-tokens", "12", "--seed", "3", "--entropy"]
    out = json.loads(run_cli(capsys, *argv, "--json")[1])
    run = load_run(trained_run)
    g = generate_text(run.model, run.tokenizer, "def f", 12, SamplingConfig(1.0), seed=3)
    assert out["entropies"] == g.entropies and len(out["entropies"]) == len(out["token_ids"]) == 12
    assert "".join(out["token_texts"]) == out["text"]
    assert out["mean_entropy"] == pytest.approx(sum(g.entropies) / 12) and out["max_entropy"] == max(g.entropies)
    code, text, _ = run_cli(capsys, *argv, "--color", "always")
    assert code == 0 and "\x1b[48;5;" in text and "entropy" in text.splitlines()[-1]


def test_quoted_keeps_a_long_value_to_one_short_line():
    from llmlab.errors import quoted

    assert quoted("abc") == "'abc'" and quoted("x" * 60) == repr("x" * 60)
    long = "a\nb" * 10_000
    assert quoted(long) == f"{long[:30]!r}…{long[-30:]!r} (30,000 characters)" and "\n" not in quoted(long)
