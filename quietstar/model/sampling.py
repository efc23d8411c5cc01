"""Sampling tokens from hidden states without holding ``[N, V]`` logits for all rows."""

from __future__ import annotations

import torch

# Float32 logits scored at a time: 64 MiB, whatever the vocabulary (rows = this // V).
SAMPLE_CHUNK_ELEMENTS = 16 * 2**20


def head_logits(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    lm_bias: torch.Tensor | None,
    masked_vocab: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Float32 logits ``[N, V]`` (float64 for float64 inputs) of ``hidden [N, d]`` divided by
    ``temperature``, masked ids -inf."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    # ``linear`` hands autocast the weight itself (a leaf), whose cast autocast then caches for
    # the rest of its region; a transposed view would be cast again at every call.
    logits = torch.nn.functional.linear(hidden, lm_weight).to(dtype)
    if lm_bias is not None:
        logits = logits + lm_bias.to(dtype)
    if temperature != 1.0:
        logits = logits / temperature
    if masked_vocab is not None and masked_vocab.numel():
        logits = logits.index_fill(-1, masked_vocab, float("-inf"))
    return logits


@torch.no_grad()
def sample_tokens(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    lm_bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    masked_vocab: torch.Tensor | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``hidden [..., d]``: a sample from ``softmax(logits / temperature)``
    (Gumbel-max, i.e. hard Gumbel-softmax) or the argmax; masked ids are never drawn.

    Returns:
        ``[...]`` int64.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=hidden.device)
    chunk = max(1, SAMPLE_CHUNK_ELEMENTS // lm_weight.shape[0])
    for start in range(0, flat.shape[0], chunk):
        logits = head_logits(flat[start : start + chunk], lm_weight, lm_bias, masked_vocab, temperature)
        if not greedy:
            uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
            logits -= torch.log(-torch.log(uniform.clamp_(min=torch.finfo(torch.float32).tiny)))
        out[start : start + chunk] = logits.argmax(-1)
    return out.view(hidden.shape[:-1])
