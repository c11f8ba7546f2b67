"""BitFit: train only the bias terms (Ben Zaken, Ravfogel and Goldberg, "BitFit: Simple
Parameter-efficient Fine-tuning for Transformer-based Masked Language-models", ACL 2022,
arXiv:2106.10199).

BitFit adds nothing. It freezes every weight matrix and LayerNorm gain and trains the biases
that are already there (with the new task head), §3 of the paper::

    y = W x + b          W frozen (pretrained), b trained
    LN(h) = γ ⊙ ĥ + β    γ frozen, β trained

Under 0.1% of the parameters of BERT-base or BERT-large; on MiniLM (6 layers, hidden 384) every
encoder bias is 25,344 numbers plus the embeddings' and the pooler's. The paper's §4 also
trains only two of them, the query bias and the bias of the FFN's first (expanding) matrix,
``b_q`` and ``b_m2`` in its notation: :meth:`BitFitConfig.query_and_intermediate` selects those.

Nothing is added, so nothing needs merging: the trained biases *are* the model's biases
(``merge`` is a no-op and ``merge_and_unload`` returns the model). Chapter 1's ``r = 0``
truncation (every matrix back at ``W_0``, everything else fine-tuned) is its cousin: BitFit
trains the biases alone instead of keeping what full fine-tuning left in them. peft has no
BitFit, so the saved layout is the package's own (``peft_type`` ``"BITFIT"``): the trained
biases under their names in the model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import is_inside
from .method import Method, Shapes

ALL_BIASES = r".*\.bias"


@dataclass
class BitFitConfig:
    """Which biases train: ``bias_terms`` is a regex that must match a parameter's whole name
    (default: every bias). ``modules_to_save`` trains whole modules too (the task head)."""

    bias_terms: str = ALL_BIASES
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            re.compile(self.bias_terms)
        except re.error as e:
            raise ValueError(f"bias_terms must be a regular expression, got {self.bias_terms!r}: {e}") from None

    @classmethod
    def query_and_intermediate(cls, modules_to_save: list[str] | None = None) -> "BitFitConfig":
        """The paper's §4 subset on BERT: the query bias and the FFN's first bias (b_q, b_m2)."""
        return cls(r".*\.(attention\.self\.query|intermediate\.dense)\.bias", list(modules_to_save or []))


def trained_biases(model: nn.Module, config: BitFitConfig) -> dict[str, nn.Parameter]:
    """The biases ``config`` selects, outside the modules to save (those train whole anyway)."""
    pattern = re.compile(config.bias_terms)
    return {name: p for name, p in model.named_parameters()
            if name.endswith("bias") and pattern.fullmatch(name) and not is_inside(name, config.modules_to_save)}


def add_bitfit(model: nn.Module, config: BitFitConfig) -> nn.Module:
    """Freeze everything except the selected biases and the modules to save, in place."""
    biases = trained_biases(model, config)
    if not biases:
        raise ValueError(f"bias_terms {config.bias_terms!r} matches no bias of {type(model).__name__} "
                         f"(some models, e.g. Llama, have no biases in their linear layers)")
    for name, param in model.named_parameters():
        param.requires_grad = name in biases or is_inside(name, config.modules_to_save)
    model.peft_config = config
    return model


def merge(model: nn.Module) -> None:
    """Nothing to merge: the trained biases are the model's own parameters."""


def merge_and_unload(model: nn.Module) -> nn.Module:
    """The model itself: BitFit adds no layer to take away."""
    return model


# --- how the rest of the package sees BitFit: our own saved layout (peft has no BitFit) ---

def to_saved(config: BitFitConfig) -> dict:
    return {"peft_type": "BITFIT", "bias_terms": config.bias_terms, "modules_to_save": config.modules_to_save or None}


def from_saved(d: dict) -> BitFitConfig:
    return BitFitConfig(d["bias_terms"], list(d.get("modules_to_save") or []))


def shapes(model: nn.Module, config: BitFitConfig) -> Shapes:
    return {name: tuple(p.shape) for name, p in trained_biases(model, config).items()}


def saved_biases(config: BitFitConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whose name has "bias" reaches here; keep the selected biases and the modules to save."""
    pattern = re.compile(config.bias_terms)
    return {k: v for k, v in tensors.items() if pattern.fullmatch(k) or is_inside(k, config.modules_to_save)}


METHOD = Method("BITFIT", BitFitConfig, add_bitfit, to_saved, from_saved, shapes, ("bias",),
                merge, merge, merge_and_unload, prune=saved_biases, peft_loads=False)
