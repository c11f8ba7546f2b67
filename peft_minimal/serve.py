"""One frozen base model, many saved adapters, swapped per request (multi-task serving).

PEFT's promise for many tasks is one copy of the big model plus one small adapter per task. A
:class:`MultiAdapterModel` loads N adapter directories written by :func:`~peft_minimal.io.save_adapter`
(same method, same config) onto one base model, once: the first through
:func:`~peft_minimal.io.load_adapter`, which adds the method's modules; every adapter's tensors (its
weights *and* its task head, all that the file holds) stay in memory on the model's device.
:meth:`~MultiAdapterModel.activate` copies one adapter's tensors into the live modules in place, so
a request for task B after task A costs one ``copy_`` per adapter tensor and no module is rebuilt::

    in memory, per task                       the live model (one copy)
    +---------------------+                   +-----------------------------------+
    | "news": {key: T...} | --activate(name)->| frozen base weights (never copied)|
    | "spam": {key: T...} |  T.copy_ into the | adapter modules  <- tensors       |
    | "bbc":  {key: T...} |  live parameter   | task head        <- tensors       |
    +---------------------+                   +-----------------------------------+

Every method of the registry works the same way, since the swap only needs the saved tensors'
names. The limits are the live model's: every adapter must have the same method, config and
tensor shapes (so one head shape, i.e. one number of labels), and a merged model cannot swap.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .io import load_adapter, read_adapter
from .registry import merge, method_named, unmerge


@dataclass(frozen=True)
class Adapter:
    """One saved adapter held in memory: its tensors are named as in the model."""

    name: str
    directory: Path
    peft_type: str
    config: Any
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read(name: str, directory: str | Path) -> Adapter:
    """An adapter directory (:func:`~peft_minimal.io.read_adapter` checks it) as an :class:`Adapter`."""
    meta, tensors = read_adapter(directory)
    return Adapter(name, Path(directory), meta["peft_type"], method_named(meta["peft_type"]).from_saved(meta), tensors)


def check_compatible(first: Adapter, other: Adapter) -> None:
    """Raise ``ValueError`` unless ``other`` fits the live modules built for ``first``."""
    if other.peft_type != first.peft_type:
        raise ValueError(f"all adapters must share one method: {first.name!r} is {first.peft_type}, "
                         f"{other.name!r} is {other.peft_type}")
    differ = [f.name for f in fields(first.config)
              if getattr(first.config, f.name) != getattr(other.config, f.name)]
    if differ:
        raise ValueError(f"adapters {first.name!r} and {other.name!r} differ in their config ({', '.join(differ)}): "
                         f"the live modules are built once, from {first.name!r}'s config")
    if first.tensors.keys() != other.tensors.keys():
        extra = sorted(first.tensors.keys() ^ other.tensors.keys())
        raise ValueError(f"adapters {first.name!r} and {other.name!r} hold different tensors, e.g. {extra[0]!r}")
    for key, tensor in first.tensors.items():
        if other.tensors[key].shape != tensor.shape:
            raise ValueError(f"shape mismatch for {key}: {first.name!r} has {tuple(tensor.shape)}, "
                             f"{other.name!r} has {tuple(other.tensors[key].shape)} (a task head with another "
                             f"number of labels cannot share the live head)")


def is_merged(model: nn.Module) -> bool:
    """True if any adapter layer of ``model`` has folded its update into the base weights."""
    return any(getattr(m, "merged", False) for m in model.modules())


class MultiAdapterModel:
    """``model`` with the adapters saved in ``directories`` (``{name: directory}``), the first active.

    ``model`` must be a plain base model (no adapter yet); it is put in eval mode. Every adapter is
    checked against the first before the model is touched. ``server(name, **inputs)`` activates
    ``name`` and runs the model."""

    def __init__(self, model: nn.Module, directories: Mapping[str, str | Path]) -> None:
        if not directories:
            raise ValueError("give at least one adapter directory, as {name: directory}")
        if hasattr(model, "peft_config"):
            raise ValueError("model already carries an adapter; pass the plain base model")
        adapters = [read(name, d) for name, d in directories.items()]
        for other in adapters[1:]:
            check_compatible(adapters[0], other)
        self.model = load_adapter(model, adapters[0].directory).eval()
        self.live = {key: model.get_parameter(key) for key in adapters[0].tensors}
        self.adapters = {a.name: a for a in adapters}
        self.to(next(model.parameters()).device)  # the stored tensors on the model's device and dtypes
        self.active = adapters[0].name

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @property
    def device(self) -> torch.device:
        return next(iter(self.live.values())).device

    @property
    def swap_bytes(self) -> int:
        """Bytes one :meth:`activate` copies (every adapter has the same shapes)."""
        return self.adapters[self.active].nbytes

    def to(self, device: str | torch.device) -> "MultiAdapterModel":
        """Move the model and every stored adapter, so that a swap copies within one device."""
        self.model.to(device)
        for adapter in self.adapters.values():
            for key, tensor in adapter.tensors.items():
                adapter.tensors[key] = tensor.to(self.live[key].device, self.live[key].dtype)
        return self

    @torch.no_grad()
    def activate(self, name: str) -> nn.Module:
        """Copy adapter ``name``'s tensors into the live parameters, in place; returns the model."""
        if name not in self.adapters:
            raise ValueError(f"no adapter named {name!r}; known: {', '.join(map(repr, self.names))}")
        if is_merged(self.model):
            raise RuntimeError(f"adapter {self.active!r} is merged into the base weights: unmerge() before "
                               f"activating {name!r}, or the swap would leave {self.active!r}'s update in them")
        for key, tensor in self.adapters[name].tensors.items():
            self.live[key].copy_(tensor)
        self.active = name
        return self.model

    def __call__(self, name: str, **inputs) -> Any:
        return self.activate(name)(**inputs)

    def merge(self) -> None:
        """Fold the active adapter into the base weights (the method must merge: LoRA, (IA)³ ...)."""
        merge(self.model)

    def unmerge(self) -> None:
        unmerge(self.model)


def swap_seconds(server: MultiAdapterModel, names: Sequence[str] | None = None, reps: int = 20,
                 warmup: int = 2) -> float:
    """Median seconds of one :meth:`~MultiAdapterModel.activate`, cycling through ``names`` (default
    all; at least two, so every timed call swaps), synchronised on CUDA; leaves the last one active."""
    names = list(names if names is not None else server.names)
    if len(names) < 2 or len(set(names)) != len(names):
        raise ValueError(f"timing a swap needs two or more distinct adapters to cycle through; got {names}")
    sync = torch.cuda.synchronize if server.device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + reps):
        name = names[i % len(names)]
        sync()
        start = time.perf_counter()
        server.activate(name)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)
