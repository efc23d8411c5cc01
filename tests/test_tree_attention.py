"""tree_attention: every backend against the dense reference, and the reference against an
independent per-query implementation of SPEC's tree rule."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import DEVICE, count_native_queries, relative_error, requires_native, requires_triton

from quietstar import tree_attention
from quietstar.ops.backends import BACKEND_ENV_VAR, resolve_backend

TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton), pytest.param("native", marks=requires_native)]


def make_inputs(batch, q_heads, kv_heads, slot_len, n_q, n_k, head_dim, dtype, padded=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(DEVICE, dtype).requires_grad_()

    q = randn(batch, q_heads, n_q * slot_len, head_dim)
    k = randn(batch, kv_heads, n_k * slot_len, head_dim)
    v = randn(batch, kv_heads, n_k * slot_len, head_dim)
    mask = None
    if padded:
        mask = torch.ones(batch, slot_len, dtype=torch.bool, device=DEVICE)
        mask[0, : slot_len // 2] = False  # left padding on the first row
        if batch > 1:
            mask[-1, slot_len - slot_len // 3 :] = False  # right padding on the last
    return q, k, v, mask


def run(backend, q, k, v, slot_len, grad_out, **options):
    out = tree_attention(q, k, v, slot_len, backend=backend, **options)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def assert_matches_reference(backend, q, k, v, slot_len, **options):
    tol = TOLERANCE[q.dtype]
    # The ground truth runs in float32 (float64 for float64) on the same (possibly half) inputs.
    truth = torch.float64 if q.dtype == torch.float64 else torch.float32
    q32, k32, v32 = (t.detach().to(truth).requires_grad_() for t in (q, k, v))
    ref = tree_attention(q32, k32, v32, slot_len, backend="reference", **options)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), grad_out)
    out, grads = run(backend, q, k, v, slot_len, grad_out.to(q.dtype), **options)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert relative_error(out, ref) <= tol, ("out", relative_error(out, ref))
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        assert torch.isfinite(grad).all(), f"d{name} has non-finite values"
        assert relative_error(grad, ref_grad) <= tol, (f"d{name}", relative_error(grad, ref_grad))


# (batch, q_heads, kv_heads, slot_len, n_q_slots, n_k_slots, n_thoughts, head_dim, padded, window)
CASES = {
    "L1-one-slot": (2, 2, 2, 1, 1, 1, 1, 16, False, None),
    "L7-Sq-eq-Sk-gqa4": (2, 4, 1, 7, 4, 4, 1, 16, False, None),
    "L7-two-branches-padded": (2, 4, 2, 7, 5, 5, 2, 32, True, None),
    "L64-Sq1-gqa3": (1, 3, 1, 64, 1, 5, 1, 16, False, None),
    "L64-Sq-lt-Sk-two-branches": (1, 6, 2, 64, 2, 7, 2, 16, True, None),
    "L100-window-gqa3": (1, 3, 1, 100, 3, 3, 1, 16, False, 9),
    "L100-window-padded-two-branches": (2, 2, 1, 100, 4, 5, 2, 64, True, 33),
}


def assert_case_matches_reference(backend, case, dtype):
    batch, hq, hkv, slot_len, n_q, n_k, n_thoughts, head_dim, padded, window = CASES[case]
    q, k, v, mask = make_inputs(batch, hq, hkv, slot_len, n_q, n_k, head_dim, dtype, padded)
    assert_matches_reference(
        backend, q, k, v, slot_len, n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window
    )


over_half_dtypes = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference_float32(backend, case, poisoned_allocations):
    assert_case_matches_reference(backend, case, torch.float32)


HALF_CASES = ["L7-two-branches-padded", "L64-Sq-lt-Sk-two-branches", "L100-window-gqa3"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", HALF_CASES)
@over_half_dtypes
def test_matches_reference_in_half_precision(backend, case, dtype, poisoned_allocations):
    assert_case_matches_reference(backend, case, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@over_half_dtypes
def test_half_inputs_in_the_models_memory_layout(backend, dtype, poisoned_allocations):
    """Half-precision q, k, v as a decoder layer hands them over: ``[B, T, H, D]`` memory seen
    as ``[B, H, T, D]`` (not contiguous)."""
    q, k, v, mask = make_inputs(2, 4, 2, 7, 5, 5, 32, dtype, padded=True)
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    assert not q.is_contiguous()
    assert_matches_reference(backend, q, k, v, 7, n_thoughts=2, key_padding_mask=mask)


@pytest.mark.parametrize("case", ["L7-two-branches-padded", "L64-Sq-lt-Sk-two-branches", "L100-window-padded-two-branches"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_torch_backend_composed_trunk_matches_reference(case, dtype, monkeypatch, poisoned_allocations):
    """The torch backend's trunk where PyTorch has no flash kernel that returns the
    log-sum-exp (CUDA): composed in chunks of KV groups, here forced on CPU."""
    import quietstar.ops.tree_attention_torch as torch_backend

    monkeypatch.setattr(torch_backend, "has_flash_kernel", lambda device: False)
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 1)  # one KV group per chunk
    batch, hq, hkv, slot_len, n_q, n_k, n_thoughts, head_dim, padded, window = CASES[case]
    q, k, v, mask = make_inputs(batch, hq, hkv, slot_len, n_q, n_k, head_dim, dtype, padded)
    assert_matches_reference("torch", q, k, v, slot_len, n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window)


@requires_triton
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_triton_supports_every_head_dim(head_dim, poisoned_allocations):
    q, k, v, mask = make_inputs(1, 2, 1, 5, 2, 3, head_dim, torch.float32, padded=True)
    assert_matches_reference("triton", q, k, v, 5, n_thoughts=2, key_padding_mask=mask)


def tree_attention_per_query(q, k, v, slot_len, n_thoughts, key_padding_mask, sliding_window, scale):
    """SPEC section 1 written out query by query, independently of quietstar.layout."""
    batch, q_heads, q_len, _ = q.shape
    group = q_heads // k.shape[1]
    n_q, n_k = q_len // slot_len, k.shape[2] // slot_len
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for j in range(n_q):
                s = n_k - n_q + j
                for i in range(slot_len):
                    keys = []
                    for kk in range(i + 1):
                        if sliding_window is not None and i - kk >= sliding_window:
                            continue
                        if key_padding_mask is not None and not key_padding_mask[b, kk]:
                            continue
                        keys.append(kk)
                    if s >= 1:
                        step, branch = (s - 1) // n_thoughts + 1, (s - 1) % n_thoughts
                        for c in range(1, step + 1):
                            keys.append(((c - 1) * n_thoughts + branch + 1) * slot_len + i)
                    if not keys:
                        continue
                    query = q[b, h, j * slot_len + i].double()
                    kv = torch.tensor(keys)
                    scores = k[b, h // group, kv].double() @ query * scale
                    out[b, h, j * slot_len + i] = torch.softmax(scores, 0) @ v[b, h // group, kv].double()
    return out


@pytest.mark.parametrize("n_thoughts,n_q,n_k,window", [(1, 3, 3, None), (2, 2, 5, None), (3, 4, 7, 2)])
def test_reference_follows_spec_tree_rule(n_thoughts, n_q, n_k, window):
    q, k, v, mask = make_inputs(2, 2, 1, 5, n_q, n_k, 8, torch.float64, padded=True)
    options = dict(n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window)
    out = tree_attention(q, k, v, 5, backend="reference", **options)
    expected = tree_attention_per_query(q, k, v, 5, n_thoughts, mask, window, 8**-0.5)
    assert relative_error(out, expected) < 1e-12


def test_base_slot_is_causal_attention():
    q, k, v, _ = make_inputs(2, 4, 2, 9, 1, 1, 16, torch.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True
    )
    for backend in ("reference", "torch"):
        assert relative_error(tree_attention(q, k, v, 9, backend=backend), expected) < 1e-5


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_query_without_visible_key_returns_zeros(backend):
    q, k, v, _ = make_inputs(1, 2, 1, 6, 3, 3, 16, torch.float32)
    mask = torch.tensor([[False, False, False, True, True, True]], device=DEVICE)
    out = tree_attention(q, k, v, 6, key_padding_mask=mask, backend=backend)
    out.sum().backward()
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))  # base slot, padded
    assert (out[:, :, 6:9].abs() > 0).all()  # chain slots still see themselves
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=requires_native)])
def test_passes_gradcheck_in_float64(backend):
    q, k, v, mask = make_inputs(1, 2, 1, 3, 2, 3, 4, torch.float64, padded=True)
    mask = torch.tensor([[False, True, True]], device=DEVICE)

    def fn(q, k, v):
        return tree_attention(q, k, v, 3, n_thoughts=2, key_padding_mask=mask, sliding_window=2, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_order_through_the_fast_backends_raises_instead_of_dropping_terms(backend, dtype):
    """The fast backwards run kernels with no derivatives: differentiating a gradient again
    (``create_graph``, a gradient penalty say) raises rather than silently leaving the
    attention's second-order terms out. The reference backend computes them."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend runs float16, bfloat16 and float32")
    q, k, v, _ = make_inputs(1, 2, 1, 8, 2, 2, 16, dtype)
    out = tree_attention(q, k, v, 8, backend=backend)
    for loss in (out.square().sum(), out.sum()):  # the incoming gradient needing one, or a constant
        (grad_q,) = torch.autograd.grad(loss, [q], create_graph=True, retain_graph=True)
        with pytest.raises(RuntimeError, match="tree_attention gives first derivatives only"):
            (out.sum() + grad_q.square().sum()).backward(retain_graph=True)
    (grad_q,) = torch.autograd.grad(tree_attention(q, k, v, 8, backend="reference").square().sum(), [q], create_graph=True)
    (second,) = torch.autograd.grad(grad_q.square().sum(), [q])
    assert torch.isfinite(second).all() and second.abs().sum() > 0


