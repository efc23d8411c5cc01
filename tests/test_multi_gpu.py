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


def test_tree_attention_triton_runs_on_the_inputs_gpu_not_the_current_one():
    torch.cuda.set_device(0)
    gen = torch.Generator(device=SECOND_GPU).manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3 * 16, 32, device=SECOND_GPU, generator=gen, requires_grad=True) for _ in range(3))
    out = quietstar.tree_attention(q, k, v, 16, backend="triton")
    out.sum().backward()
    expected = quietstar.tree_attention(q, k, v, 16, backend="reference")
    assert out.device == SECOND_GPU and q.grad.device == SECOND_GPU
    assert relative_error(out, expected) < 1e-2


def test_linear_cross_entropy_triton_runs_on_the_inputs_gpu_not_the_current_one():
    torch.cuda.set_device(0)
    gen = torch.Generator(device=SECOND_GPU).manual_seed(0)
    hidden = torch.randn(32, 64, device=SECOND_GPU, generator=gen, requires_grad=True)
    weight = torch.randn(100, 64, device=SECOND_GPU, generator=gen) * 0.1
    targets = torch.randint(0, 100, (32,), device=SECOND_GPU, generator=gen)
    nll = quietstar.linear_cross_entropy(hidden, weight, targets, backend="triton")
    nll.sum().backward()
    expected = quietstar.linear_cross_entropy(hidden, weight, targets, backend="reference")
    assert nll.device == SECOND_GPU and hidden.grad.device == SECOND_GPU
    assert relative_error(nll, expected) < 1e-2
