"""Distributed layer (beside worker): a worker process's tensor-parallel group, its pipeline stage, their collectives.

A worker process calls `init_distributed` once, before it builds its model,
and hands the returned `TensorParallelGroup` to the model
(`load_model(..., tp=group)`); the parallel layers call its `all_reduce` and
`all_gather`. At world size 1 no process group exists at all: the group is
`SINGLE_RANK`, whose collectives return their input, and the models then
build today's unsplit layers, so the single-process path pays nothing.

With pipeline parallelism the world is `stages x tensor-parallel ranks`
(global rank = stage * tp_size + tp_rank); each stage's ranks form their own
tensor-parallel group, and a `PipelineStage` passes hidden states to the
same tensor-parallel rank of the next stage, point to point.

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


@dataclass
class PipelineStage:
    """This process's place in a pipeline of `num_stages` stages; hidden states go to the next stage's peer.

    Sends are asynchronous (the stage goes on to its next batch while one transfer is in flight); the
    tensor sent is kept until that send completes.
    """

    stage: int
    num_stages: int
    global_rank: int = 0
    tp_size: int = 1
    _in_flight: tuple[dist.Work, Tensor] | None = None

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def send_next(self, hidden: Tensor) -> None:
        """Start sending `hidden` to the next stage, after the previous send has completed."""
        self.wait_sent()
        hidden = hidden.contiguous()
        self._in_flight = (dist.isend(hidden, dst=self.global_rank + self.tp_size), hidden)

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The previous stage's hidden states for this step (blocks until they arrive)."""
        hidden = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(hidden, src=self.global_rank - self.tp_size)
        return hidden

    def wait_sent(self) -> None:
        if self._in_flight is not None:
            self._in_flight[0].wait()
            self._in_flight = None


SINGLE_STAGE = PipelineStage(stage=0, num_stages=1)


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
    return init_distributed(rank, world_size, 1, init_method, device, timeout_s)[0]


def init_distributed(rank: int, tp_size: int, num_stages: int, init_method: str | None, device: torch.device,
                     timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[TensorParallelGroup, PipelineStage]:
    """Join the world of `num_stages * tp_size` ranks as global `rank`: this rank's tensor-parallel group
    (within its stage) and its pipeline stage. Nothing is initialised for a world of one."""
    world_size = tp_size * num_stages
    if world_size == 1 and rank == 0:
        return SINGLE_RANK, SINGLE_STAGE
    if init_method is None:
        raise ValueError(f"{world_size} ranks need an init_method to meet at")
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
    stage, tp_rank = divmod(rank, tp_size)
    pipeline = PipelineStage(stage, num_stages, global_rank=rank, tp_size=tp_size)
    if num_stages == 1:
        return TensorParallelGroup(tp_rank, tp_size, group=dist.group.WORLD), pipeline
    group = None
    for other in range(num_stages):  # every rank creates every stage's group, in the same order
        members = list(range(other * tp_size, (other + 1) * tp_size))
        created = dist.new_group(members, timeout=timedelta(seconds=timeout_s)) if tp_size > 1 else None
        if other == stage:
            group = created
    return TensorParallelGroup(tp_rank, tp_size, group=group), pipeline


def destroy_tensor_parallel(group: TensorParallelGroup) -> None:
    """Leave the process group `group` belongs to; nothing to do at world size 1."""
    if group.group is not None and dist.is_initialized():
        dist.destroy_process_group()


def destroy_distributed(group: TensorParallelGroup, pipeline: PipelineStage) -> None:
    """Leave the world `init_distributed` joined; nothing to do for a world of one."""
    if (group.group is not None or pipeline.num_stages > 1) and dist.is_initialized():
        pipeline.wait_sent()
        dist.destroy_process_group()