@requires_native
@pytest.mark.parametrize("case", ["L100-window-padded-two-branches", "L64-Sq-lt-Sk-two-branches"])
def test_native_backend_matches_reference_in_float64_across_flash_blocks(case, poisoned_allocations):
    """Float64 leaves only the kernels' own error, at L=130 (across the flash kernel's
    blocks), with padding, a window and Sq < Sk."""
    batch, hq, hkv, slot_len, n_q, n_k, n_thoughts, head_dim, padded, window = CASES[case]
    q, k, v, mask = make_inputs(batch, hq, hkv, 130, n_q, n_k, head_dim, torch.float64, padded)
    out = tree_attention(q, k, v, 130, n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window, backend="native")
    expected = tree_attention(q, k, v, 130, n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window, backend="reference")
    grad = torch.randn_like(out)
    got, want = torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)
    assert relative_error(out, expected) < 1e-12
    for a, b in zip(got, want):
        assert relative_error(a, b) < 1e-12


@requires_native
@pytest.mark.parametrize("case", HALF_CASES)
@over_half_dtypes
def test_native_kernels_on_half_precision_storage_match_reference(case, dtype, monkeypatch, poisoned_allocations):
    """The half-precision path (flash trunk in half, chain kernels reading half rows), which the
    backend takes only for long slots on CPUs that multiply bfloat16, forced at small sizes."""
    from quietstar.ops import tree_attention_native

    monkeypatch.setattr(tree_attention_native, "_run_dtype", lambda q, k, v, slot_len: q.dtype)
    assert_case_matches_reference("native", case, dtype)


