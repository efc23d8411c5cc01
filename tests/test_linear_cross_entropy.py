"""linear_cross_entropy: every backend against the dense reference (loss and every gradient),
and the reference against a plain float64 formula of SPEC sections 2 and 3."""

from __future__ import annotations

import gc
import threading
import weakref
import pytest
import torch
from helpers import DEVICE, relative_error, requires_triton

import quietstar.ops.linear_cross_entropy_torch as torch_backend
from quietstar import linear_cross_entropy, weighted_linear_cross_entropy
from quietstar.ops import backends
from quietstar.ops.backends import BACKEND_ENV_VAR
from quietstar.ops.linear_cross_entropy import weighted_form_reads_scores
from quietstar.ops.native import native_available

IGNORE = -100
TOLERANCE = {
    "torch": {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2},
    "triton": {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2},
}
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
GRAD_NAMES = ("hidden", "lm_weight", "lm_bias", "base_hidden", "w")


def make_inputs(rows, width, vocab, dtype, *, mix=True, bias=False, masked=False, ignored=False, seed=0):
    """Keyword arguments for ``linear_cross_entropy``; every float input requires grad."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()

    masked_ids = [0, vocab // 2, vocab - 1] if masked else []
    allowed = torch.tensor([i for i in range(vocab) if i not in masked_ids])
    targets = allowed[torch.randint(0, len(allowed), (rows,), generator=gen)]
    if ignored:
        targets[1::3] = IGNORE
    kwargs = {
        "hidden": randn(rows, width),
        "lm_weight": randn(vocab, width, scale=2 * width**-0.5),
        "targets": targets.to(DEVICE),
        "lm_bias": randn(vocab) if bias else None,
        "masked_vocab": masked_ids or None,
    }
    if mix:
        # Raw mixing weights are unconstrained (no sigmoid): include some outside [0, 1].
        w = (torch.rand(rows, generator=gen) * 1.5 - 0.25).to(DEVICE).requires_grad_()
        kwargs["mix"] = (randn(rows, width), w)
    return kwargs


def differentiable(kwargs):
    """``{name: tensor}`` of the inputs a gradient is taken for."""
    tensors = {"hidden": kwargs["hidden"], "lm_weight": kwargs["lm_weight"], "lm_bias": kwargs["lm_bias"]}
    if kwargs.get("mix") is not None:
        tensors["base_hidden"], tensors["w"] = kwargs["mix"]
    return {name: t for name, t in tensors.items() if t is not None}


def as_float32_leaves(kwargs):
    """The same inputs as fresh float32 leaves (the ground truth for half-precision inputs)."""
    def leaf(t):
        return None if t is None else t.detach().float().requires_grad_()

    out = {**kwargs, "hidden": leaf(kwargs["hidden"]), "lm_weight": leaf(kwargs["lm_weight"])}
    out["lm_bias"] = leaf(kwargs["lm_bias"])
    if kwargs.get("mix") is not None:
        out["mix"] = tuple(leaf(t) for t in kwargs["mix"])
    return out


def loss_and_grads(kwargs, backend, grad_nll, **options):
    nll = linear_cross_entropy(backend=backend, **kwargs, **options)
    inputs = differentiable(kwargs)
    grads = torch.autograd.grad(nll, list(inputs.values()), grad_nll)
    return nll, dict(zip(inputs, grads))


def assert_matches_reference(backend, kwargs, **options):
    tol = TOLERANCE[backend][kwargs["hidden"].dtype]
    reference_inputs = as_float32_leaves(kwargs)
    rows = kwargs["hidden"].shape[0]
    # Non-uniform upstream weights (as REINFORCE gives), negative ones included.
    grad_nll = torch.randn(rows, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref, ref_grads = loss_and_grads(reference_inputs, "reference", grad_nll, **options)
    nll, grads = loss_and_grads(kwargs, backend, grad_nll, **options)
    assert nll.shape == (rows,) and nll.dtype == torch.float32
    assert relative_error(nll, ref) <= tol, ("nll", relative_error(nll, ref))
    for name, tensor in differentiable(kwargs).items():
        grad = grads[name]
        assert grad.dtype == tensor.dtype, f"d{name} comes back as {grad.dtype}, input is {tensor.dtype}"
        assert torch.isfinite(grad).all(), f"d{name} has non-finite values"
        assert relative_error(grad, ref_grads[name]) <= tol, (f"d{name}", relative_error(grad, ref_grads[name]))


def assert_weighted_form_matches_reference(backend, kwargs, weights, temperature, scores=None, scale=2.5):
    """``weighted_linear_cross_entropy``'s loss, NLLs and every gradient (with a backward scale,
    2.5 unless given) against the reference's weighted sum in float32 (given ``scores``, if any)."""
    reference = as_float32_leaves(kwargs)
    ref_nll = linear_cross_entropy(backend="reference", temperature=temperature, **reference)
    ref_grads = torch.autograd.grad(scale * (weights * ref_nll).sum(), list(differentiable(reference).values()))
    loss, nll = weighted_linear_cross_entropy(
        row_weights=weights, backend=backend, temperature=temperature, scores=scores, **kwargs
    )
    assert not nll.requires_grad and loss.dim() == 0
    tol = TOLERANCE.get(backend, TOLERANCE["torch"])[kwargs["hidden"].dtype]
    assert relative_error(nll, ref_nll) <= tol
    assert relative_error(loss, (weights * ref_nll).sum()) <= tol
    grads = torch.autograd.grad(loss if scale == 1 else scale * loss, list(differentiable(kwargs).values()))
    for name, grad, ref_grad in zip(differentiable(kwargs), grads, ref_grads):
        assert relative_error(grad, ref_grad) <= tol, (name, relative_error(grad, ref_grad))


