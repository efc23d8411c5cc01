"""The benchmark's cases build and run at their quick sizes (so bench/run.py does not rot)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from cases import CASES  # noqa: E402
from helpers import requires_native  # noqa: E402

from quietstar.ops.backends import fast_half_matmul  # noqa: E402
from quietstar.ops.onednn_linear import mkl_packing_available, pack_weight, packed_linear  # noqa: E402
from measure import measure  # noqa: E402
from run import add_ratios, format_report, matmul_dtype, max_length_size, measures_matmul_rate, spawn_worker  # noqa: E402

CPU = torch.device("cpu")
# FlexAttention is compiled (tens of seconds on CPU); bench/run.py --quick covers it.
RUNS = [(name, variant) for name, case in CASES.items() for variant in case.variants(CPU) if variant != "flex"]


@pytest.mark.parametrize("name,variant", RUNS, ids=[f"{n}-{v}" for n, v in RUNS])
def test_case_runs_at_quick_size_and_reports_time_and_memory(name, variant):
    case = CASES[name]
    size = case.sizes(CPU, "quick")[0]
    reason = getattr(case, "skip", lambda variant, size, device: None)(variant, size, CPU)
    if reason:
        pytest.skip(reason)
    step, info = case.build(variant, size, CPU)
    record = measure(step, CPU, repeats=1)
    assert record["time_s"] > 0 and len(record["times_s"]) == 1
    assert record["peak_mib"] < 4096  # quick sizes need far less; a runaway case fails here
    assert isinstance(info, dict)


@requires_native
@pytest.mark.parametrize("allocator", [True, False], ids=["as-the-trainer-does", "no-cpu-caching-allocator"])
def test_training_step_workers_run_with_the_cpu_caching_allocator_unless_told_not_to(allocator):
    size = CASES["training_step"].sizes(CPU, "quick")[0]
    spec = {"case": "training_step", "variant": "quietstar", "size": size, "device": "cpu", "repeats": 1}
    record = spawn_worker(spec if allocator else {**spec, "cpu_caching_allocator": False})
    assert record.get("cpu_caching_allocator") is allocator, record
    assert ("no CPU caching allocator" in record.get("note", "")) is not allocator
    assert record["time_s"] > 0


def test_a_bfloat16_variant_is_held_against_the_bfloat16_matmul_rate():
    step = CASES["training_step"]
    dtype, _ = step.matmul_shapes(step.sizes(CPU, "quick")[0], CPU)
    assert dtype == torch.float32
    assert matmul_dtype(step, "quietstar+sampling-bf16", dtype) == torch.bfloat16
    assert matmul_dtype(step, "quietstar+sampling", dtype) == torch.float32
    measured = {v: measures_matmul_rate(step, v, CPU, "default") for v in step.variants(CPU)}
    assert measured == {"reference": True, "quietstar": False, "quietstar+sampling": False,
                        "quietstar-checkpointing": False, "quietstar+sampling-bf16": True}
    assert all(measures_matmul_rate(step, v, CPU, "full") for v in step.variants(CPU))


def test_on_a_gpu_the_float32_step_runs_beside_bfloat16_autocast_over_float32_weights():
    step, cuda = CASES["training_step"], torch.device("cuda")
    assert {"quietstar+sampling-fp32", "quietstar+sampling-bf16"} <= set(step.variants(cuda))
    assert "quietstar+sampling-fp32" not in step.variants(CPU)  # CPU models are float32 already
    assert matmul_dtype(step, "quietstar+sampling-fp32", torch.bfloat16) == torch.float32
    assert step.VARIANT_MODEL_DTYPE == {"quietstar+sampling-fp32": torch.float32, "quietstar+sampling-bf16": torch.float32}
    size = step.sizes(CPU, "quick")[0]
    assert all(p.dtype == torch.bfloat16 for p in step.make_model(size, CPU, dtype=torch.bfloat16).parameters())
    run, info = step.build("quietstar+sampling-fp32", size, CPU)
    run()
    assert info["note"] == "samples its own thoughts; float32 model"


def test_each_record_is_a_fraction_of_its_own_matmul_rate():
    records = [
        {"variant": "reference", "time_s": 4.0, "peak_mib": 8.0, "useful_flops": 4e12, "matmul_tflops": 2.0},
        {"variant": "fast", "time_s": 1.0, "peak_mib": 2.0, "useful_flops": 4e12, "matmul_tflops": 8.0},
    ]
    add_ratios(records, "reference", None)
    assert records[0]["matmul_fraction"] == pytest.approx(0.5) and records[1]["matmul_fraction"] == pytest.approx(0.5)
    assert records[1]["speedup"] == pytest.approx(4.0) and records[1]["memory_ratio"] == pytest.approx(4.0)


def test_a_record_with_a_rate_after_each_run_takes_the_median_of_the_runs_fractions():
    # The machine slowed down between the runs: each run is held against the rate next to it.
    record = {"variant": "fast", "time_s": 2.0, "times_s": [1.0, 2.0, 4.0], "peak_mib": 1.0, "useful_flops": 4e12,
              "matmul_tflops": 4.0, "matmul_tflops_runs": [8.0, 4.0, 2.0]}
    add_ratios([record], "fast", None)
    assert record["matmul_fraction"] == pytest.approx(0.5)
    assert record["tflops"] / record["matmul_tflops"] == pytest.approx(0.5)
    record.update(times_s=[1.0, 1.0, 1.0], time_s=1.0)  # same times: the fractions are 0.5, 1 and 2
    add_ratios([record], "fast", None)
    assert record["matmul_fraction"] == pytest.approx(1.0)


def test_measure_calls_after_run_once_after_each_timed_run_and_not_after_the_warm_up_or_memory_run():
    calls = []
    record = measure(lambda: calls.append("step"), CPU, repeats=3, after_run=lambda: calls.append("rate") or len(calls))
    assert calls == ["step", "step"] + ["step", "rate"] * 3
    assert record["after_runs"] == [4, 6, 8] and len(record["times_s"]) == 3
    assert "after_runs" not in measure(lambda: None, CPU, repeats=2)


def test_peak_memory_is_a_step_after_a_warm_up_without_what_the_first_step_keeps():
    kept = []

    def step():
        if not kept:
            kept.append(torch.ones(16 * 2**20))  # 64 MiB that only the first step sets up, and keeps
        torch.ones(4 * 2**20).sum()  # 16 MiB every step

    peak = measure(step, CPU, repeats=1)["peak_mib"]
    assert 12 <= peak < 40, peak


@requires_native
def test_peak_memory_counts_the_blocks_the_caching_allocator_gives_the_step():
    """Its cache is emptied before the memory run, so a step's 16 MiB counts although the
    warm-up left a block of that size cached."""
    from quietstar.ops.cpu_caching_allocator import cpu_caching_allocator

    with cpu_caching_allocator() as enabled:
        assert enabled
        peak = measure(lambda: torch.ones(4 * 2**20).sum(), CPU, repeats=1)["peak_mib"]
    assert 12 <= peak < 40, peak


def test_max_length_probes_the_whole_model_unless_a_scale_is_asked_for():
    step = CASES["training_step"]
    layers = {scale: max_length_size(step, CPU, scale)["layers"] for scale in (None, "full", "default", "quick")}
    assert layers == {None: 30, "full": 30, "default": 2, "quick": 2}


def test_a_report_without_rate_columns_does_not_explain_them():
    env = {"device": "CPU", "python": "3", "torch": "2", "triton": "3", "transformers": "5", "date": "today"}
    assert "TFLOP/s" in format_report("bench", env, {}, "| table |")
    assert "TFLOP/s" not in format_report("bench --max-length", env, {}, "| table |", rates=False)


def test_run_writes_json_and_markdown_with_ratios_against_the_reference(tmp_path):
    out = tmp_path / "results.json"
    run = Path(__file__).resolve().parents[1] / "bench" / "run.py"
    command = [sys.executable, str(run), "--quick", "--case", "linear_cross_entropy", "--device", "cpu", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    records = {r["variant"]: r for r in report["results"]}
    assert set(records) == {"reference", "torch", "torch-weighted"}
    assert records["reference"]["speedup"] == 1.0
    torch_record = records["torch"]
    assert torch_record["speedup"] == pytest.approx(records["reference"]["time_s"] / torch_record["time_s"])
    assert report["environment"]["torch"] == torch.__version__
    table = out.with_suffix(".md").read_text()
    assert f"torch {torch.__version__}" in table
    assert re.search(r"^\|\s*linear_cross_entropy\s*\|\s*V=2048\s*\|\s*torch\s*\|", table, re.MULTILINE)


@pytest.mark.parametrize("fast_bf16", [True, False, None], ids=["bf16-cpu", "no-bf16-cpu", "unknown-cpu"])
def test_bfloat16_training_step_runs_only_on_a_cpu_that_multiplies_it(fast_bf16, monkeypatch):
    from cases import training_step

    from quietstar.ops import backends

    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: fast_bf16)
    for scale in ("quick", "default", "full"):
        size = training_step.sizes(CPU, scale)[0]
        reason = training_step.skip("quietstar+sampling-bf16", size, CPU)
        assert (reason is None) == bool(fast_bf16), (scale, reason)
        assert reason is None or "no bfloat16 matrix instructions" in reason
        assert training_step.skip("quietstar+sampling", size, CPU) is None


@pytest.mark.parametrize("fast_bf16", [True, False, None], ids=["bf16-cpu", "no-bf16-cpu", "unknown-cpu"])
def test_full_tree_attention_sizes_add_bfloat16_only_on_a_cpu_that_multiplies_it(fast_bf16, monkeypatch):
    from cases import tree_attention

    from quietstar.ops import backends

    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: fast_bf16)
    sizes = tree_attention.sizes(CPU, "full")
    labels = [tree_attention.label(size) for size in sizes]
    half = ["L=256 bfloat16", "L=1024 bfloat16", "L=4096 bfloat16"] if fast_bf16 else []
    assert labels == ["L=256", "L=1024", "L=4096"] + half + ["L=1024 decode"]
    for size in sizes:
        q, *_ = tree_attention._inputs(dict(size, slot_len=4, n_slots=3), CPU)  # tiny, same dtype rule
        assert q.dtype == (torch.bfloat16 if "dtype" in size else torch.float32)
    by_label = dict(zip(labels, sizes))
    assert "dense" in tree_attention.skip("flex", by_label["L=4096"], CPU)
    assert tree_attention.skip("flex", by_label["L=1024"], CPU) is None
    if fast_bf16:
        assert "half precision" in tree_attention.skip("reference", by_label["L=256 bfloat16"], CPU)


@pytest.mark.parametrize("query_slots", [None, 2], ids=["whole-tree", "decode"])
def test_tree_attention_counts_the_pairs_the_tree_rule_makes_visible(query_slots):
    """The useful FLOPs rest on visible_pairs: the trunk's and the chain's (query, key) pairs
    per head, for the whole tree and for a decoding step's last query slots."""
    from cases import tree_attention

    from quietstar.ops.layout import tree_visibility

    size = dict(batch=1, n_slots=7, n_thoughts=2, q_heads=1, kv_heads=1, head_dim=4, slot_len=5)
    if query_slots:
        size["query_slots"] = query_slots
    n_q = query_slots or size["n_slots"]
    visible = tree_visibility(size["slot_len"], n_q, size["n_slots"], size["n_thoughts"])
    base, chain = tree_attention.visible_pairs(size)
    assert base + chain == int(visible.sum())
    assert base == int(visible[..., : size["slot_len"]].sum())


