"""Hook points: identity when unused, the TransformerLens names and shapes, always removed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from llmlab.hooks import direct_attributes
from llmlab.model import GPT
from tests.conftest import TINY_VARIANTS


def build(name: str = "notes", **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(replace(TINY_VARIANTS[name], **overrides)).eval()


IDX = torch.randint(0, 48, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_hooks_that_return_none_leave_the_output_unchanged(name):
    model = build(name, attention="explicit")  # hooking the pattern never switches paths here
    plain = model(IDX)
    seen = []
    with model.hooks([(lambda n: True, lambda x, hook: seen.append(hook.name))]):
        hooked = model(IDX)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    assert set(seen) == set(model.hook_names())


def test_cache_has_the_transformerlens_names_and_the_notes_shapes():
    model = build("nanogpt-shakespeare-char")
    B, S, H, h, D, F, V = 2, 12, 32, 4, 8, 128, 48
    logits, cache = model.run_with_cache(IDX)
    expected = {
        "hook_embed": (B, S, H), "hook_pos_embed": (B, S, H),
        "blocks.0.hook_resid_pre": (B, S, H), "blocks.0.ln1.hook_normalized": (B, S, H),
        "blocks.0.attn.hook_q": (B, S, h, D), "blocks.0.attn.hook_k": (B, S, h, D),
        "blocks.0.attn.hook_v": (B, S, h, D), "blocks.0.attn.hook_attn_scores": (B, h, S, S),
        "blocks.0.attn.hook_pattern": (B, h, S, S), "blocks.0.attn.hook_z": (B, S, h, D),
        "blocks.0.hook_attn_out": (B, S, H), "blocks.0.hook_resid_mid": (B, S, H),
        "blocks.1.mlp.hook_pre": (B, S, F), "blocks.1.mlp.hook_post": (B, S, F),
        "blocks.1.hook_mlp_out": (B, S, H), "blocks.1.hook_resid_post": (B, S, H),
        "ln_final.hook_normalized": (B, S, H),
    }  # fmt: skip
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    assert logits.shape == (B, S, V)
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(B, h, S))  # softmax rows sum to 1
    assert (pattern.triu(diagonal=1) == 0).all()  # the mask: no attention to later tokens


def test_grouped_kv_heads_have_fewer_key_and_value_heads():
    _, cache = build("llama-tiny").run_with_cache(IDX)
    assert cache["blocks.0.attn.hook_q"].shape[2] == 4
    assert cache["blocks.0.attn.hook_k"].shape[2] == 2 == cache["blocks.0.attn.hook_v"].shape[2]


def test_residual_hooks_see_the_stream_the_next_layer_reads():
    """Post-LN (notes): the last resid_post, unembedded, is the logits (no final norm).
    Pre-LN: resid_post goes through ln_final first. resid_post of layer l = resid_pre of l+1."""
    notes = build("notes")
    logits, cache = notes.run_with_cache(IDX)
    torch.testing.assert_close(notes.unembed(cache["blocks.1.hook_resid_post"]), logits)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], cache["blocks.1.hook_resid_pre"])
    gpt = build("gpt2")
    logits, cache = gpt.run_with_cache(IDX)
    torch.testing.assert_close(gpt.unembed(gpt.ln_final(cache["blocks.1.hook_resid_post"])), logits)
    r = cache["blocks.0.hook_resid_pre"] + cache["blocks.0.hook_attn_out"]
    torch.testing.assert_close(cache["blocks.0.hook_resid_mid"], r)


def test_pattern_from_the_sdpa_path_equals_the_explicit_softmax():
    """Looking at the pattern switches attention to the explicit path; the logits do not change."""
    model = build("notes", attention="sdpa")
    plain = model(IDX)
    logits, cache = model.run_with_cache(IDX, names=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    assert len(cache) == 2


def test_a_hook_that_returns_a_tensor_patches_the_activation():
    model = build("notes")
    clean = model(IDX)

    def zero_head_0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    with model.hooks([("blocks.1.attn.hook_z", zero_head_0)]):
        patched = model(IDX)
    assert not torch.allclose(patched, clean)
    torch.testing.assert_close(model(IDX), clean)  # the hook is gone


@pytest.mark.parametrize("name", list(TINY_VARIANTS))
def test_a_hook_may_edit_its_activation_in_place_at_every_hook_point(name):
    """TransformerLens style (`t.mul_(...)`, with gradients on, batch 2), at the views Q, K, V
    split from one product and the positions broadcast over the batch too. Reference: the same
    edit returned as a new tensor; logits and every parameter's gradient equal."""
    model = build(name, attention="explicit")

    def logits_and_grads(edit, point):
        model.zero_grad(set_to_none=True)
        with model.hooks([(point, edit)]):
            logits = model(IDX)
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for point in model.hook_names():
        edited, grads = logits_and_grads(lambda t, hook: t.mul_(0.5), point)
        reference, ref_grads = logits_and_grads(lambda t, hook: t * 0.5, point)
        torch.testing.assert_close(edited, reference, rtol=0, atol=0, msg=point)
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=0, atol=0, msg=f"{point}: {n}")


