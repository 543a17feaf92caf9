"""FT-L, ROME and MEMIT: each update rule checked against its closed form (numpy), and in a model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from llmlab.errors import UserError
from llmlab.knowledge import Fact, answer_logprob, encode, teacher_forced
from llmlab.knowledge import edit as ed
from tests.knowledge.conftest import random_model


def spd(F: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(F, F, generator=g, dtype=torch.float64)
    return A @ A.T / F + 0.1 * torch.eye(F, dtype=torch.float64)


def test_rome_update_is_rank_one_writes_v_at_k_and_spares_keys_orthogonal_under_c_inverse():
    """ROME eq. 2 (arXiv 2202.05262): W' = W + Λ(C⁻¹k*)ᵀ, Λ = (v* − Wk* − b)/((C⁻¹k*)ᵀk*); reference: numpy."""
    g = torch.Generator().manual_seed(0)
    H, F = 6, 10
    W, b = torch.randn(H, F, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64)
    k, v = torch.rand(F, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64)
    C = spd(F, 1)
    dW = ed.rome_update(W, b, k, v, C, ridge=0.0)
    Wn, Cn, kn = W.numpy(), C.numpy(), k.numpy()
    u = np.linalg.solve(Cn, kn)
    expected = np.outer(v.numpy() - Wn @ kn - b.numpy(), u) / (u @ kn)
    np.testing.assert_allclose(dW.numpy(), expected, rtol=1e-10, atol=1e-12)
    assert np.linalg.matrix_rank(dW.numpy()) == 1
    np.testing.assert_allclose((Wn + dW.numpy()) @ kn + b.numpy(), v.numpy(), atol=1e-10)  # W'k* + b = v*
    other = np.random.default_rng(2).normal(size=F)
    other -= (u @ other) / (u @ u) * u  # (C⁻¹k*)ᵀ k = 0
    np.testing.assert_allclose((Wn + dW.numpy()) @ other, Wn @ other, atol=1e-10)


def test_rome_with_several_keys_writes_every_value_and_spares_keys_orthogonal_under_c_inverse():
    """The `answer` site's rank-P update ΔW = (V − WK − b)(KᵀC⁻¹K)⁻¹(C⁻¹K)ᵀ: W'K + b = V exactly,
    keys with (C⁻¹K)ᵀk = 0 untouched, rank P; reference: numpy's least squares of the same problem."""
    g = torch.Generator().manual_seed(8)
    H, F, P = 6, 12, 3
    W, b = torch.randn(H, F, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64)
    K, V = torch.rand(F, P, generator=g, dtype=torch.float64), torch.randn(H, P, generator=g, dtype=torch.float64)
    C = spd(F, 9)
    dW = ed.rome_update(W, b, K, V, C, ridge=0.0).numpy()
    Wn, Kn, Cn = W.numpy(), K.numpy(), C.numpy()
    np.testing.assert_allclose((Wn + dW) @ Kn + b.numpy()[:, None], V.numpy(), atol=1e-9)
    assert np.linalg.matrix_rank(dW) == P
    U = np.linalg.solve(Cn, Kn)  # [F, P]
    other = np.random.default_rng(3).normal(size=F)
    other -= U @ np.linalg.lstsq(U, other, rcond=None)[0]  # drop its part in span(C⁻¹K): (C⁻¹K)ᵀk = 0
    np.testing.assert_allclose(U.T @ other, 0, atol=1e-9)
    np.testing.assert_allclose((Wn + dW) @ other, Wn @ other, atol=1e-9)
    # among all ΔW with (W + ΔW)K + b = V it has the least ‖ΔW L‖_F, C = L Lᵀ (ROME's appendix A):
    # in the whitened basis X = ΔW L that is the minimum-norm solution, numpy's pinv
    L = np.linalg.cholesky(Cn)  # C = L Lᵀ; with X = ΔW L, the constraint is X (L⁻¹K) = R
    R = V.numpy() - Wn @ Kn - b.numpy()[:, None]
    X = R @ np.linalg.pinv(np.linalg.solve(L, Kn))
    np.testing.assert_allclose(dW, X @ np.linalg.inv(L), atol=1e-9)
    one = ed.rome_update(W, b, K[:, 0], V[:, 0], C, ridge=0.0)  # P = 1 is eq. 2
    np.testing.assert_allclose(one.numpy(), ed.rome_update(W, b, K[:, :1], V[:, :1], C, ridge=0.0).numpy(), atol=1e-12)


