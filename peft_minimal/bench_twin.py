"""Contenders for the benchmark: our model as it trains, and Hugging Face ``peft``'s model of the
same method holding the same weights (its "twin"), so that a timing compares implementations, not
initialisations.

::

    our model ──config──► peft.get_peft_model(plain base, peft config)
        │                          │
        └──trainable tensors──────►┘  copied by name; max |logits - logits'| checked

peft 0.21.2's PREFIX_TUNING forward refuses BERT under transformers >= 5.24 (it looks for a
``past_key_values`` argument, now ``cache``), so :class:`PeftPrefixForward` replays its
``_prefix_tuning_forward`` with peft's own prefix cache, as ``tests/test_prefix.py`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from . import adalora, ia3, lora, prefix, prompt
from .bench import adalora_step, training_step


@dataclass
class Contender:
    """A model and how it trains: AdaLoRA adds a penalty to the loss and runs its allocator after
    the optimizer step (``allocate(t)``, ``t`` = steps taken); peft's AdaLoRA adds its penalty inside
    its forward, so its ``penalty`` is None."""

    model: nn.Module
    penalty: Callable[[], torch.Tensor] | None = None
    allocate: Callable[[int], None] | None = None

    def loss(self, inputs: dict) -> torch.Tensor:
        loss = self.model(**inputs).loss
        return loss if self.penalty is None else loss + self.penalty()

    def step(self, inputs: dict) -> Callable[[], None]:
        if self.allocate is None and self.penalty is None:
            return training_step(self.model, inputs)
        return adalora_step(self.model, inputs, self.allocate or (lambda t: None), self.penalty)


def ours(model: nn.Module) -> Contender:
    """Our model as it trains; AdaLoRA's steps are counted from ``tinit`` so every one prunes."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, adalora.AdaLoRAConfig):
        return Contender(model)
    allocator = adalora.RankAllocator(model, config)
    return Contender(model, lambda: config.orth_reg_weight * adalora.orthogonal_regularization(model),
                     lambda t: allocator.update_and_allocate(model, config.tinit + t))


# --- Hugging Face peft's model for one of ours: the same config, the same weights ---

def peft_config(config) -> object:
    """peft's config for our ``config`` (every field that changes the computation), SEQ_CLS."""
    import peft

    seq_cls = {"task_type": "SEQ_CLS"}
    if isinstance(config, lora.LoRAConfig):
        return peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=config.target_modules, use_rslora=config.use_rslora,
                               modules_to_save=list(config.modules_to_save), **seq_cls)
    if isinstance(config, adalora.AdaLoRAConfig):
        return peft.AdaLoraConfig(init_r=config.init_r, target_r=config.target_r, lora_alpha=config.alpha,
                                  lora_dropout=config.dropout, tinit=config.tinit, tfinal=config.tfinal,
                                  deltaT=config.delta_t, beta1=config.beta1, beta2=config.beta2,
                                  orth_reg_weight=config.orth_reg_weight, total_step=config.total_step,
                                  target_modules=config.target_modules,
                                  modules_to_save=list(config.modules_to_save), **seq_cls)
    if isinstance(config, ia3.IA3Config):
        return peft.IA3Config(target_modules=config.target_modules, feedforward_modules=config.feedforward_modules,
                               modules_to_save=list(config.modules_to_save), **seq_cls)
    if isinstance(config, prefix.PrefixTuningConfig):
        return peft.PrefixTuningConfig(num_virtual_tokens=config.num_virtual_tokens,
                                       prefix_projection=config.prefix_projection,
                                       encoder_hidden_size=config.encoder_hidden_size, **seq_cls)
    if isinstance(config, prompt.PromptTuningConfig):
        return peft.PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, **seq_cls)
    raise ValueError(f"peft has no counterpart of {type(config).__name__} here")


def peft_trainable(theirs: nn.Module) -> dict[str, nn.Parameter]:
    """peft's trainable tensors under our names: no ``base_model[.model].`` in front, no adapter name."""
    theirs = getattr(theirs, "peft_model", theirs)  # PeftPrefixForward's peft model

    def ours(name: str) -> str:
        name = name.removeprefix("base_model.model.").removeprefix("base_model.")
        return name.replace(".modules_to_save.default.", ".").replace(".default.", ".").removesuffix(".default")
    return {ours(n): p for n, p in theirs.named_parameters() if p.requires_grad}


class PeftPrefixForward(nn.Module):
    """peft's PREFIX_TUNING forward for a BERT classifier (``_prefix_tuning_forward``: the prefix as
    a prefilled cache, the mask extended by P ones, then the backbone, dropout and head), with
    transformers >= 5.24's ``cache`` argument; ``shift_positions=False`` passes positions 0 … L-1."""

    def __init__(self, peft_model: nn.Module, shift_positions: bool) -> None:
        super().__init__()
        self.peft_model, self.shift_positions = peft_model, shift_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        peft_model, model = self.peft_model, self.peft_model.base_model
        b, length = input_ids.shape
        P = peft_model.active_peft_config.num_virtual_tokens
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(b, P), attention_mask], dim=1)
        positions = None if self.shift_positions else torch.arange(length, device=input_ids.device)[None]
        out = model.bert(input_ids=input_ids, attention_mask=attention_mask, cache=peft_model.get_prompt(b),
                         position_ids=positions)
        logits = model.classifier(model.dropout(out.pooler_output))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def peft_twin(model: nn.Module, plain: nn.Module) -> Contender:
    """``peft``'s model of ``model``'s method, built on ``plain`` (the same base model, unchanged)
    from ``model``'s config, every trainable tensor copied from ``model``."""
    import peft

    config = model.peft_config
    theirs = peft.get_peft_model(plain, peft_config(config))
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    by_name = peft_trainable(theirs)
    if mine.keys() != by_name.keys():
        raise ValueError(f"peft trains other tensors than ours: only ours {sorted(mine.keys() - by_name.keys())[:3]}, "
                         f"only peft's {sorted(by_name.keys() - mine.keys())[:3]}")
    with torch.no_grad():
        for name, p in mine.items():
            by_name[name].copy_(p)
    if isinstance(config, adalora.AdaLoRAConfig):  # peft's penalty is inside its forward
        return Contender(theirs, None, lambda t: theirs.base_model.update_and_allocate(config.tinit + t))
    if isinstance(config, prefix.PrefixTuningConfig):
        return Contender(PeftPrefixForward(theirs, config.shift_positions))
    return Contender(theirs)


@torch.no_grad()
def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    model.eval()
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def max_output_difference(a: nn.Module, b: nn.Module, inputs: dict) -> float:
    """max |logits(a) - logits(b)| in eval mode (no dropout)."""
    return (logits(a, inputs) - logits(b, inputs)).abs().max().item()
