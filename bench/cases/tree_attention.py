"""tree_attention forward + backward per backend, against the dense reference (CPU) or
FlexAttention (CUDA, where the dense reference's ``[Sq*L, Sk*L]`` mask cannot fit).

Public alternative: FlexAttention with the tree rule as its block mask; compiled forward +
backward on CUDA, forward only on CPU (FlexAttention has no CPU backward). On CUDA the floor
is plain causal attention (SDPA's FlashAttention kernel) over the same queries: every query
slot is one causal sequence of ``L`` tokens over its own ``L`` keys, i.e. the tree's base
part without the chain keys and without summing key gradients over slots.

The decode size (``--full`` on CPU, ``query_slots`` set) is one step of thought sampling:
the last ``query_slots`` slots query the whole tree, forward only, keys and values the filled
part of a longer cache buffer; its floor is causal attention over those slots' queries.
"""

from __future__ import annotations

import contextlib

import torch

from quietstar import tree_attention

DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
GPU_LENGTHS = (4096, 2048, 1024)  # the target size first: a run cut short keeps it
CPU_LENGTHS = (256, 1024, 4096)  # the full scale; the default runs L=128
# bfloat16 on CPU (--full, where the CPU multiplies it natively): `torch` computes it in float32,
# `native` too below HALF_TRUNK_MIN_LENGTH (4096) and as stored from there.
CPU_HALF_LENGTHS = (256, 1024, 4096)
# Decode on CPU (--full): one sampling step's query slots (one per branch) against the tree.
CPU_DECODE = dict(slot_len=1024, query_slots=2)
# Slots of cache beyond the filled part in the decode size's buffers (read in place, not copied).
DECODE_SPARE_SLOTS = 2
# FlexAttention on CPU builds its block mask from a dense [Sq*L, Sk*L] bool mask (1.2 GB at L=1024).
FLEX_MAX_LENGTH_CPU = 1024
# The dense reference's float32 scores alone are B*Hq*(29L)^2*4 bytes: 31 GiB at L=1024.
REFERENCE_MAX_LENGTH_CPU = 256
# The torch backend holds one slot's float32 scores at a time: B*Hq*L*L*4 bytes (17 GiB at
# L=4096 with B=8, Hq=32), several times over in the backward.
TORCH_BACKEND_MAX_LENGTH_CUDA = 1024


def baseline(device: torch.device) -> str:
    return "flex" if device.type == "cuda" else "reference"


def floor(device: torch.device) -> str | None:
    return "sdpa-causal"


