"""Data parallelism for train.py under torchrun: N processes, one model copy each, one shared run.

    torchrun --standalone --nproc-per-node 2 train.py ...      (gloo on the CPU, nccl on GPUs)

Every rank holds the frozen base and the adapter; only the trainable tensors (LoRA matrices and
token rows, about 1.5M numbers by default) are synchronised: after each step's backward their
gradients are summed across ranks in one flat all-reduce. Each rank computes its micro-batches'
loss sum divided by the supervised tokens of the whole global window (counted across ranks), so
the sum is exactly the single-process gradient of the same rows: N ranks x batch b = 1 rank x N*b.
Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op for a single process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from common import hardware

# A rank waiting for the others (e.g. while rank 0 writes a checkpoint) gives up after this long.
TIMEOUT = datetime.timedelta(minutes=15)


class RankFailed(RuntimeError):
    """Another rank failed; its own message says why. One line for this rank."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # this rank's device; collectives run on it (nccl needs CUDA tensors)

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the adapter, checkpoints, metrics and plots."""
        return self.rank == 0


SINGLE_PROCESS = World()


def requested_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(requested_device: str | None) -> World:
    """Join the process group torchrun set up (if any): this rank, the world size, this rank's device
    (under torchrun on GPUs, the GPU of its local rank)."""
    size = requested_world_size()
    device = hardware.pick_device(requested_device)
    if size == 1:
        return World(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return World(dist.get_rank(), dist.get_world_size(), device)


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def all_or_none(world: World, stage: str) -> Iterator[None]:
    """The ranks go past this block together or not at all: a rank whose block raises still tells
    the others, who then stop with RankFailed instead of waiting for it in the next collective."""
    try:
        yield
    except BaseException:
        _any_failed(world, True)
        raise
    if _any_failed(world, False):
        raise RankFailed(f"rank {world.rank}: stopped because another rank failed during {stage}")


def _any_failed(world: World, failed: bool) -> bool:
    if world.size == 1:
        return failed
    flag = torch.tensor([float(failed)], device=world.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def sum_over_ranks(world: World, values: list[float]) -> list[float]:
    """Element-wise sums of each rank's numbers (float64, so token counts stay exact)."""
    if world.size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_gradients(world: World, parameters: list[torch.Tensor]) -> None:
    """Sum the trainable parameters' gradients across ranks, in place, in one all-reduce."""
    if world.size == 1:
        return
    grads = [parameter.grad if parameter.grad is not None else torch.zeros_like(parameter) for parameter in parameters]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for parameter, summed in zip(parameters, _unflatten_dense_tensors(flat, grads)):
        parameter.grad = summed


def same_start(world: World, parameters: list[torch.Tensor]) -> None:
    """Every rank starts from rank 0's trainable tensors (they are seeded alike; this makes sure)."""
    if world.size == 1:
        return
    for parameter in parameters:
        dist.broadcast(parameter.data, src=0)


def gather(world: World, value: object) -> list[object]:
    """Every rank's `value`, in rank order (on every rank)."""
    if world.size == 1:
        return [value]
    values: list[object] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def my_share(world: World, batch: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """This rank's rows of a batch every rank holds alike (rows rank, rank + size, ...); None when
    it has none: a batch of fewer rows than ranks leaves some ranks without."""
    if batch is None or world.rank >= len(next(iter(batch.values()))):
        return None
    return {key: value[world.rank::world.size] for key, value in batch.items()}


def my_rows(world: World, micro_batch: list[int], rows_per_rank: int) -> list[int]:
    """This rank's part of a global micro-batch of world.size x rows_per_rank rows (empty for a rank
    past the end of a short last batch)."""
    return micro_batch[world.rank * rows_per_rank:(world.rank + 1) * rows_per_rank]
