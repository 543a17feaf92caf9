"""Training: schedule, optimiser groups, a loss bound, exact resume, DDP, divergence."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab import train as train_lib
from llmlab.config import TrainConfig
from llmlab.entropy import cross_entropy
from llmlab.errors import TrainingDiverged, UserError
from llmlab.model import GPT
from llmlab.run_dir import load_run, load_train_state, read_metrics
from llmlab.train import lr_at, make_optimizer, train
from tests.conftest import TINY_TRAIN, TINY_VARIANTS, make_corpus, run_cli

CFG = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    """Reference: nanoGPT's get_lr (train.py), with progress = step / max_steps."""
    assert lr_at(0, 0.0, CFG) == pytest.approx(1e-3 / 101)
    assert lr_at(99, 99 / 2000, CFG) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, 100 / 2000, CFG) == pytest.approx(1e-3)
    mid = (100 + 2000) / 2
    assert lr_at(int(mid), mid / 2000, CFG) == pytest.approx((1e-3 + 1e-4) / 2)
    assert lr_at(2000, 1.0, CFG) == pytest.approx(1e-4)
    lrs = [lr_at(s, s / 2000, CFG) for s in range(100, 2001)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_a_time_limited_run_decays_with_the_clock():
    cfg = replace(CFG, max_minutes=1.0)
    assert lr_at(500, 1.0, cfg) == pytest.approx(1e-4)  # time is up: the floor, whatever the step


def test_matrices_decay_and_biases_and_gains_do_not():
    model = GPT(TINY_VARIANTS["notes"])
    decay, no_decay = make_optimizer(model, CFG).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_grad_norm_is_the_float64_norm_of_all_gradients():
    """Reference: numpy's float64 sum of squares; one gradient is a transposed (non-contiguous) view."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3000, 70, generator=g) * 1e-3, torch.randn(70, 500, generator=g).T,
             torch.randn(7, generator=g)]  # fmt: skip
    reference = math.sqrt(sum(float((t.double().numpy() ** 2).sum()) for t in grads))
    assert train_lib.grad_norm(grads).item() == pytest.approx(reference, rel=1e-6)
    mixed = [grads[0].bfloat16(), grads[2]]  # not all fp32: PyTorch's own total norm
    assert train_lib.grad_norm(mixed).item() == pytest.approx(torch.nn.utils.get_total_norm(mixed).item())


@pytest.mark.parametrize("scale", [1e-4, 10.0])  # gradients under the clip, and over it
def test_clip_and_step_equals_clip_grad_norm_then_the_step(scale):
    """Reference: `nn.utils.clip_grad_norm_` then PyTorch's per-tensor AdamW (`foreach=False`, the
    plain loop) with make_optimizer's groups and hyperparameters, on a copy of the model; the fused
    kernel's parameters and the clipped gradients it leaves in .grad are the same."""
    models = [GPT(TINY_VARIANTS["notes"]) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[1], CFG)
    assert all(group["fused"] for group in fused.param_groups)
    plain_groups = [{k: v for k, v in g.items() if k not in ("params", "fused", "foreach")} for g in fused.param_groups]
    plain = torch.optim.AdamW([{**g, "params": [p for p in models[0].parameters() if (p.dim() >= 2) == (i == 0)]}
                               for i, g in enumerate(plain_groups)], foreach=False)  # fmt: skip
    assert [g["weight_decay"] for g in plain.param_groups] == [CFG.weight_decay, 0.0]
    optimizers = [plain, fused]
    idx = torch.randint(0, models[0].cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m in models:
            (cross_entropy(m(idx), idx) * scale).backward()
        norm = torch.nn.utils.clip_grad_norm_(models[0].parameters(), 1.0)
        assert (norm > 1.0) == (scale > 1)
        optimizers[0].step()
        train_lib.clip_and_step(optimizers[1], 1.0)
        assert not hasattr(optimizers[1], "grad_scale")
        for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


def test_clip_and_step_without_a_fused_optimiser_or_a_clip():
    """SGD has no grad_scale: clip_grad_norm_ scales the gradients; max_norm 0 leaves them alone."""
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    sgd = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.tensor([30.0, 40.0])  # norm 50
    train_lib.clip_and_step(sgd, 5.0)
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 3.0, 4.0 - 4.0]), atol=1e-5, rtol=0)
    w.grad = torch.tensor([30.0, 40.0])
    train_lib.clip_and_step(sgd, 0.0)
    torch.testing.assert_close(w.detach(), torch.tensor([-30.0, -40.0]), atol=1e-4, rtol=0)


