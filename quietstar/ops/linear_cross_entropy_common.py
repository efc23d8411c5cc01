"""Pieces the fused ``linear_cross_entropy`` backends (torch and triton) share.

Both work on raw scores ``h @ lm_weight.T / T + offset`` with a per-column ``offset`` (bias
over temperature, ``-inf`` at masked ids), store one log-sum-exp per row in the forward, and
in the backward form ``d(raw logits) = scale * (softmax - onehot(target))`` with the per-row
``scale = grad / T``. The gradient ``dh`` of the mixed state is then split over the mixing
inputs here.
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def column_offset(
    lm_bias: torch.Tensor | None,
    masked_ids: torch.Tensor | None,
    vocab: int,
    temperature: float,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """``lm_bias / T`` with ``-inf`` at ``masked_ids``: ``[V]`` in ``dtype``; None when neither."""
    if lm_bias is None and masked_ids is None:
        return None
    if lm_bias is None:
        offset = torch.zeros(vocab, dtype=dtype, device=device)
    else:
        offset = lm_bias.to(dtype) / temperature
    if masked_ids is not None:
        offset = offset.index_fill(0, masked_ids, float("-inf"))
    return offset


def row_scale(
    grad_nll: torch.Tensor, targets: torch.Tensor, ignore_index: int, temperature: float, dtype: torch.dtype
) -> torch.Tensor:
    """``grad_nll / T`` with 0 on ignored rows: ``[N]`` in ``dtype``."""
    return (grad_nll.to(dtype) / temperature).masked_fill(targets == ignore_index, 0.0)


def safe_targets(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``targets`` with ignored rows pointing at id 0, so they can index a row of logits."""
    return targets.masked_fill(targets == ignore_index, 0)


def mixing_backward(
    grad_h: torch.Tensor,
    hidden: torch.Tensor,
    base_hidden: torch.Tensor | None,
    w: torch.Tensor | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Split ``grad_h`` (``[N, d]``, float32/64) of ``h = (1 - w) * base_hidden + w * hidden``.

    Returns ``(d hidden, d base_hidden, d w)``, each in its input's dtype, None where
    ``needs`` (for hidden, base_hidden, w) is False or there is no mixing.
    """
    need_hidden, need_base, need_w = needs
    if w is None:
        return (grad_h.to(hidden.dtype) if need_hidden else None), None, None
    mix = w.to(grad_h.dtype)[:, None]
    d_hidden = (grad_h * mix).to(hidden.dtype) if need_hidden else None
    d_base = (grad_h * (1 - mix)).to(base_hidden.dtype) if need_base else None
    d_w = None
    if need_w:
        d_w = (grad_h * (hidden.to(grad_h.dtype) - base_hidden.to(grad_h.dtype))).sum(1).to(w.dtype)
    return d_hidden, d_base, d_w
