"""Recorded experiment grids: ``python -m peft_minimal.experiments NAME [--scale ci|full]``.

A grid too big for a chapter's five CI minutes runs here and writes
``results/NAME-<scale>.json`` with every run's config, metrics, seed, time, device and
package versions. Chapters read the record for their charts and re-run one configuration
live, checking it against the record. Chapters and grids share :func:`run_classification`,
so a live run and a recorded run with the same arguments are the same computation.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import adalora, adapters, bitfit, fewshot, ia3, lora, prefix, prompt, svd, unipelt
from .data import load_text_classification, tokenize
from .layers import count_parameters
from .models import device, load_encoder, use_mean_pooling  # noqa: F401 (chapters call experiments.device())
from .record import environment
from .train import TrainConfig, evaluate_accuracy, seed_everything, train

RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclass(frozen=True)
class Scale:
    """How big every experiment is: ``ci`` fits 2 CPU cores, ``full`` wants a GPU."""

    name: str
    max_length: int      # tokens per 20 Newsgroups message
    steps: int           # optimizer steps per classification run
    batch_size: int
    test_size: int | None  # None: the whole 7,532-message test split
    lm_steps: int        # decoder fine-tuning steps
    lm_block: int        # tokens per language-modelling row


SCALES = {
    "ci": Scale("ci", max_length=64, steps=80, batch_size=32, test_size=1000, lm_steps=15, lm_block=64),
    "full": Scale("full", max_length=256, steps=1000, batch_size=32, test_size=None, lm_steps=300, lm_block=256),
}

# Learning rates per method, chosen once on the ci scale (a new random head learns fast,
# a LoRA update needs a larger step than full fine-tuning).
LEARNING_RATES = {"head": 1e-2, "lora": 6e-3, "adalora": 6e-3, "ia3": 6e-2, "full": 3e-4}
ALL_SIX = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def current_scale() -> Scale:
    """The scale named by ``PEFT_SCALE`` (default ``ci``)."""
    name = os.environ.get("PEFT_SCALE", "ci")
    if name not in SCALES:
        raise ValueError(f"PEFT_SCALE must be one of {sorted(SCALES)}, got {name!r}")
    return SCALES[name]




def newsgroups(scale: Scale, tokenizer):
    """Tokenized 20 Newsgroups: the whole train split, a seeded test sample at ci scale."""
    train_set = load_text_classification("20newsgroups", "train")
    test_set = load_text_classification("20newsgroups", "test").subset(scale.test_size, seed=0)
    return tokenize(tokenizer, train_set, scale.max_length), tokenize(tokenizer, test_set, scale.max_length)


def adalora_config(target_r: int, steps: int, targets: tuple[str, ...] = ALL_SIX) -> adalora.AdaLoRAConfig:
    """The book's AdaLoRA schedule: start at 1.5x the target rank (the paper's b(0) = 1.5 b(T)),
    train 10% of the steps unpruned, prune on the cubic schedule, freeze the last 20%."""
    init_r = max(target_r + 1, round(1.5 * target_r))
    return adalora.AdaLoRAConfig(init_r=init_r, target_r=target_r, alpha=2 * init_r, total_step=steps,
                                 tinit=steps // 10, tfinal=steps // 5, delta_t=1, orth_reg_weight=0.1,
                                 target_modules=list(targets), modules_to_save=["classifier"])


@dataclass(frozen=True)
class Options:
    """What :func:`prepare` hands a method's builder besides the model."""

    r: int
    targets: tuple[str, ...]
    steps: int
    alpha: float | None
    variant: str
    size: int | None = None  # SIZED methods only: bottleneck b, or the number of virtual tokens P


@dataclass(frozen=True)
class Builder:
    """How :func:`prepare` applies one method to MiniLM: ``apply(model, options)`` in place;
    ``seeded``: the method's init draws random numbers, so ``seed_everything(seed)`` runs first."""

    apply: Callable[[nn.Module, Options], object]
    seeded: bool = True


def head() -> list[str]:
    """``modules_to_save``: the new, random task head trains with every method (a fresh list each time)."""
    return ["classifier"]


def _head_only(model: nn.Module, o: Options) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("classifier.")


def _adalora(model: nn.Module, o: Options) -> None:
    config = adalora_config(o.r, o.steps, o.targets)
    if o.variant == "no-penalty":
        config = replace(config, orth_reg_weight=0.0)
    elif o.variant == "no-pruning":  # rank r throughout; target_r is then never used
        config = replace(config, init_r=o.r, target_r=o.r - 1, alpha=2 * o.r)
    elif o.variant:
        raise ValueError(f"AdaLoRA variant must be '', 'no-penalty' or 'no-pruning', got {o.variant!r}")
    adalora.add_adalora(model, config)


