"""Where a training step's time goes: the bench's ``training_step`` model at one of its sizes,
timed in three parts (``sample_thoughts`` alone, the step given thoughts, the step with its own
sampling), then the step with its own sampling under ``torch.profiler``.

    python bench/profile_step.py --size "B=1 L=128" [--device cuda] [--steps 5] [--top 30]

Prints the medians, the profiler's table of the most expensive operators (by their own time on
the device: CUDA kernels on a GPU, CPU time on a CPU), and one summary line: wall time of the
profiled step against the sum of its device kernels' time, and the number of kernel launches
(a GPU step whose kernels add up to far less than its wall time is waiting on launches or
host synchronisations). ``--trace FILE`` also writes a Chrome trace.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import training_step  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, steps: int) -> float:
    fn()  # warm-up: kernels compiled, allocator and caches filled
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", default="default", choices=["quick", "default", "full"])
    parser.add_argument("--size", help="a size label of the training_step case (default: its first)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per part (median)")
    parser.add_argument("--top", type=int, default=30, help="rows of the profiler's table")
    parser.add_argument("--trace", type=Path, help="write a Chrome trace of the profiled step here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = training_step.sizes(device, args.scale)
    labels = [training_step.label(s) for s in sizes]
    if args.size is not None and args.size not in labels:
        parser.error(f"--size: expected one of {labels}, got {args.size!r}")
    size = sizes[labels.index(args.size)] if args.size else sizes[0]

    qs = training_step.make_model(size, device)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, qs.lm_head[0].shape[0], (size["batch"], size["length"]), generator=gen, device=device)
    thoughts = qs.sample_thoughts(ids, generator=gen)
    params = [p for p in qs.parameters() if p.requires_grad]

    def sampling_only():
        with torch.no_grad():
            qs.sample_thoughts(ids, generator=gen)

    def given_thoughts():
        torch.autograd.grad(qs(ids, thoughts=thoughts).loss, params)

    def own_sampling():
        torch.autograd.grad(qs(ids, generator=gen).loss, params)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{training_step.label(size)} on {device} ({name}), torch {torch.__version__}, median of {args.steps}:")
    parts = [("sample_thoughts", sampling_only), ("step, thoughts given", given_thoughts), ("step, own sampling", own_sampling)]
    for name, fn in parts:
        print(f"  {name:<22} {median_ms(fn, device, args.steps):9.1f} ms")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        own_sampling()
        synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top, max_name_column_width=70))
    if device.type == "cuda":
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_ms = sum(e.device_time for e in kernels) / 1e3
        print(f"profiled step: wall {wall_ms:.1f} ms, device kernels {kernel_ms:.1f} ms in {len(kernels)} launches")
    else:
        print(f"profiled step: wall {wall_ms:.1f} ms")
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
