"""``rotary_embedding``: the native kernels against transformers' ``apply_rotary_pos_emb``."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from helpers import relative_error, requires_native
from quietstar.ops.rotary_embedding import rotary_embedding


def inputs(batch, length, heads, dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, heads, dim, generator=generator).to(dtype)
    angles = torch.randn(batch, length, dim // 2, generator=generator) * 3
    angles = torch.cat([angles, angles], dim=-1)  # as the Llama family's rotary embedding gives them
    grad = torch.randn(batch, heads, length, dim, generator=generator)
    return x, angles.cos(), angles.sin(), grad


def forward_backward(x, cos, sin, grad, backend):
    x = x.clone().requires_grad_()
    out = rotary_embedding(x, cos, sin, backend=backend)
    out.backward(grad.to(out.dtype))
    return out, x.grad


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=requires_native)])
@pytest.mark.parametrize("shape", [(1, 7, 3, 64), (2, 5, 2, 40), (1, 3, 1, 2)])
def test_rotary_embedding_equals_transformers_apply_rotary_pos_emb(backend, shape):
    x, cos, sin, grad = inputs(*shape)
    out, d_x = forward_backward(x, cos, sin, grad, backend)
    x_ref = x.clone().requires_grad_()
    expected, _ = apply_rotary_pos_emb(x_ref.transpose(1, 2), x_ref.transpose(1, 2), cos, sin)
    expected.backward(grad)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 1e-6
    assert relative_error(d_x, x_ref.grad) < 1e-6


@requires_native
def test_native_rotary_embedding_of_bfloat16_heads_is_float32_as_under_autocast():
    x, cos, sin, grad = inputs(2, 5, 3, 32, dtype=torch.bfloat16)
    out, d_x = forward_backward(x, cos, sin, grad, "native")
    assert out.grad_fn.name() == "RotaryEmbeddingNativeBackward"
    assert out.dtype == torch.float32 and out.is_contiguous() and d_x.dtype == torch.bfloat16
    expected, expected_grad = forward_backward(x.float(), cos, sin, grad, "torch")
    assert relative_error(out, expected) < 1e-6  # bfloat16 values are exact in float32
    assert ((d_x.float() - expected_grad).abs() <= expected_grad.abs() * 2**-8 + 1e-30).all()


@requires_native
def test_native_rotary_embedding_broadcasts_one_batch_row_of_angles():
    x, cos, sin, grad = inputs(3, 4, 2, 16)
    out, d_x = forward_backward(x, cos[:1], sin[:1], grad, "native")
    expected, expected_grad = forward_backward(x, cos[:1].expand(3, -1, -1), sin[:1].expand(3, -1, -1), grad, "torch")
    assert relative_error(out, expected) < 1e-6 and relative_error(d_x, expected_grad) < 1e-6


def test_rotary_embedding_rejects_bad_input_naming_the_argument():
    x, cos, sin, _ = inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        rotary_embedding(x[0], cos, sin)
    with pytest.raises(ValueError, match="cos and sin must be \\[B, T, D\\]"):
        rotary_embedding(x, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="D even"):
        rotary_embedding(x[..., :7], cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="sin must have dtype"):
        rotary_embedding(x, cos, sin.double())


@requires_native
def test_rotary_embedding_native_backend_rejects_what_it_does_not_take():
    x, cos, sin, _ = inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match="backend='native' takes float32 or bfloat16 x"):
        rotary_embedding(x.double(), cos.double(), sin.double(), backend="native")
    with pytest.raises(RuntimeError, match="the head size must be even, got 7"):  # past the Python checks
        torch.ops.quietstar.rotary_embedding_forward(x[..., :7].contiguous(), cos[..., :7].contiguous(), sin[..., :7].contiguous())


@requires_native
def test_native_elementwise_ops_give_their_shapes_on_meta_tensors():
    """The fakes of the rms_norm, swiglu and rotary_embedding ops give what the kernels give."""
    ops = torch.ops.quietstar
    x, cos, sin, grad = inputs(2, 5, 3, 8, dtype=torch.bfloat16)
    gate, weight = torch.randn(4, 6), torch.randn(6)
    calls = [
        (ops.rms_norm_forward, (gate, weight, 1e-6, torch.bfloat16)),
        (ops.rms_norm_backward, (gate, gate, weight, torch.ones(4))),
        (ops.swiglu_forward, (gate.bfloat16(), gate.bfloat16())),
        (ops.swiglu_backward, (gate, gate, gate)),
        (ops.rotary_embedding_forward, (x, cos, sin)),
        (ops.rotary_embedding_backward, (grad, cos, sin, torch.bfloat16)),
    ]
    for op, args in calls:
        real = op(*args)
        fake = op(*(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args))
        for r, f in zip(*(t if isinstance(t, tuple) else (t,) for t in (real, fake))):
            assert (f.device.type, f.shape, f.dtype) == ("meta", r.shape, r.dtype), op
