"""Processes of a run on PyTorch's own distributed engine (``torchrun``): DDP by default, FSDP2
(``fully_shard``, one unit per decoder layer) on request; a single process needs neither."""

from __future__ import annotations

import gc
import logging
import os
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)

# How long teardown lets go of the GIL when a gloo group outlives destroy_process_group: its
# worker threads may still be freeing the last collectives' tensors, which takes the GIL, and
# a thread that takes it once the interpreter is finalizing aborts the whole process.
GLOO_WORKERS_SETTLE_S = 0.2


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process stands in the run."""

    rank: int
    world: int
    device: torch.device
    # setup() started the group (under torchrun), so the run ends it; a group the caller
    # started (torch.multiprocessing.spawn, say) stays the caller's to use and destroy.
    started_here: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str) -> ProcessGroup:
    """Join the run ``torchrun`` started (gloo on CPU, NCCL on CUDA), or the process group the
    caller started, or run alone.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.

    Raises:
        ValueError: ``cuda`` without a CUDA device, or more processes on this node than GPUs.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    callers = dist.is_initialized()
    if callers:  # a group the caller started (torch.multiprocessing.spawn, say)
        if ("RANK" in os.environ or "WORLD_SIZE" in os.environ) and (rank, world) != (dist.get_rank(), dist.get_world_size()):
            raise ValueError(
                f"RANK={rank} and WORLD_SIZE={world} of the environment disagree with the process group already "
                f"started (rank {dist.get_rank()} of {dist.get_world_size()})"
            )
        rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()) if use_cuda else 0))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s): start at most "
                "one process per GPU (torchrun --nproc-per-node), or use device='cpu'"
            )
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if world > 1 and not callers:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        logger.info("process %d of %d on %s", rank, world, where)
    return ProcessGroup(rank, world, where, started_here=not callers)


def teardown(group: ProcessGroup) -> None:
    """Leave the run: destroy the process group, and let its gloo worker threads finish.

    Gloo's worker threads free a finished collective's tensors after the caller has seen it
    finish; freeing a tensor Python created takes the GIL, and a thread that takes it while
    the interpreter exits aborts the process ("terminate called without an active
    exception"). Destroying the group joins those threads when nothing else holds it (drop
    DDP/FSDP wrappers first); where something still does (FSDP2's state on the model), the
    threads get :data:`GLOO_WORKERS_SETTLE_S` with the GIL free.
    """
    if not (group.distributed and dist.is_initialized()):
        return
    gloo = dist.get_backend() == "gloo"
    world = weakref.ref(dist.group.WORLD)
    gc.collect()  # wrappers in reference cycles that still hold the group
    dist.destroy_process_group()
    if gloo and world() is not None:
        logger.debug("the gloo group outlives destroy_process_group; waiting %.1f s for its workers", GLOO_WORKERS_SETTLE_S)
        time.sleep(GLOO_WORKERS_SETTLE_S)


def wrap(qs: nn.Module, group: ProcessGroup, fsdp: bool) -> nn.Module:
    """The module the training step calls: ``qs`` itself alone, else DDP or FSDP2 over it."""
    if not group.distributed:
        if fsdp:
            logger.warning("fsdp needs several processes (torchrun); running unsharded")
        return qs
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # The mesh on the run's own device: fully_shard's default mesh is CUDA wherever a GPU
        # exists, also for a CPU (gloo) run, whose second process then has no GPU of its own.
        mesh = init_device_mesh(group.device.type, (group.world,))
        for layer in qs.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(qs, mesh=mesh)
        return qs
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(qs, device_ids=device_ids)


def sum_over_processes(values: dict[str, float], group: ProcessGroup) -> dict[str, float]:
    """Each value summed over the processes of the run (float64, so counts stay exact)."""
    if not group.distributed:
        return dict(values)
    names = sorted(values)
    packed = torch.tensor([values[n] for n in names], dtype=torch.float64, device=group.device)
    dist.all_reduce(packed)
    return dict(zip(names, packed.tolist()))


def gather_to_main(value: object, group: ProcessGroup) -> list | None:
    """Every process's ``value`` (picklable), in rank order, on the first process; None elsewhere."""
    if not group.distributed:
        return [value]
    gathered = [None] * group.world if group.is_main else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier(group: ProcessGroup) -> None:
    if group.distributed:
        dist.barrier()


def broadcast_flag(flag: bool, group: ProcessGroup) -> bool:
    """True if any process raised ``flag`` (e.g. a signal that reached only some)."""
    if not group.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=group.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
