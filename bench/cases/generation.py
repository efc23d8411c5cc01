"""Generation with thoughts against the base model's own generation: the cost of thinking
before every token at inference.

Per new token, ``QuietStarModel.generate`` runs ``T + 3`` tokens through the decoder and its KV
cache (the start token and ``T - 1`` thought tokens, each drawing the next one; the last thought
token; the end token, whose state is the talk state; the drawn token appended), in ``T + 1``
passes (the last thought token with the end token, the drawn token with the next start token),
and ``T + 1`` lm_head products (``T`` thought tokens, one next token), against one token, one
pass and one product for the base model (transformers' ``generate``, sampling at temperature 1,
no top-k or top-p). The table's ``x floor`` column is the time over the base model's. SmolLM2-135M's shapes
with random weights; the prompt's prefill is timed in both.
"""

from __future__ import annotations

import torch

from cases.training_step import DTYPE, MODELS, decoder_params, decoder_products, make_model

IN_DEFAULT_RUN = False  # tens of seconds on 2 CPU cores: `bench/run.py --case generation` runs it


def baseline(device: torch.device) -> str:
    return "base-generate"


def floor(device: torch.device) -> str:
    return "base-generate"


def variants(device: torch.device) -> list[str]:
    return ["base-generate", "quietstar-generate"]


def sizes(device: torch.device, scale: str) -> list[dict]:
    size = dict(model="smollm2-135m", thought_tokens=9, talk_tokens=4, n_thoughts=1)
    if scale == "quick":
        return [dict(size, batch=1, prompt=16, new_tokens=2, thought_tokens=2, talk_tokens=2, layers=2)]
    if device.type == "cpu":  # a short prompt: the time is the new tokens'
        return [dict(size, batch=1, prompt=16, new_tokens=128 if scale == "full" else 32, layers=30)]
    return [dict(size, model="llama-1b", batch=8, prompt=256, new_tokens=64 if scale == "full" else 32, layers=16)]


def label(size: dict) -> str:
    return f"B={size['batch']} prompt={size['prompt']} new={size['new_tokens']} T={size['thought_tokens']}"


def tokens(size: dict) -> int:
    """New tokens generated per run."""
    return size["batch"] * size["new_tokens"]


def tokens_per_token(size: dict, variant: str) -> int:
    """Tokens through the decoder per new token (the drawn token's append included)."""
    return size["thought_tokens"] + 3 if variant == "quietstar-generate" else 1


def decoder_passes(size: dict, variant: str) -> int:
    """Calls of the decoder in one run, the prompt's prefill included: the base model's one per
    new token; with thinking, the first thought's start token alone, then ``T + 1`` per token."""
    new = size["new_tokens"]
    return 1 + (size["thought_tokens"] + 1) * new if variant == "quietstar-generate" else new


def head_rows_per_token(size: dict, variant: str) -> int:
    """lm_head products per new token: the thought tokens' and the next token's (one, as the
    default ``mix="hidden"`` makes it; ``"logprobs"`` mixing takes two)."""
    return size["thought_tokens"] + 1 if variant == "quietstar-generate" else 1


def matmul_shapes(size: dict, device: torch.device) -> tuple[torch.dtype, list[tuple[int, int, int, int, int]]]:
    """The base model's products: the prompt's prefill, then one row per sequence per token."""
    cfg = MODELS[size["model"]]
    d, batch, new = cfg["hidden_size"], size["batch"], size["new_tokens"]
    decoder = decoder_products(size)
    shapes = [(1, batch * size["prompt"], k, n, count) for k, n, count in decoder]
    shapes += [(1, batch, k, n, count * (new - 1)) for k, n, count in decoder]
    shapes.append((1, batch, d, cfg["vocab_size"], new))
    return DTYPE[device.type], shapes


def useful_flops(size: dict, variant: str, device: torch.device) -> float:
    """``2 P`` per token through the decoder (the prompt once, then ``tokens_per_token`` per new
    token, less the last token's append) and ``2 d V`` per lm_head row (``head_rows_per_token``
    per new token); attention's FLOPs, a few percent at these lengths, are not counted."""
    cfg = MODELS[size["model"]]
    batch, new = size["batch"], size["new_tokens"]
    decoder_tokens = size["prompt"] + tokens_per_token(size, variant) * new - 1
    head_rows = head_rows_per_token(size, variant) * new
    return batch * (2.0 * decoder_params(size) * decoder_tokens + 2.0 * cfg["hidden_size"] * cfg["vocab_size"] * head_rows)


def build(variant: str, s: dict, device: torch.device):
    qs = make_model(s, device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = MODELS[s["model"]]["vocab_size"]
    ids = torch.randint(0, vocab, (s["batch"], s["prompt"]), generator=gen, device=device)
    mask = torch.ones_like(ids)
    new = s["new_tokens"]
    work = useful_flops(s, "quietstar-generate", device) / useful_flops(s, "base-generate", device)

    if variant == "base-generate":
        def base():
            return qs.model.generate(
                ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
            )

        return base, {"note": "transformers' generate, sampling"}
    return (lambda: qs.generate(ids, mask, max_new_tokens=new, generator=gen)), {
        "note": f"thinking before every token: {work:.1f}x the base model's FLOPs"
    }