def unigram_entropy(text: str) -> float:
    counts = Counter(text)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_a_short_run_learns_more_than_character_frequencies(trained_run):
    """Bound: the entropy of the corpus' character frequencies (what a model that ignores
    context can reach). 80 steps of a 2-layer model must beat it by a wide margin."""
    summary = json.loads((trained_run / "summary.json").read_text())
    bound = unigram_entropy(make_corpus())
    assert summary["val_loss"] < bound - 1.0, (summary["val_loss"], bound)
    rows = read_metrics(trained_run / "metrics.csv")
    assert len(rows) == 80 and rows[-1]["val_loss"] is not None
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0


def test_run_directory_holds_every_file_of_the_contract(trained_run):
    for name in ("config.json", "tokenizer.json", "model.safetensors", "train_state.pt", "metrics.csv",
                 "loss.png", "summary.json", "data/train.bin", "data/val.bin"):  # fmt: skip
        assert (trained_run / name).is_file(), name
    assert load_train_state(trained_run)["step"] == 80


@contextmanager
def interrupt_after(n_steps: int):
    """Stand-in for Ctrl-C during step `n_steps` (the flag is read before each step)."""
    calls = []

    @contextmanager
    def flag():
        yield lambda: calls.append(1) or len(calls) > n_steps

    yield flag


def test_resume_gives_the_same_losses_and_weights_as_an_uninterrupted_run(tmp_path, corpus_file, monkeypatch):
    model_cfg = replace(TINY_VARIANTS["notes"], dropout=0.1)  # dropout: the RNG state must resume too
    cfg = replace(TINY_TRAIN, max_steps=16, eval_interval=4)
    straight = train(model_cfg, cfg, str(corpus_file), tmp_path / "a", progress=False)
    with interrupt_after(6) as flag:
        monkeypatch.setattr(train_lib, "_interrupt_flag", flag)
        first = train(model_cfg, cfg, str(corpus_file), tmp_path / "b", progress=False)
    monkeypatch.undo()
    assert (first.stopped_by, first.steps) == ("interrupt", 6)
    resumed = train(model_cfg, cfg, str(corpus_file), tmp_path / "b", resume=True, progress=False)
    assert resumed.steps == 16
    a, b = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed.val_loss == straight.val_loss


def test_cli_resume_keeps_the_saved_schedule(tmp_path, corpus_file, monkeypatch, capsys):
    """`llmlab train --out RUN --resume` without --max-steps finishes the saved run: its losses
    equal an uninterrupted run's. (It used to take the preset's max_steps, 2000, and with it a
    different learning-rate schedule.)"""
    args = ["--data", str(corpus_file), "--max-steps", "10", "--json"] + [f"--set={kv}" for kv in (
        "n_layers=1", "d_model=32", "n_heads=4", "block_size=16", "batch_size=4", "eval_interval=4",
        "eval_iters=1", "warmup_steps=2")]  # fmt: skip
    assert run_cli(capsys, "train", "--out", str(tmp_path / "a"), *args)[0] == 0
    with interrupt_after(6) as flag:
        monkeypatch.setattr(train_lib, "_interrupt_flag", flag)
        assert run_cli(capsys, "train", "--out", str(tmp_path / "b"), *args)[0] == 0
    monkeypatch.undo()
    code, out, _ = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--resume", "--json")
    assert code == 0 and json.loads(out)["steps"] == 10
    a, b = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [(r["lr"], r["train_loss"]) for r in a] == [(r["lr"], r["train_loss"]) for r in b]
    code, out, _ = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--resume", "--max-steps", "12", "--json")
    assert code == 0 and json.loads(out)["steps"] == 12  # a given --max-steps still extends it,
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["max_steps"] == 12  # for good
    summary = (tmp_path / "b" / "summary.json").read_text()
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--resume")
    assert code == 2 and err == f"llmlab: error: the run in {tmp_path / 'b'} has done its 12 steps; resume with " \
        "--max-steps above 12 to train further\n"  # fmt: skip
    assert (tmp_path / "b" / "summary.json").read_text() == summary  # nothing rewritten


