"""Recorded experiment grids: ``python -m peft_minimal.experiments NAME [--scale ci|full]``.

A grid too big for a chapter's five CI minutes runs here and writes
``results/NAME-<scale>.json`` with every run's config, metrics, seed, time, device and
package versions. Chapters read the record for their charts and re-run one configuration
live, checking it against the record. Chapters and grids share :func:`run_classification`,
so a live run and a recorded run with the same arguments are the same computation.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import adalora, fewshot, ia3, lora, svd
from .data import load_text_classification, tokenize
from .layers import count_parameters
from .models import device, load_encoder
from .record import environment
from .train import TrainConfig, evaluate_accuracy, seed_everything, train, trainable_state

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


def prepare(method: str, r: int = 8, seed: int = 0, targets: tuple[str, ...] = ("query", "value"),
            steps: int = 100, alpha: float | None = None, variant: str = ""):
    """MiniLM with a seeded head and the method applied: ``head``, ``lora``, ``adalora``
    (``r`` is the target rank; the schedule needs the run's ``steps``), ``ia3`` or ``full``.
    LoRA's ``alpha`` defaults to ``2 r``; a rank sweep that varies only the rank fixes it.
    AdaLoRA's ablations (``variant``): ``no-penalty`` drops the orthogonality term,
    ``no-pruning`` trains P Λ Q at rank ``r`` from the start (no allocator will run)."""
    model, tokenizer = load_encoder(num_labels=20, seed=seed)
    if method == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")
    elif method == "lora":
        seed_everything(seed)  # lora_A's Kaiming draw
        lora.add_lora(model, lora.LoRAConfig(r=r, alpha=alpha or 2 * r, target_modules=list(targets),
                                             modules_to_save=["classifier"]))
    elif method == "ia3":
        ia3.add_ia3(model, ia3.IA3Config.for_model(model, modules_to_save=["classifier"]))
    elif method == "adalora":
        seed_everything(seed)  # P and Q's normal draws
        config = adalora_config(r, steps, targets)
        if variant == "no-penalty":
            config = replace(config, orth_reg_weight=0.0)
        elif variant == "no-pruning":  # rank r throughout; target_r is then never used
            config = replace(config, init_r=r, target_r=r - 1, alpha=2 * r)
        elif variant:
            raise ValueError(f"AdaLoRA variant must be '', 'no-penalty' or 'no-pruning', got {variant!r}")
        adalora.add_adalora(model, config)
    elif method != "full":
        raise ValueError(f"method must be head, lora, adalora, ia3 or full, got {method!r}")
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


# ── the protocol (see protocol.py): validation-tuned rates, learning curves, seeds ─────────
@dataclass(frozen=True)
class Protocol:
    """The sizes of the book's protocol at one scale. ``steps[k]`` is the run length for K
    examples per class (``None``: the whole pool), chosen from a pilot so that curves plateau."""

    name: str
    max_length: int
    validation_per_class: int
    batch_size: int
    steps: tuple[tuple[int | None, int], ...]
    evaluations: int = 8  # learning-curve points per run

    def steps_for(self, k: int | None) -> int:
        return dict(self.steps)[k]

    def eval_every(self, k: int | None) -> int:
        return max(1, self.steps_for(k) // self.evaluations)

    def fixed(self) -> dict:
        """What every run of a record shares (run lengths are part of each run's key)."""
        return {"name": self.name, "max_length": self.max_length,
                "validation_per_class": self.validation_per_class, "batch_size": self.batch_size}

    def key(self, spec: "RunSpec") -> str:
        return spec.key() if spec.method == "probe" else f"{spec.key()}|steps={self.steps_for(spec.k)}"


PROTOCOLS = {
    "ci": Protocol("ci", max_length=64, validation_per_class=25, batch_size=32,
                   steps=((16, 200), (64, 400), (None, 1200))),
    "full": Protocol("full", max_length=256, validation_per_class=50, batch_size=32,
                     steps=((16, 300), (64, 600), (None, 3000))),
}

# Each method's learning-rate grid (≥ 3 values, a factor of ~3 apart), searched on validation.
LR_GRIDS = {"head": (3e-3, 1e-2, 3e-2), "lora": (1e-3, 3e-3, 1e-2), "adalora": (1e-3, 3e-3, 1e-2),
            "ia3": (1e-2, 3e-2, 1e-1), "full": (3e-5, 1e-4, 3e-4)}
LORA_ALPHA = 16  # fixed across ranks (LoRA §4.1): a rank sweep varies only the rank


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning (or probe) run of the protocol; its :meth:`key` names it in a record."""

    method: str  # probe, head, lora, adalora, ia3, full
    lr: float = 0.0
    seed: int = 0
    k: int | None = None
    r: int = 8
    targets: tuple[str, ...] = ("query", "value")
    variant: str = ""  # AdaLoRA ablations: "no-penalty", "no-pruning"

    def key(self) -> str:
        parts = [self.method, f"k={self.k or 'all'}", f"seed={self.seed}"]
        if self.method in ("lora", "adalora"):
            parts += [f"r={self.r}", "t=" + ",".join(self.targets)]
        if self.variant:
            parts.append(f"v={self.variant}")
        if self.method != "probe":
            parts.append(f"lr={self.lr:g}")
        return "|".join(parts)


def current_protocol() -> Protocol:
    return PROTOCOLS[current_scale().name]


@functools.lru_cache(maxsize=4)
def protocol_data(max_length: int, validation_per_class: int):
    """``(pool, validation, test)`` texts and the tokenized validation and test sets."""
    from .protocol import carve_validation

    pool, validation = carve_validation(load_text_classification("20newsgroups", "train"), validation_per_class)
    test = load_text_classification("20newsgroups", "test")
    tokenizer = load_encoder(num_labels=20)[1]
    return pool, validation, test, tokenize(tokenizer, validation, max_length), tokenize(tokenizer, test, max_length)


def run_probe(spec: RunSpec, proto: Protocol) -> dict:
    """The linear probe on frozen mean-pooled features; ``C`` chosen on validation."""
    from .protocol import few_shot, linear_probe, mean_pooled_features, pack_correct

    pool, validation, test, _, _ = protocol_data(proto.max_length, proto.validation_per_class)
    train_texts = few_shot(pool, spec.k, spec.seed)
    model, tokenizer = load_encoder(num_labels=20)
    encoder = model.bert.to(device())
    feats = {name: mean_pooled_features(encoder, tokenizer, d.texts, proto.max_length)
             for name, d in (("train", train_texts), ("val", validation), ("test", test))}
    probe, scores = linear_probe(feats["train"], train_texts.labels, feats["val"], validation.labels)
    predictions = torch.as_tensor(probe.predict(feats["test"]))
    return {"spec": asdict(spec), "val_accuracy": max(scores.values()), "val_by_C": {str(c): v for c, v in scores.items()},
            "C": probe[-1].C, "test_accuracy": float((predictions.numpy() == test.labels).mean()),
            "test_correct": pack_correct(predictions, test.labels), "trainable": 20 * 384 + 20,
            "train_examples": len(train_texts)}


def run_protocol(spec: RunSpec, proto: Protocol | None = None, progress: bool = False,
                 return_model: bool = False, read_test: bool = True, stop_at: int | None = None):
    """One run of the protocol: train on K per class (or all) of the pool with a learning
    curve on validation, keep the best validation point, then read the whole test split once.
    With ``read_test=False`` (a rate-grid run that may lose) the test split is not read; the
    kept weights go to :func:`state_path` so :func:`finish_on_test` can read it later.
    ``stop_at`` ends the run early on its full schedule, without test: a cheap live re-check of
    the first points of a recorded learning curve."""
    from .protocol import few_shot, plateaued

    proto = proto or current_protocol()
    if spec.method == "probe":
        return run_probe(spec, proto)
    steps = proto.steps_for(spec.k)
    pool, _, _, val_set, _ = protocol_data(proto.max_length, proto.validation_per_class)
    model, tokenizer = prepare(spec.method, spec.r, spec.seed, spec.targets, steps, LORA_ALPHA, spec.variant)
    train_set = tokenize(tokenizer, few_shot(pool, spec.k, spec.seed), proto.max_length)
    config = TrainConfig(steps=steps, batch_size=proto.batch_size, lr=spec.lr, seed=spec.seed,
                         bf16=torch.cuda.is_available(), progress=progress, eval_every=proto.eval_every(spec.k),
                         stop_at=stop_at)
    extra_loss, hook = None, None
    if spec.method == "adalora":
        weight = model.peft_config.orth_reg_weight
        if weight > 0:
            extra_loss = lambda m: weight * adalora.orthogonal_regularization(m)  # noqa: E731
        if spec.variant != "no-pruning":
            hook = adalora.RankAllocator(model, model.peft_config).update_and_allocate
            # only points with the final budget may be kept, or a run could end above its budget
            config = replace(config, keep_best_after=steps - model.peft_config.tfinal)
    result = train(model, train_set, config, extra_loss=extra_loss, after_step=hook, validation=val_set)
    kept = next(point for point in result.curve if point["step"] == result.best_step)
    trainable, total = count_parameters(model)
    record = {"spec": asdict(spec), "steps": steps, "train_config": asdict(config), "curve": result.curve,
              "best_step": result.best_step, "val_accuracy": kept["val_accuracy"], "val_loss": kept["val_loss"],
              "plateaued": plateaued(result.curve), "trainable": trainable, "total": total,
              "train_seconds": result.seconds, "train_examples": len(train_set)}
    if spec.method == "adalora":
        record["ranks"] = adalora.ranks(model)
        record["final_adapter_parameters"] = adalora.kept_parameters(model)
    if stop_at is not None:  # a partial replay: neither the test split nor kept weights
        return (record, model) if return_model else record
    if read_test:
        record.update(score_on_test(model, proto))
    else:
        path = state_path(proto.key(spec))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trainable_state(model), path)
    return (record, model) if return_model else record


def score_on_test(model, proto: Protocol) -> dict:
    """Accuracy and loss on the whole test split, and which messages were right (packed)."""
    from .protocol import pack_correct
    from .train import evaluate

    _, _, test, _, test_set = protocol_data(proto.max_length, proto.validation_per_class)
    scores = evaluate(model, test_set)
    return {"test_accuracy": scores.accuracy, "test_loss": scores.loss,
            "test_correct": pack_correct(scores.predictions, test.labels)}


def state_path(key: str) -> Path:
    """Where a run that has not read the test split keeps its weights (outside git)."""
    from .protocol import CACHE

    return CACHE / "states" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def finish_on_test(record, key: str, proto: Protocol) -> dict:
    """Read the test split for the recorded run ``key`` (a rate-grid winner), from its kept
    weights, or by training it again when they are gone; a re-run whose learning curve differs
    from the recorded one (another machine) replaces it, so every number has its run."""
    run = record[key]
    if "test_accuracy" in run:
        return run
    spec = RunSpec(**{**run["spec"], "targets": tuple(run["spec"]["targets"])})
    path = state_path(key)
    if path.is_file():
        model, _ = prepare(spec.method, spec.r, spec.seed, spec.targets, run["steps"], LORA_ALPHA, spec.variant)
        model.load_state_dict(torch.load(path), strict=False)
        fields = score_on_test(model.to(device()), proto)
    else:
        again, model = run_protocol(spec, proto, progress=True, return_model=True)
        fields = again if again["curve"] != run["curve"] else score_on_test(model, proto)
    return record.update(key, fields)


def tuned_runs(record, spec: RunSpec, seeds=(0, 1, 2), proto: Protocol | None = None) -> list[dict]:
    """Runs of ``spec`` at its method's best rate (:func:`tuned_lr`): the winner of the rate
    grid is read on test, and the other seeds run at that rate."""
    proto = proto or current_protocol()
    if spec.method == "probe":
        return [record.run(proto.key(s), lambda s=s: run_protocol(s, proto)) for s in
                (replace(spec, seed=seed) for seed in seeds)]
    lr = tuned_lr(record, spec, seeds[0], proto)
    runs = [finish_on_test(record, proto.key(replace(spec, lr=lr, seed=seeds[0])), proto)]
    for seed in seeds[1:]:
        s = replace(spec, lr=lr, seed=seed)
        runs.append(record.run(proto.key(s), lambda s=s: run_protocol(s, proto, progress=True)))
    return runs


def tuned_lr(record, spec: RunSpec, seed: int = 0, proto: Protocol | None = None,
             max_extensions: int = 2) -> float:
    """The method's rate grid on one seed without reading the test split (recorded, so each
    grid point runs once), and the rate with the best validation accuracy. A best rate on the
    grid's edge is no optimum: the grid grows by the same factor beyond that edge, at most
    ``max_extensions`` times."""
    from .protocol import best_learning_rate

    proto = proto or current_protocol()
    rates = list(LR_GRIDS[spec.method])
    while True:
        grid = [replace(spec, lr=lr, seed=seed) for lr in rates]
        for s in grid:
            record.run(proto.key(s), lambda s=s: run_protocol(s, proto, progress=True, read_test=False))
        best = best_learning_rate([{"lr": s.lr, **{m: record[proto.key(s)][m] for m in ("val_accuracy", "val_loss")}}
                                   for s in grid])
        if best not in (rates[0], rates[-1]) or len(rates) - len(LR_GRIDS[spec.method]) >= max_extensions:
            return best
        step = rates[1] / rates[0] if best == rates[0] else rates[-1] / rates[-2]
        rates = [float(f"{best / step:.3g}")] + rates if best == rates[0] else rates + [float(f"{best * step:.3g}")]


def protocol_grid(proto: Protocol, record) -> None:
    """The main grid of chapters 2-4, in the order the chapters need it; resumable.

    1. K = 64 per class: the probe, LoRA r = 8 (q, v), the [CLS] head, full fine-tuning and
       (IA)³, each at its tuned rate over 3 seeds; LoRA's rank sweep (r = 1, 2, 4, 16) at
       LoRA r = 8's rate with alpha fixed, so only the rank varies.
    2. AdaLoRA against LoRA on all six matrix types at final budgets of average rank 2 and 8
       (the paper's GLUE table in miniature), each at its own tuned rate; at budget 2, AdaLoRA
       without its orthogonality penalty and without pruning (the SVD form alone), at
       AdaLoRA's rate.
    3. The same as 1 at K = 16 per class."""
    def seeds_at(spec: RunSpec, lr: float) -> None:
        for seed in (0, 1, 2):
            s = replace(spec, lr=lr, seed=seed)
            record.run(proto.key(s), lambda s=s: run_protocol(s, proto, progress=True))

    def block(k: int) -> None:
        for spec in (RunSpec("probe", k=k), RunSpec("lora", k=k, r=8), RunSpec("head", k=k),
                     RunSpec("full", k=k), RunSpec("ia3", k=k)):
            tuned_runs(record, spec, proto=proto)
        lr = tuned_lr(record, RunSpec("lora", k=k, r=8), proto=proto)
        for r in (1, 2, 4, 16):
            seeds_at(RunSpec("lora", k=k, r=r), lr)

    block(64)
    for budget in (2, 8):
        for method in ("lora", "adalora"):
            tuned_runs(record, RunSpec(method, k=64, r=budget, targets=ALL_SIX), proto=proto)
    lr = tuned_lr(record, RunSpec("adalora", k=64, r=2, targets=ALL_SIX), proto=proto)
    for variant in ("no-penalty", "no-pruning"):
        seeds_at(RunSpec("adalora", k=64, r=2, targets=ALL_SIX, variant=variant), lr)
    block(16)


GRIDS = {"ia3_learning_rate": ia3_learning_rate, "lora_rank_sweep": lora_rank_sweep, "update_rank": update_rank_grid, "adalora_vs_lora": adalora_vs_lora,
         "ia3_vs_icl": fewshot.ia3_vs_icl}


def record_path(name: str, scale: str) -> Path:
    return RESULTS / f"{name}-{scale}.json"


def load_record(name: str, scale: str) -> dict:
    path = record_path(name, scale)
    if not path.is_file():
        raise FileNotFoundError(f"no record {path}; run `python -m peft_minimal.experiments {name} --scale {scale}`")
    return json.loads(path.read_text())


PROTOCOL_GRIDS = {"protocol": protocol_grid}


def open_record(name: str, proto: Protocol):
    """The resumable record ``results/NAME-<scale>.json`` of a protocol grid."""
    from .record import Record

    return Record.open(record_path(name, proto.name), name=name, scale=proto.fixed())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(GRIDS) + sorted(PROTOCOL_GRIDS))
    parser.add_argument("--scale", choices=sorted(SCALES), default=current_scale().name)
    args = parser.parse_args(argv)
    start = time.time()
    if args.name in PROTOCOL_GRIDS:  # resumable: every finished run is in the file at once
        record = open_record(args.name, PROTOCOLS[args.scale])
        before = len(record)
        PROTOCOL_GRIDS[args.name](PROTOCOLS[args.scale], record)
        print(f"{record.path}: {len(record) - before} new runs, {len(record)} in all, {time.time() - start:.0f} s")
        return
    runs = GRIDS[args.name](SCALES[args.scale])
    record = {"name": args.name, "scale": asdict(SCALES[args.scale]), "environment": environment(),
              "wall_seconds": time.time() - start, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    record_path(args.name, args.scale).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {record_path(args.name, args.scale)} ({len(runs)} runs, {record['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
