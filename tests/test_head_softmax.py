"""The lm_head's vocabulary-major softmax (quietstar.ops.head_softmax): the native kernels and
PyTorch's ops against float64, on full and strided chunks, tails, masked ids and bad input."""

from __future__ import annotations

import pytest
import torch

import quietstar.ops.head_softmax as head_softmax
from quietstar.ops.head_softmax import column_logsumexp, exp_block_sums_, softmax_gradient_
from quietstar.ops.native import native_available, native_unavailable

NATIVE = pytest.param(
    "native", marks=pytest.mark.skipif(not native_available(), reason=f"native kernels: {native_unavailable()}")
)


@pytest.fixture(params=[NATIVE, "torch"])
def path(request, monkeypatch):
    """Which implementation runs: the native kernels, or PyTorch's ops (native turned off)."""
    if request.param == "torch":
        monkeypatch.setattr(head_softmax, "_native_takes", lambda *args: False)
    return request.param


def scores_of(vocab: int, columns: int, strided: bool, seed: int = 0) -> torch.Tensor:
    """Random ``[V, C]`` float32 scores with a -inf (masked) entry; with ``strided``, the first C
    columns of a wider buffer, as a chunk of given scores is."""
    gen = torch.Generator().manual_seed(seed)
    buffer = 3 * torch.randn(vocab, 2 * columns + 1 if strided else columns, generator=gen)
    scores = buffer[:, :columns]
    scores[vocab // 2, 0] = float("-inf")
    return scores


# The native kernels cut the scores into tiles of 4096 rows by 512 columns: 9000 x 530 spans
# three row parts and two column slabs.
SHAPES = [(49152, 48, False), (9000, 530, True), (1000, 37, False), (300, 16, True), (5, 3, True), (257, 1, False)]


@pytest.mark.parametrize("vocab,columns,strided", SHAPES)
def test_softmax_gradient_matches_float64(path, vocab, columns, strided):
    scores = scores_of(vocab, columns, strided)
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, vocab, (columns,), generator=gen)
    scale = torch.rand(columns, generator=gen)
    scale[-1] = 0.0  # an ignored row
    exact = scores.double()
    expected_lse = torch.logsumexp(exact, 0)
    expected = torch.softmax(exact, 0) * scale.double()
    expected[targets, torch.arange(columns)] -= scale.double()
    lse = softmax_gradient_(scores, targets, scale)
    torch.testing.assert_close(lse.double(), expected_lse, atol=2e-6, rtol=0)
    torch.testing.assert_close(scores.double(), expected, atol=1e-7, rtol=2e-6)


@pytest.mark.parametrize("multiplier", [1.0, 1 / 3], ids=["as-given", "rescaled"])
@pytest.mark.parametrize("vocab,columns,strided", SHAPES)
def test_softmax_gradient_of_bfloat16_scores_is_that_of_their_float32_copy_rounded_once(
    path, vocab, columns, strided, multiplier
):
    source = scores_of(vocab, columns, strided)
    width = 2 * columns + 1 if strided else columns  # strided: the first C columns of a wider buffer
    scores = torch.empty(vocab, width, dtype=torch.bfloat16)[:, :columns].copy_(source)
    assert scores.is_contiguous() != strided
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, vocab, (columns,), generator=gen)
    targets[0] = vocab // 2  # a target at the masked (-inf) entry
    scale = torch.rand(columns, generator=gen)
    scale[-1] = 0.0  # an ignored row
    wide = scores.float()
    expected_lse = softmax_gradient_(wide, targets, scale, multiplier)
    lse = softmax_gradient_(scores, targets, scale, multiplier)
    assert lse.dtype == torch.float32 and scores.dtype == torch.bfloat16
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
    torch.testing.assert_close(scores, wide.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["centred", "large-logits"])
@pytest.mark.parametrize("multiplier", [1.0, 1 / 3], ids=["as-given", "rescaled"])
def test_softmax_gradient_is_exact_to_float32_at_any_logit_size(path, offset, multiplier):
    # Each probability to float32 rounding of itself: not off by the rounding of a large
    # log-sum-exp, which would scale a whole column (and leave its gradient not summing to 0).
    scores = scores_of(9000, 40, strided=False) + offset
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 9000, (40,), generator=gen)
    scale = torch.rand(40, generator=gen)
    exact = scores.double() * multiplier
    expected = torch.softmax(exact, 0) * scale.double()
    expected[targets, torch.arange(40)] -= scale.double()
    lse = softmax_gradient_(scores, targets, scale, multiplier)
    torch.testing.assert_close(lse.double(), torch.logsumexp(exact, 0), atol=0, rtol=2e-7)
    torch.testing.assert_close(scores.double(), expected, atol=1e-8, rtol=2e-6)
    assert scores.double().sum(0).abs().max() < 1e-6


