"""The cost of ``quietstar eval perplexity``: next-token NLL with and without thinking over
held-out text, against a plain forward of the base model over the same tokens (its NLL).

The target: thinking costs at most ``1.2 x (1 + C)`` plain forwards, ``C`` the chain slots per
position (``T + K + 1``), the tree's own size. The table's ``x floor`` column is the time over
the plain forward's. SmolLM2-135M's shapes with random weights, one thought of ``T`` tokens
sampled at every position (its sampling included: evaluation has no thoughts given).
"""

from __future__ import annotations

import torch

from cases.training_step import DTYPE, MODELS, decoder_params, decoder_products, make_model

IN_DEFAULT_RUN = False  # about 40 s on 2 CPU cores: `bench/run.py --case evaluation` runs it


def baseline(device: torch.device) -> str:
    return "plain-forward"


def floor(device: torch.device) -> str:
    return "plain-forward"


def variants(device: torch.device) -> list[str]:
    return ["plain-forward", "quietstar-eval"]


def sizes(device: torch.device, scale: str) -> list[dict]:
    size = dict(model="smollm2-135m", thought_tokens=9, talk_tokens=4, n_thoughts=1)
    if scale == "quick":
        return [dict(size, batch=1, length=16, thought_tokens=2, talk_tokens=2, layers=2)]
    if device.type == "cpu":
        return [dict(size, batch=1, length=256 if scale == "full" else 128, layers=30)]
    return [dict(size, model="llama-1b", batch=8, length=1024, layers=16)]


def chain_slots(size: dict) -> int:
    return size["thought_tokens"] + size["talk_tokens"] + 1


def label(size: dict) -> str:
    return f"B={size['batch']} L={size['length']} T={size['thought_tokens']} (1+C={1 + chain_slots(size)})"


def tokens(size: dict) -> int:
    """Text tokens scored per run."""
    return size["batch"] * size["length"]


def matmul_shapes(size: dict, device: torch.device) -> tuple[torch.dtype, list[tuple[int, int, int, int, int]]]:
    """The products ``next_token_nll`` runs: the ``T`` sampling steps through the KV cache, the
    first with the decoder over the text as one pass, and the last thought token with the end
    token as one pass; the lm_head for the ``T`` draws and for the two NLLs (base, thinking) of
    the ``L - 1`` scored rows."""
    cfg = MODELS[size["model"]]
    text, step = size["batch"] * size["length"], size["batch"] * size["n_thoughts"] * size["length"]
    rows = [text + step] + [step] * (size["thought_tokens"] - 1) + [2 * step]
    shapes = [(1, m, k, n, count) for m in rows for k, n, count in decoder_products(size)]
    head = (cfg["hidden_size"], cfg["vocab_size"])
    shapes += [(1, step, *head, size["thought_tokens"]), (1, size["batch"] * (size["length"] - 1), *head, 2)]
    return DTYPE[device.type], shapes


def useful_flops(size: dict, variant: str, device: torch.device) -> float:
    """A plain forward's ``2 P X + 2 d V X`` over the text; with thinking, the products the
    evaluation's mathematics needs (``matmul_shapes``): the decoder over the text and the
    ``T + 2`` chain steps up to the end token, the lm_head for the ``T`` draws and the two NLLs.
    (The target's ``1 + C`` plain forwards is a time bound, not work the pass does: it stops
    at the end token, ``C - T - 1`` slots short of the tree.)"""
    if variant != "plain-forward":
        return sum(2.0 * batch * m * k * n * count for batch, m, k, n, count in matmul_shapes(size, device)[1])
    cfg = MODELS[size["model"]]
    text = tokens(size)
    return 2.0 * decoder_params(size) * text + 2.0 * cfg["hidden_size"] * cfg["vocab_size"] * text


def build(variant: str, s: dict, device: torch.device):
    from quietstar.train.evaluation import next_token_nll

    qs = make_model(s, device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, MODELS[s["model"]]["vocab_size"], (s["batch"], s["length"]), generator=gen, device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)

    @torch.no_grad()
    def plain():
        logits = qs.model(ids).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    if variant == "plain-forward":
        return plain, {"note": "the base model's forward and NLL (full-vocabulary logits)"}
    return (lambda: next_token_nll(qs, ids, mask, gen)), {"note": f"target <= {1.2 * (1 + chain_slots(s)):.1f}x the plain forward"}