# (rows, width, vocab, mix, bias, temperature, masked, ignored); no size is a multiple of a
# Triton block size, and vocab 101 spans a partial last vocabulary tile.
CASES = {
    "plain": (9, 16, 50, False, False, 1.0, False, False),
    "mix": (13, 24, 70, True, False, 1.0, False, False),
    "mix-masked-ignored": (13, 24, 70, True, False, 1.0, True, True),
    "mix-bias-T3-masked-ignored": (21, 40, 101, True, True, 3.0, True, True),
    "bias-T3-ignored": (10, 16, 64, False, True, 3.0, False, True),
    "N1-mix-bias-T3-masked": (1, 16, 37, True, True, 3.0, True, False),
    "N50-d72-V150-mix-bias-masked-ignored": (50, 72, 150, True, True, 1.0, True, True),
}


def case_inputs(case, dtype, seed=0):
    rows, width, vocab, mix, bias, temperature, masked, ignored = CASES[case]
    kwargs = make_inputs(rows, width, vocab, dtype, mix=mix, bias=bias, masked=masked, ignored=ignored, seed=seed)
    return kwargs, temperature


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_float32(backend, case, poisoned_allocations):
    kwargs, temperature = case_inputs(case, torch.float32)
    assert_matches_reference(backend, kwargs, temperature=temperature)


HALF_CASES = ["mix-bias-T3-masked-ignored", "bias-T3-ignored"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_matches_float32_reference_in_half_precision(backend, dtype, case, poisoned_allocations):
    kwargs, temperature = case_inputs(case, dtype)
    assert_matches_reference(backend, kwargs, temperature=temperature)


@pytest.mark.parametrize("fast_bf16", [True, False, None], ids=["bf16-products", "float32-products", "unknown-cpu"])
def test_torch_backend_multiplies_in_bfloat16_only_where_the_cpu_does_it_fast(fast_bf16, monkeypatch, poisoned_allocations):
    """On a CPU with bfloat16 matrix instructions the products run in bfloat16 (softmax and
    sums in float32); without them in float32 (a bfloat16 GEMM would be ~100x slower). Both
    match the float32 reference at bfloat16 tolerance, loss and every gradient. A CPU whose
    features cannot be read gets float32 products."""
    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: fast_bf16)
    kwargs, temperature = case_inputs("mix-bias-T3-masked-ignored", torch.bfloat16)
    scorer = torch_backend._Scores(kwargs["hidden"], kwargs["lm_weight"], kwargs["lm_bias"], *kwargs["mix"], temperature, None)
    assert scorer.product_dtype == (torch.bfloat16 if fast_bf16 or DEVICE.type == "cuda" else torch.float32)
    assert_matches_reference("torch", kwargs, temperature=temperature)
    weights = torch.rand(kwargs["hidden"].shape[0], generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert_weighted_form_matches_reference("torch", kwargs, weights, temperature)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="oneDNN's product serves CPU chunks")
@pytest.mark.parametrize(("widest", "scored"), [(0, []), (16, []), (21, [16, 5])], ids=["none", "wider-call", "every-chunk"])
def test_torch_backend_scores_the_chunks_of_a_narrow_float32_call_through_onednn(
    widest, scored, monkeypatch, poisoned_allocations
):
    """Every chunk of a float32 CPU call of at most ``ONEDNN_SCORES_MAX_ROWS`` rows is scored by
    oneDNN's product (a fresh tensor of a chunk's size), a wider call's chunks into the scratch,
    the same on a second call that gets the first one's scratch (``reusing_scratch``). Either
    way the reference's NLLs and gradients, unweighted and weighted. 21 rows in chunks of 16 and 5."""
    monkeypatch.setattr(torch_backend, "ONEDNN_SCORES_MAX_ROWS", widest)
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 16 * 101 * 4)
    calls = []
    product = torch_backend.onednn_linear
    monkeypatch.setattr(torch_backend, "onednn_linear", lambda *args: calls.append(args[1].shape[0]) or product(*args))
    kwargs, temperature = case_inputs("mix-bias-T3-masked-ignored", torch.float32)
    assert_matches_reference("torch", kwargs, temperature=temperature)
    weights = torch.rand(kwargs["hidden"].shape[0], generator=torch.Generator().manual_seed(2))
    with torch_backend.reusing_scratch():
        assert_weighted_form_matches_reference("torch", kwargs, weights, temperature)
        assert_weighted_form_matches_reference("torch", kwargs, weights, temperature)
    assert calls == scored * 4  # forward, backward, two weighted forwards


