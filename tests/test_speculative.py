"""Speculative decoding (arXiv 2211.17192, 2302.01318) is exact: tested three ways.

(a) stub models with hand-written logits force the accept-all, reject-all and partial branches;
(b) at temperature 0 the output equals plain greedy decoding (`llmlab.sampling`) token for token;
(c) the joint distribution of the first 3 tokens matches the target's, enumerated exactly, by a
    chi-square test, and the same test rejects a broken variant; the acceptance rate and the
    tokens per target call agree with Σ min(p, q) and (1 − α^(γ+1)) / (1 − α).
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from torch import Tensor, nn

from llmlab import speculative
from llmlab.config import ModelConfig
from llmlab.errors import UserError
from llmlab.model import GPT, KVCache
from llmlab.run_dir import load_run
from llmlab.sampling import SamplingConfig, generate_ids, generate_text, probs_from_logits
from llmlab.speculative import SpeculativeStats, check_pair, speculative_ids, speculative_text
from tests.conftest import TINY_TRAIN, TINY_VARIANTS, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


# --- stubs ----------------------------------------------------------------------------------


class Stub(nn.Module):
    """A "language model" whose logits are a hand-written function of (token, absolute position).

    It honours the KV-cache protocol (positions continue from cache.pos), so a wrong rollback
    shows up as a wrong position, and it records the length of every forward pass.
    """

    def __init__(self, vocab: int, rule: Callable[[Tensor, Tensor], Tensor], block_size: int = 4096) -> None:
        super().__init__()
        self.cfg = ModelConfig(vocab_size=vocab, block_size=block_size, n_layers=1, n_heads=1, d_model=2)
        self.rule = rule
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the stub a device and a dtype
        self.calls: list[int] = []

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        P = cache.pos if cache is not None else 0
        pos = torch.arange(P, P + idx.shape[1]).expand_as(idx)  # [B, S]
        if cache is not None:
            cache.pos += idx.shape[1]
        self.calls.append(idx.shape[1])
        return self.rule(idx, pos)  # [B, S, V]


def one_hot_logits(next_token: Tensor, vocab: int) -> Tensor:
    """Logits 0 at `next_token` [B, S] and −∞ elsewhere: a deterministic model. → [B, S, V]"""
    logits = torch.full((*next_token.shape, vocab), float("-inf"))
    return logits.scatter(-1, next_token[..., None], 0.0)


V = 10


def chain_rule(tok: Tensor, pos: Tensor) -> Tensor:
    """The target: next = (token + position) mod V, so a cache rolled back to a wrong length
    (a wrong position) gives a wrong token."""
    return one_hot_logits((tok + pos) % V, V)


def reference_chain(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append((seq[-1] + len(seq) - 1) % V)
    return seq[len(prompt) :]


def run_stub(target: nn.Module, draft: nn.Module, prompt: list[list[int]], n: int, gamma: int,
             seed: int = 0) -> tuple[Tensor, SpeculativeStats]:  # fmt: skip
    stats = SpeculativeStats(gamma)
    g = torch.Generator().manual_seed(seed)
    steps = speculative_ids(target, draft, torch.tensor(prompt), n, gamma, SamplingConfig(), g, stats)
    return torch.stack([ids for ids, _ in steps], dim=1), stats


def test_accept_all_when_the_draft_is_the_target():
    """q = p: min(1, p/q) = 1, so every draft is kept and each call emits γ + 1 tokens."""
    target = Stub(V, chain_rule)
    out, stats = run_stub(target, Stub(V, chain_rule), [[3]], 21, gamma=4)
    assert out[0].tolist() == reference_chain([3], 21)
    assert stats.accepted == stats.proposed == 16
    assert [k for _, k in stats.rounds] == [5, 5, 5, 5, 1]
    assert target.calls == [1 + 4] + [1 + 4] * 3 + [1]  # one target forward per round, γ + 1 positions


def test_reject_all_when_the_draft_proposes_what_the_target_never_says():
    """p(x) = 0 at every draft: every proposal is rejected and the residual max(0, p − q) is the
    target's own one-hot, so the output is still the target's chain, one token per call."""
    draft = Stub(V, lambda tok, pos: one_hot_logits((tok + pos + 1) % V, V))
    out, stats = run_stub(Stub(V, chain_rule), draft, [[3], [7]], 12, gamma=3)
    assert out.tolist() == [reference_chain([3], 12), reference_chain([7], 12)]
    assert stats.accepted == 0 and stats.proposed == 2 * 11  # the first draft of each row, each round
    assert stats.target_calls == 12 and stats.tokens_per_target_call == 1


def test_partial_acceptance_keeps_the_prefix_and_corrects_the_first_mistake():
    """The draft is right except after token 2, where it says 0. From prompt [1] (target chain
    1, 2, 4, 7, …) with γ = 4, round one accepts x1 = 1 and x2 = 2, rejects x3 = 0 and emits the
    correction 4; the caches roll back, so every later round starts at the right position."""

    def draft_rule(tok: Tensor, pos: Tensor) -> Tensor:
        return torch.where((tok == 2)[..., None], one_hot_logits(torch.zeros_like(tok), V), chain_rule(tok, pos))

    out, stats = run_stub(Stub(V, chain_rule), Stub(V, draft_rule), [[1]], 30, gamma=4)
    assert reference_chain([1], 4) == [1, 2, 4, 7]
    assert out[0].tolist() == reference_chain([1], 30)
    assert stats.rounds[0] == (4, 3)  # x1, x2 accepted, x3 rejected, then the correction
    assert 0 < stats.accepted < stats.proposed


def test_rows_of_a_batch_are_cut_to_the_shortest_acceptance():
    """Row 0 has a perfect draft, row 1 a draft that is always wrong: every round keeps m = 0
    drafts, and both rows still follow the target's chain exactly."""

    def mixed(tok: Tensor, pos: Tensor) -> Tensor:
        row_is_1 = torch.arange(tok.shape[0])[:, None].expand_as(tok) == 1
        return torch.where(row_is_1[..., None], one_hot_logits((tok + pos + 1) % V, V), chain_rule(tok, pos))

    out, stats = run_stub(Stub(V, chain_rule), Stub(V, mixed), [[1], [5]], 15, gamma=3)
    assert out.tolist() == [reference_chain([1], 15), reference_chain([5], 15)]
    assert all(k == 1 for _, k in stats.rounds)
    assert stats.accepted == sum(g for g, _ in stats.rounds)  # row 0 accepted all its drafts, though cut


