"""Thought sampling (quietstar.model.sampling): the softmax's distribution, masked ids never drawn."""

from __future__ import annotations

import pytest
import torch
from helpers import count_onednn_products

import quietstar.model.sampling as sampling
from quietstar.model.sampling import CDF_BLOCK, draw_by_inverse_cdf, head_logits, sample_chunk_rows, sample_tokens
from quietstar.ops.onednn_linear import onednn_linear_available


def draw_columns(logits: torch.Tensor, columns: int, seed: int = 0) -> torch.Tensor:
    return draw_by_inverse_cdf(logits[:, None].repeat(1, columns), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_cdf_draws_follow_the_softmax(dtype):
    logits = torch.tensor([2.0, -1.0, float("-inf"), 0.5, 3.0, 1.0, -3.0], dtype=dtype)
    draws = draw_columns(logits, 40_000)
    frequencies = torch.bincount(draws, minlength=len(logits)).double() / draws.numel()
    # Each frequency's standard deviation is at most 0.0025 here: 0.01 is 4 of them.
    torch.testing.assert_close(frequencies, torch.softmax(logits.double(), 0), atol=0.01, rtol=0)


def test_inverse_cdf_draws_follow_the_softmax_across_blocks():
    # Three blocks of the running sums (the last one padded); frequencies per group of 32 ids.
    logits = 2 * torch.sin(torch.arange(2 * CDF_BLOCK + 50) / 20.0)
    draws = draw_columns(logits, 20_000)
    groups = torch.arange(len(logits)) // 32
    frequencies = torch.zeros(int(groups[-1]) + 1, dtype=torch.float64).index_add_(
        0, groups[draws], torch.ones(draws.numel(), dtype=torch.float64)
    ) / draws.numel()
    expected = torch.zeros_like(frequencies).index_add_(0, groups, torch.softmax(logits.double(), 0))
    torch.testing.assert_close(frequencies, expected, atol=0.012, rtol=0)


def test_inverse_cdf_draws_reach_a_tail_spread_over_many_blocks():
    # One dominant token and 4,095 unlikely ones holding 2.4% of the mass together.
    logits = torch.full((4096,), -12.0)
    logits[0] = 0.0
    draws = draw_columns(logits, 8_000)
    tail = (draws != 0).double().mean().item()
    expected = 1 - torch.softmax(logits.double(), 0)[0].item()
    assert abs(tail - expected) <= 0.3 * expected


def test_zero_probability_ids_are_never_drawn_at_block_edges():
    # Only ids at the edges of the CDF's blocks and the padded end have weight.
    vocab = 2 * CDF_BLOCK + 3
    allowed = [CDF_BLOCK - 1, CDF_BLOCK, vocab - 1]
    logits = torch.full((vocab,), float("-inf"))
    logits[allowed] = torch.tensor([0.0, 5.0, -2.0])
    draws = draw_columns(logits, 20_000)
    assert set(draws.tolist()) == set(allowed)


def test_sample_tokens_never_draws_masked_ids_and_is_reproducible():
    torch.manual_seed(0)
    weight, hidden = torch.randn(50, 8), torch.randn(3, 400, 8)
    masked = torch.tensor([4, 17])
    weight[masked] = 10 * hidden.mean((0, 1))  # the likeliest ids, were they not masked
    first = sample_tokens(hidden, weight, masked_vocab=masked, generator=torch.Generator().manual_seed(1))
    again = sample_tokens(hidden, weight, masked_vocab=masked, generator=torch.Generator().manual_seed(1))
    assert first.shape == (3, 400) and torch.equal(first, again)
    assert not torch.isin(first, masked).any()
    greedy = sample_tokens(hidden, weight, masked_vocab=masked, greedy=True)
    logits = (hidden @ weight.t()).index_fill(-1, masked, float("-inf"))
    assert torch.equal(greedy, logits.argmax(-1))


def test_sample_tokens_writes_the_logits_it_draws_from():
    torch.manual_seed(0)
    weight, bias, hidden = torch.randn(50, 8), torch.randn(50), torch.randn(2, 30, 8)
    masked = torch.tensor([4, 17])
    out = torch.full((50, 60), 7.0)
    first = sample_tokens(hidden, weight, bias, temperature=2.0, masked_vocab=masked, generator=torch.Generator().manual_seed(1), logits_out=out)
    again = sample_tokens(hidden, weight, bias, temperature=2.0, masked_vocab=masked, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)  # keeping the logits leaves the draw as it was
    expected = ((hidden.reshape(60, 8) @ weight.t() + bias) / 2.0).index_fill(-1, masked, float("-inf")).t()
    torch.testing.assert_close(out, expected)


def test_sample_tokens_in_chunks_gives_what_one_chunk_gives(monkeypatch):
    torch.manual_seed(0)
    weight, hidden = torch.randn(50, 8), torch.randn(2, 30, 8)
    results = []
    for rows in (7, 60):
        monkeypatch.setattr(sampling, "SAMPLE_CHUNK_ELEMENTS", rows * 50)
        out = torch.empty(50, 60)
        greedy = sample_tokens(hidden, weight, greedy=True, logits_out=out)
        drawn = sample_tokens(hidden, weight, generator=torch.Generator().manual_seed(1))
        results.append((greedy, out, drawn))
    (greedy, out, drawn), (whole_greedy, whole_out, whole_drawn) = results
    assert torch.equal(greedy, whole_greedy) and torch.equal(out, whole_out)
    assert drawn.shape == (2, 30) and torch.equal(drawn, whole_drawn)  # on the CPU, seeded draws too


def test_sample_chunk_rows_hold_64_mib_of_logits_on_the_cpu_and_a_share_of_a_gpus_memory(monkeypatch):
    assert sample_chunk_rows(49152, torch.device("cpu")) == 16 * 2**20 // 49152
    assert sample_chunk_rows(2**25, torch.device("cpu")) == 1  # a vocabulary over the budget
    if not torch.cuda.is_available():  # an 80 GiB card, as the CUDA branch sees it
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 80 * 2**30}))
    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    rows = sample_chunk_rows(128256, device)
    assert rows == int(total * sampling.GPU_SAMPLE_CHUNK_MEMORY_SHARE) // 4 // 128256
    assert rows * 128256 * 4 <= total / 32