def test_a_corrupt_token_cache_is_an_error_and_a_deleted_one_is_rebuilt_on_resume(tmp_path, corpus_file,
                                                                                monkeypatch, capsys):  # fmt: skip
    """Each corruption of data/ is one line and exit 2, with nothing written; deleting the folder,
    as the message says, makes the resume tokenize the data source again, and its losses equal an
    uninterrupted run's."""
    import shutil

    args = ["--data", str(corpus_file), "--max-steps", "8", "--json", "--tokenizer", "char"] + [
        f"--set={kv}" for kv in ("n_layers=1", "d_model=32", "n_heads=4", "block_size=16", "batch_size=4",
                                 "eval_interval=4", "eval_iters=1", "warmup_steps=2")]  # fmt: skip
    assert run_cli(capsys, "train", "--out", str(tmp_path / "a"), *args)[0] == 0
    with interrupt_after(4) as flag:
        monkeypatch.setattr(train_lib, "_interrupt_flag", flag)
        assert run_cli(capsys, "train", "--out", str(tmp_path / "b"), *args)[0] == 0
    monkeypatch.undo()
    data = tmp_path / "b" / "data"
    good = {f.name: f.read_bytes() for f in data.iterdir()}
    meta = json.loads(good["meta.json"])
    weights = (tmp_path / "b" / "model.safetensors").read_bytes()
    corruptions = {
        "train.bin holds": ("train.bin", good["train.bin"][: len(good["train.bin"]) // 4 * 2]),  # half the tokens
        "val.bin holds": ("val.bin", good["val.bin"] + b"\0\0"),  # one token more
        "holds token id 65535": ("train.bin", b"\xff" * len(good["train.bin"])),  # ids past the vocabulary
        "unreadable": ("meta.json", b"[1, 2]"),
        "unreadable ": ("val.bin", b""),
    }
    for message, (name, content) in corruptions.items():
        (data / name).write_bytes(content)
        code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--resume")
        assert code == 2 and message.strip() in err and err.count("\n") == 1, err
        assert f"delete the folder and `llmlab train --out {tmp_path / 'b'} --resume` rebuilds it" in err
        assert (tmp_path / "b" / "model.safetensors").read_bytes() == weights
        (data / name).write_bytes(good[name])
    metrics = (tmp_path / "b" / "metrics.csv").read_bytes()
    (tmp_path / "b" / "metrics.csv").write_bytes(metrics + b"5,0.001,abc,,1,1\n")  # damaged by hand
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--resume")
    assert code == 2 and err.count("\n") == 1 and "metrics.csv is corrupt: line 6 is not a row of numbers" in err
    (tmp_path / "b" / "metrics.csv").write_bytes(metrics)
    shutil.rmtree(data)
    code, out, err = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--resume", "--json")
    assert code == 0 and json.loads(out)["steps"] == 8
    assert f"rebuilt the token cache in {data} from {corpus_file} ({meta['train_tokens']:,} train" in err
    assert {f.name: f.read_bytes() for f in data.iterdir()} == good
    a, b = read_metrics(tmp_path / "a" / "metrics.csv"), read_metrics(tmp_path / "b" / "metrics.csv")
    assert [(r["lr"], r["train_loss"]) for r in a] == [(r["lr"], r["train_loss"]) for r in b]
    shutil.rmtree(data)  # a finished run (what `score --val` sends here) gets its cache back, and is told it is done
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--resume")
    assert code == 2 and "rebuilt the token cache" in err and "has done its 8 steps" in err
    assert {f.name: f.read_bytes() for f in data.iterdir()} == good


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus_file, monkeypatch):
    cfg = replace(TINY_TRAIN, max_steps=30, eval_interval=10)
    calls: list[int] = []
    monkeypatch.setattr(train_lib, "cross_entropy", lambda lo, t: _nan_after(lo, t, calls, 15))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 16; the last good checkpoint"):
        train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "r", progress=False)
    assert load_train_state(tmp_path / "r")["step"] == 10
    run = load_run(tmp_path / "r")
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.parametrize("existed", [False, True])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing_behind(tmp_path, corpus_file, monkeypatch,
                                                                           existed):  # fmt: skip
    """So that the same --out can be trained again: a directory the run created is removed, an
    empty one the user gave is left empty."""
    cfg = replace(TINY_TRAIN, max_steps=30, eval_interval=10)
    out = tmp_path / "r"
    if existed:
        out.mkdir()
    calls: list[int] = []
    monkeypatch.setattr(train_lib, "cross_entropy", lambda lo, t: _nan_after(lo, t, calls, 3))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 4; there was no checkpoint yet"):
        train(TINY_VARIANTS["notes"], cfg, str(corpus_file), out, progress=False)
    assert (list(out.iterdir()) == []) if existed else not out.exists()
    monkeypatch.undo()
    assert train(TINY_VARIANTS["notes"], replace(cfg, max_steps=2), str(corpus_file), out, progress=False).steps == 2


