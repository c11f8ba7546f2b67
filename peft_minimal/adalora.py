"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning
(Zhang et al., ICLR 2023, arXiv:2303.10512).

Each target ``W`` gets an update in the shape of a singular value decomposition::

    h = W x + scaling * P Λ Q x      P = lora_B (out x r), Λ = lora_E (r x 1), Q = lora_A (r x in)

Λ starts at zero (so the model starts as the pretrained one), P and Q ~ N(0, 0.02). While
training, a :class:`RankAllocator` scores every triplet ``(P_{·i}, λ_i, Q_{i·})`` and zeroes
the λ of the least important ones until the total number of kept triplets falls, on a cubic
schedule, from ``init_r`` per matrix to ``target_r`` per matrix on average. Pruning a λ removes
exactly one rank-one term, and the rank the layer keeps is the number of non-zero λ.

Importance of one parameter ``w`` (paper eqs. 8-11):
``I = |w · ∂L/∂w|`` (sensitivity), ``Ī ← β₁ Ī + (1−β₁) I`` (smoothed),
``Ū ← β₂ Ū + (1−β₂) |I − Ī|`` (uncertainty), ``s = Ī · Ū``; and of triplet ``i`` (eq. 12):
``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``.

Where the codes (the authors' and Hugging Face peft's) differ from the paper, this module
follows the codes, so that it reproduces peft exactly:

* the budget schedule (eq. 14) is printed with exponent 3 on the wrong factor; the codes use
  ``b(t) = b_T + (b_0 − b_T) (1 − (t − t_i) / (T − t_i − t_f))³``;
* sensitivity is taken *after* ``optimizer.step()`` (the updated weight times the gradient
  that produced the update), not before it as in the paper's Algorithm 1;
* the orthogonality penalty ``‖PᵀP − I‖_F + ‖QQᵀ − I‖_F`` is not squared (eq. 4 squares it)
  and is averaged over the P and Q matrices.

``scaling = alpha / init_r`` is fixed when the layer is made and kept after pruning, so
removing a triplet never rescales the others (peft divides by ``init_r + 1e-5``; the
relative difference is below 1e-6).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import (check_linear_targets, find_target_modules, freeze_base, merge_all, replace_module, target_linears,
                     unload, unmerge_all)
from .method import Method, Shapes


@dataclass
class AdaLoRAConfig:
    """AdaLoRA hyper-parameters; defaults are peft's. ``total_step`` counts optimizer steps."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0            # steps before pruning starts
    tfinal: int = 0           # steps at the end with the final ranks frozen
    delta_t: int = 1          # prune every delta_t steps during the budgeting phase
    beta1: float = 0.85       # EMA of sensitivity
    beta2: float = 0.85       # EMA of uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    target_modules: str | list[str] = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, list[bool]] | None = None  # set by the allocator; used when loading

    def __post_init__(self) -> None:
        if not isinstance(self.total_step, int) or self.total_step <= 0:
            raise ValueError("AdaLoRA needs total_step, the number of optimizer steps of the run "
                             f"(its budget schedule depends on it), got total_step={self.total_step!r}")
        if not (isinstance(self.init_r, int) and isinstance(self.target_r, int) and 0 < self.target_r < self.init_r):
            raise ValueError(f"need 0 < target_r < init_r (AdaLoRA prunes from init_r down to target_r), "
                             f"got init_r={self.init_r!r}, target_r={self.target_r!r}")
        if self.tinit < 0 or self.tfinal < 0 or self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"the schedule has no budgeting phase: need 0 <= tinit < total_step - tfinal, "
                             f"got tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step}")
        if self.delta_t < 1:
            raise ValueError(f"delta_t must be >= 1, got {self.delta_t}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must lie in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0 or not 0.0 <= self.dropout < 1.0:
            raise ValueError("orth_reg_weight must be >= 0 and dropout in [0, 1)")


class SVDLinear(nn.Module):
    """``nn.Linear`` plus ``scaling * P Λ Q``: ``lora_B`` = P, ``lora_E`` = Λ, ``lora_A`` = Q."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, init_r: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.init_r = init_r or r
        self.scaling = alpha / self.init_r  # fixed for life: pruning must not rescale survivors
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, **factory))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r, **factory))
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def rank(self) -> int:
        """Triplets still alive: the number of non-zero singular values λ."""
        return int((self.lora_E != 0).sum())

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        return result + (self.lora_dropout(x) @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling

    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight.data += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.data -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.lora_E.shape[0]}, init_r={self.init_r}, scaling={self.scaling:g}, merged={self.merged}"