@pytest.mark.skipif(DEVICE.type != "cpu" or not native_available(), reason="the native CPU softmax keeps bfloat16 scores")
def test_torch_weighted_form_keeps_bfloat16_scores_as_the_product_gives_them(monkeypatch, poisoned_allocations):
    """With bfloat16 products and no bias, the scores stay as the product rounds them (masked ids
    -inf) and chunks take twice the rows: per-row NLLs equal those from a float32 copy of the
    scores bit for bit, the gradients agree at bfloat16 precision, and both match the float32
    reference."""
    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: True)
    kwargs = make_inputs(150, 8, 29, torch.bfloat16, masked=True, ignored=True)
    for name in ("lm_weight",):  # float32 master weights, as under autocast
        kwargs[name] = kwargs[name].detach().float().requires_grad_()
    weights = torch.rand(150, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 64 * 29 * 4)  # 64 float32 rows, 128 bfloat16
    rows = []
    product_scores = torch_backend._Scores.product_scores
    monkeypatch.setattr(torch_backend._Scores, "product_scores", lambda self, h: rows.append(len(h)) or product_scores(self, h))

    def run():
        loss, nll = weighted_linear_cross_entropy(row_weights=weights, backend="torch", temperature=2.0, **kwargs)
        return nll, torch.autograd.grad(loss, list(differentiable(kwargs).values()))

    nll, grads = run()
    assert rows == [128, 22]
    assert_weighted_form_matches_reference("torch", kwargs, weights, 2.0)
    monkeypatch.setattr(torch_backend._Scores, "keeps_product_scores", lambda self: False)
    rows.clear()
    float32_nll, float32_grads = run()
    assert rows == []  # the float32 copies' path scores through its buffer
    torch.testing.assert_close(nll, float32_nll, rtol=0, atol=0)
    for grad, expected in zip(grads, float32_grads):
        assert relative_error(grad, expected) <= 1e-2


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the scratch passes between calls on CPU only")
@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16-products", "float32-products"])
def test_torch_backend_passes_cpu_scratch_between_calls_only_inside_reusing_scratch(fast_bf16, monkeypatch):
    """Inside ``reusing_scratch`` the CPU scratch passes from call to call of the same weight,
    and a weight changed in place, even through ``.data`` (which its version counter does not
    see), gives the new weight's result on the next call. When the block ends the scratch is
    freed, and outside a block a call keeps none."""
    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: fast_bf16)
    monkeypatch.setattr(torch_backend, "ONEDNN_SCORES_MAX_ROWS", 0)  # every chunk into the scratch
    kwargs, temperature = case_inputs("mix-bias-T3-masked-ignored", torch.bfloat16)
    for name in ("lm_weight", "lm_bias"):  # float32 master weights, as under autocast
        kwargs[name] = kwargs[name].detach().float().requires_grad_()
    weight = kwargs["lm_weight"]
    with torch_backend.reusing_scratch():
        assert_matches_reference("torch", kwargs, temperature=temperature)
        scratch = torch_backend._open_workspaces()[weight]
        assert {"scores"} <= set(scratch) and ("weight" in scratch) == fast_bf16
        address = scratch["scores"].data_ptr()
        weight.data.mul_(-0.5)
        assert_matches_reference("torch", kwargs, temperature=temperature)
        assert torch_backend._open_workspaces()[weight] is scratch and scratch["scores"].data_ptr() == address
        scores = weakref.ref(scratch["scores"])
        del scratch
    gc.collect()
    assert scores() is None and torch_backend._open_workspaces() is None
    left = []  # each call's scores scratch, weakly, as it hands it back
    exit_ = torch_backend._Scores.__exit__

    def spy(self, *exc):
        left.append(weakref.ref(self._scratch["scores"]))
        exit_(self, *exc)

    monkeypatch.setattr(torch_backend._Scores, "__exit__", spy)
    assert_matches_reference("torch", kwargs, temperature=temperature)
    gc.collect()
    assert left and all(ref() is None for ref in left)


def test_reusing_scratch_frees_only_when_the_outermost_block_ends_even_on_an_error():
    with torch_backend.reusing_scratch():
        outer = torch_backend._open_workspaces()
        with torch_backend.reusing_scratch():
            assert torch_backend._open_workspaces() is outer
        assert torch_backend._open_workspaces() is outer  # an inner block's end keeps it
        with pytest.raises(RuntimeError), torch_backend.reusing_scratch():
            raise RuntimeError("a failed call")
        assert torch_backend._open_workspaces() is outer
    assert torch_backend._open_workspaces() is None
    with pytest.raises(RuntimeError), torch_backend.reusing_scratch():
        raise RuntimeError("a failed call")
    assert torch_backend._open_workspaces() is None


def test_reusing_scratch_is_per_thread():
    seen = []
    with torch_backend.reusing_scratch():
        thread = threading.Thread(target=lambda: seen.append(torch_backend._open_workspaces()))
        thread.start()
        thread.join()
    assert seen == [None]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_float32_master_weights_next_to_half_hidden_states(backend, dtype, poisoned_allocations):
    """As under autocast: half-precision hidden states with the float32 lm_head and bias. The
    result matches the float32 reference at the half dtype's tolerance, and the weight's and
    bias's gradients come back in float32."""
    kwargs, temperature = case_inputs("mix-bias-T3-masked-ignored", dtype)
    for name in ("lm_weight", "lm_bias"):
        kwargs[name] = kwargs[name].detach().float().requires_grad_()
    assert_matches_reference(backend, kwargs, temperature=temperature)


