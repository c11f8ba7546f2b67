"""Every method the package can save, load, count and merge: one line each.

A method module describes itself with a :class:`~peft_minimal.method.Method` (``METHOD``);
adding a method is that description plus one line in ``METHODS`` below.
The functions here work on any model that carries a method's config as ``model.peft_config``.
"""
from __future__ import annotations

from torch import nn

from . import adalora, adapters, bitfit, ia3, lora, prefix, prompt, unipelt
from .method import Method

METHODS: dict[str, Method] = {m.peft_type: m for m in (
    lora.METHOD,
    adalora.METHOD,
    ia3.METHOD,
    adapters.METHOD,
    prefix.METHOD,
    prompt.PROMPT_TUNING,
    prompt.P_TUNING,
    unipelt.METHOD,
    bitfit.METHOD,
)}


def method_named(peft_type: str | None) -> Method:
    """The method saved under ``peft_type`` (the ``"peft_type"`` of adapter_config.json)."""
    if peft_type not in METHODS:
        raise ValueError(f"peft_type {peft_type!r} is not one of {sorted(METHODS)}")
    return METHODS[peft_type]


def method_of(model: nn.Module) -> Method:
    """The method added to ``model``, read from the type of ``model.peft_config``."""
    config = getattr(model, "peft_config", None)
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    raise ValueError("model has no peft_minimal adapter (add one with e.g. lora.add_lora)")


def count_adapter_parameters(model: nn.Module) -> int:
    """Numbers the adapter of ``model`` trains (its modules to save not included). The file can
    hold fewer: a prefix trained through its MLP, and P-tuning's prompt encoder, are saved as
    the prefix or prompt they compute (peft's layout), not as the network that computes it."""
    return method_of(model).parameter_count(model, model.peft_config)


def merge(model: nn.Module) -> None:
    """Fold the adapter into the base weights, if its method can (a bottleneck adapter cannot)."""
    method_of(model).merge(model)


def unmerge(model: nn.Module) -> None:
    """Undo :func:`merge`."""
    method_of(model).unmerge(model)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge and put the plain base layers back: an ordinary model again."""
    return method_of(model).merge_and_unload(model)
