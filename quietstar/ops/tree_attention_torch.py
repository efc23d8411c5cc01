"""``tree_attention`` composed from PyTorch ops: the CPU fast path (and, on CUDA, the
choice for what the kernels do not cover).

No ``Sq*L x Sk*L`` mask or score matrix is built. Each query slot attends causally over the
``L`` base keys (an ``L x L`` block) and, by a per-position dot product, over the at most
``C`` chain keys of its own branch; the two parts share one softmax (one running maximum and
one normaliser, i.e. they are merged through their log-sum-exp). Forward and backward run over
chunks of query slots sized from a memory budget, and the backward recomputes the
probabilities from the saved log-sum-exp (FlashAttention style), so what autograd keeps per
call is ``q, k, v``, the output and one float per query.
"""

from __future__ import annotations

import torch

from quietstar.ops.layout import base_visibility, chain_visibility

# Bytes of float32 scores one chunk of query slots may take (several buffers of this size
# live at once in the backward).
CHUNK_BYTES = 64 * 2**20


def _slots_per_chunk(batch: int, q_heads: int, slot_len: int, n_keys: int) -> int:
    per_slot = 4 * batch * q_heads * slot_len * n_keys
    return max(1, CHUNK_BYTES // per_slot)


class _Tree:
    """Views of q, k, v and the masks in the shapes the einsums below use.

    q: ``[B, Hkv, G, Sq, L, D]``; base keys ``[B, Hkv, L, D]``; chain keys
    ``[B, Hkv, Sk - 1, L, D]`` (slots 1..Sk-1); base mask broadcastable to
    ``[B, 1, 1, 1, L, L]``; chain mask ``[Sq, Sk - 1]``.
    """

    def __init__(self, q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window):
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        self.group = q_heads // kv_heads
        self.n_q_slots, self.n_k_slots = q_len // slot_len, k_len // slot_len
        self.shape_q = (batch, kv_heads, self.group, self.n_q_slots, slot_len, head_dim)
        self.slot_len = slot_len
        base = base_visibility(slot_len, sliding_window, key_padding_mask, q.device)
        self.base_mask = base.view(-1, 1, 1, 1, slot_len, slot_len)
        self.chain_mask = chain_visibility(self.n_q_slots, self.n_k_slots, n_thoughts, q.device)[:, 1:]
        self.chunk = _slots_per_chunk(batch, q_heads, slot_len, slot_len + self.n_k_slots)

    def split_kv(self, t: torch.Tensor, compute: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        batch, kv_heads, _, head_dim = t.shape
        t = t.to(compute)
        base = t[:, :, : self.slot_len]
        chain = t[:, :, self.slot_len :].reshape(batch, kv_heads, self.n_k_slots - 1, self.slot_len, head_dim)
        return base, chain

    def chunks(self):
        for start in range(0, self.n_q_slots, self.chunk):
            yield slice(start, min(start + self.chunk, self.n_q_slots))

    def scores(self, q_chunk, k_base, k_chain, rows: slice, scale: float):
        """Masked scaled scores of one chunk: base ``[..., L, L]`` and chain ``[..., L, Sk-1]``."""
        base = torch.einsum("bhgjid,bhkd->bhgjik", q_chunk, k_base) * scale
        base = base.masked_fill(~self.base_mask, float("-inf"))
        chain = torch.einsum("bhgjid,bhsid->bhgjis", q_chunk, k_chain) * scale
        chain = chain.masked_fill(~self.chain_mask[rows, None, :], float("-inf"))
        return base, chain


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TreeAttentionTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale):
        tree = _Tree(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window)
        compute = _compute_dtype(q.dtype)
        q6 = q.view(tree.shape_q)
        k_base, k_chain = tree.split_kv(k, compute)
        v_base, v_chain = tree.split_kv(v, compute)
        out = torch.empty(tree.shape_q, dtype=q.dtype, device=q.device)
        lse = torch.empty(tree.shape_q[:-1], dtype=compute, device=q.device)
        for rows in tree.chunks():
            s_base, s_chain = tree.scores(q6[:, :, :, rows].to(compute), k_base, k_chain, rows, scale)
            row_max = s_base.amax(-1)
            if s_chain.shape[-1]:  # Sk == 1 has no chain keys
                row_max = torch.maximum(row_max, s_chain.amax(-1))
            row_max = torch.where(torch.isinf(row_max), 0.0, row_max)
            p_base = torch.exp(s_base - row_max[..., None])
            p_chain = torch.exp(s_chain - row_max[..., None])
            norm = p_base.sum(-1) + p_chain.sum(-1)
            acc = torch.einsum("bhgjik,bhkd->bhgjid", p_base, v_base)
            acc += torch.einsum("bhgjis,bhsid->bhgjid", p_chain, v_chain)
            empty = norm == 0
            out[:, :, :, rows] = (acc / torch.where(empty, 1.0, norm)[..., None]).to(q.dtype)
            # Rows that see nothing keep log-sum-exp 0: exp(-inf - 0) = 0 in the backward.
            lse[:, :, :, rows] = torch.where(empty, 0.0, row_max + torch.log(norm))
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.options = (slot_len, n_thoughts, sliding_window, scale)
        return out.view(q.shape)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        slot_len, n_thoughts, sliding_window, scale = ctx.options
        tree = _Tree(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window)
        compute = _compute_dtype(q.dtype)
        q6 = q.view(tree.shape_q)
        do6 = grad_out.reshape(tree.shape_q)
        k_base, k_chain = tree.split_kv(k, compute)
        v_base, v_chain = tree.split_kv(v, compute)
        dq = torch.empty(tree.shape_q, dtype=q.dtype, device=q.device)
        dk_base, dk_chain = torch.zeros_like(k_base), torch.zeros_like(k_chain)
        dv_base, dv_chain = torch.zeros_like(v_base), torch.zeros_like(v_chain)
        for rows in tree.chunks():
            q_c = q6[:, :, :, rows].to(compute)
            do_c = do6[:, :, :, rows].to(compute)
            lse_c = lse[:, :, :, rows, :, None]
            delta = (do_c * out[:, :, :, rows].to(compute)).sum(-1, keepdim=True)
            s_base, s_chain = tree.scores(q_c, k_base, k_chain, rows, scale)
            p_base, p_chain = torch.exp(s_base - lse_c), torch.exp(s_chain - lse_c)
            dv_base += torch.einsum("bhgjik,bhgjid->bhkd", p_base, do_c)
            dv_chain += torch.einsum("bhgjis,bhgjid->bhsid", p_chain, do_c)
            ds_base = p_base * (torch.einsum("bhgjid,bhkd->bhgjik", do_c, v_base) - delta) * scale
            ds_chain = p_chain * (torch.einsum("bhgjid,bhsid->bhgjis", do_c, v_chain) - delta) * scale
            dq_c = torch.einsum("bhgjik,bhkd->bhgjid", ds_base, k_base)
            dq_c += torch.einsum("bhgjis,bhsid->bhgjid", ds_chain, k_chain)
            dq[:, :, :, rows] = dq_c.to(q.dtype)
            dk_base += torch.einsum("bhgjik,bhgjid->bhkd", ds_base, q_c)
            dk_chain += torch.einsum("bhgjis,bhgjid->bhsid", ds_chain, q_c)
        dk = torch.cat([dk_base, dk_chain.flatten(2, 3)], dim=2).to(k.dtype)
        dv = torch.cat([dv_base, dv_chain.flatten(2, 3)], dim=2).to(v.dtype)
        return dq.view(q.shape), dk, dv, None, None, None, None, None


def tree_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_len: int,
    n_thoughts: int,
    key_padding_mask: torch.Tensor | None,
    sliding_window: int | None,
    scale: float,
) -> torch.Tensor:
    """Tree attention without dense masks; arguments as ``quietstar.tree_attention``."""
    return TreeAttentionTorch.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), slot_len, n_thoughts, key_padding_mask, sliding_window, scale
    )