# Chapter 5's methods at the UniPELT paper's settings (Mao et al. 2022; their code's defaults), on
# MiniLM: the Pfeiffer adapter of reduction factor 16 (bottleneck 384 / 16 = 24; the paper's 48 on
# BERT-base), ReLU, BERT's N(0, 0.02) init; a prefix of 10 tokens through an MLP of width 512,
# positions not shifted; LoRA r = 8 on query and value. The stand-alone adapter and prefix are
# UniPELT's own components without their gates, so the comparison isolates the gates. Houlsby:
# AdapterHub's DoubleSeqBn (two adapters a layer, swish) at the same size and init. Prompt tuning:
# 20 soft tokens (the library's choice; Lester et al. find gains level off around 20), peft's random init.
ADAPTER = unipelt.UniPELTConfig().bottleneck()
PREFIX = unipelt.UniPELTConfig().prefix_config()
PROMPT_TOKENS = 20


def unipelt_config(**changes) -> unipelt.UniPELTConfig:
    """UniPELT-APL at the paper's settings (the library's defaults), the head trained; ``lora=False``: AP."""
    return unipelt.UniPELTConfig(**{"modules_to_save": head(), **changes})


def sized_adapter(model: nn.Module, o: Options, **changes) -> adapters.BottleneckConfig:
    """The chapter's adapter, its bottleneck ``o.size`` if given (a divisor of the hidden size, so
    that AdapterHub's reduction factor names it exactly)."""
    if o.size is not None:
        hidden = model.config.hidden_size
        if o.size < 1 or hidden % o.size:
            raise ValueError(f"an adapter's size (bottleneck) must divide the hidden size {hidden}; got {o.size}")
        changes["reduction_factor"] = hidden // o.size
    return replace(ADAPTER, modules_to_save=head(), **changes)


SIZED = ("pfeiffer", "houlsby", "prefix", "prompt")  # the methods whose prepare() takes a size


BUILDERS: dict[str, Builder] = {
    "head": Builder(_head_only, seeded=False),
    "full": Builder(lambda model, o: None, seeded=False),
    "lora": Builder(lambda model, o: lora.add_lora(model, lora.LoRAConfig(  # seeded: lora_A's Kaiming draw
        r=o.r, alpha=o.alpha or 2 * o.r, target_modules=list(o.targets), modules_to_save=head()))),
    "adalora": Builder(_adalora),  # seeded: P and Q's normal draws
    "ia3": Builder(lambda model, o: ia3.add_ia3(model, ia3.IA3Config.for_model(model, modules_to_save=head())),
                   seeded=False),  # the vectors start at one: nothing is drawn
    "pfeiffer": Builder(lambda model, o: adapters.add_adapters(model, sized_adapter(model, o))),
    "houlsby": Builder(lambda model, o: adapters.add_adapters(model, sized_adapter(
        model, o, placement="houlsby", non_linearity="swish"))),
    "prefix": Builder(lambda model, o: prefix.add_prefix(model, replace(
        PREFIX, num_virtual_tokens=o.size or PREFIX.num_virtual_tokens, modules_to_save=head()))),
    "prompt": Builder(lambda model, o: prompt.add_prompt(
        model, prompt.PromptTuningConfig(o.size or PROMPT_TOKENS, modules_to_save=head()))),
    "unipelt-ap": Builder(lambda model, o: unipelt.add_unipelt(model, unipelt_config(lora=False))),
    "unipelt-apl": Builder(lambda model, o: unipelt.add_unipelt(model, unipelt_config())),
    "bitfit": Builder(lambda model, o: bitfit.add_bitfit(model, bitfit.BitFitConfig(modules_to_save=head())),
                      seeded=False),  # every bias, pretrained values: nothing is drawn
}


def prepare(method: str, r: int = 8, seed: int = 0, targets: tuple[str, ...] = ("query", "value"),
            steps: int = 100, alpha: float | None = None, variant: str = "", size: int | None = None):
    """MiniLM with a seeded head and the method applied, one of :data:`BUILDERS`: ``head``,
    ``lora``, ``adalora`` (``r`` is the target rank; the schedule needs the run's ``steps``),
    ``ia3``, ``full``, and chapter 5's ``pfeiffer``, ``houlsby``, ``prefix``, ``prompt``,
    ``unipelt-ap``, ``unipelt-apl``, and chapter 6's ``bitfit`` (the papers' settings: ``r`` and ``targets`` are LoRA's and
    AdaLoRA's alone). LoRA's ``alpha`` defaults to ``2 r``; a rank sweep that varies only the
    rank fixes it. ``variant="mean-pool"`` classifies the masked mean of the tokens
    (:func:`use_mean_pooling`). AdaLoRA's ablations (``variant``): ``no-penalty`` drops the
    orthogonality term, ``no-pruning`` trains P Λ Q at rank ``r`` from the start (no allocator
    will run). ``size`` (chapter 6's budgets, :data:`SIZED` methods only): an adapter's bottleneck
    or a prefix's or prompt's number of virtual tokens, instead of the paper's."""
    if method not in BUILDERS:
        raise ValueError(f"method must be one of {', '.join(BUILDERS)}; got {method!r}")
    if size is not None and method not in SIZED:
        raise ValueError(f"size applies to {', '.join(SIZED)} only; {method} got size={size}")
    model, tokenizer = load_encoder(num_labels=20, seed=seed)
    if variant == "mean-pool":  # the head reads the masked mean of the tokens, not [CLS] via the pooler
        use_mean_pooling(model)
    elif variant and method != "adalora":
        raise ValueError(f"variant must be '' or 'mean-pool' for {method}, got {variant!r}")
    build = BUILDERS[method]
    if build.seeded:
        seed_everything(seed)
    build.apply(model, Options(r, tuple(targets), steps, alpha, variant, size))
    return model, tokenizer