def test_tree_attention_counts_twelve_flops_per_visible_pair_forward_and_backward():
    """4 for the forward's two products, 8 for the backward's four (dV, dP, dQ, dK); recomputing
    the scores, as a flash backward does, is not the mathematics' work."""
    from cases import tree_attention

    size = dict(batch=2, n_slots=7, n_thoughts=2, q_heads=3, kv_heads=1, head_dim=4, slot_len=5)
    base, chain = tree_attention.visible_pairs(size)
    per_pair_and_dim = 2 * 3 * 4
    assert tree_attention.useful_flops(size, "native", CPU) == 12 * per_pair_and_dim * (base + chain)
    assert tree_attention.useful_flops(size, "sdpa-causal", CPU) == 12 * per_pair_and_dim * base
    assert tree_attention.useful_flops(size, "flex", CPU) == 4 * per_pair_and_dim * (base + chain)  # forward only on CPU


def test_linear_cross_entropy_rate_counts_the_three_products_it_counts_as_useful():
    from cases import linear_cross_entropy

    size = linear_cross_entropy.sizes(CPU, "quick")[0]
    _, shapes = linear_cross_entropy.matmul_shapes(size, CPU)
    assert sum(2 * b * m * k * n for b, m, k, n in shapes) == linear_cross_entropy.useful_flops(size, "torch", CPU)
    assert len({(m, k, n) for _, m, k, n in shapes}) == 3


