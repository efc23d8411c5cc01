"""Time and peak memory of one benchmark step, measured inside a fresh worker process.

Peak memory is measured for real, on a step after a warm-up step (so what the first step sets
up once is not counted): on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated
before the step; on CPU the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs``) above its resident size before the step. Up to that run glibc hands
every freed buffer above 128 KiB back at once (``mallopt``, set by ``bench/run.py``'s worker
before it builds anything; ``measure`` trims what glibc holds and empties the CPU caching
allocator's cache before the run), so the reading is the step's live data plus, with the
caching allocator, the freed blocks its cache holds at the peak. The timed runs that follow
set glibc's threshold to 32 MiB, the ceiling its own adjustment reaches (returning buffers at
once slows an allocation-heavy CPU step by up to 1.5x).
"""

from __future__ import annotations

import ctypes
import gc
import re
import statistics
import time
from collections.abc import Callable

import torch

from quietstar.ops.cpu_caching_allocator import empty_cpu_caching_allocator_cache
from quietstar.ops.onednn_linear import (
    mkl_packing_available,
    onednn_linear,
    onednn_linear_available,
    pack_weight,
    packed_linear,
)

MIB = 2**20
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MEMORY_RUN_MMAP_THRESHOLD = 128 * 2**10  # freed buffers above this leave the resident set at once
# glibc's own upper bound of its dynamic threshold, restored for the timed runs.
TIMED_RUN_MMAP_THRESHOLD = 32 * 2**20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+)", status.read()).group(1))


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: the resident size is what it is
        return None


def return_freed_memory_at_once() -> None:
    """From now on glibc hands every freed buffer above 128 KiB back to the system at once: a
    worker calls this before building its step, so the step's inputs and weights do not sit
    among freed memory that glibc keeps (on CPU; glibc only)."""
    _set_mmap_threshold(MEMORY_RUN_MMAP_THRESHOLD, trim=True)


def _set_mmap_threshold(threshold: int, trim: bool) -> None:
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        if trim:
            libc.malloc_trim(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    step: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: bool = True,
    after_run: Callable[[], float] | None = None,
) -> dict:
    """Run ``step`` once to warm up, once for peak memory, then ``repeats`` times for time.
    ``warmup=False`` (a step long enough to time cold): one run, timed, its memory measured
    with the allocator as it is. ``after_run`` (a matmul rate, say) is called right after each
    timed run, untimed, so that each run is paired with what the machine did next to it.

    Returns:
        ``{"peak_mib": extra peak memory of one step, "times_s": [...], "time_s": median}``,
        and with ``after_run`` ``"after_runs"``: its value after each timed run, in order.
    """
    if not warmup:
        peak, seconds = _peak_run(step, device)
        result = {"peak_mib": peak / MIB, "times_s": [seconds], "time_s": seconds}
        return result if after_run is None else {**result, "after_runs": [after_run()]}
    step()
    if device.type == "cpu":
        empty_cpu_caching_allocator_cache()
        _set_mmap_threshold(MEMORY_RUN_MMAP_THRESHOLD, trim=True)
    peak, _ = _peak_run(step, device)
    if device.type == "cpu":
        _set_mmap_threshold(TIMED_RUN_MMAP_THRESHOLD, trim=False)
    times, after = _timed_runs(step, device, repeats, after_run)
    result = {"peak_mib": peak / MIB, "times_s": times, "time_s": statistics.median(times)}
    return result if after_run is None else {**result, "after_runs": after}


def _timed_runs(
    step: Callable[[], object], device: torch.device, repeats: int, after_run: Callable[[], float] | None = None
) -> tuple[list[float], list[float]]:
    """Seconds of each of ``repeats`` runs of ``step``, the device synchronized around each, and
    ``after_run()`` after each (an empty list without it)."""
    times, after = [], []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
        if after_run is not None:
            after.append(after_run())
    return times, after


def _peak_run(step: Callable[[], object], device: torch.device) -> tuple[int, float]:
    """One run of ``step``: its extra peak memory in bytes and its seconds."""
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        started = time.perf_counter()
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before, time.perf_counter() - started
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size
    before = _proc_status_kib("VmRSS") * 1024
    started = time.perf_counter()
    step()
    seconds = time.perf_counter() - started
    # The kernel's RSS counters are batched per thread: a step that allocates nothing new can
    # read a few pages below ``before``.
    return max(0, _proc_status_kib("VmHWM") * 1024 - before), seconds


def probe_fits(step: Callable[[], object], device: torch.device, budget_bytes: int) -> dict:
    """Run ``step`` once under a memory budget for the whole process.

    On CPU the process's data segment is capped at the budget (an allocation past it fails
    instead of swapping) and its total peak resident size must stay within it; on CUDA the
    peak allocated memory must.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (budget_bytes, budget_bytes))
        step()
        peak = _proc_status_kib("VmHWM") * 1024
    return {"fits": peak <= budget_bytes, "peak_gib": peak / 2**30}


def matmul_tflops(
    device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, ...]], repeats: int = 3
) -> float:
    """The measured matrix-product rate (TFLOP/s) over ``shapes``: a case's own products in its
    dtype, the floor its useful FLOPs are held against. Each shape is ``(batch, m, k, n)`` or
    ``(batch, m, k, n, count)``, ``count`` the times a step runs it (default 1), so the rate
    weighs every shape as the step does. Each shape runs once to warm up, then ``repeats``
    times; the rate is all the step's FLOPs over the sum of the counted per-shape medians.
    For float32 on the CPU, where the library multiplies through oneDNN (``onednn_linear``) and
    MKL's packed GEMM (``packed_linear``, the weight packed once, outside the timing), each
    shape's time is that of the fastest of ``torch.bmm`` and those two (picked by one run of
    each after its warm-up, then timed ``repeats`` times): the floor is the best product this
    machine offers, not one library's. Inputs are random (zeros can run faster)."""
    gen = torch.Generator(device=device).manual_seed(0)
    flops = seconds = 0.0
    for batch, m, k, n, *count in shapes:
        runs = count[0] if count else 1
        a = torch.randn(batch, m, k, generator=gen, device=device).to(dtype)
        b = torch.randn(batch, k, n, generator=gen, device=device).to(dtype)
        products = [lambda: torch.bmm(a, b)]
        if batch == 1 and device.type == "cpu" and dtype == torch.float32:
            weight = b[0].t().contiguous()  # [n, k]: a linear layer's weight
            if onednn_linear_available():
                products.append(lambda: onednn_linear(a[0], weight))
            if mkl_packing_available():
                packed = pack_weight(weight, dtype, m)
                products.append(lambda: packed_linear(a[0], packed))
        fastest = products[0]
        if len(products) > 1:  # one run of each, after its warm-up, picks the one to time
            first_runs = {}
            for product in products:
                product()
                first_runs[product] = _timed_runs(product, device, 1)[0][0]
            fastest = min(first_runs, key=first_runs.get)
        else:
            fastest()  # warm-up
        best = statistics.median(_timed_runs(fastest, device, repeats)[0])
        flops += runs * 2.0 * batch * m * k * n
        seconds += runs * best
    return flops / seconds / 1e12