@pytest.mark.parametrize(
    ("dtype", "fast_bf16", "slot_len", "expected"),
    [
        (torch.bfloat16, True, 4096, torch.bfloat16),
        (torch.bfloat16, True, 2048, torch.float32),
        (torch.bfloat16, False, 4096, torch.float32),
        (torch.float16, True, 4096, torch.float32),
        (torch.float32, True, 4096, torch.float32),
        (torch.float64, False, 8, torch.float64),
    ],
)
def test_native_runs_half_precision_only_where_it_is_faster(dtype, fast_bf16, slot_len, expected, monkeypatch):
    from quietstar.ops import backends, tree_attention_native

    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: fast_bf16)
    monkeypatch.setattr(tree_attention_native, "native_bf16_products", lambda: False)
    x = torch.empty(1, 64, dtype=dtype)
    assert tree_attention_native._run_dtype(x, x, x, slot_len) == expected


def test_native_uses_its_bfloat16_products_for_bfloat16_values_at_every_length(monkeypatch):
    from quietstar.ops import backends, tree_attention_native

    monkeypatch.setattr(tree_attention_native, "native_bf16_products", lambda: True)
    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: True)
    x = torch.empty(1, 64, dtype=torch.bfloat16)
    assert tree_attention_native.bf16_products(x, x, x)
    for slot_len in (256, 4096):  # cast (exactly), then the bfloat16 products
        assert tree_attention_native._run_dtype(x, x, x, slot_len) == torch.float32
    assert not tree_attention_native.bf16_products(x, x, x.float())  # v's values are not bfloat16
    odd = torch.empty(1, 24, dtype=torch.bfloat16)  # a head size the kernel does not tile
    assert not tree_attention_native.bf16_products(odd, odd, odd)


@requires_native
@pytest.mark.parametrize(
    ("batch", "q_heads", "kv_heads", "slot_len", "n_q", "n_k", "n_thoughts", "padded", "window"),
    [
        (2, 6, 2, 300, 3, 3, 2, False, None),
        (2, 6, 2, 300, 3, 3, 2, True, None),
        (1, 4, 1, 300, 2, 5, 2, False, 140),
        (2, 2, 1, 270, 2, 3, 1, True, 60),
        (1, 2, 2, 129, 1, 1, 1, False, None),
        (1, 3, 1, 128, 1, 5, 1, True, None),
    ],
    ids=[
        "L300-3-key-blocks",
        "L300-padded",
        "L300-window-skips-blocks-Sq-lt-Sk",
        "L270-padded-window",
        "L129-one-slot",
        "L128-a-sampling-step-split-into-tiles-per-thread",
    ],
)
def test_native_trunk_matches_reference_across_tiles_and_key_blocks(
    batch, q_heads, kv_heads, slot_len, n_q, n_k, n_thoughts, padded, window, poisoned_allocations
):
    """The native float32 trunk: tiles of stacked query rows whose positions straddle the
    128-key blocks, the last block partial, Sq < Sk as in decoding; padding (left padding hides
    every text key from the first positions of a row) and a window that skips whole blocks; a
    call with fewer heads than threads, whose positions are split so each thread gets tiles."""
    q, k, v, mask = make_inputs(batch, q_heads, kv_heads, slot_len, n_q, n_k, 32, torch.float32, padded)
    assert_matches_reference("native", q, k, v, slot_len, n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window)


@requires_native
def test_native_backward_repeats_bit_for_bit():
    """The trunk's dK/dV are summed per worker thread over many tiles of a KV head; the same
    inputs must give the same bits every time (the trainer's resume test relies on it)."""
    q, k, v, mask = make_inputs(1, 8, 1, 300, 2, 2, 32, torch.float32, padded=True)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def grads():
        out = tree_attention(q, k, v, 300, n_thoughts=1, key_padding_mask=mask, backend="native")
        return torch.autograd.grad(out, (q, k, v), grad)

    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # two workers share the tiles (one could not differ from itself)
    try:
        first = grads()
        for _ in range(6):
            assert all(torch.equal(a, b) for a, b in zip(grads(), first))
    finally:
        torch.set_num_threads(previous)


