"""Decoding tokens/s, batch 1, greedy, KV cache, a 16-token prompt and 128 new tokens: llmlab's
generate against transformers' `generate` on the same weights and dtype; optionally llmlab with
16-bit copies of its matrices (`llmlab.matvec.weights_in`) against transformers in fp32. The tiny
shape's context is widened from 64 to 144 positions so that neither side slides a window."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch

from benchmarks.common import interleaved_medians, sync
from benchmarks.shapes import model_pair
from llmlab.matvec import weights_in
from llmlab.sampling import SamplingConfig, generate_ids

PROMPT, NEW = 16, 128


def bench(
    shape: str,
    reps: int = 5,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    probe: Callable[[], object] | None = None,
    weights: torch.dtype | None = None,
) -> tuple[float, float, int, float | None]:
    """Median tokens/s (llmlab, transformers), how many leading tokens the two decoders agree
    on (all NEW when they are the same), and the median seconds of `probe()` (a ceiling's
    measurement) timed in the same turns, if given. `weights` (torch.float16 or torch.bfloat16)
    decodes llmlab's side inside `weights_in(model, weights)`."""
    ours, hf = model_pair(shape, min_positions=PROMPT + NEW)
    ours.to(device, dtype)
    hf.to(device, dtype)
    hf.generation_config.pad_token_id = hf.generation_config.eos_token_id = None
    idx = torch.randint(0, ours.cfg.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    greedy = SamplingConfig(0.0)

    def ours_run() -> torch.Tensor:
        with torch.inference_mode(), weights_in(ours, weights) if weights else nullcontext():
            out = torch.stack([t for t, _ in generate_ids(ours, idx, NEW, greedy)], 1)
        sync(idx.device)
        return out

    def hf_run() -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(idx, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, use_cache=True)
        sync(idx.device)
        return out[:, PROMPT:]

    differ = (ours_run() != hf_run())[0].nonzero()
    agree = int(differ[0]) if len(differ) else NEW
    ours_s, hf_s, *probe_s = interleaved_medians([ours_run, hf_run] + ([probe] if probe else []), reps)
    return NEW / ours_s, NEW / hf_s, agree, probe_s[0] if probe_s else None
