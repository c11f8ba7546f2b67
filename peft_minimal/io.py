"""Save and load adapters in Hugging Face peft's on-disk layout.

A directory holds ``adapter_config.json`` (peft's config keys) and
``adapter_model.safetensors`` whose keys are ``base_model.model.<parameter name>``, exactly
what ``PeftModel.save_pretrained`` writes. So ``peft.PeftModel.from_pretrained`` loads an
adapter saved here, and :func:`load_adapter` loads one saved by peft.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import adalora, ia3, lora
from .layers import find_target_modules, is_inside

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
ADAPTER_MARKERS = ("lora_", "ia3_")


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


def _lora_to_peft(config: lora.LoRAConfig) -> dict:
    return {"peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha,
            "lora_dropout": config.dropout, "target_modules": config.target_modules,
            "use_rslora": config.use_rslora, "modules_to_save": config.modules_to_save or None,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True}


def _lora_from_peft(d: dict) -> lora.LoRAConfig:
    unsupported = {k: d[k] for k in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if d.get(k)}
    if unsupported or d.get("bias", "none") != "none":
        raise ValueError(f"this LoRA adapter uses peft options peft_minimal does not implement: {unsupported}")
    return lora.LoRAConfig(r=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
                           target_modules=d["target_modules"], use_rslora=d.get("use_rslora", False),
                           modules_to_save=list(d.get("modules_to_save") or []))


def _lora_shapes(model: nn.Module, config: lora.LoRAConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, module in find_target_modules(model, config.target_modules):
        if not isinstance(module, nn.Linear):
            raise TypeError(f"adapter targets {name!r}, which is {type(module).__name__}, not nn.Linear")
        shapes[f"{name}.lora_A.weight"] = (config.r, module.in_features)
        shapes[f"{name}.lora_B.weight"] = (module.out_features, config.r)
    return shapes


def _adalora_to_peft(config: adalora.AdaLoRAConfig) -> dict:
    return {"peft_type": "ADALORA", "init_r": config.init_r, "target_r": config.target_r,
            "lora_alpha": config.alpha, "lora_dropout": config.dropout, "tinit": config.tinit,
            "tfinal": config.tfinal, "deltaT": config.delta_t, "beta1": config.beta1, "beta2": config.beta2,
            "orth_reg_weight": config.orth_reg_weight, "total_step": config.total_step,
            "target_modules": config.target_modules, "modules_to_save": config.modules_to_save or None,
            "rank_pattern": config.rank_pattern, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True}


def _adalora_from_peft(d: dict) -> adalora.AdaLoRAConfig:
    return adalora.AdaLoRAConfig(
        init_r=d["init_r"], target_r=d["target_r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
        tinit=d.get("tinit", 0), tfinal=d.get("tfinal", 0), delta_t=d.get("deltaT", 1),
        beta1=d.get("beta1", 0.85), beta2=d.get("beta2", 0.85), orth_reg_weight=d.get("orth_reg_weight", 0.5),
        total_step=d["total_step"], target_modules=d["target_modules"],
        modules_to_save=list(d.get("modules_to_save") or []), rank_pattern=d.get("rank_pattern"))


def _adalora_shapes(model: nn.Module, config: adalora.AdaLoRAConfig) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, module in find_target_modules(model, config.target_modules):
        if not isinstance(module, nn.Linear):
            raise TypeError(f"adapter targets {name!r}, which is {type(module).__name__}, not nn.Linear")
        pattern = (config.rank_pattern or {}).get(f"{name}.lora_E")
        r = config.init_r if pattern is None else sum(pattern)
        shapes.update({f"{name}.lora_A": (r, module.in_features), f"{name}.lora_E": (r, 1),
                       f"{name}.lora_B": (module.out_features, r)})
    return shapes


def _adalora_prune(config: adalora.AdaLoRAConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep only the surviving triplets, as peft's ``resize_state_dict_by_rank_pattern``."""
    tensors = dict(tensors)
    for key, pattern in (config.rank_pattern or {}).items():
        layer, keep = key.removesuffix(".lora_E"), torch.tensor(pattern, dtype=torch.bool)
        if tensors[f"{layer}.lora_E"].shape[0] != len(pattern):
            continue  # already at its final rank (a loaded adapter)
        for part in ("lora_A", "lora_E"):
            tensors[f"{layer}.{part}"] = tensors[f"{layer}.{part}"][keep]
        tensors[f"{layer}.lora_B"] = tensors[f"{layer}.lora_B"][:, keep]
    return tensors


