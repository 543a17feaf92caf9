"""Decoding on a GPU without per-token launch overhead: one CUDA graph, captured once, replayed per token.

At batch 1 a decoded token of GPT-2 124M reads 498 MB of weights, 0.12 ms at an H200's 4 TB/s,
but eager PyTorch launches each of its many small kernels from Python, one after another on
the CPU: 2.5 ms a token on an H200, 5% of the bandwidth ceiling (`bash benchmarks/gpu.sh`). A CUDA
graph records those launches once and replays them as one. It replays fixed shapes and fixed
addresses, which a `KVCache` does not have (each step reads one key more, at a position kept in
Python), so `StaticKVCache` keeps its position on the device, writes each new key at it, and
hands attention every key with a mask that hides those not yet written; `GraphedStep` captures
`model(one token per row, cache)` against it. `llmlab.sampling.generate_ids(..., cuda_graph=True)`
takes this path on CUDA; sampling stays outside the graph.

The static cache works on any device and gives a `KVCache`'s logits (tests/test_model.py), and
`generate_ids`' loop around a step is checked on the CPU (tests/test_sampling.py). The graph
needs CUDA: tests/test_gpu.py checks that it gives the eager tokens and distributions (of an
fp32 model, and with bf16 copies of its matrices), and
`bash benchmarks/gpu.sh` times it against eager steps. Until those have run on a GPU it is
opt-in, not `generate_ids`' default.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from llmlab.config import ModelConfig
from llmlab.model import KVCache

MIN_REPLAYS = 8  # fewer would not repay the capture's three forwards (two warm-ups and the recorded one); a guess


class StaticKVCache(KVCache):
    """A `KVCache` whose every read has one shape: all `max_len` keys and values, a mask [S, T]
    saying which a new query may see, and the position as a device tensor `pos_t` (`pos` is its
    copy in Python, for the checks that need one).

    The buffers are zeroed: keys not yet written are read, then masked, and an uninitialised NaN
    would survive the mask (NaN − ∞ is NaN)."""

    def __init__(self, cfg: ModelConfig, batch: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, max_len: int | None = None) -> None:  # fmt: skip
        super().__init__(cfg, batch, device, dtype, max_len)
        self.k.zero_()
        self.v.zero_()
        self.pos_t = torch.zeros((), dtype=torch.long, device=device)  # the filled positions, on the device
        self.steps = torch.arange(self.max_len, device=device)  # [T]: 0 … max_len − 1
        self.written: Tensor | None = None  # [S]: where this forward's keys go (set by `positions`)

    def positions(self, S: int, device: torch.device) -> Tensor:
        """[S] positions from `pos_t`, and the mask [S, T]: query i sees key j ≤ its position."""
        self.written = self.pos_t + self.steps[:S]  # [S]
        self.mask = self.steps[None, :] <= self.written[:, None]  # [S, T]
        return self.written

    def advance(self, S: int) -> None:
        self.pos += S
        self.pos_t += S  # in place: a graph that recorded it moves the position at each replay

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, h_kv, S, D] at this forward's positions; return all keys and values [B, h_kv, T, D]."""
        assert self.written is not None, "positions() comes first: the model calls it before its layers"
        keys, values = self.k[layer], self.v[layer]  # fresh views: a graph records this once, so they cost nothing
        keys.index_copy_(2, self.written, k)
        values.index_copy_(2, self.written, v)
        return keys, values

    def truncate(self, length: int) -> None:
        super().truncate(length)
        self.pos_t.fill_(length)


def graphable(model: nn.Module, idx: Tensor, max_new_tokens: int) -> bool:
    """Whether `generate_ids` decodes `model` through a `GraphedStep`: on CUDA, in eval mode
    (no dropout to draw), with enough steps through the cache to pay for the capture (the
    prompt's step is eager, and past the context the sliding window is too), and with no
    forward hooks anywhere in it (a replayed graph runs no Python, so a hook would see only
    the first step)."""
    cached_steps = min(max_new_tokens - 1, model.cfg.block_size - idx.shape[1])  # the graph's replays
    return (
        idx.device.type == "cuda"
        and not model.training
        and cached_steps >= MIN_REPLAYS
        and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )


class GraphedStep:
    """`model(tokens [B, 1], cache=cache)[:, -1]` captured as one CUDA graph at the cache's
    current position; each `step` replays it one position further.

    Capturing records kernels without running them, and CUDA asks for a few eager runs first
    (on a side stream): those write keys at the current position and advance the cache, so the
    cache is put back after each; the replays then write the real keys there. The graph reads
    the weights where they were at capture: they must not be replaced while it decodes (one
    `generate_ids` call; `weights_in` entered or left between its tokens would be missed)."""

    def __init__(self, model: nn.Module, cache: StaticKVCache) -> None:
        self.cache, self.device = cache, cache.k.device
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=self.device)  # [B, 1]
        start = cache.pos
        with torch.cuda.device(self.device):  # streams and the capture belong to the model's GPU
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    model(self.tokens, cache=cache)
                    cache.truncate(start)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model(self.tokens, cache=cache)[:, -1]  # [B, V], rewritten by each replay
        cache.pos = start  # the capture ran the Python (pos + 1) but no kernel (pos_t is still start)

    def step(self, tokens: Tensor) -> Tensor:
        """tokens [B] at position `cache.pos` → next-token logits [B, V] (valid until the next step)."""
        if self.cache.pos >= self.cache.max_len:
            raise ValueError(f"{self.cache.pos + 1} positions exceed the cache's {self.cache.max_len}")
        self.tokens.copy_(tokens.view(-1, 1))
        with torch.cuda.device(self.device):
            self.graph.replay()
        self.cache.pos += 1
        return self.logits
