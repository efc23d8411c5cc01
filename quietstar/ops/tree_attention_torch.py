"""``tree_attention`` composed from PyTorch ops: the CPU fast path (and, on CUDA, the choice for
what the Triton kernels do not cover).

A query of slot ``j`` at position ``i`` attends to two disjoint sets of keys, merged through
their log-sum-exp:

* **the trunk**: the causal text keys ``0..i`` (windowed, padding removed). Every query slot is
  one causal sequence over the same ``L`` text keys, so for each batch row the query slots are
  the batch of ONE call of PyTorch's fused flash-attention kernel: ``q`` seen as
  ``[Sq, Hq, L, D]`` (a view), the text keys broadcast over the slots (stride 0, no copy), GQA
  inside the kernel. It returns the trunk's output (already in ``q``'s layout) and
  log-sum-exp. Where that kernel is missing (CUDA tensors: the Triton backend is the fast path
  there) a chunked composed version computes the same two.
* **the chain**: at most ``C * N`` keys per query, all at its own position: one batched matrix
  product per position, ``[G * Sq, D] x [D, Sk - 1]``, in a position-major copy of ``q``.

The output is ``exp(lse_t - lse) * out_t + exp(lse_c - lse) * out_c`` with
``lse = logaddexp(lse_t, lse_c)``. The backward gives both parts the *merged* output and
log-sum-exp (as ring attention does): the flash kernel's backward then returns exactly the
trunk's share of the gradients, and the chain's share is formed alongside; they add. What
autograd keeps per call is ``q, k, v``, the output and one float per query.
"""

from __future__ import annotations

import torch

from quietstar._checks import HALF_DTYPES
from quietstar.ops.backends import autocast_off
from quietstar.ops.first_order import first_order_only
from quietstar.ops.layout import base_visibility, chain_visibility

# Bytes of float32 scores one chunk of the composed trunk may take (several buffers of this
# size live at once in its backward).
CHUNK_BYTES = 64 * 2**20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def has_flash_kernel(device: torch.device) -> bool:
    """Whether PyTorch's fused flash-attention kernel that returns the log-sum-exp runs here."""
    return device.type == "cpu"


