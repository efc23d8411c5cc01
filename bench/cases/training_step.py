"""The end-to-end Quiet-STaR training step: forward + backward of ``QuietStarModel`` against
the step-by-step dense reference (``quietstar.reference``), with the same thoughts.

The model has SmolLM2-135M's architecture (30 layers, width 576, 9 query / 3 KV heads,
vocabulary 49,152) with random weights: the cost does not depend on the weights.
Variants: ``reference`` (dense masks, full logits, 1 + C passes with gradients);
``quietstar`` (the fast path with its default activation checkpointing, thoughts given as for
the reference); ``quietstar+sampling`` (the same including its own thought sampling, i.e. a
real training step); ``quietstar-no-checkpointing`` (the fast path keeping activations).
"""

from __future__ import annotations

import torch

BASELINE = "reference"
LENGTH_KEY = "length"  # what --max-length varies
LENGTH_VARIANTS = ["reference", "quietstar"]
SMOLLM2_135M = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)


def variants(device: torch.device) -> list[str]:
    return ["reference", "quietstar", "quietstar+sampling", "quietstar-no-checkpointing"]


def size(device: torch.device, quick: bool) -> dict:
    if quick:
        return dict(batch=1, length=16, thought_tokens=2, talk_tokens=2, n_thoughts=1, layers=2)
    return dict(batch=1, length=128, thought_tokens=9, talk_tokens=4, n_thoughts=1, layers=30)


def make_model(s: dict, device: torch.device, gradient_checkpointing: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    from quietstar import QuietStarConfig, QuietStarModel

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": s["layers"]})
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(device)
    qs_config = QuietStarConfig(
        thought_tokens=s["thought_tokens"], talk_tokens=s["talk_tokens"], n_thoughts=s["n_thoughts"]
    )
    qs = QuietStarModel(model, config=qs_config, gradient_checkpointing=gradient_checkpointing)
    return qs.to(device).train()


def build(variant: str, s: dict, device: torch.device):
    from quietstar.reference import reference_forward

    qs = make_model(s, device, gradient_checkpointing=variant != "quietstar-no-checkpointing")
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (s["batch"], s["length"]), generator=gen, device=device)
    thoughts = qs.sample_thoughts(ids, generator=gen)
    params = [p for p in qs.parameters() if p.requires_grad]

    def backward(loss):
        torch.autograd.grad(loss, params)

    if variant == "reference":
        return (lambda: backward(reference_forward(qs, ids, thoughts=thoughts).loss)), {}
    if variant == "quietstar+sampling":
        return (lambda: backward(qs(ids, generator=gen).loss)), {"note": "samples its own thoughts"}
    note = {"note": "activations kept"} if variant == "quietstar-no-checkpointing" else {}
    return (lambda: backward(qs(ids, thoughts=thoughts).loss)), note
