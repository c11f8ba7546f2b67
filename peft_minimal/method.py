"""How a PEFT method describes itself to the rest of the package.

Each method module (``lora``, ``adalora``, ``ia3``, ``adapters``, ``prefix``, ``prompt``, ``unipelt``, ``bitfit``) ends
with one ``METHOD = Method(...)`` (``prompt`` with two, ``PROMPT_TUNING`` and ``P_TUNING``):
everything that saving and loading (:mod:`peft_minimal.io`), counting and merging need to know
about it. :mod:`peft_minimal.registry` lists the methods, one line
each, so adding a method touches its own file and that list, never ``io.py``.

The description is data plus small functions, not a base class: a method stays a plain module
of functions and ``nn.Module`` wrappers that a reader can follow top to bottom.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

Shapes = dict[str, tuple[int, ...]]


def keep_all(config: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The default ``prune``: every adapter tensor is saved as it is."""
    return tensors


def refuse_merge(why: str) -> tuple[Callable, Callable, Callable]:
    """``merge``, ``unmerge`` and ``merge_and_unload`` for a method no weight matrix can absorb:
    each raises ``ValueError(why)``, so the error says what the method adds that merging cannot."""
    def merge(model: nn.Module) -> None:
        raise ValueError(why)

    def merge_and_unload(model: nn.Module) -> nn.Module:
        raise ValueError(why)

    return merge, merge, merge_and_unload


@dataclass(frozen=True)
class Method:
    """What the package needs to know about one PEFT method.

    ``shapes(model, config)`` is the contract between a config and the saved tensors: every key
    (a parameter name in ``model``) and shape the adapter holds, computed from the model and the
    config alone, before or after the method is added. Loading checks a file against it before
    touching the model, and counting adds it up.
    """

    peft_type: str                                  # "peft_type" in adapter_config.json: peft's name, or our own
    config_class: type                              # the method's dataclass config
    add: Callable[[nn.Module, Any], nn.Module]      # (model, config) -> model with the method, base frozen
    to_saved: Callable[[Any], dict]                 # config -> the keys of adapter_config.json
    from_saved: Callable[[dict], Any]               # those keys -> config (refusing options we lack)
    shapes: Callable[[nn.Module, Any], Shapes]      # (model, config) -> {tensor key: shape}
    markers: tuple[str, ...]                        # substrings that name the method's parameters
    merge: Callable[[nn.Module], None]
    unmerge: Callable[[nn.Module], None]
    merge_and_unload: Callable[[nn.Module], nn.Module]
    can_merge: bool = True                          # False: the three above raise, saying why
    prune: Callable[[Any, dict], dict] = keep_all   # tensors as saved (AdaLoRA drops pruned triplets)
    peft_loads: bool = True                         # Hugging Face peft loads what we save
    # How tensors are named in adapter_model.safetensors. peft prefixes a model tensor's name with
    # "base_model.model." (its tuner wraps the model) or, for prompt learning, "base_model." (the
    # model itself); ``pack`` turns the method's own tensors into what peft saves under its own keys
    # (prompt learning: one ``prompt_embeddings``), ``unpack`` turns those back into model names.
    saved_prefix: str = "base_model.model."
    pack: Callable[[Any, dict], dict] | None = None     # (config, own tensors) -> {file key: tensor}
    unpack: Callable[[dict], dict] | None = None        # {file key: tensor} -> {model name: tensor}

    def is_adapter_tensor(self, name: str) -> bool:
        return any(marker in name for marker in self.markers)

    def to_file(self, config: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors named as in the model (the method's and its modules to save) -> as in the file."""
        tensors = self.prune(config, tensors)
        own = {k: v for k, v in tensors.items() if self.is_adapter_tensor(k)}
        saved = {self.saved_prefix + k: v for k, v in tensors.items() if k not in own}
        if self.pack is None:
            return {**saved, **{self.saved_prefix + k: v for k, v in own.items()}}
        return {**saved, **self.pack(config, own)}

    def from_file(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`to_file`: file keys -> names in the model."""
        if self.unpack is not None:
            tensors = self.unpack(tensors)
        return {k.removeprefix(self.saved_prefix): v for k, v in tensors.items()}

    def parameter_count(self, model: nn.Module, config: Any) -> int:
        """Numbers the adapter trains (the modules to save not included), from ``shapes``."""
        return sum(math.prod(shape) for shape in self.shapes(model, config).values())
