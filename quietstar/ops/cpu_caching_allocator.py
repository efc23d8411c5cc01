"""A caching allocator for CPU tensors, from the native extension (``csrc/cpu_caching_allocator.cpp``).

glibc hands large freed blocks back to the operating system at once, so a CPU training step that
allocates the same activations every step faults their pages in again every step (about
170,000 page faults per SmolLM2-135M step at L=128). While enabled, freed blocks of at least
``min_block_bytes`` are kept and reused by later requests of about their size (their size
class, or down to half their size), as PyTorch's CUDA allocator does on GPUs. It replaces
PyTorch's CPU allocator for the whole process; ``quietstar train`` enables it on CPU for the
run (``--cpu-caching-allocator``).

    with cpu_caching_allocator():
        train_loop()
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from quietstar.ops.native import native_unavailable

logger = logging.getLogger(__name__)

# Blocks below this go to PyTorch's own allocator (glibc keeps reusing them from its heap).
# Above it glibc may map and unmap, or trim, per request: at 1 MiB a SmolLM2-135M step's
# 128-row MLP activations (768 KiB) still faulted their pages in at every call.
DEFAULT_MIN_BLOCK_BYTES = 2**16
# Default cap of the freed bytes held, as a share of the machine's physical memory, split
# between the processes torchrun starts on the machine (LOCAL_WORLD_SIZE).
DEFAULT_CACHE_SHARE = 0.25


@dataclass(frozen=True)
class CPUCacheStats:
    """The allocator's counters since the process started."""

    enabled: bool
    hits: int  # requests served from the cache
    misses: int  # requests that took a new block from the system
    cached_bytes: int  # freed bytes held for reuse
    cached_blocks: int
    live_bytes: int  # bytes of its blocks in use (size classes, not requested sizes)
    live_blocks: int


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def enable_cpu_caching_allocator(
    max_cached_bytes: int | None = None, min_block_bytes: int = DEFAULT_MIN_BLOCK_BYTES
) -> bool:
    """Route CPU allocations of at least ``min_block_bytes`` through the caching allocator.

    Args:
        max_cached_bytes: most freed bytes this process holds for reuse (default:
            ``DEFAULT_CACHE_SHARE`` of physical memory over the machine's torchrun processes);
            past it the largest cached blocks are freed. Calling again while enabled changes
            the limits.
        min_block_bytes: smaller requests go to PyTorch's allocator.

    Returns:
        Whether it is enabled: False, with one log line saying why, without the native extension.
    """
    if max_cached_bytes is None:
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        max_cached_bytes = int(DEFAULT_CACHE_SHARE * physical_memory_bytes() / processes)
    if max_cached_bytes < 0:
        raise ValueError(f"max_cached_bytes must be >= 0, got {max_cached_bytes}")
    if min_block_bytes <= 0:
        raise ValueError(f"min_block_bytes must be > 0, got {min_block_bytes}")
    reason = native_unavailable()
    if reason is not None:
        logger.info("CPU caching allocator unavailable (%s): PyTorch's CPU allocator stays", reason)
        return False
    torch.ops.quietstar.cpu_caching_allocator_enable(max_cached_bytes, min_block_bytes)
    return True


def disable_cpu_caching_allocator() -> None:
    """Restore PyTorch's CPU allocator and free the cached blocks. Tensors allocated while it
    was enabled stay valid; their memory goes back to the system when they are freed."""
    if native_unavailable() is None:
        torch.ops.quietstar.cpu_caching_allocator_disable()


def empty_cpu_caching_allocator_cache() -> None:
    """Free the cached blocks (as ``torch.cuda.empty_cache``); blocks in use stay. Before a
    large one-off allocation this keeps the peak at what it would be without the cache."""
    if native_unavailable() is None:
        torch.ops.quietstar.cpu_caching_allocator_empty_cache()


def cpu_caching_allocator_stats() -> CPUCacheStats:
    """The allocator's counters (all zero, not enabled, without the native extension)."""
    if native_unavailable() is not None:
        return CPUCacheStats(False, 0, 0, 0, 0, 0, 0)
    enabled, *counts = torch.ops.quietstar.cpu_caching_allocator_stats()
    return CPUCacheStats(bool(enabled), *counts)


@contextlib.contextmanager
def cpu_caching_allocator_bypassed() -> Iterator[None]:
    """Inside the block new CPU tensors skip the cache: PyTorch's allocator serves them and they
    go back to the system when freed. For large one-off copies, such as a checkpoint's snapshot
    of the weights and optimizer state, which the cache would otherwise hold until the next
    copy of their size. Blocks may nest or overlap across threads: the bypass ends with the
    last of them. Nothing changes when the allocator is off or not built."""
    if native_unavailable() is not None:
        yield
        return
    torch.ops.quietstar.cpu_caching_allocator_bypass(True)
    try:
        yield
    finally:
        torch.ops.quietstar.cpu_caching_allocator_bypass(False)


@contextlib.contextmanager
def cpu_caching_allocator(max_cached_bytes: int | None = None) -> Iterator[bool]:
    """Enable the caching allocator for a block (yields whether it is on); leaves it as it
    found it: a caller's own enabling outlives the block, with the caller's limits
    (``max_cached_bytes`` applies only when the block turns it on)."""
    was_enabled = cpu_caching_allocator_stats().enabled
    enabled = was_enabled or enable_cpu_caching_allocator(max_cached_bytes)
    try:
        yield enabled
    finally:
        if enabled and not was_enabled:
            disable_cpu_caching_allocator()
