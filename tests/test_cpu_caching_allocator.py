"""The CPU caching allocator: reuse by size class, its limits, and that nothing it serves differs."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from helpers import requires_native
from quietstar.ops.cpu_caching_allocator import (
    cpu_caching_allocator,
    cpu_caching_allocator_bypassed,
    cpu_caching_allocator_stats,
    disable_cpu_caching_allocator,
    empty_cpu_caching_allocator_cache,
    enable_cpu_caching_allocator,
)

pytestmark = requires_native

MIB = 2**20


@pytest.fixture(autouse=True)
def restore_allocator():
    gc.collect()  # no other test's tensors freed while a test counts
    disable_cpu_caching_allocator()  # each test starts with an empty cache
    yield
    disable_cpu_caching_allocator()


def block(n_bytes: int) -> torch.Tensor:
    return torch.empty(n_bytes, dtype=torch.uint8)


def test_a_freed_block_serves_the_next_request_of_its_size_class():
    assert enable_cpu_caching_allocator(max_cached_bytes=64 * MIB)
    first = block(4 * MIB + 100)
    address = first.data_ptr()
    del first
    before = cpu_caching_allocator_stats()
    assert before.cached_blocks == 1 and before.cached_bytes >= 4 * MIB
    second = block(4 * MIB + 200)  # same class: 4 MiB rounded up to a multiple of 512 KiB
    after = cpu_caching_allocator_stats()
    assert second.data_ptr() == address
    assert (after.hits, after.cached_blocks, after.live_blocks) == (before.hits + 1, 0, before.live_blocks + 1)
    other = block(6 * MIB)  # another class: a new block
    assert other.data_ptr() != address and cpu_caching_allocator_stats().misses == after.misses + 1


def test_a_request_takes_a_cached_block_up_to_twice_its_size():
    assert enable_cpu_caching_allocator(max_cached_bytes=64 * MIB)
    large = block(6 * MIB)
    address = large.data_ptr()
    del large
    before = cpu_caching_allocator_stats()
    too_small = block(2 * MIB)  # 6 MiB is more than twice 2 MiB: a new block
    assert too_small.data_ptr() != address and cpu_caching_allocator_stats().misses == before.misses + 1
    fits = block(4 * MIB)  # the resident 6 MiB block rather than new pages
    assert fits.data_ptr() == address and cpu_caching_allocator_stats().hits == before.hits + 1


def test_small_requests_go_to_pytorchs_allocator():
    assert enable_cpu_caching_allocator(min_block_bytes=MIB)
    before = cpu_caching_allocator_stats()
    kept = [block(64 * 1024) for _ in range(8)]
    after = cpu_caching_allocator_stats()
    assert (after.hits, after.misses, after.live_blocks) == (before.hits, before.misses, before.live_blocks)
    assert len(kept) == 8


def test_cached_bytes_never_exceed_the_limit():
    assert enable_cpu_caching_allocator(max_cached_bytes=5 * MIB)
    blocks = [block(2 * MIB) for _ in range(4)]
    del blocks
    stats = cpu_caching_allocator_stats()
    assert stats.cached_bytes <= 5 * MIB and stats.cached_blocks == 2
    assert enable_cpu_caching_allocator(max_cached_bytes=0)  # lowering the limit frees at once
    assert cpu_caching_allocator_stats().cached_bytes == 0


def test_emptying_the_cache_frees_cached_blocks_and_keeps_live_ones():
    assert enable_cpu_caching_allocator()
    live = block(2 * MIB).fill_(7)
    freed = block(3 * MIB)
    del freed
    before = cpu_caching_allocator_stats()
    assert before.cached_blocks >= 1
    empty_cpu_caching_allocator_cache()
    after = cpu_caching_allocator_stats()
    assert after.enabled and (after.cached_bytes, after.cached_blocks) == (0, 0)
    assert after.live_blocks == before.live_blocks
    again = block(3 * MIB)  # a miss: nothing cached to serve it
    assert cpu_caching_allocator_stats().misses == after.misses + 1 and again.numel() == 3 * MIB
    assert bool((live == 7).all())


def test_bypassed_requests_are_neither_served_nor_kept_by_the_cache():
    assert enable_cpu_caching_allocator()
    cached = block(4 * MIB)
    del cached
    before = cpu_caching_allocator_stats()
    with cpu_caching_allocator_bypassed():
        snapshot = block(4 * MIB)  # its size class is cached, yet PyTorch's allocator serves it
        with cpu_caching_allocator_bypassed():  # nesting keeps it bypassed
            inner = block(4 * MIB)
        later = block(4 * MIB)
    assert cpu_caching_allocator_stats() == before
    del snapshot, inner, later
    assert cpu_caching_allocator_stats() == before  # freed to the system, not cached
    served = block(4 * MIB)  # after the block: the cache again
    assert cpu_caching_allocator_stats().hits == before.hits + 1 and served.numel() == 4 * MIB


def test_overlapping_bypasses_end_with_the_last():
    assert enable_cpu_caching_allocator()
    cached = block(4 * MIB)
    del cached
    first, second = cpu_caching_allocator_bypassed(), cpu_caching_allocator_bypassed()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # out of order, as two threads may end them
    before = cpu_caching_allocator_stats()
    still = block(4 * MIB)
    assert cpu_caching_allocator_stats() == before  # still bypassed: the second block is open
    second.__exit__(None, None, None)
    served = block(4 * MIB)
    assert cpu_caching_allocator_stats().hits == before.hits + 1 and still.numel() == served.numel()


def test_disabling_frees_the_cache_and_keeps_live_tensors_valid():
    assert enable_cpu_caching_allocator()
    live_before = cpu_caching_allocator_stats().live_blocks  # another test's tensors may hold some
    live = torch.arange(2**20, dtype=torch.float32)
    freed = block(3 * MIB)
    del freed
    disable_cpu_caching_allocator()
    stats = cpu_caching_allocator_stats()
    assert not stats.enabled and stats.cached_bytes == 0 and stats.live_blocks == live_before + 1
    assert torch.equal(live * 2, torch.arange(2**20, dtype=torch.float32) * 2)
    del live
    after = cpu_caching_allocator_stats()
    assert after.live_blocks == live_before
    fresh = block(3 * MIB)  # PyTorch's allocator again: not counted here
    assert cpu_caching_allocator_stats() == after and fresh.numel() == 3 * MIB


def test_a_step_computes_the_same_bits_with_and_without_it():
    def step():
        generator = torch.Generator().manual_seed(0)
        weights = [torch.randn(512, 512, generator=generator, requires_grad=True) for _ in range(3)]
        x = torch.randn(1024, 512, generator=generator)
        for w in weights:
            x = torch.nn.functional.silu(x @ w)
        x.square().mean().backward()
        return [w.grad for w in weights]

    without = step()
    with cpu_caching_allocator() as enabled:
        assert enabled
        step()  # fills the cache
        hits = cpu_caching_allocator_stats().hits
        with_cache = step()  # served from it
        assert cpu_caching_allocator_stats().hits > hits
    assert all(torch.equal(a, b) for a, b in zip(without, with_cache))


def test_the_context_leaves_an_allocator_enabled_by_the_caller_on():
    assert enable_cpu_caching_allocator()
    with cpu_caching_allocator():
        pass
    assert cpu_caching_allocator_stats().enabled
    disable_cpu_caching_allocator()
    with cpu_caching_allocator():
        assert cpu_caching_allocator_stats().enabled
    assert not cpu_caching_allocator_stats().enabled


def test_threads_allocating_at_once_get_distinct_intact_blocks():
    assert enable_cpu_caching_allocator(max_cached_bytes=16 * MIB)
    live_before = cpu_caching_allocator_stats().live_blocks
    errors = []

    def work(seed: int) -> None:
        for i in range(50):
            value = seed * 1000 + i
            x = torch.full(((1 + (seed + i) % 3) * MIB // 4,), value, dtype=torch.int32)
            y = torch.full_like(x, -value)
            if not (torch.all(x == value) and torch.all(y == -value)):
                errors.append((seed, i))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert cpu_caching_allocator_stats().live_blocks == live_before


@pytest.mark.parametrize(("options", "message"), [({"max_cached_bytes": -1}, "max_cached_bytes"),
                                                  ({"min_block_bytes": 0}, "min_block_bytes")])
def test_bad_limits_are_refused_by_name(options, message):
    with pytest.raises(ValueError, match=message):
        enable_cpu_caching_allocator(**options)


@pytest.mark.parametrize(("limits", "message"), [((-1, 1), "max_cached_bytes must be >= 0, got -1"),
                                                 ((0, 0), "min_block_bytes must be > 0, got 0")])
def test_the_native_op_refuses_bad_limits_with_their_values(limits, message):
    # Past the Python checks: the op's own, which refuse before anything changes.
    with pytest.raises(RuntimeError, match=message):
        torch.ops.quietstar.cpu_caching_allocator_enable(*limits)
