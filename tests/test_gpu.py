"""The CUDA paths, against the CPU and transformers: skipped without a GPU (CI has none), run by
`benchmarks/gpu.sh` on a lent one. Each fast path is tested equal to its plain one, as on the CPU.

References: llmlab's own CPU forward (fp32, TF32 off, PyTorch's default), transformers'
GPT2LMHeadModel on the same weights and device, and llmlab's eager forward for torch.compile.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from llmlab.model import GPT
from tests.conftest import TINY_TRAIN, TINY_VARIANTS, requires_gpu

pytestmark = [requires_gpu, pytest.mark.gpu]


@pytest.mark.parametrize("arch", sorted(TINY_VARIANTS))
def test_cuda_logits_equal_the_cpu_ones(arch):
    torch.manual_seed(0)
    model = GPT(TINY_VARIANTS[arch]).eval()
    idx = torch.randint(0, 48, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cpu = model(idx)
        cuda = model.to("cuda")(idx.to("cuda")).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)


def test_gpt2_on_cuda_gives_transformers_logits():
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmlab.hf import from_hf_model

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    ours = from_hf_model(hf).to("cuda").eval()
    hf.to("cuda")
    idx = torch.randint(0, 300, (2, 32), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_greedy_decoding_on_cuda_takes_the_cpu_tokens(trained_run):
    """The KV-cache decode loop on the GPU: the same 48 greedy tokens as on the CPU."""
    from llmlab.run_dir import load_run
    from llmlab.sampling import SamplingConfig, generate_ids

    run = load_run(trained_run)
    idx = torch.tensor([run.tokenizer.encode("def f1(x, y):\n")])
    cpu = [t.item() for t, _ in generate_ids(run.model, idx, 48, SamplingConfig(0.0))]
    gpu_model = load_run(trained_run, device="cuda").model
    cuda = [t.item() for t, _ in generate_ids(gpu_model, idx.to("cuda"), 48, SamplingConfig(0.0))]
    assert cuda == cpu


def test_bf16_autocast_and_torch_compile_on_cuda_agree_with_fp32_eager():
    """bf16 autocast within 5% of the logits' spread; the compiled forward equal to eager in fp32."""
    torch.manual_seed(0)
    model = GPT(TINY_VARIANTS["gpt2"]).to("cuda").eval()
    idx = torch.randint(0, 48, (4, 16), device="cuda")
    with torch.no_grad():
        eager = model(idx)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(idx).float()
        compiled = torch.compile(model)(idx)
    assert (bf16 - eager).abs().max() < 0.05 * eager.std()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_training_on_cuda_follows_the_cpu_losses(tmp_path, corpus_file):
    """Ten steps of the same run (same seed, same batches, no dropout) on each device: the fused
    CUDA AdamW and kernels give the CPU's losses within 1e-3."""
    from llmlab.run_dir import read_metrics
    from llmlab.train import train

    cfg = replace(TINY_TRAIN, max_steps=10, eval_interval=5, eval_iters=1)
    losses = {}
    for device in ("cpu", "cuda"):
        train(TINY_VARIANTS["gpt2"], replace(cfg, device=device), str(corpus_file), tmp_path / device, progress=False)
        losses[device] = [r["train_loss"] for r in read_metrics(tmp_path / device / "metrics.csv")]
    assert len(losses["cuda"]) == len(losses["cpu"]) >= 2
    torch.testing.assert_close(losses["cuda"], losses["cpu"], rtol=1e-3, atol=1e-3)


def test_torchrun_trains_on_the_gpu_and_names_the_peak_command(tmp_path, corpus_file):
    """`torchrun --nproc_per_node 1 -m llmlab train --device cuda` (NCCL): a run directory whose
    summary says it trained; then `llmlab count --peak --device cuda` caches the GPU's peak."""
    env = os.environ | {"LLMLAB_CACHE": str(tmp_path / "cache")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    argv = [*torchrun, "-m", "llmlab", "train", "--data", str(corpus_file), "--out", str(tmp_path / "run"),
            "--device", "cuda", "--max-steps", "20", "--set", "n_layers=2", "--set", "d_model=32",
            "--set", "n_heads=4", "--set", "block_size=32", "--set", "batch_size=8"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["mfu"] is None and summary["tokens_per_second"] > 0
    assert "MFU: run `llmlab count --peak --device cuda` once" in done.stdout, done.stdout
    peak = subprocess.run([sys.executable, "-m", "llmlab", "count", "--peak", "--device", "cuda", "--json"],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert peak.returncode == 0, peak.stderr[-2000:]
    cached = json.loads((tmp_path / "cache" / "peak.json").read_text())
    assert any(key.startswith("cuda/float32/") and value > 1e12 for key, value in cached.items()), cached


# Last in the file: a capture that fails can leave the CUDA context unusable for the tests after it.
@pytest.mark.parametrize("name", ["gpt2", "llama-tiny"])
def test_cuda_graph_decoding_gives_the_eager_tokens_and_distributions(name, monkeypatch):
    """llmlab.static_decode's replayed graph against eager steps on the same GPU: 30 tokens after
    a prompt of 5 in a context of 16 (the last ones through the sliding window), greedy and
    sampled with one seed, the same tokens and distributions within 1e-5. In fp32 at batch 2,
    and at batch 1 with bf16 copies of the matrices (`weights_in`; they serve one-row products
    only, so the test counts that `matvec16` ran). The graph is captured once per call."""
    from llmlab import matvec, static_decode
    from llmlab.sampling import SamplingConfig, generate_ids

    made, products = [], []

    class Counted(static_decode.GraphedStep):
        def __init__(self, model, cache):
            super().__init__(model, cache)
            made.append(cache.pos)

    def counted_matvec16(*args):
        products.append(1)
        return plain_matvec16(*args)

    plain_matvec16 = matvec.matvec16
    monkeypatch.setattr(static_decode, "GraphedStep", Counted)
    monkeypatch.setattr(matvec, "matvec16", counted_matvec16)
    torch.manual_seed(0)
    model = GPT(replace(TINY_VARIANTS[name], d_model=384)).to("cuda").eval()  # matrices large enough for copies
    idx = torch.randint(0, 48, (2, 5), device="cuda")
    for dtype, prompt in ((None, idx), (torch.bfloat16, idx[:1])):
        for cfg in (SamplingConfig(0.0), SamplingConfig(1.0, top_k=20)):
            runs = []
            for graph in (False, True):
                products.clear()
                with matvec.weights_in(model, dtype) if dtype else contextlib.nullcontext():
                    seed = torch.Generator("cuda").manual_seed(3)
                    steps = list(generate_ids(model, prompt, 30, cfg, seed, cuda_graph=graph))
                assert (len(products) > 0) == (dtype is not None), (dtype, graph, len(products))
                runs.append((torch.stack([t for t, _ in steps], 1), torch.stack([p for _, p in steps], 1)))
            assert torch.equal(runs[1][0], runs[0][0]), (dtype, cfg)
            torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-5)
    assert made == [5, 5, 5, 5]
