"""Prefix tuning: Li & Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"
(ACL 2021, arXiv:2101.00190).

The frozen model gets ``P`` learned key/value pairs in front of the real ones, in every attention
layer. Every real token attends to them; they attend to nothing (they have no query)::

                      prefix (learned)     real tokens (frozen model)
    keys   layer l:   k_1 … k_P          │ k(x_1) … k(x_L)
    values layer l:   v_1 … v_P          │ v(x_1) … v(x_L)
    mask:             1 … 1  (always)    │ the padding mask (causal on Llama)
    positions:        —                  │ P … P+L-1 (peft's shift) or 0 … L-1

    prompt_encoder:  Embedding(P, token_dim) ─► Linear ─► tanh ─► Linear ─►┐   prefix_projection=True
                     Embedding(P, num_layers·2·token_dim) ─────────────────┴─► (P, layers·2·token_dim)

``token_dim`` is ``num_key_value_heads · head_dim`` (with grouped-query attention the prefix is
as narrow as the real keys). The reparametrisation MLP (Li & Liang's trick for stable training)
is only a way to train: what the model uses, and what is saved (peft's ``prompt_embeddings``), is
its output, one flat tensor; loading gives the flat form back.

How it plugs in: a forward pre-hook on the model computes the prefix once per forward and passes
it down as a keyword argument (transformers hands unknown keyword arguments to the attention
function); an attention function registered with transformers puts it in front of the real keys
(after RoPE on Llama, so prefix keys carry no position) and prepends always-visible columns to the
boolean mask; a registered mask function makes transformers always build that mask (it would
otherwise skip it, or treat a custom attention as maskless and attend to padding). Nothing goes
into the KV cache, so ``generate`` works as usual and gradient checkpointing recomputes the same
thing (peft prefills the cache instead, and refuses gradient checkpointing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .layers import freeze_base
from .method import Method, Shapes, refuse_merge

ATTENTION = "peft_minimal_prefix"  # the name both functions are registered under


@dataclass
class PrefixTuningConfig:
    """peft's names. ``shift_positions`` (ours) puts the real tokens at positions ``P … P+L-1``,
    as peft does (its prefix sits in the cache); False keeps ``0 … L-1`` (AdapterHub, UniPELT)."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False           # train through the MLP (Li & Liang's reparametrisation)
    encoder_hidden_size: int | None = None    # the MLP's width; None: token_dim, as peft
    init_weights: str | None = None           # None: nn.Embedding/nn.Linear defaults; "zero": a zero prefix
    shift_positions: bool = True
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise ValueError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")


@dataclass(frozen=True)
class KVShape:
    """What a prefix must look like for one model: peft's ``num_layers``, ``num_attention_heads``
    (the key/value heads) and ``token_dim`` = heads · head_dim."""

    num_layers: int
    num_attention_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @classmethod
    def of(cls, model: nn.Module) -> "KVShape":
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cls(cfg.num_hidden_layers, heads, head_dim)


class PrefixEncoder(nn.Module):
    """The learned prefix, as peft stores it: ``forward()`` returns ``(P, num_layers·2·token_dim)``."""

    def __init__(self, config: PrefixTuningConfig, shape: KVShape, like: torch.Tensor | None = None) -> None:
        super().__init__()
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        P, d, out = config.num_virtual_tokens, shape.token_dim, shape.num_layers * 2 * shape.token_dim
        self.shape = shape
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or d
            self.embedding = nn.Embedding(P, d, **factory)
            self.transform = nn.Sequential(nn.Linear(d, hidden, **factory), nn.Tanh(),
                                           nn.Linear(hidden, out, **factory))
            last = self.transform[-1]
            zero = [last.weight, last.bias]
        else:
            self.embedding = nn.Embedding(P, out, **factory)
            self.transform = None
            zero = [self.embedding.weight]
        if config.init_weights == "zero":
            for p in zero:
                nn.init.zeros_(p)

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        return x if self.transform is None else self.transform(x)

    def key_values(self) -> torch.Tensor:
        """``(num_layers·2, heads, P, head_dim)``: layer ``l``'s keys at ``2l``, its values at ``2l+1``
        (peft's order)."""
        s = self.shape
        flat = self()
        return flat.view(flat.shape[0], s.num_layers * 2, s.num_attention_heads, s.head_dim).permute(1, 2, 0, 3)