@pytest.mark.parametrize("vocab,columns,strided", SHAPES)
def test_column_logsumexp_matches_float64(path, vocab, columns, strided):
    scores = scores_of(vocab, columns, strided)
    expected = torch.logsumexp(scores.double(), 0)
    torch.testing.assert_close(column_logsumexp(scores).double(), expected, atol=2e-6, rtol=0)


def test_columns_masked_over_whole_row_parts_sum_the_rest(path):
    # -inf over the first 5000 ids (more than a tile's rows) and over blocks inside the others.
    scores = scores_of(9000, 20, strided=False)
    scores[:5000, :10] = float("-inf")
    scores[6000:6100, 5:15] = float("-inf")
    exact = scores.double()
    gen = torch.Generator().manual_seed(1)
    targets = torch.randint(5000, 9000, (20,), generator=gen)
    scale = torch.rand(20, generator=gen)
    expected = torch.softmax(exact, 0) * scale.double()
    expected[targets, torch.arange(20)] -= scale.double()
    torch.testing.assert_close(column_logsumexp(scores.clone()).double(), torch.logsumexp(exact, 0), atol=2e-6, rtol=0)
    weights = (exact - exact.amax(0)).exp()
    sums = exp_block_sums_(scores.clone(), 256)
    padded = torch.cat([weights, weights.new_zeros((-9000) % 256, 20)])
    torch.testing.assert_close(sums.double(), padded.view(-1, 256, 20).sum(1), atol=0, rtol=2e-6)
    lse = softmax_gradient_(scores, targets, scale)
    torch.testing.assert_close(lse.double(), torch.logsumexp(exact, 0), atol=2e-6, rtol=0)
    torch.testing.assert_close(scores.double(), expected, atol=1e-7, rtol=2e-6)