def test_the_ridge_is_added_to_c_as_written():
    """(C + ρ·mean(diag C)·I)⁻¹ k, against numpy, with a singular C (a neuron that never fires)."""
    C = spd(8, 3)
    C[0, :], C[:, 0] = 0, 0
    k = torch.rand(8, dtype=torch.float64)
    got = ed.regularised_inverse_times(C, 0.01, k).numpy()
    want = np.linalg.solve(C.numpy() + 0.01 * np.trace(C.numpy()) / 8 * np.eye(8), k.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_memit_with_one_fact_matches_its_formula_and_tends_to_rome():
    """MEMIT eq. 14 (arXiv 2210.07229): ΔW = R Kᵀ(λC + KKᵀ)⁻¹; with one fact, Sherman–Morrison gives
    r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k), which is ROME's update when λ → 0. Reference: numpy."""
    g = torch.Generator().manual_seed(4)
    H, F, lam = 5, 9, 3.0
    r, k = torch.randn(H, 1, generator=g, dtype=torch.float64), torch.rand(F, 1, generator=g, dtype=torch.float64)
    C = spd(F, 5)
    got = ed.memit_update(r, k, C, lam, ridge=0.0).numpy()
    Cn, kn, rn = C.numpy(), k.numpy(), r.numpy()
    np.testing.assert_allclose(got, rn @ kn.T @ np.linalg.inv(lam * Cn + kn @ kn.T), rtol=1e-9)
    u = np.linalg.solve(Cn, kn[:, 0])
    np.testing.assert_allclose(got, np.outer(rn[:, 0], u) / (lam + kn[:, 0] @ u), rtol=1e-9)
    W, b = torch.zeros(H, F, dtype=torch.float64), torch.zeros(H, dtype=torch.float64)
    rome = ed.rome_update(W, b, k[:, 0], r[:, 0], C, ridge=0.0).numpy()
    np.testing.assert_allclose(ed.memit_update(r, k, C, 1e-7, ridge=0.0).numpy(), rome, rtol=1e-4)


def test_memit_with_many_facts_matches_its_formula():
    g = torch.Generator().manual_seed(6)
    R, K = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.rand(7, 3, generator=g, dtype=torch.float64)
    C = spd(7, 7)
    want = R.numpy() @ K.numpy().T @ np.linalg.inv(2.0 * C.numpy() + K.numpy() @ K.numpy().T)
    np.testing.assert_allclose(ed.memit_update(R, K, C, 2.0, ridge=0.0).numpy(), want, rtol=1e-9)


def test_second_moment_of_the_keys_is_what_w2_reads():
    """C = (1/n) Σ k kᵀ with k captured by a plain torch forward pre-hook on mlp.w2 (independent of hook points)."""
    model, _ = random_model()
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=2000)
    C = ed.second_moments(model, tokens, [1], n_tokens=48 * 5, batch_size=2)[1]
    seen = []
    handle = model.blocks[1].mlp.w2.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    from llmlab.data import batch_starts, get_batch

    with torch.no_grad():
        model(get_batch(tokens, 48, batch_starts(len(tokens), 48, 5, seed=0, stream=7, index=0))[0])
    handle.remove()
    K = seen[0].reshape(-1, seen[0].shape[-1]).double().numpy()
    np.testing.assert_allclose(C.numpy(), K.T @ K / len(K), rtol=1e-6, atol=1e-9)


def test_key_statistics_say_how_many_tokens_they_were_estimated_from():
    """A split shorter than the request: C comes from its whole windows, 1000 // 48 = 20 of 48
    tokens (960), which the log says, not the 100,000 asked for."""
    model, _ = random_model()
    lines = []
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=1000)
    ed.KeyStatistics(model, tokens, n_tokens=100_000, log=lines.append)(1)
    assert len(lines) == 1 and "from 960 training tokens" in lines[0]