def prefix_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, prefix_kv: torch.Tensor | None = None,
                     prefix_gate: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention with layer ``module.layer_idx``'s prefix in front of ``key``/``value``.

    ``key``, ``value``: ``(B, kv_heads, K, d)`` (after RoPE and the cache); ``attention_mask``: boolean
    ``(B, 1, Q, K)`` (True: attend), or None when the model gave none (then no padding).
    ``prefix_gate`` (UniPELT): one number per example, ``(B, 1, 1)``, that scales this layer's prefix
    keys and values alike."""
    if prefix_kv is not None:
        b, P = query.shape[0], prefix_kv.shape[2]
        pk, pv = (prefix_kv[2 * module.layer_idx + i].to(key.dtype).expand(b, -1, -1, -1) for i in (0, 1))
        if prefix_gate is not None:  # (B, 1, 1) -> (B, 1, 1, 1): the same gate for every head, K and V
            gate = prefix_gate.to(key.dtype).unsqueeze(-1)
            pk, pv = pk * gate, pv * gate
        if attention_mask is None:  # no padding: causal (aligned to the last key) or all visible
            q, k = query.shape[2], key.shape[2]
            attention_mask = torch.ones(q, k, dtype=torch.bool, device=query.device)
            if getattr(module, "is_causal", False):
                attention_mask = attention_mask.tril(k - q)
            attention_mask = attention_mask.expand(b, 1, q, k)
        visible = attention_mask.new_ones(*attention_mask.shape[:-1], P)
        attention_mask = torch.cat([visible, attention_mask], dim=-1)
        key, value = torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def materialised_mask(*args, **kwargs) -> torch.Tensor | None:
    """transformers' sdpa mask, never skipped: padding and causality stay explicit, so prefix
    columns can be put in front of it."""
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTENTION, prefix_attention)
AttentionMaskInterface.register(ATTENTION, materialised_mask)


def absolute_positions(model: nn.Module) -> int | None:
    """How many learned absolute positions the model has (BERT), or None (rotary, as Llama)."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def _reentrant_checkpointing(model: nn.Module) -> bool:
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            fn = getattr(m, "_gradient_checkpointing_func", None)
            return bool(getattr(fn, "keywords", {}).get("use_reentrant", False))
    return False


def _inject_prefix(model: nn.Module, args: tuple, kwargs: dict, max_positions: int | None = None):
    """Forward pre-hook: the prefix, computed once per forward, rides down to every attention call."""
    if (model.training and torch.is_grad_enabled() and model.prompt_encoder.transform is not None
            and _reentrant_checkpointing(model)):
        raise ValueError("prefix_projection=True cannot train under reentrant gradient checkpointing: each layer's "
                         "recomputation backpropagates through the one shared MLP, whose graph the first layer "
                         "frees; use gradient_checkpointing_kwargs={'use_reentrant': False} (the default)")
    kwargs["prefix_kv"] = model.prompt_encoder.key_values()
    if model.peft_config.shift_positions:
        P = model.peft_config.num_virtual_tokens
        pos = kwargs.get("position_ids")
        if pos is None:
            x = kwargs.get("input_ids", args[0] if args else None)
            x = x if x is not None else kwargs["inputs_embeds"]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            start = cache.get_seq_length() if cache is not None else 0
            if max_positions is not None and start + x.shape[1] + P > max_positions:
                raise ValueError(f"{P} virtual tokens + {start + x.shape[1]} tokens exceed the model's "
                                 f"{max_positions} positions (shift_positions=True uses positions P…P+L-1)")
            pos = torch.arange(start, start + x.shape[1], device=x.device)[None]
        kwargs["position_ids"] = pos + P
    return args, kwargs


def add_prefix(model: nn.Module, config: PrefixTuningConfig) -> nn.Module:
    """Give every attention layer of ``model`` a learned prefix, in place; only the prefix (and
    ``config.modules_to_save``) train. The model's attention becomes sdpa with the prefix."""
    if hasattr(model, "prompt_encoder"):
        raise ValueError("model already has a prompt encoder; adding a second prefix is not supported")
    max_positions = absolute_positions(model)
    if config.shift_positions and max_positions is not None and config.num_virtual_tokens >= max_positions:
        raise ValueError(f"num_virtual_tokens={config.num_virtual_tokens} leaves no position for real tokens: "
                         f"{type(model).__name__} has {max_positions} positions and shift_positions=True "
                         f"starts them at {config.num_virtual_tokens}")
    original = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:  # transformers only warns
        raise ValueError(f"{type(model).__name__} cannot switch its attention implementation, "
                         "so prefix tuning cannot reach its attention layers")
    model.prompt_encoder = PrefixEncoder(config, KVShape.of(model), like=model.get_input_embeddings().weight)
    model.prompt_encoder.original_attn_implementation = original
    model.prompt_encoder.hook = model.register_forward_pre_hook(
        partial(_inject_prefix, max_positions=max_positions), with_kwargs=True)
    freeze_base(model, ("prompt_encoder",), config.modules_to_save)
    model.peft_config = config
    return model


