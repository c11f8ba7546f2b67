"""Soft prompts at the input: prompt tuning, Lester et al., "The Power of Scale for
Parameter-Efficient Prompt Tuning" (EMNLP 2021, arXiv:2104.08691), and P-tuning, Liu et al.,
"GPT Understands, Too" (2021, arXiv:2103.10385).

``P`` learned vectors are put in front of the token embeddings; the frozen model reads them as if
they were words. The attention mask gets ``P`` ones (always visible), positions run over them::

    input_ids      x_1 … x_L ──► word embeddings ──► e_1 … e_L
    inputs_embeds  p_1 … p_P  e_1 … e_L                            (B, P+L, d)
    attention      1 … 1      the padding mask
    positions      0 … P-1    P … P+L-1

    prompt tuning:  p = Embedding(P, d)                                    (Lester et al.)
    P-tuning:       p = MLP(Embedding(P, d))  or  MLP(BiLSTM(Embedding))    (Liu et al.: the prompt encoder)

The prompt encoder, like prefix tuning's MLP, is a way to train: peft saves its output
(``prompt_embeddings``, ``(P, d)``) and loads that alone (``inference_mode``). As in peft, a causal
LM's logits cover the ``P`` virtual positions too (``(B, P+L, V)``; labels get ``-100`` there), and
BERT's pooler reads position 0, which is now the first virtual token, not ``[CLS]``.

A forward pre-hook does the work, so ``model(...)``, training loops and ``generate`` need no
change: on a step that continues a KV cache the prompt is already in the cache, and only the mask
and positions are extended.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import freeze_base
from .method import Method, Shapes, refuse_merge


@dataclass
class PromptTuningConfig:
    """``prompt_tuning_init``: "RANDOM" (N(0, 1), nn.Embedding's init) or "SAMPLE_VOCAB" (rows of the
    model's own word embeddings, Lester et al.'s better start); peft's "TEXT" needs a tokenizer."""

    num_virtual_tokens: int = 20
    prompt_tuning_init: str = "RANDOM"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.prompt_tuning_init not in ("RANDOM", "SAMPLE_VOCAB"):
            raise ValueError(f"prompt_tuning_init must be 'RANDOM' or 'SAMPLE_VOCAB', got {self.prompt_tuning_init!r}")


@dataclass
class PromptEncoderConfig:
    """P-tuning's prompt encoder, peft's names and defaults. ``inference_mode``: keep only the encoder's
    output, as a loaded adapter does (peft the same)."""

    num_virtual_tokens: int = 20
    encoder_reparameterization_type: str = "MLP"   # or "LSTM"
    encoder_hidden_size: int | None = None         # None: the model's hidden size
    encoder_num_layers: int = 2                    # LSTM layers (the MLP has 3 Linear layers, always)
    encoder_dropout: float = 0.0                   # between LSTM layers
    inference_mode: bool = False
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError(f"encoder_reparameterization_type must be 'MLP' or 'LSTM', "
                             f"got {self.encoder_reparameterization_type!r}")


class PromptEmbedding(nn.Module):
    """Prompt tuning: ``forward()`` is the ``(P, d)`` soft prompt itself."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        w = word_embeddings.weight
        self.embedding = nn.Embedding(config.num_virtual_tokens, w.shape[1], device=w.device, dtype=w.dtype)
        if config.prompt_tuning_init == "SAMPLE_VOCAB":
            rows = torch.randint(0, w.shape[0], (config.num_virtual_tokens,), device=w.device)
            with torch.no_grad():
                self.embedding.weight.copy_(w[rows])

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning: ``forward()`` = ``mlp_head(embedding)`` or ``mlp_head(lstm_head(embedding))``, ``(P, d)``."""

    def __init__(self, config: PromptEncoderConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        w = word_embeddings.weight
        factory = {"device": w.device, "dtype": w.dtype}
        d = w.shape[1]
        h = config.encoder_hidden_size or d
        self.embedding = nn.Embedding(config.num_virtual_tokens, d, **factory)
        self.lstm_head, self.mlp_head = None, None
        if config.inference_mode:
            return
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True, **factory)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h, **factory), nn.ReLU(),
                                          nn.Linear(2 * h, d, **factory))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(d, h, **factory), nn.ReLU(), nn.Linear(h, h, **factory), nn.ReLU(),
                                          nn.Linear(h, d, **factory))

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.mlp_head is None:  # inference_mode: the saved output
            return x
        if self.lstm_head is not None:
            x = self.lstm_head(x[None])[0][0]
        return self.mlp_head(x)


