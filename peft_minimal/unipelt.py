"""UniPELT: Mao et al., "UniPELT: A Unified Framework for Parameter-Efficient Language Model
Tuning" (ACL 2022, arXiv:2110.07577).

Three PEFT families in every layer, each behind a learned gate, so the model chooses per layer and
per example how much of each to use::

    h ─► attention ─► (+ h, norm) ─► x ─► FFN ─► (+ x) ─► z ─► z + g_A·f(z) ─► next layer
         │                                                     └ adapter (Pfeiffer), gate g_A
         ├ Q = W_q h + g_L·B_q A_q h                  LoRA on q and v, a gate g_L each
         ├ K = [ g_P·P_K ; W_k h ]                    prefix: P learned keys and values,
         └ V = [ g_P·P_V ; W_v h + g_L·B_v A_v h ]    one gate g_P for both
    (BERT: norm after each residual, Pfeiffer's LayerNorm arrangement as in adapters.py;
     Llama: norm before each sub-block.)

    every gate  g = mean over tokens of sigmoid(w·x + b)  ∈ (0, 1), one per example (B, 1, 1),
    x = what its component reads: the q/v input (g_L, one gate each), the attention input (g_P,
    shared by K and V), the adapter input z (g_A).

The gated LoRA's gate replaces ``alpha / r``. ``gate_pooling="masked"`` (default) averages the
gate over real tokens only; ``"mean"`` averages over padding too, as the reference code and
AdapterHub ``adapters`` do, so there a message's gates (and outputs) depend on how much padding its
batch has. Paper defaults: prefix of 10 tokens through an MLP of width 512, Pfeiffer adapter with
reduction factor 16 and BERT's N(0, 0.02) init, LoRA r = 8 on query and value; AP = adapter +
prefix, APL = all three. UniPELT is not the identity at initialisation (the adapter and the prefix
start non-zero), and a closed prefix gate is not the identity either: zero prefix keys still take
softmax mass (``exp(0)`` each), so the real tokens' attention weights shrink. Closed LoRA and adapter
gates do give the base model exactly. An input-dependent gate cannot be merged into weights.

How the gates see the padding: a forward pre-hook on the model passes the 2-D attention mask down
as a keyword argument (transformers hands it to every layer and attention); a pre-hook on each
attention hands it to its layer's gates (LoRA and prefix inside the attention, the adapter after
it), so gradient checkpointing, which re-runs a layer's forward, re-runs that hook too. Each gate
keeps the values of its latest forward in ``.value`` (overwritten, detached, on device):
:func:`gate_values` collects them for plots, :func:`mean_gate_values` averages them over a data
set. With ``generate``'s cache, a step's gates average over that step's tokens only (the
reference, an encoder, never decodes).

Where this differs from the reference code (morningmoni/UniPELT) and AdapterHub ``adapters`` 1.3.0,
whose gates agree with the paper's placement (checked per component in ``tests/test_unipelt.py``):
the masked mean (theirs: padding included); the prefix embedding is the KV width (peft's layout;
theirs: ``hidden_size``, the same without grouped-query attention) and keeps peft's/AdapterHub's
default init (the reference draws N(0, 0.02)); gates start with ``w ~ N(0, 0.02)``, ``b = 0`` (the
reference; AdapterHub leaves PyTorch's uniform bias on the LoRA and prefix gates); gradient
checkpointing keeps the prefix (the reference's checkpointing branch drops it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from . import adapters, prefix
from .adapters import Bottleneck, BottleneckConfig
from .layers import check_linear_targets, find_target_modules, freeze_base, replace_module, target_linears
from .lora import LoRALinear
from .method import Method, Shapes, refuse_merge

POOLINGS = ("masked", "mean")
MASK_KWARG = "unipelt_token_mask"
LORA_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}
ATTENTION = {"bert": r".*\.layer\.\d+\.attention\.self", "llama": r".*\.layers\.\d+\.self_attn"}
MARKERS = ("lora_", "adapter_", "prompt_encoder", "prefix_gate")


@dataclass
class UniPELTConfig:
    """Which components, and their shapes. :meth:`AP` and :meth:`APL` are the paper's two variants."""

    lora: bool = True
    adapter: bool = True
    prefix: bool = True
    r: int = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None     # None: query/value (BERT), q_proj/v_proj (Llama)
    reduction_factor: float = 16                 # adapter bottleneck = hidden // reduction_factor
    non_linearity: str = "relu"
    adapter_init: str = "bert"                   # the reference's N(0, 0.02); "zero_up": f = 0 at init
    num_virtual_tokens: int = 10
    prefix_projection: bool = True               # train the prefix through the MLP (saved: its output)
    encoder_hidden_size: int | None = 512        # the MLP's width; None: the KV width
    shift_positions: bool = False                # the reference does not shift (peft does)
    gate_pooling: str = "masked"                 # "mean": the reference's mean, padding included
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (self.lora or self.adapter or self.prefix):
            raise ValueError("UniPELT needs at least one of lora, adapter, prefix")
        if self.gate_pooling not in POOLINGS:
            raise ValueError(f"gate_pooling must be one of {POOLINGS}, got {self.gate_pooling!r}")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got r={self.r!r}")
        self.bottleneck()  # checks reduction_factor, non_linearity, adapter_init
        self.prefix_config()  # checks num_virtual_tokens

    @classmethod
    def AP(cls, **kwargs) -> UniPELTConfig:
        return cls(**{"lora": False, **kwargs})

    @classmethod
    def APL(cls, **kwargs) -> UniPELTConfig:
        return cls(**kwargs)

    def bottleneck(self) -> BottleneckConfig:
        return BottleneckConfig(placement="pfeiffer", reduction_factor=self.reduction_factor,
                                non_linearity=self.non_linearity, init_weights=self.adapter_init)

    def prefix_config(self) -> prefix.PrefixTuningConfig:
        return prefix.PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens,
                                         prefix_projection=self.prefix_projection,
                                         encoder_hidden_size=self.encoder_hidden_size,
                                         shift_positions=self.shift_positions)


