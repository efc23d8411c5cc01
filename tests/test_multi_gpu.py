"""Triton ops on inputs that live on a GPU other than the current one (Triton launches on the
current device, so the ops must switch to the inputs' device)."""

from __future__ import annotations

import pytest
import torch

import quietstar
from helpers import relative_error

pytestmark = pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (inputs on cuda:1 while cuda:0 is current)"
)
SECOND_GPU = torch.device("cuda", 1)


def _value_and_grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.sum().backward()
    return out, [t.grad for t in inputs]


def test_tree_attention_triton_runs_on_the_inputs_gpu_not_the_current_one():
    torch.cuda.set_device(0)
    gen = torch.Generator(device=SECOND_GPU).manual_seed(0)
    qkv = [torch.randn(1, 2, 3 * 16, 32, device=SECOND_GPU, generator=gen) for _ in range(3)]
    out, grads = _value_and_grads(lambda q, k, v: quietstar.tree_attention(q, k, v, 16, backend="triton"), qkv)
    ref, ref_grads = _value_and_grads(lambda q, k, v: quietstar.tree_attention(q, k, v, 16, backend="reference"), qkv)
    assert out.device == SECOND_GPU and all(g.device == SECOND_GPU for g in grads)
    assert relative_error(out, ref) <= 1e-5
    assert all(relative_error(g, r) <= 1e-5 for g, r in zip(grads, ref_grads))


def test_linear_cross_entropy_triton_runs_on_the_inputs_gpu_not_the_current_one():
    torch.cuda.set_device(0)
    gen = torch.Generator(device=SECOND_GPU).manual_seed(0)
    hidden = torch.randn(32, 64, device=SECOND_GPU, generator=gen)
    weight = torch.randn(100, 64, device=SECOND_GPU, generator=gen) * 0.1
    targets = torch.randint(0, 100, (32,), device=SECOND_GPU, generator=gen)

    def nll(backend):
        return lambda h, w: quietstar.linear_cross_entropy(h, w, targets, backend=backend)

    out, grads = _value_and_grads(nll("triton"), [hidden, weight])
    ref, ref_grads = _value_and_grads(nll("reference"), [hidden, weight])
    assert out.device == SECOND_GPU and all(g.device == SECOND_GPU for g in grads)
    assert relative_error(out, ref) <= 1e-4
    assert all(relative_error(g, r) <= 1e-4 for g, r in zip(grads, ref_grads))