@requires_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_native_with_no_gradient_to_record_runs_without_autograd_and_gives_the_same_output(dtype, monkeypatch):
    from quietstar.ops.tree_attention_native import TreeAttentionNative

    q, k, v, mask = make_inputs(2, 4, 2, 9, 2, 3, 16, dtype, padded=True)
    options = dict(n_thoughts=2, key_padding_mask=mask, sliding_window=5, backend="native")
    recorded = tree_attention(q, k, v, 9, **options)
    assert recorded.grad_fn.name() == "TreeAttentionNativeBackward"

    def refuse(*args):
        raise AssertionError("no gradient is recorded: the kernels run without the autograd Function")

    monkeypatch.setattr(TreeAttentionNative, "apply", refuse)
    with torch.no_grad():
        unrecorded = tree_attention(q, k, v, 9, **options)
    assert unrecorded.grad_fn is None and unrecorded.dtype == dtype
    torch.testing.assert_close(unrecorded, recorded.detach(), rtol=0, atol=0)
    detached = tree_attention(q.detach(), k.detach(), v.detach(), 9, **options)  # grad mode on, nothing needing one
    torch.testing.assert_close(detached, recorded.detach(), rtol=0, atol=0)


@requires_native
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_native_reads_a_caches_filled_part_in_place(padded, poisoned_allocations):
    """Keys and values as a KV cache hands them over: the filled part of a longer buffer
    (batch and head strides of the buffer), read without a copy, as in thought sampling."""
    from quietstar.ops.tree_attention_native import _keys_in_place

    q, k, v, mask = make_inputs(2, 4, 2, 9, 2, 5, 16, torch.float32, padded=padded)
    buffers = [torch.full((2, 2, 7 * 9, 16), float("nan")) for _ in range(2)]
    for buffer, t in zip(buffers, (k, v)):
        buffer[:, :, : 5 * 9] = t.detach()
    k_view, v_view = (buffer[:, :, : 5 * 9] for buffer in buffers)
    assert not k_view.is_contiguous()
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(_keys_in_place(k_view, v_view), (k_view, v_view)))
    with torch.no_grad():
        out = tree_attention(q, k_view, v_view, 9, n_thoughts=2, key_padding_mask=mask, backend="native")
        expected = tree_attention(q, k, v, 9, n_thoughts=2, key_padding_mask=mask, backend="reference")
    assert relative_error(out, expected) < 1e-5


@pytest.mark.parametrize(
    ("q_shape", "k_layout", "v_layout", "slot_len"),
    [
        # One token: v_proj(x).view(B, T, H, D).transpose(1, 2) leaves a stride of H * D on T = 1.
        ((2, 4, 1, 8), ((2, 2, 1, 8), None), ((2, 1, 2, 8), (1, 2)), 1),
        ((2, 4, 1, 8), ((2, 1, 2, 8), (1, 2)), ((2, 2, 1, 8), None), 1),
        # Head size 1 from a transpose: the last dimension's stride is not 1.
        ((1, 2, 6, 1), ((1, 2, 1, 6), (2, 3)), ((1, 2, 6, 1), None), 3),
        # One batch row from a transpose: its stride is not that of a contiguous k.
        ((1, 4, 8, 8), ((2, 1, 8, 8), (0, 1)), ((1, 2, 8, 8), None), 4),
    ],
    ids=["one-token-v", "one-token-k", "head-size-1", "one-batch-row"],
)
@requires_native
def test_native_takes_contiguous_keys_whatever_the_strides_of_their_size_1_dimensions(
    q_shape, k_layout, v_layout, slot_len
):
    """PyTorch calls a tensor contiguous whatever its size-1 dimensions' strides are (a view of
    one token, one head or one batch row keeps its source's); the kernels never read those
    strides, so such keys and values are taken as they are, and gradients match the reference."""
    gen = torch.Generator().manual_seed(0)

    def laid_out(shape, transpose):
        t = torch.randn(*shape, generator=gen)
        return (t if transpose is None else t.transpose(*transpose)).requires_grad_()

    q = torch.randn(*q_shape, generator=gen).requires_grad_()
    k, v = laid_out(*k_layout), laid_out(*v_layout)
    assert k.is_contiguous() and v.is_contiguous() and (k.stride() != v.stride() or k.stride(-1) != 1)
    assert_matches_reference("native", q, k, v, slot_len)


def keep_rows_slot_by_slot(q, k, v, slot_len, first_slots, n_thoughts=1, **options):
    """``TreeAttentionRows`` kept by calls through a cache, as thought sampling makes them: the
    base slot with the first chain step, then one chain step (``n_thoughts`` slots) per call,
    up to the tree's first ``first_slots`` slots."""
    from quietstar.ops.tree_attention_native import TreeAttentionRows

    rows = TreeAttentionRows(q.shape[2])
    with torch.no_grad():
        end = 1 + n_thoughts
        while end <= first_slots:
            begin = 0 if end == 1 + n_thoughts else end - n_thoughts
            tree_attention(
                q[:, :, begin * slot_len : end * slot_len].detach(),
                k[:, :, : end * slot_len].detach(),
                v[:, :, : end * slot_len].detach(),
                slot_len,
                n_thoughts=n_thoughts,
                backend="native",
                known_rows=rows,
                **options,
            )
            end += n_thoughts
    return rows