def _nan_after(logits, targets, calls, n_train_steps):
    """The real loss, turned NaN from training step n_train_steps + 1 on (evaluation untouched)."""
    loss = cross_entropy(logits, targets)
    if logits.requires_grad:
        calls.append(1)
        if len(calls) > n_train_steps:
            return loss * float("nan")
    return loss


def test_training_refuses_to_overwrite_an_existing_run(trained_run, corpus_file):
    before = (trained_run / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train(TINY_VARIANTS["notes"], TINY_TRAIN, str(corpus_file), trained_run, progress=False)
    assert (trained_run / "model.safetensors").read_bytes() == before


def test_ddp_with_two_processes_equals_one_process_with_twice_the_batch(tmp_path, corpus_file):
    """Reference: the same run in one process with batch 2B. torchrun on CPU (gloo)."""
    common = ["--data", str(corpus_file), "--tokenizer", "char", "--max-steps", "6", "--json",
              "--set", "n_layers=2", "--set", "d_model=32", "--set", "block_size=16", "--set", "warmup_steps=2",
              "--set", "eval_interval=3", "--set", "eval_iters=2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmlab"]
    two = subprocess.run([*run, "train", "--out", str(tmp_path / "two"), *common, "--set", "batch_size=4"],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    printed = json.loads(two.stdout)  # one object: only rank 0 reports
    assert printed["run_dir"] == str(tmp_path / "two") and printed["steps"] == 6
    one = subprocess.run([sys.executable, "-m", "llmlab", "train", "--out", str(tmp_path / "one"), *common,
                          "--set", "batch_size=8"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    w1, w2 = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    l1 = [r["train_loss"] for r in read_metrics(tmp_path / "one" / "metrics.csv")]
    l2 = [r["train_loss"] for r in read_metrics(tmp_path / "two" / "metrics.csv")]
    assert l2 == pytest.approx(l1, abs=1e-5)
    assert not Path(tmp_path / "two" / "model.safetensors.tmp").exists()


def test_bfloat16_autocast_trains_to_about_the_same_loss(tmp_path, corpus_file):
    """Reference: the same run in float32; autocast changes rounding, not what is learned."""
    cfg = replace(TINY_TRAIN, max_steps=30, eval_interval=30)
    fp32 = train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "fp32", progress=False)
    bf16 = train(TINY_VARIANTS["notes"], replace(cfg, dtype="bfloat16"), str(corpus_file), tmp_path / "bf16",
                 progress=False)  # fmt: skip
    assert abs(bf16.val_loss - fp32.val_loss) < 0.1
    assert bf16.val_loss != fp32.val_loss  # autocast really ran in bfloat16


def test_bf16_autocast_on_a_cpu_that_emulates_it_is_warned_about(monkeypatch, tmp_path):
    """Reference: /proc/cpuinfo's flags, written here for three CPUs."""
    from llmlab import accounting
    from llmlab.train import warn_if_bf16_is_emulated

    cpuinfo = tmp_path / "cpuinfo"
    real_open = open

    def fake_open(path, *a, **k):
        return real_open(cpuinfo, *a, **k) if path == "/proc/cpuinfo" else real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    bf16, fp32 = replace(TINY_TRAIN, dtype="bfloat16"), TINY_TRAIN
    cpu = torch.device("cpu")
    for flags, native in (("fpu sse avx2 fma", False), ("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16", True)):
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert accounting.cpu_has_native_bf16() is native
        warning = warn_if_bf16_is_emulated(cpu, bf16)
        assert (warning is not None) == (not native) and warn_if_bf16_is_emulated(cpu, fp32) is None
        assert native or "no bf16 instructions" in warning
    cpuinfo.write_text("processor\t: 0\n")  # no flags line: unknown, no warning
    assert accounting.cpu_has_native_bf16() is None and warn_if_bf16_is_emulated(cpu, bf16) is None


def test_torch_compile_trains_like_eager(tmp_path, corpus_file, capsys):
    """Reference: the same run uncompiled; inductor fuses and reorders float ops, nothing more."""
    cfg = replace(TINY_TRAIN, max_steps=3, eval_interval=3)
    eager = train(TINY_VARIANTS["gpt2"], cfg, str(corpus_file), tmp_path / "eager", progress=False)
    compiled = train(TINY_VARIANTS["gpt2"], replace(cfg, compile=True), str(corpus_file), tmp_path / "compiled",
                     progress=False)  # fmt: skip
    a, b = read_metrics(tmp_path / "eager" / "metrics.csv"), read_metrics(tmp_path / "compiled" / "metrics.csv")
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], abs=1e-4)
    assert compiled.val_loss == pytest.approx(eager.val_loss, abs=1e-4)
    assert "torch.compile failed" not in capsys.readouterr().err  # it really compiled


def test_a_failing_torch_compile_falls_back_to_eager_with_one_warning(tmp_path, corpus_file, monkeypatch, capsys):
    """Reference: the same run uncompiled, which the fallback must equal exactly."""

    def broken_compile(fn):
        def call(*args, **kwargs):
            raise RuntimeError("InductorError: no working C++ compiler found\n(and a long traceback)")

        return call

    cfg = replace(TINY_TRAIN, max_steps=3, eval_interval=3)
    eager = train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "eager", progress=False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = train(TINY_VARIANTS["notes"], replace(cfg, compile=True), str(corpus_file), tmp_path / "fb",
                     progress=False)  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("torch.compile failed") == 1 and "no working C++ compiler found" in err
    assert "long traceback" not in err
    assert fallback.val_loss == eager.val_loss and fallback.steps == 3


def test_compile_falls_back_only_at_the_first_call(monkeypatch, capsys):
    calls = []

    def compiled_then_broken(fn):
        def call(x):
            calls.append(x)
            if len(calls) > 1:
                raise RuntimeError("out of memory")
            return fn(x)

        return call

    monkeypatch.setattr(torch, "compile", compiled_then_broken)
    forward = train_lib.compiled_or_eager(lambda x: x + 1)
    assert forward(1) == 2
    with pytest.raises(RuntimeError, match="out of memory"):  # a later error is the program's, not compile's
        forward(2)
    assert "torch.compile failed" not in capsys.readouterr().err


def test_max_minutes_stops_the_run_on_the_clock(tmp_path, corpus_file):
    cfg = replace(TINY_TRAIN, max_steps=100_000, max_minutes=0.01)  # 0.6 s
    result = train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "r", progress=False)
    assert result.stopped_by == "max_minutes" and 0 < result.steps < 100_000
    assert load_train_state(tmp_path / "r")["step"] == result.steps  # the last steps were saved too


