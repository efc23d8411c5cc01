"""A minimal key/value cache in the tree layout.

Each ``update`` appends the new keys and values of one layer; after a base pass and ``c``
chain steps a layer holds ``(1 + c * n_thoughts) * L`` tokens, slot-major, which is exactly
the key layout ``tree_attention`` reads. ``truncate`` drops what a thought appended.
It has the ``update(key, value, layer_idx)`` method of transformers' caches, so the
attention layers call it the same way.

Without gradients (sampling thoughts, evaluation, generation) each layer's keys and values
live in one buffer written in place, allocated for ``capacity`` tokens when the caller knows
how many will come, and doubled when they do not fit; ``update`` returns views of its filled
part. With gradients it concatenates instead: autograd may hold an earlier view for the
backward, and writing into its buffer would change what it saved.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values ``[B, Hkv, T, D]``.

    Args:
        capacity: tokens per layer to allocate for at the first update (None: what the first
            update brings, doubled as needed).
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self.keys: list[torch.Tensor] = []  # each layer's buffer (or, with gradients, its tensor)
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``key``/``value`` of layer ``layer_idx``; return the layer's whole keys, values."""
        in_place = not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad))
        new = key.shape[2]
        if layer_idx == len(self.keys):
            size = max(self.capacity or 0, new) if in_place else new
            self.keys.append(key.new_empty(*key.shape[:2], size, key.shape[3]))
            self.values.append(value.new_empty(*value.shape[:2], size, value.shape[3]))
            self.lengths.append(0)
        length = self.lengths[layer_idx]
        buffer_k, buffer_v = self.keys[layer_idx], self.values[layer_idx]
        if not in_place:
            buffer_k = torch.cat([buffer_k[:, :, :length], key], dim=2)
            buffer_v = torch.cat([buffer_v[:, :, :length], value], dim=2)
        else:
            if length + new > buffer_k.shape[2]:
                size = max(2 * buffer_k.shape[2], length + new)
                buffer_k = torch.cat([buffer_k[:, :, :length], buffer_k.new_empty(*buffer_k.shape[:2], size - length, buffer_k.shape[3])], 2)
                buffer_v = torch.cat([buffer_v[:, :, :length], buffer_v.new_empty(*buffer_v.shape[:2], size - length, buffer_v.shape[3])], 2)
            buffer_k[:, :, length : length + new] = key
            buffer_v[:, :, length : length + new] = value
        self.keys[layer_idx], self.values[layer_idx] = buffer_k, buffer_v
        self.lengths[layer_idx] = length + new
        return buffer_k[:, :, : length + new], buffer_v[:, :, : length + new]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held (per layer)."""
        return self.lengths[layer_idx] if self.lengths else 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens of every layer."""
        self.lengths = [min(length, n) for n in self.lengths]
