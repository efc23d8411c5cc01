"""The op cases under pytest-benchmark, for ``--benchmark-compare`` against a saved baseline:

    python -m pytest bench --benchmark-only --benchmark-autosave       # saves .benchmarks/...
    python -m pytest bench --benchmark-only --benchmark-compare        # against the last one

Each case's variants at its sizes of ``QUIETSTAR_BENCH_SCALE`` (``quick``, ``default`` (the
default) or ``full``, as ``bench/run.py``), forward + backward, on CUDA when there is one. The
tests suite (``python -m pytest tests``) does not collect this folder; ``bench/run.py`` stays
the tool for ratios, memory and FLOP rates (one process per variant).
"""

from __future__ import annotations

import os

import pytest
import torch
from cases import linear_cross_entropy, tree_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCALE = os.environ.get("QUIETSTAR_BENCH_SCALE", "default")
CASES = {"tree_attention": tree_attention, "linear_cross_entropy": linear_cross_entropy}


def _params():
    for name, case in CASES.items():
        skip = getattr(case, "skip", lambda variant, size, device: None)
        for size in case.sizes(DEVICE, SCALE):
            for variant in case.variants(DEVICE):
                reason = skip(variant, size, DEVICE)
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                yield pytest.param(name, variant, size, id=f"{name}-{case.label(size)}-{variant}", marks=marks)


@pytest.mark.parametrize("name,variant,size", _params())
def test_op_forward_backward(benchmark, name, variant, size):
    step, notes = CASES[name].build(variant, size, DEVICE)
    benchmark.extra_info.update({"size": size, **notes, "device": str(DEVICE)})

    def timed():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=3, warmup_rounds=1)
