"""The two products of a linear layer, ``x W^T + b`` and ``dY W``, through oneDNN on the CPU.

PyTorch multiplies float32 on the CPU with MKL's sgemm. On the 2-core AMD EPYC with AVX-512
that the benchmarks ran on, oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, which
PyTorch ships for the CPU code of ``torch.compile``) ran the training step's decoder products
1.1-1.3x faster at 128-1,920 rows, and ``dY W`` through a transposed view of ``W`` 1.5x
(docs/benchmarks.md). It computes the same float32 products, in another summation order.

These functions carry no autograd: they serve passes without gradients (the thought sampling)
and the forward and backward of autograd Functions (``ReplayedLinear``). Wherever oneDNN does
not take the inputs (another device or dtype, autocast on, an input that needs a gradient
here, a torch without the op or whose op fails a first small check, or
``QUIETSTAR_NO_ONEDNN=1``) they compute what PyTorch's own
``linear`` and ``@`` compute.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import torch.nn.functional as F

NO_ONEDNN_ENV_VAR = "QUIETSTAR_NO_ONEDNN"

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN's linear op, it computes a small ``F.linear`` right (it is
    internal to PyTorch: a version that changed it is not used), and ``QUIETSTAR_NO_ONEDNN`` is
    not ``1``. The first call logs why it is not available."""
    if os.environ.get(NO_ONEDNN_ENV_VAR) == "1":
        reason = f"{NO_ONEDNN_ENV_VAR}=1"
    elif not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        reason = "this torch has no oneDNN linear op"
    else:
        x = torch.arange(6.0).view(2, 3)
        weight, bias = torch.arange(12.0).view(4, 3) / 8, torch.arange(4.0)
        try:
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                same = torch.allclose(_onednn_product(x, weight, bias), F.linear(x, weight, bias)) and torch.allclose(
                    _onednn_product(x, weight.t().contiguous().t(), None), x @ weight.T  # a transposed view
                )
            if same:
                return True
            reason = "its oneDNN linear op computed a wrong result"
        except RuntimeError as error:
            reason = f"its oneDNN linear op failed ({error})"
    logger.info("float32 CPU products stay with PyTorch's own linear: %s", reason)
    return False


def _onednn_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """float32 CPU tensors with rows, no autocast and no gradient to record."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
        and onednn_linear_available()
    )


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [..., k] weight[n, k]^T (+ bias [n])`` -> ``[..., n]`` through oneDNN."""
    # The op reads the bias as if contiguous (a strided one gives wrong sums).
    bias = None if bias is None else bias.contiguous()
    flat = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return flat.view(*x.shape[:-1], weight.shape[0])


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` ->
    ``[..., out]``; through oneDNN where it takes the inputs (module docstring)."""
    if _onednn_takes(x, weight, bias):
        return _onednn_product(x, weight, bias)
    return F.linear(x, weight, bias)


def onednn_linear_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight``, a linear layer's input gradient: ``grad [..., out]``, ``weight
    [out, in]`` -> ``[..., in]``; through oneDNN (a transposed view of ``weight``, no copy)
    where it takes the inputs."""
    if _onednn_takes(grad, weight):
        return _onednn_product(grad, weight.t(), None)
    return grad @ weight
