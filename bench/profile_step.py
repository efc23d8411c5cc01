"""Where a training step's time goes: the bench's ``training_step`` model at one of its sizes,
timed in three parts (``sample_thoughts`` alone, the step given thoughts, the step with its own
sampling), then the step with its own sampling under ``torch.profiler``.

    python bench/profile_step.py --size "B=1 L=128" [--device cuda] [--bf16] [--steps 5] [--top 30]

Prints the medians, the profiler's table of the most expensive operators (by their own time on
the device: CUDA kernels on a GPU, CPU time on a CPU), and one summary line: wall time of the
profiled step against the sum of its device kernels' time, and the number of kernel launches
(a GPU step whose kernels add up to far less than its wall time is waiting on launches or
host synchronisations). ``--trace FILE`` also writes a Chrome trace. ``--bf16`` runs everything
under bfloat16 autocast (float32 master weights), as the bench's ``quietstar+sampling-bf16``.
``--narrow N`` runs the same step with the model's hidden size, MLP width and vocabulary divided
by ``N`` (``training_step.narrowed``): the same operators over the same tokens with ``N`` times
less work each, so its times are about the step's cost per operator, which no kernel's speed
changes (at ``N = 4`` the products are 1/16 of the full model's; keep the head size a multiple
of 16, or the attention kernels run on part-empty vectors).

On a CPU the step runs with the CPU caching allocator, as the bench's training-step workers and
``quietstar train`` run it (``--no-cpu-caching-allocator``: without), and the profiled step's
wall time is then accounted for: its matrix products (each shape and dtype against that
product's own rate, measured right after the step with ``measure.matmul_tflops``, the bench's
floor: the faster of ``torch.bmm`` and oneDNN's linear in float32, ``torch.bmm`` otherwise; so
``lost`` is the time a product took beyond its rate, negative where the step's product beat
it), the tree attention kernels, quietstar's other kernels, copies and casts, the other
operators (autograd's nodes among them), and the time outside any operator (Python, dispatch,
the profiler's own bookkeeping).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import training_step  # noqa: E402
from measure import matmul_tflops  # noqa: E402

from quietstar.ops.cpu_caching_allocator import enable_cpu_caching_allocator  # noqa: E402

# The operators that multiply matrices in a step (PyTorch's, oneDNN's linear, MKL's packed linear).
MKL_PACKED_LINEAR = "quietstar::mkl_packed_linear_"
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "mkldnn::_linear_pointwise", MKL_PACKED_LINEAR)
# The operators that pack a weight for those products.
PACKING_OPS = ("mkldnn::_reorder_linear_weight", "quietstar::mkl_pack_weight")
# Shapes listed under the products, those furthest from their rates (either way) first.
PRODUCT_ROWS = 8
# The profiler's names of the products' input dtypes.
PROFILER_DTYPES = {"float": torch.float32, "double": torch.float64, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def product_call(name: str, shapes: list[list[int]], dtypes: list[str]) -> tuple[tuple[int, int, int, int], torch.dtype]:
    """``(batch, m, k, n)`` and the dtype of a call of the matrix-product operator ``name``
    (``PRODUCT_OPS``) from the profiler's input shapes and dtypes. oneDNN's linear takes
    ``x [..., k]`` and ``weight [n, k]``; MKL's packed linear ``x [..., k]``, the packed copy,
    ``n`` and the result ``[..., n]``; ``addmm`` and ``addmm_`` multiply their second and third
    inputs.

    Raises:
        ValueError: a dtype the profiler names that ``PROFILER_DTYPES`` does not know.
    """
    first = 0 if name in ("mkldnn::_linear_pointwise", MKL_PACKED_LINEAR, "aten::mm", "aten::bmm") else 1
    if dtypes[first] not in PROFILER_DTYPES:
        raise ValueError(f"{name}: the profiler's dtype {dtypes[first]!r} is not one of {sorted(PROFILER_DTYPES)}")
    dtype = PROFILER_DTYPES[dtypes[first]]
    if name == MKL_PACKED_LINEAR:
        x, out = shapes[0], shapes[3]
        return (1, math.prod(x[:-1]), x[-1], out[-1]), dtype
    if name == "mkldnn::_linear_pointwise":
        x, weight = shapes[0], shapes[1]
        return (1, math.prod(x[:-1]), x[-1], weight[0]), dtype
    a, b = shapes[first], shapes[first + 1]
    if name == "aten::bmm":
        return (a[0], a[1], a[2], b[2]), dtype
    return (1, a[0], a[1], b[1]), dtype


def category(name: str) -> str:
    """What an operator other than a matrix product is, for the step's accounting."""
    if "tree_attention" in name:
        return "tree attention kernels"
    if name.startswith("quietstar::"):
        return "quietstar's other kernels"
    if name in ("aten::copy_", "aten::_to_copy", "aten::clone", *PACKING_OPS):
        return "copies, casts, weight packing"
    return "other operators"


