"""Causal tracing (ROME §2, arXiv 2202.05262): invariants that follow from the architecture itself."""

from __future__ import annotations

import re

import pytest
import torch

from llmlab.errors import UserError
from llmlab.knowledge import Fact, encode, pad
from llmlab.knowledge.patching import KINDS, ROLES, Trace, average_by_role, causal_trace, patch, plot_trace, role_of
from tests.knowledge.conftest import random_model

# the prompt ends in a space, so the answer "x" is one token, read at the prompt's last token
FACT = Fact("so the {} is ", "fox", "x")


def test_no_noise_restores_everything():
    """With ν = 0 the corrupted run is the clean run: every p_{i,l} = p₀ = p*, every effect 0."""
    model, tok = random_model()
    trace = causal_trace(model, tok, FACT, noise=0.0, samples=2)
    assert trace.p_corrupt == pytest.approx(trace.p_clean, rel=1e-6)
    for kind in KINDS:
        torch.testing.assert_close(trace.restored[kind], torch.full_like(trace.restored[kind], trace.p_clean))


def test_clean_probability_is_the_softmax_of_the_logits():
    """p* against torch.softmax of a plain forward pass."""
    model, tok = random_model()
    e = encode(tok, FACT)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([e.inputs]))[0, -1], -1)
    trace = causal_trace(model, tok, FACT, samples=1)
    assert trace.p_clean == pytest.approx(probs[e.target[0]].item(), rel=1e-5)


@pytest.mark.parametrize("name", ["notes", "nanogpt-shakespeare-char"])
def test_states_before_the_subject_carry_nothing_and_the_last_residual_carries_everything(name):
    """Causality: tokens before the subject never see the noise, so restoring them changes nothing
    (IE = 0). The residual stream after the last layer at the last token is all the output reads,
    so restoring it gives p* exactly."""
    model, tok = random_model(name)
    trace = causal_trace(model, tok, FACT, noise=3.0, samples=4)
    assert abs(trace.p_corrupt - trace.p_clean) > 1e-4 * trace.p_clean  # the noise does something
    before = trace.subject.start
    for kind in KINDS:
        torch.testing.assert_close(trace.restored[kind][:before], torch.full((before, model.cfg.n_layers),
                                   trace.p_corrupt), rtol=1e-5, atol=0)  # fmt: skip
    assert trace.restored["resid"][-1, -1].item() == pytest.approx(trace.p_clean, rel=1e-5)
    assert trace.tokens == [tok.decode([i]) for i in encode(tok, FACT).ids]
    assert list(trace.subject) == [7, 8, 9]  # "so the " is 7 characters, then f, o, x


def test_noise_has_three_times_the_std_of_the_subject_embeddings():
    model, tok = random_model()
    e = encode(tok, FACT)
    _, cache = model.run_with_cache(torch.tensor([e.ids]), names=["hook_embed"])
    sigma = cache["hook_embed"][0, e.subject.start : e.subject.stop].std(correction=0).item()
    assert causal_trace(model, tok, FACT, samples=1).noise_std == pytest.approx(3 * sigma, rel=1e-6)


def test_patch_replaces_only_the_chosen_rows_and_positions():
    x = torch.zeros(3, 4, 2)
    source = torch.arange(8.0).view(4, 2)
    out = patch(source, torch.tensor([1, -1, 3]))(x, None)
    torch.testing.assert_close(out[0, 1], source[1])
    torch.testing.assert_close(out[2, 3], source[3])
    assert out.sum().item() == source[1].sum().item() + source[3].sum().item()


def test_heat_maps_are_written_one_per_kind(tmp_path):
    model, tok = random_model()
    paths = plot_trace(causal_trace(model, tok, FACT, samples=1), tmp_path, "x")
    assert sorted(p.name for p in paths) == ["trace_attn.png", "trace_mlp.png", "trace_resid.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


@pytest.mark.parametrize(
    ("fact", "message"),
    [
        (Fact("so the fox is", "cat", "x"), "the subject 'cat' does not occur in the prompt"),
        (Fact("so the is", "fox", "x"), "does not occur in the prompt 'so the is'"),
        (Fact("{} and {}", "fox", "x"), "more than one {}"),
        (Fact("so the {} is", "fox", ""), "the target '' tokenizes to nothing"),
        (Fact("so the {} is", "fox", "   "), "tokenizes to nothing"),
        (Fact("so the {} is", "  ", "x"), "the subject is empty"),
        (Fact("so the {} is", "fox", "x" * 60), "over the context of 48"),
        (Fact("so the {} is", "fox", "é"), "not in this character tokenizer's vocabulary"),
        (
            Fact("the fox " * 2500, "cat", "x"),
            "in the prompt 'the fox the fox the fox the fo'…'e fox the fox the fox the fox ' (20,000 characters), and",
        ),
    ],
)
def test_bad_facts_are_user_errors(fact, message):
    model, tok = random_model()
    with pytest.raises(UserError, match=re.escape(message)):
        causal_trace(model, tok, fact, samples=1)


def test_padding_on_the_right_changes_no_logit_that_is_read():
    model, tok = random_model()
    a, b = encode(tok, FACT), encode(tok, Fact("the {} is", "fox jumping", "x"))
    with torch.no_grad():
        batch = model(pad([a.inputs, b.inputs]))
        alone = model(torch.tensor([a.inputs]))
    torch.testing.assert_close(batch[0, : len(a.inputs)], alone[0], atol=1e-5, rtol=1e-5)


def test_token_roles_follow_romes_figure_2():
    """ "Anya Briar Forger was born in": three subject tokens, then 'was' (first subsequent), 'born'
    (further), 'in' (last); a one-token subject is its last subject token; tokens before are None."""
    roles = [role_of(i, range(0, 3), 6) for i in range(6)]
    assert [ROLES[r] for r in roles] == ["first subject token", "middle subject tokens", "last subject token",
                                         "first subsequent token", "further tokens", "last token"]  # fmt: skip
    assert [role_of(i, range(1, 2), 3) for i in range(3)] == [None, 2, 5]


def test_average_by_role_is_the_mean_over_the_facts_that_have_the_role():
    """Hand-computed: two traces of 1 layer; the middle role exists in one of them only."""

    def trace(effects: list[float], subject: range) -> Trace:
        grid = torch.tensor(effects)[:, None] + 0.5  # p_{i,l} = p₀ + IE with p₀ = 0.5
        return Trace([str(i) for i in range(len(effects))], subject, 0.9, 0.5, {"mlp": grid}, 1.0)

    a = trace([0.1, 0.2, 0.3, 0.4, 0.5], range(0, 3))  # first, middle, last subject, first subsequent, last
    b = trace([0.2, 0.6, 0.0, 0.1, 0.3], range(0, 2))  # first, last subject, first subsequent, further, last
    avg = average_by_role([a, b])
    want = [(0.1 + 0.2) / 2, 0.2, (0.3 + 0.6) / 2, (0.4 + 0.0) / 2, 0.1, (0.5 + 0.3) / 2]
    torch.testing.assert_close(avg.effects["mlp"][:, 0], torch.tensor(want))
    assert avg.peak("mlp") == ("last subject token", 0, pytest.approx(0.45))
    assert avg.p_clean == pytest.approx(0.9) and avg.facts == 2


@pytest.mark.parametrize("noise", [float("nan"), float("inf"), -1.0, 1e308])
def test_noise_must_be_a_finite_number_at_least_zero(noise):
    model, tok = random_model()
    with pytest.raises(UserError, match="noise must be a number from 0 to 100"):
        causal_trace(model, tok, Fact("so the {} is", "fox", "x"), noise=noise, samples=1)
