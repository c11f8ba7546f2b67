"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021, arXiv:2106.09685).

A frozen linear layer ``W`` gets a trainable low-rank update::

    h = W x + (alpha / r) * B A x        A: r x in  (Kaiming-uniform),  B: out x r  (zeros)

so at initialisation ``B A = 0`` and the model is exactly the pretrained one. rsLoRA
(Kalajdzievski, 2023) uses ``alpha / sqrt(r)`` so that the update's scale does not shrink
as ``r`` grows. ``merge`` folds ``scaling * B A`` into ``W`` for zero-cost inference.

Names follow loralib and Hugging Face peft (``lora_A``, ``lora_B``, ``scaling``,
``base_layer``), so a saved adapter has peft's keys and peft can load it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import (check_linear_targets, find_target_modules, freeze_base, merge_all, replace_module, target_linears,
                     unload, unmerge_all)
from .method import Method, Shapes


@dataclass
class LoRAConfig:
    """Hyper-parameters of LoRA; defaults are peft's (``r=8``, ``lora_alpha=8``, no dropout)."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: str | list[str] = field(default_factory=lambda: ["query", "value"])
    use_rslora: bool = False
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a trainable rank-``r`` update ``scaling * B A``; the base stays frozen."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # models that read ``.weight.dtype`` of a projection keep working
        return self.base_layer.weight

    def reset_lora_parameters(self) -> None:
        """A as ``nn.Linear`` would initialise it (Kaiming-uniform, a=sqrt(5)); B = 0 so BA = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update ``scaling * B A`` as a full ``out x in`` matrix."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # Dropout acts on the LoRA branch only: the frozen path must see the input unchanged.
        h = self.lora_A(self.lora_dropout(x))
        # result + scaling * h B^T in one GEMM (addmm): no (..., d_out) temporaries for the scaling and
        # the sum, forward or backward, which is most of the time the branch adds beyond its thin matmuls.
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.weight.t(),
                          alpha=self.scaling)
        return out.view(result.shape)

    def merge(self) -> None:
        if self.merged:
            return
        delta = self.delta_weight()
        if not torch.isfinite(delta).all():
            raise ValueError("LoRA update has NaN/Inf entries; refusing to merge it into the base weight")
        self.base_layer.weight.data += delta.to(self.base_layer.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight.data -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Wrap every target ``nn.Linear`` of ``model`` in a :class:`LoRALinear`, in place.

    Every base parameter is frozen; ``config.modules_to_save`` (e.g. ``["classifier"]``)
    stay trainable. All targets are checked before any is changed, so a bad config
    leaves the model as it was.
    """
    found = find_target_modules(model, config.target_modules)
    check_linear_targets(found, LoRALinear, "LoRA")
    for name, module in found:
        replace_module(model, name, LoRALinear(module, config.r, config.alpha, config.dropout,
                                               config.use_rslora))
    freeze_base(model, ("lora_",), config.modules_to_save)
    model.peft_config = config
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge(model: nn.Module) -> None:
    """Fold every LoRA update into its base weight (forward then skips the LoRA branch)."""
    merge_all(model, LoRALinear)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged LoRA update again, restoring the pretrained weights."""
    unmerge_all(model, LoRALinear)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge and put plain ``nn.Linear`` layers back: the result is an ordinary model."""
    return unload(model, LoRALinear)


# --- how the rest of the package sees LoRA: peft's adapter_config.json keys and tensor shapes ---

def to_saved(config: LoRAConfig) -> dict:
    return {"peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha,
            "lora_dropout": config.dropout, "target_modules": config.target_modules,
            "use_rslora": config.use_rslora, "modules_to_save": config.modules_to_save or None,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True}


def from_saved(d: dict) -> LoRAConfig:
    unsupported = {k: d[k] for k in ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform")
                   if d.get(k)}
    if unsupported or d.get("bias", "none") != "none":
        raise ValueError(f"this LoRA adapter uses peft options peft_minimal does not implement: {unsupported}")
    return LoRAConfig(r=d["r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
                      target_modules=d["target_modules"], use_rslora=d.get("use_rslora", False),
                      modules_to_save=list(d.get("modules_to_save") or []))


def shapes(model: nn.Module, config: LoRAConfig) -> Shapes:
    """``lora_A``: r x in and ``lora_B``: out x r per target, as peft names them (nn.Linear weights)."""
    found = {}
    for name, linear in target_linears(model, config.target_modules):
        found[f"{name}.lora_A.weight"] = (config.r, linear.in_features)
        found[f"{name}.lora_B.weight"] = (linear.out_features, config.r)
    return found


METHOD = Method("LORA", LoRAConfig, add_lora, to_saved, from_saved, shapes, ("lora_",),
                merge, unmerge, merge_and_unload)
