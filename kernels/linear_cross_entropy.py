"""Triton kernels for linear cross-entropy with the mixing prologue (forward, dh, dW/db).

Layout (contiguous): hidden, base_hidden ``[N, D]``; mixing weight ``[N]``; lm_weight
``[V, D]``; targets ``[N]`` int64; offset ``[V]`` float32 (bias / T, ``-inf`` at masked ids);
log-sum-exp, scale ``[N]`` float32; dh ``[N, D]``, dW ``[V, D]``, db ``[V]`` float32.

Every kernel forms the mixed rows ``h = (1 - w) * base_hidden + w * hidden`` on the fly and
the scores ``h @ lm_weight.T / T + offset`` one ``BLOCK_M x BLOCK_V`` tile at a time,
accumulating over ``D`` in ``BLOCK_D`` slices; no ``N x V`` tensor is ever written. The
forward runs an online log-sum-exp over the vocabulary tiles of a row block. The backward
recomputes the tiles from the saved log-sum-exp and forms ``ds = scale * (softmax - onehot)``:
one kernel owns a row block and accumulates its ``dh`` rows over the vocabulary, the other
owns a vocabulary tile and accumulates its ``dW`` rows and ``db`` over the row blocks, so
both are deterministic (no atomics). Their float32 accumulators live in global memory, each
slice read and written only by the program that owns it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mixed_rows(
    X, B, WMIX, offs_m, row_ok, offs_d, d_ok, D,
    HAS_MIX: tl.constexpr, UPCAST: tl.constexpr,
):
    """Mixed hidden rows ``[BLOCK_M, BLOCK_D]`` in the dtype of the dot operands (the input
    dtype, float32 under UPCAST); the mixing itself runs in float32."""
    ptrs = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
    ok = row_ok[:, None] & d_ok[None, :]
    h = tl.load(X + ptrs, mask=ok, other=0.0)
    if UPCAST:
        h = h.to(tl.float32)
    if HAS_MIX:
        base = tl.load(B + ptrs, mask=ok, other=0.0).to(tl.float32)
        mix = tl.load(WMIX + offs_m, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        h = (1.0 - mix) * base + mix * h.to(tl.float32)
        if not UPCAST:
            h = h.to(X.dtype.element_ty)
    return h


@triton.jit
def _weight_rows(W, offs_v, col_ok, offs_d, d_ok, D, UPCAST: tl.constexpr):
    """lm_weight rows ``[BLOCK_V, BLOCK_D]``."""
    ptrs = offs_v.to(tl.int64)[:, None] * D + offs_d[None, :]
    wt = tl.load(W + ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        wt = wt.to(tl.float32)
    return wt


@triton.jit
def _score_tile(
    X, B, WMIX, W, OFFSET, offs_m, row_ok, offs_v, col_ok, D, inv_temperature,
    HAS_MIX: tl.constexpr, HAS_OFFSET: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Scores ``h @ W.T / T + offset`` of one tile, float32 ``[BLOCK_M, BLOCK_V]``; columns past
    ``V`` and masked ids are ``-inf``."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        wt = _weight_rows(W, offs_v, col_ok, offs_d, d_ok, D, UPCAST)
        h = _mixed_rows(X, B, WMIX, offs_m, row_ok, offs_d, d_ok, D, HAS_MIX, UPCAST)
        acc += tl.dot(h, tl.trans(wt), input_precision=PRECISION)
    z = acc * inv_temperature
    if HAS_OFFSET:
        z += tl.load(OFFSET + offs_v, mask=col_ok, other=0.0)[None, :]
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _zero_rows(PTR, offs_r, r_ok, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Zero rows ``offs_r`` of a float32 ``[*, D]`` accumulator."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ptrs = offs_r.to(tl.int64)[:, None] * D + offs_d[None, :]
        tl.store(PTR + ptrs, tl.zeros([BLOCK_R, BLOCK_D], tl.float32), mask=r_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _softmax_minus_onehot(z, lse, target, offs_v, row_ok):
    """``softmax - onehot(target)`` of one score tile; 0 on rows past ``N``.

    The per-row ``scale`` is applied around the dot products, not folded in here: small
    upstream gradients times small probabilities would underflow in float16 operands.
    """
    p = tl.exp(z - lse[:, None])
    hit = offs_v[None, :] == target[:, None]
    return tl.where(row_ok[:, None], p - tl.where(hit, 1.0, 0.0), 0.0)


@triton.jit
def _lce_fwd(
    X, B, WMIX, W, OFFSET, TARGET, LSE, NLL,
    N, V, D, ignore_index, inv_temperature,
    HAS_MIX: tl.constexpr, HAS_OFFSET: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    target = tl.load(TARGET + offs_m, mask=row_ok, other=ignore_index)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    picked = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        z = _score_tile(
            X, B, WMIX, W, OFFSET, offs_m, row_ok, offs_v, col_ok, D, inv_temperature,
            HAS_MIX, HAS_OFFSET, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )
        picked += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(z, 1))
        # A tile of masked ids only leaves the maximum at -inf: shift by 0 instead of NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(z - m_use[:, None]), 1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    nll = tl.where(target == ignore_index, 0.0, lse - picked)
    tl.store(LSE + offs_m, lse, mask=row_ok)
    tl.store(NLL + offs_m, nll, mask=row_ok)


@triton.jit
def _lce_bwd_dh(
    X, B, WMIX, W, OFFSET, TARGET, LSE, SCALE, DH,
    N, V, D, inv_temperature,
    HAS_MIX: tl.constexpr, HAS_OFFSET: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dh`` of one row block: sum over vocabulary tiles of ``ds @ W``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    target = tl.load(TARGET + offs_m, mask=row_ok, other=-1)
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    scale = tl.load(SCALE + offs_m, mask=row_ok, other=0.0)
    _zero_rows(DH, offs_m, row_ok, D, BLOCK_M, BLOCK_D)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        z = _score_tile(
            X, B, WMIX, W, OFFSET, offs_m, row_ok, offs_v, col_ok, D, inv_temperature,
            HAS_MIX, HAS_OFFSET, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )
        g = _softmax_minus_onehot(z, lse, target, offs_v, row_ok)
        # Every thread of the program must see the previous tile's dh before adding to it.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            wt = _weight_rows(W, offs_v, col_ok, offs_d, d_ok, D, UPCAST)
            ptrs = offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
            ok = row_ok[:, None] & d_ok[None, :]
            dh = tl.load(DH + ptrs, mask=ok, other=0.0)
            dh += scale[:, None] * tl.dot(g.to(wt.dtype), wt, input_precision=PRECISION)
            tl.store(DH + ptrs, dh, mask=ok)


@triton.jit
def _lce_bwd_dw(
    X, B, WMIX, W, OFFSET, TARGET, LSE, SCALE, DW, DB,
    N, V, D, inv_temperature,
    HAS_MIX: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_DB: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dW`` and ``db`` of one vocabulary tile: sums over row blocks of ``ds.T @ h`` and ``ds``."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    _zero_rows(DW, offs_v, col_ok, D, BLOCK_V, BLOCK_D)
    db = tl.zeros([BLOCK_V], tl.float32)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        target = tl.load(TARGET + offs_m, mask=row_ok, other=-1)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        scale = tl.load(SCALE + offs_m, mask=row_ok, other=0.0)
        z = _score_tile(
            X, B, WMIX, W, OFFSET, offs_m, row_ok, offs_v, col_ok, D, inv_temperature,
            HAS_MIX, HAS_OFFSET, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_D,
        )
        ds = scale[:, None] * _softmax_minus_onehot(z, lse, target, offs_v, row_ok)
        if HAS_DB:
            db += tl.sum(ds, 0)
        # The dot takes ds over the block's largest |scale|, so its operands stay near 1.
        top = tl.max(tl.abs(scale), 0)
        top = tl.where(top == 0.0, 1.0, top)
        ds_t = tl.trans(ds / top)
        # Every thread of the program must see the previous row block's dW before adding to it.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            h = _mixed_rows(X, B, WMIX, offs_m, row_ok, offs_d, d_ok, D, HAS_MIX, UPCAST)
            ptrs = offs_v.to(tl.int64)[:, None] * D + offs_d[None, :]
            ok = col_ok[:, None] & d_ok[None, :]
            dw = tl.load(DW + ptrs, mask=ok, other=0.0)
            dw += top * tl.dot(ds_t.to(h.dtype), h, input_precision=PRECISION)
            tl.store(DW + ptrs, dw, mask=ok)
    if HAS_DB:
        tl.store(DB + offs_v, db, mask=col_ok)


def _config(dtype: torch.dtype, interpret: bool) -> dict:
    """Block sizes and launch options: one fixed configuration (no autotuning, so the
    interpreter and every GPU run the same code path)."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_V": 32, "BLOCK_D": 32}
    block_d = 32 if dtype == torch.float32 else 64
    return {"BLOCK_M": 64, "BLOCK_V": 64, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 2}


