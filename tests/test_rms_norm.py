"""``rms_norm``: the native kernels against the Llama family's own arithmetic, and its errors."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from helpers import DEVICE, relative_error, requires_native, requires_triton
from quietstar.ops.rms_norm import rms_norm


def forward_backward(x, weight, grad, backend):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = rms_norm(x, weight, 1e-5, backend=backend)
    out.backward(grad)
    return out, x.grad, weight.grad


KERNELS = [pytest.param("native", marks=requires_native), pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(1, 7, 576), (2, 3, 37), (5, 16), (1, 1, 8)])
def test_rms_norm_kernels_equal_the_llama_arithmetic_forward_and_backward(backend, shape, poisoned_allocations):
    # On DEVICE: the native kernels run where it is the CPU, the Triton ones on a GPU or in the
    # Triton interpreter.
    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=generator)).to(DEVICE)
    weight, grad = torch.randn(shape[-1], generator=generator).to(DEVICE), torch.randn(shape, generator=generator).to(DEVICE)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(weight)
    x_ref = x.clone().requires_grad_()
    expected = norm(x_ref)
    expected.backward(grad)
    out, d_x, d_weight = forward_backward(x, weight, grad, backend)
    assert out.grad_fn.name() == f"RMSNorm{backend.capitalize()}Backward"
    assert relative_error(out, expected) < 1e-6
    assert relative_error(d_x, x_ref.grad) < 1e-5
    assert relative_error(d_weight, norm.weight.grad) < 1e-5


@requires_native
def test_native_rms_norm_sums_the_weight_gradient_over_every_worker_rows():
    # More rows than threads and not a multiple of them: each worker's sums must all be added.
    generator = torch.Generator().manual_seed(1)
    x, grad = torch.randn(11, 24, generator=generator), torch.randn(11, 24, generator=generator)
    weight = torch.randn(24, generator=generator)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            _, _, d_weight = forward_backward(x, weight, grad, "native")
            _, _, expected = forward_backward(x, weight, grad, "torch")
            assert relative_error(d_weight, expected) < 1e-6, count
    finally:
        torch.set_num_threads(threads)


@requires_native
def test_rms_norm_runs_native_for_float32_on_the_cpu_and_torch_otherwise():
    x, weight = torch.randn(4, 8), torch.randn(8)
    assert rms_norm(x.requires_grad_(), weight, 1e-6).grad_fn.name() == "RMSNormNativeBackward"
    assert rms_norm(x, weight, 1e-6, backend="torch").grad_fn.name() != "RMSNormNativeBackward"
    double = rms_norm(x.double(), weight.double(), 1e-6)  # no native float64: the composition
    torch.testing.assert_close(double.float(), rms_norm(x, weight, 1e-6), rtol=1e-5, atol=1e-6)


@requires_native
def test_native_rms_norm_rounds_once_to_the_out_dtype_and_takes_its_gradient():
    generator = torch.Generator().manual_seed(2)
    x, weight = torch.randn(6, 40, generator=generator), torch.randn(40, generator=generator)
    grad = torch.randn(6, 40, generator=generator).bfloat16()
    results = []
    for backend in ("native", "torch"):
        x_, weight_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = rms_norm(x_, weight_, 1e-6, out_dtype=torch.bfloat16, backend=backend)
        out.backward(grad)
        results.append((out, x_.grad, weight_.grad))
    (out, d_x, d_weight), (expected, expected_x, expected_weight) = results
    assert out.dtype == torch.bfloat16 and d_x.dtype == d_weight.dtype == torch.float32
    assert (out.float() - expected.float()).abs().max() <= expected.float().abs().max() * 2**-8
    assert relative_error(d_x, expected_x) < 1e-5 and relative_error(d_weight, expected_weight) < 1e-5


@requires_native
def test_native_rms_norm_propagates_nan():
    x = torch.randn(2, 20)
    x[1, 3] = float("nan")
    out = rms_norm(x, torch.ones(20), 1e-6, backend="native")
    assert out[1].isnan().all() and out[0].isfinite().all()


@pytest.mark.parametrize(
    "x, weight, eps, backend, message",
    [
        (torch.randn(3, 4), torch.randn(5), 1e-6, None, "weight must be \\[d\\]"),
        (torch.randn(3, 4), torch.randn(4), -1.0, None, "eps must be a finite number >= 0"),
        (torch.randn(3, 4), torch.randn(4), float("nan"), None, "eps must be"),
        (torch.randn(3, 4).long(), torch.randn(4), 1e-6, None, "x must have dtype"),
        (torch.tensor(1.0), torch.randn(1), 1e-6, None, "x must have at least one dimension"),
    ],
)
def test_rms_norm_rejects_bad_input_naming_the_argument(x, weight, eps, backend, message):
    with pytest.raises(ValueError, match=message):
        rms_norm(x, weight, eps, backend=backend)


def test_rms_norm_rejects_an_out_dtype_that_is_not_floating_point():
    with pytest.raises(ValueError, match="out_dtype must be a floating-point torch.dtype"):
        rms_norm(torch.randn(3, 4), torch.randn(4), 1e-6, out_dtype=torch.long)


@requires_native
def test_rms_norm_native_backend_rejects_what_it_does_not_take():
    with pytest.raises(ValueError, match="backend='native' takes float32 x and weight"):
        rms_norm(torch.randn(3, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), 1e-6, backend="native")
