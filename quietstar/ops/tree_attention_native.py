"""``tree_attention`` on the CPU with the native kernels (``csrc/``).

The trunk (every query slot's causal attention over the text's keys, with padding and a
sliding window) runs in ``tree_attention_trunk.cpp``: the G * Sq query rows that share a KV
head are stacked for a few positions at a time, so its matrix products are large (PyTorch's
flash kernel multiplies one sequence's tiles at a time, and expands K/V per query slot). It
returns the trunk's output and log-sum-exp; the chain forward (``tree_attention.cpp``) starts
each query's online softmax from that state and folds in the query's own chain keys in one
pass, in place, with no copies of K/V and no score matrix. The backward gives both parts the
merged output and log-sum-exp, and each adds its share of the gradients.

Float32 runs natively throughout; float64 (gradcheck) runs the trunk through PyTorch's flash
kernel and the chain natively. Half precision is cast to float32 and back; bfloat16 q, k and v
on a CPU with AVX-512 BF16 (``bf16_products``) then have the trunk multiply them, and its
probabilities and their gradients rounded to bfloat16, with the CPU's bfloat16 dot products
(``csrc/bf16_gemm.cpp``), forward and backward. Without those (a head size that is not a
multiple of 16, say), bfloat16 on a CPU that multiplies it natively runs as stored from
``HALF_TRUNK_MIN_LENGTH`` on: the trunk goes through PyTorch's bfloat16 flash kernel and the
chain kernels read the half rows and compute in float32 (the log-sum-exps and the chain keys'
gradients kept in float32). What
autograd keeps per call is ``q, k, v`` (in the dtype computed), the output and one float per
query.
"""

from __future__ import annotations

import torch

from quietstar.ops.backends import autocast_off, fast_half_matmul, records_gradient
from quietstar.ops.first_order import first_order_only
from quietstar.ops.native import native_bf16_products
from quietstar.ops.tree_attention_rows import TreeAttentionRows
from quietstar.ops.tree_attention_torch import TreeViews, trunk_backward, trunk_forward

# Shortest slot length whose trunk is not slower in PyTorch's bfloat16 flash kernel than in the
# native float32 one (and keeps q, k, v and the output for the backward at half the size),
# fwd+bwd of bfloat16 inputs, 29 slots, 9/3 heads, D=64, on a 2-core AMD EPYC with AVX-512 BF16
# (2026-11-26, one process, the casts included): as stored 1.20x / 1.21x / 1.08x / 0.98x the
# time of PyTorch's bfloat16 causal flash attention over the same queries at L = 256 / 1024 /
# 2048 / 4096, cast to float32 for the native trunk 0.77x / 1.00x / 1.04x / 1.01x.
HALF_TRUNK_MIN_LENGTH = 4096


def half_precision_pays(dtype: torch.dtype, device: torch.device, slot_len: int) -> bool:
    """Whether the native backend computes half-precision ``dtype`` inputs as they are (else it
    casts them to float32 and back): bfloat16 on a CPU that multiplies it natively, from
    ``HALF_TRUNK_MIN_LENGTH`` on."""
    return fast_half_matmul(dtype, device) and slot_len >= HALF_TRUNK_MIN_LENGTH