def run_classification(method: str, r: int = 8, seed: int = 0, scale: Scale | None = None,
                       progress: bool = False, return_model: bool = False, steps: int | None = None,
                       targets: tuple[str, ...] = ("query", "value"), after_step=None,
                       lr: float | None = None):
    """Fine-tune MiniLM on 20 Newsgroups with one method; return a record (and the model).

    AdaLoRA runs get its penalty and allocator wired into the loop, and their record holds the
    final rank of every layer and the budget at every pruning step; ``after_step`` (e.g. a
    probe that logs scores) runs after the allocator."""
    scale = scale or current_scale()
    steps = steps or scale.steps
    model, tokenizer = prepare(method, r, seed, targets, steps)
    train_data, test_data = newsgroups(scale, tokenizer)
    config = TrainConfig(steps=steps, batch_size=scale.batch_size, lr=lr or LEARNING_RATES[method],
                         seed=seed, bf16=torch.cuda.is_available(), progress=progress)
    extra_loss, hook, allocator = None, after_step, None
    if method == "adalora":
        allocator = adalora.RankAllocator(model, model.peft_config)
        model.rank_allocator = allocator  # for probes, like peft's model.base_model.rankallocator
        weight = model.peft_config.orth_reg_weight
        extra_loss = lambda m: weight * adalora.orthogonal_regularization(m)  # noqa: E731

        def hook(m, step):
            allocator.update_and_allocate(m, step)
            if after_step is not None:
                after_step(m, step)
    result = train(model, train_data, config, extra_loss=extra_loss, after_step=hook)
    trainable, total = count_parameters(model)
    record = {"method": method, "r": r if method in ("lora", "adalora") else None, "seed": seed,
              "scale": scale.name, "targets": list(targets) if method in ("lora", "adalora") else None,
              "train_config": asdict(config), "accuracy": evaluate_accuracy(model, test_data),
              "trainable": trainable, "total": total, "train_seconds": result.seconds,
              "final_loss": sum(result.losses[-10:]) / 10, "peak_memory_mb": result.peak_memory_mb}
    if allocator is not None:
        record["ranks"] = adalora.ranks(model)
        record["final_adapter_parameters"] = adalora.kept_parameters(model)
        record["budget_history"] = allocator.history
    return (record, model) if return_model else record


def lora_rank_sweep(scale: Scale) -> list[dict]:
    """Head only, LoRA (q, v) at r = 1, 2, 4, 8, 16, and full fine-tuning; seed 0."""
    runs = [("head", 8)] + [("lora", r) for r in (1, 2, 4, 8, 16)] + [("full", 8)]
    return [run_classification(m, r=r, seed=0, scale=scale, progress=True) for m, r in runs]


# The six kinds of linear matrix in each BERT layer, by their path inside ``encoder.layer[i]``.
MATRIX_KINDS = {"query": "attention.self.query", "key": "attention.self.key",
                "value": "attention.self.value", "attn.out": "attention.output.dense",
                "ffn.in": "intermediate.dense", "ffn.out": "output.dense"}
TRUNCATION_RANKS = (0, 1, 2, 4, 8, 16, 32, 64, None)  # None: the whole update


def encoder_matrices(model) -> dict[tuple[int, str], torch.Tensor]:
    """Every encoder weight matrix of a BERT classifier, keyed ``(layer, kind)``, as a CPU copy."""
    return {(i, kind): layer.get_submodule(path).weight.detach().float().cpu().clone()
            for i, layer in enumerate(model.bert.encoder.layer) for kind, path in MATRIX_KINDS.items()}


@torch.no_grad()
def set_encoder_matrices(model, matrices: dict[tuple[int, str], torch.Tensor]) -> None:
    for (i, kind), w in matrices.items():
        weight = model.bert.encoder.layer[i].get_submodule(MATRIX_KINDS[kind]).weight
        weight.copy_(w.to(weight.device, weight.dtype))


