"""Sampling transforms against brute-force references, and generation against a naive loop."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from llmlab.errors import UserError
from llmlab.model import GPT
from llmlab.sampling import (
    NUMPY_ARGMAX_FROM,
    SamplingConfig,
    argmax,
    generate_batch,
    generate_ids,
    generate_text,
    probs_from_logits,
    sample,
    top_k_filter,
    top_p_filter,
)  # fmt: skip
from llmlab.tokenizer import BPETokenizer, CharTokenizer
from tests.conftest import TINY_VARIANTS

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"top_k": 0}, "top_k must be at least 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ],
)
def test_invalid_sampling_values_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingConfig(**kwargs)


def test_temperature_divides_the_logits():
    """Reference: softmax(logits / T) computed with numpy."""
    for t in (0.5, 1.0, 2.0):
        z = LOGITS.numpy()[0] / t
        ref = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        np.testing.assert_allclose(probs_from_logits(LOGITS, SamplingConfig(t))[0].numpy(), ref, rtol=1e-6)


def test_temperature_zero_is_a_one_hot_at_the_argmax():
    assert probs_from_logits(LOGITS, SamplingConfig(0.0)).tolist() == [[1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("V", [NUMPY_ARGMAX_FROM - 1, NUMPY_ARGMAX_FROM, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_argmax_finds_the_index_torchs_argmax_does(V, dtype):
    """Against Tensor.argmax (the reference): random rows, a tie (the first wins), a NaN (it wins),
    a row of −∞, a non-contiguous view, and batches of 1-D to 3-D, below and above the NumPy route."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, V, generator=g, dtype=dtype)
    x[0, 0, [7, V - 2]] = 100.0  # a tie
    x[0, 1, [V // 2, 3]] = float("nan")  # NaN beats everything, the first NaN wins
    x[1, 2] = float("-inf")  # all equal: index 0
    for t in (x, x[0, 0], x[:, 1], x.transpose(0, 1), x[..., ::2], x[0]):
        got = argmax(t)
        assert got.dtype == torch.int64 and torch.equal(got, t.argmax(-1))
    assert argmax(x[0, 0]).tolist() == 7 and argmax(x[0, 1]).tolist() == 3 and argmax(x[1, 2]).tolist() == 0


@pytest.mark.parametrize("cfg", [SamplingConfig(1e-30), SamplingConfig(1e-300), SamplingConfig(1.0, top_p=1e-300),
                                 SamplingConfig(1e-300, top_k=3, top_p=1e-300)])  # fmt: skip
def test_a_vanishing_temperature_or_top_p_is_greedy_not_nan(cfg):
    """Reference: the one-hot at the argmax (temperature 0). Dividing z itself by 1e-300 would overflow
    every logit to ±inf and give NaN; the shifted z − max keeps the argmax at 0."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    assert torch.equal(probs_from_logits(logits, cfg), probs_from_logits(logits, SamplingConfig(0.0)))


def test_top_k_keeps_exactly_the_k_largest():
    kept = torch.isfinite(top_k_filter(LOGITS, 3))
    assert kept.tolist() == [[True, True, True, False, False, False]]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.7, 0.9, 0.99, 1.0])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p):
    """Reference: walk the sorted probabilities until the cumulative mass reaches p."""
    probs = torch.softmax(LOGITS[0], -1).numpy()
    order = np.argsort(-probs)
    keep, mass = set(), 0.0
    for i in order:
        keep.add(int(i))
        mass += probs[i]
        if mass >= p:
            break
    kept = torch.isfinite(top_p_filter(LOGITS, p))[0]
    assert {i for i in range(6) if kept[i]} == keep


@pytest.mark.parametrize("logits", [[0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 3.0, 1.0, 3.0]])
@pytest.mark.parametrize("p", [0.3, 0.5, 0.6, 0.9])
def test_ties_are_kept_or_dropped_together(logits, p):
    """Reference, in float64: top-p drops a token exactly when the mass of the tokens strictly more
    likely than it reaches p; top-k keeps every token at least as likely as the k-th."""
    z = np.array(logits)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    strictly_more = np.array([probs[probs > q].sum() for q in probs])
    kept = torch.isfinite(top_p_filter(torch.tensor([logits]), p))[0].numpy()
    assert kept.tolist() == (strictly_more < p).tolist()
    for k in range(1, len(z) + 1):
        kth = np.sort(z)[::-1][k - 1]
        assert torch.isfinite(top_k_filter(torch.tensor([logits]), k))[0].numpy().tolist() == (z >= kth).tolist()


def test_top_p_of_one_keeps_every_token():
    """One likely token and 999 unlikely ones: the float32 running sum reaches 1.0 before the
    tail. Reference: p = 1 is no filter at all (as in transformers' TopPLogitsWarper)."""
    logits = torch.cat([torch.tensor([20.0]), torch.zeros(999)])[None]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_samples_follow_the_distribution():
    """Chi-square goodness of fit (scipy) of 20,000 draws against the probabilities."""
    probs = probs_from_logits(LOGITS, SamplingConfig(1.0, top_k=4))
    draws = sample(probs.expand(20_000, -1), torch.Generator().manual_seed(0))
    counts = np.bincount(draws.numpy(), minlength=6)
    assert counts[4:].sum() == 0  # filtered tokens are never drawn
    expected = probs[0, :4].double().numpy()
    expected = expected / expected.sum() * 20_000
    assert stats.chisquare(counts[:4], expected).pvalue > 0.001


def model_and_prompt(name="notes"):
    torch.manual_seed(0)
    model = GPT(replace(TINY_VARIANTS[name], block_size=8)).eval()
    return model, torch.randint(0, 48, (2, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["notes", "llama-tiny"])
def test_greedy_generation_equals_a_naive_loop_past_the_context(name):
    """Reference: argmax of model(last S tokens)[-1], recomputed from scratch each step (nanoGPT).
    40 new tokens slide the window far past the context S = 8 and wrap generate_ids' buffer of
    2·S tokens twice; a max_new_tokens far beyond memory (10¹⁸, read for 40 steps) allocates
    no more than that buffer and gives the same tokens (it tried to allocate them all before)."""
    import itertools

    model, idx = model_and_prompt(name)
    tokens = idx
    for _ in range(40):  # 5 + 40 > S = 8: the window slides
        nxt = model(tokens[:, -8:])[:, -1].argmax(-1)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
    greedy = SamplingConfig(0.0)
    with_cache = torch.stack([t for t, _ in generate_ids(model, idx, 40, greedy)], 1)
    without = torch.stack([t for t, _ in generate_ids(model, idx, 40, greedy, use_cache=False)], 1)
    endless = torch.stack([t for t, _ in itertools.islice(generate_ids(model, idx, 10**18, greedy), 40)], 1)
    assert torch.equal(with_cache, tokens[:, 5:])
    assert torch.equal(without, tokens[:, 5:])
    assert torch.equal(endless, tokens[:, 5:])


def test_inference_mode_decodes_exactly_what_no_grad_does():
    """generate_ids runs under torch.inference_mode; the same loop under torch.no_grad (the plain
    path) yields the same tokens and bit-identical distributions, and only the former's are
    inference tensors."""
    model, idx = model_and_prompt()
    cfg = SamplingConfig(1.0, top_k=10)
    plain = torch.no_grad()(generate_ids.__wrapped__)
    fast = list(generate_ids(model, idx, 6, cfg, torch.Generator().manual_seed(5)))
    slow = list(plain(model, idx, 6, cfg, torch.Generator().manual_seed(5)))
    for (t1, p1), (t2, p2) in zip(fast, slow, strict=True):
        assert torch.equal(t1, t2) and torch.equal(p1, p2)
    assert fast[0][1].is_inference() and not slow[0][1].is_inference()


def test_sampling_with_a_seed_is_reproducible_and_cache_independent():
    model, idx = model_and_prompt()
    cfg = SamplingConfig(1.0, top_p=0.9)
    runs = [torch.stack([t for t, _ in generate_ids(model, idx, 6, cfg, torch.Generator().manual_seed(3), c)], 1)
            for c in (True, True, False)]  # fmt: skip
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("name", ["gpt2", "llama-tiny"])
def test_the_cuda_graph_decode_loop_gives_the_eager_tokens(monkeypatch, name):
    """generate_ids' CUDA-graph path, its bookkeeping checked on the CPU: with `graphable` forced
    and GraphedStep replaced by an eager call with its contract (tokens [B] at `cache.pos` →
    logits [B, V]), the static cache gives the plain loop's tokens and distributions, greedy and
    sampled, for 30 tokens after a prompt of 5 in a context of 16 (past it, the sliding window).
    The graph itself is tests/test_gpu.py's."""
    from llmlab import static_decode

    made = []

    class EagerStep:
        def __init__(self, model, cache):
            assert isinstance(cache, static_decode.StaticKVCache) and cache.pos == 5
            self.model, self.cache = model, cache
            made.append(cache.pos)

        def step(self, tokens):
            return self.model(tokens.view(-1, 1), cache=self.cache)[:, -1]

    torch.manual_seed(0)
    model = GPT(TINY_VARIANTS[name]).eval()
    idx = torch.randint(0, 48, (2, 5), generator=torch.Generator().manual_seed(7))
    for cfg in (SamplingConfig(0.0), SamplingConfig(1.0, top_k=20)):
        runs = {}
        for graph in (False, True):
            monkeypatch.setattr(static_decode, "graphable", lambda *args, graph=graph: graph)
            monkeypatch.setattr(static_decode, "GraphedStep", EagerStep)
            steps = list(generate_ids(model, idx, 30, cfg, torch.Generator().manual_seed(8), cuda_graph=True))
            runs[graph] = torch.stack([t for t, _ in steps], 1), torch.stack([p for _, p in steps], 1)
        assert torch.equal(runs[True][0], runs[False][0])
        torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-5, atol=1e-6)
    assert made == [5, 5]  # captured once per call, after the prompt


def test_graphs_are_only_for_cuda_models_in_eval_mode_without_hooks():
    """`graphable`: on CUDA, in eval mode, with no forward hooks, and with at least
    MIN_REPLAYS steps through the cache (after the prompt's, before the context is full)."""
    from types import SimpleNamespace

    from llmlab import static_decode

    torch.manual_seed(0)
    model = GPT(TINY_VARIANTS["notes"]).eval()  # a context of 16
    n = static_decode.MIN_REPLAYS
    on_cuda = SimpleNamespace(device=torch.device("cuda"), shape=(2, 5))  # what `graphable` reads of a prompt
    assert static_decode.graphable(model, on_cuda, 100)
    assert not static_decode.graphable(model, torch.zeros(2, 5, dtype=torch.long), 100)  # the CPU
    assert static_decode.graphable(model, on_cuda, n + 1) and not static_decode.graphable(model, on_cuda, n)
    long_prompt = SimpleNamespace(device=torch.device("cuda"), shape=(2, 16 - n))  # n cached steps, then the window
    short_of_it = SimpleNamespace(device=torch.device("cuda"), shape=(2, 17 - n))
    assert static_decode.graphable(model, long_prompt, 100) and not static_decode.graphable(model, short_of_it, 100)
    with model.hooks([("blocks.0.hook_resid_pre", lambda x, hook: None)]):
        assert not static_decode.graphable(model, on_cuda, 100)
    handle = model.blocks[0].register_forward_pre_hook(lambda module, args: None)
    assert not static_decode.graphable(model, on_cuda, 100)
    handle.remove()
    assert not static_decode.graphable(model.train(), on_cuda, 100)


def text_model():
    tok = CharTokenizer.train("abcdefgh\n ")
    torch.manual_seed(0)
    model = GPT(replace(TINY_VARIANTS["notes"], vocab_size=tok.vocab_size, block_size=16)).eval()
    return model, tok


def test_stop_strings_cut_the_text_and_streaming_matches_the_result():
    model, tok = text_model()
    full = generate_text(model, tok, "ab", 40, SamplingConfig(0.0)).text
    stop = full[10:12]
    pieces = []
    g = generate_text(model, tok, "ab", 40, SamplingConfig(0.0), stop=[stop], on_text=pieces.append)
    assert g.text == full[: full.find(stop)]
    assert "".join(pieces) == g.text
    assert tok.decode(g.token_ids) == g.text and len(g.entropies) == len(g.token_ids)  # no token of the stop string


def test_an_empty_stop_string_is_an_error():
    model, tok = text_model()
    with pytest.raises(ValueError, match="stop string needs some text"):
        generate_text(model, tok, "ab", 5, SamplingConfig(0.0), stop=["x", ""])


def test_a_stop_string_inside_a_bpe_token_keeps_the_token_that_completes_the_text():
    text = "def f(x):\n    return x + 1\n" * 20
    tok = BPETokenizer.train(text, vocab_size=300)
    model = GPT(replace(TINY_VARIANTS["notes"], vocab_size=tok.vocab_size, block_size=16)).eval()
    drawn = tok.encode("x):\n    return")  # what a fixed `steps` draws, token by token
    pieces = [tok.decode([t]) for t in drawn]
    k = next(i for i, p in enumerate(pieces) if len(p) >= 2)  # the first token of several characters
    before = "".join(pieces[:k])
    stop = pieces[k][1:] + "".join(pieces[k + 1 :])  # starts inside token k

    def steps(idx, generator):
        for t in drawn:
            probs = torch.zeros(1, tok.vocab_size)
            probs[0, t] = 1.0
            yield torch.tensor([t]), probs

    g = generate_text(model, tok, "de", 20, stop=[stop], steps=steps)
    assert g.text == before + pieces[k][0]
    assert g.token_ids == drawn[: k + 1] and g.entropies == [0.0] * (k + 1)

    drawn = tok.encode("a中xyz")  # 中 is three bytes: tokens that end inside it decode to "a�"
    g = generate_text(model, tok, "de", 20, stop=["x"], steps=steps)
    assert g.text == "a中" and tok.decode(g.token_ids) == "a中"
    assert tok.decode(g.token_ids[:-1]) != "a中"  # the last kept token completes the character


def test_batched_prompts_equal_one_by_one_generation():
    model, tok = text_model()
    prompts = ["ab", "abc", "h", "de"]
    one_by_one = [generate_text(model, tok, p, 10, SamplingConfig(0.0)).text for p in prompts]
    assert generate_batch(model, tok, prompts, 10, SamplingConfig(0.0)) == one_by_one


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("", "prompt is empty"), ("a" * 17, "17 tokens long, but the model's context is 16"),
     ("bad \udcff", "not valid UTF-8"), ("xyz", "not in this character tokenizer")],
)  # fmt: skip
def test_bad_prompts_are_user_errors(prompt, message):
    model, tok = text_model()
    with pytest.raises(UserError, match=message):
        generate_text(model, tok, prompt, 5)


def test_generation_records_the_entropy_of_the_distribution_each_token_came_from():
    """Reference: scipy.stats.entropy of probs_from_logits on the same prefix (temperature-aware)."""
    from scipy.stats import entropy

    model, tok = text_model()
    cfg = SamplingConfig(0.7, top_k=5)
    g = generate_text(model, tok, "ab", 6, cfg, seed=0)
    ids = tok.encode("ab") + g.token_ids
    for i, h in enumerate(g.entropies):
        logits = model(torch.tensor([ids[: 2 + i]]))[0, -1].detach()
        assert h == pytest.approx(entropy(probs_from_logits(logits, cfg).double().numpy()), abs=1e-5)
    assert generate_text(model, tok, "ab", 6, SamplingConfig(0.0)).entropies == [0.0] * 6  # greedy: one-hot
