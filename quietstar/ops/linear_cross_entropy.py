"""``linear_cross_entropy``: the mixing head, lm_head and cross-entropy as one op, every backend.

Quiet-STaR scores hidden states against the whole vocabulary many times per step (SPEC
sections 2 and 3). The mixing weight only enters through a convex combination of two hidden
states in front of the lm_head, so mixing, projection and the log-softmax fuse into one op
whose fast backends never hold the ``N x V`` logits.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from quietstar._checks import FLOAT_DTYPES, HALF_DTYPES, INT_DTYPES, check_int, check_temperature, check_tensor
from quietstar.ops.backends import resolve_backend
from quietstar.ops.linear_cross_entropy_common import compute_dtype

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
IGNORE_INDEX = -100


def linear_cross_entropy(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    lm_bias: torch.Tensor | None = None,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    temperature: float = 1.0,
    masked_vocab: Sequence[int] | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-row negative log-likelihood of ``targets`` under ``softmax((h @ lm_weight.T + lm_bias) / T)``.

    ``h`` is ``hidden``, or with ``mix=(base_hidden, w)`` the mixed state
    ``(1 - w) * base_hidden + w * hidden`` (SPEC section 2). Ids in ``masked_vocab`` get
    logit ``-inf`` (the meta tokens are never predicted). Differentiable in ``hidden``,
    ``lm_weight``, ``lm_bias``, ``base_hidden`` and ``w``; gradients come back in each input's
    dtype, accumulation is in float32 (float64 for float64 inputs).

    Args:
        hidden: ``[N, d]`` float16, bfloat16, float32 or float64.
        lm_weight: ``[V, d]``, dtype of ``hidden``; or float32 master weights next to float16
            or bfloat16 ``hidden`` (the products then run in ``hidden``'s dtype where the
            device multiplies it fast, and the weight's gradient comes back in float32).
        targets: ``[N]`` integer ids in ``[0, V)``, or ``ignore_index``.
        lm_bias: ``[V]``, dtype of ``lm_weight``.
        mix: ``(base_hidden [N, d] in the dtype of hidden, w [N] floating)``.
        temperature: logits are divided by it before the softmax; finite and at least
            ``MIN_TEMPERATURE`` (1e-6: below it large logits overflow float32).
        masked_vocab: ids that get ``-inf`` logits: a sequence of ints or a 1-D integer tensor.
        ignore_index: target value of rows that contribute 0 (and no gradient).
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or None (see ``quietstar.ops.backends``).

    Returns:
        ``[N]`` float32 (float64 for float64 inputs); 0 where ``targets == ignore_index``.

    Raises:
        ValueError: a shape, dtype, device, option or target id that does not fit, naming the
            argument; also a target that is a masked id (its NLL would be infinite).
    """
    args = _checked_arguments(hidden, lm_weight, targets, lm_bias, mix, temperature, masked_vocab, ignore_index)
    backend = _resolve(backend, hidden.device, hidden.dtype)
    if backend == "reference":
        from quietstar.ops.linear_cross_entropy_reference import linear_cross_entropy_reference

        return linear_cross_entropy_reference(*args)
    if backend == "torch":
        from quietstar.ops.linear_cross_entropy_torch import linear_cross_entropy_torch

        return linear_cross_entropy_torch(*args)
    from quietstar.ops.linear_cross_entropy_triton import linear_cross_entropy_triton

    return linear_cross_entropy_triton(*args)


