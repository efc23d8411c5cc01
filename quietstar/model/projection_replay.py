"""Reuse the thought-sampling pass's projections in the tree pass.

A training step first samples the thoughts without gradients (``T`` chain steps through a KV
cache, the first with the base pass), then runs the tree pass with gradients over the base
slot and every chain slot. The tree's first ``1 + T * N`` slots are exactly what the sampling pass computed:
the same inputs at the same positions under the same tree rule. So while sampling,
``recording_projections`` keeps the output of every linear projection in the decoder layers
(``[B, tokens, out]`` per call), and in the tree pass ``replaying_projections`` makes each
projection return those rows and multiply only the rows after them (the end token and talk
inputs). Its backward is a linear's: ``dX = dY W``, ``dW = dY^T X`` over all the tree's rows.
The forward's largest products for ``1 + T * N`` of the tree's ``1 + C * N`` slots are thus done
once instead of twice; losses and gradients are the same mathematics (SPEC section 6).

Attention is replayed the same way: while recording, each ``QuietStarAttention`` keeps its
output and log-sum-exp rows (``TreeAttentionRows``, where the native backend computes them), and
in the tree pass it computes only the queries after them, its backward taking the whole rows as
its own. Elementwise parts (norms, RoPE, the MLP's activation) are recomputed in the tree pass:
they are cheap, and autograd needs their graph.

While recording, each projection's weight is packed once (``onednn_linear.pack_weight``:
bfloat16 for oneDNN under autocast, float32 for MKL on an Intel CPU; the sampling pass
multiplies it ``T`` times) where ``packed_product_dtype`` says so, and the tree pass multiplies
its remaining rows from the same packed weight; each is let go once its module has replayed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from quietstar.model.attention import QuietStarAttention, autocast_dtype
from quietstar.ops.onednn_linear import (
    PackedWeight,
    onednn_linear,
    onednn_linear_input_grad,
    pack_weight,
    packed_linear,
    packed_product_dtype,
)
from quietstar.ops.tree_attention_rows import TreeAttentionRows


def replayable(layers: nn.Module) -> bool:
    """Whether the tree pass may replay ``layers``' projections: it computes what the sampling
    pass computed only if nothing in between is random (no active dropout), and a layer
    recomputed in the backward (Hugging Face's ``gradient_checkpointing_enable``, torch's
    ``checkpoint_wrapper``) must recompute what it saved, which a replayed projection does not;
    global forward hooks would see the recorded rows twice."""
    for module in layers.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            return False
        if getattr(module, "gradient_checkpointing", False) is True or type(module).__name__ == "CheckpointWrapper":
            return False
    return not nn.modules.module._global_forward_hooks


class ProjectionRecord:
    """The outputs of every ``nn.Linear`` under ``layers`` while recording, each module's calls
    written one after another along the token axis of one buffer ``[B, total_rows, out]``
    (``filled[module]`` rows so far), so that the tree pass can fill in the rest and use the
    buffer as its output; and each ``QuietStarAttention``'s rows (``attention``)."""

    def __init__(self, layers: nn.Module, total_rows: int) -> None:
        # Exactly nn.Linear with the class's forward: a subclass (a quantized linear, say) may
        # not compute x W^T + b from .weight, and a forward set on the instance (accelerate's
        # device or offload hooks) does more; both compute in the two passes.
        self.linears = [
            module for module in layers.modules() if type(module) is nn.Linear and "forward" not in module.__dict__
        ]
        self.total_rows = total_rows
        self.buffers: dict[nn.Linear, torch.Tensor] = {}
        self.packed: dict[nn.Linear, PackedWeight] = {}
        self.filled: dict[nn.Linear, int] = {module: 0 for module in self.linears}
        self.overflow = False  # a module was called with more rows than total_rows
        self.attention: dict[QuietStarAttention, TreeAttentionRows] = {
            module: TreeAttentionRows(total_rows)
            for module in layers.modules()
            if isinstance(module, QuietStarAttention)
        }

    def project(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``module``'s product on ``x [B, tokens, in]``, kept after the rows ``module`` has so
        far: from its packed weight where packing applies (``packed_product_dtype``; packed at
        its first call here), written straight into the record and returned as those rows;
        else ``onednn_linear``'s product, copied into the record."""
        weight, bias = module.weight, module.bias
        dtype = packed_product_dtype(x, weight, bias)
        if dtype is None:
            out = onednn_linear(x, weight, bias)
            rows = self._next_rows(module, out.shape[:-1], out.shape[-1], out.dtype)
            if rows is not None:
                rows.copy_(out.detach())
            return out
        packed = self.packed.get(module)
        if packed is None or packed.dtype != dtype:
            packed = self.packed[module] = pack_weight(weight, dtype, x.numel() // x.shape[-1])
        rows = self._next_rows(module, x.shape[:-1], packed.out_features, dtype)
        return packed_linear(x, packed, bias, out=rows)

    def _next_rows(self, module: nn.Linear, shape: torch.Size, features: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The record's next rows of ``module`` for an output ``[*shape, features]`` (``shape``:
        ``[B, tokens]``), taken; None (and nothing is replayed) where they do not fit."""
        start, rows = self.filled[module], shape[-1]
        buffer = self.buffers.get(module)
        if buffer is None:
            buffer = torch.empty(*shape[:-1], self.total_rows, features, dtype=dtype, device=module.weight.device)
            self.buffers[module] = buffer
        if start + rows > self.total_rows or buffer.shape[:-2] != shape[:-1] or buffer.dtype != dtype:
            self.overflow = True
            return None
        self.filled[module] = start + rows
        return buffer[..., start : start + rows, :]

    def rows(self) -> int | None:
        """Rows recorded per module called (the same for each), or None if they were not all
        called the same way (nothing can be replayed then). A module never called while
        recording is not replayed: it computes in the tree pass as usual."""
        counts = {rows for rows in self.filled.values() if rows}
        if self.overflow or len(counts) != 1:
            return None
        return counts.pop()


@contextlib.contextmanager
def recording_projections(layers: nn.Module, total_rows: int) -> Iterator[ProjectionRecord]:
    """Keep the output of every linear projection under ``layers`` called inside the block,
    into buffers of ``total_rows`` tokens (the tree pass's), and every ``QuietStarAttention``'s
    rows. The modules are patched for every thread: run nothing else on the model inside the
    block."""
    record = ProjectionRecord(layers, total_rows)
    # The module's forward itself keeps the rows: they are the projection's own output, which
    # the module's hooks see again when the tree pass replays them. Recorded modules have no
    # instance forward of their own (ProjectionRecord): deleting the patch restores the class's.
    for module in record.linears:
        module.forward = _RecordingForward(module, record)
    with _attention_rows(record.attention):
        try:
            yield record
        finally:
            for module in record.linears:
                del module.forward


@contextlib.contextmanager
def replaying_projections(record: ProjectionRecord) -> Iterator[None]:
    """Inside the block, each recorded projection's next call on ``x [B, total_rows, in]``
    returns its recorded rows followed by ``linear(x[:, recorded:])`` (``[B, total_rows, out]``,
    in the recording's buffer), with a linear's gradients for all rows. Each module replays
    once (the record is used up); later calls compute as usual. The modules are patched for
    every thread: run nothing else on the model inside the block."""
    # Recorded modules have no instance forward of their own (ProjectionRecord): deleting the
    # patch restores the class's.
    replaced = [module for module in record.linears if record.filled[module]]
    for module in replaced:
        module.forward = _ReplayedForward(
            module, record.buffers.pop(module), record.filled[module], record.packed.pop(module, None)
        )
    attention, record.attention = record.attention, {}
    with _attention_rows(attention):
        try:
            yield
        finally:
            for module in replaced:
                del module.forward


@contextlib.contextmanager
def _attention_rows(rows: dict[QuietStarAttention, TreeAttentionRows]) -> Iterator[None]:
    """Hand each attention module its rows inside the block (``QuietStarAttention.known_rows``);
    what the modules had is theirs again after it."""
    missing = object()
    before = {module: vars(module).get("known_rows", missing) for module in rows}
    for module, kept in rows.items():
        module.known_rows = kept
    try:
        yield
    finally:
        for module, had in before.items():
            if had is missing:
                vars(module).pop("known_rows", None)  # back to the class's None
            else:
                module.known_rows = had


class _RecordingForward:
    """A projection's forward that computes ``linear(x)`` and keeps the result in the record
    (``ProjectionRecord.project``)."""

    def __init__(self, module: nn.Linear, record: ProjectionRecord) -> None:
        self.module = module
        self.record = record

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.record.project(self.module, x)


class _ReplayedForward:
    """A projection's forward that returns its recorded rows once, then computes as usual."""

    def __init__(self, module: nn.Linear, buffer: torch.Tensor, filled: int, packed: PackedWeight | None) -> None:
        self.module = module
        self.buffer: torch.Tensor | None = buffer
        self.filled = filled
        self.packed = packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buffer, self.buffer = self.buffer, None
        packed, self.packed = self.packed, None
        if buffer is None:
            return type(self.module).forward(self.module, x)
        if x.shape[:-1] != buffer.shape[:-1]:
            raise RuntimeError(
                f"replaying_projections: {self.module} got input {tuple(x.shape)}, recorded for "
                f"{tuple(buffer.shape[:-1])} tokens"
            )
        dtype = autocast_dtype(x.device) or x.dtype
        recorded = (buffer.to(dtype), self.filled, dtype, packed)
        return ReplayedLinear.apply(x, self.module.weight, self.module.bias, recorded)


class ReplayedLinear(torch.autograd.Function):
    """``linear(x, weight, bias)`` over ``x [..., T, in]`` whose first rows are given.

    ``recorded = (buffer [..., T, out], R, dtype, packed)``: the first ``R`` rows of the output,
    already in ``buffer``, the dtype the products run in (autocast's, or x's) and the weight as
    the recording packed it (or None). Forward: fills ``buffer[..., R:, :]`` with
    ``linear(x[..., R:, :])`` (from the packed weight where it was packed for these products,
    else under the caller's autocast, whose cached cast of the weight it uses) and returns it;
    backward: a linear's gradients over all ``T`` rows in that dtype, the weight cast on the fly
    rather than kept cast, returned in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, recorded):
        buffer, rows, dtype, packed = recorded
        rest = x[..., rows:, :]
        if packed is not None and packed_product_dtype(rest, weight, bias) == packed.dtype:
            packed_linear(rest, packed, bias, out=buffer[..., rows:, :])
        else:
            buffer[..., rows:, :] = onednn_linear(rest, weight, bias)
        ctx.save_for_backward(x.to(dtype), weight)
        ctx.has_bias = bias is not None
        return buffer

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear_input_grad(grad, weight.to(grad.dtype))
        if ctx.needs_input_grad[1]:
            grad_weight = (grad.flatten(0, -2).t() @ x.flatten(0, -2)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None