def variants(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["flex", "sdpa-causal", "torch", "triton"]
    return ["reference", "torch", "native", "flex", "sdpa-causal"]


def sizes(device: torch.device, scale: str) -> list[dict]:
    if scale == "quick":
        return [dict(batch=1, q_heads=4, kv_heads=2, head_dim=32, slot_len=32, n_slots=5, n_thoughts=2)]
    if device.type == "cpu":
        # The paper's setting: two branches of 14 chain steps (29 slots) at length 256.
        layer = dict(batch=1, n_slots=29, n_thoughts=2, q_heads=9, kv_heads=3, head_dim=64)
        if scale != "full":
            return [dict(layer, slot_len=128)]
        from quietstar.ops.backends import bf16_matmul_on_cpu

        half = CPU_HALF_LENGTHS if bf16_matmul_on_cpu() else ()
        return (
            [dict(layer, slot_len=length) for length in CPU_LENGTHS]
            + [dict(layer, slot_len=length, dtype="bfloat16") for length in half]
            + [dict(layer, **CPU_DECODE)]
        )
    # A 7B-class layer.
    layer = dict(batch=8, n_slots=29, n_thoughts=2, q_heads=32, kv_heads=8, head_dim=128)
    return [dict(layer, slot_len=length) for length in GPU_LENGTHS]


def label(size: dict) -> str:
    decode = " decode" if "query_slots" in size else ""
    return f"L={size['slot_len']}{decode}" + (f" {size['dtype']}" if "dtype" in size else "")


def _query_slots(size: dict) -> int:
    return size.get("query_slots", size["n_slots"])


def _dtype(size: dict, device: torch.device) -> torch.dtype:
    return getattr(torch, size["dtype"]) if "dtype" in size else DTYPE[device.type]


def skip(variant: str, size: dict, device: torch.device) -> str | None:
    if variant == "native":
        from quietstar.ops.native import native_unavailable

        if native_unavailable():
            return f"not built: {native_unavailable()}"
    if variant == "torch" and device.type == "cuda" and size["slot_len"] > TORCH_BACKEND_MAX_LENGTH_CUDA:
        return f"not run above L={TORCH_BACKEND_MAX_LENGTH_CUDA} (one slot's float32 scores alone are B*Hq*L*L*4 bytes)"
    if variant == "flex" and device.type == "cpu" and size["slot_len"] < min(CPU_LENGTHS):
        return "forward only on CPU, and compiling takes longer than the rest of the case: --full runs it"
    if variant == "flex" and device.type == "cpu" and size["slot_len"] > FLEX_MAX_LENGTH_CPU:
        return f"not run above L={FLEX_MAX_LENGTH_CPU} on CPU (its block mask starts as a dense [29L, 29L] bool mask)"
    if variant in ("reference", "flex") and "query_slots" in size:
        return "decode compares the backends with the floor"
    if variant == "reference" and "dtype" in size:
        return "not run in half precision (the floor is the comparison there)"
    if variant == "reference" and device.type == "cpu" and size["slot_len"] > REFERENCE_MAX_LENGTH_CPU:
        return f"not run above L={REFERENCE_MAX_LENGTH_CPU} (its dense scores alone are B*Hq*(29L)^2*4 bytes)"
    return None


def visible_pairs(size: dict) -> tuple[int, int]:
    """(query, key) pairs that attend, per batch row and query head: (base part, chain part)."""
    length, n_slots, n_thoughts = size["slot_len"], size["n_slots"], size["n_thoughts"]
    first = n_slots - _query_slots(size)  # the query slots are the last key slots
    base = (n_slots - first) * length * (length + 1) // 2
    # Key slot s (>= 1) sees its own branch's chain keys of steps 1..c, c = (s - 1) // N + 1.
    chain = sum((s - 1) // n_thoughts + 1 for s in range(max(first, 1), n_slots)) * length
    return base, chain


def matmul_shapes(size: dict, device: torch.device) -> tuple[torch.dtype, list[tuple[int, int, int, int]]]:
    """The products of attention over one query slot: scores ``[L, D] x [D, L]`` and output
    ``[L, L] x [L, D]`` per head."""
    length, dim, heads = size["slot_len"], size["head_dim"], size["batch"] * size["q_heads"]
    return _dtype(size, device), [(heads, length, dim, length), (heads, length, length, dim)]


def useful_flops(size: dict, variant: str, device: torch.device) -> float:
    """Forward 4 and backward 8 FLOPs per visible (query, key) pair and head dim: the scores and
    the output, then the four products of the gradients (dV, dP, dQ, dK). FlashAttention's
    convention of 14 also counts the backward's recomputation of the scores, which the
    mathematics does not need. The floor has no chain pairs; FlexAttention on CPU and the
    decode size run the forward only."""
    base, chain = visible_pairs(size)
    pairs = base if variant == "sdpa-causal" else base + chain
    forward_only = "query_slots" in size or (variant == "flex" and device.type == "cpu")
    per_pair = 4.0 if forward_only else 12.0
    return per_pair * size["batch"] * size["q_heads"] * size["head_dim"] * pairs


def _inputs(s: dict, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = _dtype(s, device)
    length = s["n_slots"] * s["slot_len"]

    def randn(heads):
        return torch.randn(s["batch"], heads, length, s["head_dim"], generator=gen, device=device, dtype=dtype)

    q, k, v, grad = randn(s["q_heads"]), randn(s["kv_heads"]), randn(s["kv_heads"]), randn(s["q_heads"])
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), grad


def _decode_inputs(s: dict, device: torch.device):
    """The last ``query_slots`` slots' queries, and keys and values as the filled part of cache
    buffers ``DECODE_SPARE_SLOTS`` slots longer (views, as a KV cache hands them over)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype, length = _dtype(s, device), s["slot_len"]

    def randn(heads, slots):
        return torch.randn(s["batch"], heads, slots * length, s["head_dim"], generator=gen, device=device, dtype=dtype)

    q = randn(s["q_heads"], s["query_slots"])
    k, v = (randn(s["kv_heads"], s["n_slots"] + DECODE_SPARE_SLOTS)[:, :, : s["n_slots"] * length] for _ in range(2))
    return q, k, v


def _flex_step(s: dict, q, k, v, grad, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    slot_len, n_thoughts = s["slot_len"], s["n_thoughts"]

    def tree_rule(b, h, q_idx, kv_idx):  # SPEC section 1 with Sq == Sk
        q_slot, q_pos = q_idx // slot_len, q_idx % slot_len
        k_slot, k_pos = kv_idx // slot_len, kv_idx % slot_len
        base = (k_slot == 0) & (k_pos <= q_pos)
        same_branch = (k_slot - 1) % n_thoughts == (q_slot - 1) % n_thoughts
        chain = (k_slot >= 1) & (k_pos == q_pos) & (k_slot <= q_slot) & same_branch
        return base | chain

    # Compiled, the block mask is built without a dense [Sq*L, Sk*L] bool tensor (14 GB at L=4096).
    block_mask = create_block_mask(tree_rule, None, None, q.shape[2], k.shape[2], device=device, _compile=device.type == "cuda")
    attend = torch.compile(flex_attention)
    if device.type == "cuda":

        def step():
            out = attend(q, k, v, block_mask=block_mask, enable_gqa=True)
            torch.autograd.grad(out, (q, k, v), grad)

        return step

    q, k, v = q.detach(), k.detach(), v.detach()

    def step():
        attend(q, k, v, block_mask=block_mask, enable_gqa=True)

    return step


def _sdpa_causal_step(s: dict, device: torch.device):
    """Causal attention over B * n_slots sequences of L tokens, each with its own keys."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    gen = torch.Generator(device=device).manual_seed(0)
    rows = s["batch"] * _query_slots(s)

    def randn(heads):
        shape = (rows, heads, s["slot_len"], s["head_dim"])
        return torch.randn(shape, generator=gen, device=device, dtype=_dtype(s, device))

    q, k, v, grad = randn(s["q_heads"]), randn(s["kv_heads"]), randn(s["kv_heads"]), randn(s["q_heads"])
    inputs = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_())

    def step(flash_only: bool = True):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION) if flash_only else contextlib.nullcontext():
            with torch.no_grad() if "query_slots" in s else contextlib.nullcontext():
                out = scaled_dot_product_attention(*inputs, is_causal=True, enable_gqa=True)
        if out.requires_grad:
            torch.autograd.grad(out, inputs, grad)

    try:
        step()
        return step, "FlashAttention"
    except RuntimeError:  # no FlashAttention kernel for these inputs: SDPA's own choice
        step(flash_only=False)
        return (lambda: step(flash_only=False)), "SDPA's default backend"


def build(variant: str, s: dict, device: torch.device):
    if variant == "sdpa-causal":
        step, kernel = _sdpa_causal_step(s, device)
        return step, {"note": f"floor: {kernel}, causal, same queries, no chain"}
    if "query_slots" in s:
        q, k, v = _decode_inputs(s, device)

        def step():
            with torch.no_grad():
                tree_attention(q, k, v, s["slot_len"], n_thoughts=s["n_thoughts"], backend=variant)

        return step, {"note": f"decode: {s['query_slots']} query slots, forward, keys a cache's filled part"}
    q, k, v, grad = _inputs(s, device)
    if variant == "flex":
        step = _flex_step(s, q, k, v, grad, device)
        step()  # compile outside the measurement
        return step, {"note": "compiled, forward only (no CPU backward)" if device.type == "cpu" else "compiled, tree block mask"}

    def step():
        out = tree_attention(q, k, v, s["slot_len"], n_thoughts=s["n_thoughts"], backend=variant)
        torch.autograd.grad(out, (q, k, v), grad)

    return step, {}