@pytest.mark.parametrize("scale", ["quick", "default"])
def test_evaluation_counts_the_work_of_its_slots_not_the_whole_tree(scale):
    """The decoder over the text and the T + 2 chain steps up to the end token, the head over
    the T draws and both NLLs of the L - 1 scored positions: 2 P (text + (T + 2) step) +
    2 d V (T step + 2 B (L - 1)); not the 1 + C slots of the whole tree."""
    from cases import evaluation

    size = evaluation.sizes(CPU, scale)[0]
    cfg = evaluation.MODELS[size["model"]]
    text = size["batch"] * size["length"]
    step = text * size["n_thoughts"]
    t_len = size["thought_tokens"]
    by_hand = (2 * evaluation.decoder_params(size) * (text + (t_len + 2) * step)
               + 2 * cfg["hidden_size"] * cfg["vocab_size"] * (t_len * step + 2 * size["batch"] * (size["length"] - 1)))
    assert evaluation.useful_flops(size, "quietstar-eval", CPU) == pytest.approx(by_hand, rel=1e-12)


@pytest.mark.skipif(not mkl_packing_available(), reason="this torch has no MKL packed products")
def test_the_float32_cpu_floor_includes_mkls_packed_product(monkeypatch):
    import measure as measure_module

    calls = []
    monkeypatch.setattr(measure_module, "packed_linear", lambda x, packed: calls.append(x.shape) or packed_linear(x, packed))
    assert measure_module.matmul_tflops(CPU, torch.float32, [(1, 8, 16, 32)], repeats=1) > 0
    assert calls and set(calls) == {torch.Size([8, 16])}


