"""The end-to-end Quiet-STaR training step: forward + backward of ``QuietStarModel`` against
the step-by-step dense reference (``quietstar.model.reference``), with the same thoughts.

Random weights (the cost does not depend on them) of SmolLM2-135M's architecture on CPU (30
layers, width 576, 9 query / 3 KV heads, vocabulary 49,152, float32) and of a 1B-class Llama
on CUDA (Llama-3.2-1B's shape: 16 layers, width 2048, 32 query / 8 KV heads, vocabulary
128,256, bfloat16). Variants: ``reference`` (dense masks, full logits, 1 + C passes with
gradients); ``quietstar`` (the fast path with its default ``gradient_checkpointing="auto"``,
thoughts given as for the reference); ``quietstar+sampling`` (the same including its own
thought sampling, i.e. a real training step); ``quietstar-checkpointing`` (the fast path with
checkpointing forced on); ``quietstar+sampling-bf16`` (a real step of a float32 model under
bfloat16 autocast, float32 master weights: fast where the CPU multiplies bfloat16 natively,
and skipped, saying so, on a CPU that does not, where its time would measure an emulation);
on CUDA, whose models are bfloat16, also ``quietstar+sampling-fp32`` (the same step of the
float32 model without autocast: bfloat16 autocast's speed-up over float32 there, side by side).
On CPU every variant's worker process runs with quietstar's CPU caching allocator, as
``quietstar train`` does (``CPU_CACHING_ALLOCATOR``; where the native extension is built),
unless ``bench/run.py`` is given ``--no-cpu-caching-allocator``.
"""

from __future__ import annotations

import torch

LENGTH_KEY = "length"  # what --max-length varies
CPU_CACHING_ALLOCATOR = True  # bench/run.py's CPU workers enable quietstar.ops.cpu_caching_allocator (unless told not to)
LENGTH_VARIANTS = ["reference", "quietstar"]
MODELS = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
VARIANT_MATMUL_DTYPE = {"quietstar+sampling-bf16": torch.bfloat16, "quietstar+sampling-fp32": torch.float32}
# Variants whose model is stored in another dtype than the device's DTYPE: float32 master weights.
VARIANT_MODEL_DTYPE = {"quietstar+sampling-bf16": torch.float32, "quietstar+sampling-fp32": torch.float32}


def baseline(device: torch.device) -> str:
    return "reference"


def variants(device: torch.device) -> list[str]:
    # CPU models are float32 already; on CUDA (bfloat16 models) the float32 step is a variant.
    dtypes = ["quietstar+sampling-bf16"] if device.type == "cpu" else ["quietstar+sampling-fp32", "quietstar+sampling-bf16"]
    return ["reference", "quietstar", "quietstar+sampling", "quietstar-checkpointing", *dtypes]


def sizes(device: torch.device, scale: str) -> list[dict]:
    if scale == "quick":
        return [dict(model="smollm2-135m", batch=1, length=16, thought_tokens=2, talk_tokens=2, n_thoughts=1, layers=2)]
    if device.type == "cpu":  # the default scale: 2 of the 30 layers at half the length
        full = scale == "full"
        return [dict(model="smollm2-135m", batch=1, length=128 if full else 64, thought_tokens=9, talk_tokens=4,
                     n_thoughts=1, layers=30 if full else 2)]
    step = dict(model="llama-1b", thought_tokens=9, talk_tokens=4, n_thoughts=2, layers=16)
    # The target size first; the step-by-step reference holds a float32 [L, L * (1 + c)]
    # score matrix per head, layer and step c, so it only fits at a much smaller batch and length.
    return [dict(step, batch=8, length=256), dict(step, batch=1, length=128)]


# The widths ``narrowed`` divides; layers, heads, batch and tokens stay.
NARROWED_WIDTHS = ("hidden_size", "intermediate_size", "vocab_size")


