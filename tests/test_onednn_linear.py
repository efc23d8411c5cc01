"""``onednn_linear`` and ``onednn_linear_input_grad``: PyTorch's products, through oneDNN where it
takes the inputs, and PyTorch's own everywhere else."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import count_onednn_products, relative_error

import quietstar.ops.onednn_linear as onednn_module
from quietstar.ops.backends import fast_half_matmul
from quietstar.ops.onednn_linear import (
    NO_ONEDNN_ENV_VAR,
    PackedWeight,
    mkl_packing_available,
    onednn_linear,
    onednn_linear_available,
    onednn_linear_input_grad,
    onednn_packing_available,
    pack_weight,
    packed_linear,
    packed_product_dtype,
)

requires_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear op")
requires_packing = pytest.mark.skipif(not onednn_packing_available(), reason="this torch cannot pack weights for oneDNN")
requires_mkl_packing = pytest.mark.skipif(not mkl_packing_available(), reason="the native MKL packed GEMM is unavailable here")
_REAL_PRODUCT = onednn_module._onednn_product
_REAL_PACKED_LINEAR = onednn_module.packed_linear


@pytest.fixture
def rechecked_availability():
    """``onednn_linear_available`` asked afresh inside the test, and afterwards settled again
    with the real op (so later tests' counters never see the first-use check)."""
    onednn_linear_available.cache_clear()
    onednn_packing_available.cache_clear()
    mkl_packing_available.cache_clear()
    yield onednn_linear_available
    onednn_linear_available.cache_clear()
    onednn_packing_available.cache_clear()
    mkl_packing_available.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onednn_module, "_onednn_product", _REAL_PRODUCT)
        patch.setattr(onednn_module, "packed_linear", _REAL_PACKED_LINEAR)
        patch.delenv(NO_ONEDNN_ENV_VAR, raising=False)
        onednn_linear_available()
        onednn_packing_available()
        mkl_packing_available()


def test_onednn_linear_is_available_wherever_torch_has_the_op(monkeypatch, rechecked_availability):
    """The skips below are only for a torch without the op: one whose op fails the first-use
    check fails here instead of skipping."""
    monkeypatch.delenv(NO_ONEDNN_ENV_VAR, raising=False)
    has_op = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert rechecked_availability() == has_op


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes of the products that went through oneDNN."""
    return count_onednn_products(monkeypatch)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@requires_onednn
@pytest.mark.parametrize("bias", ["none", "contiguous", "strided"])
def test_onednn_linear_equals_torch_linear_through_onednn(bias, onednn_calls):
    x = randn(2, 9, 40, seed=1)[:, 2:]  # not contiguous: [2, 7, 40]
    weight = randn(24, 40, seed=2)
    b = {"none": None, "contiguous": randn(24, seed=3), "strided": randn(48, seed=3)[::2]}[bias]
    out = onednn_linear(x, weight, b)
    assert out.shape == (2, 7, 24) and out.dtype == torch.float32
    assert relative_error(out, F.linear(x.double(), weight.double(), None if b is None else b.double())) <= 1e-6
    assert onednn_calls == [(2, 7, 40)]


@requires_onednn
@pytest.mark.parametrize("intel", [False, True])
def test_onednn_input_grad_equals_grad_times_weight_through_onednn_except_on_intel(monkeypatch, onednn_calls, intel):
    monkeypatch.setattr(onednn_module, "intel_cpu", lambda: intel)
    grad, weight = randn(3, 5, 24, seed=4), randn(24, 40, seed=5)
    out = onednn_linear_input_grad(grad, weight)
    assert out.shape == (3, 5, 40)
    assert relative_error(out, grad.double() @ weight.double()) <= 1e-6
    assert onednn_calls == ([] if intel else [(3, 5, 24)])  # MKL's product on an Intel CPU


@requires_onednn
def test_onednn_input_grad_holds_its_storage_alone_so_autograd_can_add_into_it_in_place(monkeypatch, onednn_calls):
    """Autograd sums the input gradients of linears that share an input (q, k, v) in place only
    where nothing else holds the first one's storage: a view would keep its base alive."""
    monkeypatch.setattr(onednn_module, "intel_cpu", lambda: False)
    out = onednn_linear_input_grad(randn(2, 5, 24, seed=9), randn(24, 40, seed=10))
    assert onednn_calls == [(2, 5, 24)] and out._base is None and out.shape == (2, 5, 40)