def test_a_run_stopped_by_the_clock_just_after_a_checkpoint_saves_that_its_minutes_are_spent(
        tmp_path, corpus_file, monkeypatch):  # fmt: skip
    """The clock runs out between a checkpoint and the next step: a bare resume must not train on."""
    offset = [0.0]
    clock = time.perf_counter
    monkeypatch.setattr(train_lib.time, "perf_counter", lambda: clock() + offset[0])
    save = train_lib._Loop.evaluate_and_save

    def save_then_jump(loop):
        save(loop)
        offset[0] += 3600.0  # an hour passes right after the first checkpoint

    monkeypatch.setattr(train_lib._Loop, "evaluate_and_save", save_then_jump)
    cfg = replace(TINY_TRAIN, max_steps=100, eval_interval=2, max_minutes=10.0)
    result = train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "r", progress=False)
    assert (result.stopped_by, result.steps) == ("max_minutes", 2)
    assert load_train_state(tmp_path / "r")["elapsed"] >= 600  # was the time of the checkpoint, under a second
    with pytest.raises(UserError, match="has used its 10 minutes"):
        train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "r", resume=True, progress=False)


def test_init_from_fine_tunes_starting_from_another_runs_weights(tmp_path, trained_run, corpus_file):
    """Reference: the base run's own weights and config; one step at a negligible LR changes nothing."""
    cfg = replace(TINY_TRAIN, max_steps=1, eval_interval=1, lr=1e-12, min_lr=0.0, warmup_steps=0)
    result = train(TINY_VARIANTS["llama-tiny"], cfg, str(corpus_file), tmp_path / "ft", init_from=str(trained_run),
                   progress=False)  # fmt: skip
    base, tuned = load_run(trained_run), load_run(tmp_path / "ft")
    assert tuned.model_cfg == base.model_cfg  # the base's architecture, not the one passed in
    assert tuned.tokenizer.to_json() == base.tokenizer.to_json()
    for (name, a), b in zip(base.model.state_dict().items(), tuned.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)
    base_summary = json.loads((trained_run / "summary.json").read_text())
    assert result.val_loss == pytest.approx(base_summary["val_loss"], abs=1e-4)


