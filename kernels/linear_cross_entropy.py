"""Linear cross-entropy with the mixing prologue: matrix products in cuBLAS, everything between
them fused in Triton, one vocabulary chunk of scores at a time.

Layout (contiguous): hidden, base_hidden ``[N, D]``; mixing weight ``[N]``; lm_weight
``[V, D]``; targets ``[N]`` int64; offset ``[V]`` float32 (bias / T, ``-inf`` at masked ids).

The vocabulary is cut into chunks of ``C`` ids whose float32 scores ``[N, C]`` fit
``CHUNK_BYTES``. Per chunk, the forward forms the scores ``h @ W_chunk.T`` with one matrix
product (half-precision operands, float32 output, so the tensor cores run at full rate and no
logit is rounded to half precision) and one Triton pass merges them into a running
log-sum-exp per row and picks the target's score. The backward recomputes each chunk's scores,
one Triton pass turns them into ``g = softmax - onehot`` in the operand dtype, and two matrix
products give ``dh += scale * (g @ W_chunk)`` and the finished rows ``dW_chunk = g.T @ (scale *
h)``. That is four ``N x V x D`` products (the dense reference does three) and no ``N x V``
tensor; each product is a plain large GEMM, which Triton tiles would not beat, and nothing is
accumulated in global memory tile by tile.

The weighted form (``weighted_linear_cross_entropy``: a loss ``sum_i weight_i * nll_i`` whose
weights are known before the head runs) instead cuts the rows into chunks whose float32 scores
over the whole vocabulary ``[R, V]`` fit ``WEIGHTED_CHUNK_BYTES``, and forms every gradient in
the forward: per chunk one product for the scores, one Triton pass for the rows' log-sum-exps
and target scores (``_merge_chunk_lse`` over all ids at once), one for ``g = softmax -
onehot``, and two products ``dh = scale * (g @ W)`` and ``dW += g.T @ (scale * h)``: three
``N x V x D`` products instead of four, at the price of a float32 ``[V, D]`` accumulator and
its traffic (read and written once per chunk).
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

# Bytes of float32 scores one vocabulary chunk may take: 256 MiB is 8192 ids at 8192 rows,
# large enough for the matrix products to run at full rate.
CHUNK_BYTES = 256 * 2**20
# Chunk widths are multiples of this many ids (aligned, tensor-core friendly GEMM shapes).
CHUNK_ALIGN = 128
# Bytes of float32 scores one row chunk of the weighted form may take: 1 GiB is 2048 rows of a
# 128k vocabulary, so the float32 [V, D] accumulator is read and written once per 2048 rows.
WEIGHTED_CHUNK_BYTES = 2**30


@triton.jit
def _merge_chunk_lse(
    Z, OFFSET, TARGET, MAX, SUMEXP, PICKED,
    N, C, v0, inv_temperature,
    HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Fold the scores ``Z [N, C]`` of vocabulary ids ``v0 .. v0 + C`` into the running
    maximum and sum of exponentials of each row (float32 ``[N]``), and add the target's score
    to ``PICKED`` when the target is in this chunk."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    target = tl.load(TARGET + offs_m, mask=row_ok, other=-1)
    m_i = tl.load(MAX + offs_m, mask=row_ok, other=float("-inf"))
    l_i = tl.load(SUMEXP + offs_m, mask=row_ok, other=0.0)
    picked = tl.load(PICKED + offs_m, mask=row_ok, other=0.0)
    rows = offs_m.to(tl.int64) * C
    for c0 in range(0, C, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V)
        col_ok = offs_c < C
        z = tl.load(Z + rows[:, None] + offs_c[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        z = z * inv_temperature
        if HAS_OFFSET:
            z += tl.load(OFFSET + v0 + offs_c, mask=col_ok, other=0.0)[None, :]
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # Columns past the chunk are other chunks' ids: only this chunk's may hit the target.
        hit = ((v0 + offs_c)[None, :] == target[:, None]) & col_ok[None, :]
        picked += tl.sum(tl.where(hit, z, 0.0), 1)
        m_new = tl.maximum(m_i, tl.max(z, 1))
        # A chunk of masked ids only leaves the maximum at -inf: shift by 0 instead of NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_use) + tl.sum(tl.exp(z - m_use[:, None]), 1)
        m_i = m_new
    tl.store(MAX + offs_m, m_i, mask=row_ok)
    tl.store(SUMEXP + offs_m, l_i, mask=row_ok)
    tl.store(PICKED + offs_m, picked, mask=row_ok)


@triton.jit
def _softmax_minus_onehot(
    Z, G, OFFSET, TARGET, LSE,
    N, C, v0, inv_temperature,
    HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``G = softmax - onehot(target)`` of the scores ``Z [N, C]`` of ids ``v0 .. v0 + C``
    from the saved log-sum-exp, written in G's dtype (the matrix products' operand dtype).
    ``G`` may be ``Z`` itself: each element is read before it is written, by one program."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = offs_m < N
    col_ok = offs_c < C
    ok = row_ok[:, None] & col_ok[None, :]
    ptrs = offs_m.to(tl.int64)[:, None] * C + offs_c[None, :]
    z = tl.load(Z + ptrs, mask=ok, other=0.0) * inv_temperature
    if HAS_OFFSET:
        z += tl.load(OFFSET + v0 + offs_c, mask=col_ok, other=0.0)[None, :]
    lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
    target = tl.load(TARGET + offs_m, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    hit = ((v0 + offs_c)[None, :] == target[:, None]) & col_ok[None, :]
    g = p - tl.where(hit, 1.0, 0.0)
    tl.store(G + ptrs, g.to(G.dtype.element_ty), mask=ok)


# Tiles and launch options of both kernels (memory-bound passes over a chunk); the
# interpreter's cost grows with programs x steps, so it gets small tiles.
GPU_CONFIG = {"BLOCK_M": 8, "BLOCK_V": 512, "num_warps": 8}
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_V": 32}


def _launch_config(interpret: bool) -> dict:
    return dict(INTERPRETER_CONFIG if interpret else GPU_CONFIG)


@functools.lru_cache(maxsize=None)
def _has_float32_output_mm(device_type: str) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` runs on half-precision operands here
    (CUDA, torch >= 2.8); otherwise the operands are upcast, which gives the same numbers."""
    if device_type != "cuda":
        return False
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=device_type)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError) as error:
        logger.warning("torch.mm has no float32 output for half inputs (%s): upcasting operands instead", error)
        return False
    return True


