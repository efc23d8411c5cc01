"""Reference ``tree_attention``: the dense tree mask and a float32 softmax. Ground truth."""

from __future__ import annotations

import torch

from quietstar.ops.layout import tree_visibility


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_len: int,
    n_thoughts: int,
    key_padding_mask: torch.Tensor | None,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """Dense tree attention; arguments as ``quietstar.tree_attention`` (already checked)."""
    group = q.shape[1] // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    keys = k.to(compute).repeat_interleave(group, dim=1)
    values = v.to(compute).repeat_interleave(group, dim=1)
    visible = tree_visibility(
        slot_len,
        q.shape[2] // slot_len,
        k.shape[2] // slot_len,
        n_thoughts,
        sliding_window,
        key_padding_mask,
        q.device,
    )[:, None]
    scores = (q.to(compute) @ keys.transpose(-1, -2)) * scale
    # A row with no visible key softmaxes over zeros and is then zeroed: no NaN, no garbage.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~visible.any(-1, keepdim=True), 0.0)
    probs = torch.softmax(scores, dim=-1) * visible
    return (probs @ values).to(q.dtype)
