"""``linear_cross_entropy`` composed from PyTorch ops: the CPU fast path (and, on CUDA, the
choice for what the kernels do not cover). Each chunk's softmax over the vocabulary runs
through ``quietstar.ops.head_softmax`` (one native kernel on float32 CPU scores, and on the
weighted form's bfloat16 ones).

Rows are processed in chunks whose scores fit a fixed memory budget (float32 scores; the
weighted form's kept bfloat16 or given scores by their own bytes), so the ``N x V`` logits
never exist. The forward keeps one log-sum-exp per row; the backward recomputes each
chunk's scores into the same buffer, turns them into ``scale * (softmax - onehot)`` in place
(reusing the saved log-sum-exp, no second reduction) and accumulates ``dh``, ``dW`` and ``db``
by matrix products. Peak extra memory is one chunk of scores plus the float32 gradients of the
weights and of ``hidden``: no ``N x V`` term.

On CPU, inside a ``reusing_scratch()`` block, a call's scratch (one chunk's scores, their
copies in the product dtype and the weight cast to it) passes to the same weight's next call:
at most ``CHUNK_BYTES`` of scores; with half-precision products, up to that again (the scores in
the product dtype: half of it for a copy of float32 scores, all of it for the weighted form's
kept scores) and two ``[V, d]`` arrays in the product dtype (the weight and one ``dW``
product); with products in another dtype than the weight's, that cast of the weight. Fresh buffers of that size cost a page
fault per 4 KiB there (glibc maps them anew for each allocation and unmaps them when freed).
When the outermost block ends the scratch is freed, so nothing is held between a model's
calls; across them the CPU caching allocator (``quietstar.ops.cpu_caching_allocator``), where
it is on (``quietstar train`` turns it on), hands the freed blocks back without page faults.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

from quietstar.ops.backends import autocast_off, fast_half_matmul
from quietstar.ops.first_order import first_order_only
from quietstar.ops.head_softmax import column_logsumexp, softmax_gradient_
from quietstar.ops.linear_cross_entropy_common import (
    column_offset,
    compute_dtype,
    formed_gradients_backward,
    gradients_needed,
    input_gradients,
    keep_formed_gradients,
    row_scale,
    safe_targets,
    weighted_gradients_needed,
)
from quietstar.ops.native import native_available
from quietstar.ops.onednn_linear import onednn_linear

# Bytes of scores one chunk of rows may take; the forward and the backward each hold one
# such buffer, reused from chunk to chunk.
CHUNK_BYTES = 64 * 2**20
# Chunks of a multiple of this many rows: CPU matrix products slow down markedly (about 1.5x
# measured with MKL) on odd row counts such as 341.
CHUNK_ROW_MULTIPLE = 64
# The most rows of a call whose float32 CPU scores come from oneDNN's product (``onednn_linear``),
# not MKL's into the scratch: [49152, 576] x [576, c] took 19 / 35 / 52 / 86 ms through oneDNN
# against 29 / 48 / 65 / 90 ms at c = 64 / 128 / 192 / 256, and the same at 320 (101-105 ms),
# on the 2-core AMD EPYC with AVX-512 BF16 (best of five, three rounds).
ONEDNN_SCORES_MAX_ROWS = 256
# Rows of a float32 gradient updated at a time from a half-precision product: the promoted
# copy of each block stays small enough for the allocator to reuse.
ACCUMULATE_BLOCK_BYTES = 8 * 2**20
# Per thread: while a ``reusing_scratch`` block is open, its CPU scratch per lm_weight
# ({weight: {name: flat tensor}}); a call takes its weight's entry out and puts it back when done.
_THREAD = threading.local()


def _open_workspaces() -> WeakIdKeyDictionary | None:
    """This thread's scratch per weight while a ``reusing_scratch`` block is open, else None."""
    return getattr(_THREAD, "workspaces", None)


