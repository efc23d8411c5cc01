"""On a CUDA device: the Triton kernels natively (bfloat16 arithmetic included, which the
Triton interpreter cannot check) at layer-like shapes, and ``QuietStarModel``'s training step
on the GPU against the step-by-step reference. Skipped without a CUDA device (CI has none)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import relative_error, tiny_causal_lm

from quietstar import QuietStarConfig, QuietStarModel, linear_cross_entropy, tree_attention
from quietstar.model.reference import reference_forward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def randn(*shape, dtype, seed, scale=1.0):
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=CUDA) * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("padded", [False, True], ids=["causal-only", "padded"])
def test_tree_attention_triton_matches_reference_at_head_dim_128(dtype, padded, poisoned_allocations):
    """GQA 4:1, two branches, L = 200 (tails for every tile), the query slots a suffix of the keys."""
    batch, hq, hkv, slot_len, n_q, n_k, head_dim = 2, 8, 2, 200, 6, 7, 128
    q = randn(batch, hq, n_q * slot_len, head_dim, dtype=dtype, seed=0)
    k = randn(batch, hkv, n_k * slot_len, head_dim, dtype=dtype, seed=1)
    v = randn(batch, hkv, n_k * slot_len, head_dim, dtype=dtype, seed=2)
    mask = None
    if padded:
        mask = torch.ones(batch, slot_len, dtype=torch.bool, device=CUDA)
        mask[0, :37] = False
        mask[1, -50:] = False
    options = dict(n_thoughts=2, key_padding_mask=mask)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = tree_attention(*leaves, slot_len, backend="reference", **options)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    out = tree_attention(q, k, v, slot_len, backend="triton", **options)
    grads = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, want) <= 1e-2, (name, relative_error(got, want))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_linear_cross_entropy_triton_matches_reference_over_several_chunks(dtype, monkeypatch, poisoned_allocations):
    """V = 5000 in chunks of 1024 ids (a partial last one), mixing, masked ids, ignored rows."""
    import quietstar.kernels.linear_cross_entropy as kernels

    rows, width, vocab = 300, 256, 5000
    monkeypatch.setattr(kernels, "CHUNK_BYTES", rows * 1024 * 4)
    hidden = randn(rows, width, dtype=dtype, seed=0)
    base = randn(rows, width, dtype=dtype, seed=1)
    w = randn(rows, dtype=torch.float32, seed=2, scale=0.5)
    weight = randn(vocab, width, dtype=dtype, seed=3, scale=2 * width**-0.5)
    gen = torch.Generator(device=CUDA).manual_seed(4)
    targets = torch.randint(0, vocab - 2, (rows,), generator=gen, device=CUDA)
    targets[::7] = -100
    options = dict(mix=(base, w), masked_vocab=[vocab - 2, vocab - 1], temperature=3.0)
    leaves = [t.detach().float().requires_grad_() for t in (hidden, base, w, weight)]
    ref = linear_cross_entropy(leaves[0], leaves[3], targets, mix=(leaves[1], leaves[2]), backend="reference",
                               **{k: v for k, v in options.items() if k != "mix"})
    grad = torch.randn(rows, generator=gen, device=CUDA)
    ref_grads = torch.autograd.grad(ref, leaves, grad)
    nll = linear_cross_entropy(hidden, weight, targets, backend="triton", **options)
    grads = torch.autograd.grad(nll, (hidden, base, w, weight), grad)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-4
    for name, got, want in zip(("nll", "hidden", "base", "w", "weight"), (nll, *grads), (ref, *ref_grads)):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, want) <= tolerance, (name, relative_error(got, want))


def gpu_model(seed: int = 0) -> QuietStarModel:
    """A small Llama with head dim 64 (so the Triton kernels run), on the GPU, float32."""
    model = tiny_causal_lm(
        "llama", seed=seed, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512,
    )
    config = QuietStarConfig(thought_tokens=3, talk_tokens=3, n_thoughts=2, policy_weight=1.0)
    qs = QuietStarModel(model, config=config)
    torch.nn.init.normal_(qs.mixing_head.mlp[-1].weight, std=0.3, generator=torch.Generator().manual_seed(3))
    return qs.to(CUDA).train()


def gpu_batch(length: int = 40):
    gen = torch.Generator(device=CUDA).manual_seed(0)
    ids = torch.randint(0, 510, (2, length), generator=gen, device=CUDA)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, -3:] = 0
    return ids, mask


def step(qs, forward, ids, mask, thoughts):
    """One forward and backward; the outputs and float32 copies of the parameter gradients."""
    out = forward(qs, ids, mask, thoughts=thoughts)
    qs.zero_grad()
    out.loss.backward()
    return out, {name: p.grad.float().clone() for name, p in qs.named_parameters() if p.grad is not None}


def fast(qs, ids, mask, thoughts):
    return qs(ids, mask, thoughts=thoughts)


OUTPUT_FIELDS = ("loss", "nll_loss", "nll_base", "nll_talk", "mixing_weight")


def test_training_step_on_cuda_equals_the_step_by_step_reference_in_float32():
    """The fast step (Triton kernels, IEEE float32) against the dense reference on the same
    weights and thoughts, to the CPU tests' tolerances."""
    qs = gpu_model()
    ids, mask = gpu_batch()
    thoughts = qs.sample_thoughts(ids, mask, torch.Generator(device=CUDA).manual_seed(1))
    assert thoughts.device.type == CUDA.type
    ref, ref_grads = step(qs, reference_forward, ids, mask, thoughts)
    out, grads = step(qs, fast, ids, mask, thoughts)
    for field in OUTPUT_FIELDS:
        assert relative_error(getattr(out, field), getattr(ref, field)) <= 1e-4, field
    assert set(grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        assert relative_error(grads[name], grad) <= 1e-3, (name, relative_error(grads[name], grad))


def test_training_step_in_bfloat16_is_as_close_to_float32_as_the_reference_in_bfloat16():
    """bfloat16 rounding alone moves the mixing head's gradients by several percent, so the
    fast step in bfloat16 is held to the error of the dense reference run in bfloat16 (both
    against the reference in float32): at most twice it, plus a small floor."""
    model = gpu_model()
    ids, mask = gpu_batch()
    thoughts = model.sample_thoughts(ids, mask, torch.Generator(device=CUDA).manual_seed(1))
    exact, exact_grads = step(model, reference_forward, ids, mask, thoughts)
    ref, ref_grads = step(copy.deepcopy(model).to(torch.bfloat16), reference_forward, ids, mask, thoughts)
    out, grads = step(copy.deepcopy(model).to(torch.bfloat16), fast, ids, mask, thoughts)
    for field in OUTPUT_FIELDS:
        error, allowed = relative_error(getattr(out, field), getattr(exact, field)), relative_error(getattr(ref, field), getattr(exact, field))
        assert error <= 2 * allowed + 1e-3, (field, error, allowed)
    assert set(grads) == set(exact_grads)
    for name, grad in exact_grads.items():
        error, allowed = relative_error(grads[name], grad), relative_error(ref_grads[name], grad)
        assert error <= 2 * allowed + 1e-2, (name, error, allowed)


def sampled(qs, ids, mask, thoughts=None):
    """A step that samples its own thoughts (the projection replay and inverse-CDF draws)."""
    return qs(ids, mask, generator=torch.Generator(device=CUDA).manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_sampling_step_on_cuda_equals_the_step_given_its_thoughts(dtype):
    """The tree pass replays the sampling pass's projections on the GPU too: the same losses and
    gradients as the step handed the thoughts it drew (float32 to the CPU tests' tolerances;
    bfloat16 to a bfloat16 rounding's)."""
    qs = gpu_model().to(dtype)
    ids, mask = gpu_batch()
    out, grads = step(qs, sampled, ids, mask, None)
    assert out.thoughts.device.type == CUDA.type and not torch.isin(out.thoughts, qs.masked_vocab).any()
    given, given_grads = step(qs, fast, ids, mask, out.thoughts)
    out_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
    for field in OUTPUT_FIELDS:
        assert relative_error(getattr(out, field), getattr(given, field)) <= out_tol, field
    assert set(grads) == set(given_grads)
    for name, grad in given_grads.items():
        assert relative_error(grads[name], grad) <= grad_tol, (name, relative_error(grads[name], grad))
