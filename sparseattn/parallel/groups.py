"""Data-parallel x sequence-parallel process groups.

``world_size = data_parallel_size x seq_parallel_size``. Sequence-parallel (SP) groups are blocks of
consecutive ranks, so with ``torchrun --nproc_per_node N`` and ``seq_parallel_size <= N`` the
all-to-all traffic of one sequence stays inside one node (NVLink); data-parallel (DP) groups are the
ranks that hold the same sequence shard of different batches:

    world 8, seq_parallel_size 4:   SP groups [0 1 2 3] [4 5 6 7]     DP groups [0 4] [1 5] [2 6] [3 7]

A group of ``None`` in this package means "one process, nothing to communicate" (a run without
``torch.distributed``), never torch's default of the whole world.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("sparseattn")

__all__ = ["ParallelGroups", "build_groups", "group_layout", "init_distributed", "check_seq_parallel_size"]


def check_seq_parallel_size(seq_parallel_size, world_size: int) -> int:
    """``seq_parallel_size`` as an int that divides ``world_size`` (else a ValueError saying what would)."""
    if isinstance(seq_parallel_size, bool) or not isinstance(seq_parallel_size, int) or seq_parallel_size < 1:
        raise ValueError(f"seq_parallel_size must be an int >= 1, got {seq_parallel_size!r}")
    if world_size % seq_parallel_size != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"seq_parallel_size ({seq_parallel_size}) must divide the world size ({world_size}) so that "
            f"world_size = data_parallel_size x seq_parallel_size; valid values for {world_size} processes: {divisors}"
        )
    return seq_parallel_size


def group_layout(world_size: int, seq_parallel_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The ranks of every SP group and of every DP group (pure; no process group is created).

    Example:
        >>> group_layout(4, 2)
        ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    sp = check_seq_parallel_size(seq_parallel_size, world_size)
    seq_groups = [list(range(start, start + sp)) for start in range(0, world_size, sp)]
    data_groups = [list(range(offset, world_size, sp)) for offset in range(sp)]
    return seq_groups, data_groups


@dataclass(frozen=True)
class ParallelGroups:
    """This process's place in the DP x SP grid.

    Attributes:
        rank, world_size: global rank and world size (0 and 1 without ``torch.distributed``).
        seq_parallel_size, seq_parallel_rank: size of this rank's SP group and its rank in it.
        data_parallel_size, data_parallel_rank: number of SP groups (replicas) and this one's index.
        seq_group: the SP process group (None without ``torch.distributed``).
        data_group: the DP process group (None without ``torch.distributed``).
    """

    rank: int
    world_size: int
    seq_parallel_size: int
    seq_parallel_rank: int
    data_parallel_size: int
    data_parallel_rank: int
    seq_group: dist.ProcessGroup | None
    data_group: dist.ProcessGroup | None

    @property
    def is_seq_parallel(self) -> bool:
        return self.seq_parallel_size > 1


def build_groups(seq_parallel_size: int = 1) -> ParallelGroups:
    """Create the SP and DP process groups (collective: every rank must call it, in the same order).

    Without an initialized ``torch.distributed`` only ``seq_parallel_size=1`` is valid and the
    result describes a single process with no groups.

    Args:
        seq_parallel_size: ranks that share one sequence; must divide the world size.

    Returns:
        :class:`ParallelGroups` for this rank.
    """
    if not (dist.is_available() and dist.is_initialized()):
        check_seq_parallel_size(seq_parallel_size, 1)
        return ParallelGroups(0, 1, 1, 0, 1, 0, None, None)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    seq_layout, data_layout = group_layout(world_size, seq_parallel_size)
    seq_group, _ = dist.new_subgroups_by_enumeration(seq_layout)
    data_group, _ = dist.new_subgroups_by_enumeration(data_layout)
    return ParallelGroups(rank=rank, world_size=world_size,
                          seq_parallel_size=seq_parallel_size, seq_parallel_rank=rank % seq_parallel_size,
                          data_parallel_size=world_size // seq_parallel_size,
                          data_parallel_rank=rank // seq_parallel_size,
                          seq_group=seq_group, data_group=data_group)


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Initialize ``torch.distributed`` from torchrun's environment (idempotent); returns ``(rank, world_size)``.

    The backend defaults to NCCL when CUDA is present (and selects ``cuda:LOCAL_RANK``), else gloo.
    Without torchrun's variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) it
    does nothing and returns ``(0, 1)``.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("sparseattn: initialized %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()