def matmul_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in float32, from operands of any float dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if _has_float32_output_mm(a.device.type):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def chunk_width(rows: int, vocab: int) -> int:
    """Vocabulary ids per chunk: float32 scores of ``rows x width`` within ``CHUNK_BYTES``."""
    width = CHUNK_BYTES // (4 * rows)
    width = max(CHUNK_ALIGN, width - width % CHUNK_ALIGN)
    return min(width, vocab)


def mixed_rows(hidden: torch.Tensor, base_hidden: torch.Tensor | None, mix_weight: torch.Tensor | None) -> torch.Tensor:
    """``h = (1 - w) * base_hidden + w * hidden`` ``[N, D]`` in hidden's dtype (mixed in float32)."""
    if mix_weight is None:
        return hidden
    w = mix_weight.float()[:, None]
    return torch.lerp(base_hidden.float(), hidden.float(), w).to(hidden.dtype)


class _RowStats:
    """Running maximum, sum of exponentials and target score of each of ``rows`` rows (float32),
    folded in from chunks of scores by ``_merge_chunk_lse``."""

    def __init__(self, rows: int, device: torch.device) -> None:
        self.max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=device)
        self.sum_exp = torch.zeros(rows, dtype=torch.float32, device=device)
        self.picked = torch.zeros(rows, dtype=torch.float32, device=device)

    def merge(self, z, v0: int, offset, targets, temperature: float, cfg: dict) -> None:
        """Fold in the scores ``z [rows, C]`` of ids ``v0 .. v0 + C``."""
        rows, width = z.shape
        _merge_chunk_lse[(triton.cdiv(rows, cfg["BLOCK_M"]),)](
            z, z if offset is None else offset, targets, self.max, self.sum_exp, self.picked,
            rows, width, v0, 1.0 / temperature,
            HAS_OFFSET=offset is not None, **cfg,
        )

    def lse(self) -> torch.Tensor:
        return self.max + self.sum_exp.log()