def add_adalora(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    """Wrap every target ``nn.Linear`` in an :class:`SVDLinear` of rank ``init_r``, in place.

    With ``config.rank_pattern`` (a loaded adapter) each layer is built at its final rank,
    ``sum(pattern)``, which may be 0; the scaling stays ``alpha / init_r``.
    """
    found = find_target_modules(model, config.target_modules)
    check_linear_targets(found, SVDLinear, "AdaLoRA")
    for name, module in found:
        pattern = (config.rank_pattern or {}).get(f"{name}.lora_E")
        r = config.init_r if pattern is None else sum(pattern)
        replace_module(model, name, SVDLinear(module, r, config.alpha, config.init_r, config.dropout))
    freeze_base(model, ("lora_",), config.modules_to_save)
    model.peft_config = config
    return model


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}


def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    """Mean over all P and Q of ``‖PᵀP − I‖_F`` and ``‖QQᵀ − I‖_F`` (not squared, as peft)."""
    penalties = []
    for layer in svd_layers(model).values():
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            penalties.append(torch.linalg.norm(gram - torch.eye(len(gram), device=gram.device, dtype=gram.dtype)))
    return torch.stack(penalties).mean()


def ranks(model: nn.Module) -> dict[str, int]:
    """Surviving rank of every AdaLoRA layer."""
    return {name: layer.rank for name, layer in svd_layers(model).items()}


def kept_parameters(model: nn.Module) -> int:
    """Adapter parameters that survive pruning: ``rank · (in + out + 1)`` per layer, what a
    saved adapter holds (the paper's budget; pruned triplets still train until the end)."""
    return sum(layer.rank * (layer.lora_A.shape[1] + layer.lora_B.shape[0] + 1)
               for layer in svd_layers(model).values())


def merge(model: nn.Module) -> None:
    """Fold every ``scaling * P Λ Q`` into its base weight."""
    merge_all(model, SVDLinear)