def test_an_edit_in_place_is_not_seen_by_what_another_hook_saved():
    """resid_post of layer 0 and resid_pre of layer 1 are one tensor in the forward pass."""
    model = build("gpt2")
    _, clean = model.run_with_cache(IDX, names="blocks.0.hook_resid_post")
    saved = {}
    with model.hooks([("blocks.0.hook_resid_post", lambda t, hook: saved.setdefault("t", t)),
                      ("blocks.1.hook_resid_pre", lambda t, hook: t.zero_())]):  # fmt: skip
        model(IDX)
    torch.testing.assert_close(saved["t"], clean["blocks.0.hook_resid_post"], rtol=0, atol=0)


def test_a_forward_pre_hook_counts_as_a_hook():
    """torch's own `register_forward_pre_hook` on the pattern fires: the model leaves SDPA for the
    explicit softmax, as it does for a forward hook."""
    model = build("gpt2", attention="sdpa")
    seen = []
    handle = model.blocks[0].attn.hook_pattern.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        model(IDX)
    finally:
        handle.remove()
    assert seen == [(2, 4, 12, 12)]


def test_hooks_are_removed_even_when_the_block_raises():
    model = build("notes")
    with pytest.raises(RuntimeError), model.hooks([("hook_embed", lambda x, hook: x * 0)]):
        raise RuntimeError("boom")
    assert not any(hp.is_hooked() for hp in model.hook_points().values())


def test_unknown_hook_name_is_a_key_error():
    with pytest.raises(KeyError, match="no hook point named"):
        build().run_with_cache(IDX, names="blocks.9.hook_resid_pre")


def test_direct_attributes_are_the_same_objects_and_leave_no_trace():
    """Reference: nn.Module's own lookup (`_modules`, `_parameters`) outside the block."""
    model = build("gpt2")
    attn = model.blocks[0].attn
    assert "qkv" not in vars(attn)
    with direct_attributes(model):
        assert vars(attn)["qkv"] is attn._modules["qkv"] and vars(attn.qkv)["weight"] is attn.qkv._parameters["weight"]
        assert vars(model)["unembed"] is model.unembed
        inside = model(IDX)
        replacement = torch.nn.Parameter(torch.zeros_like(attn.out.weight))
        attn.out.weight = replacement  # nn.Module's __setattr__ drops the copy: the new one is used
        assert attn.out.weight is replacement
    assert all(n not in vars(m) for m in model.modules() for n in [*m._modules, *m._parameters])
    torch.testing.assert_close(inside, build("gpt2")(IDX), rtol=0, atol=0)


def test_hooks_fire_inside_direct_attributes_during_generation():
    """Generation runs inside `direct_attributes`; a hook attached around it still sees every step."""
    from llmlab.sampling import SamplingConfig, generate_ids

    model = build("gpt2")
    seen = []
    with model.hooks([("blocks.1.hook_resid_post", lambda x, hook: seen.append(x.shape[1]))]):
        steps = list(generate_ids(model, IDX[:1, :4], 5, SamplingConfig(0.0)))
    assert len(steps) == 5 and seen == [4, 1, 1, 1, 1]  # the prompt, then one token at a time