def test_key_statistics_are_cached_and_stay_valid_only_while_the_keys_do(tmp_path):
    model, _ = random_model()
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=3000)
    stats = ed.KeyStatistics(model, tokens, n_tokens=480)
    C = stats(1)
    stats.save(tmp_path)
    cached = ed.KeyStatistics(model, None, n_tokens=480, read_dirs=[tmp_path])
    torch.testing.assert_close(cached(1), C)  # read from disk: no tokens needed
    with torch.no_grad():
        model.blocks[1].mlp.w2.weight.add_(1.0)  # what an edit changes: the keys stay the same
    torch.testing.assert_close(ed.KeyStatistics(model, None, n_tokens=480, read_dirs=[tmp_path])(1), C)
    with torch.no_grad():
        model.blocks[0].mlp.w2.weight.add_(1.0)  # an earlier layer: the keys of layer 1 change
    with pytest.raises(UserError, match="no training tokens"):
        ed.KeyStatistics(model, None, n_tokens=480, read_dirs=[tmp_path])(1)


# --- in a model: a fact whose subject ends the prompt, so δ at the subject acts directly -----

# The subject ends the prompt (its last token is the space), so the answer "Q" is one character
# read right where δ is added. An untrained model's MLP outputs are tiny, so ROME's clamp
# ‖δ‖ ≤ κ‖h‖ and decay γ‖δ‖²/‖h‖², set for trained models, would pin δ near zero: these tests free it.
FACT = Fact("the answer is {}", "qz ", "Q")
FREE = dict(steps=40, lr=0.5, clamp_norm=1e3, weight_decay=0.0)


def _p(model, tokenizer, fact=FACT) -> float:
    e = encode(tokenizer, fact)
    return answer_logprob(teacher_forced(model, [e])[0], e.target).exp().item()


def test_delta_optimisation_makes_the_answer_likely():
    model, tok = random_model()
    req = ed.prepare(tok, FACT, [], model.cfg.block_size)
    params = replace(ed.DEFAULTS["rome"], **FREE)
    delta, h = ed.optimise_delta(model, req, "blocks.0.hook_mlp_out", params)
    at = req.rows[0].subject_last

    def add(x, hook):
        x = x.clone()
        x[:, at] += delta
        return x

    with model.hooks([("blocks.0.hook_mlp_out", add)]):
        p = _p(model, tok)
    assert _p(model, tok) < 0.1 < 0.9 < p
    tight = replace(params, clamp_norm=0.5)
    delta, h = ed.optimise_delta(model, req, "blocks.0.hook_mlp_out", tight)
    assert delta.norm() <= 0.5 * h.norm() + 1e-6


def test_rome_in_a_model_sets_the_mlp_output_at_the_subject_to_v_star():
    """After the edit, mlp_out at the subject's last token = W k* + b + δ, with δ recomputed
    independently; the weight change is rank one and only W₂ of the layer moved."""
    model, tok = random_model()
    params = ed.resolve_params(model, "rome", replace(ed.DEFAULTS["rome"], layers=(0,), **FREE))
    req = ed.prepare(tok, FACT, [], model.cfg.block_size)
    delta, _ = ed.optimise_delta(model, req, "blocks.0.hook_mlp_out", params)
    idx = torch.tensor([req.rows[0].ids])
    before = model.run_with_cache(idx, names=["blocks.0.hook_mlp_out"])[1]["blocks.0.hook_mlp_out"]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=3000)
    ed.apply_edits(model, "rome", [req], ed.KeyStatistics(model, tokens, 960), params)
    after = model.run_with_cache(idx, names=["blocks.0.hook_mlp_out"])[1]["blocks.0.hook_mlp_out"]
    at = req.rows[0].subject_last
    torch.testing.assert_close(after[0, at], before[0, at] + delta[0], atol=1e-4, rtol=1e-4)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
    assert changed == ["blocks.0.mlp.w2.weight"]
    singular = torch.linalg.svdvals((model.blocks[0].mlp.w2.weight - weights[changed[0]]).detach().double())
    assert singular[1] < 1e-4 * singular[0]  # rank one, up to float32 rounding
    assert _p(model, tok) > 0.9


