"""Shared test utilities (imported by the test modules; conftest.py sets up the interpreter)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from quietstar.ops.backends import triton_available, triton_interpreter_enabled
from quietstar.ops.native import native_unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# CI sets QUIETSTAR_REQUIRE_NATIVE=1: there a missing extension fails the native tests
# instead of skipping them.
requires_native = pytest.mark.skipif(
    DEVICE.type != "cpu" or (native_unavailable() is not None and os.environ.get("QUIETSTAR_REQUIRE_NATIVE") != "1"),
    reason=f"the native CPU kernels run on CPU tensors and need quietstar._C: {native_unavailable()}",
)

requires_triton = pytest.mark.skipif(
    not (triton_available() and (DEVICE.type == "cuda" or triton_interpreter_enabled())),
    reason="triton is not installed, or there is no CUDA device and TRITON_INTERPRET is not 1",
)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (the plain norm when expected is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    difference = (actual - expected).norm().item()
    denominator = expected.norm().item()
    return difference if denominator == 0 else difference / denominator


def tiny_causal_lm(architecture: str = "llama", seed: int = 0, **overrides):
    """A small random Hugging Face causal LM of a Llama-family architecture (float32, eval)."""
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    }
    config_name, model_name, extra = classes[architecture]
    sizes = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=97,
        max_position_embeddings=128,
    )
    config = getattr(transformers, config_name)(**{**sizes, **extra, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3"]


def quietstar_model(architecture: str = "llama", tokenizer=None, **config):
    """``QuietStarModel`` over ``tiny_causal_lm(architecture)`` with ``QuietStarConfig(**config)``
    and a trained-looking mixing head (the fresh one outputs exactly 0 and would hide mixing bugs)."""
    from quietstar import QuietStarConfig, QuietStarModel

    qs = QuietStarModel(tiny_causal_lm(architecture), tokenizer, QuietStarConfig(**config))
    torch.nn.init.normal_(qs.mixing_head.mlp[-1].weight, std=0.3, generator=torch.Generator().manual_seed(3))
    return qs


CORPUS = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Every good boy deserves fruit. Two plus two is four, and four plus four is eight. "
    "She sells sea shells by the sea shore. The rain in Spain stays mainly in the plain. "
)


def tiny_tokenizer():
    """A small byte-level BPE tokenizer trained here on ``CORPUS`` (no network), with EOS and
    pad tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


def tiny_model_folder(path, architecture: str = "llama", **overrides):
    """A Hugging Face model folder (random weights, its tokenizer) of a tiny Llama-family model
    whose vocabulary fits ``tiny_tokenizer``; returns ``path``."""
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm(architecture, **{"vocab_size": len(tokenizer), **overrides})
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def training_workspace(root, corpus_repeats: int = 20):
    """``root`` with ``model/`` (``tiny_model_folder``) and ``corpus.txt`` for training runs."""
    tiny_model_folder(root / "model")
    (root / "corpus.txt").write_text(CORPUS * corpus_repeats, encoding="utf-8")
    return root


def count_onednn_products(monkeypatch, weights=None) -> list[tuple[int, ...]]:
    """The input shapes of the products that go through oneDNN (``onednn_linear``'s
    ``_onednn_product``) from now on; with ``weights`` (data pointers), only those whose weight
    is one of them."""
    import quietstar.ops.onednn_linear as onednn_module

    calls = []
    product = onednn_module._onednn_product

    def counted(x, weight, bias):
        if weights is None or weight.data_ptr() in weights:
            calls.append(tuple(x.shape))
        return product(x, weight, bias)

    monkeypatch.setattr(onednn_module, "_onednn_product", counted)
    return calls


def count_native_queries(monkeypatch) -> list[int]:
    """Query rows (per batch row and head) of every native forward computation from now on."""
    from quietstar.ops import tree_attention_native

    rows = []
    forward = tree_attention_native._forward

    def counted(q, *args):
        rows.append(q.shape[2])
        return forward(q, *args)

    monkeypatch.setattr(tree_attention_native, "_forward", counted)
    return rows
