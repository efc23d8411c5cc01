"""linear_cross_entropy with the mixing prologue, forward + backward per backend, against the
dense reference.

The step scores ``h = (1 - w) * base_hidden + w * hidden`` against the whole vocabulary with
the two meta tokens masked, and takes the gradient of ``nll.sum()`` with respect to
``hidden``, ``base_hidden``, ``w`` and ``lm_weight``; ``torch-weighted`` and ``triton-weighted``
are the form the model uses (``weighted_linear_cross_entropy``, the gradients formed in the
forward). Public alternative on CUDA: Liger
Kernel's fused linear cross-entropy (when installed), fed the mixed rows that torch computes
first; it has no vocabulary mask.
"""

from __future__ import annotations

import importlib.util

import torch

from quietstar import linear_cross_entropy, weighted_linear_cross_entropy

DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
META_TOKENS = 2  # <|startthought|> and <|endthought|>, the last two ids
# Llama-2's and Llama-3's vocabularies at Llama-3-8B's width; 8192 rows keep the reference's
# float32 logits and their gradients near 17 GB at the larger vocabulary.
GPU_VOCABS = (32000, 128256)


def baseline(device: torch.device) -> str:
    return "reference"


def variants(device: torch.device) -> list[str]:
    if device.type != "cuda":
        return ["reference", "torch", "torch-weighted"]
    liger = ["liger"] if importlib.util.find_spec("liger_kernel") is not None else []
    return ["reference", "torch", "torch-weighted", "triton", "triton-weighted"] + liger


def sizes(device: torch.device, scale: str) -> list[dict]:
    if scale == "quick":
        return [dict(rows=256, width=64, vocab=2048)]
    if device.type == "cpu":  # SmolLM2-135M's width and vocabulary
        return [dict(rows=4096 if scale == "full" else 1024, width=576, vocab=49152)]
    return [dict(rows=8192, width=4096, vocab=vocab) for vocab in GPU_VOCABS]


def label(size: dict) -> str:
    return f"V={size['vocab']}"


def matmul_shapes(size: dict, device: torch.device) -> tuple[torch.dtype, list[tuple[int, int, int, int]]]:
    """The three products ``useful_flops`` counts: the scores ``[N, d] x [d, V]`` and their
    gradients to h, ``[N, V] x [V, d]``, and to W, ``[V, N] x [N, d]``."""
    rows, width, vocab = size["rows"], size["width"], size["vocab"]
    return DTYPE[device.type], [(1, rows, width, vocab), (1, rows, vocab, width), (1, vocab, rows, width)]


def useful_flops(size: dict, variant: str, device: torch.device) -> float:
    """Three ``N x V x d`` matrix products: the scores, and their gradients to h and W."""
    return 6.0 * size["rows"] * size["vocab"] * size["width"]


def _inputs(s: dict, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPE[device.type]

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype).requires_grad_()

    hidden = randn(s["rows"], s["width"])
    base_hidden = randn(s["rows"], s["width"])
    w = torch.rand(s["rows"], generator=gen, device=device).to(dtype).requires_grad_()
    lm_weight = randn(s["vocab"], s["width"], scale=s["width"] ** -0.5)
    targets = torch.randint(0, s["vocab"] - META_TOKENS, (s["rows"],), generator=gen, device=device)
    return hidden, base_hidden, w, lm_weight, targets


def build(variant: str, s: dict, device: torch.device):
    hidden, base_hidden, w, lm_weight, targets = _inputs(s, device)
    inputs = (hidden, base_hidden, w, lm_weight)
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def step():
            mixed = torch.lerp(base_hidden, hidden, w[:, None])
            torch.autograd.grad(loss_fn(lm_weight, mixed, targets), inputs)

        return step, {"note": "mixing in torch, no vocabulary mask"}

    masked = list(range(s["vocab"] - META_TOKENS, s["vocab"]))
    if variant.endswith("-weighted"):  # the model's form: a weighted sum, gradients in the forward
        weights = torch.ones(s["rows"], device=device)
        backend = variant.removesuffix("-weighted")

        def step():
            loss, _ = weighted_linear_cross_entropy(
                hidden, lm_weight, targets, weights, mix=(base_hidden, w), masked_vocab=masked, backend=backend
            )
            torch.autograd.grad(loss, inputs)

        return step, {"note": "weighted_linear_cross_entropy: 3 products, gradients in the forward"}

    def step():
        nll = linear_cross_entropy(
            hidden, lm_weight, targets, mix=(base_hidden, w), masked_vocab=masked, backend=variant
        )
        torch.autograd.grad(nll.sum(), inputs)

    return step, {}
