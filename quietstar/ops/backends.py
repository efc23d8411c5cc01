"""Backend selection shared by every op.

Each op has three implementations with one signature:

* ``reference``: dense and obviously correct; the ground truth in tests.
* ``torch``: composed from PyTorch ops without the dense intermediates; the CPU fast path.
* ``triton``: fused Triton kernels; the CUDA fast path (CPU tensors only under the Triton
  interpreter, ``TRITON_INTERPRET=1``).
* ``native``: C++ CPU kernels (``quietstar._C``, built by ``CMakeLists.txt``), for
  ``tree_attention``; an op without native kernels runs its ``torch`` backend under it.

The decoder's elementwise ops (``rms_norm``, ``swiglu``, ``rotary_embedding``) have ``torch``
(transformers' own arithmetic, their reference), ``native`` and ``triton`` kernels
(``elementwise_backend`` picks; ``reference`` means ``torch`` there).

``backend=None`` reads the ``QUIETSTAR_BACKEND`` environment variable and otherwise picks
``triton`` for CUDA tensors when triton is installed, ``native`` for CPU tensors of an op with
native kernels when the extension is built (measured the fastest on CPU), and ``torch`` for
everything else; an automatic choice falls back to ``torch`` (logged once) for inputs the
Triton kernels do not take, such as a head dimension they have no tiles for.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from quietstar._checks import HALF_DTYPES

BACKENDS = ("reference", "torch", "triton", "native")
BACKEND_ENV_VAR = "QUIETSTAR_BACKEND"
# What the native elementwise kernels (rms_norm's result, swiglu, rotary_embedding's x) store.
NATIVE_ELEMENTWISE_DTYPES = (torch.float32, torch.bfloat16)
# What the Triton elementwise kernels load and store (float64 keeps its precision in the composition).
TRITON_ELEMENTWISE_DTYPES = (*HALF_DTYPES, torch.float32)

logger = logging.getLogger(__name__)


def triton_interpreter_enabled() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context in which Triton kernels on ``tensor`` launch on ``tensor``'s GPU.

    Triton launches on the current CUDA device, not the one its arguments live on: inputs on
    ``cuda:1`` while ``cuda:0`` is current would run on the wrong GPU.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(
    backend: str | None, device: torch.device, triton_unsupported: str | None = None, has_native: bool = False
) -> str:
    """Return the backend to run on ``device``.

    Args:
        backend: ``"reference"``, ``"torch"``, ``"triton"``, ``"native"`` or ``None`` (environment variable,
            then the best one for the device).
        device: device of the op's inputs.
        triton_unsupported: why the Triton kernels cannot take these inputs, or None when they
            can. An automatic choice then falls back to ``torch``; an asked-for ``triton``
            raises it.
        has_native: whether the op has native CPU kernels (else ``native`` means ``torch``).

    Raises:
        ValueError: unknown name, or ``triton`` or ``native`` where it cannot run.
    """
    return _resolve(*_named(backend), device, triton_unsupported, has_native)


def _named(backend: str | None) -> tuple[str | None, str]:
    """The backend named by the argument, else by ``QUIETSTAR_BACKEND`` (None: neither), and
    which of the two named it (for errors)."""
    if backend is None:
        return os.environ.get(BACKEND_ENV_VAR) or None, BACKEND_ENV_VAR
    return backend, "backend"


def _resolve(
    backend: str | None, source: str, device: torch.device, triton_unsupported: str | None, has_native: bool
) -> str:
    """``resolve_backend`` for ``backend`` as given by ``source`` (the argument or the
    environment variable; None: neither names one)."""
    if backend is None:
        chosen = _automatic_backend(device.type, has_native)
        if chosen == "triton" and triton_unsupported is not None:
            log_fallback_once(triton_unsupported)
            return "torch"
        return chosen
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{source}='triton' needs the triton package; install it or use 'torch'")
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(
                f"{source}='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 "
                "before importing quietstar to run the kernels in the Triton interpreter"
            )
        if triton_unsupported is not None:
            raise ValueError(f"{triton_unsupported}; use backend='torch'")
    if backend == "native":
        if not has_native:
            return "torch"
        if device.type != "cpu":
            raise ValueError(f"{source}='native' runs on CPU tensors (got {device.type})")
        from quietstar.ops.native import require_native

        require_native()
    return backend


@functools.lru_cache(maxsize=None)
def _automatic_backend(device_type: str, has_native: bool) -> str:
    """The automatic choice for inputs every backend takes: triton on CUDA with triton installed,
    native on the CPU for an op with native kernels where they load, else torch. Cached: the
    ops call it for every decoder layer's norms, rotations and activations."""
    if device_type == "cuda" and triton_available():
        return "triton"
    if device_type == "cpu" and has_native:
        from quietstar.ops.native import native_available

        if native_available():
            return "native"
    return "torch"


