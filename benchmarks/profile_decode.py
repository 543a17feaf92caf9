"""Where one decoded token's time goes: the profile behind the decoding rows of BENCHMARKS.md.

    python -m benchmarks.profile_decode [--shape tiny|124M] [--peer] [--top 12] [--device cpu|cuda]
                                        [--weights float16|bfloat16|packed] [--peer-dtype float16|bfloat16]

Decodes as `bench_decode` does (batch 1, greedy, KV cache, 16-token prompt, 128 new tokens), once
plainly for the wall time and once under PyTorch's profiler. Per token it prints the wall time,
the time spent inside ATen operators (the profiler's self CPU time, summed), and the rest: Python,
nn.Module calls and dispatch, which no kernel does. Then the operators that take the most time,
with their calls per token. `--peer` profiles transformers' `generate` on the same weights too.
`--weights` decodes llmlab's side with copies of its matrices (`llmlab.matvec.weights_in`);
`--peer-dtype` casts transformers' whole model, as `torch_dtype=` does. On a GPU it also prints
how long the GPU ran kernels per token, and which: the rest of a token's wall time the GPU waits
for the CPU to launch them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import ExitStack

import torch

from benchmarks.bench_decode import NEW, PROMPT
from benchmarks.common import at_least_one, cuda_runtime, operator_table, sync
from benchmarks.profile_train import Profile, profile
from benchmarks.shapes import model_pair
from llmlab import matvec
from llmlab.matvec import weights_in
from llmlab.sampling import SamplingConfig, generate_ids


def decoders(shape: str, stack: ExitStack, weights: torch.dtype | None = None, peer_dtype: torch.dtype = torch.float32,
             device: str = "cpu") -> dict[str, Callable[[], object]]:  # fmt: skip
    """The two decoders, each waiting for the device at its end; with `weights`, llmlab's copies
    (16-bit, or fp32 packed) are made once, held by `stack`."""
    ours, hf = model_pair(shape, min_positions=PROMPT + NEW)
    ours.to(device)
    if weights is not None:
        stack.enter_context(weights_in(ours, weights))
    hf.to(device, peer_dtype)
    hf.generation_config.pad_token_id = hf.generation_config.eos_token_id = None
    idx = torch.randint(0, ours.cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    greedy = SamplingConfig(0.0)

    def ours_run() -> None:
        [t for t, _ in generate_ids(ours, idx, NEW, greedy)]
        sync(idx.device)

    def hf_run() -> None:
        hf.generate(idx, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        sync(idx.device)

    return {"llmlab": ours_run, "transformers": hf_run}


@torch.inference_mode()
def profile_one(run: Callable[[], object], reps: int = 5, device: str = "cpu") -> Profile:
    """One decoding as a warm-up, `reps` timed, then one profiled; the figures per token."""
    return profile(run, reps, 1, device, warmup=1, per_call=NEW)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "124M"])
    p.add_argument("--peer", action="store_true", help="profile transformers' generate as well")
    p.add_argument("--top", type=at_least_one, default=12, help="operators to list")
    p.add_argument("--weights", choices=["float16", "bfloat16", "packed"],
                   help="llmlab with 16-bit copies of its matrices, or fp32 ones packed for oneDNN")  # fmt: skip
    p.add_argument("--peer-dtype", choices=["float16", "bfloat16"], help="transformers' model cast to this dtype")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    if args.weights == "packed" and (not matvec.ONEDNN or args.device != "cpu"):
        p.error("--weights packed needs the CPU and PyTorch built with oneDNN")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    dtype = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16, "packed": torch.float32}
    with ExitStack() as stack:
        runs = decoders(args.shape, stack, dtype[args.weights], dtype[args.peer_dtype] or torch.float32, args.device)
        for name in ["llmlab", "transformers"] if args.peer else ["llmlab"]:
            prof = profile_one(runs[name], device=args.device)
            ops, runtime = cuda_runtime(prof.ops)
            wall, in_ops = prof.wall_ms, sum(ms for _, ms, _ in ops)
            rest = max(wall - in_ops - runtime, 0)
            print(f"\n{name}, {args.shape}, {args.device}: {wall:.3f} ms per token wall; {in_ops:.3f} ms inside "
                  f"ATen operators (profiled run); the rest, {rest:.3f} ms, is Python and dispatch")  # fmt: skip
            if args.device == "cuda":
                busy = prof.gpu_busy_ms
                print(f"the GPU ran kernels for {busy:.3f} ms per token ({busy / wall:.0%} of its wall time); the "
                      f"CPU spent {runtime:.3f} ms in the CUDA runtime, launching them and waiting")  # fmt: skip
            print(operator_table(ops, "token", args.top))
            if prof.kernels:
                print(operator_table(prof.kernels, "token", args.top, kind="GPU kernel"))


if __name__ == "__main__":
    main()
