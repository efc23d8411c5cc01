"""The two products of a linear layer, ``x W^T + b`` and ``dY W``, through oneDNN on the CPU, and
weights packed once for many products (oneDNN's layout in bfloat16, MKL's in float32 on Intel).

PyTorch multiplies float32 on the CPU with MKL's sgemm. On the 2-core AMD EPYC with AVX-512
that the benchmarks ran on, oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, which
PyTorch ships for the CPU code of ``torch.compile``) ran the training step's decoder products
1.1-1.3x faster at 128-1,920 rows, and ``dY W`` through a transposed view of ``W`` 1.5x
(docs/benchmarks.md). It computes the same float32 products, in another summation order. On an
Intel CPU ``dY W`` stays with MKL, which ran it faster there (``onednn_linear_input_grad``).

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
peak memory 84 MiB lower (2-core AMD EPYC with AVX-512 BF16, docs/benchmarks.md). In float32
the packed copy is extra (424 MB at that size): on that AMD EPYC, packed for oneDNN, it raised
the step's peak by 365 MiB (14%) for 1.3% of its time in the fifth session's measurement, and
oneDNN's plain products ran within 3-4% of their rates there. On an Intel CPU (``intel_cpu``)
float32 weights are packed with MKL's packed GEMM, which quietstar's native extension calls
directly (``torch.ops.quietstar.mkl_pack_weight`` and ``mkl_packed_linear_``, the MKL functions
PyTorch's own ``mkl::_mkl_linear`` calls): on a 2-core Intel Xeon (Cascade Lake), where each of
the sampling pass's products reads its weight from memory, oneDNN's plain linear ran those
128-row products at 128-174 GFLOP/s and MKL's packed one at 198-248 (the faster of two runs),
the sampling pass's products ran 1.2-1.7x faster with the packing included, five pairs of
training steps 1.01-1.12x, and the step's peak memory stayed at 2,780 MiB (docs/benchmarks.md).
``packed_linear`` writes such a product straight into rows the caller gives (``out``): the
sampling's products go into the projection record without a copy (at a batch of one; at larger
batches the record's rows are strided, and the RoPE and SwiGLU kernels copy what they read of
them). On that Xeon the recording sampling pass ran a median 1.04x faster (twelve pairs in one
process) and a process of three steps peaked 23 MiB lower (docs/benchmarks.md). MKL asks for
4-21x a weight's size for its packed copy and writes only about the weight's share, so those
copies are allocated past quietstar's CPU caching allocator (whose cache could hand such a block
to a tensor that fills it).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from quietstar.ops.backends import fast_half_matmul, intel_cpu, records_gradient
from quietstar.ops.cpu_caching_allocator import cpu_caching_allocator_bypassed
from quietstar.ops.native import native_unavailable

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
    # Not a view of ``flat`` (as matmul's result is not): a view keeps its base alive, and autograd
    # adds into a gradient in place only where nothing else holds its storage; as a view, two of
    # the three q/k/v input gradients of a layer were summed into new tensors.
    return torch.ops.aten._unsafe_view(flat, (*x.shape[:-1], weight.shape[0]))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x [..., in]``, ``weight [out, in]``, ``bias [out]`` ->
    ``[..., out]``; through oneDNN where it takes the inputs (module docstring)."""
    if _onednn_takes(x, weight, bias):
        return _onednn_product(x, weight, bias)
    return F.linear(x, weight, bias)