def test_a_fraction_of_the_baselines_rate_is_marked():
    from run import _fraction

    assert _fraction({"matmul_fraction": 0.5}) == "50%"
    assert _fraction({"matmul_fraction": 0.5, "matmul_rate_from_baseline": True}) == "50%*"
    assert _fraction({}) == "-"


def test_tree_attention_decode_size_runs_forward_on_a_caches_filled_part():
    from cases import tree_attention

    size = dict(tree_attention.sizes(CPU, "full")[-1], slot_len=8)
    assert size["query_slots"] == 2 and tree_attention.label(size) == "L=8 decode"
    q, k, v = tree_attention._decode_inputs(size, CPU)
    assert q.shape[2] == 2 * 8 and k.shape[2] == size["n_slots"] * 8 and not k.is_contiguous()
    for variant in ("torch", "native", "sdpa-causal"):
        if tree_attention.skip(variant, size, CPU):
            continue
        step, _ = tree_attention.build(variant, size, CPU)
        record = measure(step, CPU, repeats=1)
        assert record["time_s"] > 0
    assert tree_attention.skip("reference", size, CPU) and tree_attention.skip("flex", size, CPU)


@pytest.mark.parametrize("n_thoughts", [1, 2])
def test_training_step_matmul_rate_counts_the_products_the_useful_flops_count(n_thoughts):
    """The rate weighs each product as often as the step runs it: the counted shapes' FLOPs are
    the useful FLOPs' products, forward and backward, ``3 x (2 P X + 2 d V R)``."""
    from cases import training_step

    size = dict(model="smollm2-135m", batch=2, length=8, thought_tokens=3, talk_tokens=2, n_thoughts=n_thoughts, layers=3)
    cfg = training_step.MODELS["smollm2-135m"]
    d, ffn, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"] * 64
    params = size["layers"] * (2 * d * d + 2 * d * kv + 3 * d * ffn)
    tokens = 2 * (1 + (3 + 1 + 2) * n_thoughts) * 8
    rows = 2 * 8 * (1 + n_thoughts * (2 + 3))
    _, shapes = training_step.matmul_shapes(size, CPU)
    assert sum(2 * b * m * k * n * count for b, m, k, n, count in shapes) == 3 * (2 * params * tokens + 2 * d * cfg["vocab_size"] * rows)
    _, forward = training_step.matmul_shapes(size, CPU, backward=False)
    assert sum(2 * b * m * k * n * count for b, m, k, n, count in forward) == 2 * params * tokens + 2 * d * cfg["vocab_size"] * rows
    # The forward's decoder products at the rows the step multiplies: the 3 sampling steps
    # through the cache, the first with the base pass (replayed by the tree pass), then the
    # tree's other slots.
    assert training_step.forward_rows(size) == [16 * (1 + n_thoughts)] + [16 * n_thoughts] * 2 + [2 * 3 * n_thoughts * 8]
    assert {m for _, m, _, _, _ in forward[:-1]} == set(training_step.forward_rows(size))


