"""QuietStarAttention and patch(): drop-in on ordinary input, tree rule on tree input."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from helpers import ARCHITECTURES, quietstar_model, tiny_causal_lm

from quietstar import QuietStarAttention, patch
from quietstar.model import attention
from quietstar.model.attention import ATTENTION_NAME, SUPPORTED_MODEL_TYPES, decoder_layers
from quietstar.model.backbone import run_backbone
from quietstar.ops.layout import TreeLayout, tree_position_ids


def padded_batch(vocab=97, length=11):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_patched_model_logits_equal_unpatched(architecture):
    model = tiny_causal_lm(architecture)
    patched = tiny_causal_lm(architecture)
    patch(patched)
    assert all(isinstance(layer.self_attn, QuietStarAttention) for layer in patched.model.layers)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        actual = patched(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)
    assert list(patched.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_quietstar_attention_swapped_into_stock_model_is_a_drop_in(architecture):
    model = tiny_causal_lm(architecture)
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        for layer in model.model.layers:
            layer.self_attn = QuietStarAttention(layer.self_attn)
        actual = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_patched_model_generates_like_unpatched_with_transformers_cache():
    model = tiny_causal_lm("llama")
    patched = patch(tiny_causal_lm("llama"))
    ids, mask = padded_batch()
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids=ids, attention_mask=mask, **options)
    actual = patched.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(actual, expected)


def test_patch_does_not_touch_a_model_sharing_its_config():
    first = tiny_causal_lm("llama")
    second = type(first)(first.config)
    patch(first)
    assert first.config._attn_implementation == ATTENTION_NAME
    assert second.config._attn_implementation == "sdpa"
    assert not isinstance(second.model.layers[0].self_attn, QuietStarAttention)


def test_registered_implementation_builds_padding_masks():
    model = tiny_causal_lm("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    patch(model)  # registers "quietstar" with both interfaces
    fresh = type(model)(model.config)  # stock attention modules, implementation "quietstar"
    fresh.load_state_dict(model.state_dict())
    assert not isinstance(fresh.model.layers[0].self_attn, QuietStarAttention)
    with torch.no_grad():
        actual = fresh.eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_patch_rejects_unsupported_architectures():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)
    with pytest.raises(ValueError, match="supported: " + ", ".join(SUPPORTED_MODEL_TYPES)):
        patch(transformers.GPT2LMHeadModel(config))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tree_pass_matches_dense_reference_attention(architecture):
    """The same tree input through the fast and the dense tree_attention backends."""
    model = patch(tiny_causal_lm(architecture))
    ids, mask = padded_batch(length=7)
    n_slots, n_thoughts = 5, 2
    embeds = torch.randn(2, n_slots * 7, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    positions = tree_position_ids((mask.cumsum(-1) - 1).clamp(min=0), n_slots, n_thoughts)
    outs = []
    for backend in ("torch", "reference"):
        layout = TreeLayout(7, n_thoughts, mask.bool(), backend=backend)
        with torch.no_grad():
            outs.append(run_backbone(model, embeds, positions, tree_layout=layout))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_base_slot_of_a_tree_pass_equals_the_plain_model():
    model = patch(tiny_causal_lm("llama"))
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.model(input_ids=ids).last_hidden_state
        embeds = model.get_input_embeddings()(ids)
        chain = torch.randn(1, 2 * 9, embeds.shape[-1])
        positions = tree_position_ids(torch.arange(9)[None], 3, 1)
        hidden = run_backbone(model, torch.cat([embeds, chain], 1), positions, tree_layout=TreeLayout(9))
    torch.testing.assert_close(hidden[:, :9], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("half_pays", "expected"), [(False, torch.float32), (True, torch.bfloat16)])
def test_tree_attention_under_cpu_bfloat16_autocast_gets_the_dtype_it_computes_in(monkeypatch, half_pays, expected):
    """Where the CPU op computes half precision in float32 (short slots, or no bfloat16
    matmuls), q and k (float32 from RoPE) reach it unrounded and v is cast up once; where the
    native backend computes bfloat16 as it is, all three arrive in bfloat16. Either way the
    pass stays within bfloat16 precision of the float32 one."""
    import quietstar.model.attention as attention

    seen = []
    real = attention.tree_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(attention, "tree_attention", spy)
    monkeypatch.setattr(attention, "half_precision_pays", lambda dtype, device, slot_len: half_pays)
    model = patch(tiny_causal_lm("llama"))
    gen = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, 3 * 9, model.config.hidden_size, generator=gen)
    positions = tree_position_ids(torch.arange(9)[None], 3, 1)
    with torch.no_grad():
        full = run_backbone(model, embeds, positions, tree_layout=TreeLayout(9))
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = run_backbone(model, embeds, positions, tree_layout=TreeLayout(9))
    assert seen and all(dtypes == (expected,) * 3 for dtypes in seen)
    assert ((half.float() - full).norm() / full.norm()).item() < 2e-2


def test_attention_dropout_that_the_tree_passes_do_not_apply_is_logged(caplog):
    """tree_attention has no dropout: a model trained with attention_dropout set says so rather
    than training without it silently."""
    qs = quietstar_model("llama", thought_tokens=2, talk_tokens=1, n_thoughts=1)
    for layer in decoder_layers(qs.model):
        layer.self_attn.attention_dropout = 0.375
    ids = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    attention._log_dropout_not_applied.cache_clear()  # once per process: this test's own first
    with caplog.at_level(logging.WARNING, logger="quietstar.model.attention"):
        qs.eval()(ids, generator=torch.Generator().manual_seed(1))
        assert "attention dropout" not in caplog.text  # no dropout outside training
        qs.train()(ids, generator=torch.Generator().manual_seed(1))
    assert caplog.text.count("attention dropout 0.375 is not applied in the tree passes") == 1