class ProductRow(NamedTuple):
    """One product shape and dtype of the profiled step, against its own rate."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    calls: int
    ms: float  # the calls' own CPU time
    floor_ms: float  # the same FLOPs at the shape's rate

    @property
    def lost_ms(self) -> float:
        return self.ms - self.floor_ms


def input_dtypes(prof: torch.profiler.profile) -> dict[int, list[str]]:
    """Each CPU operator's input dtypes as the profiler names them (``'float'``, ``'c10::BFloat16'``),
    by its event's id. Read from the kineto events the operator events are made of (an event's id
    is its kineto event's correlation id): torch 2.11's ``FunctionEvent`` has no ``input_dtypes``.
    Events without dtypes are left out: CUDA runtime calls are CPU events too, numbered apart."""
    return {
        event.correlation_id(): event.dtypes()
        for event in prof.profiler.kineto_results.events()
        if event.device_type() == torch.autograd.DeviceType.CPU and event.dtypes()
    }


def print_accounting(prof: torch.profiler.profile, wall_ms: float, device: torch.device) -> None:
    """The profiled CPU step's wall time by kind of work, its products against their rates."""
    products: dict[tuple, list] = collections.defaultdict(lambda: [0, 0.0])  # (shape, dtype) -> [calls, ms]
    kinds: collections.Counter[str] = collections.Counter()
    dtypes = input_dtypes(prof)
    for event in prof.events():
        ms = event.self_cpu_time_total / 1e3
        if event.name in PRODUCT_OPS and event.input_shapes:
            key = product_call(event.name, event.input_shapes, dtypes[event.id])
            products[key][0] += 1
            products[key][1] += ms
        else:
            kinds[category(event.name)] += ms
    rows = [
        ProductRow(shape, dtype, calls, ms, 2.0 * math.prod(shape) * calls / (matmul_tflops(device, dtype, [shape]) * 1e9))
        for (shape, dtype), (calls, ms) in products.items()
    ]
    product_ms, floor_ms = sum(r.ms for r in rows), sum(r.floor_ms for r in rows)
    print(f"where the profiled step's {wall_ms:.0f} ms went (CPU time of operators, their own):")
    print(
        f"  {'matrix products':<30} {product_ms:9.1f} ms; at each shape's rate {floor_ms:.1f} ms "
        f"(lost {product_ms - floor_ms:+.1f} ms)"
    )
    for row in sorted(rows, key=lambda r: -abs(r.lost_ms))[:PRODUCT_ROWS]:
        batch, m, k, n = row.shape
        shape = f"{batch} x [{m} x {k}] x [{k} x {n}]"
        rate = 2.0 * math.prod(row.shape) * row.calls / row.ms / 1e6 if row.ms > 0 else math.inf
        print(
            f"    {shape:<32} {str(row.dtype).removeprefix('torch.'):<8} {row.calls:5d} calls {row.ms:8.1f} ms "
            f"{rate:5.0f} GFLOP/s, at its rate {row.floor_ms:7.1f} ms (lost {row.lost_ms:+.1f})"
        )
    for kind, ms in kinds.most_common():
        print(f"  {kind:<30} {ms:9.1f} ms")
    print(f"  {'outside operators':<30} {wall_ms - product_ms - sum(kinds.values()):9.1f} ms (Python, dispatch)")


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
    parser.add_argument("--bf16", action="store_true", help="run under bfloat16 autocast (float32 master weights)")
    parser.add_argument(
        "--narrow",
        type=int,
        default=1,
        metavar="N",
        help="divide the model's hidden size, MLP width and vocabulary by N (layers, heads and tokens kept): "
        "the same operators with N times less work each, so what stays is the cost per operator",
    )
    parser.add_argument(
        "--no-cpu-caching-allocator",
        dest="cpu_caching_allocator",
        action="store_false",
        help="on a CPU, run without the caching allocator the bench's training-step workers use",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sizes = training_step.sizes(device, args.scale)
    labels = [training_step.label(s) for s in sizes]
    if args.size is not None and args.size not in labels:
        parser.error(f"--size: expected one of {labels}, got {args.size!r}")
    size = sizes[labels.index(args.size)] if args.size else sizes[0]
    try:
        size = training_step.narrowed(size, args.narrow)
    except ValueError as error:
        parser.error(f"--narrow: {error}")
    if device.type == "cpu" and args.cpu_caching_allocator:
        enable_cpu_caching_allocator()

    qs = training_step.make_model(size, device)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, qs.lm_head[0].shape[0], (size["batch"], size["length"]), generator=gen, device=device)
    thoughts = qs.sample_thoughts(ids, generator=gen)
    params = [p for p in qs.parameters() if p.requires_grad]

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()

    def sampling_only():
        with torch.no_grad(), autocast():
            qs.sample_thoughts(ids, generator=gen)

    def given_thoughts():
        with autocast():
            loss = qs(ids, thoughts=thoughts).loss
        torch.autograd.grad(loss, params)

    def own_sampling():
        with autocast():
            loss = qs(ids, generator=gen).loss
        torch.autograd.grad(loss, params)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    mode = ", bfloat16 autocast" if args.bf16 else ""
    mode += f", widths divided by {args.narrow}" if args.narrow > 1 else ""
    print(f"{training_step.label(size)} on {device} ({name}{mode}), torch {torch.__version__}, median of {args.steps}:")
    parts = [("sample_thoughts", sampling_only), ("step, thoughts given", given_thoughts), ("step, own sampling", own_sampling)]
    for name, fn in parts:
        print(f"  {name:<22} {median_ms(fn, device, args.steps):9.1f} ms")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities, record_shapes=device.type == "cpu") as prof:
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
        print_accounting(prof, wall_ms, device)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