def test_training_reports_exact_flops_per_second_and_mfu_against_the_cached_peak(tmp_path, corpus_file, monkeypatch):
    """Reference: accounting.train_step_flops (itself checked against FlopCounterMode) × tokens/s."""
    from llmlab.accounting import cached_peak, peak_flops, train_step_flops

    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    cfg = replace(TINY_TRAIN, max_steps=4, eval_interval=4)
    assert cached_peak("cpu", "float32") is None
    unmeasured = train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "a", progress=False)
    assert unmeasured.mfu is None  # training never measures the peak by itself
    peak_flops("cpu", "float32", measure=lambda device, dtype: 2e9)  # as `llmlab count --peak` would cache it
    result = train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "b", progress=False)
    model_cfg = load_run(tmp_path / "b").model_cfg
    S = model_cfg.block_size
    assert result.flops_per_second == pytest.approx(result.tokens_per_second * train_step_flops(model_cfg, 1, S) / S)
    assert result.mfu == pytest.approx(result.flops_per_second / 2e9)


def test_an_unmeasured_peak_names_the_command_that_measures_it_for_this_process(capsys, monkeypatch):
    """The summary's FLOP/s line: with no cached peak it names `accounting.peak_command` for the
    device trained on (under torchrun, with the process's one thread), and the device stays out of
    summary.json, whose keys the README lists."""
    import argparse

    from llmlab.accounting import peak_command
    from llmlab.cli.train import report
    from llmlab.train import TrainResult

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    fields = dict(run_dir="r", steps=1, train_loss=1.0, val_loss=1.0, val_perplexity=2.7, val_tokens=8,
                  tokens_per_second=1.0, flops_per_second=1e9, mfu=None, elapsed_seconds=1.0,
                  stopped_by="max_steps", params=10)  # fmt: skip
    for device in ("cpu", "cuda"):
        report(argparse.Namespace(json=False), TrainResult(**fields, device=device))
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("FLOP/s"))
        assert line.endswith(f"MFU: run `{peak_command(device)}` once to measure the peak")
    assert peak_command("cpu").startswith(f"OMP_NUM_THREADS={torch.get_num_threads()} ")
    assert "device" not in TrainResult(**fields, device="cuda").to_json()
    report(argparse.Namespace(json=False), TrainResult(**{**fields, "mfu": 0.25}))
    assert "MFU 25.0% of the measured matmul peak" in capsys.readouterr().out


