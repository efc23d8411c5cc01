"""Tune the tree-attention Triton kernels on this GPU: time every candidate tile configuration
of the forward, dQ and dK/dV kernels at one problem size and write the fastest as a JSON file
that ``QUIETSTAR_TREE_ATTENTION_CONFIGS`` reads.

    python bench/tune_tree_attention.py --length 4096 --json tuned.json
    QUIETSTAR_TREE_ATTENTION_CONFIGS=tuned.json python bench/run.py

Each candidate is first compiled and checked against the ``torch`` backend (float32 ground
truth) at a small size, in parallel worker processes (Triton caches the compiled kernels on
disk, so the timing process only loads them); a candidate that fails to compile or to match
is reported and skipped. Then each kernel's candidates are timed one by one, the other
kernels at their defaults: the forward alone for ``fwd``, the whole backward for ``dq`` and
``dkdv`` (median of CUDA-event timings). Head dim 128 in bfloat16 (the ``"wide"`` entries).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import multiprocessing
import os
import statistics
import sys
from pathlib import Path

import torch

CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 2)],
    "dq": [(64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2)],
    "dkdv": [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 32, 4, 2), (128, 64, 8, 2)],
}
CHECK_SIZE = dict(batch=1, slot_len=208, tolerance=2e-2)  # 208: tails for every tile, L % 16 == 0 as timed
SHAPE = dict(q_heads=32, kv_heads=8, head_dim=128, n_slots=29, n_thoughts=2)
_DEFAULTS = None  # the module's GPU_CONFIGS as imported, before any candidate replaced an entry


def as_config(candidate: tuple[int, int, int, int]) -> dict:
    block_m, block_n, warps, stages = candidate
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def use_config(kernel: str, config: dict | None) -> None:
    """Make ``config`` the ``"wide"`` entry of ``kernel`` in this process (None: the default)."""
    import quietstar.kernels.tree_attention as kernels

    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = copy.deepcopy(kernels.GPU_CONFIGS)
    kernels.GPU_CONFIGS = copy.deepcopy(_DEFAULTS)
    if config is not None:
        kernels.GPU_CONFIGS["wide"][kernel] = dict(config)
    kernels._gpu_configs.cache_clear()


def make_inputs(batch: int, slot_len: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    length = SHAPE["n_slots"] * slot_len

    def randn(heads):
        return torch.randn(batch, heads, length, SHAPE["head_dim"], generator=gen, device="cuda", dtype=torch.bfloat16)

    return randn(SHAPE["q_heads"]), randn(SHAPE["kv_heads"]), randn(SHAPE["kv_heads"]), randn(SHAPE["q_heads"])


def check(kernel: str, candidate: tuple) -> tuple[str, tuple, str | None]:
    """Compile ``candidate`` and compare it with the torch backend; the problem, or None."""
    from quietstar import tree_attention

    try:
        use_config(kernel, as_config(candidate))
        q, k, v, grad = make_inputs(CHECK_SIZE["batch"], CHECK_SIZE["slot_len"])
        inputs = [t.requires_grad_() for t in (q, k, v)]
        ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
        options = dict(n_thoughts=SHAPE["n_thoughts"])
        out = tree_attention(*inputs, CHECK_SIZE["slot_len"], backend="triton", **options)
        grads = torch.autograd.grad(out, inputs, grad)
        ref = tree_attention(*ref_inputs, CHECK_SIZE["slot_len"], backend="torch", **options)
        ref_grads = torch.autograd.grad(ref, ref_inputs, grad.float())
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
            error = ((got.double() - want.double()).norm() / want.double().norm()).item()
            if not error <= CHECK_SIZE["tolerance"]:
                return kernel, candidate, f"{name} relative error {error:.3g}"
        torch.cuda.synchronize()
    except Exception as error:  # noqa: BLE001  (a candidate that fails is reported, not fatal)
        return kernel, candidate, f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return kernel, candidate, None


def time_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_candidates(kernel: str, candidates: list[tuple], batch: int, slot_len: int, repeats: int) -> dict:
    from quietstar.kernels.tree_attention import tree_attention_backward, tree_attention_forward

    q, k, v, grad = make_inputs(batch, slot_len, seed=1)
    scale = SHAPE["head_dim"] ** -0.5
    options = (slot_len, SHAPE["n_thoughts"], None, None, scale, False)
    use_config(kernel, None)
    out, lse = tree_attention_forward(q, k, v, *options)
    timings = {}
    for candidate in candidates:
        use_config(kernel, as_config(candidate))
        if kernel == "fwd":
            timings[candidate] = time_ms(lambda: tree_attention_forward(q, k, v, *options), repeats)
        else:
            timings[candidate] = time_ms(lambda: tree_attention_backward(grad, q, k, v, out, lse, *options), repeats)
        print(f"  {kernel} {candidate}: {timings[candidate]:.2f} ms", flush=True)
    use_config(kernel, None)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096, help="slot length L of the timed problem")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=8, help="processes that compile and check candidates")
    parser.add_argument("--json", type=Path, required=True, help="where to write the chosen configurations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    from quietstar.kernels.tree_attention import CONFIGS_ENV_VAR

    os.environ.pop(CONFIGS_ENV_VAR, None)  # candidates replace the built-in defaults only

    jobs = [(kernel, c) for kernel, candidates in CANDIDATES.items() for c in candidates]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        results = list(pool.map(check, *zip(*jobs)))
    usable = {kernel: [] for kernel in CANDIDATES}
    report = {"size": {**SHAPE, "batch": args.batch, "slot_len": args.length}, "failed": [], "timings_ms": {}}
    for kernel, candidate, problem in results:
        if problem is None:
            usable[kernel].append(candidate)
        else:
            print(f"  {kernel} {candidate}: skipped ({problem})", flush=True)
            report["failed"].append({"kernel": kernel, "config": as_config(candidate), "problem": problem})

    chosen = {}
    for kernel, candidates in usable.items():
        if not candidates:
            continue
        timings = time_candidates(kernel, candidates, args.batch, args.length, args.repeats)
        best = min(timings, key=timings.get)
        chosen[kernel] = as_config(best)
        report["timings_ms"][kernel] = [{"config": as_config(c), "ms": t} for c, t in timings.items()]
        print(f"{kernel}: best {best} at {timings[best]:.2f} ms", flush=True)
    args.json.write_text(json.dumps({"wide": chosen}, indent=2))
    args.json.with_suffix(".report.json").write_text(json.dumps(report, indent=2))
    print(f"chosen configurations written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
