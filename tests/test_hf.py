"""GPT-2 interop: llmlab's `gpt2` layout against Hugging Face transformers on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llmlab.config import ModelConfig
from llmlab.errors import UserError
from llmlab.hf import config_from_hf, from_hf_model, to_hf_model
from llmlab.model import GPT

SMALL = dict(vocab_size=96, n_positions=32, n_embd=48, n_layer=2, n_head=4)


@pytest.fixture(scope="module")
def hf_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**SMALL)).eval()  # random weights: nothing is downloaded


def test_imported_gpt2_gives_transformers_logits(hf_model):
    """Reference: transformers.GPT2LMHeadModel's own forward, fp32, within 1e-4."""
    ours = from_hf_model(hf_model)
    idx = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(idx).logits
    torch.testing.assert_close(ours(idx), ref, rtol=1e-4, atol=1e-4)
    assert ours.unembed.weight is ours.embed.weight


def test_export_round_trips_through_transformers(hf_model):
    torch.manual_seed(2)
    model = GPT(config_from_hf(hf_model.config.to_dict())).eval()
    exported = to_hf_model(model)
    idx = torch.randint(0, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, model(idx), rtol=1e-4, atol=1e-4)


def test_only_gpt2_layout_models_export():
    with pytest.raises(UserError, match="only GPT-2-layout models export"):
        to_hf_model(GPT(ModelConfig(vocab_size=32, n_layers=1, d_model=32)))


def test_unknown_architectures_and_missing_tensors_are_errors(hf_model):
    with pytest.raises(UserError, match="unsupported architecture 'llama'"):
        config_from_hf({**hf_model.config.to_dict(), "model_type": "llama"})
    from llmlab.hf import state_dict_from_hf

    sd = {k: v for k, v in hf_model.state_dict().items() if "h.1.mlp" not in k}
    with pytest.raises(UserError, match="lacks tensors for 'blocks.1.mlp.w1.weight'"):
        state_dict_from_hf(sd, config_from_hf(hf_model.config.to_dict()))
