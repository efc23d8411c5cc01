"""The lm_head's softmax over the vocabulary for scores kept vocabulary-major (``[V, C]``, one
column per scored row), as ``linear_cross_entropy``'s torch backend and the thought sampler
keep them.

PyTorch runs such a softmax as four or five ops (column maxima, subtract, exp, column sums,
scale), each a pass over ``V x C`` values that at a vocabulary of 49,152 fit no cache. Where
the native kernels are built (``quietstar.ops.native``), float32 CPU scores go through one
kernel per function instead (``csrc/head_softmax.cpp``): tiles of up to 4,096 rows by 512
columns read row by row, each keeping a running maximum per column and the sum of exponentials
under it, so that the softmax gradient reads the scores twice and writes them once, with a
vector exp. A ``[49152, 320]`` chunk's softmax gradient took 13.6-19 ms against 21.6-24 ms for
PyTorch's ops on a 2-core Intel Xeon (Cascade Lake; docs/benchmarks.md). The tiles' results
combine in a fixed order: the same scores give the same bits at any thread count.
``softmax_gradient_`` also takes bfloat16 CPU scores natively (computed in float32, the
gradient rounded once). Everything else (other dtypes and devices, ``QUIETSTAR_NO_NATIVE=1``)
runs the PyTorch ops (half-precision scores through a float32 copy). Both agree to float32
rounding: the native sums are float32 within blocks of 64 rows and float64 across them, and
its exp gives 0 below float32's normal range (about ``e^-87.3``) where PyTorch's keeps
subnormal values.

A column whose scores include ``+inf`` or NaN, or are all ``-inf``, gives a NaN log-sum-exp
and gradient in either path; ``exp_block_sums_`` makes a NaN or all ``-inf`` column NaN
throughout and a ``+inf`` NaN where it is (its other weights 0), as PyTorch's ops do.
"""

from __future__ import annotations

import torch

from quietstar.ops.native import native_available


def _native_takes(scores: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """``[V, C]`` CPU scores of one of ``dtypes`` with adjacent columns and rows that do not
    overlap, and the native kernels loaded."""
    return (
        scores.device.type == "cpu"
        and scores.dtype in dtypes
        and scores.dim() == 2
        and scores.shape[0] > 0
        and (scores.shape[1] <= 1 or scores.stride(1) == 1)
        and (scores.shape[0] <= 1 or scores.stride(0) >= max(1, scores.shape[1]))  # rows do not overlap
        and native_available()
    )


def column_logsumexp(scores: torch.Tensor) -> torch.Tensor:
    """``log(sum_v exp(scores[v, c]))`` per column of ``scores [V, C]``: ``[C]``. ``scores`` is
    left as it was on the native path and overwritten on PyTorch's (callers must not read it)."""
    if _native_takes(scores):
        return torch.ops.quietstar.head_logsumexp(scores)
    top = scores.amax(0, keepdim=True)
    return scores.sub_(top).exp_().sum(0).log_().add_(top[0])


def softmax_gradient_(
    scores: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, multiplier: float = 1.0
) -> torch.Tensor:
    """In place, ``scores [V, C] = scale[c] * (softmax over V of z - onehot(targets[c]))`` for
    ``z = multiplier * scores``, the gradient of ``sum_c scale[c] * nll[c]`` with respect to
    ``z``; returns the columns' log-sum-exps of ``z`` ``[C]``. The multiplier (scores kept at
    another temperature) is applied as the scores are read, not in a pass of its own.

    Args:
        scores: ``[V, C]`` in the head's compute dtype (float32, or float64), or bfloat16: the
            products of a bfloat16 head, computed in float32 and the gradient rounded once to
            bfloat16 (what a float32 copy of them would give, cast back; one read and write of
            half the bytes, no copy).
        targets: ``[C]`` int64 ids in ``[0, V)`` (ignored rows pointed anywhere, with scale 0).
        scale: ``[C]`` in ``scores``' dtype (float32 for bfloat16 scores).

    Returns:
        ``[C]`` in ``scale``'s dtype.
    """
    if _native_takes(scores, (torch.float32, torch.bfloat16)):
        return torch.ops.quietstar.head_softmax_gradient_(scores, targets.contiguous(), scale.contiguous(), multiplier)
    if scores.dtype != scale.dtype:  # bfloat16 scores without the native kernel
        wide = scores.to(scale.dtype)
        lse = softmax_gradient_(wide, targets, scale, multiplier)
        scores.copy_(wide)
        return lse
    if multiplier != 1.0:
        scores.mul_(multiplier)
    top = scores.amax(0, keepdim=True)
    probs = scores.sub_(top).exp_()
    total = probs.sum(0)
    probs.mul_(scale / total)
    probs[targets, torch.arange(probs.shape[1], device=probs.device)] -= scale
    return total.log_().add_(top[0])


def exp_block_sums_(scores: torch.Tensor, block: int) -> torch.Tensor:
    """In place, ``scores [V, C] = exp(scores - their column maximum)``; returns the sums of each
    ``block`` consecutive entries of each column, ``[ceil(V / block), C]`` (the last block's
    missing entries count as 0)."""
    if _native_takes(scores):
        return torch.ops.quietstar.head_exp_block_sums_(scores, block)
    vocab, columns = scores.shape
    weights = scores.sub_(scores.amax(0, keepdim=True)).exp_()
    whole = vocab - vocab % block
    sums = weights[:whole].view(-1, block, columns).sum(1)
    if whole < vocab:
        sums = torch.cat([sums, weights[whole:].sum(0, keepdim=True)])
    return sums