def _tiny_run(tmp_path, corpus_file, name, **train):
    cfg = replace(TINY_TRAIN, **{"max_steps": 4, "eval_interval": 2, "eval_iters": 1, **train})
    return train_lib.train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / name, progress=False)


def test_resume_with_a_train_state_that_does_not_fit_is_one_line(tmp_path, corpus_file, capsys):
    """A train_state.pt that loads but is no state of this run (a foreign dict, a step as text,
    another model's optimiser) is one line and exit 2; they were a KeyError, a TypeError and the
    optimiser's ValueError."""
    _tiny_run(tmp_path, corpus_file, "r")
    other = replace(TINY_VARIANTS["notes"], n_layers=TINY_VARIANTS["notes"].n_layers + 1)
    train_lib.train(other, replace(TINY_TRAIN, max_steps=2, eval_interval=2, eval_iters=1), str(corpus_file),
                    tmp_path / "other", progress=False)  # fmt: skip
    good = load_train_state(tmp_path / "r")
    cases = {
        "lacks a valid 'step'": {"foo": 1},
        "lacks a valid 'elapsed'": {**good, "elapsed": "10"},
        "lacks a valid 'step'  ": {**good, "step": "10"},
        "does not fit this run (ValueError); is it another run's?": load_train_state(tmp_path / "other"),
    }
    config = (tmp_path / "r" / "config.json").read_text()
    for message, state in cases.items():
        torch.save(state, tmp_path / "r" / "train_state.pt")
        code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "r"), "--resume", "--max-steps", "8")
        assert code == 2 and err.count("\n") == 1 and message.strip() in err, (message, err)
        assert (tmp_path / "r" / "config.json").read_text() == config  # its max_steps not rewritten


def test_tokens_per_second_counts_every_step_when_metrics_csv_was_deleted(tmp_path, corpus_file):
    """Reference: steps × tokens per step ÷ the training time train_state.pt records. With the
    metrics rows of the resumed steps alone (metrics.csv deleted, as its error advises), the rate
    divided their count by the whole run's time: 2.4× too low in the review that found it."""
    _tiny_run(tmp_path, corpus_file, "r")
    (tmp_path / "r" / "metrics.csv").unlink()
    cfg = replace(TINY_TRAIN, max_steps=6)
    result = train_lib.train(TINY_VARIANTS["notes"], cfg, "unused", tmp_path / "r", resume=True, progress=False)
    state = load_train_state(tmp_path / "r")
    tokens_per_step = TINY_TRAIN.batch_size * TINY_TRAIN.grad_accum * TINY_VARIANTS["notes"].block_size
    assert state["step"] == 6
    assert result.tokens_per_second == pytest.approx(6 * tokens_per_step / state["train_time"])


