"""Run a Llama-family model's decoder stack on given embeddings and positions.

The tree passes need position ids ``i + c`` and no dense mask, so they bypass the Hugging
Face model's forward (whose mask creation would read the restarting position ids as packed
sequences and build a ``T x T`` mask) and call its own embedding-free parts directly:
rotary embedding, decoder layers, final norm. Every layer's attention must be
``QuietStarAttention`` (``quietstar.patch``).
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from quietstar.ops.layout import TreeLayout


@functools.lru_cache(maxsize=None)
def cache_keyword(layer_type: type) -> str:
    """The cache argument's name: ``cache`` in transformers >= 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(layer_type.forward).parameters else "past_key_values"


def layer_window(layer: nn.Module) -> int | None:
    """The sliding window of a decoder layer's attention, None for full attention."""
    return getattr(getattr(layer, "self_attn", None), "sliding_window", None)


def run_backbone(
    model: nn.Module,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    cache=None,
    tree_layout: TreeLayout | None = None,
    attention_mask: torch.Tensor | dict[int | None, torch.Tensor] | None = None,
    checkpoint_layers: bool = False,
) -> torch.Tensor:
    """Final hidden states (after the last norm) of ``model``'s decoder.

    Args:
        model: a patched Llama-family causal LM (``model.model`` holds the decoder).
        inputs_embeds: ``[B, T, d]``.
        position_ids: ``[B, T]`` or ``[1, T]``.
        cache: a ``KVCache`` (or transformers cache) that the layers append to.
        tree_layout: the tokens (and cache) hold the tree layout.
        attention_mask: for ordinary input, a ``[B, 1, T, T_total]`` bool mask (True = attend),
            or one per sliding window (``{window or None: mask}``), each layer taking its own
            attention's (``sliding_window``; models such as Qwen2 mix windowed and full layers).
        checkpoint_layers: keep only each decoder layer's input for the backward and recompute
            the rest there (activation checkpointing; only with gradients and no cache).

    Returns:
        ``[B, T, d]``.
    """
    if checkpoint_layers and cache is not None:
        raise ValueError("checkpoint_layers needs cache=None: a recomputed layer would append to the cache twice")
    inner = model.model
    position_embeddings = inner.rotary_emb(inputs_embeds, position_ids)
    hidden = inputs_embeds
    recompute = checkpoint_layers and torch.is_grad_enabled()
    for layer in inner.layers[: inner.config.num_hidden_layers]:
        mask = attention_mask
        if isinstance(mask, dict):
            mask = mask[layer_window(layer)]
        options = dict(
            attention_mask=mask,
            position_ids=position_ids,
            position_embeddings=position_embeddings,
            use_cache=cache is not None,
            tree_layout=tree_layout,
            **{cache_keyword(type(layer)): cache},
        )
        out = checkpoint(layer, hidden, use_reentrant=False, **options) if recompute else layer(hidden, **options)
        hidden = out[0] if isinstance(out, tuple) else out
    return inner.norm(hidden)
