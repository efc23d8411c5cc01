"""``linear_cross_entropy`` on fused Triton kernels (``quietstar.kernels.linear_cross_entropy``)."""

from __future__ import annotations

import torch

from quietstar.backends import triton_interpreter_enabled
from quietstar.ops.linear_cross_entropy_common import column_offset, mixing_backward, row_scale


class LinearCrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, lm_weight, targets, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index):
        from quietstar.kernels.linear_cross_entropy import linear_cross_entropy_forward

        interpret = triton_interpreter_enabled()
        offset = column_offset(lm_bias, masked_ids, lm_weight.shape[0], temperature, torch.float32, hidden.device)
        nll, lse = linear_cross_entropy_forward(
            hidden, lm_weight, targets, base_hidden, w, offset, temperature, ignore_index, interpret
        )
        ctx.save_for_backward(hidden, lm_weight, targets, lm_bias, base_hidden, w, offset, lse)
        ctx.options = (temperature, ignore_index, interpret)
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        from quietstar.kernels.linear_cross_entropy import linear_cross_entropy_backward

        hidden, lm_weight, targets, lm_bias, base_hidden, w, offset, lse = ctx.saved_tensors
        temperature, ignore_index, interpret = ctx.options
        need_hidden, need_weight, _, need_bias, need_base, need_w = ctx.needs_input_grad[:6]
        need_h = need_hidden or need_base or need_w
        scale = row_scale(grad_nll, targets, ignore_index, temperature, torch.float32).contiguous()
        grad_h, grad_weight, grad_bias = linear_cross_entropy_backward(
            scale, hidden, lm_weight, targets, base_hidden, w, offset, lse, temperature,
            need_h, need_weight, need_bias, interpret,
        )
        d_hidden = d_base = d_w = None
        if need_h:
            d_hidden, d_base, d_w = mixing_backward(grad_h, hidden, base_hidden, w, (need_hidden, need_base, need_w))
        d_weight = None if grad_weight is None else grad_weight.to(lm_weight.dtype)
        d_bias = None if grad_bias is None else grad_bias.to(lm_bias.dtype)
        return d_hidden, d_weight, None, d_bias, d_base, d_w, None, None, None


def linear_cross_entropy_triton(
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
    """Fused linear cross-entropy; arguments as ``quietstar.linear_cross_entropy`` (already checked)."""
    contiguous = [None if t is None else t.contiguous() for t in (hidden, lm_weight, targets, base_hidden, w)]
    hidden, lm_weight, targets, base_hidden, w = contiguous
    return LinearCrossEntropyTriton.apply(
        hidden, lm_weight, targets, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index
    )
