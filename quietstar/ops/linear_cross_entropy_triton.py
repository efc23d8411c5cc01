"""``linear_cross_entropy`` on fused Triton kernels (``quietstar.kernels.linear_cross_entropy``)."""

from __future__ import annotations

import torch

from quietstar.ops.backends import autocast_off, launch_device, triton_interpreter_enabled
from quietstar.ops.first_order import first_order_only
from quietstar.ops.linear_cross_entropy_common import (
    column_offset,
    formed_gradients_backward,
    gradients_needed,
    input_gradients,
    keep_formed_gradients,
    row_scale,
    weighted_gradients_needed,
)


class LinearCrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, hidden, lm_weight, targets, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index):
        from quietstar.kernels.linear_cross_entropy import linear_cross_entropy_forward

        interpret = triton_interpreter_enabled()
        offset = column_offset(lm_bias, masked_ids, lm_weight.shape[0], temperature, torch.float32, hidden.device)
        with launch_device(hidden):
            nll, lse = linear_cross_entropy_forward(
                hidden, lm_weight, targets, base_hidden, w, offset, temperature, ignore_index, interpret
            )
        ctx.save_for_backward(hidden, lm_weight, targets, lm_bias, base_hidden, w, offset, lse)
        ctx.options = (temperature, ignore_index, interpret)
        return nll

    @staticmethod
    @first_order_only("linear_cross_entropy")
    @autocast_off
    def backward(ctx, grad_nll):
        from quietstar.kernels.linear_cross_entropy import linear_cross_entropy_backward

        hidden, lm_weight, targets, lm_bias, base_hidden, w, offset, lse = ctx.saved_tensors
        temperature, ignore_index, interpret = ctx.options
        need_h, need_weight, need_bias = gradients_needed(ctx.needs_input_grad)
        scale = row_scale(grad_nll, targets, ignore_index, temperature, torch.float32).contiguous()
        with launch_device(hidden):
            grad_h, grad_weight, grad_bias = linear_cross_entropy_backward(
                scale, hidden, lm_weight, targets, base_hidden, w, offset, lse, temperature,
                need_h, need_weight, need_bias, interpret,
            )
        return input_gradients(
            ctx.needs_input_grad, grad_h, grad_weight, grad_bias, hidden, lm_weight, lm_bias, base_hidden, w
        )


class WeightedLinearCrossEntropyTriton(torch.autograd.Function):
    """``sum(row_weights * nll)`` with every gradient formed in the forward (three products per
    row chunk; the backward only scales them)."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, lm_weight, targets, row_weights, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index):
        from quietstar.kernels.linear_cross_entropy import weighted_linear_cross_entropy_fused

        interpret = triton_interpreter_enabled()
        offset = column_offset(lm_bias, masked_ids, lm_weight.shape[0], temperature, torch.float32, hidden.device)
        scale = row_scale(row_weights, targets, ignore_index, temperature, torch.float32).contiguous()
        # (grad mode is off inside forward; needs_input_grad says what the caller wants)
        need_h, need_weight, need_bias = weighted_gradients_needed(ctx.needs_input_grad)
        with launch_device(hidden):
            nll, grad_h, grad_weight, grad_bias = weighted_linear_cross_entropy_fused(
                scale, hidden, lm_weight, targets, base_hidden, w, offset, temperature, ignore_index,
                need_h, need_weight, need_bias, interpret,
            )
        keep_formed_gradients(ctx, nll, (grad_h, grad_weight, grad_bias), hidden, lm_weight, lm_bias, base_hidden, w)
        return (row_weights.float() * nll).sum(), nll

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss, grad_nll):
        return formed_gradients_backward(ctx, grad_loss)


def _kernel_arguments(hidden, lm_weight, targets, lm_bias, base_hidden, w) -> tuple:
    """The arguments in the kernels' one dtype and contiguous: float32 master weights are cast
    to the hidden states' (the cast's backward returns their gradient in float32)."""
    lm_weight = lm_weight.to(hidden.dtype)
    lm_bias = None if lm_bias is None else lm_bias.to(hidden.dtype)
    hidden, lm_weight, targets, base_hidden, w = (
        None if t is None else t.contiguous() for t in (hidden, lm_weight, targets, base_hidden, w)
    )
    return hidden, lm_weight, targets, lm_bias, base_hidden, w


def weighted_linear_cross_entropy_triton(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    lm_bias: torch.Tensor | None,
    base_hidden: torch.Tensor | None,
    w: torch.Tensor | None,
    temperature: float,
    masked_ids: torch.Tensor | None,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(row_weights * nll), nll)`` with the gradients formed in the forward; arguments as
    ``quietstar.weighted_linear_cross_entropy`` (already checked)."""
    hidden, lm_weight, targets, lm_bias, base_hidden, w = _kernel_arguments(hidden, lm_weight, targets, lm_bias, base_hidden, w)
    return WeightedLinearCrossEntropyTriton.apply(
        hidden, lm_weight, targets, row_weights, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index
    )


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
    hidden, lm_weight, targets, lm_bias, base_hidden, w = _kernel_arguments(hidden, lm_weight, targets, lm_bias, base_hidden, w)
    return LinearCrossEntropyTriton.apply(
        hidden, lm_weight, targets, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index
    )
