"""A/B two versions of the tree-attention Triton kernels on one GPU, in one process.

    git show HEAD:kernels/tree_attention.py > /tmp/before.py
    python bench/compare_tree_attention_kernels.py /tmp/before.py kernels/tree_attention.py --length 4096

At the 7B-class layer of the GPU bench (B=8, Hq=32, Hkv=8, D=128, 29 slots, 2 thoughts,
bfloat16, random inputs): checks that both give the same forward and gradients (bitwise, and
the largest difference), times forward and backward of each with CUDA events, alternating
the two versions run by run (median of ``--repeats``), and lists each version's kernels by
device time (torch profiler, one run).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import torch

SHAPE = dict(batch=8, q_heads=32, kv_heads=8, head_dim=128, n_slots=29, n_thoughts=2)


def load_kernels(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="a kernels/tree_attention.py file")
    parser.add_argument("after", type=Path, help="another one")
    parser.add_argument("--length", type=int, default=4096, help="slot length L")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    versions = {"before": load_kernels("tree_attention_before", args.before), "after": load_kernels("tree_attention_after", args.after)}

    s, length = SHAPE, args.length
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(heads: int) -> torch.Tensor:
        shape = (s["batch"], heads, s["n_slots"] * length, s["head_dim"])
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v, grad_out = randn(s["q_heads"]), randn(s["kv_heads"]), randn(s["kv_heads"]), randn(s["q_heads"])
    options = (length, s["n_thoughts"], None, None, s["head_dim"] ** -0.5, False)

    def forward_backward(kernels) -> tuple[float, float, tuple]:
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        out, lse = kernels.tree_attention_forward(q, k, v, *options)
        events[1].record()
        grads = kernels.tree_attention_backward(grad_out, q, k, v, out, lse, *options)
        events[2].record()
        torch.cuda.synchronize()
        return events[0].elapsed_time(events[1]), events[1].elapsed_time(events[2]), (out, lse, *grads)

    results = {name: forward_backward(kernels)[2] for name, kernels in versions.items()}
    pairs = list(zip(results["before"], results["after"]))
    print("bitwise equal (out, lse, dq, dk, dv):", [torch.equal(a, b) for a, b in pairs])
    print("largest difference:", [float((a.float() - b.float()).abs().max()) for a, b in pairs])
    del results, pairs

    times = {name: [] for name in versions}
    for _ in range(args.repeats):
        for name, kernels in versions.items():
            times[name].append(forward_backward(kernels)[:2])
    for name, runs in times.items():
        fwd, bwd = statistics.median(f for f, _ in runs), statistics.median(b for _, b in runs)
        totals = [round(f + b, 1) for f, b in runs]
        print(f"L={length} {name}: forward {fwd:.1f} ms, backward {bwd:.1f} ms, total {fwd + bwd:.1f} ms (runs {totals})")

    from torch.profiler import ProfilerActivity, profile

    for name, kernels in versions.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward_backward(kernels)
        print(f"{name}, kernels by device time:")
        for event in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:6]:
            print(f"  {event.key[:56]:56s} {event.device_time_total / 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