def remove_prefix(model: nn.Module) -> nn.Module:
    """Take the prefix out again: the hook, the encoder, the attention implementation."""
    encoder = model.prompt_encoder
    encoder.hook.remove()
    model.set_attn_implementation(encoder.original_attn_implementation)
    del model.prompt_encoder, model.peft_config
    return model


# Refuses: a prefix adds keys and values to attend to, not a change of any weight.
merge, unmerge, merge_and_unload = refuse_merge(
    "prefix tuning cannot be merged into the base weights: it adds P key/value positions "
    "that every token attends to (softmax over more keys), which no weight change reproduces; "
    "keep the prefix at inference, or remove_prefix(model) for the plain model")


# --- how the rest of the package sees prefix tuning: peft's PREFIX_TUNING layout ---

def to_saved(config: PrefixTuningConfig) -> dict:
    """peft fills ``token_dim``, ``num_layers`` and ``num_attention_heads`` from the model (KV heads
    for GQA, as :class:`KVShape`). ``shift_positions`` is ours, written only when False: peft always
    shifts, and warns that it ignores the key (its outputs then differ from ours)."""
    saved = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": config.num_virtual_tokens,
             "prefix_projection": config.prefix_projection, "encoder_hidden_size": config.encoder_hidden_size,
             "init_weights": config.init_weights, "num_transformer_submodules": 1,
             "modules_to_save": config.modules_to_save or None}
    return saved if config.shift_positions else {**saved, "shift_positions": False}


def from_saved(d: dict) -> PrefixTuningConfig:
    """The saved prefix is the flat one (the MLP's output), so the config loaded is flat too."""
    if d.get("num_transformer_submodules", 1) != 1:
        raise ValueError("this prefix is for an encoder-decoder model; peft_minimal supports one attention stack")
    modules = list(dict.fromkeys(d.get("modules_to_save") or []))  # peft repeats the SEQ_CLS heads
    return PrefixTuningConfig(num_virtual_tokens=d["num_virtual_tokens"], prefix_projection=False,
                              shift_positions=d.get("shift_positions", True), modules_to_save=modules)


def shapes(model: nn.Module, config: PrefixTuningConfig) -> Shapes:
    s = KVShape.of(model)
    P, d, out = config.num_virtual_tokens, s.token_dim, s.num_layers * 2 * s.token_dim
    if not config.prefix_projection:
        return {"prompt_encoder.embedding.weight": (P, out)}
    h = config.encoder_hidden_size or d
    return {"prompt_encoder.embedding.weight": (P, d), "prompt_encoder.transform.0.weight": (h, d),
            "prompt_encoder.transform.0.bias": (h,), "prompt_encoder.transform.2.weight": (out, h),
            "prompt_encoder.transform.2.bias": (out,)}


def pack(config: PrefixTuningConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What peft saves: the prefix itself, ``prompt_embeddings`` (the MLP's output when projecting)."""
    x = tensors["prompt_encoder.embedding.weight"]
    if config.prefix_projection:
        t = {k.removeprefix("prompt_encoder.transform."): v for k, v in tensors.items()}
        x = nn.functional.linear(torch.tanh(nn.functional.linear(x, t["0.weight"], t["0.bias"])),
                                 t["2.weight"], t["2.bias"])
    return {"prompt_embeddings": x}


def unpack(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``prompt_embeddings`` becomes the flat encoder's embedding (see :func:`from_saved`)."""
    tensors = dict(tensors)
    tensors["prompt_encoder.embedding.weight"] = tensors.pop("prompt_embeddings")
    return tensors


METHOD = Method("PREFIX_TUNING", PrefixTuningConfig, add_prefix, to_saved, from_saved, shapes, ("prompt_encoder",),
                merge, unmerge, merge_and_unload, can_merge=False, saved_prefix="base_model.",
                pack=pack, unpack=unpack)