def weighted_linear_cross_entropy(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    targets: torch.Tensor,
    row_weights: torch.Tensor,
    *,
    lm_bias: torch.Tensor | None = None,
    mix: tuple[torch.Tensor, torch.Tensor] | None = None,
    temperature: float = 1.0,
    masked_vocab: Sequence[int] | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    backend: str | None = None,
    scores: torch.Tensor | None = None,
    scores_temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear_cross_entropy`` summed with known per-row weights, for a loss that is a weighted
    sum of NLLs: returns ``(loss, nll)`` with ``loss = sum_i row_weights[i] * nll[i]`` (scalar,
    differentiable) and ``nll`` ``[N]`` (detached).

    Because the weights are known before the head runs, the ``torch`` and ``triton`` backends
    form every gradient in the forward, as Liger-Kernel's fused linear cross-entropy does: three
    matrix products per chunk of rows (scores, ``dh``, ``dW``) instead of the four of a backward
    that recomputes the scores, and the backward only scales the stored gradients. The price is
    holding ``dW`` (float32 ``[V, d]``) and ``dh`` from the forward to the backward. The
    ``reference`` backend, and every backend when no gradient is needed, sums
    ``linear_cross_entropy``'s per-row NLLs.

    Args:
        row_weights: ``[N]`` floating, the rows' weights in the loss (constants: no gradient
            flows into them; 0 for ignored rows is implied).
        scores: optional ``[V, N]`` float32 (float64 for float64 inputs; or ``hidden``'s half
            dtype, the scores as a product in it rounds them), vocabulary-major: the scores the
            head would compute, ``(hidden @ lm_weight.T + lm_bias) / temperature`` with masked
            ids ``-inf``, already at hand (the thought-sampling pass computed them to draw the
            tokens). With gradients to form, the ``torch`` form then skips its first product
            (two per chunk instead of three) and overwrites ``scores``; the Triton kernel and
            calls without gradients do not read them (``weighted_form_reads_scores``). Not
            with ``mix``; no gradient flows into them.
        scores_temperature: the temperature ``scores`` were divided by, where it is not
            ``temperature`` (the sampling pass's): they are read times ``scores_temperature /
            temperature``, as they are read, with no pass of their own. None: ``temperature``.
        Other arguments: as ``linear_cross_entropy``.

    Raises:
        ValueError: as ``linear_cross_entropy``, and ``row_weights`` of another shape, a
            non-float dtype, another device, or requiring grad; ``scores`` of another shape,
            dtype or device, requiring grad, or given with ``mix``.
    """
    args = _checked_arguments(hidden, lm_weight, targets, lm_bias, mix, temperature, masked_vocab, ignore_index)
    check_tensor("row_weights", row_weights, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
    if row_weights.shape[0] != hidden.shape[0]:
        raise ValueError(f"row_weights must be [N={hidden.shape[0]}], got {tuple(row_weights.shape)}")
    if row_weights.requires_grad:
        raise ValueError("row_weights must not require grad: they are constants of the loss (detach them)")
    if scores is not None:
        _check_scores(scores, hidden, lm_weight, mix)
    if scores_temperature is not None:
        check_temperature("scores_temperature", scores_temperature)
        if scores is None:
            raise ValueError("scores_temperature is the temperature of given scores: pass scores with it")
    backend = _resolve(backend, hidden.device, hidden.dtype)
    differentiable = (hidden, lm_weight, lm_bias, *(mix or ()))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
    if backend in ("torch", "triton") and needs_grad:  # without gradients to form, one product per chunk is all
        hidden_, weight_, targets_, bias_, base_, w_, *rest = args
        if backend == "torch":
            from quietstar.ops.linear_cross_entropy_torch import weighted_linear_cross_entropy_torch

            return weighted_linear_cross_entropy_torch(
                hidden_, weight_, targets_, row_weights, bias_, base_, w_, *rest, scores=scores,
                scores_multiplier=1.0 if scores_temperature is None else scores_temperature / temperature,
            )
        from quietstar.ops.linear_cross_entropy_triton import weighted_linear_cross_entropy_triton

        return weighted_linear_cross_entropy_triton(hidden_, weight_, targets_, row_weights, bias_, base_, w_, *rest)
    nll = linear_cross_entropy(
        hidden, lm_weight, targets, lm_bias=lm_bias, mix=mix, temperature=temperature, masked_vocab=masked_vocab,
        ignore_index=ignore_index, backend=backend,
    )
    return (row_weights.to(nll.dtype) * nll).sum(), nll.detach()


def _check_scores(scores: torch.Tensor, hidden: torch.Tensor, lm_weight: torch.Tensor, mix: object) -> None:
    """``weighted_linear_cross_entropy``'s given ``scores``: ``[V, N]`` in the head's compute dtype
    or ``hidden``'s half dtype."""
    dtypes = (compute_dtype(hidden.dtype), *((hidden.dtype,) if hidden.dtype in HALF_DTYPES else ()))
    check_tensor("scores", scores, ndim=2, dtypes=dtypes, device=hidden.device)
    want = (lm_weight.shape[0], hidden.shape[0])
    if tuple(scores.shape) != want:
        raise ValueError(f"scores must be [V, N] = {list(want)} (vocabulary-major), got {tuple(scores.shape)}")
    if mix is not None:
        raise ValueError("scores cannot be given with mix: the head would score the mixed rows")
    if scores.requires_grad:
        raise ValueError("scores must not require grad: they are constants the op overwrites (detach them)")


def _checked_arguments(hidden, lm_weight, targets, lm_bias, mix, temperature, masked_vocab, ignore_index) -> tuple:
    """Check ``linear_cross_entropy``'s arguments; return them as the backends take them:
    ``(hidden, lm_weight, targets (int64), lm_bias, base_hidden, w, temperature, masked_ids,
    ignore_index)``."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    rows, width = hidden.shape
    if rows == 0 or width == 0:
        raise ValueError(f"hidden must be [N, d] with N, d >= 1, got {tuple(hidden.shape)}")
    device = hidden.device
    check_tensor("lm_weight", lm_weight, ndim=2, dtypes=head_dtypes(hidden.dtype), device=device)
    vocab = lm_weight.shape[0]
    if vocab == 0 or lm_weight.shape[1] != width:
        raise ValueError(f"lm_weight must be [V, d={width}] with V >= 1, got {tuple(lm_weight.shape)}")
    check_tensor("targets", targets, ndim=1, dtypes=INT_DTYPES, device=device)
    if targets.shape[0] != rows:
        raise ValueError(f"targets must be [N={rows}], got {tuple(targets.shape)}")
    if lm_bias is not None:
        check_tensor("lm_bias", lm_bias, ndim=1, dtypes=(lm_weight.dtype,), device=device)
        if lm_bias.shape[0] != vocab:
            raise ValueError(f"lm_bias must be [V={vocab}], got {tuple(lm_bias.shape)}")
    base_hidden, mix_weight = _check_mix(mix, hidden)
    temperature = check_temperature("temperature", temperature)
    check_int("ignore_index", ignore_index)
    masked_ids = _masked_ids(masked_vocab, vocab, device)
    targets = targets.long()
    _check_target_values(targets, vocab, ignore_index, masked_ids)

    return hidden, lm_weight, targets, lm_bias, base_hidden, mix_weight, temperature, masked_ids, ignore_index


def head_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtypes ``lm_weight`` may have next to ``hidden`` of ``dtype``: the same, or float32
    master weights next to half-precision hidden states (as under autocast)."""
    return (dtype, torch.float32) if dtype in HALF_DTYPES else (dtype,)


def weighted_form_reads_scores(device: torch.device, dtype: torch.dtype, backend: str | None = None) -> bool:
    """Whether ``weighted_linear_cross_entropy`` forming gradients (without ``mix``, with which
    no scores are taken), on ``device`` with hidden states of ``dtype`` and ``backend``, reads
    given ``scores``: its ``torch`` form does. The Triton kernel does not: it scores the rows
    again on chip, and on a GPU that beats the torch form that skips the product (an H100 ran
    the weighted torch form 5.9x slower than the kernel at V=128,256;
    ``bench/results/gpu-h100.md``)."""
    return _resolve(backend, device, dtype) == "torch"


def _resolve(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend both ops run for hidden states of ``dtype`` on ``device``."""
    return resolve_backend(backend, device, _triton_unsupported(dtype))


def _triton_unsupported(dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot take hidden states of ``dtype``, or None when they can."""
    if dtype not in TRITON_DTYPES:
        return f"hidden dtype must be float16, bfloat16 or float32 for the triton backend, got {dtype}"
    return None


def _check_mix(mix: object, hidden: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Unpack ``mix`` into ``(base_hidden, w)``, or ``(None, None)`` without mixing."""
    if mix is None:
        return None, None
    if not isinstance(mix, (tuple, list)) or len(mix) != 2:
        raise ValueError(f"mix must be a pair (base_hidden, w), got {type(mix).__name__}")
    base_hidden, weight = mix
    check_tensor("base_hidden", base_hidden, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    if base_hidden.shape != hidden.shape:
        raise ValueError(
            f"base_hidden must have the shape of hidden {tuple(hidden.shape)}, got {tuple(base_hidden.shape)}"
        )
    check_tensor("w", weight, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
    if weight.shape[0] != hidden.shape[0]:
        raise ValueError(f"w must be [N={hidden.shape[0]}], got {tuple(weight.shape)}")
    return base_hidden, weight


def _masked_ids(masked_vocab: object, vocab: int, device: torch.device) -> torch.Tensor | None:
    """``masked_vocab`` as sorted unique int64 ids on ``device``, or None when there are none."""
    if masked_vocab is None:
        return None
    if isinstance(masked_vocab, torch.Tensor):
        check_tensor("masked_vocab", masked_vocab, ndim=1, dtypes=INT_DTYPES)
        ids = masked_vocab.to(device=device, dtype=torch.long)
    else:
        if isinstance(masked_vocab, (str, bytes)) or not isinstance(masked_vocab, Sequence):
            raise ValueError(
                f"masked_vocab must be a sequence of ints or a 1-D integer tensor, got {type(masked_vocab).__name__}"
            )
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in masked_vocab):
            raise ValueError("masked_vocab must hold only ints")
        ids = torch.tensor([int(i) for i in masked_vocab], dtype=torch.long, device=device)
    if ids.numel() == 0:
        return None
    if ((ids < 0) | (ids >= vocab)).any():
        raise ValueError(f"masked_vocab ids must be in [0, V={vocab}), got {ids.min().item()}..{ids.max().item()}")
    ids = torch.unique(ids)
    if ids.numel() == vocab:
        raise ValueError(f"masked_vocab masks all {vocab} ids; at least one must stay unmasked")
    return ids


def _check_target_values(targets: torch.Tensor, vocab: int, ignore_index: int, masked_ids: torch.Tensor | None) -> None:
    """Every target is ``ignore_index`` or an unmasked id in ``[0, vocab)``."""
    real = targets != ignore_index
    out_of_range = real & ((targets < 0) | (targets >= vocab))
    if out_of_range.any():
        bad = targets[out_of_range][0].item()
        raise ValueError(f"targets must be in [0, V={vocab}) or ignore_index={ignore_index}, got {bad}")
    if masked_ids is not None:
        hits = real & torch.isin(targets, masked_ids)
        if hits.any():
            bad = targets[hits][0].item()
            raise ValueError(
                f"targets include id {bad}, which is in masked_vocab: a masked id has probability 0, "
                "so its NLL would be infinite"
            )
