"""The Triton kernels of the decoder's elementwise ops (``kernels/elementwise.py``: ``rms_norm``,
``rotary_embedding``, ``swiglu``) against the Llama family's own arithmetic; on CUDA, or in the
Triton interpreter without it. ``rms_norm``'s kernels against ``LlamaRMSNorm`` are in
``test_rms_norm.py``, with the native ones."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from helpers import DEVICE, relative_error, requires_triton
from quietstar.ops.backends import log_fallback_once
from quietstar.ops.rms_norm import rms_norm
from quietstar.ops.rotary_embedding import rotary_embedding
from quietstar.ops.swiglu import swiglu

pytestmark = requires_triton


def randn(*shape, seed, dtype=torch.float32, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, dtype)


def rms_norm_step(x, weight, grad, backend):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    out = rms_norm(x, weight, 1e-5, backend=backend)
    out.backward(grad)
    return out, x.grad, weight.grad


def rotary_step(projection, heads, cos, sin, grad, backend):
    projection = projection.clone().requires_grad_()  # [B, T, H * D], viewed as heads as the model does
    batch, length, width = projection.shape
    out = rotary_embedding(projection.view(batch, length, heads, width // heads), cos, sin, backend=backend)
    out.backward(grad.to(out.dtype))
    return out, projection.grad


def swiglu_step(gate, up, grad, backend):
    gate, up = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu(gate, up, backend=backend)
    out.backward(grad)
    return out, gate.grad, up.grad


def test_triton_rms_norm_rounds_the_normalised_x_to_x_s_dtype_as_the_llama_module_does():
    # float16 x: the module rounds x * rstd to float16 before the weight multiplies it; the
    # weight's gradient is the sum of grad times that rounded value.
    x, grad = randn(6, 40, seed=28, scale=3, dtype=torch.float16), randn(6, 40, seed=29, dtype=torch.float16)
    weight = randn(40, seed=30, dtype=torch.float16)
    norm = LlamaRMSNorm(40, eps=1e-5).to(DEVICE, torch.float16)
    with torch.no_grad():
        norm.weight.copy_(weight)
    out, _, _ = rms_norm_step(x, weight, grad, "triton")
    assert relative_error(out, norm(x)) < 1e-4
    x64 = x.double()
    rounded = (x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5)).half().double()
    _, _, d_weight = rms_norm_step(x, weight.float(), grad, "triton")  # a float32 weight keeps the sum's precision
    assert relative_error(d_weight, (grad.double() * rounded).sum(0)) < 1e-6


def test_triton_rms_norm_sums_the_weight_gradient_of_rows_beyond_its_programs():
    # More rows than the backward has programs (2 in the interpreter, 4 per SM on a GPU), and not a
    # multiple of them: every program's rows must be summed.
    rows = 7 if DEVICE.type == "cpu" else 4 * torch.cuda.get_device_properties(DEVICE).multi_processor_count * 3 + 5
    x, weight, grad = randn(rows, 24, seed=3), randn(24, seed=4), randn(rows, 24, seed=5)
    _, d_x, d_weight = rms_norm_step(x, weight, grad, "triton")
    _, expected_x, expected_weight = rms_norm_step(x, weight, grad, "torch")
    assert relative_error(d_x, expected_x) < 1e-5 and relative_error(d_weight, expected_weight) < 1e-5


@pytest.mark.parametrize("angle_rows", ["one", "every", "expanded"])
@pytest.mark.parametrize("dim", [64, 6])
def test_triton_rotary_embedding_equals_apply_rotary_pos_emb_on_the_projection_s_heads(angle_rows, dim, poisoned_allocations):
    heads = 3
    projection, grad = randn(2, 5, heads * dim, seed=6), randn(2, heads, 5, dim, seed=7)
    # cos and sin of their own for every entry (not the Llama family's halves, which repeat), so
    # that pairing an entry with the wrong half's angle fails.
    cos, sin = randn(1 if angle_rows == "one" else 2, 5, dim, seed=8), randn(1 if angle_rows == "one" else 2, 5, dim, seed=27)
    if angle_rows == "expanded":
        cos, sin = cos[:1].expand(2, -1, -1), sin[:1].expand(2, -1, -1)
    out, d_projection = rotary_step(projection, heads, cos, sin, grad, "triton")
    assert out.grad_fn.name() == "RotaryEmbeddingTritonBackward" and out.is_contiguous()
    x_ref = projection.view(2, 5, heads, dim).clone().requires_grad_()
    expected, _ = apply_rotary_pos_emb(x_ref.transpose(1, 2), x_ref.transpose(1, 2), cos, sin)
    expected.backward(grad)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 1e-6
    assert relative_error(d_projection, x_ref.grad.flatten(2)) < 1e-6


def test_triton_swiglu_equals_silu_times_up_with_large_gates_and_nan(poisoned_allocations):
    gate, up, grad = randn(4, 37, seed=9, scale=4), randn(4, 37, seed=10), randn(4, 37, seed=11)
    gate[0, :3] = torch.tensor([-200.0, 200.0, float("nan")])
    out, d_gate, d_up = swiglu_step(gate, up, grad, "triton")
    expected, expected_gate, expected_up = swiglu_step(gate, up, grad, "torch")
    assert out.grad_fn.name() == "SwiGLUTritonBackward"
    assert out[0, 2].isnan() and d_gate[0, 2].isnan() and d_up[0, 2].isnan()
    finite = ~gate.isnan()
    for actual, wanted in [(out, expected), (d_gate, expected_gate), (d_up, expected_up)]:
        torch.testing.assert_close(actual[finite], wanted[finite], rtol=1e-5, atol=1e-6)


def float32_twin(step, args, backend):
    """The step on float32 copies of the half-precision ``args``: what both backends approximate."""
    return step(*(a.float() if isinstance(a, torch.Tensor) else a for a in args), backend)


# The interpreter (triton 3.8) truncates float32 -> bfloat16 casts where a GPU rounds them to
# nearest: its bfloat16 results are not the kernels'.
ROUNDS_BFLOAT16_TO_NEAREST = DEVICE.type == "cuda"


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skipif(not ROUNDS_BFLOAT16_TO_NEAREST, reason="the Triton interpreter truncates casts to bfloat16"),
        ),
    ],
)
@pytest.mark.parametrize("op", ["rms_norm", "rotary_embedding", "swiglu"])
def test_triton_elementwise_ops_in_half_precision_are_as_close_to_float32_as_the_composition(op, dtype):
    # The kernels round each result once; PyTorch's composition rounds after every op.
    if op == "rms_norm":
        step = rms_norm_step
        args = (randn(6, 40, seed=12, dtype=dtype), randn(40, seed=13, dtype=dtype), randn(6, 40, seed=14, dtype=dtype))
    elif op == "rotary_embedding":
        angles = randn(1, 5, 8, seed=15, scale=3)
        angles = torch.cat([angles, angles], dim=-1).to(dtype)
        step = rotary_step
        projection, grad = randn(2, 5, 3 * 16, seed=16, dtype=dtype), randn(2, 3, 5, 16, seed=17, dtype=dtype)
        args = (projection, 3, angles.cos(), angles.sin(), grad)
    else:
        step, args = swiglu_step, tuple(randn(4, 50, seed=seed, dtype=dtype, scale=3) for seed in (18, 19, 20))
    exact = float32_twin(step, args, "torch")
    triton_results, torch_results = step(*args, "triton"), step(*args, "torch")
    for triton_result, torch_result, wanted in zip(triton_results, torch_results, exact):
        assert triton_result.dtype == torch_result.dtype
        assert relative_error(triton_result, wanted) <= 1.25 * relative_error(torch_result, wanted) + 1e-4


def test_triton_backend_refuses_float64_which_the_automatic_choice_keeps_in_the_composition(monkeypatch):
    x, weight = randn(3, 8, seed=21, dtype=torch.float64), randn(8, seed=22, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' takes x, weight and out_dtype of float16"):
        rms_norm(x, weight, 1e-6, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' takes gate and up of one shape"):
        swiglu(x, x, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' takes x, cos and sin"):
        rotary_embedding(x.view(1, 3, 1, 8), x[None], x[None], backend="triton")
    monkeypatch.setenv("QUIETSTAR_BACKEND", "triton")
    gate = x.clone().requires_grad_()
    out = swiglu(gate, x)
    assert out.dtype == torch.float64 and out.grad_fn.name() != "SwiGLUTritonBackward"
    torch.testing.assert_close(out, F.silu(x) * x)
    assert rms_norm(x.requires_grad_(), weight, 1e-6).grad_fn.name() != "RMSNormTritonBackward"


def test_triton_rms_norm_leaves_rows_wider_than_its_programs_hold_to_the_composition(monkeypatch):
    x, weight = randn(1, 2**16 + 2, seed=25), randn(2**16 + 2, seed=26)
    with pytest.raises(ValueError, match="rows of 1 to 65536 entries, got .* rows of 65538"):
        rms_norm(x, weight, 1e-6, backend="triton")
    monkeypatch.setenv("QUIETSTAR_BACKEND", "triton")
    out = rms_norm(x, weight.requires_grad_(), 1e-6)
    assert out.grad_fn.name() != "RMSNormTritonBackward"
    torch.testing.assert_close(out, rms_norm(x, weight, 1e-6, backend="torch"))


def test_triton_elementwise_ops_leave_empty_rows_to_the_composition_and_log_it(monkeypatch, caplog):
    log_fallback_once.cache_clear()
    monkeypatch.setenv("QUIETSTAR_BACKEND", "triton")
    with caplog.at_level(logging.WARNING, logger="quietstar.ops.backends"):
        assert rms_norm(randn(3, 0, seed=31), randn(0, seed=32), 1e-6).shape == (3, 0)
        empty = randn(1, 2, 3, 0, seed=33)
        assert rotary_embedding(empty, empty[:, :, 0], empty[:, :, 0]).shape == (1, 3, 2, 0)
    assert "rms_norm: the triton kernels take" in caplog.text and "rows of 0" in caplog.text
    assert "rotary_embedding: the triton kernels take" in caplog.text
    with pytest.raises(ValueError, match="backend='triton' takes .* rows of 1 to 65536 entries"):
        rms_norm(randn(3, 0, seed=31), randn(0, seed=32), 1e-6, backend="triton")


def test_the_backend_variable_picks_the_triton_kernels_of_the_elementwise_ops(monkeypatch):
    monkeypatch.setenv("QUIETSTAR_BACKEND", "triton")
    gate = randn(3, 5, seed=23).requires_grad_()
    assert swiglu(gate, gate).grad_fn.name() == "SwiGLUTritonBackward"
    assert rms_norm(gate, randn(5, seed=24), 1e-6).grad_fn.name() == "RMSNormTritonBackward"