def _ia3_to_peft(config: ia3.IA3Config) -> dict:
    return {"peft_type": "IA3", "target_modules": config.target_modules,
            "feedforward_modules": config.feedforward_modules,
            "modules_to_save": config.modules_to_save or None, "init_ia3_weights": True, "fan_in_fan_out": False}


def _ia3_from_peft(d: dict) -> ia3.IA3Config:
    return ia3.IA3Config(target_modules=d["target_modules"], feedforward_modules=d["feedforward_modules"],
                         modules_to_save=list(d.get("modules_to_save") or []))


def _ia3_shapes(model: nn.Module, config: ia3.IA3Config) -> dict[str, tuple[int, ...]]:
    feedforward = ia3.feedforward_names(model, config)
    shapes = {}
    for name, module in find_target_modules(model, config.target_modules):
        if not isinstance(module, nn.Linear):
            raise TypeError(f"adapter targets {name!r}, which is {type(module).__name__}, not nn.Linear")
        shapes[f"{name}.ia3_l"] = (1, module.in_features) if name in feedforward else (module.out_features, 1)
    return shapes


@dataclass(frozen=True)
class Method:
    """How one method's adapter maps to peft's files."""

    to_peft: Callable        # config -> peft's adapter_config.json dict
    from_peft: Callable      # that dict -> config
    shapes: Callable         # (model, config) -> {tensor name: shape} the adapter must have
    add: Callable            # (model, config) -> model with the method added
    prune: Callable = lambda config, tensors: tensors  # tensors as saved


METHODS = {"LORA": Method(_lora_to_peft, _lora_from_peft, _lora_shapes, lora.add_lora),
           "ADALORA": Method(_adalora_to_peft, _adalora_from_peft, _adalora_shapes, adalora.add_adalora,
                             _adalora_prune),
           "IA3": Method(_ia3_to_peft, _ia3_from_peft, _ia3_shapes, ia3.add_ia3)}
CONFIG_TYPES = {lora.LoRAConfig: "LORA", adalora.AdaLoRAConfig: "ADALORA", ia3.IA3Config: "IA3"}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (and modules to save) under the names they have in ``model``."""
    modules_to_save = getattr(getattr(model, "peft_config", None), "modules_to_save", [])
    return {k: v for k, v in model.state_dict().items()
            if any(m in k for m in ADAPTER_MARKERS) or is_inside(k, modules_to_save)}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapter of ``model`` (added by a ``peft_minimal`` method) to ``directory``."""
    config = getattr(model, "peft_config", None)
    if type(config) not in CONFIG_TYPES:
        raise ValueError("model has no peft_minimal adapter to save (add one with e.g. lora.add_lora)")
    method = METHODS[CONFIG_TYPES[type(config)]]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {**method.to_peft(config), "task_type": _task_type(model), "inference_mode": True,
            "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None)}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    tensors = method.prune(config, adapter_state_dict(model))
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    return directory


def read_adapter(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an adapter directory; errors name the file and what is wrong with it."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"adapter file missing: {path}")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    if meta.get("peft_type") not in METHODS:
        raise ValueError(f"{config_path}: peft_type {meta.get('peft_type')!r} is not one of {sorted(METHODS)}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {e}") from e
    return meta, {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Add the adapter saved in ``directory`` to ``model`` (in place) and load its tensors.

    Every shape is checked before the model is touched, so a mismatch leaves it unchanged.
    """
    meta, tensors = read_adapter(directory)
    method = METHODS[meta["peft_type"]]
    config = method.from_peft(meta)
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
