"""``tree_attention`` on the CPU with the native chain kernels (``csrc/tree_attention.cpp``).

The trunk (every query slot's causal attention over the text's keys) runs through PyTorch's
flash kernel, as in the ``torch`` backend, and returns its output and log-sum-exp. The native
forward starts each query's online softmax from that state and folds in the query's own chain
keys in one pass, in place on the trunk's output, with no copies of K/V and no score matrix;
the ``torch`` backend instead gathers the chain into position-major copies and runs batched
products and a separate merge. The backward gives both parts the merged output and
log-sum-exp: the flash backward the trunk's gradients, the native one adds the chain's.

Float32 and float64 run natively. Half precision runs as stored where it pays: bfloat16 on a
CPU that multiplies it natively (AVX-512 BF16 or AMX), from ``HALF_TRUNK_MIN_LENGTH`` on, goes
through PyTorch's bfloat16 flash kernel for the trunk, and the chain kernels read it and compute
in float32 (the log-sum-exps and the chain keys' gradients kept in float32). Elsewhere half
inputs are cast to float32 and back. What autograd keeps per call is ``q, k, v`` (in the dtype
computed), the output and one float per query.
"""

from __future__ import annotations

import torch

from quietstar.ops.backends import autocast_off, fast_half_matmul
from quietstar.ops.tree_attention_torch import TreeViews, trunk_backward, trunk_forward

# Shortest slot length whose trunk runs faster in PyTorch's bfloat16 flash kernel than in its
# float32 one, fwd+bwd, 29 slots, 9/3 heads, D=64, on a 2-core AMD EPYC with AVX-512 BF16
# (2026-11-26): bfloat16 takes 1.65x float32's time at L=128 and 1.08x at 256, 0.87x at 512 and
# 0.76x at 1024 (the casts to and from float32 included).
HALF_TRUNK_MIN_LENGTH = 512


def half_precision_pays(dtype: torch.dtype, device: torch.device, slot_len: int) -> bool:
    """Whether the native backend computes half-precision ``dtype`` inputs as they are (else it
    casts them to float32 and back): bfloat16 on a CPU that multiplies it natively, from
    ``HALF_TRUNK_MIN_LENGTH`` on."""
    return fast_half_matmul(dtype, device) and slot_len >= HALF_TRUNK_MIN_LENGTH


def _run_dtype(q: torch.Tensor, slot_len: int) -> torch.dtype:
    """The dtype the op runs in: q's, unless half precision would be slower than float32."""
    if q.dtype in (torch.float32, torch.float64) or half_precision_pays(q.dtype, q.device, slot_len):
        return q.dtype
    return torch.float32


def _keys_in_place(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` and ``v`` as the kernels read them: rows and positions contiguous, the same strides;
    the filled part of a cache buffer (``[B, Hkv, T, D]`` of a longer ``T``) as it is, where
    ``.contiguous()`` would copy the whole cache on every decoding step."""
    if k.stride(-1) == 1 and k.stride(-2) == k.shape[-1] and k.stride() == v.stride():
        return k, v
    return k.contiguous(), v.contiguous()


class TreeAttentionNative(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale):
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        compute = _run_dtype(q, slot_len)
        q, k, v = q.to(compute).contiguous(), *_keys_in_place(k.to(compute), v.to(compute))
        tree = TreeViews(q, k, slot_len, n_thoughts, key_padding_mask, sliding_window, use_flash=True)
        out, lse = trunk_forward(tree, q, k, v, scale)
        # [B, Hq, Sq * L, D] and [B, Hq, Sq * L], ours to overwrite (the flash kernel's results;
        # copies when it returns another layout)
        out = out.reshape(q.shape).contiguous()
        lse = lse.reshape(q.shape[:3]).contiguous()  # float32 (float64 for float64): the kernels' arithmetic
        torch.ops.quietstar.tree_attention_chain_forward_(q, k, v, out, lse, slot_len, n_thoughts, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.options = (slot_len, n_thoughts, sliding_window, scale)
        return out.to(ctx.dtypes[0])

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
        # Contiguous whatever k's strides (a cache's filled part), in the kernels' arithmetic dtype.
        dk, dv = (torch.zeros(k.shape, dtype=lse.dtype) for _ in range(2))
        torch.ops.quietstar.tree_attention_chain_backward_(grad, q, k, v, out, lse, dq, dk, dv, slot_len, n_thoughts, scale)
        dk[:, :, :slot_len] += dk_t
        dv[:, :, :slot_len] += dv_t
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None


def tree_attention_native(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale) -> torch.Tensor:
    """Arguments as ``quietstar.tree_attention`` (already checked; the extension loaded by
    ``resolve_backend``); CPU tensors."""
    return TreeAttentionNative.apply(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale)
