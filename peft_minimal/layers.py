"""Shared machinery for every PEFT method: find target modules, swap them, freeze, count.

Target matching follows Hugging Face peft (``peft.tuners.tuners_utils.check_target_module_exists``)
so that a config written for peft selects the same modules here:

* a **list** entry matches a module whose full name equals it or ends with ``"." + entry``;
* a **string** is a regular expression that must match the full module name.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

from torch import nn

def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """True if the module called ``name`` is selected by ``target_modules``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_target_modules(
    model: nn.Module, target_modules: str | Sequence[str], exclude: Iterable[str] = ()
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` for every module selected by ``target_modules``.

    Raises ``ValueError`` naming the spec when nothing matches, because a silent no-op
    would train only the head and look like a (bad) PEFT result.
    """
    if isinstance(target_modules, (list, tuple)) and not target_modules:
        raise ValueError("target_modules is empty: name at least one module, e.g. ['query', 'value']")
    exclude = tuple(exclude)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name and matches_target(name, target_modules) and not matches_target(name, exclude)
    ]
    if not found:
        some = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__}; "
            f"its Linear layers are named {some}"
        )
    return found


def target_linears(model: nn.Module, target_modules: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    """``(name, nn.Linear)`` for every target; a wrapped target (LoRA, IA3, ...) gives its ``base_layer``,
    so an adapter's tensor shapes can be worked out before or after the method is added."""
    found = []
    for name, module in find_target_modules(model, target_modules):
        linear = getattr(module, "base_layer", module)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"adapter targets {name!r}, which is {type(module).__name__}, not nn.Linear")
        found.append((name, linear))
    return found


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    """Put ``new_module`` where the submodule ``name`` is (``a.b.c`` -> ``a.b`` gets ``c``)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


def freeze_base(model: nn.Module, adapter_prefixes: Sequence[str], modules_to_save: Sequence[str] = ()) -> None:
    """Train only parameters whose name contains an adapter prefix (``lora_``) or a module to save.

    ``modules_to_save`` plays the role of peft's option of the same name: the task head
    (``classifier``, ``score``) is new and random, so it must train; it is matched like a
    target (exact name or dotted suffix) against each parameter's module.
    """
    for name, param in model.named_parameters():
        is_adapter = any(p in name for p in adapter_prefixes)
        param.requires_grad = is_adapter or is_inside(name, modules_to_save)


def is_inside(param_name: str, modules: Sequence[str]) -> bool:
    """True if some module enclosing ``param_name`` is selected by ``modules`` (list matching)."""
    parts = param_name.split(".")[:-1]
    return bool(modules) and any(
        matches_target(".".join(parts[:i]), list(modules)) for i in range(1, len(parts) + 1)
    )


def merge_all(model: nn.Module, wrapper: type) -> None:
    """Call ``merge()`` on every ``wrapper`` layer of ``model``."""
    for module in model.modules():
        if isinstance(module, wrapper):
            module.merge()


def unmerge_all(model: nn.Module, wrapper: type) -> None:
    """Call ``unmerge()`` on every ``wrapper`` layer of ``model``."""
    for module in model.modules():
        if isinstance(module, wrapper):
            module.unmerge()


def unload(model: nn.Module, wrapper: type) -> nn.Module:
    """Merge every ``wrapper`` layer and put its ``base_layer`` back: an ordinary model again."""
    for name, module in list(model.named_modules()):
        if isinstance(module, wrapper):
            module.merge()
            replace_module(model, name, module.base_layer)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return ``(trainable, total)`` parameter counts, as peft's ``get_nb_trainable_parameters``."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def check_linear_targets(found: list[tuple[str, nn.Module]], wrapper: type, method: str) -> None:
    """Refuse targets that are already wrapped or are not ``nn.Linear``, before changing anything."""
    for name, module in found:
        if isinstance(module, wrapper):
            raise ValueError(f"{name} already has {method}; adding it twice to one layer is not supported")
        if type(module) is not nn.Linear:
            raise TypeError(
                f"{method} wraps nn.Linear layers, but target {name!r} is {type(module).__name__}; "
                f"name its Linear sublayers instead"
            )