def test_onednn_linear_is_torch_linear_where_a_gradient_is_needed(onednn_calls):
    x, weight = randn(4, 16, seed=6).requires_grad_(), randn(8, 16, seed=7).requires_grad_()
    out = onednn_linear(x, weight)
    assert out.grad_fn is not None and onednn_calls == []
    grad_x, grad_w = torch.autograd.grad(out.sum(), (x, weight))
    torch.testing.assert_close(grad_x, torch.ones(4, 8) @ weight.detach())
    torch.testing.assert_close(grad_w, torch.ones(4, 8).T @ x.detach())
    bias = randn(8, seed=8).requires_grad_()
    assert onednn_linear(x.detach(), weight.detach(), bias).grad_fn is not None and onednn_calls == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_onednn_linear_leaves_other_dtypes_to_torch(dtype, onednn_calls):
    x, weight = randn(4, 16, seed=9, dtype=dtype), randn(8, 16, seed=10, dtype=dtype)
    torch.testing.assert_close(onednn_linear(x, weight), F.linear(x, weight))
    torch.testing.assert_close(onednn_linear_input_grad(x[:, :8], weight), x[:, :8] @ weight)
    assert onednn_calls == []


def test_onednn_linear_under_autocast_multiplies_in_the_autocast_dtype(onednn_calls):
    x, weight = randn(4, 16, seed=11), randn(8, 16, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = onednn_linear(x, weight)
    assert out.dtype == torch.bfloat16 and onednn_calls == []


def test_onednn_linear_takes_no_rows(onednn_calls):
    out = onednn_linear(torch.empty(0, 16), randn(8, 16, seed=13))
    assert out.shape == (0, 8) and onednn_calls == []


def test_onednn_linear_is_off_with_the_environment_variable(monkeypatch, onednn_calls, rechecked_availability):
    monkeypatch.setenv(NO_ONEDNN_ENV_VAR, "1")
    assert not rechecked_availability()
    assert not mkl_packing_available()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_product_dtype(randn(4, 16), randn(8, 16)) is None  # no packing either
    assert packed_product_dtype(randn(4, 16), randn(8, 16)) is None
    x, weight = randn(4, 16, seed=14), randn(8, 16, seed=15)
    torch.testing.assert_close(onednn_linear(x, weight), F.linear(x, weight))
    assert onednn_calls == []


def test_a_onednn_op_that_computes_wrong_is_not_used(monkeypatch, caplog, rechecked_availability):
    monkeypatch.setattr(onednn_module, "_onednn_product", lambda x, weight, bias: torch.zeros(x.shape[0], weight.shape[0]))
    with caplog.at_level("INFO", logger="quietstar.ops.onednn_linear"):
        assert not rechecked_availability()
    assert "PyTorch's own linear" in caplog.text
    x, weight = randn(4, 16, seed=16), randn(8, 16, seed=17)
    torch.testing.assert_close(onednn_linear(x, weight), F.linear(x, weight))


def packed_float32(weight: torch.Tensor, rows: int, layout: str) -> PackedWeight:
    """``weight`` packed in float32 for MKL (``pack_weight``) or in oneDNN's layout (as
    ``onednn_packing_available`` packs it: the oneDNN branch of ``packed_linear`` on every CPU,
    where ``pack_weight`` packs for oneDNN only in bfloat16)."""
    if layout == "mkl":
        return pack_weight(weight, torch.float32, rows)
    return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight, rows), torch.float32, weight.shape[0])