def test_lm_weight_of_another_dtype_is_rejected():
    kwargs, _ = case_inputs("plain", torch.float32)
    kwargs["lm_weight"] = kwargs["lm_weight"].detach().double()
    with pytest.raises(ValueError, match="lm_weight"):
        linear_cross_entropy(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_fully_masked_vocabulary_tile_is_harmless(backend, poisoned_allocations):
    """The first 70 ids (a whole vocabulary tile for every block size used) are masked."""
    kwargs = make_inputs(20, 16, 101, torch.float32, bias=True)
    kwargs["masked_vocab"] = list(range(70))
    kwargs["targets"] = kwargs["targets"] % 31 + 70
    assert_matches_reference(backend, kwargs, temperature=3.0)


@pytest.mark.parametrize("chunk_rows", [1, 4, 100], ids=["1-row", "4-rows", "rounded-to-64"])
def test_torch_backend_is_exact_across_chunk_boundaries(chunk_rows, monkeypatch, poisoned_allocations):
    """Several chunks and a partial last one (100 rows of budget round down to 64)."""
    kwargs = make_inputs(150, 8, 29, torch.float32, bias=True, masked=True, ignored=True)
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", chunk_rows * 29 * 4)
    assert_matches_reference("torch", kwargs, temperature=3.0)


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("tile", [32, 128], ids=["tile-as-wide-as-a-chunk", "tile-wider-than-a-chunk"])
def test_triton_backend_is_exact_across_vocabulary_chunks(dtype, tile, monkeypatch, poisoned_allocations):
    """Chunks of 32 ids, a partial last one, and two leading chunks that are wholly masked;
    a tile wider than a chunk spans ids of later chunks, which must not count as targets."""
    import quietstar.kernels.linear_cross_entropy as kernels

    kwargs = make_inputs(20, 16, 101, dtype, bias=True, ignored=True)
    kwargs["masked_vocab"] = list(range(64))
    targets = kwargs["targets"]
    kwargs["targets"] = torch.where(targets == IGNORE, targets, targets % 37 + 64)
    monkeypatch.setattr(kernels, "CHUNK_ALIGN", 32)
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 20 * 32 * 4)
    for config in (kernels.GPU_CONFIG, kernels.INTERPRETER_CONFIG):
        monkeypatch.setitem(config, "BLOCK_V", tile)
    assert kernels.chunk_width(20, 101) == 32
    assert_matches_reference("triton", kwargs, temperature=3.0)


