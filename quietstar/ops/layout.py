"""The tree layout every layer shares (docs/architecture.md, "The tree layout").

A sequence with thoughts is a flat run of ``n_slots * slot_len`` tokens, slot-major. Slot 0
is the base text; slot ``s >= 1`` is chain step ``c = (s - 1) // n_thoughts + 1`` of branch
``t = (s - 1) % n_thoughts``. Token ``(s, i)`` has position id ``i + c``.

The tree rule (SPEC section 1): query ``(s, i)`` sees key ``(s', k)`` iff

* ``s' == 0`` and ``k <= i`` (and ``i - k < window``, and key ``k`` is not padding), or
* ``s' >= 1``, ``k == i``, ``s' <= s`` and ``s'`` is on the same branch as ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def chain_step(slot: int, n_thoughts: int) -> int:
    """Chain step ``c`` of ``slot`` (0 for the base slot)."""
    return 0 if slot == 0 else (slot - 1) // n_thoughts + 1


def chain_steps(n_slots: int, n_thoughts: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Chain step of every slot: ``[n_slots]`` int64."""
    slots = torch.arange(n_slots, device=device)
    return torch.where(slots == 0, 0, torch.div(slots - 1, n_thoughts, rounding_mode="floor") + 1)


def base_positions(attention_mask: torch.Tensor | None, batch: int, slot_len: int, device) -> torch.Tensor:
    """Position ids of the base text ``[B, L]``: counted over real tokens only, so a
    left-padded row starts at 0 like an unpadded one (padding gets 0)."""
    if attention_mask is None:
        return torch.arange(slot_len, device=device).expand(batch, slot_len)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def tree_position_ids(base: torch.Tensor, n_slots: int, n_thoughts: int) -> torch.Tensor:
    """Position ids of the flat layout ``[B, n_slots * L]``: token ``(s, i)`` gets
    ``base[:, i] + c(s)``."""
    steps = chain_steps(n_slots, n_thoughts, base.device)
    return (base[:, None, :] + steps[None, :, None]).flatten(1)


def chain_visibility(
    n_query_slots: int, n_key_slots: int, n_thoughts: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Which chain key slots each query slot sees at its own position.

    Returns:
        ``[n_query_slots, n_key_slots]`` bool; query slot ``j`` is key slot
        ``n_key_slots - n_query_slots + j``. Column 0 (the base slot) is always False.
    """
    q_slots = torch.arange(n_key_slots - n_query_slots, n_key_slots, device=device)[:, None]
    k_slots = torch.arange(n_key_slots, device=device)[None, :]
    same_branch = torch.remainder(q_slots - 1, n_thoughts) == torch.remainder(k_slots - 1, n_thoughts)
    return (k_slots >= 1) & (q_slots >= 1) & (k_slots <= q_slots) & same_branch


def base_visibility(
    slot_len: int,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Which base keys each base position sees: causal, windowed, padding removed.

    Returns:
        ``[slot_len, slot_len]`` bool (query position, key position), or
        ``[B, slot_len, slot_len]`` when ``key_padding_mask`` (``[B, slot_len]``, True = real
        token) is given.
    """
    if key_padding_mask is not None:
        device = key_padding_mask.device
    i = torch.arange(slot_len, device=device)[:, None]
    k = torch.arange(slot_len, device=device)[None, :]
    visible = k <= i
    if sliding_window is not None:
        visible = visible & (i - k < sliding_window)
    if key_padding_mask is not None:
        visible = visible[None] & key_padding_mask[:, None, :].bool()
    return visible


def tree_visibility(
    slot_len: int,
    n_query_slots: int,
    n_key_slots: int,
    n_thoughts: int = 1,
    sliding_window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The dense tree mask: ``[B or 1, n_query_slots * slot_len, n_key_slots * slot_len]`` bool.

    This is what the reference paths use; the fast paths never build it.
    """
    base = base_visibility(slot_len, sliding_window, key_padding_mask, device)
    if base.dim() == 2:
        base = base[None]
    device = base.device
    n_batch = base.shape[0]
    mask = torch.zeros(
        n_batch, n_query_slots, slot_len, n_key_slots, slot_len, dtype=torch.bool, device=device
    )
    mask[:, :, :, 0, :] = base[:, None]
    chain = chain_visibility(n_query_slots, n_key_slots, n_thoughts, device)
    diagonal = torch.eye(slot_len, dtype=torch.bool, device=device)
    mask |= chain[None, :, None, :, None] & diagonal[None, None, :, None, :]
    return mask.reshape(n_batch, n_query_slots * slot_len, n_key_slots * slot_len)


@dataclass(frozen=True)
class TreeLayout:
    """What an attention call needs to know that its input holds the tree layout.

    Passed to the attention layers as the keyword ``tree_layout``; queries are the last
    ``Sq`` slots of the ``Sk`` key slots (a KV cache holding earlier slots is fine).

    Attributes:
        slot_len: tokens per slot ``L``.
        n_thoughts: branches per position (chain slots are step-major).
        key_padding_mask: ``[B, L]`` bool, True for real tokens of the base text.
        backend: ``tree_attention`` backend to force (None: the default choice).
    """

    slot_len: int
    n_thoughts: int = 1
    key_padding_mask: torch.Tensor | None = None
    backend: str | None = None