# --- acceptance rate and tokens per call against the formulas -------------------------------


def constant_rule(logits: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """A model whose next-token distribution ignores the context: Σ min(p, q) is then one number."""
    return lambda tok, pos: logits.expand(*tok.shape, -1)


@pytest.mark.parametrize("gamma", [1, 4])
def test_acceptance_rate_and_tokens_per_call_match_the_formulas(gamma):
    """α = Σ_x min(p(x), q(x)) (Leviathan et al. §3.3) and E[tokens per call] = (1 − α^(γ+1))/(1 − α)
    (their eq. 1), each within 3 standard errors; the SEs are the binomial's and the truncated
    geometric's, computed here with numpy."""
    gen = torch.Generator().manual_seed(gamma)
    lp, lq = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    p, q = lp.softmax(-1).numpy(), lq.softmax(-1).numpy()
    alpha = float(np.minimum(p, q).sum())
    _, stats = run_stub(Stub(6, constant_rule(lp)), Stub(6, constant_rule(lq)), [[0]] * 4, 1000, gamma)
    se_alpha = np.sqrt(alpha * (1 - alpha) / stats.proposed)
    assert abs(stats.acceptance_rate - alpha) < 3 * se_alpha, (stats.acceptance_rate, alpha)

    _, stats = run_stub(Stub(6, constant_rule(lp)), Stub(6, constant_rule(lq)), [[0]], 1500, gamma, seed=1)
    emitted = np.array([k for g, k in stats.rounds if g == gamma])
    k = np.arange(gamma + 1)  # accepted drafts n; emitted n + 1
    pmf = np.where(k < gamma, alpha**k * (1 - alpha), alpha**gamma)
    mean, var = (pmf * (k + 1)).sum(), (pmf * (k + 1) ** 2).sum() - (pmf * (k + 1)).sum() ** 2
    assert mean == pytest.approx((1 - alpha ** (gamma + 1)) / (1 - alpha))
    assert abs(emitted.mean() - mean) < 3 * np.sqrt(var / len(emitted)), (emitted.mean(), mean)
    assert speculative.expected_tokens_per_call(alpha, gamma) == pytest.approx(mean)


# --- (c) the joint distribution of the first 3 tokens ------------------------------------------


def random_tiny_model(seed: int, layers: int) -> GPT:
    """A 5-token model with weights large enough to make its distributions far from uniform."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=5, block_size=8, n_layers=layers, n_heads=2, d_model=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)
    return model


PROMPT = [2, 0]


@torch.no_grad()
def exact_joint(model: GPT, cfg: SamplingConfig) -> np.ndarray:
    """P(x1, x2, x3 | prompt) for all 125 triples, by enumeration with full forward passes."""
    table = np.zeros((5, 5, 5))
    for triple in itertools.product(range(5), repeat=3):
        seq = torch.tensor([PROMPT + list(triple)])
        probs = probs_from_logits(model(seq)[0], cfg)  # [S, V]
        table[triple] = np.prod([float(probs[len(PROMPT) - 1 + i, t]) for i, t in enumerate(triple)])
    return table.ravel()


def chi_square_p(target: GPT, draft: GPT, cfg: SamplingConfig, gamma: int, seed: int, n: int = 6000) -> float:
    exact = exact_joint(target, cfg)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([PROMPT] * n)  # one batch of n rows: the batch rule is under test too
    out = torch.stack([ids for ids, _ in speculative_ids(target, draft, idx, 3, gamma, cfg, gen)], dim=1)  # [n, 3]
    counts = np.bincount((out[:, 0] * 25 + out[:, 1] * 5 + out[:, 2]).numpy(), minlength=125)
    expected = exact * n
    big = expected >= 5  # pool the rare cells into one, as the chi-square approximation needs
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert counts[exact == 0].sum() == 0  # nothing the target forbids (top-k, top-p) ever appears
    keep = exp > 0
    return float(scipy_stats.chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue)


CONFIGS = [SamplingConfig(), SamplingConfig(0.7, top_k=3), SamplingConfig(1.3, top_p=0.8)]


def test_the_formula_takes_each_rounds_own_number_of_drafts():
    """Rounds of γ = 4, 4 and a last one of 1 draft: (2·(1 + α + α² + α³ + α⁴) + (1 + α)) / 3."""
    stats = speculative.SpeculativeStats(4, proposed=10, accepted=5, rounds=[(4, 3), (4, 2), (1, 2)])
    a = 0.5
    assert stats.to_json()["expected_tokens_per_target_call"] == pytest.approx(
        (2 * (1 + a + a**2 + a**3 + a**4) + (1 + a)) / 3)  # fmt: skip
    assert speculative.SpeculativeStats(4, proposed=2, accepted=1).expected_tokens_per_target_call == pytest.approx(
        1 + a + a**2 + a**3 + a**4)  # no rounds recorded: γ  # fmt: skip


@pytest.mark.parametrize("cfg", CONFIGS, ids=["T=1", "T=0.7,top-k=3", "T=1.3,top-p=0.8"])
def test_first_three_tokens_follow_the_target_distribution(cfg):
    """Chi-square of speculative samples against the exact enumerated target joint, p > 0.01
    for every seed and γ (scipy.stats.chisquare)."""
    target, draft = random_tiny_model(0, layers=2), random_tiny_model(1, layers=1)
    for seed, gamma in [(0, 1), (1, 2), (2, 4)]:
        p = chi_square_p(target, draft, cfg, gamma, seed)
        assert p > 0.01, (seed, gamma, p)


def test_the_same_test_rejects_a_correction_drawn_from_p_instead_of_the_residual(monkeypatch):
    """The broken variant emits min(p, q) + (1 − β)·p ≠ p; the chi-square test must see it."""
    target, draft = random_tiny_model(0, layers=2), random_tiny_model(1, layers=1)
    monkeypatch.setattr(speculative, "residual", lambda p, q: p)
    for seed, gamma in [(0, 1), (1, 2), (2, 4)]:
        assert chi_square_p(target, draft, SamplingConfig(), gamma, seed) < 0.01


# --- (b) temperature 0 is greedy decoding ------------------------------------------------------


@pytest.fixture(scope="module")
def draft_run(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, corpus_file: Path) -> Path:
    """A 1-layer, 16-wide draft sharing the trained run's tokenizer."""
    from llmlab.train import train

    out = tmp_path_factory.mktemp("runs") / "draft"
    cfg = replace(TINY_VARIANTS["notes"], block_size=32, n_layers=1, d_model=16, n_heads=2)
    train(cfg, replace(TINY_TRAIN, max_steps=40), str(corpus_file), out, tokenizer_from=str(trained_run),
          progress=False)  # fmt: skip
    return out


def test_temperature_0_equals_greedy_decoding_on_many_prompts(trained_run, draft_run):
    """Token for token against `sampling.generate_ids` at temperature 0, one row and batched."""
    target, draft = load_run(trained_run), load_run(draft_run)
    text = "".join(f"def f{i}(x, y):\n    return x + y * {i % 7}\n" for i in range(40))
    ids = target.tokenizer.encode(text)
    greedy = SamplingConfig(0.0)
    for start in range(0, 400, 23):
        idx = torch.tensor([ids[start : start + 1 + start % 9]])
        plain = [int(t) for t, _ in generate_ids(target.model, idx, 20, greedy)]
        spec = [int(t) for t, _ in speculative_ids(target.model, draft.model, idx, 20, 1 + start % 5, greedy)]
        assert spec == plain, start
    batch = torch.tensor([ids[s : s + 6] for s in range(0, 160, 10)])  # [16, 6]
    plain = torch.stack([t for t, _ in generate_ids(target.model, batch, 25, greedy)], dim=1)
    spec = torch.stack([t for t, _ in speculative_ids(target.model, draft.model, batch, 25, 4, greedy)], dim=1)
    assert torch.equal(spec, plain)


def test_speculative_text_streams_and_stops_like_generate_text(trained_run, draft_run):
    target, draft = load_run(trained_run), load_run(draft_run)
    pieces: list[str] = []
    g, stats = speculative_text(target, draft, "def f", 25, 3, SamplingConfig(0.0), stop=["\n"], on_text=pieces.append)
    plain = generate_text(target.model, target.tokenizer, "def f", 25, SamplingConfig(0.0), stop=["\n"])
    assert g.text == plain.text == "".join(pieces)
    assert stats.target_calls >= 1 and stats.tokens >= len(g.token_ids)


# --- bad input ---------------------------------------------------------------------------------


def test_library_rejects_gamma_below_1_another_vocabulary_and_too_long_a_generation():
    target, draft = random_tiny_model(0, 1), random_tiny_model(1, 1)
    with pytest.raises(UserError, match="gamma .* at least 1, got 0"):
        check_pair(target, draft, 0, 4)
    other = GPT(ModelConfig(vocab_size=6, block_size=8, n_layers=1, n_heads=2, d_model=8))
    with pytest.raises(UserError, match="vocabulary has 6 tokens but the target's 5"):
        check_pair(target, other, 4, 4)
    with pytest.raises(UserError, match="= 9 exceed the context of 8"):
        list(speculative_ids(target, draft, torch.tensor([[0, 1]]), 7, 2))


def test_cli_greedy_speculative_equals_plain_and_reports_its_figures(capsys, trained_run, draft_run):
    base = ["generate", str(trained_run), "--prompt", "def f", "--temperature", "0", "--max-new-tokens", "20", "--json"]
    plain = json.loads(run_cli(capsys, *base)[1])
    code, out, _ = run_cli(capsys, *base, "--draft", str(draft_run), "--gamma", "3", "--compare")
    spec = json.loads(out)
    assert code == 0 and spec["text"] == plain["text"] and spec["token_ids"] == plain["token_ids"]
    assert spec["gamma"] == 3 and 0 <= spec["acceptance_rate"] <= 1
    assert spec["tokens_per_target_call"] == pytest.approx(spec["tokens"] / spec["target_calls"])
    assert spec["accepted"] == round(spec["acceptance_rate"] * spec["proposed"])
    assert spec["speedup"] == pytest.approx(spec["tokens_per_second"] / spec["plain_tokens_per_second"])


def test_cli_human_output_and_default_length(capsys, trained_run, draft_run):
    code, out, _ = run_cli(capsys, "generate", str(trained_run), "--prompt", "def f", "--draft", str(draft_run))
    assert code == 0 and out.startswith("def f")
    assert "acceptance rate" in out and "tokens per target call" in out and "γ = 4" in out
    code, out, _ = run_cli(capsys, "generate", str(trained_run), "--prompt", "def f", "--draft", str(draft_run),
                           "--json")  # fmt: skip
    assert json.loads(out)["max_new_tokens"] == 32 - 5  # the room left in the 32-token context
    code, out, _ = run_cli(capsys, "generate", str(trained_run), "--prompt", "def f", "--draft", str(draft_run),
                           "--max-new-tokens", "1")  # fmt: skip
    assert code == 0 and "acceptance rate         n/a (0 of 0 draft tokens)" in out  # one token: no draft judged
    code, out, _ = run_cli(capsys, "generate", str(trained_run), "--prompt", "def f", "--draft", str(draft_run),
                           "--max-new-tokens", "0", "--compare")  # fmt: skip
    assert code == 0 and "speedup                 n/a (no token kept)" in out  # no rate to divide by


def test_cli_bad_inputs_are_one_line_exit_2(capsys, tmp_path, trained_run, draft_run):
    other = tmp_path / "other-tokenizer"
    shutil.copytree(draft_run, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["vocab"] = "".join(sorted(set(tok["vocab"][:-1]) | {"\u00e9"}))  # same size, another character
    (other / "tokenizer.json").write_text(json.dumps(tok))
    short = tmp_path / "short-context"  # the draft with a context of 8 (sinusoidal positions: no weights change)
    shutil.copytree(draft_run, short)
    config = json.loads((short / "config.json").read_text())
    config["model"]["block_size"] = 8
    (short / "config.json").write_text(json.dumps(config))
    gen = ["generate", str(trained_run), "--prompt", "def f"]
    cases = [
        (
            ["generate", str(trained_run), "--prompt", "def f(x, y)", "--draft", str(short)],
            "the prompt is 11 tokens and fills the pair's context (8, the smaller of the target's and the draft's)",
        ),
        ([*gen, "--draft", str(draft_run), "--gamma", "0"], "gamma (draft tokens per round) must be at least 1"),
        ([*gen, "--draft", str(other)], "has another tokenizer than the target"),
        ([*gen, "--draft", str(tmp_path / "nope")], "does not exist"),
        ([*gen, "--draft", str(draft_run), "--max-new-tokens", "40"], "exceed the context of 32 tokens"),
        ([*gen, "--draft", str(draft_run), "--no-cache"], "--no-cache cannot be combined with --draft"),
        ([*gen, "--compare"], "give --draft DRAFT_RUN"),
        ([*gen, "--gamma", "2"], "give --draft DRAFT_RUN"),
    ]
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("llmlab: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err, (argv, err)
        assert out == "", (argv, out)  # nothing printed before the error, not even the prompt


# --- the tour's section ---------------------------------------------------------------------------


def test_tour_section_measures_a_draft_trained_alongside(tmp_path, trained_run, corpus_file):
    """The section trains (then reuses) its draft, and its figures are consistent with each other:
    α̂ = accepted / proposed, tokens per call = tokens / calls, speedup = the ratio of the rates."""
    from llmlab.sections import Tour
    from llmlab.sections import rejection as section_module

    logs: list[str] = []
    tour = Tour(tmp_path, quick=True, data=str(corpus_file), log=logs.append, progress=False)
    tour.notes_dir = trained_run
    tour.notes_summary = json.loads((trained_run / "summary.json").read_text())
    section = section_module.section(tour)
    f = section.figures
    assert f["greedy_equal"] is True and "token for token" in section.body
    assert f["acceptance_rate"] == pytest.approx(f["accepted"] / f["proposed"])
    assert f["tokens_per_target_call"] == pytest.approx(f["tokens"] / f["target_calls"])
    assert f["speedup"] == pytest.approx(f["tokens_per_second"] / f["plain_tokens_per_second"])
    assert load_run(tmp_path / "draft").tokenizer.to_json() == load_run(trained_run).tokenizer.to_json()
    section_module.section(tour)
    assert any(line.startswith("reusing") for line in logs)