def truncated_update_accuracy(model, W0: dict, delta: dict, test_data, ranks=TRUNCATION_RANKS) -> dict:
    """Accuracy of ``model`` with every encoder matrix set to ``W0 + [ΔW]_r`` (Eckart–Young
    truncation of its update), for each ``r``. ``r = 0`` drops the matrix updates, ``None``
    keeps them whole; every other parameter keeps its fine-tuned value. Restores the model."""
    accuracy = {}
    for r in ranks:
        set_encoder_matrices(model, {key: W0[key] + (d if r is None else torch.zeros_like(d) if r == 0
                                                      else svd.low_rank_approx(d, min(r, *d.shape)))
                                     for key, d in delta.items()})
        accuracy["full" if r is None else str(r)] = evaluate_accuracy(model, test_data)
    set_encoder_matrices(model, {key: W0[key] + d for key, d in delta.items()})
    return accuracy


def update_rank(scale: Scale, steps: int, seed: int = 0, progress: bool = True) -> tuple[dict, dict, dict]:
    """Fully fine-tune MiniLM for ``steps`` steps; measure each update ``ΔW = W_ft − W_0``:
    its spectrum and what accuracy survives when every update is cut to rank ``r``.
    Returns ``(record, W0, delta)``; the record holds the singular values of every ΔW."""
    W0 = encoder_matrices(load_encoder(num_labels=20, seed=seed)[0])
    record, model = run_classification("full", seed=seed, scale=scale, progress=progress,
                                       return_model=True, steps=steps)
    delta = {key: w - W0[key] for key, w in encoder_matrices(model).items()}
    _, test_data = newsgroups(scale, load_encoder(num_labels=20)[1])
    record["truncation_accuracy"] = truncated_update_accuracy(model, W0, delta, test_data)
    record["delta_singular_values"] = {f"{i}.{kind}": [float(f"{s:.6g}") for s in svd.singular_values(d)]
                                       for (i, kind), d in delta.items()}
    return record, W0, delta


def update_rank_grid(scale: Scale) -> list[dict]:
    """The SVD chapter's experiment: full fine-tuning for the scale's steps (the run the
    chapter repeats live) and for eight times as many."""
    return [update_rank(scale, steps)[0] for steps in (scale.steps, 8 * scale.steps)]


def adalora_vs_lora(scale: Scale) -> list[dict]:
    """AdaLoRA against LoRA on all six matrix types at two final budgets (average rank 2 and 8,
    as the paper's GLUE table), three seeds each."""
    return [run_classification(method, r=budget, seed=seed, scale=scale, targets=ALL_SIX, progress=True)
            for budget in (2, 8) for seed in (0, 1, 2) for method in ("lora", "adalora")]


IA3_LEARNING_RATES = (6e-3, 2e-2, 6e-2)


def ia3_learning_rate(scale: Scale) -> list[dict]:
    """(IA)³ at LoRA's learning rate and at 3x and 10x more, with LoRA r = 8 (q, v) for
    reference; seed 0. Same process, same machine, so the training times compare too."""
    runs = [run_classification("ia3", seed=0, scale=scale, lr=lr, progress=True) for lr in IA3_LEARNING_RATES]
    return runs + [run_classification("lora", r=8, seed=0, scale=scale, progress=True)]


GRIDS = {"ia3_learning_rate": ia3_learning_rate, "lora_rank_sweep": lora_rank_sweep, "update_rank": update_rank_grid, "adalora_vs_lora": adalora_vs_lora,
         "ia3_vs_icl": fewshot.ia3_vs_icl}


def record_path(name: str, scale: str) -> Path:
    return RESULTS / f"{name}-{scale}.json"


# the resumable grids of grid.py (grid.PROTOCOL_GRIDS), which `python -m peft_minimal.experiments` hands on
PROTOCOL_GRID_NAMES = ("protocol", "unipelt", "compare", "gpu")


def load_record(name: str, scale: str) -> dict:
    path = record_path(name, scale)
    if not path.is_file():
        raise FileNotFoundError(f"no record {path}; run `python -m peft_minimal.experiments {name} --scale {scale}`")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(GRIDS) + list(PROTOCOL_GRID_NAMES))
    parser.add_argument("--scale", choices=sorted(SCALES), default=current_scale().name)
    args = parser.parse_args(argv)
    if args.name in PROTOCOL_GRID_NAMES:  # the resumable protocol grids live in grid.py
        from . import grid
        return grid.main([args.name, "--scale", args.scale])
    start = time.time()
    runs = GRIDS[args.name](SCALES[args.scale])
    record = {"name": args.name, "scale": asdict(SCALES[args.scale]), "environment": environment(),
              "wall_seconds": time.time() - start, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    record_path(args.name, args.scale).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {record_path(args.name, args.scale)} ({len(runs)} runs, {record['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