@requires_native
@pytest.mark.parametrize(("n_thoughts", "padded", "window"), [(1, False, None), (2, True, None), (1, True, 3)])
def test_native_known_rows_kept_through_a_cache_give_the_tree_pass_its_output_and_gradients(
    n_thoughts, padded, window, poisoned_allocations
):
    """Rows kept by the sampling's calls through a cache stand for the tree pass's first slots:
    its output and gradients are the tree's computed whole, to float32 rounding."""
    slot_len, slots = 6, 1 + 4 * n_thoughts
    q, k, v, mask = make_inputs(2, 4, 2, slot_len, slots, slots, 16, torch.float32, padded=padded, seed=3)
    options = dict(n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window)
    rows = keep_rows_slot_by_slot(q, k, v, slot_len, 1 + 2 * n_thoughts, **options)
    assert rows.filled == (1 + 2 * n_thoughts) * slot_len
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    out, grads = run("native", q, k, v, slot_len, grad_out, known_rows=rows, **options)
    expected, expected_grads = run("native", q, k, v, slot_len, grad_out, **options)
    assert relative_error(out, expected) < 1e-5
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) < 1e-5
    assert rows.out is None and not rows.usable  # given once


@requires_native
def test_native_known_rows_are_taken_as_given_and_only_the_rest_computed(monkeypatch):
    """The tree pass does not compute the kept rows again: it returns what was kept and computes
    the queries after them."""
    slot_len = 5
    q, k, v, _ = make_inputs(1, 2, 1, slot_len, 4, 4, 16, torch.float32)
    rows = keep_rows_slot_by_slot(q, k, v, slot_len, 3)
    rows.out[:, :, : rows.filled] = 7.0
    computed = count_native_queries(monkeypatch)
    with torch.no_grad():
        out = tree_attention(q, k, v, slot_len, backend="native", known_rows=rows)
    assert computed == [slot_len]  # the last slot only
    assert rows.out is None and not rows.usable  # given once
    with torch.no_grad():
        expected = tree_attention(q, k, v, slot_len, backend="native")
    assert (out[:, :, : 3 * slot_len] == 7.0).all()
    assert relative_error(out[:, :, 3 * slot_len :], expected[:, :, 3 * slot_len :]) < 1e-6


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(dict(heads=1), id="other-heads"),
        pytest.param(dict(scale=0.5), id="other-scale"),
        pytest.param(dict(sliding_window=2), id="other-window"),
        pytest.param(dict(padded=True), id="other-padding"),
        pytest.param(dict(slots=2), id="more-rows-than-the-tree"),
    ],
)
@requires_native
def test_native_known_rows_that_a_call_does_not_continue_are_not_used(spoil, monkeypatch):
    """A call that does not continue the kept rows lets them go: the tree pass then computes
    every row."""
    slot_len = 5
    q, k, v, _ = make_inputs(1, 2, 1, slot_len, 4, 4, 16, torch.float32)
    rows = keep_rows_slot_by_slot(q, k, v, slot_len, 3)
    rows.out[:, :, : rows.filled] = 7.0
    end, slots = 4 * slot_len, spoil.get("slots", 1)
    mask = torch.ones(1, slot_len, dtype=torch.bool) if spoil.get("padded") else None
    with torch.no_grad():
        tree_attention(
            q[:, : spoil.get("heads", 2), end - slots * slot_len : end].detach(),
            k[:, :, :end].detach(),
            v[:, :, :end].detach(),
            slot_len,
            key_padding_mask=mask,
            sliding_window=spoil.get("sliding_window"),
            scale=spoil.get("scale"),
            backend="native",
            known_rows=rows,
        )
    assert not rows.usable and rows.out is None
    computed = count_native_queries(monkeypatch)
    with torch.no_grad():
        out = tree_attention(q, k, v, slot_len, backend="native", known_rows=rows)
        expected = tree_attention(q, k, v, slot_len, backend="native")
    assert computed[0] == 4 * slot_len
    assert relative_error(out, expected) < 1e-6


@requires_native
def test_native_known_rows_kept_under_a_padding_mask_since_changed_in_place_are_not_used():
    """The kept rows' mask is compared by value: the same mask tensor changed in place since
    they were computed is another mask, and every row is computed again under it."""
    from quietstar.ops import TreeAttentionRows

    slot_len = 4
    q, k, v, _ = make_inputs(1, 2, 1, slot_len, 3, 3, 16, torch.float32)
    mask = torch.ones(1, slot_len, dtype=torch.bool)
    rows = TreeAttentionRows(3 * slot_len)
    with torch.no_grad():
        part = slice(0, 2 * slot_len)
        tree_attention(q[:, :, part], k[:, :, part], v[:, :, part], slot_len, key_padding_mask=mask, backend="native", known_rows=rows)
        mask[0, :2] = False
        out = tree_attention(q, k, v, slot_len, key_padding_mask=mask, backend="native", known_rows=rows)
        expected = tree_attention(q, k, v, slot_len, key_padding_mask=mask, backend="reference")
    assert relative_error(out, expected) < 1e-5


