"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations
(Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", NeurIPS 2022, arXiv:2205.05638).

(IA)³ learns vectors that rescale activations, element-wise, in three places per block::

    attention:     softmax(Q (l_k ⊙ K)ᵀ / √d) (l_v ⊙ V)
    feed-forward:  (l_ff ⊙ γ(W₁ x)) W₂

so a key or value projection gets its *output* scaled, ``l ⊙ (W x + b)``, and the FFN's second
matrix its *input*, ``W₂ (l_ff ⊙ h)``. The vectors start at ones (the pretrained model) and
are the only trainable parameters: ``L (d_k + d_v + d_ff)`` numbers for ``L`` blocks.

Both scalings are linear maps, so they fold into the weights: ``diag(l) W`` (and ``l ⊙ b``) for
an output scale, ``W diag(l)`` for an input scale. Merged inference costs nothing extra.
Unmerging here restores the weights exactly from a kept copy; peft divides by ``l + 1e-8``,
which rounds twice (a multiply and a divide in floating point are not inverses) and loses the
weights entirely wherever a scale reached 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import (check_linear_targets, find_target_modules, freeze_base, merge_all, replace_module, target_linears,
                     unload, unmerge_all)
from .method import Method, Shapes

# The paper's places. A list entry "output.dense" would match BERT's attention.output.dense
# too (peft's default does, and peft's feed-forward check, a bare ``endswith``, then scales that
# layer's input as if it were W₂). The regex pins the FFN's output.dense: ``layer.<i>.output.dense``.
BERT_TARGETS = r".*\.(key|value)|.*\.layer\.\d+\.output\.dense"
BERT_FEEDFORWARD = r".*\.layer\.\d+\.output\.dense"
LLAMA_TARGETS = ["k_proj", "v_proj", "down_proj"]
LLAMA_FEEDFORWARD = ["down_proj"]


@dataclass
class IA3Config:
    """Where the vectors go. ``feedforward_modules`` (a subset of the targets) scale their input."""

    target_modules: str | list[str] = BERT_TARGETS
    feedforward_modules: str | list[str] = BERT_FEEDFORWARD
    modules_to_save: list[str] = field(default_factory=list)

    @classmethod
    def for_model(cls, model: nn.Module, modules_to_save: list[str] | None = None) -> "IA3Config":
        """The paper's places for a BERT-like or Llama-like model."""
        kind = getattr(getattr(model, "config", None), "model_type", None)
        places = {"bert": (BERT_TARGETS, BERT_FEEDFORWARD), "llama": (LLAMA_TARGETS, LLAMA_FEEDFORWARD)}
        if kind not in places:
            raise ValueError(f"no default (IA)³ places for model_type {kind!r}; pass target_modules "
                             f"and feedforward_modules to IA3Config")
        targets, feedforward = places[kind]
        return cls(targets, feedforward, list(modules_to_save or []))


class IA3Linear(nn.Module):
    """``nn.Linear`` whose output (``l ⊙ (W x + b)``) or, for a feed-forward layer, input
    (``W (l ⊙ x) + b``) is scaled by the trainable vector ``ia3_l`` (peft's shapes: ``(out, 1)``
    or ``(1, in)``)."""

    def __init__(self, base_layer: nn.Linear, is_feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        shape = (1, base_layer.in_features) if is_feedforward else (base_layer.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device, dtype=base_layer.weight.dtype))
        self.merged = False
        self._original: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer(x * scale)
        return self.base_layer(x) * scale

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the scale into the weight: ``W diag(l)`` (input) or ``diag(l) W``, ``l ⊙ b`` (output)."""
        if self.merged:
            return
        weight, bias = self.base_layer.weight, self.base_layer.bias
        self._original = (weight.detach().clone(), None if bias is None else bias.detach().clone())
        weight.mul_(self.ia3_l)  # (1, in) scales columns; (out, 1) scales rows
        if bias is not None and not self.is_feedforward:
            bias.mul_(self.ia3_l.flatten())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the kept weights, bit for bit."""
        if not self.merged:
            return
        weight, bias = self._original
        self.base_layer.weight.copy_(weight)
        if bias is not None:
            self.base_layer.bias.copy_(bias)
        self._original, self.merged = None, False

    def extra_repr(self) -> str:
        return f"scales={'input' if self.is_feedforward else 'output'}, merged={self.merged}"


def feedforward_names(model: nn.Module, config: IA3Config) -> set[str]:
    """Modules whose input is scaled; an empty list means none (only output scales)."""
    if isinstance(config.feedforward_modules, (list, tuple)) and not config.feedforward_modules:
        return set()
    try:
        return {name for name, _ in find_target_modules(model, config.feedforward_modules)}
    except ValueError as e:
        raise ValueError(f"feedforward_modules: {e}") from None


def add_ia3(model: nn.Module, config: IA3Config) -> nn.Module:
    """Wrap every target ``nn.Linear`` in an :class:`IA3Linear`, in place; only ``ia3_l``
    (and ``modules_to_save``) train. Bad configs are refused before anything changes."""
    found = find_target_modules(model, config.target_modules)
    check_linear_targets(found, IA3Linear, "(IA)³")
    feedforward = feedforward_names(model, config)
    outside = sorted(feedforward - {name for name, _ in found})
    if outside:
        raise ValueError(f"feedforward_modules must be among target_modules, but {outside[0]!r} "
                         f"(and {len(outside) - 1} more) is not a target")
    for name, module in found:
        replace_module(model, name, IA3Linear(module, is_feedforward=name in feedforward))
    freeze_base(model, ("ia3_",), config.modules_to_save)
    model.peft_config = config
    return model


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}


def merge(model: nn.Module) -> None:
    """Fold every vector into its weight: ``diag(l) W`` (and ``l ⊙ b``) or ``W diag(l)``."""
    merge_all(model, IA3Linear)


def unmerge(model: nn.Module) -> None:
    """Restore every merged weight, bit for bit, from its kept copy."""
    unmerge_all(model, IA3Linear)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every vector and put plain ``nn.Linear`` layers back (the kept copies go with them)."""
    return unload(model, IA3Linear)


# --- how the rest of the package sees (IA)³: peft's adapter_config.json keys and tensor shapes ---

def to_saved(config: IA3Config) -> dict:
    return {"peft_type": "IA3", "target_modules": config.target_modules,
            "feedforward_modules": config.feedforward_modules,
            "modules_to_save": config.modules_to_save or None, "init_ia3_weights": True, "fan_in_fan_out": False}


def from_saved(d: dict) -> IA3Config:
    return IA3Config(target_modules=d["target_modules"], feedforward_modules=d["feedforward_modules"],
                     modules_to_save=list(d.get("modules_to_save") or []))


def shapes(model: nn.Module, config: IA3Config) -> Shapes:
    """``ia3_l``: (1, in) on a feed-forward target (its input is scaled), else (out, 1)."""
    feedforward = feedforward_names(model, config)
    return {f"{name}.ia3_l": (1, linear.in_features) if name in feedforward else (linear.out_features, 1)
            for name, linear in target_linears(model, config.target_modules)}


METHOD = Method("IA3", IA3Config, add_ia3, to_saved, from_saved, shapes, ("ia3_",),
                merge, unmerge, merge_and_unload)
