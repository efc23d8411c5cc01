"""quietstar's benchmark: every op per backend against the dense reference, side by side.

    python bench/run.py                      # every case at the issues' target sizes
    python bench/run.py --quick              # tiny sizes, about two minutes (a smoke run)
    python bench/run.py --full               # the target sizes in full where the default cuts them down
    python bench/run.py --case tree_attention --repeats 5 --json out.json

Each (case, variant) runs in a fresh worker process so that peak memory is its own
(``bench/measure.py`` says how it is measured). The table reports median time, the speed-up
``baseline time / time`` and the memory ratio ``baseline peak / peak`` (the baseline is the
dense reference, or on CUDA where that cannot fit FlexAttention), the useful TFLOP/s, their
fraction of the rate of the case's own matrix products (measured in the same run right after
each timed run, in the baseline's worker and in the others ``measures_matmul_rate`` names), and
the time over the case's floor (plain causal attention for tree attention).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from cases import CASES, SCALES  # noqa: E402
from measure import matmul_tflops, measure, probe_fits, return_freed_memory_at_once  # noqa: E402

from quietstar.ops.cpu_caching_allocator import enable_cpu_caching_allocator  # noqa: E402

DEFAULT_JSON = HERE / "out" / "results.json"
PEAK_MATMUL = (1, 8192, 8192, 8192)  # (batch, m, k, n) of the device's reference rate on CUDA
MAX_LENGTH_JSON = HERE / "out" / "max_length.json"


def run_worker(spec: dict) -> dict:
    """Body of a worker process: build one variant, measure it, return the record."""
    device = torch.device(spec["device"])
    if spec.get("matmul"):  # the device's peak: a large bfloat16 product
        return {"matmul_tflops": matmul_tflops(device, torch.bfloat16, [PEAK_MATMUL])}
    case = CASES[spec["case"]]
    allocator = {}
    if device.type == "cpu" and getattr(case, "CPU_CACHING_ALLOCATOR", False):
        allocator["cpu_caching_allocator"] = spec.get("cpu_caching_allocator", True) and enable_cpu_caching_allocator()
    warmup = not getattr(case, "COLD_START", False)
    # For measure()'s memory run (it restores glibc's threshold for the timed runs); --max-length
    # probes and a cold case, timed in the run they are measured in, keep glibc's defaults.
    if device.type == "cpu" and warmup and "budget_gib" not in spec:
        return_freed_memory_at_once()
    step, info = case.build(spec["variant"], spec["size"], device)
    if allocator.get("cpu_caching_allocator") is False and spec.get("cpu_caching_allocator") is False:
        info = {**info, "note": "; ".join(filter(None, [info.get("note"), "no CPU caching allocator"]))}
    if "budget_gib" in spec:
        return probe_fits(step, device, int(spec["budget_gib"] * 2**30))
    rate = None
    if spec.get("matmul_rate"):  # measured right after each timed run, on the case's shapes in the variant's dtype
        dtype, shapes = case.matmul_shapes(spec["size"], device)
        product_dtype = matmul_dtype(case, spec["variant"], dtype)
        rate = functools.partial(matmul_tflops, device, product_dtype, shapes)
    measured = measure(step, device, spec["repeats"], warmup=warmup, after_run=rate)
    record = {**info, **allocator, **measured}
    if rate is not None:
        record["matmul_tflops_runs"] = record.pop("after_runs")
        record["matmul_tflops"] = statistics.median(record["matmul_tflops_runs"])
    return record


def matmul_dtype(case, variant: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``variant`` multiplies in: the case's, unless its ``VARIANT_MATMUL_DTYPE`` says."""
    return getattr(case, "VARIANT_MATMUL_DTYPE", {}).get(variant, dtype)


def measures_matmul_rate(case, variant: str, device: torch.device, scale: str) -> bool:
    """Whether ``variant``'s worker measures its own matmul rate: the baseline's always, and a
    variant that multiplies in another dtype; at ``--full`` every variant's, next to its timing,
    since a machine's speed drifts over the minutes between workers (10-30% on shared CPUs)."""
    return variant == case.baseline(device) or scale == "full" or variant in getattr(case, "VARIANT_MATMUL_DTYPE", {})


