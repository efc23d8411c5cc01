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

A weight that multiplies many times between two changes (the decoder's, over the thought
sampling's base pass and chain steps) can be packed once into oneDNN's blocked layout
(``pack_weight``) and multiplied from there (``packed_linear``): oneDNN otherwise reorders the
plain weight at every product. That is done under CPU bfloat16 autocast, where the packed
bfloat16 copy takes the place of the cast copy autocast would keep: the 30 layers' seven
projections of SmolLM2-135M ran 1.12x faster at 128 rows and 1.08x at 640, against about 60 ms
to cast and pack them all, and the bfloat16 training step's sampling pass 1.04x faster, its
peak memory 84 MiB lower (2-core AMD EPYC with AVX-512 BF16, docs/benchmarks.md). Not in
float32: there the packed copy is extra (424 MB at that size), and it raised the step's peak
by 365 MiB (14%) for 1.3% of its time.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from quietstar.ops.backends import fast_half_matmul, records_gradient

NO_ONEDNN_ENV_VAR = "QUIETSTAR_NO_ONEDNN"

logger = logging.getLogger(__name__)


def _first_use_failure(computes_right: Callable[..., bool], op: str) -> str | None:
    """Why ``op`` (internal to PyTorch: a version may change it) is not to be used, or None:
    ``computes_right(x [2, 3], weight [4, 3], bias [4])`` must hold on a small product, with no
    autograd or autocast."""
    x, weight, bias = torch.arange(6.0).view(2, 3), torch.arange(12.0).view(4, 3) / 8, torch.arange(4.0)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):
            if computes_right(x, weight, bias):
                return None
        return f"its {op} computed a wrong result"
    except RuntimeError as error:
        return f"its {op} failed ({error})"


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
        reason = _first_use_failure(
            lambda x, weight, bias: torch.allclose(_onednn_product(x, weight, bias), F.linear(x, weight, bias))
            and torch.allclose(_onednn_product(x, weight.t().contiguous().t(), None), x @ weight.T),  # a transposed view
            "oneDNN linear op",
        )
        if reason is None:
            return True
    logger.info("float32 CPU products stay with PyTorch's own linear: %s", reason)
    return False


def _onednn_takes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """float32 CPU tensors with rows, no autocast and no gradient to record."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not records_gradient(x, weight, bias)
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


class PackedWeight(NamedTuple):
    """A linear weight ``[out, in]`` in oneDNN's blocked layout for products in ``dtype``
    (``pack_weight``); only ``packed_linear`` reads it."""

    tensor: torch.Tensor
    dtype: torch.dtype
    out_features: int


@functools.lru_cache(maxsize=None)
def onednn_packing_available() -> bool:
    """Whether weights can be packed: ``onednn_linear_available``, this torch has oneDNN's
    reorder op, and a small packed product computes right. The first call logs why not."""
    if not onednn_linear_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        reason = "this torch has no oneDNN weight reorder op"
    else:

        def computes_right(x, weight, bias):
            packed = PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight, 2), torch.float32, 4)
            return torch.allclose(packed_linear(x, packed, bias), F.linear(x, weight, bias))

        reason = _first_use_failure(computes_right, "packed products")
        if reason is None:
            return True
    logger.info("linear weights are not packed for oneDNN: %s", reason)
    return False


def packed_product_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.dtype | None:
    """The dtype a packed ``weight`` would multiply ``x`` in, or None where packing does not
    apply: bfloat16 under CPU bfloat16 autocast (what autocast's ``linear`` multiplies in) on a
    CPU that multiplies it natively, oneDNN's linear available, and no gradient to record (the
    module docstring says why not float32)."""
    if not (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return None
    if x.device.type != "cpu" or x.numel() == 0 or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if records_gradient(x, weight, bias):
        return None
    native = fast_half_matmul(torch.bfloat16, x.device) and onednn_packing_available()  # which checks linear's too
    return torch.bfloat16 if native else None


def pack_weight(weight: torch.Tensor, dtype: torch.dtype, rows: int) -> PackedWeight:
    """``weight [out, in]`` cast to ``dtype`` and packed for products of about ``rows`` rows
    (``packed_product_dtype`` says which dtype; any row count multiplies right)."""
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), rows)
    return PackedWeight(packed, dtype, weight.shape[0])


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` from the packed weight: ``x [..., in]`` (cast to the packed
    dtype) -> ``[..., out]`` in that dtype. No autograd."""
    bias = None if bias is None else bias.detach().to(packed.dtype).contiguous()  # read as contiguous
    flat = x.reshape(-1, x.shape[-1]).to(packed.dtype)
    out = torch.ops.mkldnn._linear_pointwise(flat, packed.tensor, bias, "none", [], "")
    return out.view(*x.shape[:-1], packed.out_features)
