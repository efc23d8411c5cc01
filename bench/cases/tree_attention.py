"""tree_attention forward + backward per backend, against the dense reference.

Public alternative: FlexAttention with the tree rule as its mask; compiled forward +
backward on CUDA, forward only on CPU (FlexAttention has no CPU backward).
"""

from __future__ import annotations

import torch

from quietstar import tree_attention

BASELINE = "reference"
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def variants(device: torch.device) -> list[str]:
    backends = ["reference", "torch"] + (["triton"] if device.type == "cuda" else [])
    return backends + ["flex"]


def size(device: torch.device, quick: bool) -> dict:
    if quick:
        return dict(batch=1, q_heads=4, kv_heads=2, head_dim=32, slot_len=32, n_slots=5, n_thoughts=2)
    # The paper's setting: two branches of 14 chain steps (29 slots) at length 256.
    heads = dict(q_heads=9, kv_heads=3, head_dim=64) if device.type == "cpu" else dict(q_heads=32, kv_heads=8, head_dim=128)
    return dict(batch=1, slot_len=256, n_slots=29, n_thoughts=2, **heads)


def _inputs(s: dict, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPE[device.type]
    q_len, k_len = s["n_slots"] * s["slot_len"], s["n_slots"] * s["slot_len"]

    def randn(heads, length):
        return torch.randn(s["batch"], heads, length, s["head_dim"], generator=gen, device=device, dtype=dtype)

    q = randn(s["q_heads"], q_len).requires_grad_()
    k = randn(s["kv_heads"], k_len).requires_grad_()
    v = randn(s["kv_heads"], k_len).requires_grad_()
    return q, k, v


def _flex_step(s: dict, q, k, v, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    slot_len, n_thoughts = s["slot_len"], s["n_thoughts"]

    def tree_rule(b, h, q_idx, kv_idx):  # SPEC section 1 with Sq == Sk
        q_slot, q_pos = q_idx // slot_len, q_idx % slot_len
        k_slot, k_pos = kv_idx // slot_len, kv_idx % slot_len
        base = (k_slot == 0) & (k_pos <= q_pos)
        same_branch = (k_slot - 1) % n_thoughts == (q_slot - 1) % n_thoughts
        chain = (k_slot >= 1) & (k_pos == q_pos) & (k_slot <= q_slot) & same_branch
        return base | chain

    block_mask = create_block_mask(tree_rule, None, None, q.shape[2], k.shape[2], device=device)
    if device.type == "cuda":
        attend = torch.compile(flex_attention)

        def step():
            out = attend(q, k, v, block_mask=block_mask, enable_gqa=True)
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

        return step

    q, k, v = q.detach(), k.detach(), v.detach()
    attend = torch.compile(flex_attention)

    def step():
        attend(q, k, v, block_mask=block_mask, enable_gqa=True)

    return step


def build(variant: str, s: dict, device: torch.device):
    q, k, v = _inputs(s, device)
    if variant == "flex":
        step = _flex_step(s, q, k, v, device)
        step()  # compile outside the measurement
        return step, {"note": "compiled, forward only (no CPU backward)" if device.type == "cpu" else "compiled"}

    def step():
        out = tree_attention(q, k, v, s["slot_len"], n_thoughts=s["n_thoughts"], backend=variant)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    return step, {}