def onednn_linear_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight``, a linear layer's input gradient: ``grad [..., out]``, ``weight
    [out, in]`` -> ``[..., in]``; through oneDNN (a transposed view of ``weight``, no copy)
    where it takes the inputs, except on an Intel CPU (``intel_cpu``), where MKL's product,
    which reads ``weight`` as it is, ran faster: 228 against 166 GFLOP/s for the down
    projection's 1,920 rows on a 2-core Intel Xeon, and five pairs of training steps 1.02-1.07x
    faster (docs/benchmarks.md)."""
    if _onednn_takes(grad, weight) and not intel_cpu():
        return _onednn_product(grad, weight.t(), None)
    return grad @ weight


class PackedWeight(NamedTuple):
    """A linear weight ``[out, in]`` packed for products in ``dtype`` (``pack_weight``): in
    oneDNN's blocked layout (bfloat16), or in MKL's packed layout (float32, ``mkl``); only
    ``packed_linear`` reads it."""

    tensor: torch.Tensor
    dtype: torch.dtype
    out_features: int
    mkl: bool = False  # MKL's layout (quietstar's native op packed it), else oneDNN's


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


def _mkl_packing_computes_right() -> bool:
    """A weight packed by MKL for one row count multiplies right at fewer and more rows, with and
    without a bias, at sizes past MKL's small-matrix path, into a fresh result and into rows of a
    larger tensor. ``packed_linear`` relies on it (MKL's documentation neither promises nor rules
    out that a packed B serves any row count; the packed copy's size does not depend on it)."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(192, 160, generator=generator), torch.randn(192, generator=generator)
    packed = pack_weight(weight, torch.float32, 32)
    for rows in (1, 31, 200):
        x = torch.randn(rows, 160, generator=generator)
        into = torch.zeros(rows + 2, 200)[1 : rows + 1, 4:196]
        for b in (None, bias):
            expected = F.linear(x, weight, b)
            if not torch.allclose(packed_linear(x, packed, b), expected, rtol=1e-4, atol=1e-4):
                return False
            if not torch.allclose(packed_linear(x, packed, b, out=into), expected, rtol=1e-4, atol=1e-4):
                return False
    return True


@functools.lru_cache(maxsize=None)
def mkl_packing_available() -> bool:
    """Whether float32 weights can be packed with MKL's packed GEMM: quietstar's native
    extension is loaded and this torch exports MKL's packed GEMM (x86 builds with MKL),
    ``QUIETSTAR_NO_ONEDNN`` is not ``1`` (it keeps every product PyTorch's own, unpacked), and a
    packed weight multiplies right at other row counts than it was packed for
    (``_mkl_packing_computes_right``). The first call logs why not."""
    if os.environ.get(NO_ONEDNN_ENV_VAR) == "1":
        reason = f"{NO_ONEDNN_ENV_VAR}=1"
    elif native_unavailable() is not None:
        reason = f"quietstar's native kernels are unavailable ({native_unavailable()})"
    elif not torch.ops.quietstar.mkl_packed_gemm_available():
        reason = "this torch does not export MKL's packed GEMM"
    else:
        reason = _first_use_failure(lambda *_: _mkl_packing_computes_right(), "MKL packed products")
        if reason is None:
            return True
    logger.info("float32 linear weights are not packed for MKL: %s", reason)
    return False


def packed_product_dtype(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.dtype | None:
    """The dtype a packed ``weight`` would multiply ``x`` in, or None where packing does not
    apply. Never where autograd would record the product, and only for CPU tensors of rows:
    bfloat16 under CPU bfloat16 autocast (what autocast's ``linear`` multiplies in) on a CPU that
    multiplies it natively, with oneDNN's packing available; float32 without autocast on an Intel
    CPU, with MKL's (the module docstring says why not elsewhere)."""
    if x.device.type != "cpu" or x.numel() == 0 or records_gradient(x, weight, bias):
        return None
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") != torch.bfloat16 or weight.dtype not in (torch.float32, torch.bfloat16):
            return None
        native = fast_half_matmul(torch.bfloat16, x.device) and onednn_packing_available()  # which checks linear's too
        return torch.bfloat16 if native else None
    if x.dtype == weight.dtype == torch.float32 and intel_cpu() and mkl_packing_available():
        return torch.float32
    return None


def pack_weight(weight: torch.Tensor, dtype: torch.dtype, rows: int) -> PackedWeight:
    """``weight [out, in]`` packed for products in ``dtype`` of about ``rows`` rows
    (``packed_product_dtype`` says which dtype; any row count multiplies right, for MKL as
    ``mkl_packing_available`` checks): cast to bfloat16 and packed for oneDNN, or float32 packed
    for MKL (past the CPU caching allocator: the module docstring says why)."""
    with torch.no_grad():
        weight = weight.detach()
        if dtype == torch.float32:
            with cpu_caching_allocator_bypassed():
                packed = torch.ops.quietstar.mkl_pack_weight(weight, max(rows, 1))
            return PackedWeight(packed, dtype, weight.shape[0], mkl=True)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype), rows)
    return PackedWeight(packed, dtype, weight.shape[0])


def packed_linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` from the packed weight: ``x [..., in]`` (cast to the packed
    dtype) -> ``[..., out]`` in that dtype, written into ``out`` when given (``x``'s leading
    shape and ``out_features``, the packed dtype, contiguous rows: rows of a larger tensor, say;
    MKL's products are written there directly) and then ``out`` itself. No autograd."""
    bias = None if bias is None else bias.detach().to(packed.dtype).contiguous()  # read as contiguous
    if out is not None and (out.shape != (*x.shape[:-1], packed.out_features) or out.dtype != packed.dtype):
        raise ValueError(
            f"out must have shape {(*x.shape[:-1], packed.out_features)} and dtype {packed.dtype}, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    x = x.to(packed.dtype)
    if packed.mkl:
        result = x.new_empty(*x.shape[:-1], packed.out_features) if out is None else out
        staged = None  # a contiguous buffer for a given out whose rows do not flatten to 2-D
        if x.dim() in (2, 3):  # what the op takes
            rows, into = x, result
        else:  # flattened to 2-D (the row count given: -1 is ambiguous for 0 features)
            count = math.prod(x.shape[:-1])
            rows = x.reshape(count, x.shape[-1])
            if result.is_contiguous():
                into = result.view(count, packed.out_features)
            else:
                into = staged = x.new_empty(count, packed.out_features)
        torch.ops.quietstar.mkl_packed_linear_(rows, packed.tensor, packed.out_features, into)
        if staged is not None:
            result.copy_(staged.view(result.shape))
        torch.autograd.graph.increment_version(result)  # the native op's write, as autograd should see it
        return result.add_(bias) if bias is not None else result
    flat = x.reshape(-1, x.shape[-1])
    product = torch.ops.mkldnn._linear_pointwise(flat, packed.tensor, bias, "none", [], "")
    product = torch.ops.aten._unsafe_view(product, (*x.shape[:-1], packed.out_features))  # as _onednn_product
    return product if out is None else out.copy_(product)
