"""A minimal key/value cache in the tree layout.

Each ``update`` appends the new keys and values of one layer; after a base pass and ``c``
chain steps a layer holds ``(1 + c * n_thoughts) * L`` tokens, slot-major, which is exactly
the key layout ``tree_attention`` reads. ``truncate`` drops what a thought appended.
It has the ``update(key, value, layer_idx)`` method of transformers' caches, so the
attention layers call it the same way.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer keys and values ``[B, Hkv, T, D]``, grown by concatenation."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append ``key``/``value`` of layer ``layer_idx``; return the layer's whole keys, values."""
        if layer_idx == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held (per layer)."""
        return self.keys[layer_idx].shape[2] if self.keys else 0

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens of every layer."""
        self.keys = [k[:, :, :length] for k in self.keys]
        self.values = [v[:, :, :length] for v in self.values]