def _write_softmax_minus_onehot(z, g, v0: int, offset, targets, lse, temperature: float, cfg: dict) -> None:
    """``g = softmax - onehot`` of the scores ``z [rows, C]`` of ids ``v0 .. v0 + C`` (``g`` may
    be ``z``)."""
    rows, width = z.shape
    grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(width, cfg["BLOCK_V"]))
    _softmax_minus_onehot[grid](
        z, g, z if offset is None else offset, targets, lse,
        rows, width, v0, 1.0 / temperature,
        HAS_OFFSET=offset is not None, **cfg,
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
    """NLL and log-sum-exp per row, both float32 ``[N]``, chunk by chunk over the vocabulary."""
    rows, vocab = hidden.shape[0], lm_weight.shape[0]
    h = mixed_rows(hidden, base_hidden, mix_weight)
    stats = _RowStats(rows, hidden.device)
    cfg = _launch_config(interpret)
    width = chunk_width(rows, vocab)
    for v0 in range(0, vocab, width):
        stats.merge(matmul_float32(h, lm_weight[v0 : v0 + width].T), v0, offset, targets, temperature, cfg)
    lse = stats.lse()
    nll = (lse - stats.picked).masked_fill_(targets == ignore_index, 0.0)
    return nll, lse


def _largest_scale(scale: torch.Tensor) -> torch.Tensor:
    """The largest ``|scale|`` (1 if all are 0): rows of ``h`` scaled by ``scale`` over it stay
    near 1 as half-precision operands (small gradients would underflow in float16), and it goes
    back on after the product."""
    top = scale.abs().max()
    return torch.where(top == 0, torch.ones_like(top), top)


def _scaled_rows(h: torch.Tensor, scale: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """``h * scale / top`` row by row, in h's dtype (computed in float32)."""
    return (h.float() * (scale / top)[:, None]).to(h.dtype)


def weighted_linear_cross_entropy_fused(
    scale: torch.Tensor,
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    base_hidden: torch.Tensor | None,
    mix_weight: torch.Tensor | None,
    offset: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    need_h: bool,
    need_weight: bool,
    need_bias: bool,
    interpret: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """NLLs and the gradients of ``sum_i weight_i * nll_i``, one row chunk at a time;
    ``scale`` is ``weight / T`` (0 on ignored rows).

    Returns ``(nll [N], dh [N, D], dW [V, D], db [V])``, all float32, each gradient None where
    not needed.
    """
    rows, vocab = hidden.shape[0], lm_weight.shape[0]
    device = hidden.device
    h = mixed_rows(hidden, base_hidden, mix_weight)
    nll = torch.empty(rows, dtype=torch.float32, device=device)
    grad_h = torch.empty(rows, hidden.shape[1], dtype=torch.float32, device=device) if need_h else None
    grad_weight = torch.zeros(lm_weight.shape, dtype=torch.float32, device=device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device) if need_bias else None
    top = _largest_scale(scale) if need_weight else None
    cfg = _launch_config(interpret)
    chunk_rows = max(1, WEIGHTED_CHUNK_BYTES // (4 * vocab))
    for r0 in range(0, rows, chunk_rows):
        part = slice(r0, min(r0 + chunk_rows, rows))
        h_part, targets_part, scale_part = h[part], targets[part], scale[part]
        n = h_part.shape[0]
        z = matmul_float32(h_part, lm_weight.T)
        stats = _RowStats(n, device)
        stats.merge(z, 0, offset, targets_part, temperature, cfg)
        lse = stats.lse()
        nll[part] = lse - stats.picked
        if not (need_h or need_weight or need_bias):
            continue
        g = z if h.dtype == torch.float32 else torch.empty(n, vocab, dtype=h.dtype, device=device)
        _write_softmax_minus_onehot(z, g, 0, offset, targets_part, lse, temperature, cfg)
        if grad_h is not None:
            grad_h[part] = matmul_float32(g, lm_weight) * scale_part[:, None]
        if grad_weight is not None:
            grad_weight += matmul_float32(g.T, _scaled_rows(h_part, scale_part, top))
        if grad_bias is not None:
            grad_bias += g.T.float() @ scale_part
    if grad_weight is not None:
        grad_weight *= top
    nll.masked_fill_(targets == ignore_index, 0.0)
    return nll, grad_h, grad_weight, grad_bias


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
    """Gradients of the raw logits' inputs; ``scale`` is ``grad_nll / T`` (0 on ignored rows).

    Returns ``(dh [N, D] float32, dW [V, D] in lm_weight's dtype, db [V] float32)``, each None
    where not needed. ``dW`` rows are finished chunk by chunk (a float32 sum over all rows
    inside one product), so no float32 ``[V, D]`` buffer is held.
    """
    rows, vocab = hidden.shape[0], lm_weight.shape[0]
    h = mixed_rows(hidden, base_hidden, mix_weight)
    grad_h = torch.zeros(rows, hidden.shape[1], dtype=torch.float32, device=hidden.device) if need_h else None
    grad_weight = torch.empty_like(lm_weight) if need_weight else None
    grad_bias = torch.empty(vocab, dtype=torch.float32, device=hidden.device) if need_bias else None
    if need_weight:
        top = _largest_scale(scale)
        h_scaled = _scaled_rows(h, scale, top)
    cfg = _launch_config(interpret)
    width = chunk_width(rows, vocab)
    for v0 in range(0, vocab, width):
        w_chunk = lm_weight[v0 : v0 + width]
        z = matmul_float32(h, w_chunk.T)
        chunk = z.shape[1]
        g = z if h.dtype == torch.float32 else torch.empty(rows, chunk, dtype=h.dtype, device=h.device)
        _write_softmax_minus_onehot(z, g, v0, offset, targets, lse, temperature, cfg)
        if grad_h is not None:
            grad_h.addcmul_(matmul_float32(g, w_chunk), scale[:, None])
        if grad_weight is not None:
            grad_weight[v0 : v0 + chunk] = (matmul_float32(g.T, h_scaled) * top).to(lm_weight.dtype)
        if grad_bias is not None:
            grad_bias[v0 : v0 + chunk] = g.T.float() @ scale
    return grad_h, grad_weight, grad_bias
