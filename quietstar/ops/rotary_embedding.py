"""``rotary_embedding``: rotary position embedding (RoPE) as the Llama family applies it, from
the projection's ``[B, T, H, D]`` to the attention's ``[B, H, T, D]``, one entry for every backend.

* ``torch``: transformers' ``apply_rotary_pos_emb`` arithmetic on the transposed view,
  ``x * cos + rotate_half(x) * sin``; the reference the native kernels are held to.
* ``native``: ``csrc/rotary_embedding.cpp``, float32 or bfloat16 ``x`` with float32 ``cos`` and
  ``sin`` on the CPU: one pass each way, the transpose folded in (the result's rows are
  contiguous, as the attention reads them), nothing kept for the backward but ``cos`` and ``sin``.
* ``triton``: ``kernels/elementwise.py``, the same on CUDA for float16, bfloat16 and float32
  ``x``, ``cos`` and ``sin``, reading the projection's strided heads as they are and one row
  of angles for the whole batch where the model gives one (PyTorch runs five kernels forward).
"""

from __future__ import annotations

import torch

from quietstar._checks import FLOAT_DTYPES, check_tensor
from quietstar.ops.backends import (
    NATIVE_ELEMENTWISE_DTYPES,
    TRITON_ELEMENTWISE_DTYPES,
    elementwise_choice,
    elementwise_kernels,
    launch_device,
    records_gradient,
)
from quietstar.ops.first_order import first_order_only

# What each backend's kernels take, for the error of a backend asked for inputs it does not take.
KERNELS_TAKE = {
    "native": "float32 or bfloat16 x with float32 cos and sin (no gradient)",
    "triton": "x, cos and sin of float16, bfloat16 or float32 (cos and sin with no gradient), heads of 2 or more entries",
}


def _last_axis_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _as_kernels_take(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x``, ``cos`` and ``sin`` in the layout ``backend``'s kernels read."""
    if backend == "native":
        return x.contiguous(), *(angle.expand(x.shape[0], -1, -1).contiguous() for angle in (cos, sin))
    # any strides, the batch's included (0 where the angles are expanded over it)
    x, cos, sin = _last_axis_contiguous(x), _last_axis_contiguous(cos), _last_axis_contiguous(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    return x, cos, sin


class RotaryEmbeddingKernels(torch.autograd.Function):
    """Forward and backward through one backend's kernels (``elementwise_kernels``); the
    subclasses name the backend in ``grad_fn``. The native kernels take contiguous tensors,
    float32 gradients and the angles of every batch row; the Triton kernels any strides with a
    contiguous last axis."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str) -> torch.Tensor:
        x, cos, sin = _as_kernels_take(x, cos, sin, backend)
        ctx.kernels, ctx.backend, ctx.x_dtype = elementwise_kernels("rotary_embedding", backend), backend, x.dtype
        ctx.save_for_backward(cos, sin)
        with launch_device(x):
            return ctx.kernels.forward(x, cos, sin)

    @staticmethod
    @first_order_only("rotary_embedding")
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        grad = grad.float().contiguous() if ctx.backend == "native" else _last_axis_contiguous(grad)
        with launch_device(grad):
            return ctx.kernels.backward(grad, cos, sin, ctx.x_dtype), None, None, None


class RotaryEmbeddingNative(RotaryEmbeddingKernels):
    pass


class RotaryEmbeddingTriton(RotaryEmbeddingKernels):
    pass


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [..., D]``: the last axis's halves ``(x1, x2)`` as ``(-x2, x1)``, the Llama
    family's pairing of rotated entries (``i`` with ``i + D/2``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_embedding_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' arithmetic, op by op, on ``x.transpose(1, 2)``."""
    x = x.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def native_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the native kernels take these inputs: float32 or bfloat16 ``x`` with float32
    ``cos`` and ``sin`` (no gradient of their own), on the CPU."""
    return (
        x.device.type == "cpu"
        and x.dtype in NATIVE_ELEMENTWISE_DTYPES
        and cos.dtype == sin.dtype == torch.float32
        and not (cos.requires_grad or sin.requires_grad)
    )


def triton_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the Triton kernels take these inputs: ``x``, ``cos`` and ``sin`` float16,
    bfloat16 or float32 (float64 keeps its precision in the composition), ``cos`` and ``sin``
    with no gradient of their own, heads of at least 2 entries."""
    return (
        x.shape[-1] > 0
        and x.dtype in TRITON_ELEMENTWISE_DTYPES
        and cos.dtype in TRITON_ELEMENTWISE_DTYPES
        and not (cos.requires_grad or sin.requires_grad)
    )


def rotary_embedding(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Rotate the query or key heads ``x`` by their positions' angles.

    Args:
        x: ``[B, T, H, D]``, the projection's output viewed as heads (``D`` even).
        cos, sin: ``[B, T, D]``, the model's rotary embedding at each token's position.
        backend: ``"torch"``, ``"native"``, ``"triton"`` or None: native for float32 or bfloat16
            ``x`` with float32 ``cos`` and ``sin`` on a CPU where the extension is built, triton
            on CUDA (float16, bfloat16 or float32), else torch (``"reference"`` means torch).

    Returns:
        ``[B, H, T, D]`` in the dtype ``x * cos`` promotes to (float32 for bfloat16 ``x`` and
        float32 ``cos``, as under autocast).

    Raises:
        ValueError: a shape, dtype or device that does not fit, naming the argument, or
            ``backend="native"`` or ``"triton"`` for inputs it does not take.
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("cos", cos, ndim=3, dtypes=FLOAT_DTYPES, device=x.device)
    check_tensor("sin", sin, ndim=3, dtypes=(cos.dtype,), device=x.device)
    batch, length, _, dim = x.shape
    if dim % 2 or cos.shape[1:] != (length, dim) or sin.shape != cos.shape or cos.shape[0] not in (1, batch):
        raise ValueError(
            f"cos and sin must be [B, T, D] (B = 1 or x's) for x [B, T, H, D] with D even, got "
            f"{tuple(cos.shape)}, {tuple(sin.shape)} and {tuple(x.shape)}"
        )
    chosen = elementwise_choice(
        "rotary_embedding",
        backend,
        x.device,
        lambda name: (native_takes if name == "native" else triton_takes)(x, cos, sin),
        KERNELS_TAKE,
        lambda: f"{x.dtype}, {cos.dtype} and {sin.dtype}, heads of {dim} entries",
    )
    if chosen == "torch":
        return rotary_embedding_torch(x, cos, sin)
    if not records_gradient(x, cos, sin):
        x, cos, sin = _as_kernels_take(x, cos, sin, chosen)
        with launch_device(x):
            return elementwise_kernels("rotary_embedding", chosen).forward(x, cos, sin)
    return (RotaryEmbeddingNative if chosen == "native" else RotaryEmbeddingTriton).apply(x, cos, sin, chosen)
