"""``tree_attention`` on fused Triton kernels (``quietstar.kernels.tree_attention``)."""

from __future__ import annotations

import torch

from quietstar.ops.backends import autocast_off, launch_device, triton_interpreter_enabled
from quietstar.ops.first_order import first_order_only


class TreeAttentionTriton(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale):
        from quietstar.kernels.tree_attention import tree_attention_forward

        interpret = triton_interpreter_enabled()
        options = (slot_len, n_thoughts, key_padding_mask, sliding_window, scale, interpret)
        with launch_device(q):
            out, lse = tree_attention_forward(q, k, v, *options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = options
        return out

    @staticmethod
    @first_order_only("tree_attention")
    @autocast_off
    def backward(ctx, grad_out):
        from quietstar.kernels.tree_attention import tree_attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        with launch_device(q):
            dq, dk, dv = tree_attention_backward(grad_out.contiguous(), q, k, v, out, lse, *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def tree_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_len: int,
    n_thoughts: int,
    key_padding_mask: torch.Tensor | None,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """Fused tree attention; arguments as ``quietstar.tree_attention`` (already checked)."""
    return TreeAttentionTriton.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), slot_len, n_thoughts, key_padding_mask, sliding_window, scale
    )
