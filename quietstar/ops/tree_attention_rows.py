"""``TreeAttentionRows``: a tree's attention output rows, kept by one pass for a later one.

A training step's sampling pass computes the tree's first slots through a KV cache, one call
per step, each call's queries the tree's next slots; the tree pass then computes the attention
of every slot again, with gradients, over the same queries and keys. Given one
``TreeAttentionRows`` (``tree_attention(..., known_rows=)``), each sampling call appends its
output and log-sum-exp rows, and the tree pass's call over all the tree's query rows takes
them (once), computes only the queries after them and saves the whole rows for its backward as
its own output and log-sum-exp. Where the native backend computes in float32 (float32 inputs,
and half-precision ones it casts to float32); elsewhere every row is computed.
"""

from __future__ import annotations

import torch

# What a call must share with the kept rows' calls for them to stand for its first rows:
# (arithmetic dtype, bfloat16 products, slot_len, n_thoughts, sliding_window, scale).
CallOptions = tuple[torch.dtype, bool, int, int, int | None, float]


class TreeAttentionRows:
    """Output ``[B, Hq, total, D]`` and log-sum-exp ``[B, Hq, total]`` rows of a tree's queries,
    the first ``filled`` written by calls whose queries were the tree's next slots.

    The caller vouches that the appended rows are the tree's first ones over the keys the
    later call sees (``QuietStarModel`` does so exactly where it replays the decoder's
    projections). A call that does not continue them (other heads, head size, arithmetic,
    options or padding mask, more rows than ``total``) makes them unusable and lets them go;
    the call over all the rows then computes every row.

    Args:
        total: the tree's query rows per batch row and head (``S * L``).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.filled = 0
        self.usable = True
        self._options: CallOptions | None = None
        self._mask: torch.Tensor | None = None

    def _fits(self, shape: torch.Size, options: CallOptions, mask: torch.Tensor | None) -> bool:
        """Whether a call of queries ``shape`` (``[B, Hq, rows, D]``), ``options`` and padding
        ``mask`` goes with the kept rows."""
        # By value against the first call's copy: a mask changed in place since is another mask.
        same_mask = (mask is None) == (self._mask is None) and (mask is None or torch.equal(mask, self._mask))
        return (
            self.out is not None
            and shape[:2] == self.out.shape[:2]
            and shape[3] == self.out.shape[3]
            and options == self._options
            and same_mask
        )

    def drop(self) -> None:
        """Let the rows go; they are unusable from now on."""
        self.out = self.lse = self._mask = None
        self.usable = False

    def keep(self, out: torch.Tensor, lse: torch.Tensor, options: CallOptions, mask: torch.Tensor | None) -> None:
        """Append a call's ``out [B, Hq, rows, D]`` and ``lse [B, Hq, rows]`` after the kept rows."""
        if not self.usable:
            return
        rows = out.shape[2]
        if self.out is None:
            self.out = out.new_empty(*out.shape[:2], self.total, out.shape[3])
            self.lse = lse.new_empty(*lse.shape[:2], self.total)
            self._options, self._mask = options, None if mask is None else mask.clone()
        if self.filled + rows > self.total or not self._fits(out.shape, options, mask):
            self.drop()
            return
        self.out[:, :, self.filled : self.filled + rows] = out
        self.lse[:, :, self.filled : self.filled + rows] = lse
        self.filled += rows

    def take(
        self, q: torch.Tensor, options: CallOptions, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """For the call over all the tree's queries ``q [B, Hq, total, D]``: the buffers and the
        rows written (whole slots of ``options``' ``slot_len``), or None where nothing usable is
        kept. The rows are given once: they are dropped either way."""
        out, lse, filled = self.out, self.lse, self.filled
        given = (
            self.usable
            and filled > 0
            and q.shape[2] == self.total
            and filled % options[2] == 0
            and self._fits(q.shape, options, mask)
        )
        self.drop()
        return (out, lse, filled) if given else None
