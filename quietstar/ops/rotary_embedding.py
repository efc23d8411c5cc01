"""``rotary_embedding``: rotary position embedding (RoPE) as the Llama family applies it, from
the projection's ``[B, T, H, D]`` to the attention's ``[B, H, T, D]``, one entry for every backend.

* ``torch``: transformers' ``apply_rotary_pos_emb`` arithmetic on the transposed view,
  ``x * cos + rotate_half(x) * sin``; the reference the native kernels are held to.
* ``native``: ``csrc/rotary_embedding.cpp``, float32 or bfloat16 ``x`` with float32 ``cos`` and
  ``sin`` on the CPU: one pass each way, the transpose folded in (the result's rows are
  contiguous, as the attention reads them), nothing kept for the backward but ``cos`` and ``sin``.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from quietstar._checks import FLOAT_DTYPES, check_tensor
from quietstar.ops.backends import NATIVE_ELEMENTWISE_DTYPES, native_chosen


class RotaryEmbeddingNative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return torch.ops.quietstar.rotary_embedding_forward(x.contiguous(), cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return torch.ops.quietstar.rotary_embedding_backward(grad.float().contiguous(), cos, sin, ctx.x_dtype), None, None


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


def rotary_embedding(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Rotate the query or key heads ``x`` by their positions' angles.

    Args:
        x: ``[B, T, H, D]``, the projection's output viewed as heads (``D`` even).
        cos, sin: ``[B, T, D]``, the model's rotary embedding at each token's position.
        backend: ``"torch"``, ``"native"`` or None: native for float32 or bfloat16 ``x`` with
            float32 ``cos`` and ``sin`` on a CPU where the extension is built, else torch
            (``"reference"`` and ``"triton"`` mean torch: there is no other kernel).

    Returns:
        ``[B, H, T, D]`` in the dtype ``x * cos`` promotes to (float32 for bfloat16 ``x`` and
        float32 ``cos``, as under autocast).

    Raises:
        ValueError: a shape, dtype or device that does not fit, naming the argument, or
            ``backend="native"`` for inputs it does not take.
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
    if native_chosen(backend, x.device):
        if native_takes(x, cos, sin):
            return RotaryEmbeddingNative.apply(x, cos.expand(batch, -1, -1), sin.expand(batch, -1, -1))
        if backend == "native":
            raise ValueError(
                f"backend='native' takes float32 or bfloat16 x with float32 cos and sin (no gradient), "
                f"got {x.dtype}, {cos.dtype} and {sin.dtype}"
            )
    return rotary_embedding_torch(x, cos, sin)
