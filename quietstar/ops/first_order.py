"""First derivatives only, and a clear error for a second.

The fused ops' backwards run kernels that have no derivatives of their own, and the weighted
linear cross-entropy's gradients are formed in its forward: autograd sees their gradients as
constants. Under ``create_graph`` (a gradient penalty, say) a second derivative through them
would then silently miss their terms. PyTorch's ``once_differentiable`` raises only where the
incoming gradient itself needs a gradient, so ``out.sum()``'s constant one slips through. Here
every gradient a backward returns under ``create_graph`` is linked to the op's inputs that
need gradients through a zero whose own gradient raises, naming the op.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch


class _SecondOrderRefused(torch.autograd.Function):
    """A zero whose gradient raises: ``apply(op, *tensors)`` -> ``0`` (0-d, the first tensor's
    dtype and device)."""

    @staticmethod
    def forward(ctx, op: str, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.op = op
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(
            f"{ctx.op} gives first derivatives only: a second derivative through it (a gradient of its "
            "gradients, from create_graph=True) is not computed; use backend='reference' for higher orders"
        )


def refuse_second_order(op: str, grads: tuple, tensors: Iterable[torch.Tensor | None]) -> tuple:
    """``grads`` (a backward's results, None where there is none) as they are, unless autograd
    records the backward (``create_graph``) and one of ``tensors`` (the op's inputs and incoming
    gradients) needs a gradient: then each gradient plus a zero linked to those tensors, whose
    gradient raises. A link that the backward made itself (to an incoming gradient's scale,
    say) is kept."""
    if not torch.is_grad_enabled():
        return grads
    linked = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    if not linked:
        return grads
    zero = _SecondOrderRefused.apply(op, *linked)
    return tuple(g + zero if isinstance(g, torch.Tensor) else g for g in grads)


class _SavedOnce:
    """An autograd context whose saved tensors are unpacked once, here, and handed out again:
    under activation checkpointing a second unpack raises."""

    def __init__(self, ctx) -> None:
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "saved_tensors", ctx.saved_tensors)

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._ctx, name, value)


def first_order_only(op: str) -> Callable:
    """Decorator for an autograd Function's ``backward(ctx, *grad_outputs)`` that returns a
    tuple: runs it without recording (its kernels have no derivatives), then
    ``refuse_second_order`` over the saved tensors and the incoming gradients."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            ctx = _SavedOnce(ctx)
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            return refuse_second_order(op, grads, (*ctx.saved_tensors, *grad_outputs))

        return wrapper

    return decorate