def test_narrowed_step_keeps_layers_heads_and_tokens_and_divides_every_width():
    from cases import training_step

    size = training_step.sizes(CPU, "full")[0]
    narrow = training_step.narrowed(size, 8)
    cfg, full = training_step.MODELS[narrow["model"]], training_step.MODELS[size["model"]]
    assert narrow["model"] == "smollm2-135m/8" and {**narrow, "model": size["model"]} == size
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]) == (72, 192, 6144)
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert cfg[key] == full[key]
    # The decoder's products shrink by the factor squared; the model builds with those widths.
    assert training_step.decoder_params(narrow) * 64 == training_step.decoder_params(size)
    model = training_step.make_model({**narrow, "layers": 1}, CPU).model.model
    assert (model.config.hidden_size, model.config.head_dim, model.embed_tokens.weight.shape[0]) == (72, 8, 6144)
    assert training_step.narrowed(size, 1) is size


@pytest.mark.parametrize(
    "factor, message",
    [(5, "factor must divide smollm2-135m's hidden_size=576, intermediate_size=1536, vocab_size=49152 "
         "and leave an even head size over its 9 heads, got 5"),
     (3, "leave an even head size over its 9 heads, got 3"),  # the widths divide; 192 / 9 heads does not
     (64, "leave an even head size over its 9 heads, got 64"),  # a head size of 1: RoPE needs pairs
     (0, "factor must be a positive int, got 0"),
     (2.0, "factor must be a positive int, got 2.0")],
)
def test_narrowed_refuses_a_factor_that_does_not_divide_the_widths(factor, message):
    from cases import training_step

    with pytest.raises(ValueError, match=re.escape(message)):
        training_step.narrowed(training_step.sizes(CPU, "quick")[0], factor)


