"""Bottleneck adapters: Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019,
arXiv:1902.00751); Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning" (EACL 2021, arXiv:2005.00247); the parallel adapter of He et al., "Towards a Unified View
of Parameter-Efficient Transfer Learning" (ICLR 2022, arXiv:2110.04366).

An adapter is a small MLP with a bottleneck, added to every layer of a frozen transformer::

    x (d) ──► W_down (d → b) ──► act ──► W_up (b → d) ──► × s ──►  f(x)        b = d // reduction_factor

and used with a residual connection, so the layer computes ``h + f(·)`` instead of ``h``. With
``W_up = 0`` (the default ``init_weights="zero_up"``, He et al.'s and AdapterHub's "mam_adapter")
``f = 0`` and the model starts exactly as the pretrained one; ``"bert"`` draws both weights from
N(0, 0.02), as the UniPELT reference does, so it starts slightly off. Where the adapter sits, with ``x`` the
sub-block's residual input and ``h`` its output (formulas of AdapterHub ``adapters`` 1.3.0,
which the tests reproduce)::

          BERT (LayerNorm after the residual)           Llama (RMSNorm before each sub-block)
    x ─► attention ─[H]─► + x ─► LN ─┐         x ─► norm ─► attention ─[H]─► + x ─┐
    ┌────────────────────────────────┘         ┌──────────────────────────────────┘
    x ─► FFN ──────[H]─► + x ─► LN[P] ─►       x ─► norm ─► FFN ────[H]─► + x ─[P]─►
    └──────[‖]──────────►┘                     └──────────────[‖]────────►┘
    [H] houlsby: h + f(h) after the attention and the FFN output projections (2 per layer)
    [P] pfeiffer: BERT LN(h + x + f(LN(h + x))), the layer's LayerNorm used twice; Llama z + f(z)
    [‖] parallel: f reads the FFN's input x (un-normalised on Llama) and adds beside it: h + x + s·f(x)

A bottleneck adapter cannot be merged into the weights: ``act`` is non-linear, so no matrix
equals ``W + f``. It costs a little time at inference; :func:`merge` says so. Parameters are
``2·d·b + b + d`` per adapter; peft has no such method, so the saved layout is our own
(``peft_type`` ``"BOTTLENECK"``), read by :func:`peft_minimal.load_adapter`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import find_target_modules, freeze_base, replace_module
from .method import Method, Shapes, refuse_merge

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}
FAMILIES = {"bert": "bert", "llama": "llama"}  # config.model_type -> the layer layout below
# The modules each placement wraps (full-name regexes). The FFN's output.LayerNorm / output, not the
# attention's: ``layer.<i>.output`` is followed by nothing or ``.LayerNorm``.
SITES = {("houlsby", "bert"): r".*\.layer\.\d+\.(attention\.output\.dense|output\.dense)",
         ("houlsby", "llama"): r".*\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)",
         ("pfeiffer", "bert"): r".*\.layer\.\d+\.output\.LayerNorm",
         ("pfeiffer", "llama"): r".*\.layers\.\d+\.mlp",
         ("parallel", "bert"): r".*\.layer\.\d+\.output",
         ("parallel", "llama"): r".*\.layers\.\d+\.mlp"}


@dataclass
class BottleneckConfig:
    """Where the adapters go and their shape. The constructors :meth:`houlsby`, :meth:`pfeiffer`
    and :meth:`parallel` give AdapterHub's defaults (DoubleSeqBn, SeqBn, ParBn)."""

    placement: str = "pfeiffer"
    reduction_factor: float = 16      # bottleneck b = hidden_size // reduction_factor
    non_linearity: str = "relu"
    scaling: float = 1.0              # s; He et al. use 4 for the parallel adapter
    init_weights: str = "zero_up"     # "zero_up": identity at init; "bert": N(0, 0.02) (UniPELT's reference)
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.non_linearity not in ACTIVATIONS:
            raise ValueError(f"non_linearity must be one of {sorted(ACTIVATIONS)}, got {self.non_linearity!r}")
        if self.init_weights not in ("zero_up", "bert"):
            raise ValueError(f"init_weights must be 'zero_up' or 'bert', got {self.init_weights!r}")
        if not self.reduction_factor > 0:
            raise ValueError(f"reduction_factor must be > 0, got {self.reduction_factor}")

    @classmethod
    def houlsby(cls, **kwargs) -> "BottleneckConfig":
        return cls(**{"placement": "houlsby", "non_linearity": "swish", **kwargs})

    @classmethod
    def pfeiffer(cls, **kwargs) -> "BottleneckConfig":
        return cls(**{"placement": "pfeiffer", **kwargs})

    @classmethod
    def parallel(cls, **kwargs) -> "BottleneckConfig":
        return cls(**{"placement": "parallel", "reduction_factor": 2, "scaling": 4.0, **kwargs})

    def bottleneck_size(self, hidden_size: int) -> int:
        size = int(hidden_size // self.reduction_factor)
        if size < 1:
            raise ValueError(f"reduction_factor={self.reduction_factor} leaves no bottleneck for hidden size {hidden_size}")
        return size


class Bottleneck(nn.Module):
    """``f(x) = s · W_up act(W_down x + b_down) + s · b_up`` (AdapterHub's names and scaling)."""

    def __init__(self, dim: int, bottleneck: int, non_linearity: str = "relu", scaling: float = 1.0,
                 init_weights: str = "zero_up", like: torch.Tensor | None = None) -> None:
        super().__init__()
        factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.adapter_down = nn.Linear(dim, bottleneck, **factory)
        self.non_linearity = ACTIVATIONS[non_linearity]()
        self.adapter_up = nn.Linear(bottleneck, dim, **factory)
        self.scaling = scaling
        self.reset_parameters(init_weights)

    @torch.no_grad()
    def reset_parameters(self, init_weights: str = "zero_up") -> None:
        if init_weights == "zero_up":   # W_down as nn.Linear draws it; W_up = 0 so f = 0
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_up.weight)
        else:                           # "bert": BERT's own init, N(0, 0.02), for both
            nn.init.normal_(self.adapter_down.weight, std=0.02)
            nn.init.normal_(self.adapter_up.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.non_linearity(self.adapter_down(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}"


class SerialAdapter(nn.Module):
    """Houlsby: a sub-block's output projection followed by its adapter, ``y + f(y)``.

    On BERT the projection's dropout then acts on ``y + f(y)``, where AdapterHub applies ``f`` after
    it; the two agree in eval mode (and with dropout 0)."""

    def __init__(self, base_layer: nn.Linear, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    @property
    def weight(self) -> torch.Tensor:  # code that reads a projection's ``.weight.dtype`` keeps working
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.adapter(y)


class PfeifferLayerNorm(nn.Module):
    """Pfeiffer on BERT: the FFN's LayerNorm, given ``h + x``, returns ``LN(h + x + f(LN(h + x)))``."""

    def __init__(self, base_layer: nn.LayerNorm, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.base_layer(s + self.adapter(self.base_layer(s)))


class ParallelBertOutput(nn.Module):
    """Parallel on BERT: ``BertOutput(h, x)`` = ``LN(h + x)`` becomes ``LN(h + x + f(x))``."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.base_layer(hidden_states, input_tensor + self.adapter(input_tensor))


class FeedForwardBlock(nn.Module):
    """Pfeiffer or parallel on Llama: the FFN with its pre-norm (moved in from the layer, whose
    ``post_attention_layernorm`` becomes Identity) so the adapter can read the residual stream ``x``.
    Returns ``m + f(x + m)`` (Pfeiffer: the layer outputs ``z + f(z)``, ``z = x + m``) or ``m + f(x)``
    (parallel), with ``m = FFN(norm(x))``; the layer adds ``x``."""

    def __init__(self, norm: nn.Module, base_layer: nn.Module, adapter: Bottleneck, parallel: bool) -> None:
        super().__init__()
        self.norm, self.base_layer, self.adapter, self.parallel = norm, base_layer, adapter, parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.base_layer(self.norm(x))
        return m + self.adapter(x if self.parallel else x + m)

    def extra_repr(self) -> str:
        return f"parallel={self.parallel}"


WRAPPERS = (SerialAdapter, PfeifferLayerNorm, ParallelBertOutput, FeedForwardBlock)


def adapter_sites(model: nn.Module, placement: str) -> list[str]:
    """Names of the modules that ``placement`` wraps in ``model`` (the same before and after)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"bottleneck adapters know the layers of model types {sorted(FAMILIES)}, "
                         f"not {model_type!r}; add its module names to adapters.SITES")
    return [name for name, _ in find_target_modules(model, SITES[placement, FAMILIES[model_type]])]


def add_adapters(model: nn.Module, config: BottleneckConfig, adapter_class: type[Bottleneck] = Bottleneck,
                 **adapter_kwargs) -> nn.Module:
    """Put a :class:`Bottleneck` at every site of ``config.placement``, in place; only the adapters
    (and ``config.modules_to_save``) train. Refused before anything changes if already added.
    ``adapter_class`` (a :class:`Bottleneck` subclass, given ``adapter_kwargs``) is how UniPELT
    puts its gated adapter in the same places."""
    sites = adapter_sites(model, config.placement)
    if any(isinstance(model.get_submodule(name), WRAPPERS) for name in sites):
        raise ValueError("model already has bottleneck adapters; adding them twice is not supported")
    dim = model.config.hidden_size
    for name in sites:
        module = model.get_submodule(name)
        like = next(module.parameters())
        adapter = adapter_class(dim, config.bottleneck_size(dim), config.non_linearity, config.scaling,
                                config.init_weights, like, **adapter_kwargs)
        if config.placement == "houlsby":
            wrapper = SerialAdapter(module, adapter)
        elif isinstance(module, nn.LayerNorm):
            wrapper = PfeifferLayerNorm(module, adapter)
        elif hasattr(module, "LayerNorm"):  # BertOutput
            wrapper = ParallelBertOutput(module, adapter)
        else:  # Llama's mlp: take the layer's pre-FFN norm inside, where the stream x is still visible
            layer = model.get_submodule(name.rpartition(".")[0])
            wrapper = FeedForwardBlock(layer.post_attention_layernorm, module, adapter, config.placement == "parallel")
            layer.post_attention_layernorm = nn.Identity()
        replace_module(model, name, wrapper)
    freeze_base(model, ("adapter_",), config.modules_to_save)
    model.peft_config = config
    return model


def adapter_layers(model: nn.Module) -> dict[str, Bottleneck]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Bottleneck)}


# Refuses: ``W_up act(W_down x)`` is not linear in ``x``, so no weight matrix absorbs it.
merge, unmerge, merge_and_unload = refuse_merge(
    "a bottleneck adapter cannot be merged into the base weights: its non-linearity makes "
    "f(x) = W_up act(W_down x) non-linear in x, so no matrix W' gives W'x = Wx + f(Wx); "
    "keep the adapter at inference (LoRA and (IA)³ can merge)")


# --- how the rest of the package sees bottleneck adapters: our own saved layout ---

def to_saved(config: BottleneckConfig) -> dict:
    return {"peft_type": "BOTTLENECK", "placement": config.placement, "reduction_factor": config.reduction_factor,
            "non_linearity": config.non_linearity, "scaling": config.scaling, "init_weights": config.init_weights,
            "modules_to_save": config.modules_to_save or None}


def from_saved(d: dict) -> BottleneckConfig:
    return BottleneckConfig(placement=d["placement"], reduction_factor=d["reduction_factor"],
                            non_linearity=d["non_linearity"], scaling=d["scaling"], init_weights=d["init_weights"],
                            modules_to_save=list(d.get("modules_to_save") or []))


def shapes(model: nn.Module, config: BottleneckConfig) -> Shapes:
    """W_down: b x d, b_down: b, W_up: d x b, b_up: d at every site."""
    d = model.config.hidden_size
    b = config.bottleneck_size(d)
    found = {}
    for name in adapter_sites(model, config.placement):
        found.update({f"{name}.adapter.adapter_down.weight": (b, d), f"{name}.adapter.adapter_down.bias": (b,),
                      f"{name}.adapter.adapter_up.weight": (d, b), f"{name}.adapter.adapter_up.bias": (d,)})
    return found


METHOD = Method("BOTTLENECK", BottleneckConfig, add_adapters, to_saved, from_saved, shapes, ("adapter_",),
                merge, unmerge, merge_and_unload, can_merge=False, peft_loads=False)
