"""``swiglu``: the native kernels against ``silu(gate) * up``, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import relative_error, requires_native
from quietstar.ops.swiglu import swiglu


def forward_backward(gate, up, grad, backend):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu(gate, up, backend=backend)
    out.backward(grad)
    return out, gate.grad, up.grad


@requires_native
@pytest.mark.parametrize("shape", [(1, 7, 1536), (3, 37), (2, 5), (1, 1, 16)])
def test_native_swiglu_equals_silu_times_up_forward_and_backward(shape):
    generator = torch.Generator().manual_seed(0)
    gate, up, grad = (4 * torch.randn(shape, generator=generator) for _ in range(3))
    out, d_gate, d_up = forward_backward(gate, up, grad, "native")
    expected, expected_gate, expected_up = forward_backward(gate, up, grad, "torch")
    assert out.grad_fn.name() == "SwiGLUNativeBackward"
    assert relative_error(out, expected) < 1e-6
    assert relative_error(d_gate, expected_gate) < 1e-6
    assert relative_error(d_up, expected_up) < 1e-6


@requires_native
def test_native_swiglu_in_bfloat16_is_the_float32_result_rounded_once():
    generator = torch.Generator().manual_seed(1)
    gate, up, grad = (torch.randn(9, 45, generator=generator).bfloat16() for _ in range(3))
    out, d_gate, d_up = forward_backward(gate, up, grad, "native")
    assert out.dtype == d_gate.dtype == d_up.dtype == torch.bfloat16
    expected, expected_gate, expected_up = forward_backward(gate.float(), up.float(), grad.float(), "torch")
    for actual, exact in ((out, expected), (d_gate, expected_gate), (d_up, expected_up)):
        # Rounding to nearest: at most half a bfloat16 step (2^-8 relative) from the float32 value.
        assert ((actual.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-30).all()


@requires_native
def test_native_swiglu_keeps_large_gates_and_nan():
    gate = torch.tensor([-100.0, -20.0, 0.0, 20.0, 100.0, float("nan")] + [1.0] * 12)
    up = torch.full_like(gate, 2.0)
    out = swiglu(gate, up, backend="native")
    torch.testing.assert_close(out[:5], F.silu(gate[:5]) * up[:5], rtol=1e-6, atol=1e-30)
    assert out[5].isnan() and out[6:].isfinite().all()


@requires_native
def test_swiglu_runs_native_for_float32_and_bfloat16_and_torch_otherwise():
    gate, up = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    assert swiglu(gate, up).grad_fn.name() == "SwiGLUNativeBackward"
    assert swiglu(gate.bfloat16(), up.bfloat16()).grad_fn.name() == "SwiGLUNativeBackward"
    assert swiglu(gate, up, backend="torch").grad_fn.name() != "SwiGLUNativeBackward"
    assert swiglu(gate, up.bfloat16()).dtype == torch.float32  # mixed dtypes: the composition promotes
    with pytest.raises(ValueError, match="backend='native' takes gate and up of one shape"):
        swiglu(gate.double(), up.double(), backend="native")


def test_swiglu_rejects_bad_input_naming_the_argument():
    with pytest.raises(ValueError, match="gate must have dtype"):
        swiglu(torch.ones(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="up must be a torch.Tensor"):
        swiglu(torch.ones(3), [1.0, 2.0, 3.0])
    for up in (torch.ones(4, 1), torch.ones(3, 6)):  # neither broadcast nor a shape error deep inside
        with pytest.raises(ValueError, match=r"up must have gate's shape \(4, 6\), got"):
            swiglu(torch.ones(4, 6), up)


@requires_native
def test_native_swiglu_gives_what_torch_gives_for_gates_past_the_exp_range():
    gate = torch.tensor([-3e38, -1000.0, -100.0, float("-inf"), float("inf")] + [0.5] * 11)
    up = torch.tensor([1.0, 3e38, 2.0, 1.0, 1.0] + [1.0] * 11)
    out = swiglu(gate, up, backend="native")
    expected = F.silu(gate) * up
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-6, atol=0)


@requires_native
@pytest.mark.parametrize("op", ["swiglu", "rms_norm", "rotary_embedding"])
def test_native_elementwise_ops_refuse_a_second_derivative(op):
    from quietstar.ops.rms_norm import rms_norm
    from quietstar.ops.rotary_embedding import rotary_embedding

    x = torch.randn(1, 3, 2, 8, requires_grad=True)
    if op == "swiglu":
        out = swiglu(x, x, backend="native")
    elif op == "rms_norm":
        out = rms_norm(x, torch.ones(8), 1e-6, backend="native")
    else:
        out = rotary_embedding(x, torch.ones(1, 3, 8), torch.zeros(1, 3, 8), backend="native")
    # Through a gradient that needs one, and through out.sum()'s constant one (which PyTorch's
    # once_differentiable let through: the second derivative came out without their terms).
    # RoPE is linear in x: its x gradient from a constant one does not depend on x at all.
    for loss in (out.square().sum(),) if op == "rotary_embedding" else (out.square().sum(), out.sum()):
        (grad,) = torch.autograd.grad(loss, x, create_graph=True, retain_graph=True)
        with pytest.raises(RuntimeError, match=f"{op} gives first derivatives only"):
            (grad * x).sum().backward()


@pytest.mark.parametrize("op", ["swiglu", "rms_norm", "rotary_embedding"])
def test_the_backend_variable_reference_names_the_composition_of_the_elementwise_ops(op, monkeypatch):
    from quietstar.ops.rms_norm import rms_norm
    from quietstar.ops.rotary_embedding import rotary_embedding

    monkeypatch.setenv("QUIETSTAR_BACKEND", "reference")
    x = torch.randn(1, 3, 2, 8, requires_grad=True)
    if op == "swiglu":
        out = swiglu(x, x)
    elif op == "rms_norm":
        out = rms_norm(x, torch.ones(8), 1e-6)
    else:
        out = rotary_embedding(x, torch.ones(1, 3, 8), torch.zeros(1, 3, 8))
    assert not out.grad_fn.name().endswith(("NativeBackward", "TritonBackward"))


@requires_native
@pytest.mark.parametrize("op", ["swiglu", "rms_norm", "rotary_embedding"])
def test_native_elementwise_ops_with_no_gradient_to_record_call_the_kernels_without_autograd(op, monkeypatch):
    from quietstar.ops import rms_norm as rms_norm_module
    from quietstar.ops import rotary_embedding as rotary_module
    from quietstar.ops import swiglu as swiglu_module

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2, 8, generator=generator)
    weight, cos, sin = torch.randn(8, generator=generator), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    calls = {
        "swiglu": (lambda t: swiglu_module.swiglu(t, t.flip(-1)), swiglu_module.SwiGLUNative),
        "rms_norm": (lambda t: rms_norm_module.rms_norm(t, weight, 1e-6, out_dtype=torch.bfloat16), rms_norm_module.RMSNormNative),
        "rotary_embedding": (lambda t: rotary_module.rotary_embedding(t.transpose(1, 2), cos, sin), rotary_module.RotaryEmbeddingNative),
    }
    run, function = calls[op]
    recorded = run(x.clone().requires_grad_())
    assert recorded.grad_fn.name() == f"{function.__name__}Backward"

    def refuse(*args):
        raise AssertionError("no gradient is recorded: the kernels run without the autograd Function")

    monkeypatch.setattr(function, "apply", refuse)
    with torch.no_grad():
        unrecorded = run(x.clone().requires_grad_())
    torch.testing.assert_close(unrecorded, recorded.detach(), rtol=0, atol=0)
    assert unrecorded.grad_fn is None and unrecorded.dtype == recorded.dtype
    torch.testing.assert_close(run(x), recorded.detach(), rtol=0, atol=0)  # grad mode on, no input needing one