def narrowed(size: dict, factor: int) -> dict:
    """``size`` on its model with the hidden size, the MLP width and the vocabulary divided by
    ``factor`` (registered in ``MODELS`` as ``"<model>/<factor>"``): the step runs the same
    operators on the same tokens, each with ``factor`` times less work (the products
    ``factor**2``), so what is left of its time is mostly the cost per operator (Python,
    dispatch, each kernel's start). ``bench/profile_step.py --narrow``. The name is known to
    this process only (``bench/run.py``'s workers would not find it).

    Raises:
        ValueError: ``factor`` is not a positive integer that divides every width and leaves
            an even head size (RoPE rotates pairs).
    """
    cfg = MODELS[size["model"]]
    heads = cfg["num_attention_heads"]
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    if any(cfg[key] % factor for key in NARROWED_WIDTHS) or (cfg["hidden_size"] // factor) % (2 * heads):
        widths = ", ".join(f"{key}={cfg[key]}" for key in NARROWED_WIDTHS)
        raise ValueError(
            f"factor must divide {size['model']}'s {widths} and leave an even head size over its "
            f"{heads} heads, got {factor}"
        )
    if factor == 1:
        return size
    name = f"{size['model']}/{factor}"
    MODELS.setdefault(name, {**cfg, **{key: cfg[key] // factor for key in NARROWED_WIDTHS}})
    return {**size, "model": name}


def skip(variant: str, size: dict, device: torch.device) -> str | None:
    if variant == "quietstar-checkpointing" and device.type == "cpu" and size["layers"] < MODELS[size["model"]]["num_hidden_layers"]:
        return "--full runs it (with all layers, where memory matters)"
    from quietstar.ops.backends import fast_half_matmul

    dtype = VARIANT_MATMUL_DTYPE.get(variant)
    if dtype is not None and dtype != torch.float32 and not fast_half_matmul(dtype, device):
        # Its time and its fraction of an emulated bfloat16 rate would say nothing of the step.
        return "this CPU has no bfloat16 matrix instructions (quietstar train --dtype bf16 suggests float32 here)"
    return None


def label(size: dict) -> str:
    return f"B={size['batch']} L={size['length']}"


def forward_rows(size: dict) -> list[int]:
    """Rows of each forward product of the decoder, as a step runs them: the ``T`` sampling
    steps through the KV cache, the first of them with the base pass of the text (``B L + B N
    L`` rows, one pass) and the others ``B N L`` rows each, whose projections the tree pass
    replays (``quietstar.model.projection_replay``), then the tree's remaining chain slots in
    one product (``QuietStarModel.evaluate``'s schedule too, without gradients)."""
    batch, length, n = size["batch"], size["length"], size["n_thoughts"]
    chain = size["thought_tokens"] + 1 + size["talk_tokens"]
    steps = size["thought_tokens"]
    rest = batch * (chain - steps) * n * length
    return [batch * length * (1 + n)] + [batch * n * length] * (steps - 1) + ([rest] if rest else [])


def matmul_shapes(
    size: dict, device: torch.device, backward: bool = True
) -> tuple[torch.dtype, list[tuple[int, int, int, int, int]]]:
    """The step's own products ``(1, m, k, n, count)``, counted as the step runs them: a decoder
    layer's projections and MLP over the forward's rows (``forward_rows``; ``count`` =
    layers) and the lm_head over the scored rows (once); with ``backward``, the two gradient
    products of each over all the tree's tokens (``dX = dY W``: ``(m, n, k)``; ``dW = dY^T X``:
    ``(n, m, k)``)."""
    cfg = MODELS[size["model"]]
    d = cfg["hidden_size"]
    n, t_len, k_len = size["n_thoughts"], size["thought_tokens"], size["talk_tokens"]
    tokens = size["batch"] * (1 + (t_len + 1 + k_len) * n) * size["length"]
    rows = size["batch"] * size["length"] * (1 + n * (k_len + t_len))
    decoder = decoder_products(size)
    shapes = [(1, m, k, out, count) for m in forward_rows(size) for k, out, count in decoder]
    shapes.append((1, rows, d, cfg["vocab_size"], 1))
    if backward:
        for m, k, out, count in [(tokens, *product) for product in decoder] + [(rows, d, cfg["vocab_size"], 1)]:
            shapes += [(1, m, out, k, count), (1, out, m, k, count)]
    return DTYPE[device.type], shapes


def decoder_products(size: dict) -> list[tuple[int, int, int]]:
    """``(in, out, count)`` of the decoder's products per token row over ``size["layers"]``
    layers: q and o, k and v, gate and up, down."""
    cfg = MODELS[size["model"]]
    d, heads, kv_heads, ffn = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    kv, layers = kv_heads * d // heads, size["layers"]
    return [(d, d, 2 * layers), (d, kv, 2 * layers), (d, ffn, 2 * layers), (ffn, d, layers)]


def decoder_params(size: dict) -> int:
    """``P``: the decoder's non-embedding parameters (attention projections and MLP) over
    ``size["layers"]`` layers."""
    return sum(k * n * count for k, n, count in decoder_products(size))


def useful_flops(size: dict, variant: str, device: torch.device) -> float:
    """The step's useful FLOPs, ``3 x (2 P X + 2 d V R + 4 D A)``: forward and backward of the
    decoder's non-embedding parameters ``P`` over the tree's ``X`` tokens (the text once, every
    chain slot of every thought), of the lm_head over the ``R`` scored rows (text, talk and
    thought-token rows), and of attention over the ``A`` visible (query, key) pairs summed over
    layers and query heads, head size ``D``. Sampling the thoughts and any recomputation are
    not useful work: the same count holds for every variant."""
    cfg = {**MODELS[size["model"]], "num_hidden_layers": size["layers"]}
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = d // heads
    params = decoder_params(size)
    batch, length, n = size["batch"], size["length"], size["n_thoughts"]
    t_len, k_len = size["thought_tokens"], size["talk_tokens"]
    n_slots = 1 + (t_len + 1 + k_len) * n
    tokens = batch * n_slots * length
    rows = batch * length * (1 + n * (k_len + t_len))
    base_pairs = n_slots * length * (length + 1) // 2
    chain_pairs = sum((s - 1) // n + 1 for s in range(1, n_slots)) * length
    pairs = cfg["num_hidden_layers"] * batch * heads * (base_pairs + chain_pairs)
    return 3.0 * (2 * params * tokens + 2 * d * cfg["vocab_size"] * rows + 4 * head_dim * pairs)


def make_model(s: dict, device: torch.device, gradient_checkpointing: bool | str = "auto", dtype: torch.dtype | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    from quietstar import QuietStarConfig, QuietStarModel

    torch.manual_seed(0)
    config = LlamaConfig(**{**MODELS[s["model"]], "num_hidden_layers": s["layers"]})
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype or DTYPE[device.type])
    qs_config = QuietStarConfig(
        thought_tokens=s["thought_tokens"], talk_tokens=s["talk_tokens"], n_thoughts=s["n_thoughts"]
    )
    qs = QuietStarModel(model, config=qs_config, gradient_checkpointing=gradient_checkpointing)
    return qs.to(device).train()


def build(variant: str, s: dict, device: torch.device):
    from quietstar.model.reference import reference_forward

    checkpointing = True if variant == "quietstar-checkpointing" else "auto"
    qs = make_model(s, device, gradient_checkpointing=checkpointing, dtype=VARIANT_MODEL_DTYPE.get(variant))
    gen = torch.Generator(device=device).manual_seed(0)
    vocab = MODELS[s["model"]]["vocab_size"]
    ids = torch.randint(0, vocab, (s["batch"], s["length"]), generator=gen, device=device)
    thoughts = qs.sample_thoughts(ids, generator=gen)
    params = [p for p in qs.parameters() if p.requires_grad]

    def backward(loss):
        torch.autograd.grad(loss, params)

    if variant == "reference":
        return (lambda: backward(reference_forward(qs, ids, thoughts=thoughts).loss)), {}
    if variant == "quietstar+sampling":
        return (lambda: backward(qs(ids, generator=gen).loss)), {"note": "samples its own thoughts"}
    if variant == "quietstar+sampling-fp32":
        return (lambda: backward(qs(ids, generator=gen).loss)), {"note": "samples its own thoughts; float32 model"}
    if variant == "quietstar+sampling-bf16":

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = qs(ids, generator=gen).loss
            backward(loss)

        return step, {"note": "samples its own thoughts; bfloat16 autocast, float32 master weights"}
    note = {"note": "layers recomputed in the backward"} if variant == "quietstar-checkpointing" else {}
    return (lambda: backward(qs(ids, thoughts=thoughts).loss)), note