@contextlib.contextmanager
def reusing_scratch() -> Iterator[None]:
    """Inside the block, the CPU scratch of a call (``[V, c]`` scores and, for half-precision
    products, the weight's cast) passes to the next call with the same weight in the same
    thread instead of being allocated again; it is freed when the thread's outermost block
    ends. Outside any block, each call frees its own. ``QuietStarModel.losses`` runs its head
    calls in one block (with ``mix="logprobs"`` the unweighted form's backward runs after it,
    outside)."""
    outermost = _open_workspaces() is None
    if outermost:
        _THREAD.workspaces = WeakIdKeyDictionary()
    try:
        yield
    finally:
        if outermost:
            _THREAD.workspaces = None


def _chunks(rows: int, vocab: int, itemsize: int) -> Iterator[slice]:
    size = CHUNK_BYTES // (vocab * itemsize)
    if size >= CHUNK_ROW_MULTIPLE:
        size -= size % CHUNK_ROW_MULTIPLE
    size = max(1, size)
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


class _Scores:
    """One call's inputs and their scores, chunk by chunk.

    Scores are kept vocabulary-major (``[V, c]``, one column per row): ``W @ h.T`` runs
    markedly faster on CPU than ``h @ W.T``, and the reductions over the vocabulary then
    vectorise along the buffer's contiguous rows.

    Precision: the softmax, the log-sum-exp and every accumulation run in ``dtype`` (float32,
    float64 for float64 inputs). The matrix products run in ``product_dtype``: the inputs'
    half dtype where the device multiplies it faster than float32 (``fast_half_matmul``), as a
    half-precision lm_head would (each product accumulates in float32 inside the GEMM and is
    rounded to the half dtype once); ``dtype`` otherwise.
    """

    def __init__(self, hidden, lm_weight, lm_bias, base_hidden, w, temperature, masked_ids):
        self.dtype = compute_dtype(hidden.dtype)
        self.product_dtype = hidden.dtype if fast_half_matmul(hidden.dtype, hidden.device) else self.dtype
        self.hidden, self.base_hidden, self.w = hidden, base_hidden, w
        self.inv_temperature = 1.0 / temperature
        offset = column_offset(lm_bias, masked_ids, lm_weight.shape[0], temperature, self.dtype, hidden.device)
        self.offset = None if offset is None else offset[:, None]
        self.masked_ids, self.has_bias = masked_ids, lm_bias is not None
        # Scratch reused from chunk to chunk and, on CPU inside ``reusing_scratch``, from call to
        # call (the module's docstring says why); handed back when the ``with`` block ends.
        self._owner = lm_weight
        self._workspaces = _open_workspaces() if hidden.device.type == "cpu" else None
        self._scratch: dict[str, torch.Tensor] = {}
        if self._workspaces is not None:
            self._scratch = self._workspaces.pop(lm_weight, None) or {}
        self.weight = lm_weight
        if self.product_dtype != lm_weight.dtype:
            self.weight = self._flat("weight", lm_weight.numel(), self.product_dtype).view(lm_weight.shape).copy_(lm_weight)

    def __enter__(self) -> _Scores:
        return self

    def __exit__(self, *exc) -> None:
        """Hand the scratch back for the weight's next call inside a ``reusing_scratch`` block (CPU)."""
        if self._workspaces is not None:
            self._workspaces[self._owner] = self._scratch

    def _flat(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The first ``numel`` elements of scratch ``name`` (grown when too small)."""
        flat = self._scratch.get(name)
        if flat is None or flat.numel() < numel or flat.dtype != dtype:
            flat = self._scratch[name] = torch.empty(numel, dtype=dtype, device=self.hidden.device)
        return flat[:numel]

    def chunks(self, scores_dtype: torch.dtype | None = None) -> Iterator[slice]:
        """Row chunks whose scores (in ``scores_dtype``, ``dtype`` by default) take at most
        ``CHUNK_BYTES``."""
        return _chunks(self.hidden.shape[0], self.weight.shape[0], (scores_dtype or self.dtype).itemsize)

    def keeps_product_scores(self) -> bool:
        """Whether the scores stay in the half ``product_dtype`` as the product gives them
        (``product_scores``): bfloat16 products on the CPU, no bias (masked ids are exact in
        bfloat16: -inf), and the native softmax gradient, which reads and writes them in place,
        computing in float32 (``softmax_gradient_``). The gradients are then those of a float32
        copy of the scores rounded to bfloat16, as otherwise, without the copy; and chunks of
        twice the rows fit the same bytes."""
        return (
            self.product_dtype == torch.bfloat16
            and self.dtype == torch.float32
            and not self.has_bias
            and self.hidden.device.type == "cpu"
            and native_available()
        )

    def mixed(self, rows: slice) -> torch.Tensor:
        """``h = (1 - w) * base_hidden + w * hidden`` of ``rows``: ``[c, d]`` in ``dtype``."""
        h = self.hidden[rows].to(self.dtype)
        if self.w is None:
            return h
        return torch.lerp(self.base_hidden[rows].to(self.dtype), h, self.w[rows, None].to(self.dtype))

    def half(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Reused ``product_dtype`` scratch ``name`` of ``shape``."""
        return self._flat(f"half {name}", shape[0] * shape[1], self.product_dtype).view(shape)

    def as_product(self, t: torch.Tensor) -> torch.Tensor:
        """A ``[V, c]`` chunk in ``product_dtype`` (in the scores' scratch, free once they are read)."""
        if t.dtype == self.product_dtype:
            return t
        return self.half("scores", t.shape).copy_(t)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """``(h @ W.T / T + offset).T``: ``[V, c]`` in ``dtype``, in the scores' scratch (sized
        by the first chunk, the largest). In a call of at most ``ONEDNN_SCORES_MAX_ROWS`` float32
        CPU rows, each chunk comes from oneDNN's product instead, in a fresh tensor of the size
        the scratch would have had (the same product for every chunk and call of that call's
        rows, whatever ran before)."""
        vocab, rows = self.weight.shape[0], h.shape[0]
        scaled = (h.T * self.inv_temperature).to(self.product_dtype)
        narrow = self.hidden.shape[0] <= ONEDNN_SCORES_MAX_ROWS
        if narrow and h.device.type == "cpu" and self.product_dtype == self.dtype == torch.float32:
            z = onednn_linear(self.weight, scaled.T)
            return z if self.offset is None else z.add_(self.offset)
        out = self._flat("scores", vocab * rows, self.dtype).view(vocab, rows)
        if self.product_dtype != self.dtype:
            out.copy_(torch.mm(self.weight, scaled, out=self.half("scores", (vocab, rows))))
            return out if self.offset is None else out.add_(self.offset)
        if self.offset is None:
            return torch.mm(self.weight, scaled, out=out)
        return torch.addmm(self.offset, self.weight, scaled, out=out)

    def product_scores(self, h: torch.Tensor) -> torch.Tensor:
        """``(h @ W.T / T).T`` with masked ids -inf: ``[V, c]`` in ``product_dtype``, the
        product's own rounding, in the half scratch (``keeps_product_scores``)."""
        vocab, rows = self.weight.shape[0], h.shape[0]
        scaled = (h.T * self.inv_temperature).to(self.product_dtype)
        out = torch.mm(self.weight, scaled, out=self.half("scores", (vocab, rows)))
        return out if self.masked_ids is None else out.index_fill_(0, self.masked_ids, float("-inf"))

    def product(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> None:
        """``out = a @ b`` (``out += a @ b`` with ``accumulate``), the product in ``product_dtype``
        (``a`` and ``b`` already in it), ``out`` in ``dtype``."""
        if self.product_dtype == self.dtype:
            out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
            return
        role = "weight" if out.shape == self.weight.shape else "rows"  # one scratch per role, whatever the rows
        result = torch.mm(a, b, out=self.half(f"product {role}", out.shape))
        # Block by block: adding a half tensor to a float32 one makes a float32 copy of it first.
        step = max(1, ACCUMULATE_BLOCK_BYTES // (out.shape[1] * out.element_size()))
        for start in range(0, out.shape[0], step):
            block = slice(start, start + step)
            out[block].add_(result[block]) if accumulate else out[block].copy_(result[block])


class LinearCrossEntropyTorch(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, hidden, lm_weight, targets, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index):
        with _Scores(hidden, lm_weight, lm_bias, base_hidden, w, temperature, masked_ids) as scorer:
            rows = hidden.shape[0]
            lse = torch.empty(rows, dtype=scorer.dtype, device=hidden.device)
            nll = torch.empty(rows, dtype=scorer.dtype, device=hidden.device)
            picked_ids = safe_targets(targets, ignore_index)
            for chunk in scorer.chunks():
                z = scorer.scores(scorer.mixed(chunk))
                picked = z.gather(0, picked_ids[None, chunk])[0]
                chunk_lse = column_logsumexp(z)
                lse[chunk] = chunk_lse
                nll[chunk] = chunk_lse - picked
            nll.masked_fill_(targets == ignore_index, 0.0)
            ctx.save_for_backward(hidden, lm_weight, targets, lm_bias, base_hidden, w, masked_ids, lse)
            ctx.options = (temperature, ignore_index)
            return nll

    @staticmethod
    @first_order_only("linear_cross_entropy")
    @autocast_off
    def backward(ctx, grad_nll):
        hidden, lm_weight, targets, lm_bias, base_hidden, w, masked_ids, lse = ctx.saved_tensors
        temperature, ignore_index = ctx.options
        need_h, need_weight, need_bias = gradients_needed(ctx.needs_input_grad)
        with _Scores(hidden, lm_weight, lm_bias, base_hidden, w, temperature, masked_ids) as scorer:
            dtype, device = scorer.dtype, hidden.device
            scale = row_scale(grad_nll, targets, ignore_index, temperature, dtype)
            picked_ids = safe_targets(targets, ignore_index)
            grad_h = torch.empty(hidden.shape, dtype=dtype, device=device) if need_h else None
            grad_weight = torch.zeros(lm_weight.shape, dtype=dtype, device=device) if need_weight else None
            grad_bias = torch.zeros(lm_weight.shape[0], dtype=dtype, device=device) if need_bias else None
            for chunk in scorer.chunks():
                h = scorer.mixed(chunk)
                z = scorer.scores(h)
                chunk_scale = scale[None, chunk]
                # d(raw logits) = scale * (softmax - onehot(target)), formed in place.
                z.sub_(lse[None, chunk]).exp_().mul_(chunk_scale)
                z[picked_ids[chunk], torch.arange(z.shape[1], device=device)] -= chunk_scale[0]
                dz = scorer.as_product(z)
                if grad_h is not None:
                    scorer.product(dz.T, scorer.weight, grad_h[chunk])
                if grad_weight is not None:
                    scorer.product(dz, h.to(scorer.product_dtype), grad_weight, accumulate=True)
                if grad_bias is not None:
                    grad_bias += z.sum(1)
            return input_gradients(
                ctx.needs_input_grad, grad_h, grad_weight, grad_bias, hidden, lm_weight, lm_bias, base_hidden, w
            )


class WeightedLinearCrossEntropyTorch(torch.autograd.Function):
    """``sum(row_weights * nll)`` with every gradient formed in the forward (three products
    per chunk: the scores, ``dh`` and ``dW``; the backward only scales them), for losses whose
    per-row weights are known before the head runs. Given ``scores`` (``[V, N]``, what the
    first product would give, read times ``scores_multiplier``), two products per chunk; the
    scores are overwritten."""

    @staticmethod
    @autocast_off
    def forward(ctx, hidden, lm_weight, targets, row_weights, lm_bias, base_hidden, w, temperature, masked_ids,
                ignore_index, scores, scores_multiplier):
        with _Scores(hidden, lm_weight, lm_bias, base_hidden, w, temperature, masked_ids) as scorer:
            dtype, device, rows = scorer.dtype, hidden.device, hidden.shape[0]
            # (grad mode is off inside forward; needs_input_grad says what the caller wants)
            need_h, need_weight, need_bias = weighted_gradients_needed(ctx.needs_input_grad)
            train = need_h or need_weight or need_bias
            nll = torch.empty(rows, dtype=dtype, device=device)
            ignored = targets == ignore_index
            picked_ids = safe_targets(targets, ignore_index)
            scale = (row_weights.to(dtype) / temperature).masked_fill(ignored, 0.0)
            grad_h = torch.empty(hidden.shape, dtype=dtype, device=device) if train and need_h else None
            # Written by the first chunk's product, not zero-filled first ([V, d] is large).
            grad_weight = torch.empty(lm_weight.shape, dtype=dtype, device=device) if train and need_weight else None
            grad_bias = torch.zeros(lm_weight.shape[0], dtype=dtype, device=device) if train and need_bias else None
            # The scores' dtype: the given ones', the half product's kept as it is, or dtype.
            in_product = scores is None and scorer.keeps_product_scores()
            scores_dtype = scores.dtype if scores is not None else scorer.product_dtype if in_product else dtype
            for index, chunk in enumerate(scorer.chunks(scores_dtype)):
                h = scorer.mixed(chunk)
                if scores is not None:
                    z = scores[:, chunk]
                else:
                    z = scorer.product_scores(h) if in_product else scorer.scores(h)
                multiplier = 1.0 if scores is None else scores_multiplier
                picked = z.gather(0, picked_ids[None, chunk])[0].to(dtype) * multiplier
                if not train:
                    nll[chunk] = column_logsumexp(z.to(dtype) * multiplier) - picked
                    continue
                # d(raw logits) = scale * (softmax - onehot(target)), in place of the scores.
                nll[chunk] = softmax_gradient_(z, picked_ids[chunk], scale[chunk], multiplier) - picked
                d_probs = scorer.as_product(z)
                if grad_h is not None:
                    scorer.product(d_probs.T, scorer.weight, grad_h[chunk])
                if grad_weight is not None:
                    scorer.product(d_probs, h.to(scorer.product_dtype), grad_weight, accumulate=index > 0)
                if grad_bias is not None:
                    grad_bias += z.sum(1, dtype=dtype)
            nll.masked_fill_(ignored, 0.0)
            keep_formed_gradients(ctx, nll, (grad_h, grad_weight, grad_bias), hidden, lm_weight, lm_bias, base_hidden, w)
            return (row_weights.to(dtype) * nll).sum(), nll

    @staticmethod
    @autocast_off
    def backward(ctx, grad_loss, grad_nll):
        return formed_gradients_backward(ctx, grad_loss)


def weighted_linear_cross_entropy_torch(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    lm_bias: torch.Tensor | None,
    base_hidden: torch.Tensor | None,
    w: torch.Tensor | None,
    temperature: float,
    masked_ids: torch.Tensor | None,
    ignore_index: int,
    scores: torch.Tensor | None = None,
    scores_multiplier: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(row_weights * nll), nll)`` with the gradients formed in the forward; arguments as
    ``quietstar.weighted_linear_cross_entropy`` (already checked), ``scores_multiplier`` its
    ``scores_temperature / temperature``."""
    arguments = (hidden, lm_weight, targets, row_weights, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index)
    return WeightedLinearCrossEntropyTorch.apply(*arguments, scores, scores_multiplier)


def linear_cross_entropy_torch(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    lm_bias: torch.Tensor | None,
    base_hidden: torch.Tensor | None,
    w: torch.Tensor | None,
    temperature: float,
    masked_ids: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    """Chunked linear cross-entropy; arguments as ``quietstar.linear_cross_entropy`` (already checked)."""
    return LinearCrossEntropyTorch.apply(
        hidden, lm_weight, targets, lm_bias, base_hidden, w, temperature, masked_ids, ignore_index
    )