def test_rome_at_the_answer_site_writes_every_token_of_a_long_answer():
    """site=answer: one key and one δ per answer-predicting position; after the edit the MLP output at
    each of them is W k_j + b + δ_j (δ recomputed independently) and greedy reading gives every token."""
    model, tok = random_model()
    fact = Fact("the answer is {}", "qz ", "QRS")
    params = ed.resolve_params(model, "rome", replace(ed.DEFAULTS["rome"], layers=(0,), site="answer", **FREE))
    req = ed.prepare(tok, fact, [], model.cfg.block_size)
    sites = ed.positions(req.rows[0], "answer")
    assert sites == [len(req.rows[0].ids) - 1 + j for j in range(3)]
    delta, _ = ed.optimise_delta(model, req, "blocks.0.hook_mlp_out", params)
    assert delta.shape == (3, model.cfg.d_model)
    idx = torch.tensor([req.rows[0].inputs])
    before = model.run_with_cache(idx, names=["blocks.0.hook_mlp_out"])[1]["blocks.0.hook_mlp_out"]
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=3000)
    ed.apply_edits(model, "rome", [req], ed.KeyStatistics(model, tokens, 960), params)
    after = model.run_with_cache(idx, names=["blocks.0.hook_mlp_out"])[1]["blocks.0.hook_mlp_out"]
    torch.testing.assert_close(after[0, sites], before[0, sites] + delta, atol=1e-3, rtol=1e-3)
    logits = teacher_forced(model, [req.rows[0]])[0]
    assert logits.argmax(-1).tolist() == req.rows[0].target
    with pytest.raises(UserError, match="unknown site 'middle'"):
        ed.resolve_params(model, "rome", replace(ed.DEFAULTS["rome"], site="middle"))


def test_memit_spreads_one_fact_over_two_layers_and_makes_it_likely():
    model, tok = random_model()
    params = ed.resolve_params(model, "memit", replace(ed.DEFAULTS["memit"], layers=(0, 1), mom2_weight=1.0, **FREE))
    assert params.layers == (0, 1)
    req = ed.prepare(tok, FACT, [], model.cfg.block_size)
    saved = ed.snapshot(model, params.layers)
    tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=3000)
    ed.apply_edits(model, "memit", [req], ed.KeyStatistics(model, tokens, 960), params)
    assert all(not torch.equal(model.blocks[layer].mlp.w2.weight, w) for layer, w in saved.items())
    assert _p(model, tok) > 0.5
    ed.restore(model, saved)
    assert _p(model, tok) < 0.1


def test_ft_l_moves_only_one_layer_and_stays_in_the_linf_ball():
    model, tok = random_model()
    params = ed.resolve_params(model, "ft-l", replace(ed.DEFAULTS["ft-l"], layers=(1,), lr=1e-2, norm_constraint=0.02))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    p0 = _p(model, tok)
    ed.apply_edits(model, "ft-l", [ed.prepare(tok, FACT, [], 48)], lambda layer: None, params)
    change = model.blocks[1].mlp.w2.weight - weights["blocks.1.mlp.w2.weight"]
    assert 0.0 < change.abs().max().item() <= 0.02 + 1e-7
    assert [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])] == ["blocks.1.mlp.w2.weight"]
    assert _p(model, tok) > p0
    assert model.blocks[1].mlp.w2.weight.grad is None


def test_default_layers_and_bad_parameters():
    assert ed.default_layers(4, "rome") == (1,) and ed.default_layers(8, "memit") == (1, 2, 3, 4)
    assert ed.default_layers(4, "memit") == (0, 1, 2) and ed.default_layers(1, "memit") == (0,)
    model, _ = random_model()
    with pytest.raises(UserError, match="unknown editing method 'roam'"):
        ed.resolve_params(model, "roam", None)
    with pytest.raises(UserError, match="layer 5 does not exist"):
        ed.resolve_params(model, "rome", replace(ed.DEFAULTS["rome"], layers=(5,)))
    with pytest.raises(UserError, match="rome edits one layer"):
        ed.resolve_params(model, "rome", replace(ed.DEFAULTS["rome"], layers=(0, 1)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, "steps must be at least 1"),
        ({"stats_tokens": 0}, "stats_tokens must be at least 1"),
        ({"contexts": -1}, "contexts must not be negative"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"clamp_norm": -5.0}, "clamp_norm must be a positive finite number"),
        ({"norm_constraint": float("nan")}, "norm_constraint must be a positive finite number"),
        ({"ridge": -1.0}, "ridge must be a finite number >= 0"),
        ({"kl_weight": -1.0}, "kl_weight must be a finite number >= 0"),
        ({"mom2_weight": float("inf")}, "mom2_weight must be a finite number >= 0"),
        ({"layers": (0, 0)}, "give each --layer once"),
    ],
)
def test_edit_parameters_out_of_range_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        replace(ed.DEFAULTS["rome"], **change)