@requires_native
@pytest.mark.parametrize(("slot_len", "padded", "window"), [(300, False, 0), (300, True, 0), (270, True, 60), (7, False, 0)])
def test_native_trunk_bfloat16_products_match_float32_products_at_bfloat16_precision(slot_len, padded, window):
    """The AVX-512 BF16 trunk on bfloat16 values: scores exact products summed in float32 (the
    log-sum-exp as float32's), probabilities and their gradients rounded to bfloat16 before
    their products; key blocks that are not multiples of 16 (300 = 2 x 128 + 44), padding and
    window included; forward and backward."""
    from quietstar.ops.native import native_bf16_products

    if not native_bf16_products():
        pytest.skip("this CPU has no AVX-512 BF16")
    q, k, v, mask = make_inputs(2, 6, 2, slot_len, 3, 3, 64, torch.bfloat16, padded=padded)
    q, k, v = (t.detach().float() for t in (q, k, v))  # bfloat16 values, held exactly
    results = []
    for products in (False, True):
        out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
        torch.ops.quietstar.tree_attention_trunk_forward_(q, k, v, out, lse, mask, window, slot_len, 0.125, products)
        results.append((out, lse))
    (out32, lse32), (out16, lse16) = results
    assert relative_error(out16, out32) < 4e-3 and not torch.equal(out16, out32)
    finite = torch.isfinite(lse32)
    assert torch.equal(finite, torch.isfinite(lse16))
    assert (lse16[finite] - lse32[finite]).abs().max() < 1e-4
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).bfloat16().float()
    grads = []
    for products in (False, True):
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        torch.ops.quietstar.tree_attention_trunk_backward_(
            grad_out, q, k, v, out32, lse32, dq, dk, dv, mask, window, slot_len, 0.125, products
        )
        grads.append((dq, dk, dv))
    for with_float32, with_bf16 in zip(*grads):
        assert relative_error(with_bf16, with_float32) < 1e-2
    assert not torch.equal(grads[0][0], grads[1][0])  # the bfloat16 products ran