def records_gradient(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd would record an op on ``tensors`` (grad mode on and one of them needs a
    gradient). Where it would not, the ops call their kernels without an autograd Function,
    whose ``apply`` costs about as much as a small kernel (the thought sampling's calls)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> str | None:
    """``/proc/cpuinfo``'s text, or None where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def bf16_matmul_on_cpu() -> bool | None:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); without it a bfloat16
    GEMM is about 100x slower than a float32 one. None where ``/proc/cpuinfo`` cannot tell."""
    flags = _cpuinfo()
    if flags is None:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def intel_cpu() -> bool:
    """Whether ``/proc/cpuinfo`` names this CPU's maker Intel (``vendor_id: GenuineIntel``); False
    where there is no ``/proc/cpuinfo`` (not Linux), so the Intel-only choices of
    ``quietstar.ops.onednn_linear`` are made on Linux only."""
    info = _cpuinfo()
    return info is not None and "GenuineIntel" in info


def fast_half_matmul(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether matrix products in ``dtype`` run faster than in float32 on ``device``: float16 and
    bfloat16 on CUDA, bfloat16 on a CPU known to multiply it natively (float32 where unknown:
    always correct, never 100x slow)."""
    if dtype not in HALF_DTYPES:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and dtype == torch.bfloat16 and bf16_matmul_on_cpu() is True


@functools.lru_cache(maxsize=None)
def log_fallback_once(reason: str) -> None:
    logger.warning("using the torch backend: %s", reason)


def autocast_off(method):
    """Run an autograd Function's ``forward`` or ``backward`` with autocast off on the device of
    its first tensor argument: the ops choose their own precision (half-precision inputs,
    float32 accumulation), and autocast must not recast their internals."""

    @functools.wraps(method)
    def run(ctx, first: torch.Tensor, *args):
        with torch.autocast(first.device.type, enabled=False):
            return method(ctx, first, *args)

    return run


def elementwise_backend(backend: str | None, device: torch.device) -> str:
    """For the decoder's elementwise ops: ``"triton"``, ``"native"`` or ``"torch"``, as
    ``backend`` (else ``QUIETSTAR_BACKEND``) on ``device`` resolves (``resolve_backend``);
    ``"reference"`` is the ``torch`` composition, by argument or environment alike."""
    name, source = _named(backend)
    if name == "reference":
        return "torch"
    return _resolve(name, source, device, None, has_native=True)


def elementwise_choice(
    op: str,
    backend: str | None,
    device: torch.device,
    takes: Callable[[str], bool],
    kernels_take: dict[str, str],
    got: Callable[[], str],
) -> str:
    """The backend an elementwise op runs: the chosen one (``elementwise_backend``) where its
    kernels take the inputs (``takes(chosen)``), else ``"torch"``: logged once for an automatic
    choice, a ``ValueError`` naming what the kernels take (``kernels_take[chosen]``) and what
    they got (``got()``) for an asked-for one."""
    chosen = elementwise_backend(backend, device)
    if chosen == "torch" or takes(chosen):
        return chosen
    if backend == chosen:
        raise ValueError(f"backend={chosen!r} takes {kernels_take[chosen]}, got {got()}")
    log_fallback_once(f"{op}: the {chosen} kernels take {kernels_take[chosen]}, got {got()}")
    return "torch"


class ElementwiseKernels(NamedTuple):
    """One backend's forward and backward kernels of an elementwise op, with the signatures of
    the native ones (``torch.ops.quietstar.<op>_forward`` and ``_backward``)."""

    forward: Callable
    backward: Callable


def elementwise_kernels(op: str, backend: str) -> ElementwiseKernels:
    """The ``native`` or ``triton`` kernels of ``op`` (``"rms_norm"``, ``"swiglu"`` or
    ``"rotary_embedding"``); Triton's module is imported on first use."""
    if backend == "native":
        namespace = torch.ops.quietstar
    else:
        namespace = importlib.import_module("quietstar.kernels.elementwise")
    return ElementwiseKernels(getattr(namespace, f"{op}_forward"), getattr(namespace, f"{op}_backward"))