def test_native_results_do_not_depend_on_the_thread_count():
    if not native_available():
        pytest.skip(f"native kernels: {native_unavailable()}")
    scores = scores_of(9000, 530, strided=True)
    targets = torch.randint(0, 9000, (530,), generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            gradient, weights = scores.clone(), scores.clone()
            lse = softmax_gradient_(gradient, targets, torch.ones(530))
            results.append((lse, gradient, column_logsumexp(scores.clone()), exp_block_sums_(weights, 256), weights))
    finally:
        torch.set_num_threads(threads)
    for one, three in zip(*results):
        assert torch.equal(one, three)


def test_native_logsumexp_leaves_the_scores_as_they_were():
    if not native_available():
        pytest.skip(f"native kernels: {native_unavailable()}")
    scores = scores_of(1000, 37, strided=True)
    before = scores.clone()
    column_logsumexp(scores)
    assert torch.equal(scores, before)


@pytest.mark.parametrize("vocab,block", [(1024, 256), (1000, 256), (5, 256), (49152, 256)])
def test_exp_block_sums_match_float64(path, vocab, block):
    scores = scores_of(vocab, 20, strided=True)
    exact = scores.double()
    weights = (exact - exact.amax(0)).exp()
    pad = (-vocab) % block
    expected_sums = torch.cat([weights, weights.new_zeros(pad, 20)]).view(-1, block, 20).sum(1)
    sums = exp_block_sums_(scores, block)
    assert sums.shape == (-(-vocab // block), 20)
    torch.testing.assert_close(scores.double(), weights, atol=0, rtol=2e-6)
    torch.testing.assert_close(sums.double(), expected_sums, atol=0, rtol=2e-6)


def test_the_strided_chunk_leaves_the_other_columns_alone(path):
    # 20 and 13 columns: a full group of 16 and a partial one next to columns left alone.
    buffer = torch.randn(300, 36)
    before = buffer.clone()
    softmax_gradient_(buffer[:, :20], torch.zeros(20, dtype=torch.long), torch.ones(20))
    exp_block_sums_(buffer[:, 21:34], 64)
    assert torch.equal(buffer[:, 20], before[:, 20]) and torch.equal(buffer[:, 34:], before[:, 34:])


def test_overlapping_rows_are_left_to_pytorch():
    scores = torch.randn(1, 20).expand(100, 20)  # every row the same memory
    assert not head_softmax._native_takes(scores)
    if native_available():
        with pytest.raises(RuntimeError, match="rows must not overlap .*, got stride 0"):
            torch.ops.quietstar.head_exp_block_sums_(scores, 64)


def non_finite_columns(vocab: int) -> torch.Tensor:
    """``[vocab, 4]`` scores: a NaN mid-column, a +inf, all -inf, and a finite column."""
    scores = torch.randn(vocab, 4)
    scores[vocab // 2, 0] = float("nan")
    scores[7, 1] = float("inf")
    scores[:, 2] = float("-inf")
    return scores


def test_non_finite_columns_give_nan_in_both_paths(path):
    scores = non_finite_columns(600)
    lse = softmax_gradient_(scores, torch.zeros(4, dtype=torch.long), torch.ones(4))
    assert lse[:3].isnan().all() and lse[3].isfinite()
    assert scores[:, :3].isnan().all() and scores[:, 3].isfinite().all()
    scores = non_finite_columns(600)
    sums = exp_block_sums_(scores, 256)
    # NaN and all -inf: every weight NaN; +inf: NaN where it is (inf - inf), 0 elsewhere.
    assert sums[:, [0, 2]].isnan().all() and scores[:, [0, 2]].isnan().all()
    assert sums[0, 1].isnan() and (sums[1:, 1] == 0).all() and scores[:, 1].isnan().sum() == 1
    assert sums[:, 3].isfinite().all() and scores[:, 3].isfinite().all()


def test_non_finite_entries_in_any_tile_give_nan_as_pytorch(path):
    # 9000 x 530: NaN and +inf in later row parts and in the second column slab, in either order.
    scores = torch.randn(9000, 530)
    scores[5000, 520] = float("nan")  # NaN: the column NaN throughout
    scores[8000, 3] = float("inf")  # +inf: NaN there, weight 0 elsewhere
    scores[10, 4], scores[4095, 4] = float("inf"), float("nan")  # +inf, then NaN
    scores[10, 5], scores[4095, 5] = float("nan"), float("inf")  # NaN, then +inf
    scores[:, 515] = float("-inf")
    nan_columns, inf_column = [4, 5, 515, 520], 3
    finite = [c for c in range(530) if c not in nan_columns + [inf_column]]
    weights = scores.clone()
    sums = exp_block_sums_(weights, 256)
    nan_only = [515, 520]  # (a column holding +inf and NaN may be NaN only in their blocks here)
    assert weights[:, nan_only].isnan().all() and sums[:, nan_only].isnan().all()
    assert weights[[10, 4095]][:, [4, 5]].isnan().all() and sums[[0, 15]][:, [4, 5]].isnan().all()
    assert weights[:, inf_column].isnan().sum() == 1 and weights[8000, inf_column].isnan()
    assert sums[:, inf_column].isnan().sum() == 1 and sums[8000 // 256, inf_column].isnan()
    assert weights[:, finite].isfinite().all() and sums[:, finite].isfinite().all()
    # The gradient: a NaN or +inf anywhere makes the column's sum, and so all of it, NaN.
    lse = softmax_gradient_(scores, torch.zeros(530, dtype=torch.long), torch.ones(530))
    assert lse[nan_columns + [inf_column]].isnan().all() and lse[finite].isfinite().all()
    assert scores[:, nan_columns + [inf_column]].isnan().all() and scores[:, finite].isfinite().all()


def test_float64_scores_keep_their_precision():
    scores = torch.randn(500, 7, dtype=torch.float64) * 30
    expected = torch.logsumexp(scores, 0)
    torch.testing.assert_close(column_logsumexp(scores.clone()), expected, atol=1e-12, rtol=0)


@pytest.mark.skipif(not native_available(), reason=f"native kernels: {native_unavailable()}")
def test_native_kernels_reject_bad_input_naming_its_values():
    for targets in ([0, 10, 1], [0, -1, 1]):
        with pytest.raises(RuntimeError, match=r"targets must lie in \[0, V\)"):
            torch.ops.quietstar.head_softmax_gradient_(torch.randn(10, 3), torch.tensor(targets), torch.ones(3))
    with pytest.raises(RuntimeError, match="scores must be float32"):
        torch.ops.quietstar.head_logsumexp(torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="block must be > 0, got 0"):
        torch.ops.quietstar.head_exp_block_sums_(torch.randn(10, 3), 0)
    with pytest.raises(RuntimeError, match=r"scores must be \[V, C\] with V > 0, got \[10\]"):
        torch.ops.quietstar.head_logsumexp(torch.randn(10))