def bf16_products(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the native trunk multiplies with the CPU's AVX-512 BF16 instructions, forward and
    backward: q, k and v are bfloat16 (so the float32 the op computes in holds them exactly),
    the head size a multiple of 16 (at most 512), and the CPU has them. Faster than the trunk
    as stored at every length measured (fwd+bwd at L=4096: 0.64x against 1.02x the time of
    PyTorch's bfloat16 flash attention), so it comes first."""
    head_dim = q.shape[-1]
    return (
        q.dtype == k.dtype == v.dtype == torch.bfloat16
        and head_dim % 16 == 0
        and head_dim <= 512
        and native_bf16_products()
    )


def _run_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_len: int) -> torch.dtype:
    """The dtype the op runs in: q's, unless half precision would be slower than float32 (or
    bfloat16 values multiply with AVX-512 BF16 from float32 storage)."""
    if bf16_products(q, k, v):
        return torch.float32
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


def _native_trunk(q: torch.Tensor) -> bool:
    """Whether the trunk runs in the native kernels (float32); float64 and half precision as
    stored go through PyTorch's flash kernel."""
    return q.dtype == torch.float32


def _forward(q, k, v, key_padding_mask, sliding_window, slot_len, n_thoughts, scale, bf16):
    """Output ``[B, Hq, Sq * L, D]`` and log-sum-exp ``[B, Hq, Sq * L]`` of queries ``q`` (the
    tree's last ``Sq`` slots) over ``k`` and ``v``, as the kernels read them."""
    if _native_trunk(q):
        out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
        torch.ops.quietstar.tree_attention_trunk_forward_(
            q, k, v, out, lse, key_padding_mask, sliding_window or 0, slot_len, scale, bf16
        )
    else:
        tree = TreeViews(q, k, slot_len, n_thoughts, key_padding_mask, sliding_window, use_flash=True)
        out, lse = trunk_forward(tree, q, k, v, scale)
        # [B, Hq, Sq * L, D] and [B, Hq, Sq * L], ours to overwrite (the flash kernel's results;
        # copies when it returns another layout)
        out = out.reshape(q.shape).contiguous()
        lse = lse.reshape(q.shape[:3]).contiguous()  # float32 (float64 for float64): the kernels' arithmetic
    torch.ops.quietstar.tree_attention_chain_forward_(q, k, v, out, lse, slot_len, n_thoughts, scale)
    return out, lse


def _attend(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale, known_rows):
    """The op's forward, autocast off: ``(out in q's dtype, saved, options)``, where ``saved``
    holds ``q, k, v`` as computed, the output and log-sum-exp in the kernels' dtype, and the
    mask, and ``options`` what else the backward reads; rows kept or taken through
    ``known_rows`` (``TreeAttentionRows``)."""
    with torch.autocast(q.device.type, enabled=False):
        dtype = q.dtype
        compute = _run_dtype(q, k, v, slot_len)
        bf16 = bf16_products(q, k, v)
        q, k, v = q.to(compute).contiguous(), *_keys_in_place(k.to(compute), v.to(compute))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.contiguous()  # [B, L] bool, as the kernels read it
        options = (key_padding_mask, sliding_window, slot_len, n_thoughts, scale, bf16)
        # Rows are kept and given only where the native trunk computes them (float32).
        if known_rows is not None and not _native_trunk(q):
            known_rows.drop()
            known_rows = None
        call = (q.dtype, bf16, slot_len, n_thoughts, sliding_window, scale)
        whole_tree = known_rows is not None and q.shape[2] == known_rows.total
        given = known_rows.take(q, call, key_padding_mask) if whole_tree else None
        if given is None:
            out, lse = _forward(q, k, v, *options)
            if known_rows is not None and not whole_tree:
                known_rows.keep(out, lse, call, key_padding_mask)
        else:
            out, lse, first = given
            if first < q.shape[2]:
                out[:, :, first:], lse[:, :, first:] = _forward(q[:, :, first:].contiguous(), k, v, *options)
        return out.to(dtype), (q, k, v, out, lse, key_padding_mask), (slot_len, n_thoughts, sliding_window, scale, bf16)


class TreeAttentionNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale, known_rows):
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        out, saved, ctx.options = _attend(
            q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale, known_rows
        )
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    @first_order_only("tree_attention")
    @autocast_off
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        slot_len, n_thoughts, sliding_window, scale, bf16 = ctx.options
        grad = grad_out.to(q.dtype).contiguous()
        # Contiguous whatever k's strides (a cache's filled part), in the kernels' arithmetic dtype.
        dk, dv = (torch.zeros(k.shape, dtype=lse.dtype, device=k.device) for _ in range(2))
        if _native_trunk(q):
            dq = torch.empty_like(q)
            torch.ops.quietstar.tree_attention_trunk_backward_(
                grad, q, k, v, out, lse, dq, dk, dv, key_padding_mask, sliding_window or 0, slot_len, scale, bf16
            )
        else:
            tree = TreeViews(q, k, slot_len, n_thoughts, key_padding_mask, sliding_window, use_flash=True)
            # The flash backward reads a query that saw nothing as lse 0 (its output is 0 too).
            merged_lse = lse.masked_fill(torch.isinf(lse), 0.0).view(tree.slots_shape[:-1])
            dq, dk_t, dv_t = trunk_backward(tree, grad, q, k, v, out, merged_lse, scale)
            dq = dq.reshape(q.shape).contiguous()  # ours to add to (the flash kernel's result)
            dk[:, :, :slot_len] += dk_t
            dv[:, :, :slot_len] += dv_t
        torch.ops.quietstar.tree_attention_chain_backward_(grad, q, k, v, out, lse, dq, dk, dv, slot_len, n_thoughts, scale)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), dv.to(v_dtype), None, None, None, None, None, None


def tree_attention_native(
    q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale, known_rows: TreeAttentionRows | None = None
) -> torch.Tensor:
    """Arguments as ``quietstar.tree_attention`` (already checked; the extension loaded by
    ``resolve_backend``); CPU tensors."""
    args = (q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale, known_rows)
    if not records_gradient(q, k, v):  # no autograd Function: its apply costs about a small call's kernels
        return _attend(*args)[0]
    return TreeAttentionNative.apply(*args)
