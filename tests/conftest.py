"""Shared fixtures: tiny configs, a generated corpus, one trained run for the whole session.

Nothing here touches the network. Sizes follow STYLE.md: L=2, H=32, h=4, S=16.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from llmlab.config import ModelConfig, TrainConfig, preset

TINY = ModelConfig(vocab_size=48, block_size=16, n_layers=2, n_heads=4, d_model=32)

# One tiny config per architecture family: the notes' (post-LN, sinusoidal, ReLU, tied),
# GPT-2 style (pre-LN, learned, GELU) and Llama style (RoPE, SwiGLU, RMSNorm, grouped KV heads).
TINY_VARIANTS = {
    name: replace(preset(name).model, vocab_size=48, block_size=16, n_layers=2, n_heads=4, d_model=32, d_ff=None)
    for name in ("notes", "nanogpt-shakespeare-char", "gpt2", "llama-tiny")
}

TINY_TRAIN = replace(
    TrainConfig(), batch_size=8, max_steps=80, warmup_steps=5, eval_interval=40, eval_iters=2, lr=1e-2, min_lr=1e-3
)

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_corpus(n: int = 1500) -> str:
    """Python-looking text with structure a small model can learn (deterministic)."""
    ops = ["+", "-", "*"]
    return "".join(f"def f{i}(x, y):\n    return x {ops[i % 3]} y * {i % 7}\n\n" for i in range(n))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(make_corpus(), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A tiny notes-preset model trained for 80 steps; read-only for the tests that use it."""
    from llmlab.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    model_cfg = replace(TINY_VARIANTS["notes"], block_size=32)
    train(model_cfg, TINY_TRAIN, str(corpus_file), out, progress=False)
    return out


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The matmul-peak cache lives in a temporary folder: tests never write to ~/.cache."""
    import os

    os.environ["LLMLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to n for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """For modules of tiny models: a second thread only adds synchronisation on a shared 2-core machine."""
    with torch_threads(1):
        yield


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`llmlab ARGV...` in-process: (exit code, stdout, stderr)."""
    from llmlab.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@contextmanager
def serving(run: Path, timeout: float = 120) -> Iterator[str]:
    """`llmlab serve RUN --port 0 --json` in a subprocess: yields the URL its first line names.

    The first line is awaited for at most `timeout` seconds; a server that dies or hangs before
    it fails the test with what it wrote on stderr, instead of hanging the suite."""
    import json
    import selectors
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", str(run), "--port", "0", "--json"],
                                stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                ready = sel.select(timeout)
            line = proc.stdout.readline() if ready else ""
            if not line:
                err.seek(0)
                pytest.fail(f"llmlab serve printed no URL within {timeout} s: {err.read()[-2000:]}")
            yield json.loads(line)["url"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