def test_a_run_out_of_minutes_at_once_still_takes_a_step_and_saves_it(tmp_path, corpus_file):
    """--max-minutes 1e-9: one step, a checkpoint and a finite loss; before, 0 steps, a NaN train
    loss, exit 0, and a run directory without weights that neither resume nor a new run took."""
    result = _tiny_run(tmp_path, corpus_file, "r", max_minutes=1e-9, max_steps=100)
    assert result.steps == 1 and result.stopped_by == "max_minutes" and math.isfinite(result.train_loss)
    assert load_run(tmp_path / "r").model is not None


def test_a_run_killed_before_its_first_checkpoint_says_to_delete_it(tmp_path, corpus_file, capsys):
    """What SIGTERM leaves of a new run (config.json, tokenizer.json and data/, no weights): both
    a new run and --resume say what it is, where they pointed at each other."""
    _tiny_run(tmp_path, corpus_file, "r")
    (tmp_path / "r" / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "r"), "--resume")
    assert code == 2 and "stopped before its first checkpoint (killed, say): there is nothing to resume" in err
    code, _, err = run_cli(capsys, "train", "--data", str(corpus_file), "--out", str(tmp_path / "r"))
    assert code == 2 and "stopped before its first checkpoint (killed, say), so there is nothing to resume" in err


def test_a_borrowed_tokenizer_is_the_one_config_json_names(tmp_path, corpus_file, trained_run, capsys):
    """--tokenizer beside --tokenizer-from is refused (it was ignored); and config.json names the
    borrowed tokenizer's kind, not the preset's (a char tokenizer was recorded as bpe)."""
    code, _, err = run_cli(capsys, "train", "--data", str(corpus_file), "--out", str(tmp_path / "x"),
                           "--tokenizer-from", str(trained_run), "--tokenizer", "bpe")  # fmt: skip
    assert code == 2 and "--tokenizer-from brings its run's tokenizer and vocabulary; drop --tokenizer" in err
    cfg = replace(TINY_TRAIN, max_steps=2, eval_interval=2, eval_iters=1, tokenizer="bpe")
    train(TINY_VARIANTS["notes"], cfg, str(corpus_file), tmp_path / "r", tokenizer_from=str(trained_run),
          progress=False)  # fmt: skip
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]["tokenizer"]
    assert saved == json.loads((trained_run / "tokenizer.json").read_text())["type"] == "char"


@pytest.mark.parametrize("name", ["notes", "llama-tiny", "gpt2"])
def test_the_memory_check_counts_what_the_model_has(name, monkeypatch):
    """check_fits_in_memory's count (one layer, plus n_layers − 1 more) against the model's own
    parameter count (reference: sum of p.numel(), on the meta device), and its refusal past the
    machine's memory."""
    from llmlab.config import preset

    cfg = preset(name).model
    with torch.device("meta"):
        real = sum(p.numel() for p in GPT(cfg).parameters())
    train_lib.check_fits_in_memory(cfg, torch.device("cpu"))  # fits: no error
    memory = 16 * real - 1  # bytes: a machine that 16 bytes a parameter would just overflow (pages of 1 byte)
    monkeypatch.setattr(train_lib.os, "sysconf", lambda key: memory if key == "SC_PHYS_PAGES" else 1)
    with pytest.raises(UserError, match=f"the model would have {real:,} parameters: training it on the CPU needs"):
        train_lib.check_fits_in_memory(cfg, torch.device("cpu"))
    train_lib.check_fits_in_memory(cfg, torch.device("cuda"))  # its fp32 weights, 4 bytes a parameter, fit