@requires_native
def test_native_ops_trace_under_torch_compile_as_in_place_updates():
    """``torch.compile`` (one graph) sees the four ops as updates of the tensors they are given, so
    what reads those tensors afterwards reads the updated values, as in eager mode."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 3 * 8, 16, generator=gen), torch.randn(2, 2, 5 * 8, 16, generator=gen)
    out, lse = torch.randn(q.shape, generator=gen), torch.randn(2, 4, 24, generator=gen)

    def chain(q, k, out, lse):
        torch.ops.quietstar.tree_attention_trunk_forward_(q, k, k, out, lse, None, 0, 8, 0.25, False)
        torch.ops.quietstar.tree_attention_chain_forward_(q, k, k, out, lse, 8, 2, 0.25)
        grads = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(k)
        torch.ops.quietstar.tree_attention_trunk_backward_(out, q, k, k, out, lse, *grads, None, 0, 8, 0.25, False)
        torch.ops.quietstar.tree_attention_chain_backward_(out, q, k, k, out, lse, *grads, 8, 2, 0.25)
        return out * 2, lse * 2, *grads

    expected = chain(q, k, out.clone(), lse.clone())
    traced = torch.compile(chain, backend="aot_eager", fullgraph=True)(q, k, out.clone(), lse.clone())
    for got, want in zip(traced, expected):
        torch.testing.assert_close(got, want)


@requires_native
def test_native_ops_run_on_meta_tensors():
    """Their fake implementations stand in on the meta device (shape-only runs)."""
    q, k = torch.empty(2, 4, 3 * 8, 16, device="meta"), torch.empty(2, 2, 5 * 8, 16, device="meta")
    out, lse = torch.empty_like(q), torch.empty(2, 4, 24, device="meta")
    torch.ops.quietstar.tree_attention_trunk_forward_(q, k, k, out, lse, None, 0, 8, 0.25, False)
    torch.ops.quietstar.tree_attention_chain_forward_(q, k, k, out, lse, 8, 2, 0.25)
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(k)
    torch.ops.quietstar.tree_attention_trunk_backward_(out, q, k, k, out, lse, *grads, None, 0, 8, 0.25, False)
    torch.ops.quietstar.tree_attention_chain_backward_(out, q, k, k, out, lse, *grads, 8, 2, 0.25)


@requires_native
def test_native_ops_name_the_argument_of_a_wrong_shape():
    q, k = torch.randn(1, 2, 2 * 4, 8), torch.randn(1, 1, 3 * 4, 8)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.quietstar.tree_attention_chain_forward_(q, k, k, torch.empty_like(q), torch.empty(1, 2, 7), 4, 2, 0.5)
    with pytest.raises(RuntimeError, match="grad_k"):
        torch.ops.quietstar.tree_attention_chain_backward_(
            q, q, k, k, q, torch.zeros(1, 2, 8), q.clone(), torch.zeros(1, 1, 4, 8), torch.zeros_like(k), 4, 2, 0.5
        )
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.quietstar.tree_attention_trunk_forward_(q, k, k, torch.empty_like(q), torch.empty(1, 2, 7), None, 0, 4, 0.5, False)
    with pytest.raises(RuntimeError, match="float32"):
        q64, k64 = q.double(), k.double()
        torch.ops.quietstar.tree_attention_trunk_forward_(q64, k64, k64, torch.empty_like(q64), torch.empty(1, 2, 8), None, 0, 4, 0.5, False)
    with pytest.raises(RuntimeError, match=r"sliding_window must be >= 0 \(0: none\), got -1"):
        torch.ops.quietstar.tree_attention_trunk_forward_(q, k, k, torch.empty_like(q), torch.empty(1, 2, 8), None, -1, 4, 0.5, False)
    with pytest.raises(RuntimeError, match="batch size"):
        k2 = torch.randn(2, 1, 3 * 4, 8)
        torch.ops.quietstar.tree_attention_trunk_forward_(q, k2, k2, torch.empty_like(q), torch.empty(1, 2, 8), None, 0, 4, 0.5, False)
    with pytest.raises(RuntimeError, match="bf16_products"):  # head size 8: not a multiple of 16
        torch.ops.quietstar.tree_attention_trunk_forward_(q, k, k, torch.empty_like(q), torch.empty(1, 2, 8), None, 0, 4, 0.5, True)
    with pytest.raises(RuntimeError, match="grad_v"):
        torch.ops.quietstar.tree_attention_trunk_backward_(
            q, q, k, k, q, torch.zeros(1, 2, 8), q.clone(), torch.zeros_like(k), torch.zeros(1, 1, 4, 8), None, 0, 4, 0.5, False
        )


def test_native_backend_off_says_why_and_the_default_still_runs():
    script = (
        "import torch, quietstar\n"
        "q = torch.randn(1, 2, 8, 4); k = torch.randn(1, 1, 8, 4)\n"
        "assert quietstar.tree_attention(q, k, k, 4).shape == q.shape\n"
        "try:\n    quietstar.tree_attention(q, k, k, 4, backend='native')\n"
        "except ValueError as error:\n    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "QUIETSTAR_NO_NATIVE": "1"})
    assert done.returncode == 0, done.stderr
    assert "backend='native' is unavailable: QUIETSTAR_NO_NATIVE=1" in done.stdout


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    slot_len=st.integers(1, 12),
    n_k=st.integers(1, 6),
    q_fraction=st.floats(0, 1),
    n_thoughts=st.integers(1, 3),
    window=st.one_of(st.none(), st.integers(1, 6)),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=requires_native)])
def test_cpu_backends_match_reference_on_random_shapes(
    backend, batch, kv_heads, group, slot_len, n_k, q_fraction, n_thoughts, window, padded, seed
):
    """In float64: float32 would make the comparison flaky where a gradient cancels to almost
    zero (the float32 reference itself is then 3e-5 off in relative error)."""
    n_q = max(1, math.ceil(q_fraction * n_k))
    q, k, v, mask = make_inputs(batch, kv_heads * group, kv_heads, slot_len, n_q, n_k, 8, torch.float64, padded, seed)
    assert_matches_reference(
        backend, q, k, v, slot_len, n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window
    )


@requires_triton
@settings(max_examples=6, deadline=None)
@given(
    group=st.integers(1, 3),
    slot_len=st.integers(1, 40),
    n_k=st.integers(1, 5),
    q_fraction=st.floats(0, 1),
    n_thoughts=st.integers(1, 3),
    window=st.one_of(st.none(), st.integers(1, 20)),
    seed=st.integers(0, 2**16),
)
def test_triton_backend_matches_reference_on_random_shapes(group, slot_len, n_k, q_fraction, n_thoughts, window, seed):
    n_q = max(1, math.ceil(q_fraction * n_k))
    q, k, v, mask = make_inputs(2, group, 1, slot_len, n_q, n_k, 16, torch.float32, True, seed)
    assert_matches_reference(
        "triton", q, k, v, slot_len, n_thoughts=n_thoughts, key_padding_mask=mask, sliding_window=window
    )


@requires_native
def test_native_keeps_the_softmax_finite_where_scaled_scores_pass_2_to_the_31():
    """At a scaled score of 3.4e9 an exp fused with the product's rounding error gave inf, then
    NaN; a head size of 2 makes the scale 2 ** -0.5, whose products round."""
    for c in (1e5, 3e5, 1e6):
        q, k = torch.tensor([[[[c, c / 3]]]]), torch.tensor([[[[c / 7, c]]]])
        v = torch.tensor([[[[1.0, 2.0]]]], requires_grad=True)
        out = tree_attention(q, k, v, 1, backend="native")
        assert out.tolist() == [[[[1.0, 2.0]]]]
        out.sum().backward()
        assert v.grad.tolist() == [[[[1.0, 1.0]]]]
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 18, 16, generator=gen) * 30, torch.randn(1, 1, 24, 16, generator=gen) * 30
    v = torch.randn(1, 1, 24, 16, generator=gen)
    grads = {}
    for backend in ("native", "torch"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = tree_attention(*inputs, 6, n_thoughts=3, scale=1e6, backend=backend)
        out.square().sum().backward()
        grads[backend] = (out, inputs[2].grad)
    assert all(bool(t.isfinite().all()) for t in grads["native"])
    torch.testing.assert_close(grads["native"][0], grads["torch"][0])
    torch.testing.assert_close(grads["native"][1], grads["torch"][1], rtol=1e-5, atol=1e-5)


# --- argument checking and backend selection -------------------------------------------


def good_inputs():
    q, k, v, _ = make_inputs(1, 2, 1, 4, 2, 3, 16, torch.float32)
    return q.detach(), k.detach(), v.detach()


@pytest.mark.parametrize(
    "change,argument",
    [
        (lambda q, k, v, kw: (q[0], k, v, kw), "q"),
        (lambda q, k, v, kw: (q, k.double(), v, kw), "k"),
        (lambda q, k, v, kw: (q, k, v[:, :, :4], kw), "v"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "slot_len": 3}), "slot_len"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "slot_len": 0}), "slot_len"),
        (lambda q, k, v, kw: (torch.cat([q, q], 2), k[:, :, :4], v[:, :, :4], kw), "Sq <= Sk"),
        (lambda q, k, v, kw: (q[:, :1].expand(1, 3, 8, 16), k.expand(1, 2, 12, 16), v.expand(1, 2, 12, 16), kw), "multiple"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "n_thoughts": 0}), "n_thoughts"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "key_padding_mask": torch.ones(1, 5, dtype=torch.bool)}), "key_padding_mask"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "key_padding_mask": torch.ones(1, 4)}), "key_padding_mask"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "sliding_window": 0}), "sliding_window"),
        # Past int64 a window would compare as another number in torch (hiding every key).
        (lambda q, k, v, kw: (q, k, v, {**kw, "sliding_window": 2**63}), "sliding_window must fit in int64"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "n_thoughts": 2**63}), "n_thoughts must fit in int64"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "scale": -1.0}), "scale"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "backend": "cuda"}), "backend"),
        (lambda q, k, v, kw: (q, k.to("meta"), v, kw), "k must be on"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "known_rows": {}}), "known_rows"),
        (lambda q, k, v, kw: (q[:0], k[:0], v[:0], kw), r"B, Hq, D >= 1, got \(0, 2, 8, 16\)"),
        (lambda q, k, v, kw: (q[:, :0], k, v, kw), r"B, Hq, D >= 1, got \(1, 0, 8, 16\)"),
        (lambda q, k, v, kw: (q[..., :0], k[..., :0], v[..., :0], kw), r"B, Hq, D >= 1, got \(1, 2, 8, 0\)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(change, argument):
    q, k, v = good_inputs()
    q, k, v, kwargs = change(q, k, v, {"slot_len": 4})
    with pytest.raises(ValueError, match=argument):
        tree_attention(q, k, v, **kwargs)


@requires_native
@pytest.mark.parametrize("q_shape,k_shape", [((0, 2, 8, 16), (0, 1, 12, 16)), ((1, 0, 8, 16), (1, 1, 12, 16))])
def test_native_kernels_raise_on_an_empty_batch_or_head_axis_instead_of_dividing_by_it(q_shape, k_shape):
    q, k = torch.zeros(q_shape), torch.zeros(k_shape)
    out, lse = torch.empty_like(q), q.new_empty(q.shape[:3])
    for call in (
        lambda: torch.ops.quietstar.tree_attention_trunk_forward_(q, k, k, out, lse, None, 0, 4, 0.25, False),
        lambda: torch.ops.quietstar.tree_attention_chain_forward_(q, k, k, out, lse, 4, 1, 0.25),
    ):
        with pytest.raises(RuntimeError, match=r"at least one batch row, head and head dimension, got q \["):
            call()


@requires_triton
def test_triton_rejects_unsupported_head_dim():
    q, k, v, _ = make_inputs(1, 1, 1, 4, 1, 1, 24, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        tree_attention(q, k, v, 4, backend="triton")


def test_triton_rejects_more_batch_kv_heads_than_the_launch_grid_holds():
    q = torch.empty(1, 1, 4, 16, device=DEVICE).expand(32768, 4, 4, 16)  # stride-0 views: little memory
    k = v = torch.empty(1, 1, 4, 16, device=DEVICE).expand(32768, 2, 4, 16)
    with pytest.raises(ValueError, match="k batch x heads must be at most 65535"):
        tree_attention(q, k, v, 4, backend="triton")


def test_backend_selection(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    assert resolve_backend(None, torch.device("cpu")) == "reference"
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        resolve_backend(None, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_backend("triton", torch.device("cpu"))


@requires_triton
def test_automatic_backend_falls_back_to_torch_for_inputs_triton_does_not_take(monkeypatch, caplog):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    # A reason no other test gives: the fallback is logged once per reason and process.
    reason = "q head dim must be one of (16, 32, 64, 128) for the triton backend, got 7"
    cuda = torch.device("cuda")  # only the device's type is read
    assert resolve_backend(None, cuda) == "triton"
    with caplog.at_level("WARNING", logger="quietstar.ops.backends"):
        assert resolve_backend(None, cuda, reason) == "torch"
        assert caplog.text.count(reason) == 1
        assert resolve_backend(None, cuda, reason) == "torch"
        assert caplog.text.count(reason) == 1
    with pytest.raises(ValueError, match=r"head dim must be one of .* got 7; use backend='torch'"):
        resolve_backend("triton", cuda, reason)
