"""``tree_attention`` on the CPU by the native kernels (``csrc/tree_attention.cpp``): one pass
per block of queries over the trunk blocks it can see and its own chain keys, with an online
softmax; a FlashAttention-2-style backward from the saved log-sum-exp. GQA without copies.

Float32 and float64 run natively; float16 and bfloat16 inputs run in float32 (cast in, cast
out). What autograd keeps per call is ``q, k, v``, the output and one float per query.
"""

from __future__ import annotations

import torch

from quietstar.ops.backends import autocast_off

NATIVE_DTYPES = (torch.float32, torch.float64)


def _native(t: torch.Tensor) -> torch.Tensor:
    return (t if t.dtype in NATIVE_DTYPES else t.float()).contiguous()


class TreeAttentionNative(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale):
        q_, k_, v_ = _native(q), _native(k), _native(v)
        mask = None if key_padding_mask is None else key_padding_mask.contiguous()
        window = sliding_window or 0
        out, lse = torch.ops.quietstar.tree_attention_forward(q_, k_, v_, slot_len, n_thoughts, mask, window, scale)
        ctx.save_for_backward(q_, k_, v_, out, lse, mask)
        ctx.options = (slot_len, n_thoughts, window, scale)
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        return out.to(q.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        slot_len, n_thoughts, window, scale = ctx.options
        grad = grad_out.to(q.dtype).contiguous()
        dq, dk, dv = torch.ops.quietstar.tree_attention_backward(grad, q, k, v, out, lse, slot_len, n_thoughts, mask, window, scale)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None


def tree_attention_native(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale) -> torch.Tensor:
    """Arguments as ``quietstar.tree_attention`` (already checked; the extension loaded by
    ``resolve_backend``); CPU tensors."""
    return TreeAttentionNative.apply(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale)
