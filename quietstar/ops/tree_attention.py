"""``tree_attention``: attention under the Quiet-STaR tree rule, one entry for every backend."""

from __future__ import annotations

import torch

from quietstar._checks import FLOAT_DTYPES, check_int, check_positive_float, check_tensor
from quietstar.ops.backends import resolve_backend
from quietstar.ops.tree_attention_rows import TreeAttentionRows

TRITON_HEAD_DIMS = (16, 32, 64, 128)
# The kernels put batch x KV heads on a launch grid axis that CUDA caps at 65535.
TRITON_MAX_BATCH_KV_HEADS = 65535
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_len: int,
    *,
    n_thoughts: int = 1,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
    known_rows: TreeAttentionRows | None = None,
) -> torch.Tensor:
    """Attention where every position grows its own chain of thought tokens.

    The inputs hold the flat slot-major tree layout (``quietstar.ops.layout``): slot 0 is the base
    text, slot ``s >= 1`` is chain step ``(s - 1) // n_thoughts + 1`` of branch
    ``(s - 1) % n_thoughts``. Query ``(s, i)`` sees base keys ``k <= i`` and its own branch's
    chain keys at position ``i`` up to and including slot ``s`` (SPEC section 1).

    Args:
        q: ``[B, Hq, Sq * slot_len, D]``; query slot ``j`` is key slot ``Sk - Sq + j``.
        k: ``[B, Hkv, Sk * slot_len, D]`` with ``1 <= Sq <= Sk`` and ``Hq % Hkv == 0``.
        v: same shape as ``k``.
        slot_len: tokens per slot ``L`` (the base text length).
        n_thoughts: independent branches per position (chain slots are step-major).
        key_padding_mask: ``[B, slot_len]`` bool, True for real tokens; applies to base keys.
        sliding_window: a base key ``k`` is visible to position ``i`` only if ``i - k < w``.
        scale: softmax scale, ``D ** -0.5`` by default.
        backend: ``"reference"``, ``"torch"``, ``"triton"``, ``"native"`` or None (see
            ``quietstar.ops.backends``).
        known_rows: rows of this tree's output kept across calls (``TreeAttentionRows``): a
            call whose queries are the tree's next slots appends its rows, a call over all of
            the tree's queries computes only those after the kept ones. Only the native
            backend keeps and uses them, where it computes in float32 (float32 inputs, and
            half-precision ones it casts); elsewhere every row is computed.

    Returns:
        ``[B, Hq, Sq * slot_len, D]`` in the dtype of ``q``. A query that sees no key (a base
        query whose visible keys are all padding) gets zeros.

    Raises:
        ValueError: a shape, dtype, device or option that does not fit, naming the argument.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_int("slot_len", slot_len, minimum=1)
    check_int("n_thoughts", n_thoughts, minimum=1)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    if batch == 0 or q_heads == 0 or head_dim == 0:
        raise ValueError(f"q must be [B, Hq, Sq*slot_len, D] with B, Hq, D >= 1, got {tuple(q.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must be [B={batch}, Hkv, Sk*slot_len, D={head_dim}], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a multiple of k heads ({kv_heads})")
    if q_len == 0 or q_len % slot_len != 0:
        raise ValueError(f"slot_len={slot_len} must divide the query length {q_len} (q.shape[2])")
    if k_len % slot_len != 0:
        raise ValueError(f"slot_len={slot_len} must divide the key length {k_len} (k.shape[2])")
    if q_len > k_len:
        raise ValueError(f"q has {q_len // slot_len} slots but k only {k_len // slot_len}; need Sq <= Sk")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, device=q.device)
        if key_padding_mask.dtype.is_floating_point or key_padding_mask.dtype.is_complex:
            raise ValueError(f"key_padding_mask must be bool (True = real token), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, slot_len):
            raise ValueError(
                f"key_padding_mask must be [B={batch}, slot_len={slot_len}], got {tuple(key_padding_mask.shape)}"
            )
        key_padding_mask = key_padding_mask.bool()
    if sliding_window is not None:
        check_int("sliding_window", sliding_window, minimum=1)
    scale = head_dim**-0.5 if scale is None else check_positive_float("scale", scale)
    if known_rows is not None and not isinstance(known_rows, TreeAttentionRows):
        raise ValueError(f"known_rows must be a TreeAttentionRows or None, got {type(known_rows).__name__}")

    backend = resolve_backend(backend, q.device, _triton_unsupported(q, k), has_native=True)
    args = (q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale)
    if backend == "reference":
        from quietstar.ops.tree_attention_reference import tree_attention_reference

        return tree_attention_reference(*args)
    if backend == "torch":
        from quietstar.ops.tree_attention_torch import tree_attention_torch

        return tree_attention_torch(*args)
    if backend == "native":
        from quietstar.ops.tree_attention_native import tree_attention_native

        return tree_attention_native(*args, known_rows)
    from quietstar.ops.tree_attention_triton import tree_attention_triton

    return tree_attention_triton(*args)


def _triton_unsupported(q: torch.Tensor, k: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take ``q`` ([B, Hq, Sq*L, D]) and ``k`` ([B, Hkv, Sk*L, D]),
    or None when they can."""
    batch, _, _, head_dim = q.shape
    kv_heads = k.shape[1]
    if head_dim not in TRITON_HEAD_DIMS:
        return f"q head dim must be one of {TRITON_HEAD_DIMS} for the triton backend, got {head_dim}"
    if q.dtype not in TRITON_DTYPES:
        return f"q dtype must be float16, bfloat16 or float32 for the triton backend, got {q.dtype}"
    if batch * kv_heads > TRITON_MAX_BATCH_KV_HEADS:
        return (
            f"k batch x heads must be at most {TRITON_MAX_BATCH_KV_HEADS} for the triton backend, got "
            f"{batch} x {kv_heads}; split the batch"
        )
    return None