def _inject_prompt(model: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: the soft prompt in front of the embeddings, the mask and positions extended."""
    kwargs = dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    kwargs.update(kwargs.pop("kwargs", {}))  # a **kwargs parameter arrives as one dict
    P = model.peft_config.num_virtual_tokens
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    continuing = cache is not None and cache.get_seq_length() > 0  # the prompt is in the cache already
    if not continuing:
        embeds = kwargs.pop("inputs_embeds", None)
        ids = kwargs.pop("input_ids", None)
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        b = embeds.shape[0]
        prompt = model.prompt_encoder().to(embeds.dtype).expand(b, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(b, P), types], dim=1)
        labels = kwargs.get("labels")
        if labels is not None and type(model).__name__.endswith("ForCausalLM"):
            kwargs["labels"] = torch.cat([labels.new_full((b, P), -100), labels], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], P), mask], dim=1)
    for key in ("position_ids", "cache_position"):  # cache_position: transformers < 5.24
        pos = kwargs.get(key)
        if pos is not None:
            head = torch.arange(P, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], P)
            kwargs[key] = pos + P if continuing else torch.cat([head, pos + P], dim=-1)
    return (), kwargs


def add_prompt(model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig) -> nn.Module:
    """Put a soft prompt of ``config.num_virtual_tokens`` in front of every input of ``model``, in
    place; only the prompt (and ``config.modules_to_save``) train."""
    if hasattr(model, "prompt_encoder"):
        raise ValueError("model already has a prompt encoder; adding a second one is not supported")
    encoder = PromptEmbedding if isinstance(config, PromptTuningConfig) else PromptEncoder
    model.prompt_encoder = encoder(config, model.get_input_embeddings())
    model.prompt_encoder.hook = model.register_forward_pre_hook(_inject_prompt, with_kwargs=True)
    freeze_base(model, ("prompt_encoder",), config.modules_to_save)
    model.peft_config = config
    return model


def remove_prompt(model: nn.Module) -> nn.Module:
    model.prompt_encoder.hook.remove()
    del model.prompt_encoder, model.peft_config
    return model


# Refuses: a soft prompt is extra input, not a change of any weight.
merge, unmerge, merge_and_unload = refuse_merge(
    "a soft prompt cannot be merged into the base weights: it adds P input positions that every "
    "token attends to; keep it at inference, or remove_prompt(model) for the plain model")


# --- how the rest of the package sees soft prompts: peft's PROMPT_TUNING and P_TUNING layouts ---

def _modules(d: dict) -> list[str]:
    return list(dict.fromkeys(d.get("modules_to_save") or []))  # peft repeats the SEQ_CLS heads


def to_saved_prompt_tuning(config: PromptTuningConfig) -> dict:
    return {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": config.num_virtual_tokens,
            "prompt_tuning_init": config.prompt_tuning_init, "num_transformer_submodules": 1,
            "modules_to_save": config.modules_to_save or None}


def from_saved_prompt_tuning(d: dict) -> PromptTuningConfig:
    init = d.get("prompt_tuning_init", "RANDOM")  # only the start of training; a loaded prompt is trained
    return PromptTuningConfig(d["num_virtual_tokens"], init if init == "SAMPLE_VOCAB" else "RANDOM", _modules(d))


def to_saved_p_tuning(config: PromptEncoderConfig) -> dict:
    return {"peft_type": "P_TUNING", "num_virtual_tokens": config.num_virtual_tokens,
            "encoder_reparameterization_type": config.encoder_reparameterization_type,
            "encoder_hidden_size": config.encoder_hidden_size, "encoder_num_layers": config.encoder_num_layers,
            "encoder_dropout": config.encoder_dropout, "num_transformer_submodules": 1,
            "inference_mode": config.inference_mode, "modules_to_save": config.modules_to_save or None}


def from_saved_p_tuning(d: dict) -> PromptEncoderConfig:
    """What is saved is the encoder's output (saved files say ``inference_mode``), so a loaded
    encoder holds that output alone, as peft's does."""
    return PromptEncoderConfig(d["num_virtual_tokens"], d.get("encoder_reparameterization_type", "MLP"),
                               d.get("encoder_hidden_size"), d.get("encoder_num_layers", 2),
                               d.get("encoder_dropout", 0.0), d.get("inference_mode", True), _modules(d))


def shapes(model: nn.Module, config: PromptTuningConfig | PromptEncoderConfig) -> Shapes:
    P, d = config.num_virtual_tokens, model.get_input_embeddings().weight.shape[1]
    found = {"prompt_encoder.embedding.weight": (P, d)}
    if isinstance(config, PromptTuningConfig) or config.inference_mode:
        return found
    h = config.encoder_hidden_size or d
    if config.encoder_reparameterization_type == "MLP":
        sizes = [(h, d), (h, h), (d, h)]
        found.update({f"prompt_encoder.mlp_head.{2 * i}.{p}": s if p == "weight" else s[:1]
                      for i, s in enumerate(sizes) for p in ("weight", "bias")})
        return found
    for layer in range(config.encoder_num_layers):
        for sfx in ("", "_reverse"):
            i = d if layer == 0 else 2 * h
            found.update({f"prompt_encoder.lstm_head.weight_ih_l{layer}{sfx}": (4 * h, i),
                          f"prompt_encoder.lstm_head.weight_hh_l{layer}{sfx}": (4 * h, h),
                          f"prompt_encoder.lstm_head.bias_ih_l{layer}{sfx}": (4 * h,),
                          f"prompt_encoder.lstm_head.bias_hh_l{layer}{sfx}": (4 * h,)})
    found.update({"prompt_encoder.mlp_head.0.weight": (2 * h, 2 * h), "prompt_encoder.mlp_head.0.bias": (2 * h,),
                  "prompt_encoder.mlp_head.2.weight": (d, 2 * h), "prompt_encoder.mlp_head.2.bias": (d,)})
    return found


def pack(config: PromptTuningConfig | PromptEncoderConfig,
         tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What peft saves: the prompt, ``prompt_embeddings`` (the encoder's output for P-tuning)."""
    if isinstance(config, PromptTuningConfig) or config.inference_mode:
        return {"prompt_embeddings": tensors["prompt_encoder.embedding.weight"]}
    w = tensors["prompt_encoder.embedding.weight"]
    encoder = PromptEncoder(config, nn.Embedding(1, w.shape[1], device=w.device, dtype=w.dtype))
    encoder.load_state_dict({k.removeprefix("prompt_encoder."): v for k, v in tensors.items()})
    with torch.no_grad():
        return {"prompt_embeddings": encoder.eval()()}


def unpack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    tensors["prompt_encoder.embedding.weight"] = tensors.pop("prompt_embeddings")
    return tensors


_LAYOUT = dict(can_merge=False, saved_prefix="base_model.", pack=pack, unpack=unpack)
PROMPT_TUNING = Method("PROMPT_TUNING", PromptTuningConfig, add_prompt, to_saved_prompt_tuning,
                       from_saved_prompt_tuning, shapes, ("prompt_encoder",), merge, unmerge, merge_and_unload,
                       **_LAYOUT)
P_TUNING = Method("P_TUNING", PromptEncoderConfig, add_prompt, to_saved_p_tuning, from_saved_p_tuning, shapes,
                  ("prompt_encoder",), merge, unmerge, merge_and_unload, **_LAYOUT)
