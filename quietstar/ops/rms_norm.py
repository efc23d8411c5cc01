"""``rms_norm``: the Llama family's RMSNorm, ``weight * (x * rsqrt(mean(x^2) + eps))``, one entry
for every backend.

* ``torch``: the Hugging Face modules' own arithmetic (float32 inside, the result cast back to
  ``x``'s dtype before the weight multiplies it); the reference the kernels are held to.
* ``native``: ``csrc/rms_norm.cpp``, float32 ``x`` and ``weight`` on the CPU: one pass over
  memory forward and one backward (PyTorch runs six ops forward and about ten backward), and
  autograd keeps ``x`` and one float per row instead of ``x``, the squares' mean and the
  normalised ``x``. At the training step's ``[1920, 576]`` its forward and backward took
  0.22 ms against the torch backend's 3.4 ms (2-core AMD EPYC with AVX-512 BF16).
* ``triton``: ``kernels/elementwise.py``, the same one kernel each way on CUDA, for float16,
  bfloat16 and float32 ``x`` and ``weight`` (float32 arithmetic, the result rounded once).
"""

from __future__ import annotations

import math
import numbers

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

# The widest row the Triton kernels take: one program holds a row in registers (wider rows would
# spill; Liger-Kernel's fused norms stop at the same 64K entries).
TRITON_MAX_WIDTH = 2**16
# What each backend's kernels take, for the error of a backend asked for inputs it does not take.
KERNELS_TAKE = {
    "native": "float32 x and weight and a float32 or bfloat16 out_dtype",
    "triton": f"x, weight and out_dtype of float16, bfloat16 or float32, and rows of 1 to {TRITON_MAX_WIDTH} entries",
}


class RMSNormKernels(torch.autograd.Function):
    """Forward and backward through one backend's kernels (``elementwise_kernels``); the
    subclasses name the backend in ``grad_fn``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        ctx.kernels = elementwise_kernels("rms_norm", backend)
        out, rstd = _kernels_forward(ctx.kernels, x, weight, eps, out_dtype)
        ctx.save_for_backward(x, weight, rstd)
        ctx.out_dtype = out_dtype
        return out

    @staticmethod
    @first_order_only("rms_norm")
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad = grad.to(ctx.out_dtype).contiguous()
        with launch_device(x):
            d_x, d_weight = ctx.kernels.backward(grad, x, weight, rstd)
        return d_x, d_weight, None, None, None


def _kernels_forward(kernels, x, weight, eps, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The result ``[..., d]`` and ``rstd`` (one float per row) from contiguous ``x`` and ``weight``."""
    with launch_device(x):
        return kernels.forward(x, weight, eps, out_dtype)


class RMSNormNative(RMSNormKernels):
    pass


class RMSNormTriton(RMSNormKernels):
    pass


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The Llama family's arithmetic, op by op (then cast to ``out_dtype`` when given)."""
    normed = x.to(torch.float32)
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if out_dtype is None else out.to(out_dtype)


def native_takes(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> bool:
    """Whether the native kernels take these inputs: float32 ``x`` and ``weight`` on the CPU,
    the result float32 or bfloat16."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (out_dtype is None or out_dtype in NATIVE_ELEMENTWISE_DTYPES)
    )


def triton_takes(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernels take these inputs: ``x``, ``weight`` and the result each
    float16, bfloat16 or float32 (float64 keeps its precision in the composition), and rows of
    1 to ``TRITON_MAX_WIDTH`` entries."""
    return (
        x.dtype in TRITON_ELEMENTWISE_DTYPES
        and weight.dtype in TRITON_ELEMENTWISE_DTYPES
        and (out_dtype is None or out_dtype in TRITON_ELEMENTWISE_DTYPES)
        and 0 < x.shape[-1] <= TRITON_MAX_WIDTH
    )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dimension, as ``LlamaRMSNorm`` (and Mistral's and Qwen's) computes it.

    Args:
        x: ``[..., d]``, floating point.
        weight: ``[d]``, on ``x``'s device.
        eps: added to the mean of the squares, a finite number >= 0.
        out_dtype: the result's dtype (rounded once), or None for the module's own
            (``weight * x`` promoted). Under autocast the decoder's norms return the autocast
            dtype: their consumers are projections that would round it to that dtype each.
        backend: ``"torch"``, ``"native"``, ``"triton"`` or None: native for float32 ``x`` and
            ``weight`` on a CPU where the extension is built, triton on CUDA (float16, bfloat16
            or float32), else torch (``"reference"`` means torch).

    Returns:
        ``[..., d]`` in ``out_dtype``, or the dtype ``weight * x`` promotes to.

    Raises:
        ValueError: a shape, dtype, device or ``eps`` that does not fit, naming the argument,
            or ``backend="native"`` or ``"triton"`` for inputs it does not take.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension ([..., d]), got a 0-d tensor")
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [d] for x [..., d], got {tuple(weight.shape)} and {tuple(x.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise ValueError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")
    chosen = elementwise_choice(
        "rms_norm",
        backend,
        x.device,
        lambda name: (native_takes if name == "native" else triton_takes)(x, weight, out_dtype),
        KERNELS_TAKE,
        lambda: f"{x.dtype}, {weight.dtype} and {out_dtype}, rows of {x.shape[-1]}",
    )
    if chosen == "torch":
        return rms_norm_torch(x, weight, eps, out_dtype)
    out_dtype = out_dtype or torch.promote_types(x.dtype, weight.dtype)
    if not records_gradient(x, weight):
        kernels = elementwise_kernels("rms_norm", chosen)
        return _kernels_forward(kernels, x.contiguous(), weight.contiguous(), float(eps), out_dtype)[0]
    function = RMSNormNative if chosen == "native" else RMSNormTriton
    return function.apply(x, weight, float(eps), out_dtype, chosen)