def spawn_worker(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe(name: str, variant: str, size: dict, device: str, budget_gib: float, cpu_caching_allocator: bool = True) -> dict:
    """Whether one step of ``variant`` at ``size`` fits in ``budget_gib``; a worker that dies
    (out of memory) does not fit."""
    spec = {"case": name, "variant": variant, "size": size, "device": device, "budget_gib": budget_gib,
            "cpu_caching_allocator": cpu_caching_allocator}
    record = spawn_worker(spec)
    return record if "fits" in record else {"fits": False, "peak_gib": None, "error": record.get("error")}


def longest_length(
    name: str, variant: str, size: dict, device: str, budget_gib: float, start: int, limit: int, cpu_caching_allocator: bool = True
) -> dict:
    """The longest sequence length whose training step fits in the budget: doubling from
    ``start``, then bisection to 1/8 of the last length that fitted. Lengths above ``limit``
    are not tried; ``longest`` is 0 when ``start`` does not fit."""
    key = CASES[name].LENGTH_KEY
    tried = {}

    def fits(length: int) -> bool:
        tried[length] = probe(name, variant, {**size, key: length}, device, budget_gib, cpu_caching_allocator)
        print(f"  {variant} L={length}: {tried[length]}", flush=True)
        return tried[length]["fits"]

    good, bad = 0, None
    length = start
    while length <= limit and fits(length):
        good, length = length, 2 * length
    if length <= limit:
        bad = length
        step = max(good // 8, 16)
        while good and bad - good > step:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if fits(middle) else (good, middle)
    return {"variant": variant, "longest": good, "first_failing": bad, "limit": limit, "probes": tried}


def max_length_size(case, device: torch.device, scale: str | None) -> dict:
    """The size ``--max-length`` varies the length of: the whole model (the ``full`` scale)
    unless a scale is asked for; the default scale's cut (2 of 30 layers on CPU) would answer
    for a smaller model than the one whose memory is in question."""
    return case.sizes(device, scale or "full")[0]


def selected(variants: list[str], wanted: list[str] | None, keep: tuple[str | None, ...] = ()) -> list[str]:
    """``variants`` restricted to ``wanted`` (all when None), keeping those in ``keep``."""
    if wanted is None:
        return variants
    return [v for v in variants if v in wanted or v in keep]


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.machine(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"CPU ({cpu_model()}; {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return env


def cpu_model() -> str:
    """The CPU's model name and whether it multiplies bfloat16 natively (AVX-512 BF16 or AMX),
    which decides the bfloat16 numbers; "unknown" where /proc/cpuinfo does not say."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    bf16 = [name for flag, name in (("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX")) if flag in flags]
    return f"{names[0] if names else 'unknown'}, {' and '.join(bf16) if bf16 else 'no bfloat16 instructions'}"


def format_table(results: list[dict]) -> str:
    """The results as a markdown table (printed, and written next to the JSON)."""
    rows = [("case", "size", "variant", "time (ms)", "speed-up", "peak (MiB)", "memory ratio", "TFLOP/s", "of matmul", "x floor", "tokens/s", "note")]
    for r in results:
        if "error" in r or "skipped" in r:
            rows.append((r["case"], r["label"], r["variant"], *["-"] * 8, r.get("error") or f"skipped: {r['skipped']}"))
            continue
        rows.append(
            (
                r["case"],
                r["label"],
                r["variant"],
                f"{1000 * r['time_s']:.1f}",
                f"{r['speedup']:.2f}x" if r.get("speedup") else "-",
                f"{r['peak_mib']:.1f}",
                f"{r['memory_ratio']:.2f}x" if r.get("memory_ratio") else "-",
                f"{r['tflops']:.3g}" if r.get("tflops") else "-",
                _fraction(r),
                f"{r['floor_ratio']:.2f}x" if r.get("floor_ratio") else "-",
                f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "-",
                r.get("note", ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _fraction(r: dict) -> str:
    """The "of matmul" cell: a percentage, marked ``*`` when it is against the baseline's rate
    (measured in another worker, minutes away) rather than one measured beside the variant."""
    if not r.get("matmul_fraction"):
        return "-"
    return f"{100 * r['matmul_fraction']:.0f}%" + ("*" if r.get("matmul_rate_from_baseline") else "")


def format_report(title: str, env: dict, sizes: dict, table: str, rates: bool = True) -> str:
    """Markdown page of one run: where it ran, what its rate columns mean (with ``rates``), the
    sizes, the table."""
    versions = ", ".join(f"{name} {env[name]}" for name in ("python", "torch", "triton", "transformers"))
    lines = [f"# {title}", "", f"Device: {env['device']}; {versions}; run on {env['date']}."]
    if env.get("peak_matmul_tflops"):
        lines.append(f"Measured bfloat16 matmul rate (8192^3, random data): {env['peak_matmul_tflops']:.0f} TFLOP/s.")
    if rates:
        lines.append("TFLOP/s: useful FLOPs (the algorithm's, docs/benchmarks.md) per second; of matmul: that over the "
                     "rate of the case's own matrix products in the variant's dtype (float32 on CPU: the fastest of MKL, "
                     "oneDNN and MKL's packed product per shape), measured in the same run: in the baseline's worker and "
                     "in that of a variant of another dtype, and with --full in every variant's worker, right after each "
                     "timed run (with --repeats N, the median of the N runs' fractions); * marks a fraction of the "
                     "baseline's rate, measured in another worker.")
    lines += ["", "Sizes:", ""]
    lines += [f"* `{name}`: `{size}`" for name, size in sizes.items()]
    return "\n".join(lines + ["", table, ""])


def add_ratios(results: list[dict], baseline: str, floor: str | None) -> None:
    """Speed-up and memory ratio against ``baseline``, time over ``floor``'s, and the fraction
    of each record's measured matmul rate, for the records of one case and size: the median
    over its timed runs of each run's over the rate measured right after it, where its worker
    measured one (else the baseline's rate)."""
    measured = {r["variant"]: r for r in results if "time_s" in r}
    for r in measured.values():
        if baseline in measured:
            base = measured[baseline]
            r["speedup"] = base["time_s"] / r["time_s"]
            r["memory_ratio"] = base["peak_mib"] / r["peak_mib"] if r["peak_mib"] > 0 else None
        if floor in measured:
            r["floor_ratio"] = r["time_s"] / measured[floor]["time_s"]
        if r.get("useful_flops"):
            r["tflops"] = r["useful_flops"] / r["time_s"] / 1e12
            if r.get("matmul_tflops_runs"):  # each timed run over the rate measured right after it
                runs = zip(r["times_s"], r["matmul_tflops_runs"], strict=True)
                r["matmul_fraction"] = statistics.median(r["useful_flops"] / t / 1e12 / rate for t, rate in runs)
            elif r.get("matmul_tflops"):
                r["matmul_fraction"] = r["tflops"] / r["matmul_tflops"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_cases = [name for name, case in CASES.items() if getattr(case, "IN_DEFAULT_RUN", True)]
    parser.add_argument("--case", nargs="+", choices=list(CASES), default=default_cases,
                        help=f"cases to run (default: {' '.join(default_cases)})")
    parser.add_argument("--variant", nargs="+", help="run only these variants (the baseline always runs for ratios)")
    parser.add_argument("--size", nargs="+", metavar="LABEL", help="run only the sizes with these labels, as the tables print them (e.g. 'L=2048', 'B=1 L=128')")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_const", const="quick", dest="scale", help="tiny sizes: a smoke run in about two minutes")
    scale.add_argument("--full", action="store_const", const="full", dest="scale", help="the target sizes in full (the default cuts some down)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up and memory runs")
    parser.add_argument("--no-cpu-caching-allocator", dest="cpu_caching_allocator", action="store_false",
                        help="run the training step's CPU workers without the caching allocator that quietstar train turns on "
                        "(memory then counts no cache of freed blocks)")
    parser.add_argument(
        "--json", type=Path, help=f"where to write the results (default {DEFAULT_JSON.relative_to(HERE)} or, with --max-length, {MAX_LENGTH_JSON.relative_to(HERE)}); a .md table is written beside it"
    )
    parser.add_argument(
        "--max-length",
        action="store_true",
        help="instead of timing: the longest sequence length whose training step fits in --memory-gib, "
        "with the whole model (the --full size; --quick for a smoke run)",
    )
    parser.add_argument("--memory-gib", type=float, default=24.0, help="memory budget of --max-length")
    parser.add_argument("--start-length", type=int, default=64, help="first length --max-length tries")
    parser.add_argument("--length-limit", type=int, default=2048, help="longest length --max-length tries")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    device = torch.device(args.device)
    known = {v for name in args.case for v in CASES[name].variants(device)}
    if args.variant and not set(args.variant) <= known:
        parser.error(f"--variant: unknown {sorted(set(args.variant) - known)}; the cases have {sorted(known)}")
    if args.max_length:
        return report_max_length(args, device)
    peak = spawn_worker({"matmul": True, "device": args.device}).get("matmul_tflops") if device.type == "cuda" else None
    env = {**environment(device), "peak_matmul_tflops": peak}
    all_results, sizes = [], {}
    for name in args.case:
        case = CASES[name]
        sizes[name] = [size for size in case.sizes(device, args.scale or "default") if args.size is None or case.label(size) in args.size]
        floor = getattr(case, "floor", lambda device: None)(device)
        skip = getattr(case, "skip", lambda variant, size, device: None)
        print(f"{name}: {sizes[name]}", flush=True)
        for size in sizes[name]:
            results = []
            for variant in selected(case.variants(device), args.variant, (case.baseline(device), floor)):
                record = {"case": name, "label": case.label(size), "variant": variant, "size": size}
                reason = skip(variant, size, device)
                if reason:
                    record["skipped"] = reason
                else:
                    spec = {"case": name, "variant": variant, "size": size, "device": args.device, "repeats": args.repeats,
                            "matmul_rate": measures_matmul_rate(case, variant, device, args.scale or "default"),
                            "cpu_caching_allocator": args.cpu_caching_allocator}
                    record.update(spawn_worker(spec))
                    if "time_s" in record:
                        record["useful_flops"] = case.useful_flops(size, variant, device)
                    if hasattr(case, "tokens") and "time_s" in record:
                        record["tokens_per_s"] = case.tokens(size) / record["time_s"]
                results.append(record)
                print(f"  {record['label']} {variant}: {record.get('time_s', record.get('error', record.get('skipped')))}", flush=True)
            matmul = next((r.get("matmul_tflops") for r in results if r["variant"] == case.baseline(device)), None)
            for record in results:
                if "matmul_tflops" not in record and matmul is not None:  # the baseline's where the variant measured none
                    record["matmul_tflops"], record["matmul_rate_from_baseline"] = matmul, True
            add_ratios(results, case.baseline(device), floor)
            all_results.extend(results)
            # Written after every size, so a run cut short keeps what it measured.
            report = {"environment": env, "scale": args.scale or "default", "results": all_results}
            write_report(args.json or DEFAULT_JSON, report, format_report("bench/run.py", env, sizes, format_table(all_results)))

    print()
    print(format_table(all_results))
    failed = [r for r in all_results if "error" in r]
    return 1 if failed else 0


def report_max_length(args, device: torch.device) -> int:
    results, sizes = [], {}
    for name in args.case:
        case = CASES[name]
        if not hasattr(case, "LENGTH_KEY"):
            continue
        size = max_length_size(case, device, args.scale)
        sizes[name] = {**size, case.LENGTH_KEY: "varied"}
        for variant in selected(case.LENGTH_VARIANTS, args.variant):
            search = longest_length(
                name, variant, size, args.device, args.memory_gib, args.start_length, args.length_limit, args.cpu_caching_allocator
            )
            results.append({"case": name, **search})
    lines = ["| case | variant | longest L | first L that failed | peak at longest (GiB) |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        beyond = "not reached" if r["first_failing"] is None else f"fails at {r['first_failing']}"
        print(f"{r['case']} {r['variant']}: longest L fitting in {args.memory_gib} GiB = {r['longest']} ({beyond}; tried up to {r['limit']})")
        failed = r["first_failing"] or f"none up to {r['limit']}"
        peak = r["probes"][r["longest"]]["peak_gib"] if r["longest"] else None
        lines.append(f"| {r['case']} | {r['variant']} | {r['longest']} | {failed} | {peak:.2f} |" if peak else f"| {r['case']} | {r['variant']} | none | {failed} | - |")
    env = environment(device)
    report = {"environment": env, "memory_gib": args.memory_gib, "cpu_caching_allocator": args.cpu_caching_allocator, "max_length": results}
    title = f"bench/run.py --max-length (budget {args.memory_gib} GiB{'' if args.cpu_caching_allocator else ', no CPU caching allocator'})"
    write_report(args.json or MAX_LENGTH_JSON, report, format_report(title, env, sizes, "\n".join(lines), rates=False))
    return 0


def write_report(path: Path, report: dict, markdown: str) -> None:
    """Write ``report`` as JSON at ``path`` and ``markdown`` beside it (same name, ``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    path.with_suffix(".md").write_text(markdown)
    print(f"results written to {path} and {path.with_suffix('.md')}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
