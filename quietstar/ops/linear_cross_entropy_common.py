"""Pieces the fused ``linear_cross_entropy`` backends (torch and triton) share.

Both work on raw scores ``h @ lm_weight.T / T + offset`` with a per-column ``offset`` (bias
over temperature, ``-inf`` at masked ids), store one log-sum-exp per row in the forward, and
in the backward form ``d(raw logits) = scale * (softmax - onehot(target))`` with the per-row
``scale = grad / T``; the gradients of the mixed state, the weight and the bias are then
turned into the inputs' gradients here.
"""

from __future__ import annotations

import torch

from quietstar.ops.first_order import refuse_second_order


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


def gradients_needed(needs: tuple[bool, ...]) -> tuple[bool, bool, bool]:
    """Whether the backward must form the gradient of the mixed state, the weight and the bias,
    from ``ctx.needs_input_grad`` (ordered as the backends' arguments)."""
    need_hidden, need_weight, _, need_bias, need_base, need_w = needs[:6]
    return need_hidden or need_base or need_w, need_weight, need_bias


def input_gradients(
    needs: tuple[bool, ...],
    grad_h: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    lm_bias: torch.Tensor | None,
    base_hidden: torch.Tensor | None,
    w: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """What a backend's ``backward`` returns, from the gradients of the raw logits' inputs.

    Args:
        needs: ``ctx.needs_input_grad`` of ``(hidden, lm_weight, targets, lm_bias,
            base_hidden, w, temperature, masked_ids, ignore_index)``.
        grad_h: ``[N, d]`` float32/64 gradient of the mixed state
            ``h = (1 - w) * base_hidden + w * hidden`` (None if no input of it needs one).
        grad_weight, grad_bias: ``[V, d]`` and ``[V]`` float32/64, or None.

    Returns:
        One gradient per forward argument, each in its input's dtype, None where not needed.
    """
    need_hidden, need_weight, _, need_bias, need_base, need_w = needs[:6]
    d_hidden = d_base = d_w = None
    if grad_h is not None:
        if w is None:
            d_hidden = grad_h.to(hidden.dtype) if need_hidden else None
        else:
            mix = w.to(grad_h.dtype)[:, None]
            d_hidden = (grad_h * mix).to(hidden.dtype) if need_hidden else None
            d_base = (grad_h * (1 - mix)).to(base_hidden.dtype) if need_base else None
            if need_w:
                d_w = (grad_h * (hidden.to(grad_h.dtype) - base_hidden.to(grad_h.dtype))).sum(1).to(w.dtype)
    d_weight = grad_weight.to(lm_weight.dtype) if need_weight else None
    d_bias = grad_bias.to(lm_bias.dtype) if need_bias else None
    return d_hidden, d_weight, None, d_bias, d_base, d_w, None, None, None


def _unweighted_needs(needs: tuple[bool, ...]) -> tuple[bool, ...]:
    """A weighted form's ``ctx.needs_input_grad`` (``row_weights`` fourth) in the unweighted
    forms' order (``row_weights`` dropped)."""
    return (needs[0], needs[1], False, needs[4], needs[5], needs[6])


def weighted_gradients_needed(needs: tuple[bool, ...]) -> tuple[bool, bool, bool]:
    """``gradients_needed`` for a weighted form's ``ctx.needs_input_grad``."""
    return gradients_needed(_unweighted_needs(needs))


def keep_formed_gradients(ctx, nll: torch.Tensor, grads: tuple, hidden, lm_weight, lm_bias, base_hidden, w) -> None:
    """What a weighted form's forward leaves for ``formed_gradients_backward``: the formed
    ``(dh, dW, db)`` on ``ctx`` (this node's own: no other node reads them) and the inputs
    ``input_gradients`` needs; ``nll`` is marked non-differentiable."""
    ctx.mark_non_differentiable(nll)
    ctx.save_for_backward(hidden, lm_weight, lm_bias, base_hidden, w)
    ctx.grads = grads


def formed_gradients_backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The backward of a weighted form whose forward formed the gradients of ``sum_i weight_i *
    nll_i`` (``keep_formed_gradients``): scales them in place by ``grad_loss`` and returns one
    gradient per argument of ``(hidden, lm_weight, targets, row_weights, lm_bias, base_hidden,
    w, ...)`` (None for every argument after those). It can therefore run once."""
    hidden, lm_weight, lm_bias, base_hidden, w = ctx.saved_tensors
    if ctx.grads is None:
        raise RuntimeError(
            "weighted_linear_cross_entropy formed its gradients in the forward and scaled them in place: "
            "its backward runs once (use linear_cross_entropy to backpropagate through the same graph twice)"
        )
    # A loss used as it is gives a grad_loss of 1: on the CPU (where the check costs no device
    # sync) the [V, d] pass that would multiply by it is skipped, unless a double backward
    # needs the product's link to grad_loss.
    unit = (
        grad_loss.device.type == "cpu"
        and grad_loss.numel() == 1
        and not grad_loss.requires_grad
        and bool(grad_loss == 1)
    )
    scaled = [None if g is None else g if unit else g.mul_(grad_loss) for g in ctx.grads]
    ctx.grads = None
    d_hidden, d_weight, _, d_bias, d_base, d_w = input_gradients(
        _unweighted_needs(ctx.needs_input_grad), *scaled, hidden, lm_weight, lm_bias, base_hidden, w
    )[:6]
    grads = (d_hidden, d_weight, None, None, d_bias, d_base, d_w)
    # Their link to grad_loss (mul_ above, under create_graph) stays; to the inputs, refused.
    grads = refuse_second_order("weighted_linear_cross_entropy", grads, (hidden, lm_weight, lm_bias, base_hidden, w))
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))