@pytest.mark.parametrize("layout", ["onednn", "mkl"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_weight_multiplies_as_torch_linear_in_either_layout(bias, layout):
    if not (mkl_packing_available() if layout == "mkl" else onednn_packing_available()):
        pytest.skip(f"this torch cannot pack weights for {layout}")
    x, weight = randn(2, 7, 40, seed=18), randn(24, 40, seed=19)
    b = randn(24, seed=20) if bias else None
    packed = packed_float32(weight, 14, layout)
    assert packed.mkl == (layout == "mkl") and packed.tensor.is_mkldnn != packed.mkl
    for rows in (x, x[:1, :3], x[:, 0]):
        out = packed_linear(rows, packed, b)
        assert out.shape == (*rows.shape[:-1], 24) and out.dtype == torch.float32
        assert out._base is None  # holds its storage alone, as _onednn_product's result
        assert relative_error(out, F.linear(rows, weight, b)) <= 1e-6


@pytest.mark.parametrize("layout", ["onednn", "mkl"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_product_is_written_into_the_rows_it_is_given(bias, layout):
    """``out``: rows of a larger tensor (row stride past the output's width); nothing around them
    changes, and ``out`` itself is returned."""
    if not (mkl_packing_available() if layout == "mkl" else onednn_packing_available()):
        pytest.skip(f"this torch cannot pack weights for {layout}")
    x, weight = randn(2, 5, 40, seed=31), randn(24, 40, seed=32)
    b = randn(24, seed=33) if bias else None
    packed = packed_float32(weight, 5, layout)
    larger = torch.zeros(2, 9, 30)
    out = larger[:, 2:7, 3:27]
    version = out._version
    assert packed_linear(x, packed, b, out=out) is out
    assert out._version > version  # autograd sees the write (a tensor saved before it is then refused)
    assert relative_error(out, F.linear(x, weight, b)) <= 1e-6
    out.zero_()
    assert torch.count_nonzero(larger) == 0  # nothing written outside out


@pytest.mark.parametrize("shape,dtype", [((2, 5, 23), torch.float32), ((2, 4, 24), torch.float32), ((2, 5, 24), torch.float64)])
def test_packed_linear_refuses_an_out_of_another_shape_or_dtype(shape, dtype):
    if not (mkl_packing_available() or onednn_packing_available()):
        pytest.skip("this torch cannot pack weights")
    packed = packed_float32(randn(24, 40, seed=34), 5, "mkl" if mkl_packing_available() else "onednn")
    with pytest.raises(ValueError, match=r"out must have shape \(2, 5, 24\) and dtype torch.float32"):
        packed_linear(randn(2, 5, 40), packed, out=torch.zeros(shape, dtype=dtype))


@requires_mkl_packing
def test_the_native_mkl_product_refuses_a_packed_copy_of_another_weights_shape():
    """MKL would read past a packed copy smaller than the weight it is told of."""
    packed = pack_weight(randn(24, 40, seed=35), torch.float32, 5)
    with pytest.raises(RuntimeError, match=r"packed must be mkl_pack_weight's copy of a \[96, 40\] weight"):
        torch.ops.quietstar.mkl_packed_linear_(randn(5, 40), packed.tensor, 96, torch.empty(5, 96))
    with pytest.raises(RuntimeError, match="out's rows must be contiguous"):
        torch.ops.quietstar.mkl_packed_linear_(randn(5, 40), packed.tensor, 24, torch.empty(24, 5).t())


@requires_mkl_packing
def test_mkl_multiplies_inputs_and_weights_whose_rows_overlap_or_are_strided():
    """Expanded (stride 0) or strided rows are copied where MKL could not read them as they are."""
    weight = randn(1, 40, seed=36).expand(24, 40)
    packed = pack_weight(weight, torch.float32, 8)
    for x in (randn(1, 40, seed=37).expand(8, 40), randn(1, 1, 40, seed=38).expand(2, 8, 40), randn(40, 8, seed=39).t(),
              randn(2, 8, 80, seed=40)[..., ::2]):
        assert relative_error(packed_linear(x, packed), F.linear(x, weight)) <= 1e-6


@requires_mkl_packing
def test_mkl_multiplies_inputs_of_other_ranks_into_rows_of_a_larger_tensor_and_without_features():
    """x of one or four dimensions is flattened for the op: its product still lands in out's
    rows of a larger tensor, and a product over no input features (or into none) is F.linear's."""
    weight = randn(8, 16, seed=43)
    packed = pack_weight(weight, torch.float32, 6)
    x = randn(2, 1, 3, 16, seed=44)
    larger = torch.full((2, 1, 5, 8), float("nan"))
    assert packed_linear(x, packed, out=larger[:, :, 1:4]).data_ptr() == larger[:, :, 1:4].data_ptr()
    assert relative_error(larger[:, :, 1:4], F.linear(x, weight)) <= 1e-6
    assert larger[:, :, [0, 4]].isnan().all()  # nothing written around the rows
    for out_features, in_features, shape in ((5, 0, (0,)), (5, 0, (3, 0)), (5, 0, (1, 2, 3, 0)), (0, 4, (4,)), (5, 4, (2, 0, 3, 4))):
        weight = randn(out_features, in_features, seed=45)
        x = randn(*shape, seed=46)
        assert torch.equal(packed_linear(x, pack_weight(weight, torch.float32, 3)), F.linear(x, weight))


@requires_mkl_packing
def test_mkl_refuses_an_out_whose_rows_overlap_or_that_overlaps_x():
    packed = pack_weight(randn(24, 40, seed=41), torch.float32, 8)
    storage = torch.zeros(2000)
    for overlapping in (storage[:24].expand(8, 24), storage.as_strided((2, 8, 24), (24, 24, 1))):
        with pytest.raises(RuntimeError, match="out's rows must be contiguous and must not overlap each other"):
            packed_linear(randn(*overlapping.shape[:-1], 40), packed, out=overlapping)
    rows = randn(2, 8, 64, seed=42)
    with pytest.raises(RuntimeError, match="out must not overlap x"):
        packed_linear(rows[..., :40], packed, out=rows[..., :24])


@requires_mkl_packing
@pytest.mark.parametrize("out_features,in_features", [(1536, 576), (576, 1536), (192, 576)])
def test_a_weight_packed_for_mkl_at_one_row_count_multiplies_right_at_any_other(out_features, in_features):
    """SmolLM2-135M's projection shapes, packed as the sampling's first call packs them (256 rows)
    and multiplied at the row counts of its chain steps, the tree's remaining rows and beyond."""
    weight, bias = randn(out_features, in_features, seed=29), randn(out_features, seed=30)
    packed = pack_weight(weight, torch.float32, 256)
    for rows in (1, 128, 256, 640, 1920):
        x = randn(rows, in_features, seed=rows)
        for b in (None, bias):
            expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
            assert relative_error(packed_linear(x, packed, b), expected) <= 1e-6, (rows, b is None)


@requires_mkl_packing
def test_mkl_packed_copies_are_not_held_by_the_cpu_caching_allocator():
    """MKL asks for several times a weight's size and writes only its share; a cached block of
    that size could be handed to a tensor that fills it."""
    from quietstar.ops.cpu_caching_allocator import cpu_caching_allocator, cpu_caching_allocator_stats

    weight = randn(512, 256, seed=26)
    with cpu_caching_allocator() as enabled:
        if not enabled:
            pytest.skip("the CPU caching allocator is not built")
        before = cpu_caching_allocator_stats()
        unbypassed = torch.ops.quietstar.mkl_pack_weight(weight, 8)  # the same copy, unbypassed
        assert cpu_caching_allocator_stats().live_bytes > before.live_bytes  # the allocator serves it
        del unbypassed
        before = cpu_caching_allocator_stats()
        packed = pack_weight(weight, torch.float32, 8)
        during = cpu_caching_allocator_stats()
        del packed
        after = cpu_caching_allocator_stats()
    assert during.live_bytes == before.live_bytes and after.cached_bytes == before.cached_bytes


@requires_packing
@pytest.mark.skipif(not fast_half_matmul(torch.bfloat16, torch.device("cpu")), reason="this CPU does not multiply bfloat16 natively")
def test_under_bfloat16_autocast_a_weight_packs_in_bfloat16_and_multiplies_as_autocasts_linear():
    x, weight, b = randn(2, 7, 40, seed=21), randn(24, 40, seed=22), randn(24, seed=23)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        dtype = packed_product_dtype(x, weight, b)
        out = packed_linear(x, pack_weight(weight, dtype, 14), b)
        expected = F.linear(x, weight, b)
    assert dtype == out.dtype == expected.dtype == torch.bfloat16
    assert relative_error(out.float(), expected.float()) <= 1e-2


def test_packing_applies_to_bfloat16_autocast_products_without_a_gradient_to_record():
    x, weight = randn(3, 8, seed=24), randn(4, 8, seed=25).requires_grad_()
    native = onednn_packing_available() and fast_half_matmul(torch.bfloat16, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_product_dtype(x, weight) is None  # autograd would record this product
    with torch.no_grad():
        float32_packs = onednn_module.intel_cpu() and mkl_packing_available()
        assert packed_product_dtype(x, weight) == (torch.float32 if float32_packs else None)  # MKL's, on Intel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert packed_product_dtype(x, weight) == (torch.bfloat16 if native else None)
            assert packed_product_dtype(x[:0], weight) is None
            assert packed_product_dtype(x.double(), weight.double()) is None
        with torch.autocast("cpu", dtype=torch.float16):
            assert packed_product_dtype(x, weight) is None


@requires_packing
def test_packed_products_that_compute_wrong_are_not_used(monkeypatch, caplog, rechecked_availability):
    monkeypatch.setattr(onednn_module, "packed_linear", lambda x, packed, bias=None: torch.zeros(x.shape[0], packed.out_features))
    with caplog.at_level("INFO", logger="quietstar.ops.onednn_linear"):
        assert rechecked_availability() and not onednn_packing_available()
    assert "not packed for oneDNN: its packed products computed a wrong result" in caplog.text
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_product_dtype(randn(4, 16), randn(8, 16)) is None


@requires_mkl_packing
def test_mkl_packed_products_that_compute_wrong_are_not_used(monkeypatch, caplog, rechecked_availability):
    real = onednn_module.packed_linear
    # right at the row count packed for, wrong at any other: what mkl_packing_available checks
    monkeypatch.setattr(
        onednn_module, "packed_linear", lambda x, packed, bias=None, out=None: real(x, packed, bias, out=out).mul_(1 if x.shape[0] == 32 else 0)
    )
    monkeypatch.setattr(onednn_module, "intel_cpu", lambda: True)
    with caplog.at_level("INFO", logger="quietstar.ops.onednn_linear"):
        assert not mkl_packing_available()
    assert "not packed for MKL: its MKL packed products computed a wrong result" in caplog.text
    with torch.no_grad():
        assert packed_product_dtype(randn(4, 16), randn(8, 16)) is None


@pytest.mark.parametrize("intel", [False, True])
def test_float32_packs_for_mkl_on_an_intel_cpu_only(monkeypatch, intel):
    """Without autocast and without a gradient to record, a float32 product packs where the CPU is
    Intel's (MKL's packed GEMM) and the native MKL packed GEMM is there; nowhere else (the module docstring)."""
    if intel and not mkl_packing_available():
        pytest.skip("the native MKL packed GEMM is unavailable here")
    monkeypatch.setattr(onednn_module, "intel_cpu", lambda: intel)
    x, weight = randn(3, 8, seed=27), randn(4, 8, seed=28)
    expected = torch.float32 if intel else None
    assert packed_product_dtype(x, weight) == expected
    assert packed_product_dtype(x, weight.requires_grad_()) is None  # autograd would record it
    with torch.no_grad():
        assert packed_product_dtype(x, weight) == expected
        assert packed_product_dtype(x[:0], weight) is None
        assert packed_product_dtype(x.double(), weight.double()) is None
        assert packed_product_dtype(x.half(), weight.half()) is None
