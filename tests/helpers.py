"""Shared test utilities (imported by the test modules; conftest.py sets up the interpreter)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quietstar.backends import triton_available, triton_interpreter_enabled

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

requires_triton = pytest.mark.skipif(
    not (triton_available() and (DEVICE.type == "cuda" or triton_interpreter_enabled())),
    reason="triton is not installed, or there is no CUDA device and TRITON_INTERPRET is not 1",
)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (the plain norm when expected is 0)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    difference = (actual - expected).norm().item()
    denominator = expected.norm().item()
    return difference if denominator == 0 else difference / denominator


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a tensor with NaN so that any element a kernel fails to write shows up."""
    return t.fill_(float("nan"))
