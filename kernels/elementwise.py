"""The decoder's elementwise ops in Triton, for CUDA: ``rms_norm``, ``rotary_embedding`` and
``swiglu``, each one kernel forward and one backward.

PyTorch runs these as chains of small kernels (an RMSNorm about eight forward, RoPE five per
tensor, the SwiGLU gate two), each a pass over memory: on an H100 the 1B bench step sampling
its own thoughts (B=8, L=256) ran 1.36x faster with these kernels (bench/results/gpu-h100.md).
The kernels load any of float16, bfloat16 and float32, compute in float32 and round once to the
result's dtype; their signatures are those of the native CPU kernels (``csrc/``), so that the
ops' autograd glue calls either.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of swiglu's flat tensors per program.
SWIGLU_BLOCK = 1024
# Programs of rms_norm's backward on a GPU per multiprocessor: each sums its rows' part of the
# weight's gradient, and the partial sums are added afterwards.
RMS_NORM_PROGRAMS_PER_SM = 4
# Programs of rms_norm's backward in the interpreter, whose cost grows with programs.
INTERPRETER_RMS_NORM_PROGRAMS = 2


def row_warps(block: int) -> int:
    """Warps for a program that holds a row of ``block`` floats: more for wider rows, so that
    each thread keeps few enough values in registers (Liger-Kernel's choice, from Unsloth; not
    tuned here)."""
    return 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32


@triton.jit
def _rms_norm_forward(X, W, OUT, RSTD, D, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    x = tl.load(X + row * D + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    # As the Llama family's module: the normalised x rounded to x's dtype, then the weight.
    normed = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * D + cols, (w * normed).to(OUT.dtype.element_ty), mask=ok)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_backward(DY, X, W, RSTD, DX, DW_PARTS, N_ROWS, D, BLOCK_D: tl.constexpr):
    """Rows ``pid, pid + P, ...`` of ``dx``, and their sum of ``dy * normed`` into row ``pid``
    of ``DW_PARTS [P, D]``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    ok = cols < D
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for row in range(pid, N_ROWS, tl.num_programs(0)):
        base = tl.cast(row, tl.int64) * D
        dy = tl.load(DY + base + cols, mask=ok, other=0.0).to(tl.float32)
        x = tl.load(X + base + cols, mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        normed = x * rstd
        dn = dy * w
        dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / D))
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * normed.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PARTS + pid * D + cols, dw, mask=ok)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype):
    """``x [..., D]`` contiguous, ``weight [D]`` -> ``(out [..., D] in out_dtype, rstd [rows]
    float32)``."""
    dim = x.shape[-1]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(x.numel() // dim, dtype=torch.float32, device=x.device)
    if rstd.numel():
        block = triton.next_power_of_2(dim)
        _rms_norm_forward[(rstd.numel(),)](x, weight, out, rstd, dim, eps, BLOCK_D=block, num_warps=row_warps(block))
    return out, rstd


def rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """``grad`` and ``x`` ``[..., D]`` contiguous, ``weight [D]``, ``rstd [rows]`` -> ``(d_x`` in
    x's dtype, ``d_weight`` in weight's)."""
    dim, rows = x.shape[-1], rstd.numel()
    d_x = torch.empty_like(x)
    if rows == 0:
        return d_x, torch.zeros_like(weight)
    if x.is_cuda:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count * RMS_NORM_PROGRAMS_PER_SM
    else:
        programs = INTERPRETER_RMS_NORM_PROGRAMS
    programs = min(programs, rows)  # each writes its row of parts
    parts = torch.empty(programs, dim, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(dim)
    _rms_norm_backward[(programs,)](grad, x, weight, rstd, d_x, parts, rows, dim, BLOCK_D=block, num_warps=row_warps(block))
    return d_x, parts.sum(0).to(weight.dtype)


@triton.jit
def _rotary_embedding(
    X, COS, SIN, OUT, T, H, HALF,
    sx_b, sx_t, sx_h, sc_b, sc_t, so_b, so_t, so_h,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One token's heads ``(b, t)``: ``out = x * cos + rotate_half(x) * sin`` (rows of ``D``
    entries whose halves pair up), or with ``BACKWARD`` its transpose, ``dx = dout * cos -
    rotate_half(dout * sin)``. Strides name every layout, so the forward reads the projection's
    ``[B, T, H, D]`` and writes the attention's ``[B, H, T, D]``, and the backward the reverse."""
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    h = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    ok = (h < H) & (i < HALF)
    x_at = X + b * sx_b + t * sx_t + h * sx_h + i
    x1 = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=ok, other=0.0).to(tl.float32)
    angle_at = b * sc_b + t * sc_t + i
    col_ok = i < HALF
    c1 = tl.load(COS + angle_at, mask=col_ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + angle_at + HALF, mask=col_ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + angle_at, mask=col_ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + angle_at + HALF, mask=col_ok, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    out_at = OUT + b * so_b + t * so_t + h * so_h + i
    tl.store(out_at, o1.to(OUT.dtype.element_ty), mask=ok)
    tl.store(out_at + HALF, o2.to(OUT.dtype.element_ty), mask=ok)


def _rotate(x: torch.Tensor, x_strides, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, out_strides, backward: bool):
    batch, length, heads, dim = x_strides[0]
    if batch * length == 0 or heads == 0:
        return out
    (sx_b, sx_t, sx_h), (so_b, so_t, so_h) = x_strides[1], out_strides
    _rotary_embedding[(batch * length,)](
        x, cos, sin, out, length, heads, dim // 2,
        sx_b, sx_t, sx_h, cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), so_b, so_t, so_h,
        BACKWARD=backward, BLOCK_H=triton.next_power_of_2(heads), BLOCK_HALF=triton.next_power_of_2(dim // 2),
    )
    return out


def rotary_embedding_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, T, H, D]`` (last axis contiguous), ``cos``/``sin [B or 1, T, D]`` (equal strides,
    last axis contiguous) -> ``[B, H, T, D]`` contiguous, in the dtype ``x * cos`` promotes to."""
    batch, length, heads, dim = x.shape
    out = torch.empty(batch, heads, length, dim, dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    x_strides = ((batch, length, heads, dim), (x.stride(0), x.stride(1), x.stride(2)))
    return _rotate(x, x_strides, cos, sin, out, (out.stride(0), out.stride(2), out.stride(1)), backward=False)


def rotary_embedding_backward(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """``grad [B, H, T, D]`` (last axis contiguous) -> ``d_x [B, T, H, D]`` contiguous in ``x_dtype``."""
    batch, heads, length, dim = grad.shape
    d_x = torch.empty(batch, length, heads, dim, dtype=x_dtype, device=grad.device)
    grad_strides = ((batch, length, heads, dim), (grad.stride(0), grad.stride(2), grad.stride(1)))
    return _rotate(grad, grad_strides, cos, sin, d_x, (d_x.stride(0), d_x.stride(1), d_x.stride(2)), backward=True)


@triton.jit
def _swiglu_forward(GATE, UP, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    gate = tl.load(GATE + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (gate / (1.0 + tl.exp(-gate)) * up).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_backward(DY, GATE, UP, D_GATE, D_UP, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-gate))
    tl.store(D_UP + offs, (dy * gate * sig).to(D_UP.dtype.element_ty), mask=ok)
    tl.store(D_GATE + offs, (dy * up * sig * (1.0 + gate * (1.0 - sig))).to(D_GATE.dtype.element_ty), mask=ok)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of two contiguous tensors of one shape and dtype."""
    out = torch.empty_like(gate)
    if gate.numel():
        _swiglu_forward[(triton.cdiv(gate.numel(), SWIGLU_BLOCK),)](gate, up, out, gate.numel(), BLOCK=SWIGLU_BLOCK)
    return out


def swiglu_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """``(d_gate, d_up)`` of ``silu(gate) * up`` for the contiguous ``grad``."""
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        grid = (triton.cdiv(gate.numel(), SWIGLU_BLOCK),)
        _swiglu_backward[grid](grad, gate, up, d_gate, d_up, gate.numel(), BLOCK=SWIGLU_BLOCK)
    return d_gate, d_up
