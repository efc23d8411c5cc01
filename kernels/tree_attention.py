"""Triton kernels for tree attention (forward, dQ, dK/dV of base keys, dK/dV of chain keys).

Layout (contiguous): q, out ``[B, Hq, Sq * L, D]``; k, v ``[B, Hkv, Sk * L, D]``; log-sum-exp
and delta ``[B, Hq, Sq * L]`` float32. Query slot ``j`` is key slot ``Sk - Sq + j``; chain slot
``s >= 1`` is step ``(s - 1) // NT + 1`` of branch ``(s - 1) % NT``.

Every query block runs one online softmax over the base key blocks it can see (causal,
optionally windowed and padded) and then over its own chain keys, one key per chain step at
the same position (a row-wise dot product, no matrix). The log-sum-exp is stored in base-2
units of the scaled scores so the backward can recompute probabilities (FlashAttention-2).
With only the causal rule (no padding, no window) the key blocks wholly below the diagonal
run without any mask arithmetic; only the blocks that cross it are masked.
"""

from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _base_kv_block(
    K, V, kv_rows, start_n, offs_d, L,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Keys and values ``[BLOCK_N, D]`` of the base key block at ``start_n``, with the key
    offsets and which are inside ``L``; unmasked blocks are wholly inside and load without
    masks."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    col_ok = offs_n < L
    ptrs = (kv_rows + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    if MASKED:
        k = tl.load(K + ptrs, mask=col_ok[:, None], other=0.0)
        v = tl.load(V + ptrs, mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(K + ptrs)
        v = tl.load(V + ptrs)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return offs_n, col_ok, k, v


@triton.jit
def _query_program(L, SQ, SK, GROUP: tl.constexpr):
    """Which query block a forward or dQ program owns: ``(pid_m, j, bh, kv_rows)``.

    The grid is ``(GROUP * SQ, query blocks, B * Hkv)`` with the (head of the group, slot) pair
    fastest, so the programs in flight at once share one KV head and one position block: they
    read the same base keys and the same chain keys (L2 hits instead of DRAM reads). Query
    blocks run last to first, so the longest (causal) programs start first."""
    item = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    bhk = tl.program_id(2)
    bh = bhk * GROUP + item // SQ
    kv_rows = bhk.to(tl.int64) * SK * L
    return pid_m, item % SQ, bh, kv_rows


@triton.jit
def _fwd_base_block(
    acc, l_i, m_i, q, K, V, KPM, kv_rows, start_n, offs_m, offs_d, b, L, WINDOW, qk_scale,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One base key block of the forward's online softmax; returns ``(acc, l_i, m_i)``."""
    offs_n, col_ok, k, v = _base_kv_block(K, V, kv_rows, start_n, offs_d, L, MASKED, UPCAST, HEAD_DIM, BLOCK_N)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        visible = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (offs_m[:, None] - offs_n[None, :] < WINDOW)
        if HAS_KPM:
            real = tl.load(KPM + b * L + offs_n, mask=col_ok, other=0)
            visible = visible & (real[None, :] != 0)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _tree_attention_fwd(
    Q, K, V, O, LSE, KPM,
    L, SQ, SK, NT, HQ, WINDOW, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, j, bh, kv_rows = _query_program(L, SQ, SK, GROUP)
    b = bh // HQ
    q_rows = (bh.to(tl.int64) * SQ + j) * L
    s_abs = SK - SQ + j

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + (q_rows + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    hi = tl.minimum((pid_m + 1) * BLOCK_M, L)
    if HAS_WINDOW:
        lo = (tl.maximum(pid_m * BLOCK_M - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        for start_n in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_base_block(
                acc, l_i, m_i, q, K, V, KPM, kv_rows, start_n, offs_m, offs_d, b, L, WINDOW, qk_scale,
                True, HAS_KPM, HAS_WINDOW, UPCAST, PRECISION, HEAD_DIM, BLOCK_N,
            )
    else:
        # Key blocks that end before the block's first query are visible to every query in it.
        diagonal = pid_m * BLOCK_M
        if HAS_KPM:
            diagonal = 0
        for start_n in range(0, diagonal, BLOCK_N):
            acc, l_i, m_i = _fwd_base_block(
                acc, l_i, m_i, q, K, V, KPM, kv_rows, start_n, offs_m, offs_d, b, L, WINDOW, qk_scale,
                False, HAS_KPM, HAS_WINDOW, UPCAST, PRECISION, HEAD_DIM, BLOCK_N,
            )
        for start_n in range(diagonal, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_base_block(
                acc, l_i, m_i, q, K, V, KPM, kv_rows, start_n, offs_m, offs_d, b, L, WINDOW, qk_scale,
                True, HAS_KPM, HAS_WINDOW, UPCAST, PRECISION, HEAD_DIM, BLOCK_N,
            )

    # Own chain: steps 1..c of branch t, one key per step at the same position.
    n_steps = (s_abs + NT - 1) // NT
    branch = (s_abs + NT - 1) % NT
    qf = q.to(tl.float32)
    for step in range(0, n_steps):
        rows = kv_rows + (step * NT + branch + 1) * L + offs_m
        kc = tl.load(K + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        vc = tl.load(V + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(qf * kc, 1) * qk_scale
        m_new = tl.maximum(m_i, sc)
        alpha = tl.math.exp2(m_i - m_new)
        pc = tl.math.exp2(sc - m_new)
        l_i = l_i * alpha + pc
        acc = acc * alpha[:, None] + pc[:, None] * vc
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    # A row that sees nothing keeps lse 0: its masked scores give exp2(-inf - 0) = 0 later.
    lse = tl.where(empty, 0.0, m_i + tl.math.log2(l_safe))
    tl.store(O + (q_rows + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + q_rows + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_delta(
    O, DO, DELTA, ROWS,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``delta = rowsum(out * grad_out)`` in float32 (the softmax backward's correction)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_r < ROWS
    ptrs = offs_r.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + offs_r, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _dq_base_block(
    dq, q, do, lse, delta, K, V, KPM, kv_rows, start_n, offs_m, row_ok, offs_d, b, L, WINDOW, qk_scale,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One base key block's contribution to ``dq`` (unscaled); returns ``dq``."""
    offs_n, col_ok, k, v = _base_kv_block(K, V, kv_rows, start_n, offs_d, L, MASKED, UPCAST, HEAD_DIM, BLOCK_N)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        visible = (offs_n[None, :] <= offs_m[:, None]) & col_ok[None, :] & row_ok[:, None]
        if HAS_WINDOW:
            visible = visible & (offs_m[:, None] - offs_n[None, :] < WINDOW)
        if HAS_KPM:
            real = tl.load(KPM + b * L + offs_n, mask=col_ok, other=0)
            visible = visible & (real[None, :] != 0)
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _tree_attention_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, KPM,
    L, SQ, SK, NT, HQ, WINDOW, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, j, bh, kv_rows = _query_program(L, SQ, SK, GROUP)
    b = bh // HQ
    q_rows = (bh.to(tl.int64) * SQ + j) * L
    s_abs = SK - SQ + j

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q_ptrs = (q_rows + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + q_rows + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + q_rows + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    hi = tl.minimum((pid_m + 1) * BLOCK_M, L)
    if HAS_WINDOW:
        lo = (tl.maximum(pid_m * BLOCK_M - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N
        for start_n in range(lo, hi, BLOCK_N):
            dq = _dq_base_block(
                dq, q, do, lse, delta, K, V, KPM, kv_rows, start_n, offs_m, row_ok, offs_d, b, L, WINDOW, qk_scale,
                True, HAS_KPM, HAS_WINDOW, UPCAST, PRECISION, HEAD_DIM, BLOCK_N,
            )
    else:
        # Rows past L load zeros (q, do, lse, delta), so their unmasked dq rows stay finite
        # and are never stored.
        diagonal = pid_m * BLOCK_M
        if HAS_KPM:
            diagonal = 0
        for start_n in range(0, diagonal, BLOCK_N):
            dq = _dq_base_block(
                dq, q, do, lse, delta, K, V, KPM, kv_rows, start_n, offs_m, row_ok, offs_d, b, L, WINDOW, qk_scale,
                False, HAS_KPM, HAS_WINDOW, UPCAST, PRECISION, HEAD_DIM, BLOCK_N,
            )
        for start_n in range(diagonal, hi, BLOCK_N):
            dq = _dq_base_block(
                dq, q, do, lse, delta, K, V, KPM, kv_rows, start_n, offs_m, row_ok, offs_d, b, L, WINDOW, qk_scale,
                True, HAS_KPM, HAS_WINDOW, UPCAST, PRECISION, HEAD_DIM, BLOCK_N,
            )

    n_steps = (s_abs + NT - 1) // NT
    branch = (s_abs + NT - 1) % NT
    qf = q.to(tl.float32)
    dof = do.to(tl.float32)
    for step in range(0, n_steps):
        rows = kv_rows + (step * NT + branch + 1) * L + offs_m
        kc = tl.load(K + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        vc = tl.load(V + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        pc = tl.math.exp2(tl.sum(qf * kc, 1) * qk_scale - lse)
        dsc = pc * (tl.sum(dof * vc, 1) - delta)
        dq += dsc[:, None] * kc

    tl.store(DQ + q_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dkdv_base_block(
    dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, q_rows, start_m, offs_n, offs_d, L, WINDOW, qk_scale,
    MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One query block's contribution to a base key block's ``dk`` (unscaled) and ``dv``.

    Query rows past L load zeros (q, do, lse, delta): their terms vanish without a mask."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row_ok = offs_m < L
    q_ptrs = (q_rows + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + q_rows + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + q_rows + offs_m, mask=row_ok, other=0.0)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
    p_t = tl.math.exp2(s_t - lse[None, :])
    if MASKED:
        visible = (offs_n[:, None] <= offs_m[None, :]) & key_ok[:, None] & row_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (offs_m[None, :] - offs_n[:, None] < WINDOW)
        p_t = tl.where(visible, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["SPLIT"])
def _tree_attention_bwd_dkdv_base(
    Q, K, V, DO, DK_PART, DV_PART, LSE, DELTA, KPM,
    L, SQ, SK, HQ, WINDOW, qk_scale, sm_scale, SPLIT,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV of the base keys. Program (key block, b * Hkv + hk, split) sums over its share
    of the (query head of the group, query slot) pairs into a float32 partial buffer
    ``[SPLIT, B, Hkv, L, D]``."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    split = tl.program_id(2)
    kv_heads = HQ // GROUP
    b = bhk // kv_heads
    hk = bhk % kv_heads
    kv_rows = bhk.to(tl.int64) * SK * L

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < L
    k = tl.load(K + (kv_rows + offs_n)[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + (kv_rows + offs_n)[:, None] * HEAD_DIM + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = col_ok
    if HAS_KPM:
        key_ok = key_ok & (tl.load(KPM + b * L + offs_n, mask=col_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M
    # Query blocks from here on see every key of this block (causal rule alone).
    past_diagonal = tl.minimum(tl.cdiv((pid_n + 1) * BLOCK_N, BLOCK_M) * BLOCK_M, L)
    hi = L
    if HAS_WINDOW:
        hi = tl.minimum(L, pid_n * BLOCK_N + BLOCK_N + WINDOW - 1)
        past_diagonal = hi
    if HAS_KPM:
        past_diagonal = hi
    for item in range(split, GROUP * SQ, SPLIT):
        bh = b * HQ + hk * GROUP + item // SQ
        q_rows = (bh.to(tl.int64) * SQ + item % SQ) * L
        for start_m in range(lo, past_diagonal, BLOCK_M):
            dk, dv = _dkdv_base_block(
                dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, q_rows, start_m, offs_n, offs_d, L, WINDOW, qk_scale,
                True, HAS_WINDOW, UPCAST, PRECISION, HEAD_DIM, BLOCK_M,
            )
        for start_m in range(past_diagonal, hi, BLOCK_M):
            dk, dv = _dkdv_base_block(
                dk, dv, k, v, key_ok, Q, DO, LSE, DELTA, q_rows, start_m, offs_n, offs_d, L, WINDOW, qk_scale,
                False, HAS_WINDOW, UPCAST, PRECISION, HEAD_DIM, BLOCK_M,
            )

    part_rows = (split * tl.num_programs(1) + bhk).to(tl.int64) * L
    ptrs = (part_rows + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK_PART + ptrs, dk * sm_scale, mask=col_ok[:, None])
    tl.store(DV_PART + ptrs, dv, mask=col_ok[:, None])


@triton.jit
def _tree_attention_bwd_dkdv_chain(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    L, SQ, SK, NT, HQ, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK, dV of chain key slot ``program_id(0) + 1``: summed over the later slots of the same
    branch at the same position, for every query head of the group. The key slot is the grid's
    fastest axis, so the programs in flight read the same query blocks (L2 hits)."""
    key_slot = tl.program_id(0) + 1
    pid_m = tl.program_id(1)
    bhk = tl.program_id(2)
    kv_heads = HQ // GROUP
    b = bhk // kv_heads
    hk = bhk % kv_heads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    kv_ptrs = ((bhk.to(tl.int64) * SK + key_slot) * L + offs_m)[:, None] * HEAD_DIM + offs_d[None, :]
    kc = tl.load(K + kv_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    vc = tl.load(V + kv_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Query slots that see this key: key_slot, key_slot + NT, ... that are among the queries.
    first_query_slot = SK - SQ
    behind = tl.maximum(first_query_slot - key_slot, 0)
    first = key_slot + ((behind + NT - 1) // NT) * NT
    n_queries = tl.maximum(SK - first + NT - 1, 0) // NT
    for g in range(0, GROUP):
        bh = (b * HQ + hk * GROUP + g).to(tl.int64)
        for it in range(0, n_queries):
            q_rows = (bh * SQ + first + it * NT - first_query_slot) * L + offs_m
            q_ptrs = q_rows[:, None] * HEAD_DIM + offs_d[None, :]
            q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
            do = tl.load(DO + q_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
            lse = tl.load(LSE + q_rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + q_rows, mask=row_ok, other=0.0)
            pc = tl.where(row_ok, tl.math.exp2(tl.sum(q * kc, 1) * qk_scale - lse), 0.0)
            dv += pc[:, None] * do
            dsc = pc * (tl.sum(do * vc, 1) - delta)
            dk += dsc[:, None] * q

    tl.store(DK + kv_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=row_ok[:, None])
    tl.store(DV + kv_ptrs, dv.to(DV.dtype.element_ty), mask=row_ok[:, None])


# Tiles and launch options per kernel on a GPU. "wide" is head dim 128 in half precision,
# tuned on an H200 (bench/tune_tree_attention.py at B=8, Hq=32, Hkv=8, L=4096, 29 slots;
# docs/benchmarks.md); "small" covers head dims up to 64 and float32 (whose tiles take twice
# the shared memory). The forward and dQ kernels need BLOCK_M % BLOCK_N == 0 (their causal
# split); "chain" is the chain-key dK/dV kernel (its BLOCK_M rows are positions).
GPU_CONFIGS = {
    "wide": {
        "fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        "dq": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
        "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
        "chain": {"BLOCK_M": 64, "num_warps": 8, "num_stages": 2},
    },
    "small": {
        "fwd": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        "dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        "dkdv": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        "chain": {"BLOCK_M": 64, "num_warps": 8, "num_stages": 2},
    },
}
# The interpreter runs one small tile for every kernel (its cost grows with programs x steps).
INTERPRETER_CONFIGS = {
    "fwd": {"BLOCK_M": 32, "BLOCK_N": 32},
    "dq": {"BLOCK_M": 32, "BLOCK_N": 32},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 32},
    "chain": {"BLOCK_M": 32},
}
DELTA_ROWS = 64  # rows per program of the delta kernel
# A JSON file of the shape of GPU_CONFIGS whose entries replace the defaults (configurations
# tuned for another GPU, e.g. by bench/tune_tree_attention.py).
CONFIGS_ENV_VAR = "QUIETSTAR_TREE_ATTENTION_CONFIGS"


@functools.lru_cache(maxsize=None)
def _gpu_configs(path: str | None) -> dict:
    if path is None:
        return GPU_CONFIGS
    with open(path) as file:
        overrides = json.load(file)
    configs = {size: {kernel: dict(cfg) for kernel, cfg in kernels.items()} for size, kernels in GPU_CONFIGS.items()}
    for size, kernels in overrides.items():
        if size not in configs or not set(kernels) <= set(configs[size]):
            raise ValueError(f"{CONFIGS_ENV_VAR}={path}: unknown entry {size}: {sorted(kernels)}; expected {sorted(configs)} of {sorted(configs['wide'])}")
        for kernel, cfg in kernels.items():
            configs[size][kernel].update(cfg)
    for kernels in configs.values():
        for kernel in ("fwd", "dq"):
            if kernels[kernel]["BLOCK_M"] % kernels[kernel]["BLOCK_N"]:
                raise ValueError(f"{CONFIGS_ENV_VAR}={path}: {kernel} needs BLOCK_M % BLOCK_N == 0, got {kernels[kernel]}")
    return configs


def kernel_config(kernel: str, head_dim: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tiles and launch options of ``kernel`` (``"fwd"``, ``"dq"``, ``"dkdv"`` or ``"chain"``):
    one fixed configuration per head size and dtype, no autotuning, so the interpreter and
    every GPU run the same code. ``QUIETSTAR_TREE_ATTENTION_CONFIGS`` may name a JSON file
    that replaces GPU entries."""
    if interpret:
        return dict(INTERPRETER_CONFIGS[kernel])
    size = "wide" if head_dim > 64 and dtype != torch.float32 else "small"
    return dict(_gpu_configs(os.environ.get(CONFIGS_ENV_VAR) or None)[size][kernel])


def _common(q: torch.Tensor, k: torch.Tensor, interpret: bool) -> dict:
    return {
        "GROUP": q.shape[1] // k.shape[1],
        "HEAD_DIM": q.shape[3],
        # The interpreter computes bfloat16 arithmetic wrongly; upcast right after loading.
        "UPCAST": interpret and q.dtype == torch.bfloat16,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _mask_args(key_padding_mask: torch.Tensor | None, sliding_window: int | None, like: torch.Tensor):
    kpm = like if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    return kpm, (0 if sliding_window is None else sliding_window), {
        "HAS_KPM": key_padding_mask is not None,
        "HAS_WINDOW": sliding_window is not None,
    }


def tree_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_len: int,
    n_thoughts: int,
    key_padding_mask: torch.Tensor | None,
    sliding_window: int | None,
    scale: float,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel on contiguous inputs; returns ``(out, lse)`` (lse in base 2)."""
    batch, q_heads, q_len, head_dim = q.shape
    n_q_slots, n_k_slots = q_len // slot_len, k.shape[2] // slot_len
    out = torch.empty_like(q)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    kpm, window, flags = _mask_args(key_padding_mask, sliding_window, q)
    cfg = kernel_config("fwd", head_dim, q.dtype, interpret)
    grid = (n_q_slots * q_heads // k.shape[1], triton.cdiv(slot_len, cfg["BLOCK_M"]), batch * k.shape[1])
    _tree_attention_fwd[grid](
        q, k, v, out, lse, kpm,
        slot_len, n_q_slots, n_k_slots, n_thoughts, q_heads, window, scale * LOG2E,
        **_common(q, k, interpret), **flags, **cfg,
    )
    return out, lse


def _split_count(work_items: int, programs: int, device: torch.device, interpret: bool) -> int:
    """How many programs share the (head, query slot) loop of one base key block, so that the
    grid fills the GPU about twice."""
    if interpret:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(work_items, triton.cdiv(2 * sms, max(programs, 1))))


def tree_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    slot_len: int,
    n_thoughts: int,
    key_padding_mask: torch.Tensor | None,
    sliding_window: int | None,
    scale: float,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels on contiguous inputs; returns ``(dq, dk, dv)``."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k.shape[1]
    n_q_slots, n_k_slots = q_len // slot_len, k.shape[2] // slot_len
    kpm, window, flags = _mask_args(key_padding_mask, sliding_window, q)
    common = _common(q, k, interpret)
    sizes = (slot_len, n_q_slots, n_k_slots)

    rows = batch * q_heads * q_len
    delta = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=q.device)
    _attention_delta[(triton.cdiv(rows, DELTA_ROWS),)](out, grad_out, delta, rows, HEAD_DIM=head_dim, BLOCK_R=DELTA_ROWS)

    dq = torch.empty_like(q)
    cfg = kernel_config("dq", head_dim, q.dtype, interpret)
    grid = (common["GROUP"] * n_q_slots, triton.cdiv(slot_len, cfg["BLOCK_M"]), batch * kv_heads)
    _tree_attention_bwd_dq[grid](
        q, k, v, grad_out, dq, lse, delta, kpm,
        *sizes, n_thoughts, q_heads, window, scale * LOG2E, scale,
        **common, **flags, **cfg,
    )

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    cfg = kernel_config("dkdv", head_dim, q.dtype, interpret)
    key_blocks = triton.cdiv(slot_len, cfg["BLOCK_N"])
    split = _split_count(common["GROUP"] * n_q_slots, key_blocks * batch * kv_heads, q.device, interpret)
    dk_part = torch.empty(split, batch, kv_heads, slot_len, head_dim, dtype=torch.float32, device=q.device)
    dv_part = torch.empty_like(dk_part)
    _tree_attention_bwd_dkdv_base[(key_blocks, batch * kv_heads, split)](
        q, k, v, grad_out, dk_part, dv_part, lse, delta, kpm,
        *sizes, q_heads, window, scale * LOG2E, scale, split,
        **common, **flags, **cfg,
    )
    dk[:, :, :slot_len] = dk_part.sum(0)
    dv[:, :, :slot_len] = dv_part.sum(0)

    if n_k_slots > 1:
        cfg = kernel_config("chain", head_dim, q.dtype, interpret)
        grid = (n_k_slots - 1, triton.cdiv(slot_len, cfg["BLOCK_M"]), batch * kv_heads)
        _tree_attention_bwd_dkdv_chain[grid](
            q, k, v, grad_out, dk, dv, lse, delta,
            *sizes, n_thoughts, q_heads, scale * LOG2E, scale,
            GROUP=common["GROUP"], HEAD_DIM=head_dim, **cfg,
        )
    return dq, dk, dv
