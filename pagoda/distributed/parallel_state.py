"""Distributed layer (beside worker): the tensor-parallel process group of one worker process and its collectives.

A worker process calls `init_tensor_parallel` once, before it builds its
model, and hands the returned `TensorParallelGroup` to the model
(`load_model(..., tp=group)`); the parallel layers call its `all_reduce` and
`all_gather`. At world size 1 no process group exists at all: the group is
`SINGLE_RANK`, whose collectives return their input, and the models then
build today's unsplit layers, so the single-process path pays nothing.

The backend follows the device: NCCL for CUDA tensors, gloo otherwise. The
process-group timeout bounds every collective: a peer that stopped (SIGSTOP,
a hung kernel) makes the others' collectives raise after `timeout_s` instead
of torch's default of 30 minutes; a peer that died makes gloo raise at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's rank among `world_size` tensor-parallel ranks; `group` is None at world size 1."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in a tensor-parallel world of size {self.world_size}")
        if (self.world_size > 1) != (self.group is not None):
            raise ValueError("a process group is needed exactly when world_size > 1")

    def all_reduce(self, x: Tensor) -> Tensor:
        """The elementwise sum of `x` over the ranks, in place; `x` itself at world size 1."""
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        """Every rank's `x` concatenated along `dim` in rank order; `x` itself at world size 1."""
        if self.group is None:
            return x
        pieces = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(pieces, x.contiguous(), group=self.group)
        return torch.cat(pieces, dim=dim)

    def min_over_ranks(self, values: list[int], device: torch.device) -> list[int]:
        """Elementwise minimum of every rank's `values` (the same length on every rank); `values` at world size 1.

        How the ranks agree on per-rank outcomes (e.g. how many tokens of a load arrived) before rank 0
        answers for all of them. `device`: where the collective runs (a CUDA device under NCCL).
        """
        if self.group is None or not values:
            return values
        x = torch.tensor(values, dtype=torch.int64, device=device)
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return x.tolist()


SINGLE_RANK = TensorParallelGroup(rank=0, world_size=1)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for everything else (CPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_tensor_parallel(rank: int, world_size: int, init_method: str, device: torch.device,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> TensorParallelGroup:
    """Join the tensor-parallel group as `rank` (blocks until all `world_size` ranks have joined).

    `init_method`: where the ranks meet, e.g. "tcp://127.0.0.1:29500" (rank 0 listens there).
    `timeout_s`: the longest any collective may wait for a peer before raising.
    At world size 1 nothing is initialised and `SINGLE_RANK` comes back.
    """
    if world_size == 1 and rank == 0:
        return SINGLE_RANK
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if dist.is_initialized():
        raise ValueError("this process already belongs to a process group; call destroy_tensor_parallel first")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a tensor-parallel world of size {world_size}")
    backend = backend_for(device)
    # NCCL binds a communicator to one device; naming it here creates the communicator eagerly, at join time.
    device_id = device if device.type == "cuda" else None
    dist.init_process_group(backend, init_method=init_method, world_size=world_size, rank=rank,
                            timeout=timedelta(seconds=timeout_s), device_id=device_id)
    return TensorParallelGroup(rank, world_size, group=dist.group.WORLD)


def destroy_tensor_parallel(group: TensorParallelGroup) -> None:
    """Leave the process group `group` belongs to; nothing to do at world size 1."""
    if group.group is not None and dist.is_initialized():
        dist.destroy_process_group()
