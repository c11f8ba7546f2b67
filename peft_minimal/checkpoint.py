"""Checkpoint and resume: a run cut off at step k goes on to the same final numbers.

A step of :func:`peft_minimal.train.train` depends on more than the weights. A checkpoint
holds all of it, so that on one machine the resumed run is the unbroken run, bit for bit::

    trainable weights      adapter and task head (the frozen base is rebuilt by the
                           script, from the same seed, before it resumes)
    optimizer, scheduler   AdamW's moments and step count; the learning-rate position
    the hooks' state       every object of ``Checkpointing.stateful``, and the object
                           behind ``after_step`` when the hook is one of its methods:
                           AdaLoRA's RankAllocator (score averages, rank pattern, history)
    data order             the loader generator's state at the start of the current pass
                           over the data, and how many batches of that pass were taken
    random generators      torch (CPU and CUDA), Python's and NumPy's: dropout's draws
    the record so far      losses, learning curve, best point and its weights

A hook that calls the allocator from a function of its own hides it from the loop: pass the
allocator in ``stateful`` then, or a resumed run starts its scores afresh.

Resuming replays the pass's order from its saved start and skips the batches already
taken, rather than saving the order itself: the loader draws from its generator when a pass
starts, and replaying those draws leaves the generator where the unbroken run has it.

Under ``torchrun`` every rank has the same generators (same seed, same draws), so rank 0
writes the one file and every rank reads it.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed

FILE = "checkpoint.pt"


@dataclass
class Checkpointing:
    """Where and how often :func:`~peft_minimal.train.train` saves; it resumes from
    ``directory`` whenever a checkpoint is there.

    ``every``: save after every ``every`` optimizer steps (0: only where the run stops, which
    is ``config.stop_at`` or the end). ``stateful``: more objects with ``state_dict()`` and
    ``load_state_dict()`` to save and restore, by name (see the module docstring)."""

    directory: str | Path
    every: int = 0
    stateful: dict[str, Any] = field(default_factory=dict)

    def objects(self, after_step: Callable | None) -> dict[str, Any]:
        """``stateful``, plus the object behind ``after_step`` if it is a stateful one's method."""
        found = dict(self.stateful)
        owner = getattr(after_step, "__self__", None)
        if hasattr(owner, "state_dict") and hasattr(owner, "load_state_dict") and \
                all(owner is not obj for obj in found.values()):
            found["after_step"] = owner
        return found

    @property
    def path(self) -> Path:
        return Path(self.directory) / FILE


def rng_states() -> dict[str, Any]:
    """The state of every random generator a training step may draw from."""
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(checkpointing: Checkpointing, state: dict[str, Any]) -> None:
    """Write ``state`` on rank 0, atomically (a run killed while saving keeps the last file)."""
    if distributed.is_main():
        path = checkpointing.path
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(state, partial)
        os.replace(partial, path)
    distributed.barrier()


def load(checkpointing: Checkpointing) -> dict[str, Any] | None:
    """The saved state, or ``None`` when there is none yet (a fresh run)."""
    path = checkpointing.path
    if not path.exists():
        return None
    # the file holds Python and NumPy generator states and the run's record, not only tensors
    return torch.load(path, map_location="cpu", weights_only=False)


def to_device(obj: Any, dev: torch.device) -> Any:
    """``obj`` with every tensor inside its dicts, lists and tuples moved to ``dev``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, dev) for v in obj)
    return obj