@pytest.mark.parametrize("variant", ["base-generate", "quietstar-generate"])
def test_generation_counts_the_decoder_passes_and_head_rows_each_variant_runs(variant, monkeypatch):
    """The useful FLOPs rest on tokens_per_token and head_rows_per_token: count the tokens and
    calls of the first decoder layer (the prefill included) and the lm_head rows scored in a run
    at the quick size; the base model's products are what matmul_shapes counts."""
    from cases import generation

    import quietstar.model.generation
    import quietstar.model.sampling
    from quietstar.model.attention import decoder_layers

    size = generation.sizes(CPU, "quick")[0]
    step, _ = generation.build(variant, size, CPU)
    qs = next(cell.cell_contents for cell in step.__closure__ if hasattr(cell.cell_contents, "lm_head"))
    passes, head_rows = [], []
    decoder_layers(qs.model)[0].register_forward_hook(lambda module, args, out: passes.append(args[0].shape[1]))
    # The base model scores through its lm_head module; QuietStarModel through head_logits.
    qs.model.lm_head.register_forward_hook(lambda module, args, out: head_rows.append(out.numel() // out.shape[-1]))

    def counted(head_logits):
        def run(hidden, *args, **kwargs):
            head_rows.append(hidden.numel() // hidden.shape[-1])
            return head_logits(hidden, *args, **kwargs)

        return run

    for module in (quietstar.model.sampling, quietstar.model.generation):
        monkeypatch.setattr(module, "head_logits", counted(module.head_logits))
    step()
    new = size["new_tokens"]
    assert len(passes) == generation.decoder_passes(size, variant)
    assert sum(passes) == size["prompt"] + generation.tokens_per_token(size, variant) * new - 1
    assert sum(head_rows) == generation.head_rows_per_token(size, variant) * new * size["batch"]
    if variant == "base-generate":
        _, shapes = generation.matmul_shapes(size, CPU)
        cfg = generation.MODELS[size["model"]]
        counted_flops = sum(2 * b * m * k * n * count for b, m, k, n, count in shapes)
        decoder = 2 * generation.decoder_params(size) * size["batch"] * (size["prompt"] + new - 1)
        assert counted_flops == decoder + 2 * cfg["hidden_size"] * cfg["vocab_size"] * new * size["batch"]


def test_evaluation_matmul_shapes_are_the_passes_next_token_nll_runs():
    from cases import evaluation

    from quietstar.model.attention import decoder_layers

    size = evaluation.sizes(CPU, "quick")[0]
    step, _ = evaluation.build("quietstar-eval", size, CPU)
    qs = next(cell.cell_contents for cell in step.__closure__ if hasattr(cell.cell_contents, "next_token_states"))
    rows = []
    decoder_layers(qs.model)[0].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0] * args[0].shape[1]))
    step()
    _, shapes = evaluation.matmul_shapes(size, CPU)
    per_pass = len(evaluation.decoder_products(size))
    assert [m for _, m, _, _, _ in shapes[:-2:per_pass]] == rows


