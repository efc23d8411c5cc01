"""Reference ``linear_cross_entropy``: materialise every logit in float32. Ground truth."""

from __future__ import annotations

import torch


def linear_cross_entropy_reference(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    lm_bias: torch.Tensor | None,
    base_hidden: torch.Tensor | None,
    w: torch.Tensor | None,
    temperature: float,
    masked_ids: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    """Dense ``[N, V]`` logits and a log-softmax; arguments as ``quietstar.linear_cross_entropy``
    (already checked; ``masked_ids`` int64 or None)."""
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(compute)
    if w is not None:
        mix = w.to(compute)[:, None]
        h = (1 - mix) * base_hidden.to(compute) + mix * h
    logits = h @ lm_weight.to(compute).T
    if lm_bias is not None:
        logits = logits + lm_bias.to(compute)
    if temperature != 1.0:
        logits = logits / temperature
    if masked_ids is not None:
        # In place: no op above keeps its output for the backward, and the logits are big.
        logits.index_fill_(1, masked_ids, float("-inf"))
    log_probs = torch.log_softmax(logits, dim=-1)
    ignored = targets == ignore_index
    picked = log_probs.gather(1, targets.masked_fill(ignored, 0)[:, None])[:, 0]
    return torch.where(ignored, 0.0, -picked)