class Gate(nn.Linear):
    """``g = pool_tokens(sigmoid(w·x + b))``: ``(B, L, d) -> (B, 1, 1)``. Starts near 0.5 (w ~ N(0, 0.02),
    b = 0, the reference's init). ``token_mask`` (B, L), set by the layer's hook, selects the real
    tokens for ``pooling="masked"``; ``value`` holds the latest forward's gates, ``(B,)``."""

    def __init__(self, dim: int, pooling: str = "masked", like: torch.Tensor | None = None) -> None:
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        super().__init__(dim, 1, **factory)
        nn.init.normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        self.pooling = pooling
        self.token_mask: torch.Tensor | None = None
        self.value: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(super().forward(x))                      # (B, L, 1)
        if self.pooling == "masked" and self.token_mask is not None:
            m = self.token_mask[:, -x.shape[1]:].to(g.dtype).unsqueeze(-1)  # generate: the newest tokens
            g = (g * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1)
        else:
            g = g.mean(1, keepdim=True)
        self.value = g.detach().flatten()
        return g

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pooling={self.pooling}"


class GatedLoRALinear(LoRALinear):
    """``W x + g(x) · B A x``: the gate takes the place of ``alpha / r``."""

    def __init__(self, base_layer: nn.Linear, r: int, dropout: float = 0.0, pooling: str = "masked") -> None:
        super().__init__(base_layer, r, alpha=r, dropout=dropout)
        self.scaling = None
        self.lora_gate = Gate(base_layer.in_features, pooling, like=base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.lora_gate(x)

    def merge(self) -> None:
        merge(None)

    def extra_repr(self) -> str:
        return f"r={self.r}, gated"


class GatedBottleneck(Bottleneck):
    """A bottleneck adapter whose output is scaled by a gate reading the adapter's input."""

    def __init__(self, *args, pooling: str = "masked", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.adapter_gate = Gate(self.adapter_down.in_features, pooling, like=self.adapter_down.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.adapter_gate(x)


def family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LORA_TARGETS:
        raise ValueError(f"UniPELT knows the layers of model types {sorted(LORA_TARGETS)}, not {model_type!r}")
    return model_type


def _targets(model: nn.Module, config: UniPELTConfig) -> list[str]:
    return config.target_modules or LORA_TARGETS[family(model)]


def _pass_mask(model: nn.Module, args: tuple, kwargs: dict):
    """Model pre-hook: the 2-D padding mask rides down to the layers as a keyword argument."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and mask.dim() == 2:
        kwargs[MASK_KWARG] = mask
    return args, kwargs


def _give_mask(attention: nn.Module, args: tuple, kwargs: dict):
    """Attention pre-hook: the layer's gates (LoRA and prefix inside the attention, the adapter after it)
    get the mask. On the attention, not the layer: transformers >= 5.24 checkpoints a layer's
    ``forward``, outside its own hooks, so only hooks inside the layer run again in the recomputation."""
    mask = kwargs.pop(MASK_KWARG, None)
    for gate in attention.unipelt_gates:
        gate.token_mask = mask
    return args, kwargs


def _drop_mask(layer: nn.Module, args: tuple, output):
    for m in layer.modules():
        if isinstance(m, Gate):
            m.token_mask = None


def _gate_prefix(attention: nn.Module, args: tuple, kwargs: dict):
    """Attention pre-hook: the prefix gate reads the attention's input (BERT positional, Llama keyword)."""
    hidden = args[0] if args else kwargs["hidden_states"]
    kwargs["prefix_gate"] = attention.prefix_gate(hidden)
    return args, kwargs


def add_unipelt(model: nn.Module, config: UniPELTConfig) -> nn.Module:
    """Add the gated components ``config`` switches on, in place; only they (and
    ``config.modules_to_save``) train. Every site is checked before the model changes."""
    if hasattr(model, "peft_config"):
        raise ValueError("model already has a peft_minimal method; add UniPELT to a plain model")
    fam = family(model)
    pooling, like = config.gate_pooling, model.get_input_embeddings().weight
    lora_found = find_target_modules(model, _targets(model, config)) if config.lora else []
    check_linear_targets(lora_found, LoRALinear, "LoRA")
    if config.adapter:
        adapters.adapter_sites(model, "pfeiffer")  # raises for a model without the placement
    if config.prefix:  # refuses a prefix that leaves no positions before anything changes
        prefix.add_prefix(model, config.prefix_config())
    for name, linear in lora_found:
        replace_module(model, name, GatedLoRALinear(linear, config.r, config.lora_dropout, pooling))
    if config.adapter:
        adapters.add_adapters(model, config.bottleneck(), GatedBottleneck, pooling=pooling)
    for name, attention in find_target_modules(model, ATTENTION[fam]):
        attention.register_forward_pre_hook(_give_mask, with_kwargs=True)
        if config.prefix:
            attention.prefix_gate = Gate(model.config.hidden_size, pooling, like)
            attention.register_forward_pre_hook(_gate_prefix, with_kwargs=True)
        layer = model.get_submodule(re.match(r"(.*\.layers?\.\d+)\.", name).group(1))
        # a plain tuple: the attention reaches its layer's gates without owning them as submodules
        attention.unipelt_gates = tuple(m for m in layer.modules() if isinstance(m, Gate))
        layer.register_forward_hook(_drop_mask)
    model.register_forward_pre_hook(_pass_mask, with_kwargs=True)
    freeze_base(model, MARKERS, config.modules_to_save)
    model.peft_config = config
    return model


def gate_values(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """The gates of the latest forward, ``(layer, component) -> (B,)``; component is ``"prefix"``,
    ``"adapter"`` or ``"lora.<target>"`` (e.g. ``"lora.query"``). Overwritten by every forward."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, Gate) and m.value is not None:
            layer = int(re.search(r"\.(\d+)\.", name).group(1))
            owner, kind = name.rsplit(".", 2)[-2:]
            component = {"lora_gate": f"lora.{owner}", "adapter_gate": "adapter", "prefix_gate": "prefix"}[kind]
            found[layer, component] = m.value
    return dict(sorted(found.items()))


@torch.no_grad()
def mean_gate_values(model: nn.Module, batches: Iterable[dict]) -> dict[str, list[float]]:
    """Every gate averaged over all the examples of ``batches`` (keyword arguments of ``model``), in
    eval mode: ``component -> [layer 0, layer 1, ...]``, the layout of a plot of gates per layer."""
    was_training = model.training
    model.eval()
    sums: dict[tuple[int, str], float] = {}
    counts: dict[tuple[int, str], int] = {}
    for inputs in batches:
        model(**inputs)
        for key, g in gate_values(model).items():
            sums[key] = sums.get(key, 0.0) + g.double().sum().item()
            counts[key] = counts.get(key, 0) + g.numel()
    model.train(was_training)
    means: dict[str, list[float]] = {}
    for layer, component in sorted(sums):  # by layer, so each list is indexed by layer
        means.setdefault(component, []).append(sums[layer, component] / counts[layer, component])
    return means


# Refuses: each gate depends on the input, and the adapter and prefix are not weight changes.
merge, unmerge, merge_and_unload = refuse_merge(
    "UniPELT cannot be merged into the base weights: its gates depend on the input (a different "
    "LoRA scale per example), the adapter is non-linear and the prefix adds attention positions")


# --- how the rest of the package sees UniPELT: our own layout (peft has no UniPELT) ---

def to_saved(config: UniPELTConfig) -> dict:
    keys = ("lora", "adapter", "prefix", "r", "lora_dropout", "target_modules", "reduction_factor", "non_linearity",
            "adapter_init", "num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "shift_positions",
            "gate_pooling")
    return {"peft_type": "UNIPELT", **{k: getattr(config, k) for k in keys},
            "modules_to_save": config.modules_to_save or None}


def from_saved(d: dict) -> UniPELTConfig:
    """The saved prefix is the flat one (the MLP's output, see :func:`pack`), so the config loaded is
    flat too, as prefix tuning's is: the MLP only helps training, serving needs its output."""
    fields = {k: v for k, v in d.items() if k in UniPELTConfig.__dataclass_fields__}
    return UniPELTConfig(**{**fields, "prefix_projection": False, "modules_to_save": list(d.get("modules_to_save") or [])})


SAVED_PREFIX = "base_model.model."


def pack(config: UniPELTConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors: the prefix MLP (2.5M numbers at the paper's sizes on MiniLM) is replaced by
    what it computes, the ``P x (L 2 d)`` prefix (46,080), as prefix tuning saves it; the rest as is."""
    encoder = {k: v for k, v in tensors.items() if "prompt_encoder." in k}
    rest = {k: v for k, v in tensors.items() if k not in encoder}
    if config.prefix and config.prefix_projection:
        owner = next(iter(encoder)).split("prompt_encoder.")[0]
        flat = prefix.pack(config.prefix_config(), {k.removeprefix(owner): v for k, v in encoder.items()})
        encoder = {f"{owner}prompt_encoder.embedding.weight": flat["prompt_embeddings"]}
    return {SAVED_PREFIX + k: v for k, v in {**rest, **encoder}.items()}


def shapes(model: nn.Module, config: UniPELTConfig) -> Shapes:
    fam, d = family(model), model.config.hidden_size
    found: Shapes = {}
    if config.lora:
        for name, linear in target_linears(model, _targets(model, config)):
            found.update({f"{name}.lora_A.weight": (config.r, linear.in_features),
                          f"{name}.lora_B.weight": (linear.out_features, config.r),
                          f"{name}.lora_gate.weight": (1, linear.in_features), f"{name}.lora_gate.bias": (1,)})
    if config.adapter:
        for name, shape in adapters.shapes(model, config.bottleneck()).items():
            found[name] = shape
            if name.endswith("adapter_up.bias"):
                site = name.removesuffix("adapter_up.bias")
                found.update({f"{site}adapter_gate.weight": (1, d), f"{site}adapter_gate.bias": (1,)})
    if config.prefix:
        found.update(prefix.shapes(model, config.prefix_config()))
        for name, _ in find_target_modules(model, ATTENTION[fam]):
            found.update({f"{name}.prefix_gate.weight": (1, d), f"{name}.prefix_gate.bias": (1,)})
    return found


METHOD = Method("UNIPELT", UniPELTConfig, add_unipelt, to_saved, from_saved, shapes, MARKERS,
                merge, unmerge, merge_and_unload, can_merge=False, peft_loads=False,
                saved_prefix=SAVED_PREFIX, pack=pack)
