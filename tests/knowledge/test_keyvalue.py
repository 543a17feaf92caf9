"""The FFN as key-value memory (Geva et al. 2021, arXiv 2012.14913), against a plain torch reading of W₁, W₂, E."""

from __future__ import annotations

import pytest
import torch

from llmlab.errors import UserError
from llmlab.knowledge.keyvalue import top_memories
from tests.knowledge.conftest import random_model


@pytest.mark.parametrize("name", ["notes", "nanogpt-shakespeare-char"])
def test_top_memories_are_the_largest_coefficients_and_their_values_projected_on_the_vocabulary(name):
    """Reference: m = the input of mlp.w2 caught by a torch forward pre-hook, v_i = W₂[:, i],
    promoted tokens = the top of E·v_i; and Σ_i m_i v_i + b₂ is the FFN's output."""
    model, tok = random_model(name)
    prompt = "Anya was born in"
    seen, outs = {}, {}
    handles = [b.mlp.w2.register_forward_pre_hook(lambda m, a, layer=i: seen.__setitem__(layer, a[0].detach()))
               for i, b in enumerate(model.blocks)]  # fmt: skip
    handles += [b.mlp.register_forward_hook(lambda m, a, o, layer=i: outs.__setitem__(layer, o.detach()))
                for i, b in enumerate(model.blocks)]  # fmt: skip
    with torch.no_grad():
        model(torch.tensor([tok.encode(prompt)]))
    for h in handles:
        h.remove()
    layers = top_memories(model, tok, prompt, position=-1, k=3, top_tokens=4)
    assert len(layers) == model.cfg.n_layers
    for layer, memories in enumerate(layers):
        m = seen[layer][0, -1]  # [F]
        W2 = model.blocks[layer].mlp.w2
        torch.testing.assert_close(
            W2.weight @ m + (W2.bias if W2.bias is not None else 0), outs[layer][0, -1], atol=1e-5, rtol=1e-5
        )
        values, neurons = m.topk(3)
        assert [x.neuron for x in memories] == neurons.tolist()
        assert [x.activation for x in memories] == pytest.approx(values.tolist(), rel=1e-6)
        for x in memories:
            logits = model.embed.weight @ W2.weight[:, x.neuron]  # tied: E is the embedding
            top = logits.topk(4)
            assert x.promotes == [tok.decode([int(t)]) for t in top.indices]
            assert x.scores == pytest.approx(top.values.tolist(), rel=1e-5)


def test_bad_requests_are_user_errors():
    model, tok = random_model()
    with pytest.raises(UserError, match="the prompt is empty"):
        top_memories(model, tok, "")
    with pytest.raises(UserError, match="position 9 is outside the prompt's 3 tokens"):
        top_memories(model, tok, "abc", position=9)
    with pytest.raises(UserError, match="49 tokens long, but the model's context is 48"):
        top_memories(model, tok, "a" * 49)
    with pytest.raises(UserError, match=r"k \(--top\) and top_tokens \(--tokens\) must be at least 1"):
        top_memories(model, tok, "abc", k=0)