class TreeViews:
    """One call's shapes and masks, and the views of ``q``, ``k``, ``v`` the two parts use.

    Head-major: ``q`` as ``[B, Hq, Sq, L, D]`` (``Hq = Hkv * G``); position-major (the
    chain's): ``[B * Hkv * L, G * Sq, D]``, keys ``[B * Hkv * L, Sk - 1, D]``.
    """

    def __init__(self, q, k, slot_len, n_thoughts, key_padding_mask, sliding_window, use_flash):
        batch, q_heads, q_len, head_dim = q.shape
        kv_heads, k_len = k.shape[1], k.shape[2]
        self.batch, self.q_heads, self.kv_heads, self.head_dim = batch, q_heads, kv_heads, head_dim
        self.slot_len, self.use_flash = slot_len, use_flash
        self.n_q_slots, self.n_k_slots = q_len // slot_len, k_len // slot_len
        self.group = q_heads // kv_heads
        self.slots_shape = (batch, q_heads, self.n_q_slots, slot_len, head_dim)
        # None: plain causal (the kernel's own mask); else [B or 1, L, L] bool, True = visible.
        self.trunk_visible = None
        if key_padding_mask is not None or sliding_window is not None:
            visible = base_visibility(slot_len, sliding_window, key_padding_mask, q.device)
            self.trunk_visible = visible if visible.dim() == 3 else visible[None]
        # [Sq, Sk - 1] -> per (g, j) row of a position: [G * Sq, Sk - 1]
        chain = chain_visibility(self.n_q_slots, self.n_k_slots, n_thoughts, q.device)[:, 1:]
        self.chain_visible = chain.repeat(self.group, 1)

    def trunk_bias(self, b: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Batch row ``b``'s additive trunk mask ``[1, 1, L, L]`` (0 visible, -inf hidden), or None."""
        if self.trunk_visible is None:
            return None
        visible = self.trunk_visible[min(b, self.trunk_visible.shape[0] - 1)]
        return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))[None, None]

    def trunk_empty(self) -> torch.Tensor | None:
        """``[B or 1, 1, 1, L]`` True where a query sees no text key (all padding), or None."""
        return None if self.trunk_visible is None else ~self.trunk_visible.any(-1)[:, None, None]

    def slots_of(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """Batch row ``b`` of a ``[B, Hq, Sq * L, D]`` tensor as the kernel's ``[Sq, Hq, L, D]`` (a view)."""
        return t[b].view(self.q_heads, self.n_q_slots, self.slot_len, self.head_dim).transpose(0, 1)

    def text_keys_of(self, t: torch.Tensor, b: int) -> torch.Tensor:
        """Batch row ``b``'s text keys or values broadcast over the query slots: ``[Sq, Hkv, L, D]``."""
        return t[b : b + 1, :, : self.slot_len].expand(self.n_q_slots, -1, -1, -1)

    def to_positions(self, t: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """A ``[B, Hq, Sq * L, D]`` tensor position-major: ``[B * Hkv * L, G * Sq, D]`` (a copy)."""
        shape = (self.batch, self.kv_heads, self.group * self.n_q_slots, self.slot_len, self.head_dim)
        return t.view(shape).transpose(2, 3).to(compute).reshape(-1, self.group * self.n_q_slots, self.head_dim)

    def from_positions(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of ``to_positions``, head-major ``[B, Hq, Sq, L, D]`` (a copy)."""
        shape = (self.batch, self.kv_heads, self.slot_len, self.group * self.n_q_slots, self.head_dim)
        return t.view(shape).transpose(2, 3).reshape(self.slots_shape)

    def chain_keys(self, t: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        """The chain keys or values of ``[B, Hkv, Sk * L, D]`` position-major: ``[B * Hkv * L, Sk - 1, D]``."""
        chain = t[:, :, self.slot_len :].view(self.batch, self.kv_heads, self.n_k_slots - 1, self.slot_len, self.head_dim)
        return chain.transpose(2, 3).to(compute).reshape(-1, self.n_k_slots - 1, self.head_dim)

    def chain_key_grad(self, t: torch.Tensor) -> torch.Tensor:
        """A position-major chain-key gradient back as ``[B, Hkv, (Sk - 1) * L, D]``."""
        shape = (self.batch, self.kv_heads, self.slot_len, self.n_k_slots - 1, self.head_dim)
        return t.view(shape).transpose(2, 3).reshape(self.batch, self.kv_heads, -1, self.head_dim)

    def positions_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """Head-major ``[B, Hq, Sq, L]`` per-query values (log-sum-exps, deltas) position-major:
        ``[B * Hkv * L, G * Sq]``."""
        shape = (self.batch, self.kv_heads, self.group * self.n_q_slots, self.slot_len)
        return lse.reshape(shape).transpose(2, 3).reshape(-1, self.group * self.n_q_slots)

    def heads_lse(self, lse: torch.Tensor) -> torch.Tensor:
        """The inverse of ``positions_lse``: ``[B, Hq, Sq, L]``."""
        shape = (self.batch, self.kv_heads, self.slot_len, self.group * self.n_q_slots)
        return lse.view(shape).transpose(2, 3).reshape(self.slots_shape[:-1])

    def chain_scores(self, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float) -> torch.Tensor:
        """Masked chain scores ``[B * Hkv * L, G * Sq, Sk - 1]``."""
        return torch.bmm(q_pos, k_pos.transpose(1, 2)).mul_(scale).masked_fill_(~self.chain_visible, float("-inf"))


# --- the trunk: flash kernel, or composed in chunks -------------------------------------------


def trunk_forward(tree: TreeViews, q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Trunk output ``[B, Hq, Sq, L, D]`` (q's dtype) and log-sum-exp ``[B, Hq, Sq, L]`` (float32
    or float64; ``-inf`` for a query that sees no text key)."""
    compute = _compute_dtype(q.dtype)
    if not tree.use_flash:
        return _composed_trunk_forward(tree, q, k, v, scale)
    outs, lses = [], []
    for b in range(tree.batch):
        bias = tree.trunk_bias(b, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            tree.slots_of(q, b), tree.text_keys_of(k, b), tree.text_keys_of(v, b), 0.0, bias is None,
            attn_mask=bias, scale=scale,
        )
        outs.append(out.transpose(0, 1))  # [Hq, Sq, L, D], in q's memory order
        lses.append(lse.transpose(0, 1).to(compute))
    lse = _batch(lses)
    empty = tree.trunk_empty()
    if empty is not None:  # the kernel reports lse 0 (not -inf) for a query that sees nothing
        lse = lse.masked_fill(empty, float("-inf"))
    return _batch(outs), lse


def trunk_backward(tree: TreeViews, grad_out, q, k, v, out, lse, scale: float):
    """``(dq [B, Hq, Sq, L, D], dk, dv [B, Hkv, L, D])``: the trunk's share, given the merged
    output and log-sum-exp."""
    if not tree.use_flash:
        return _composed_trunk_backward(tree, grad_out, q, k, v, out, lse, scale)
    kernel_lse = torch.float64 if q.dtype == torch.float64 else torch.float32
    dqs, dks, dvs = [], [], []
    for b in range(tree.batch):
        bias = tree.trunk_bias(b, q.dtype)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            tree.slots_of(grad_out, b), tree.slots_of(q, b), tree.text_keys_of(k, b), tree.text_keys_of(v, b),
            tree.slots_of(out, b), lse[b].transpose(0, 1).to(kernel_lse), 0.0, bias is None, attn_mask=bias, scale=scale,
        )
        dqs.append(dq.transpose(0, 1))
        dks.append(dk.sum(0))  # the text keys serve every query slot
        dvs.append(dv.sum(0))
    return _batch(dqs), _batch(dks), _batch(dvs)


def _batch(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-row results as one batch (a view when there is one row)."""
    return rows[0][None] if len(rows) == 1 else torch.stack(rows)


def _trunk_chunks(tree: TreeViews):
    """Slices of the KV heads whose query heads' float32 scores fit CHUNK_BYTES."""
    per_head = 4 * tree.batch * tree.group * tree.n_q_slots * tree.slot_len**2
    heads = max(1, CHUNK_BYTES // per_head)
    for start in range(0, tree.kv_heads, heads):
        yield slice(start, min(start + heads, tree.kv_heads))


def _composed_view(tree: TreeViews, t: torch.Tensor, kv: slice, compute: torch.dtype) -> torch.Tensor:
    """Query-side ``[B, Hq, ...]`` rows of the KV heads ``kv`` as ``[B, kv, G * Sq, L, D]``."""
    shape = (tree.batch, tree.kv_heads, tree.group * tree.n_q_slots, tree.slot_len, -1)
    return t.reshape(shape)[:, kv].to(compute)


def _composed_scores(tree: TreeViews, q_c, k_c, scale):
    """Masked trunk scores of a chunk: ``[B, kv, G * Sq, L, L]``."""
    scores = torch.einsum("bhgid,bhkd->bhgik", q_c, k_c) * scale
    visible = torch.ones(tree.slot_len, tree.slot_len, dtype=torch.bool, device=q_c.device).tril()
    if tree.trunk_visible is not None:
        visible = tree.trunk_visible[:, None, None]
    return scores.masked_fill(~visible, float("-inf"))


def _composed_trunk_forward(tree: TreeViews, q, k, v, scale):
    compute = _compute_dtype(q.dtype)
    out = torch.empty(tree.slots_shape, dtype=compute, device=q.device)
    lse = torch.empty(tree.slots_shape[:-1], dtype=compute, device=q.device)
    out_v, lse_v = out.view(tree.batch, tree.kv_heads, -1, tree.slot_len, tree.head_dim), lse.view(tree.batch, tree.kv_heads, -1, tree.slot_len)
    for kv in _trunk_chunks(tree):
        scores = _composed_scores(tree, _composed_view(tree, q, kv, compute), k[:, kv, : tree.slot_len].to(compute), scale)
        chunk_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - torch.where(torch.isinf(chunk_lse), 0.0, chunk_lse)[..., None])
        out_v[:, kv] = torch.einsum("bhgik,bhkd->bhgid", probs, v[:, kv, : tree.slot_len].to(compute))
        lse_v[:, kv] = chunk_lse
    return out, lse


def _composed_trunk_backward(tree: TreeViews, grad_out, q, k, v, out, lse, scale):
    compute = _compute_dtype(q.dtype)
    dq = torch.empty(tree.slots_shape, dtype=compute, device=q.device)
    dk = torch.empty(tree.batch, tree.kv_heads, tree.slot_len, tree.head_dim, dtype=compute, device=q.device)
    dv = torch.empty_like(dk)
    dq_v = dq.view(tree.batch, tree.kv_heads, -1, tree.slot_len, tree.head_dim)
    lse_v = lse.reshape(tree.batch, tree.kv_heads, -1, tree.slot_len)
    for kv in _trunk_chunks(tree):
        q_c, do_c = _composed_view(tree, q, kv, compute), _composed_view(tree, grad_out, kv, compute)
        k_c, v_c = k[:, kv, : tree.slot_len].to(compute), v[:, kv, : tree.slot_len].to(compute)
        delta = (do_c * _composed_view(tree, out, kv, compute)).sum(-1, keepdim=True)
        probs = torch.exp(_composed_scores(tree, q_c, k_c, scale) - lse_v[:, kv][..., None])
        ds = probs * (torch.einsum("bhgid,bhkd->bhgik", do_c, v_c) - delta) * scale
        dq_v[:, kv] = torch.einsum("bhgik,bhkd->bhgid", ds, k_c)
        dk[:, kv] = torch.einsum("bhgik,bhgid->bhkd", ds, q_c)
        dv[:, kv] = torch.einsum("bhgik,bhgid->bhkd", probs, do_c)
    return dq, dk, dv


# --- the op ---------------------------------------------------------------------------------


class TreeAttentionTorch(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale, use_flash):
        tree = TreeViews(q, k, slot_len, n_thoughts, key_padding_mask, sliding_window, use_flash)
        compute = _compute_dtype(q.dtype)
        out_t, lse_t = trunk_forward(tree, q, k, v, scale)
        if tree.n_k_slots > 1:
            scores = tree.chain_scores(tree.to_positions(q, compute), tree.chain_keys(k, compute), scale)
            top = scores.amax(-1, keepdim=True)
            top = top.masked_fill_(torch.isinf(top), 0.0)  # a query with no chain key: all -inf
            probs = scores.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)
            lse_c = (top + total.log()).squeeze(-1)
            out_c = tree.from_positions(torch.bmm(probs.div_(total.clamp_(min=torch.finfo(compute).tiny)), tree.chain_keys(v, compute)))
            lse = torch.logaddexp(lse_t, tree.heads_lse(lse_c))
            lse = lse.masked_fill(torch.isinf(lse), 0.0)  # seeing nothing: output 0, exp(-inf - 0) = 0 later
            # The two parts' weights add to 1 (or both are 0): one interpolation.
            out = torch.lerp(out_c, out_t.to(compute), torch.exp(lse_t - lse)[..., None])
        else:  # Sk == 1: no chain keys
            out, lse = out_t, lse_t.masked_fill(torch.isinf(lse_t), 0.0)
        # contiguous: the merge may inherit the kernel's strides, and the backward views it
        out = out.to(q.dtype).reshape(q.shape).contiguous()
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.options = (slot_len, n_thoughts, sliding_window, scale, use_flash)
        return out

    @staticmethod
    @first_order_only("tree_attention")
    @autocast_off
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        slot_len, n_thoughts, sliding_window, scale, use_flash = ctx.options
        tree = TreeViews(q, k, slot_len, n_thoughts, key_padding_mask, sliding_window, use_flash)
        compute = _compute_dtype(q.dtype)
        grad_out = grad_out.contiguous()
        dq, dk_text, dv_text = trunk_backward(tree, grad_out, q, k, v, out, lse, scale)
        dq = dq.to(compute)
        if tree.n_k_slots > 1:
            q_pos, do_pos = tree.to_positions(q, compute), tree.to_positions(grad_out, compute)
            k_pos, v_pos = tree.chain_keys(k, compute), tree.chain_keys(v, compute)
            delta = (grad_out.to(compute) * out.to(compute)).sum(-1).view(tree.slots_shape[:-1])
            delta = tree.positions_lse(delta)[..., None]
            probs = torch.exp(tree.chain_scores(q_pos, k_pos, scale) - tree.positions_lse(lse)[..., None])
            ds = probs * (torch.bmm(do_pos, v_pos.transpose(1, 2)) - delta) * scale
            dq = dq + tree.from_positions(torch.bmm(ds, k_pos))
            dk_chain = tree.chain_key_grad(torch.bmm(ds.transpose(1, 2), q_pos))
            dv_chain = tree.chain_key_grad(torch.bmm(probs.transpose(1, 2), do_pos))
            dk = torch.cat([dk_text.to(compute), dk_chain], dim=2)
            dv = torch.cat([dv_text.to(compute), dv_chain], dim=2)
        else:
            dk, dv = dk_text, dv_text
        return dq.to(q.dtype).reshape(q.shape), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def tree_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_len: int,
    n_thoughts: int,
    key_padding_mask: torch.Tensor | None,
    sliding_window: int | None,
    scale: float,
    use_flash: bool | None = None,
) -> torch.Tensor:
    """Tree attention without dense masks; arguments as ``quietstar.tree_attention``.

    ``use_flash``: the trunk through PyTorch's fused flash kernel (default: where it exists);
    False forces the composed trunk (tests run both).
    """
    use_flash = has_flash_kernel(q.device) if use_flash is None else use_flash
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in HALF_DTYPES:
        # PyTorch's CPU flash backward runs about 1.8x slower in bfloat16 than in float32 (2-core
        # EPYC with AVX-512 BF16), and attention is a small share of a step's FLOPs: compute in
        # float32 (the casts are differentiable), return q's dtype.
        q, k, v = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (q, k, v))
        out = TreeAttentionTorch.apply(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale, use_flash)
        return out.to(dtype)
    return TreeAttentionTorch.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), slot_len, n_thoughts, key_padding_mask, sliding_window, scale,
        use_flash,
    )