def _common(
    hidden: torch.Tensor, mix_weight: torch.Tensor | None, offset: torch.Tensor | None, interpret: bool
) -> dict:
    upcast = interpret and hidden.dtype == torch.bfloat16
    return {
        "HAS_MIX": mix_weight is not None,
        "HAS_OFFSET": offset is not None,
        # The interpreter computes bfloat16 arithmetic wrongly; upcast right after loading.
        "UPCAST": upcast,
        # float32 tl.dot defaults to TF32 on GPU; the upcast operands are float32 too.
        "PRECISION": "ieee" if hidden.dtype == torch.float32 or upcast else "tf32",
    }


def _pointers(hidden, base_hidden, mix_weight, offset):
    """Tensors for the optional pointer arguments (any tensor stands in when a flag is off)."""
    return (
        hidden if base_hidden is None else base_hidden,
        hidden if mix_weight is None else mix_weight,
        hidden if offset is None else offset,
    )


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    base_hidden: torch.Tensor | None,
    mix_weight: torch.Tensor | None,
    offset: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel on contiguous inputs; returns ``(nll, lse)``, both float32 ``[N]``."""
    rows, width = hidden.shape
    vocab = lm_weight.shape[0]
    nll = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    base, mix, off = _pointers(hidden, base_hidden, mix_weight, offset)
    cfg = _config(hidden.dtype, interpret)
    _lce_fwd[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
        hidden, base, mix, lm_weight, off, targets, lse, nll,
        rows, vocab, width, ignore_index, 1.0 / temperature,
        **_common(hidden, mix_weight, offset, interpret), **cfg,
    )
    return nll, lse


def linear_cross_entropy_backward(
    scale: torch.Tensor,
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    base_hidden: torch.Tensor | None,
    mix_weight: torch.Tensor | None,
    offset: torch.Tensor | None,
    lse: torch.Tensor,
    temperature: float,
    need_h: bool,
    need_weight: bool,
    need_bias: bool,
    interpret: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Run the backward kernels; ``scale`` is ``grad_nll / T`` (0 on ignored rows).

    Returns float32 ``(dh [N, D], dW [V, D], db [V])`` of the raw logits ``h @ W.T + b``,
    each None where not needed.
    """
    rows, width = hidden.shape
    vocab = lm_weight.shape[0]
    base, mix, off = _pointers(hidden, base_hidden, mix_weight, offset)
    cfg = _config(hidden.dtype, interpret)
    common = _common(hidden, mix_weight, offset, interpret)
    sizes = (rows, vocab, width, 1.0 / temperature)
    grad_h = grad_weight = grad_bias = None
    if need_h:
        grad_h = torch.empty(rows, width, dtype=torch.float32, device=hidden.device)
        _lce_bwd_dh[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
            hidden, base, mix, lm_weight, off, targets, lse, scale, grad_h, *sizes, **common, **cfg,
        )
    if need_weight or need_bias:
        grad_weight = torch.empty(vocab, width, dtype=torch.float32, device=hidden.device)
        grad_bias = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if need_bias else grad_weight
        _lce_bwd_dw[(triton.cdiv(vocab, cfg["BLOCK_V"]),)](
            hidden, base, mix, lm_weight, off, targets, lse, scale, grad_weight, grad_bias, *sizes,
            HAS_DB=need_bias, **common, **cfg,
        )
        grad_bias = grad_bias if need_bias else None
        grad_weight = grad_weight if need_weight else None
    return grad_h, grad_weight, grad_bias
