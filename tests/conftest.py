"""Test set-up: without a CUDA device, Triton kernels run in the Triton interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` decorator runs, so this happens
at import time, before the test modules import quietstar's kernel modules. The interpreter
(triton 3.8) truncates float32 -> bfloat16 casts where a GPU rounds to nearest, and its
bfloat16 arithmetic is wrong: kernels upcast after loading, and bfloat16 results are compared
at their rounding only on a GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every ``torch.empty``/``torch.empty_like`` float tensor made during the test starts as
    NaN, so an output element that an op or kernel forgets to write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))
