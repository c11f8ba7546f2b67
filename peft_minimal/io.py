"""Save and load adapters in Hugging Face peft's on-disk layout.

A directory holds ``adapter_config.json`` (peft's config keys) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<parameter name>`` (or what the
method's ``saved_prefix``/``pack`` make of them: prompt learning saves ``prompt_embeddings`` and
``base_model.<head>``), exactly what ``PeftModel.save_pretrained`` writes. So ``peft.PeftModel.from_pretrained`` loads an
adapter saved here, and :func:`load_adapter` loads one saved by peft.

This file knows no method by name: each describes itself (its config keys, tensor shapes and
names) with a :class:`~peft_minimal.method.Method` listed in :mod:`peft_minimal.registry`.
A method peft lacks (bottleneck adapters) is saved the same way under a ``peft_type`` of our own,
which only :func:`load_adapter` reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .layers import is_inside
from .registry import method_named, method_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


# peft's PeftModelForSequenceClassification puts these heads in modules_to_save itself, and then
# expects their weights in the file: a SEQ_CLS adapter saved without them makes peft fail with
# KeyError 'base_model.model.classifier.weight'. So they are always saved for SEQ_CLS.
SEQ_CLS_HEADS = ("classifier", "score")


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def saved_modules(model: nn.Module, config) -> list[str]:
    """``config.modules_to_save`` plus, for a sequence classifier, its head (as peft does)."""
    modules = list(config.modules_to_save or [])
    if _task_type(model) == "SEQ_CLS":
        names = [n for n, _ in model.named_parameters()]
        modules += [h for h in SEQ_CLS_HEADS
                    if h not in modules and any(is_inside(n, [h]) for n in names)]
    return modules


def adapter_state_dict(model: nn.Module, modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors (and modules to save) under the names they have in ``model``."""
    method = method_of(model)
    if modules_to_save is None:
        modules_to_save = model.peft_config.modules_to_save
    return {k: v for k, v in model.state_dict().items()
            if method.is_adapter_tensor(k) or is_inside(k, modules_to_save)}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter of ``model`` (added by a ``peft_minimal`` method) to ``directory``."""
    method = method_of(model)
    config = model.peft_config
    modules = saved_modules(model, config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**method.to_saved(config), "modules_to_save": modules or None, "task_type": _task_type(model),
            "inference_mode": True,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    tensors = method.to_file(config, adapter_state_dict(model, modules))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory: its config and its tensors under their names in the model.
    Errors name the file and what is wrong with it."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter file missing: {path}")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    try:
        method = method_named(meta.get("peft_type"))
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from None
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
    return meta, method.from_file(tensors)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` (in place) and load its tensors.

    Every shape is checked before the model is touched, so a mismatch leaves it unchanged.
    """
    meta, tensors = read_adapter(directory)
    method = method_named(meta["peft_type"])
    config = method.from_saved(meta)
    expected = method.shapes(model, config)
    params = dict(model.named_parameters())
    for key, tensor in tensors.items():
        if key in expected:
            want = expected[key]
        elif key in params and is_inside(key, config.modules_to_save):
            want = tuple(params[key].shape)
        else:
            raise ValueError(f"adapter tensor {key!r} has no place in {type(model).__name__}")
        if tuple(tensor.shape) != want:
            raise ValueError(f"shape mismatch for {key}: adapter has {tuple(tensor.shape)}, model needs {want}")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"adapter file lacks {len(missing)} tensors the config implies, e.g. {missing[0]}")
    method.add(model, config)
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = model.get_parameter(key)
            target.copy_(tensor.to(target.dtype))
    return model