def test_non_finite_logits_still_give_token_ids():
    logits = torch.randn(300, 4)
    logits[5, 0], logits[:, 1], logits[7, 2] = float("nan"), float("nan"), float("inf")
    draws = draw_by_inverse_cdf(logits, torch.Generator().manual_seed(0))
    assert draws.shape == (4,) and bool(((draws >= 0) & (draws < 300)).all())


def test_a_draw_leaves_its_logits_unless_told_to_overwrite_them():
    logits = torch.randn(600, 5)
    before = logits.clone()
    kept = draw_by_inverse_cdf(logits, torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)
    overwritten = draw_by_inverse_cdf(logits, torch.Generator().manual_seed(0), overwrite=True)
    assert torch.equal(kept, overwritten)
    torch.testing.assert_close(logits, (before - before.amax(0)).exp())  # the weights took their place


def test_draws_agree_between_the_native_and_pytorch_softmax(monkeypatch):
    import quietstar.ops.head_softmax as head_softmax
    from quietstar.ops.native import native_available, native_unavailable

    if not native_available():
        pytest.skip(f"native kernels: {native_unavailable()}")
    logits = 3 * torch.randn(2 * CDF_BLOCK + 77, 4000, generator=torch.Generator().manual_seed(0))
    native = draw_by_inverse_cdf(logits, torch.Generator().manual_seed(1))
    monkeypatch.setattr(head_softmax, "_native_takes", lambda scores: False)
    pytorch = draw_by_inverse_cdf(logits, torch.Generator().manual_seed(1))
    # The same uniform numbers against block sums that differ in float32 rounding only.
    assert (native == pytorch).double().mean() >= 0.999


@pytest.mark.skipif(not onednn_linear_available(), reason="this torch has no oneDNN linear op")
def test_vocabulary_major_logits_multiply_through_onednn_in_float32(monkeypatch):
    calls = count_onednn_products(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 16, generator=gen), torch.randn(40, 16, generator=gen).requires_grad_()
    with torch.no_grad():
        logits = head_logits(hidden, weight, None, torch.tensor([3]), temperature=2.0, vocab_major=True)
    expected = (weight.detach().double() @ hidden.double().T) / 2.0
    expected[3] = float("-inf")
    assert logits.shape == (40, 5) and calls == [(40, 16)]
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)


def test_head_logits_converts_a_half_precision_product_straight_into_out():
    gen = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(6, 16, generator=gen), torch.randn(40, 16, generator=gen), torch.randn(40, generator=gen)
    out = torch.full((40, 3, 6), 7.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head_logits(hidden, weight, bias, torch.tensor([3, 9]), temperature=2.0, vocab_major=True, out=out[:, 1])
    product = (weight.bfloat16() @ hidden.bfloat16().T).float()  # what autocast multiplies, then float32
    expected = ((product + bias[:, None]) / 2.0).index_fill(0, torch.tensor([3, 9]), float("-inf"))
    assert logits.data_ptr() == out[:, 1].data_ptr() and logits.dtype == torch.float32
    torch.testing.assert_close(out[:, 1], expected, rtol=1e-6, atol=1e-6)
    assert bool((out[:, 0] == 7.0).all() and (out[:, 2] == 7.0).all())  # the other columns untouched


def test_head_logits_in_place_steps_keep_their_gradients():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, generator=gen, dtype=torch.float64, requires_grad=True)
    masked = torch.tensor([2])
    logits = head_logits(hidden, weight, bias, masked, temperature=3.0)
    expected = ((hidden @ weight.T + bias) / 3.0).index_fill(-1, masked, float("-inf"))
    assert torch.equal(logits, expected)
    kept = torch.arange(30) != 2
    grads = torch.autograd.grad(logits[:, kept].sum(), (hidden, weight, bias))
    expected_grads = torch.autograd.grad(expected[:, kept].sum(), (hidden, weight, bias))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