@pytest.mark.parametrize("backend", ["reference", "torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("case", ["mix-bias-T3-masked-ignored", "N50-d72-V150-mix-bias-masked-ignored", "plain"])
def test_weighted_form_equals_the_weighted_sum_of_the_reference(backend, case, poisoned_allocations):
    """``weighted_linear_cross_entropy`` (gradients formed in the forward for torch): its loss,
    NLLs and every gradient, with a backward scale that is not 1."""
    kwargs, temperature = case_inputs(case, torch.float32, seed=4)
    weights = torch.randn(kwargs["hidden"].shape[0], generator=torch.Generator().manual_seed(5)).to(DEVICE)
    assert_weighted_form_matches_reference(backend, kwargs, weights, temperature)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_weighted_form_at_a_backward_scale_of_one(backend):
    """A loss used as it is (the CPU skips multiplying by 1): the same gradients; and a scale
    that itself needs a gradient keeps the gradients linked to it (double backward)."""
    kwargs, temperature = case_inputs("mix-bias-T3-masked-ignored", torch.float32, seed=4)
    weights = torch.randn(kwargs["hidden"].shape[0], generator=torch.Generator().manual_seed(5)).to(DEVICE)
    assert_weighted_form_matches_reference(backend, kwargs, weights, temperature, scale=1)
    loss, _ = weighted_linear_cross_entropy(row_weights=weights, backend=backend, temperature=temperature, **kwargs)
    one = torch.ones((), device=DEVICE, requires_grad=True)
    (grad_h,) = torch.autograd.grad(loss, [kwargs["hidden"]], grad_outputs=one, create_graph=True)
    assert grad_h.requires_grad
    (d_one,) = torch.autograd.grad((grad_h * kwargs["hidden"].detach()).sum(), [one])
    torch.testing.assert_close(d_one, (grad_h.detach() * kwargs["hidden"].detach()).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_order_through_the_fused_backends_raises_instead_of_dropping_terms(backend):
    """The fused backwards run kernels with no derivatives, and the weighted forms' gradients
    are formed constants: differentiating a gradient again (``create_graph``) raises rather
    than silently leaving the second-order terms out. The reference backend computes them."""
    kwargs = make_inputs(12, 8, 30, torch.float32)
    (grad_h,) = torch.autograd.grad(linear_cross_entropy(backend=backend, **kwargs).sum(), [kwargs["hidden"]], create_graph=True)
    with pytest.raises(RuntimeError, match="linear_cross_entropy gives first derivatives only"):
        grad_h.square().sum().backward()
    weights = torch.rand(12, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss, _ = weighted_linear_cross_entropy(row_weights=weights, backend=backend, **kwargs)
    (grad_h,) = torch.autograd.grad(loss, [kwargs["hidden"]], create_graph=True)
    with pytest.raises(RuntimeError, match="weighted_linear_cross_entropy gives first derivatives only"):
        grad_h.square().sum().backward()
    loss, _ = weighted_linear_cross_entropy(row_weights=weights, backend="reference", **kwargs)
    (grad_h,) = torch.autograd.grad(loss, [kwargs["hidden"]], create_graph=True)
    (second,) = torch.autograd.grad(grad_h.square().sum(), [kwargs["hidden"]])
    assert torch.isfinite(second).all() and second.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_form_computes_its_gradients_in_the_forward(backend):
    """The backward only scales: no matrix product runs in it."""
    kwargs = make_inputs(40, 8, 60, torch.float32, bias=True, masked=True)
    weights = torch.rand(40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    loss, _ = weighted_linear_cross_entropy(row_weights=weights, backend=backend, **kwargs)
    with torch.profiler.profile() as profile:
        loss.backward()
    assert not {"aten::mm", "aten::addmm", "aten::matmul"} & {e.key for e in profile.key_averages()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_form_refuses_a_second_backward_through_the_same_graph(backend):
    kwargs = make_inputs(6, 8, 20, torch.float32)
    loss, _ = weighted_linear_cross_entropy(row_weights=torch.ones(6, device=DEVICE), backend=backend, **kwargs)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="its backward runs once"):
        loss.backward()


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"])
def test_weighted_triton_form_is_exact_across_row_chunks(dtype, monkeypatch, poisoned_allocations):
    """Row chunks of 8 over 21 rows (a partial last one), in every dtype the kernels take, with
    mixing, bias, masked and ignored rows, and weights of mixed signs and sizes."""
    import quietstar.kernels.linear_cross_entropy as kernels

    kwargs, temperature = case_inputs("mix-bias-T3-masked-ignored", dtype, seed=6)
    rows, vocab = kwargs["hidden"].shape[0], kwargs["lm_weight"].shape[0]
    monkeypatch.setattr(kernels, "WEIGHTED_CHUNK_BYTES", 8 * vocab * 4)
    assert rows > 16
    weights = torch.randn(rows, generator=torch.Generator().manual_seed(7)).to(DEVICE) * 1e-3
    assert_weighted_form_matches_reference("triton", kwargs, weights, temperature)


def given_scores(kwargs, temperature):
    """The scores ``weighted_linear_cross_entropy`` would compute: ``[V, N]`` float32."""
    with torch.no_grad():
        h, weight, bias = kwargs["hidden"].float(), kwargs["lm_weight"].float(), kwargs.get("lm_bias")
        z = h @ weight.T + (0 if bias is None else bias.float())
        z = (z / temperature).T.contiguous()
        if kwargs.get("masked_vocab") is not None:
            z[torch.as_tensor(kwargs["masked_vocab"], device=z.device)] = float("-inf")
    return z


@pytest.mark.parametrize("rows", [21, 700], ids=["one-chunk", "several-chunks"])
def test_weighted_form_from_given_scores_equals_the_reference(rows, monkeypatch):
    """Given the scores (the sampling pass's logits), the torch form skips its first product
    and still gives the reference's loss, NLLs and gradients, across row chunks of 128."""
    backend = "torch"
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 128 * 101 * 4)
    kwargs = make_inputs(rows, 40, 101, torch.float32, mix=False, bias=True, masked=True, ignored=True, seed=8)
    weights = torch.randn(rows, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    scores = given_scores(kwargs, 3.0)
    reference = as_float32_leaves(kwargs)
    ref_nll = linear_cross_entropy(backend="reference", temperature=3.0, **reference)
    ref_grads = torch.autograd.grad(2.5 * (weights * ref_nll).sum(), list(differentiable(reference).values()))
    with torch.profiler.profile() as profile:
        loss, nll = weighted_linear_cross_entropy(
            row_weights=weights, backend=backend, temperature=3.0, scores=scores, **kwargs
        )
    products = [e for e in profile.events() if e.name in ("aten::mm", "aten::addmm", "aten::addmm_")]
    assert len(products) == 2 * -(-rows // 128)  # dh and dW per chunk: no scores product
    assert relative_error(nll, ref_nll) <= 1e-5
    assert relative_error(loss, (weights * ref_nll).sum()) <= 1e-5
    grads = torch.autograd.grad(2.5 * loss, list(differentiable(kwargs).values()))
    for name, grad, ref_grad in zip(differentiable(kwargs), grads, ref_grads):
        assert relative_error(grad, ref_grad) <= 1e-5, name


@pytest.mark.parametrize("fast_bf16", [True, False], ids=["bf16-products", "float32-products"])
def test_weighted_form_reads_bfloat16_scores_as_their_float32_values(fast_bf16, monkeypatch, poisoned_allocations):
    """Given scores in bfloat16 hidden states' own dtype (a bfloat16 product's), the torch form
    reads them in place, in chunks of their bytes: the NLLs equal those from the same values in
    float32 (bit for bit on CPUs; on an H200, 6 of 150 differed by 1-2 float32 ulps, their sums
    rounded in another order), and the gradients agree at bfloat16 precision, whichever dtype
    the products run in."""
    monkeypatch.setattr(backends, "bf16_matmul_on_cpu", lambda: fast_bf16)
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 64 * 101 * 4)  # 64 float32 rows, 128 bfloat16
    kwargs = make_inputs(150, 40, 101, torch.bfloat16, mix=False, masked=True, ignored=True, seed=8)
    kwargs["lm_weight"] = kwargs["lm_weight"].detach().float().requires_grad_()  # a float32 master weight
    weights = torch.randn(150, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    scores = given_scores(kwargs, 1.0).bfloat16()

    def run(given):
        loss, nll = weighted_linear_cross_entropy(row_weights=weights, backend="torch", scores=given, **kwargs)
        return nll, torch.autograd.grad(loss, list(differentiable(kwargs).values()))

    float32_nll, float32_grads = run(scores.float())
    nll, grads = run(scores)
    torch.testing.assert_close(nll, float32_nll, rtol=0 if DEVICE.type == "cpu" else 1e-6, atol=0)
    for grad, expected in zip(grads, float32_grads):
        assert relative_error(grad, expected) <= 1e-2
    with pytest.raises(ValueError, match="scores must have dtype"):
        weighted_linear_cross_entropy(row_weights=weights, scores=scores.half(), **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_weighted_form_reads_scores_given_at_another_temperature_rescaled(dtype, monkeypatch, poisoned_allocations):
    """Scores divided by ``scores_temperature`` (the sampling pass's) give the loss, NLLs and
    gradients at ``temperature``, as the same scores rescaled first do; without scores, or at a
    temperature that is not positive, the argument is refused."""
    monkeypatch.setattr(torch_backend, "CHUNK_BYTES", 64 * 101 * 4)
    kwargs = make_inputs(150, 40, 101, torch.float32, mix=False, masked=True, ignored=True, seed=8)
    weights = torch.randn(150, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    if dtype == torch.bfloat16:
        kwargs["hidden"] = kwargs["hidden"].detach().bfloat16().requires_grad_()

    def run(given, **options):
        loss, nll = weighted_linear_cross_entropy(
            row_weights=weights, backend="torch", temperature=3.0, scores=given, **options, **kwargs
        )
        return nll, torch.autograd.grad(loss, list(differentiable(kwargs).values()))

    at_one = given_scores(kwargs, 1.0).to(dtype)
    nll, grads = run(at_one.clone(), scores_temperature=1.0)
    rescaled_nll, rescaled_grads = run(at_one.float() / 3.0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert relative_error(nll, rescaled_nll) <= 1e-6
    for grad, expected in zip(grads, rescaled_grads):
        assert relative_error(grad, expected) <= tol
    with pytest.raises(ValueError, match="scores_temperature is the temperature of given scores"):
        weighted_linear_cross_entropy(row_weights=weights, scores_temperature=1.0, **kwargs)
    with pytest.raises(ValueError, match="scores_temperature"):
        weighted_linear_cross_entropy(row_weights=weights, scores=at_one, scores_temperature=0.0, **kwargs)


@requires_triton
def test_the_triton_weighted_form_does_not_read_given_scores():
    """The Triton kernel scores its tiles itself: given scores (NaN here) are neither read nor
    written, and the result is the reference's."""
    kwargs = make_inputs(21, 40, 101, torch.float32, mix=False, bias=True, masked=True, ignored=True, seed=8)
    weights = torch.randn(21, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    scores = torch.full((101, 21), float("nan"), device=DEVICE)
    assert_weighted_form_matches_reference("triton", kwargs, weights, 3.0, scores=scores)
    assert scores.isnan().all()


@pytest.mark.parametrize(
    "device, dtype, backend, reads",
    [
        ("cpu", torch.float32, None, True),
        ("cpu", torch.float32, "reference", False),
        ("cpu", torch.float32, "native", True),
        ("cuda", torch.bfloat16, "torch", True),
        ("cuda", torch.float64, None, True),  # no Triton kernel for float64: the torch form
        pytest.param("cuda", torch.bfloat16, None, False, marks=requires_triton),
    ],
)
def test_weighted_form_reads_scores_only_in_its_torch_form(device, dtype, backend, reads, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert weighted_form_reads_scores(torch.device(device), dtype, backend) is reads


def test_weighted_form_rejects_scores_of_another_shape_dtype_requiring_grad_or_with_mix():
    kwargs = make_inputs(4, 8, 20, torch.float32, mix=False)
    weights = torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match=r"scores must be \[V, N\] = \[20, 4\]"):
        weighted_linear_cross_entropy(row_weights=weights, scores=torch.zeros(4, 20, device=DEVICE), **kwargs)
    with pytest.raises(ValueError, match="scores must have dtype"):
        weighted_linear_cross_entropy(row_weights=weights, scores=torch.zeros(20, 4, device=DEVICE).double(), **kwargs)
    with pytest.raises(ValueError, match="scores must not require grad"):
        weighted_linear_cross_entropy(
            row_weights=weights, scores=torch.zeros(20, 4, device=DEVICE, requires_grad=True), **kwargs
        )
    mixed = make_inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="scores cannot be given with mix"):
        weighted_linear_cross_entropy(row_weights=weights, scores=torch.zeros(20, 4, device=DEVICE), **mixed)


def test_weighted_form_rejects_weights_that_are_not_constants():
    kwargs = make_inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="row_weights must not require grad"):
        weighted_linear_cross_entropy(row_weights=torch.ones(4, device=DEVICE, requires_grad=True), **kwargs)
    with pytest.raises(ValueError, match=r"row_weights must be \[N=4\]"):
        weighted_linear_cross_entropy(row_weights=torch.ones(5, device=DEVICE), **kwargs)


def test_torch_backend_keeps_no_logits_for_backward():
    rows, vocab = 64, 200
    kwargs = make_inputs(rows, 8, vocab, torch.float32, bias=True, masked=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(backend="torch", **kwargs)
    assert saved and max(saved) < rows * vocab


def test_torch_backend_passes_gradcheck():
    kwargs = make_inputs(5, 3, 7, torch.float64, bias=True, masked=True, ignored=True)
    names = list(differentiable(kwargs))
    targets, masked = kwargs["targets"], kwargs["masked_vocab"]

    def fn(hidden, lm_weight, lm_bias, base_hidden, w):
        return linear_cross_entropy(
            hidden, lm_weight, targets, lm_bias=lm_bias, mix=(base_hidden, w), temperature=3.0,
            masked_vocab=masked, backend="torch",
        )

    inputs = differentiable(kwargs)
    inputs["w"] = inputs["w"].detach().double().requires_grad_()
    assert torch.autograd.gradcheck(fn, [inputs[name] for name in names])


# --- the reference against SPEC written out in float64 --------------------------------------


def nll_and_grads_float64(hidden, weight, targets, bias, base, w, temperature, masked, grad_nll):
    """Per-row NLL of the mixed state and its analytic gradients, row by row in float64."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    keep = torch.tensor([v not in masked for v in range(vocab)], device=hidden.device)
    nll = torch.zeros(rows, dtype=torch.float64, device=hidden.device)
    d_hidden, d_base, d_w = torch.zeros_like(hidden), torch.zeros_like(base), torch.zeros_like(w)
    d_weight, d_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    for r in range(rows):
        if targets[r] == IGNORE:
            continue
        h = (1 - w[r]) * base[r] + w[r] * hidden[r]
        logits = torch.stack([(weight[v] @ h + bias[v]) / temperature for v in range(vocab)])
        kept = logits[keep]
        lse = kept.max() + torch.log(torch.exp(kept - kept.max()).sum())
        nll[r] = lse - logits[targets[r]]
        probs = torch.where(keep, torch.exp(logits - lse), 0.0)
        d_logits = grad_nll[r] * (probs - torch.nn.functional.one_hot(targets[r], vocab)) / temperature
        d_h = d_logits @ weight
        d_weight += torch.outer(d_logits, h)
        d_bias += d_logits
        d_hidden[r], d_base[r] = w[r] * d_h, (1 - w[r]) * d_h
        d_w[r] = d_h @ (hidden[r] - base[r])
    return nll, {"hidden": d_hidden, "lm_weight": d_weight, "lm_bias": d_bias, "base_hidden": d_base, "w": d_w}


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_reference_follows_spec_formula(temperature):
    kwargs = make_inputs(7, 5, 11, torch.float64, bias=True, masked=True, ignored=True)
    kwargs["mix"] = (kwargs["mix"][0], kwargs["mix"][1].detach().double().requires_grad_())
    grad_nll = torch.randn(7, dtype=torch.float64).to(DEVICE)
    nll, grads = loss_and_grads(kwargs, "reference", grad_nll, temperature=temperature)
    plain = {name: t.detach() for name, t in differentiable(kwargs).items()}
    expected, expected_grads = nll_and_grads_float64(
        plain["hidden"], plain["lm_weight"], kwargs["targets"], plain["lm_bias"], plain["base_hidden"], plain["w"],
        temperature, kwargs["masked_vocab"], grad_nll,
    )
    assert relative_error(nll, expected) < 1e-12
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) < 1e-12, name


# --- behaviour every backend shares ----------------------------------------------------------

ALL_BACKENDS = ["reference", "torch", pytest.param("triton", marks=requires_triton)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ignored_rows_give_zero_loss_and_zero_gradient(backend):
    kwargs = make_inputs(12, 16, 40, torch.float32, bias=True, masked=True, ignored=True)
    ignored = kwargs["targets"] == IGNORE
    nll, grads = loss_and_grads(kwargs, backend, torch.ones(12, device=DEVICE))
    assert torch.equal(nll[ignored], torch.zeros_like(nll[ignored]))
    assert (nll[~ignored] > 0).all()
    for name in ("hidden", "base_hidden", "w"):
        assert torch.equal(grads[name][ignored], torch.zeros_like(grads[name][ignored])), name


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ignore_index_can_be_a_vocabulary_id(backend):
    kwargs = make_inputs(12, 16, 40, torch.float32, bias=True)
    kwargs["targets"][::2] = 3
    nll = linear_cross_entropy(backend=backend, ignore_index=3, **kwargs)
    as_default = kwargs["targets"].masked_fill(kwargs["targets"] == 3, IGNORE)
    expected = linear_cross_entropy(backend="reference", **{**kwargs, "targets": as_default})
    assert torch.equal(nll[::2], torch.zeros(6, device=DEVICE))
    assert relative_error(nll, expected) < 1e-5


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_masked_ids_get_no_probability_and_no_gradient(backend):
    kwargs = make_inputs(12, 16, 40, torch.float32, bias=True, masked=True)
    masked = kwargs["masked_vocab"]
    nll, grads = loss_and_grads(kwargs, backend, torch.ones(12, device=DEVICE))
    assert torch.equal(grads["lm_weight"][masked], torch.zeros_like(grads["lm_weight"][masked]))
    assert torch.equal(grads["lm_bias"][masked], torch.zeros_like(grads["lm_bias"][masked]))
    unmasked = linear_cross_entropy(backend=backend, **{**kwargs, "masked_vocab": None})
    assert (nll < unmasked).all()  # the probability mass of the masked ids moved to the rest


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_masked_vocab_accepts_a_list_or_an_integer_tensor(backend):
    kwargs = make_inputs(6, 8, 20, torch.float32, masked=True)
    as_list = linear_cross_entropy(backend=backend, **kwargs)
    ids = torch.tensor(kwargs["masked_vocab"])
    as_tensor = linear_cross_entropy(backend=backend, **{**kwargs, "masked_vocab": ids})
    assert torch.equal(as_list, as_tensor)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_temperature_divides_the_logits(backend):
    kwargs = make_inputs(6, 8, 20, torch.float32, mix=False, bias=True)
    hot = linear_cross_entropy(backend=backend, temperature=3.0, **kwargs)
    scaled = {**kwargs, "hidden": kwargs["hidden"] / 3, "lm_bias": kwargs["lm_bias"] / 3}
    assert relative_error(hot, linear_cross_entropy(backend=backend, **scaled)) < 1e-6


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_mix_weight_zero_scores_base_and_one_scores_hidden(backend):
    kwargs = make_inputs(6, 8, 20, torch.float32)
    hidden, (base, _) = kwargs["hidden"], kwargs["mix"]
    for value, expected_rows in ((0.0, base), (1.0, hidden)):
        mixed = linear_cross_entropy(backend=backend, **{**kwargs, "mix": (base, torch.full((6,), value, device=DEVICE))})
        plain = linear_cross_entropy(backend=backend, **{**kwargs, "mix": None, "hidden": expected_rows})
        assert relative_error(mixed, plain) < 1e-6


def test_default_backend_is_torch_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    kwargs = make_inputs(4, 8, 20, torch.float32, bias=True)
    expected = "LinearCrossEntropyTriton" if DEVICE.type == "cuda" else "LinearCrossEntropyTorch"
    assert linear_cross_entropy(**kwargs).grad_fn.name().startswith(expected)


# --- argument checking -----------------------------------------------------------------------


def good_arguments():
    kwargs = make_inputs(4, 8, 20, torch.float32, bias=True)
    return {k: (tuple(t.detach() for t in v) if k == "mix" else v.detach() if isinstance(v, torch.Tensor) else v)
            for k, v in kwargs.items()}


def replace_mix(kw, base=None, w=None):
    old_base, old_w = kw["mix"]
    return {**kw, "mix": (old_base if base is None else base, old_w if w is None else w)}


@pytest.mark.parametrize(
    "change,argument",
    [
        (lambda kw: {**kw, "hidden": kw["hidden"][0]}, "hidden"),
        (lambda kw: {**kw, "hidden": kw["hidden"].long()}, "hidden"),
        (lambda kw: {**kw, "hidden": kw["hidden"][:0]}, "hidden"),
        (lambda kw: {**kw, "lm_weight": kw["lm_weight"][:, :5]}, "lm_weight"),
        (lambda kw: {**kw, "lm_weight": kw["lm_weight"].double()}, "lm_weight"),
        (lambda kw: {**kw, "lm_weight": kw["lm_weight"].to("meta")}, "lm_weight must be on"),
        (lambda kw: {**kw, "targets": kw["targets"].float()}, "targets"),
        (lambda kw: {**kw, "targets": kw["targets"][:3]}, "targets"),
        (lambda kw: {**kw, "targets": torch.tensor([0, 1, 20, 2], device=DEVICE)}, "targets"),
        (lambda kw: {**kw, "targets": torch.tensor([0, 1, -1, 2], device=DEVICE)}, "targets"),
        (lambda kw: {**kw, "targets": torch.tensor([0, 1, 7, 2], device=DEVICE), "masked_vocab": [7]}, "targets.*masked_vocab"),
        (lambda kw: {**kw, "lm_bias": kw["lm_bias"][:5]}, "lm_bias"),
        (lambda kw: {**kw, "mix": kw["mix"][0]}, "mix"),
        (lambda kw: replace_mix(kw, base=kw["hidden"][:3]), "base_hidden"),
        (lambda kw: replace_mix(kw, base=kw["hidden"].double()), "base_hidden"),
        (lambda kw: replace_mix(kw, w=torch.rand(3, device=DEVICE)), "^w must"),
        (lambda kw: replace_mix(kw, w=torch.ones(4, dtype=torch.long, device=DEVICE)), "^w must"),
        (lambda kw: {**kw, "temperature": 0.0}, "temperature"),
        (lambda kw: {**kw, "temperature": float("inf")}, "temperature"),
        (lambda kw: {**kw, "temperature": float("nan")}, "temperature"),
        (lambda kw: {**kw, "temperature": 1e-45}, "temperature must be a finite number >= 1e-06"),  # made every NLL NaN
        (lambda kw: {**kw, "temperature": "3"}, "temperature"),
        (lambda kw: {**kw, "masked_vocab": [20]}, "masked_vocab"),
        (lambda kw: {**kw, "masked_vocab": [1.5]}, "masked_vocab"),
        (lambda kw: {**kw, "masked_vocab": "12"}, "masked_vocab"),
        (lambda kw: {**kw, "masked_vocab": torch.tensor([1.0])}, "masked_vocab"),
        (lambda kw: {**kw, "masked_vocab": list(range(20)), "targets": torch.full((4,), IGNORE, device=DEVICE)}, "masked_vocab"),
        (lambda kw: {**kw, "ignore_index": -100.0}, "ignore_index"),
        (lambda kw: {**kw, "ignore_index": 2**70}, "ignore_index must fit in int64"),
        (lambda kw: {**kw, "backend": "cuda"}, "backend"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(change, argument):
    kwargs = change(good_arguments())
    with pytest.raises(ValueError, match=argument):
        linear_cross_entropy(**kwargs)


@requires_triton
def test_triton_rejects_float64():
    kwargs = make_inputs(4, 8, 20, torch.float64, mix=False)
    with pytest.raises(ValueError, match="triton"):
        linear_cross_entropy(backend="triton", **kwargs)
