"""Training on several processes (torchrun) and the epoch's sample order, which makes runs repeatable.

``torchrun --nproc_per_node N -m ...`` (or ``torchrun --no-python segflow train ...``) starts N copies of the
same command with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`setup` notices them and joins the process
group (NCCL on CUDA, Gloo on the CPU). Without them everything here is a single process of rank 0.

The order of an epoch and each sample's augmentation are pure functions of ``(seed, epoch, position)``:

* :class:`EpochSampler` draws the epoch's permutation from a generator seeded by ``(seed, epoch)`` and deals
  it to the ranks (rank r takes positions r, r + world, ...; as ``DistributedSampler``, the permutation is
  padded with its own start to a multiple of the world size); it can start after the batches a checkpoint
  already trained on;
* :class:`SeededDataset` runs each ``__getitem__`` under RNGs seeded by the sample's seed (which the
  sampler hands over with the index), then puts the process's RNG state back.

So a run resumed in the middle of an epoch sees the same remaining batches with the same augmentation, with
any ``num_workers`` (worker processes and their seeds play no part), and a sample at a given position of the
epoch is augmented the same way whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from segflow.inference.predictor import resolve_device


@dataclass(frozen=True)
class ProcessGroup:
    rank: int
    world_size: int
    device: torch.device
    owned: bool = False  # this module joined the process group (and leaves it in teardown)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_choice: str) -> ProcessGroup:
    """This process's place: under torchrun, join the process group and pick the GPU of ``LOCAL_RANK``."""
    device = resolve_device(device_choice)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ProcessGroup(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return ProcessGroup(dist.get_rank(), dist.get_world_size(), device, owned)


def teardown(group: ProcessGroup) -> None:
    if group.owned:
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Sum ``tensor`` over the processes, in place (a no-op in one process)."""
    if group.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_tensors(tensors: dict[str, torch.Tensor], group: ProcessGroup) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of every rank as ``{"rank<r>.<name>": tensor}`` (same names and shapes on each rank);
    every rank calls it, every rank gets the result."""
    if not group.distributed:
        return {f"rank0.{name}": value for name, value in tensors.items()}
    gathered = {}
    for name, value in sorted(tensors.items()):
        local = value.to(group.device)
        parts = [torch.empty_like(local) for _ in range(group.world_size)]
        dist.all_gather(parts, local)
        gathered.update({f"rank{rank}.{name}": part.cpu() for rank, part in enumerate(parts)})
    return gathered


def barrier(group: ProcessGroup) -> None:
    if group.distributed:
        dist.barrier()


def _mixed_seed(*words: int) -> int:
    return int(np.random.SeedSequence([w & 0xFFFFFFFFFFFFFFFF for w in words]).generate_state(1)[0])


def order_seed(seed: int, epoch: int) -> int:
    return _mixed_seed(seed, epoch, 0)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    return _mixed_seed(seed, epoch, 1, position)


class EpochSampler(Sampler):
    """This rank's share of the epoch as ``(sample seed, index)`` pairs; see the module docstring."""

    def __init__(self, num_samples: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.per_rank = -(-num_samples // world_size)
        self.epoch = 1
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate over ``epoch``, leaving out this rank's first ``start`` samples (already trained on)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # (sample seed, index)
        generator = torch.Generator().manual_seed(order_seed(self.seed, self.epoch))
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        total = self.per_rank * self.world_size
        order = (order * -(-total // len(order)))[:total]
        positions = range(self.rank, total, self.world_size)
        for position in list(positions)[self.start :]:
            yield sample_seed(self.seed, self.epoch, position), order[position]


class SeededDataset(Dataset):
    """``dataset[index]`` drawn under torch, numpy and python RNGs seeded by the sample seed it is given."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        seed, index = item
        with seeded(seed):
            return self.dataset[index]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNGs for the block, then restore them (the model's dropout must not see the data's draws)."""
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would reseed CUDA too
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
