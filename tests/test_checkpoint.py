"""save_pretrained / from_pretrained round trip in safetensors."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_causal_lm
from transformers import AutoModelForCausalLM

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.model.loaders import load_quietstar


def test_round_trip_keeps_every_weight_and_the_config(tmp_path):
    config = QuietStarConfig(thought_tokens=2, talk_tokens=2, n_thoughts=1, mix="logprobs", policy_weight=3.0)
    qs = QuietStarModel(tiny_causal_lm("qwen2"), config=config)
    with torch.no_grad():
        for p in qs.mixing_head.parameters():
            p.normal_()
        qs.meta_embeddings.normal_()
    qs.save_pretrained(tmp_path)
    assert {"model.safetensors", "quietstar.safetensors", "quietstar_config.json", "config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = QuietStarModel.from_pretrained(tmp_path)
    assert loaded.config == config
    expected = qs.state_dict()
    actual = loaded.state_dict()
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name
    ids = torch.randint(0, 97, (1, 8))
    thoughts = qs.sample_thoughts(ids)
    # Same weights, possibly another memory layout: equal up to float32 summation order.
    torch.testing.assert_close(loaded(ids, thoughts=thoughts).loss, qs(ids, thoughts=thoughts).loss, rtol=1e-6, atol=0)


def test_loading_under_another_meta_token_scale_keeps_the_learned_start_and_end_embeddings(tmp_path):
    from quietstar.model.loaders import load_quietstar

    qs = QuietStarModel(tiny_causal_lm("llama"), config=QuietStarConfig(thought_tokens=2, talk_tokens=2, meta_token_scale=10.0))
    with torch.no_grad():
        qs.meta_embeddings.normal_()
    qs.save_pretrained(tmp_path)
    loaded = load_quietstar(tmp_path, QuietStarConfig(thought_tokens=2, talk_tokens=2))  # the default scale, 100
    assert loaded.config.meta_token_scale == 100.0
    for which in (0, 1):
        torch.testing.assert_close(loaded.meta_embedding(which), qs.meta_embedding(which))


def test_checkpoint_directory_loads_as_the_plain_base_model(tmp_path):
    qs = QuietStarModel(tiny_causal_lm("llama"), config=QuietStarConfig(thought_tokens=1, talk_tokens=1, n_thoughts=1))
    qs.save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert base.config._attn_implementation != "quietstar"
    ids = torch.randint(0, 97, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, qs.model(ids).logits)


def test_loading_a_directory_without_quietstar_parts_fails_clearly(tmp_path):
    tiny_causal_lm("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a quietstar checkpoint"):
        QuietStarModel.from_pretrained(tmp_path)


def test_a_checkpoint_whose_mixing_head_has_a_last_layer_bias_still_loads_and_computes_the_same(tmp_path):
    """quietstar 0.1 saved a last-layer bias in the mixing head (the authors' head has none)."""
    from safetensors.torch import load_file, save_file

    from quietstar.model.checkpoint import QUIETSTAR_WEIGHTS

    qs = QuietStarModel(tiny_causal_lm("llama"), config=QuietStarConfig(thought_tokens=2, talk_tokens=2, n_thoughts=1))
    with torch.no_grad():
        qs.mixing_head.mlp[-1].weight.normal_()
    qs.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / QUIETSTAR_WEIGHTS))
    state["mixing_head.mlp.4.bias"] = torch.tensor([0.25])
    save_file(state, str(tmp_path / QUIETSTAR_WEIGHTS))
    loaded = QuietStarModel.from_pretrained(tmp_path)
    assert loaded.mixing_head.mlp[-1].bias.item() == 0.25
    base, talk = torch.randn(2, 3, 32).unbind(0)
    torch.testing.assert_close(loaded.mixing_head(base, talk), qs.mixing_head(base, talk) + 0.25)


def test_a_bfloat16_folder_loads_in_float32_and_its_cast_model_saves_and_loads_as_float32(tmp_path):
    # Hub folders store bfloat16, and transformers 5 loads a folder in the dtype it stores:
    # training would then update bfloat16 weights, whose rounding swallows AdamW's small steps.
    from helpers import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "hf")
    AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    assert load_quietstar(folder, dtype=None).meta_embeddings.dtype == torch.bfloat16  # as stored, when asked
    qs = load_quietstar(folder)
    assert {p.dtype for p in qs.parameters()} == {torch.float32}
    # A model loaded as stored and cast up saves the dtype of its weights, not the folder's.
    cast = load_quietstar(folder, dtype=None).float()
    cast.save_pretrained(tmp_path / "ckpt")
    loaded = QuietStarModel.from_pretrained(tmp_path / "ckpt")
    for name, value in cast.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
