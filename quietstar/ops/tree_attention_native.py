"""``tree_attention`` on the CPU with the native chain kernels (``csrc/tree_attention.cpp``).

The trunk (every query slot's causal attention over the text's keys) runs through PyTorch's
flash kernel, as in the ``torch`` backend, and returns its output and log-sum-exp. The native
forward starts each query's online softmax from that state and folds in the query's own chain
keys in one pass, with no copies of K/V and no score matrix; the ``torch`` backend instead
gathers the chain into position-major copies and runs batched products and a separate merge.
The backward gives both parts the merged output and log-sum-exp: the flash backward the
trunk's gradients, the native one the chain's, and they add.

Float32 and float64 run natively; float16 and bfloat16 inputs run in float32 (cast in, cast
out). What autograd keeps per call is ``q, k, v``, the output and one float per query.
"""

from __future__ import annotations

import torch

from quietstar.ops.backends import autocast_off
from quietstar.ops.tree_attention_torch import TreeViews, trunk_backward, trunk_forward

NATIVE_DTYPES = (torch.float32, torch.float64)


def _native(t: torch.Tensor) -> torch.Tensor:
    return (t if t.dtype in NATIVE_DTYPES else t.float()).contiguous()


class TreeAttentionNative(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale):
        q_, k_, v_ = _native(q), _native(k), _native(v)
        tree = TreeViews(q_, k_, slot_len, n_thoughts, key_padding_mask, sliding_window, use_flash=True)
        out, lse = trunk_forward(tree, q_, k_, v_, scale)
        # [B, Hq, Sq * L, D] and [B, Hq, Sq * L], ours to overwrite (the flash kernel's results;
        # copies when it returns another layout or dtype)
        out = out.reshape(q_.shape).contiguous()
        lse = lse.to(q_.dtype).reshape(q_.shape[:3]).contiguous()
        torch.ops.quietstar.tree_attention_chain_forward_(q_, k_, v_, out, lse, slot_len, n_thoughts, scale)
        ctx.save_for_backward(q_, k_, v_, out, lse, key_padding_mask)
        ctx.options = (slot_len, n_thoughts, sliding_window, scale)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        slot_len, n_thoughts, sliding_window, scale = ctx.options
        grad = grad_out.to(q.dtype).contiguous()
        tree = TreeViews(q, k, slot_len, n_thoughts, key_padding_mask, sliding_window, use_flash=True)
        # The flash backward reads a query that saw nothing as lse 0 (its output is 0 too).
        merged_lse = lse.masked_fill(torch.isinf(lse), 0.0).view(tree.slots_shape[:-1])
        dq, dk_t, dv_t = trunk_backward(tree, grad, q, k, v, out, merged_lse, scale)
        dq = dq.reshape(q.shape).contiguous()  # ours to add to (the flash kernel's result)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        torch.ops.quietstar.tree_attention_chain_backward_(grad, q, k, v, out, lse, dq, dk, dv, slot_len, n_thoughts, scale)
        dk[:, :, :slot_len] += dk_t
        dv[:, :, :slot_len] += dv_t
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None


def tree_attention_native(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale) -> torch.Tensor:
    """Arguments as ``quietstar.tree_attention`` (already checked; the extension loaded by
    ``resolve_backend``); CPU tensors."""
    return TreeAttentionNative.apply(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale)