@pytest.mark.parametrize(
    "name,call,shape",
    [
        ("aten::mm", lambda a, b: torch.mm(a, b), (1, 3, 4, 5)),
        ("aten::addmm", lambda a, b: torch.addmm(torch.zeros(5, dtype=a.dtype), a, b), (1, 3, 4, 5)),
        ("aten::addmm_", lambda a, b: torch.zeros(3, 5, dtype=a.dtype).addmm_(a, b), (1, 3, 4, 5)),
        ("aten::bmm", lambda a, b: torch.bmm(a.expand(2, 3, 4), b.expand(2, 4, 5)), (2, 3, 4, 5)),
        ("mkldnn::_linear_pointwise", lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b.t().contiguous(), None, "none", [], ""), (1, 3, 4, 5)),
        ("mkldnn::_linear_pointwise", lambda a, b: torch.ops.mkldnn._linear_pointwise(a.expand(2, 3, 4), b.t().contiguous(), None, "none", [], ""), (1, 6, 4, 5)),
        ("quietstar::mkl_packed_linear_", lambda a, b: mkl_packed_linear(a.expand(2, 3, 4), b.t().contiguous()), (1, 6, 4, 5)),
    ],
    ids=["mm", "addmm", "addmm_", "bmm", "onednn-linear", "onednn-linear-3d", "mkl-packed-linear"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_profile_step_reads_each_products_shape_and_dtype_from_the_profiler(name, call, shape, dtype):
    import profile_step

    if name.startswith("mkldnn") and not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        pytest.skip("this torch has no oneDNN linear op")
    if name.startswith("quietstar::mkl") and (dtype != torch.float32 or not mkl_packing_available()):
        pytest.skip("MKL's packed linear multiplies float32, in a torch that has it")
    if name.startswith("mkldnn") and dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU's oneDNN has no bfloat16 linear")
    a, b = torch.randn(3, 4, dtype=dtype), torch.randn(4, 5, dtype=dtype)
    with torch.profiler.profile(record_shapes=True) as prof:
        call(a, b)
    events = [e for e in prof.events() if e.name == name]
    dtypes = profile_step.input_dtypes(prof)
    assert events and profile_step.product_call(name, events[0].input_shapes, dtypes[events[0].id]) == (shape, dtype)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bfloat16-autocast"])
def test_profile_step_times_the_step_s_parts_and_accounts_for_its_wall_time(bf16, capsys, monkeypatch):
    import profile_step

    monkeypatch.setattr(profile_step, "PRODUCT_ROWS", 1000)  # every product shape listed
    argv = ["--device", "cpu", "--scale", "quick", "--steps", "1", "--top", "3"] + (["--bf16"] if bf16 else [])
    assert profile_step.main(argv) == 0
    out = capsys.readouterr().out
    for part in ("sample_thoughts", "step, thoughts given", "step, own sampling"):
        assert re.search(rf"{part} +\d+\.\d ms", out), part
    assert "Self CPU time total" in out and re.search(r"profiled step: wall \d+\.\d ms", out)
    # The products against their rates, then the rest by kind. Operators' own times count
    # nothing twice: with the products and the kinds taken from the wall time, some is left
    # outside them (Python, dispatch).
    products = re.search(r"matrix products +(\d+\.\d) ms; at each shape's rate (\d+\.\d) ms", out)
    assert products and float(products.group(1)) > 0 and float(products.group(2)) > 0
    # Under bfloat16 autocast the step multiplies in bfloat16 where the CPU does it natively.
    dtype = "bfloat16" if bf16 and fast_half_matmul(torch.bfloat16, CPU) else "float32"
    assert re.search(rf"1 x \[\d+ x 576\] x \[576 x \d+\] +{dtype} +\d+ calls", out)
    kinds = "tree attention kernels|quietstar's other kernels|copies, casts, weight packing|other operators"
    parts = [float(x) for x in re.findall(rf"^  (?:{kinds}) +(\d+\.\d) ms", out, re.M)]
    outside = float(re.search(r"^  outside operators +(-?\d+\.\d) ms", out, re.M).group(1))
    assert len(parts) >= 3 and outside > 0
    with pytest.raises(SystemExit):
        profile_step.main(["--device", "cpu", "--scale", "quick", "--size", "B=3 L=7"])
    assert "--size: expected one of ['B=1 L=16']" in capsys.readouterr().err


def test_profile_step_narrowed_runs_the_same_parts_on_the_narrowed_model(capsys, monkeypatch):
    import profile_step

    monkeypatch.setattr(profile_step, "PRODUCT_ROWS", 1000)  # every product shape listed
    assert profile_step.main(["--device", "cpu", "--scale", "quick", "--steps", "1", "--top", "3", "--narrow", "8"]) == 0
    out = capsys.readouterr().out
    assert "B=1 L=16 on cpu (CPU, widths divided by 8)" in out
    assert re.search(r"step, own sampling +\d+\.\d ms", out)
    assert re.search(r"1 x \[\d+ x 72\] x \[72 x \d+\] +float32 +\d+ calls", out)  # the narrowed products
    assert not re.search(r"^    1 x .*576", out, re.M)  # and none of the full width
    with pytest.raises(SystemExit):
        profile_step.main(["--device", "cpu", "--scale", "quick", "--narrow", "7"])
    assert "--narrow: factor must divide" in capsys.readouterr().err


def mkl_packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., k] weight [n, k]^T`` through MKL's packed linear (``pack_weight``)."""
    return packed_linear(x, pack_weight(weight, torch.float32, x.numel() // x.shape[-1]))


def test_profile_step_refuses_a_dtype_it_does_not_know():
    import profile_step

    with pytest.raises(ValueError, match="'c10::Float8_e4m3fn' is not one of"):
        profile_step.product_call("aten::mm", [[3, 4], [4, 5]], ["c10::Float8_e4m3fn", "c10::Float8_e4m3fn"])