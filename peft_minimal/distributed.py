"""Scaling out: the same training loop in several processes, on PyTorch's own engine
(``torch.distributed`` and ``DistributedDataParallel``, DDP).

``torchrun`` starts one copy of a script per device and tells each who it is through
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ...).
:func:`setup` reads them and joins the process group: ``gloo`` on CPU, ``nccl`` on CUDA.
After that, :func:`peft_minimal.train.train` notices the group and does the rest::

    torchrun --nproc_per_node=2 script.py          (one process per device)
           │
     ┌─────┴─────────────────┐
   rank 0                  rank 1                  same seed: same base, same adapter, same order
   rows 0..7 of batch t    rows 8..15 of batch t   each rank a disjoint half of the global batch
   forward + backward      forward + backward
     └──── all-reduce: mean of the gradients ────┘ DDP, overlapped with backward
   clip, AdamW step        clip, AdamW step        identical gradients → identical weights
   AdaLoRA allocator       AdaLoRA allocator       scores from the synchronised gradients → same masks
     └──── all-reduce: loss, validation counts ──┘ every rank takes the same keep-best decision
   prints, saves           (silent)

Rules this follows (Hugging Face peft's users meet each one as an error; see the book's
appendix "Scaling out"):

* add the method and freeze the base *before* wrapping: DDP registers its gradient hooks on
  the parameters that require grad when it is built;
* the same seed on every rank, so the adapter's random init is the same everywhere (DDP also
  broadcasts rank 0's parameters when it wraps, which makes this a belt-and-braces rule);
* each rank reads a disjoint shard of every global batch (:class:`ShardedBatches`), so the
  averaged gradient is the gradient of the whole batch: the run is the one-process run,
  up to the order of floating-point sums;
* ``find_unused_parameters`` only where some trainable parameter stays out of the forward
  graph (:func:`unused_parameters`, e.g. a trainable module the model never calls): without
  it DDP stops at the next step with "Expected to have finished reduction in the prior
  iteration"; with it DDP walks the graph after every forward, a cost other runs need not pay;
* helpers, the allocator and saving see the unwrapped model (:func:`unwrap`); only rank 0
  prints and saves (:func:`is_main`).

Dropout draws its masks from each rank's own generator, all seeded alike, on half the
rows: a run with dropout is a faithful sample of the same training, not the same numbers.
"""
from __future__ import annotations

import inspect
import os
from typing import Iterator, Sized

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints and saves."""
    return rank() == 0


def setup(backend: str | None = None) -> torch.device:
    """Join the process group ``torchrun`` describes, and return this process's device.

    Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) nothing happens and the
    device is the usual one (``cuda`` when present). The backend is ``nccl`` on CUDA and
    ``gloo`` on CPU, unless given.
    """
    from .models import device as default_device

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return default_device()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return dev


def cleanup() -> None:
    """Leave the process group (call once, at the end of the script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatches:
    """A batch sampler that yields this rank's contiguous share of every batch of ``batches``.

    Every rank builds ``batches`` from the same seed, so all ranks agree on each global batch;
    rank ``r`` of ``w`` takes rows ``r·b/w .. (r+1)·b/w``. With ``w = 1`` it is ``batches``.
    """

    def __init__(self, batches: BatchSampler, rank: int, world_size: int) -> None:
        if batches.batch_size % world_size:
            raise ValueError(f"batch size {batches.batch_size} does not split over {world_size} processes: "
                             "the global batch must be a multiple of the number of processes")
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.share = batches.batch_size // world_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.rank * self.share:(self.rank + 1) * self.share]

    def __len__(self) -> int:
        return len(self.batches)


def sharded_loader(dataset: Dataset, batch_size: int, generator: torch.Generator,
                   shard: int | None = None, shards: int | None = None) -> DataLoader:
    """The training loop's loader (shuffled, last partial batch dropped, order from ``generator``)
    cut into shard ``shard`` of ``shards`` (default: this rank of the group) of each global batch.

    It draws from ``generator`` exactly as ``DataLoader(dataset, batch_size, shuffle=True,
    drop_last=True, generator=generator)`` does, so the global batches are the same.
    """
    batches = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=True)
    shard, shards = (rank() if shard is None else shard), (world_size() if shards is None else shards)
    return DataLoader(dataset, batch_sampler=ShardedBatches(batches, shard, shards), generator=generator)


def unused_parameters(model: nn.Module, inputs: dict) -> list[str]:
    """Names of trainable parameters that one forward on ``inputs`` leaves out of the graph.

    The probe runs under :func:`torch.random.fork_rng`, so it draws no number the run would see.
    """
    trainable = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        loss = model(**inputs).loss
    seen, stack, reached = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            reached.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(name for key, name in trainable.items() if key not in reached)


def wrap(model: nn.Module, dev: torch.device, inputs: dict | None = None) -> nn.Module:
    """``DistributedDataParallel(model)``, with ``find_unused_parameters`` only if a probe forward
    on ``inputs`` leaves some trainable parameter unused (see the module docstring)."""
    find_unused = bool(unused_parameters(model, inputs)) if inputs is not None else False
    # The buffers (position ids, ...) belong to the frozen base and are the same on every rank:
    # re-sending rank 0's before every forward would be wasted traffic (torch >= 2.13 names the
    # switch forward_sync_buffers, older releases broadcast_buffers).
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=find_unused, **no_buffer_sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper, or ``model`` itself."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _comm_device() -> torch.device:
    """Where collectives run: NCCL reduces CUDA tensors only, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the ranks (the value itself in one process)."""
    if not is_distributed():
        return value.item()
    value = value.detach().double().to(_comm_device())
    dist.all_reduce(value)
    return value.item() / world_size()


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a tensor over the ranks (a CPU copy of it in one process)."""
    if not is_distributed():
        return values.detach().cpu().clone()
    values = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(values)
    return values.cpu()


def gather_strided(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble a 1-d tensor whose rank ``r`` holds the items ``r, r + w, r + 2w, ...``."""
    if not is_distributed():
        return local
    width = -(-total // world_size())
    padded = torch.full((width,), -1, dtype=local.dtype, device=_comm_device())
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.stack(parts, 1).reshape(-1)[:total].cpu()


def strided_indices(n: int | Sized) -> range:
    """This rank's items of a data set of ``n`` items for evaluation: ``r, r + w, ...``."""
    n = n if isinstance(n, int) else len(n)
    return range(rank(), n, world_size())


def barrier() -> None:
    if is_distributed():
        dist.barrier()