def unmerge(model: nn.Module) -> None:
    """Subtract every merged update again, restoring the pretrained weights."""
    unmerge_all(model, SVDLinear)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every surviving ``P Λ Q`` into its weight and put plain ``nn.Linear`` layers back."""
    return unload(model, SVDLinear)


class RankAllocator:
    """Scores triplets and prunes λ to a cubic budget. Call :meth:`update_and_allocate`
    after ``optimizer.step()`` and before ``zero_grad()`` with the number of steps taken."""

    def __init__(self, model: nn.Module, config: AdaLoRAConfig) -> None:
        self.config = config
        self.layer_names = sorted(svd_layers(model))
        if not self.layer_names:
            raise ValueError("model has no AdaLoRA layer: call add_adalora first")
        self.init_budget = sum(svd_layers(model)[n].lora_E.shape[0] for n in self.layer_names)
        self.target_budget = config.target_r * len(self.layer_names)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.history: list[tuple[int, int]] = []  # (step, budget) whenever a mask was applied
        self.reset_scores()

    def reset_scores(self) -> None:
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``: init budget until tinit, cubic decay, then target."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * (1 - progress) ** 3 + self.target_budget)
        return budget, step % c.delta_t == 0

    @torch.no_grad()
    def update_scores(self, model: nn.Module) -> None:
        """Sensitivity |w·∇w| and its EMAs for every adapter parameter that has a gradient."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, p in model.named_parameters():
            if "lora_" not in name or p.grad is None:
                continue  # e.g. a frozen base weight or a task head outside the adapter
            ipt = (p * p.grad).abs()
            if name not in self.exp_avg_ipt:
                self.exp_avg_ipt[name], self.exp_avg_unc[name] = torch.zeros_like(p), torch.zeros_like(p)
            self.sensitivity[name] = ipt
            self.exp_avg_ipt[name] = b1 * self.exp_avg_ipt[name] + (1 - b1) * ipt
            self.exp_avg_unc[name] = b2 * self.exp_avg_unc[name] + (1 - b2) * (ipt - self.exp_avg_ipt[name]).abs()

    def element_score(self, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """``S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)`` per layer, shape ``(r,)``."""
        return {n: self.element_score(f"{n}.lora_E").view(-1)
                + self.element_score(f"{n}.lora_A").mean(dim=1)
                + self.element_score(f"{n}.lora_B").mean(dim=0)
                for n in self.layer_names}

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Zero the λ of every triplet scoring at or below the (init − budget)-th smallest score."""
        scores = self.triplet_scores()
        to_prune = self.init_budget - budget
        threshold = (torch.kthvalue(torch.cat(list(scores.values())), to_prune).values.item()
                     if to_prune > 0 else -float("inf"))
        layers = svd_layers(model)
        pattern = {}
        for n in self.layer_names:
            keep = scores[n] > threshold
            layers[n].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[f"{n}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self, model: nn.Module) -> None:
        layers = svd_layers(model)
        for n in self.layer_names:
            keep = torch.tensor(self.rank_pattern[f"{n}.lora_E"], device=layers[n].lora_E.device)
            layers[n].lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def state_dict(self) -> dict:
        """Everything the allocator carries from step to step (for checkpoint and resume)."""
        return {"sensitivity": self.sensitivity, "exp_avg_ipt": self.exp_avg_ipt, "exp_avg_unc": self.exp_avg_unc,
                "rank_pattern": self.rank_pattern, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.sensitivity = dict(state["sensitivity"])
        self.exp_avg_ipt, self.exp_avg_unc = dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        self.rank_pattern = state["rank_pattern"]
        self.history = [tuple(h) for h in state["history"]]

    def update_and_allocate(self, model: nn.Module, step: int) -> int:
        """Score, then prune to the budget of ``step``; from ``total_step − tfinal`` on, freeze
        the final pattern (and keep re-applying it). Returns the budget of this step."""
        end_of_budgeting = self.config.total_step - self.config.tfinal
        budget, mask_now = self.budget_schedule(step)
        if step < end_of_budgeting:
            self.update_scores(model)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(model, budget)
                self.history.append((step, budget))
        elif step == end_of_budgeting:
            self.rank_pattern = self.mask_to_budget(model, budget)
            self.history.append((step, budget))
            self.reset_scores()
        else:
            self.apply_rank_pattern(model)
        if self.rank_pattern is not None and hasattr(model, "peft_config"):
            model.peft_config.rank_pattern = self.rank_pattern
        return budget


# --- how the rest of the package sees AdaLoRA: peft's adapter_config.json keys and tensor shapes ---

def to_saved(config: AdaLoRAConfig) -> dict:
    return {"peft_type": "ADALORA", "init_r": config.init_r, "target_r": config.target_r,
            "lora_alpha": config.alpha, "lora_dropout": config.dropout, "tinit": config.tinit,
            "tfinal": config.tfinal, "deltaT": config.delta_t, "beta1": config.beta1, "beta2": config.beta2,
            "orth_reg_weight": config.orth_reg_weight, "total_step": config.total_step,
            "target_modules": config.target_modules, "modules_to_save": config.modules_to_save or None,
            "rank_pattern": config.rank_pattern, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True}


def from_saved(d: dict) -> AdaLoRAConfig:
    return AdaLoRAConfig(
        init_r=d["init_r"], target_r=d["target_r"], alpha=d["lora_alpha"], dropout=d.get("lora_dropout", 0.0),
        tinit=d.get("tinit", 0), tfinal=d.get("tfinal", 0), delta_t=d.get("deltaT", 1),
        beta1=d.get("beta1", 0.85), beta2=d.get("beta2", 0.85), orth_reg_weight=d.get("orth_reg_weight", 0.5),
        total_step=d["total_step"], target_modules=d["target_modules"],
        modules_to_save=list(d.get("modules_to_save") or []), rank_pattern=d.get("rank_pattern"))


def shapes(model: nn.Module, config: AdaLoRAConfig) -> Shapes:
    """P, Λ, Q per target at the rank it is saved with: ``init_r``, or the kept triplets of ``rank_pattern``."""
    found = {}
    for name, linear in target_linears(model, config.target_modules):
        pattern = (config.rank_pattern or {}).get(f"{name}.lora_E")
        r = config.init_r if pattern is None else sum(pattern)
        found.update({f"{name}.lora_A": (r, linear.in_features), f"{name}.lora_E": (r, 1),
                      f"{name}.lora_B": (linear.out_features, r)})
    return found


def prune(config: AdaLoRAConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


METHOD = Method("ADALORA", AdaLoRAConfig, add_adalora, to_saved, from_saved, shapes, ("lora_",),
                merge, unmerge, merge_and_unload, prune=prune)
