"""The book's measuring protocol as runs: ``python -m peft_minimal.grid [--scale ci|full]``.

A :class:`RunSpec` names one run (method, rate, seed, K per class, rank, targets); a
:class:`Protocol` fixes its sizes at a scale. :func:`run_protocol` trains on K examples per
class of the pool left after the validation split (``protocol.carve_validation``), records a
learning curve on validation, keeps the best point and reads the whole test split once.
:func:`tuned_lr` picks each method's rate on validation alone; :func:`tuned_runs` adds seeds.
:func:`protocol_grid` is the grid chapters 1-4 read, written run by run to
``results/protocol-<scale>.json`` so that a grid cut off anywhere resumes where it stopped;
:func:`unipelt_grid` (``python -m peft_minimal.grid unipelt``) is chapter 5's, in
``results/unipelt-<scale>.json``::

    rate grid (seed 0, validation only) ──► best rate ──► its kept weights read on test
                                                  └─────► seeds 1, 2 at that rate, read on test
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import adalora, unipelt
from .data import load_text_classification, tokenize
from .experiments import ALL_SIX, SCALES, current_scale, prepare, record_path
from .layers import count_parameters
from .models import device, load_encoder
from .train import TrainConfig, train, trainable_state

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
            "ia3": (1e-2, 3e-2, 1e-1), "full": (3e-5, 1e-4, 3e-4),
            # chapter 5 (unipelt_grid). Adapters: the papers' 1e-4..1e-3, times LoRA's shift at this
            # scale (its papers' ~5e-4 became 3e-3 here). Prompt tuning: a few input vectors need
            # large rates (peft's 3e-2; Lester et al. 0.3). A prefix trained through its MLP (and so
            # UniPELT, which holds one) is the exception: its 2.4M-parameter MLP moves the prefix
            # fast, and in a 20-step pilot loss stayed at ln 20 at 1e-2 (UniPELT) and 3e-2 (prefix)
            # where the Pfeiffer adapter alone at 1e-2 fell from 3.0 to 2.2. Papers train prefixes
            # below 1e-3 (Li & Liang: ~5e-5); the random head shares the rate and must still learn
            # in 200 steps, so the grid starts at 3e-4 (tuned_lr extends it past an edge).
            "pfeiffer": (1e-3, 3e-3, 1e-2), "houlsby": (1e-3, 3e-3, 1e-2), "prompt": (1e-2, 3e-2, 1e-1),
            "prefix": (3e-4, 1e-3, 3e-3), "unipelt-ap": (3e-4, 1e-3, 3e-3), "unipelt-apl": (3e-4, 1e-3, 3e-3),
            # chapter 6: BitFit's paper searched 1e-4..1e-3 on BERT; shifted like LoRA's at this scale
            "bitfit": (1e-3, 3e-3, 1e-2)}
LORA_ALPHA = 16  # fixed across ranks (LoRA §4.1): a rank sweep varies only the rank


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning (or probe) run of the protocol; its :meth:`key` names it in a record."""

    method: str  # probe, or a method of experiments.BUILDERS (head, lora, ..., unipelt-apl)
    lr: float = 0.0
    seed: int = 0
    k: int | None = None
    r: int = 8
    targets: tuple[str, ...] = ("query", "value")
    variant: str = ""  # "mean-pool"; AdaLoRA's ablations "no-penalty", "no-pruning"

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
    from .protocol import StepClock, few_shot, plateaued

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
    # AdaLoRA's allocator stays the hook itself: checkpointing finds a stateful hook by its bound method
    clock = StepClock() if hook is None else None
    result = train(model, train_set, config, extra_loss=extra_loss, after_step=hook or clock, validation=val_set)
    kept = next(point for point in result.curve if point["step"] == result.best_step)
    trainable, total = count_parameters(model)
    record = {"spec": asdict(spec), "steps": steps, "train_config": asdict(config), "curve": result.curve,
              "best_step": result.best_step, "val_accuracy": kept["val_accuracy"], "val_loss": kept["val_loss"],
              "plateaued": plateaued(result.curve), "trainable": trainable, "total": total,
              "train_seconds": result.seconds, "seconds_per_step": clock and clock.seconds_per_step(),
              "train_examples": len(train_set)}
    if spec.method == "adalora":
        record["ranks"] = adalora.ranks(model)
        record["final_adapter_parameters"] = adalora.kept_parameters(model)
    if spec.method.startswith("unipelt"):
        record["gates"] = validation_gates(model, val_set)
    if stop_at is not None:  # a partial replay: neither the test split nor kept weights
        return (record, model) if return_model else record
    if read_test:
        record.update(score_on_test(model, proto))
    else:
        path = state_path(proto.key(spec))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(trainable_state(model), path)
    return (record, model) if return_model else record


GATE_MESSAGES = 256  # validation messages the recorded gate means average over (one extra pass)


def validation_gates(model, val_set, n: int = GATE_MESSAGES, batch_size: int = 64) -> dict[str, list[float]]:
    """UniPELT's gates at the model's (kept) weights, each averaged over the first ``n`` validation
    messages: ``component -> one mean per layer`` (:func:`unipelt.mean_gate_values`)."""
    from torch.utils.data import DataLoader, Subset

    from .train import model_inputs

    dev = next(model.parameters()).device
    loader = DataLoader(Subset(val_set, range(min(n, len(val_set)))), batch_size=batch_size)
    batches = ({k: v for k, v in model_inputs(b, dev).items() if k != "labels"} for b in loader)
    return {c: [round(g, 5) for g in gs] for c, gs in unipelt.mean_gate_values(model, batches).items()}


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


def truncation(record, truncations, spec: RunSpec, proto: Protocol) -> dict:
    """Chapter 1's experiment on the protocol: the tuned full fine-tuning run ``spec`` (from
    its kept weights, or trained again), every one of its 36 matrix updates
    ``ΔW = W_ft - W_0`` cut to rank r (Eckart-Young) and the whole test split read at each r;
    written to the record ``truncations`` under the run's key, with every ΔW's spectrum."""
    from . import svd
    from .experiments import encoder_matrices, truncated_update_accuracy

    spec = replace(spec, lr=tuned_lr(record, spec, 0, proto))
    key = proto.key(spec)

    def compute() -> dict:
        path = state_path(key)
        if path.is_file():
            model, _ = prepare(spec.method, spec.r, spec.seed, spec.targets, proto.steps_for(spec.k), LORA_ALPHA)
            model.load_state_dict(torch.load(path), strict=False)
        else:
            model = run_protocol(spec, proto, progress=True, return_model=True, read_test=False)[1]
        W0 = encoder_matrices(prepare(spec.method, seed=spec.seed)[0])
        delta = {name: w - W0[name] for name, w in encoder_matrices(model).items()}
        test_set = protocol_data(proto.max_length, proto.validation_per_class)[4]
        return {"of": key, "spec": asdict(spec),
                "truncation_accuracy": truncated_update_accuracy(model.to(device()), W0, delta, test_set),
                "delta_singular_values": {f"{i}.{kind}": [float(f"{s:.6g}") for s in svd.singular_values(d)]
                                          for (i, kind), d in delta.items()}}

    return truncations.run(key, compute)


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


def doubled(proto: Protocol) -> Protocol:
    """The same protocol with every run twice as long (and curve points twice as far apart)."""
    return replace(proto, steps=tuple((k, 2 * steps) for k, steps in proto.steps))


def plateau_check(record, spec: RunSpec, proto: Protocol) -> dict:
    """Seed 0 of ``spec`` at its tuned rate, trained for twice the protocol's steps, on
    validation only. A linear decay to 0 flattens the end of any curve, so a flat end alone
    does not show a plateau; the same run twice as long does: if its best validation accuracy
    is no higher, the protocol trained long enough."""
    lr = tuned_lr(record, spec, 0, proto)
    long, s = doubled(proto), replace(spec, lr=lr, seed=0)
    return record.run(long.key(s), lambda: run_protocol(s, long, progress=True, read_test=False))


def protocol_grid(proto: Protocol, record) -> None:
    """The main grid of chapters 1-4, in the order the chapters need it; resumable.

    1. K = 64 per class: the probe, LoRA r = 8 (q, v), the [CLS] head, full fine-tuning and
       (IA)³, each at its tuned rate over 3 seeds; the tuned full run's updates cut to rank r
       (:func:`truncation`, chapter 1).
    2. AdaLoRA against LoRA on all six matrix types at a final budget of average rank 2 (the
       paper's lowest budget, where it claims the largest gap), each at its own tuned rate.
    3. LoRA and full fine-tuning once more with twice the steps (:func:`plateau_check`).
    4. At budget 2, AdaLoRA without its orthogonality penalty and without pruning (the SVD form
       alone), at AdaLoRA's rate.
    5. LoRA r = 8 and the head reading the masked mean of the tokens (the probe's pooling)
       instead of [CLS] through the untrained pooler, each tuned; LoRA's rank sweep
       (r = 1, 2, 4, 16) at LoRA r = 8's rate with alpha fixed, so only the rank varies.
    6. The same as 1, 3 and 5 at K = 16 per class; then LoRA and AdaLoRA at budget 8."""
    def seeds_at(spec: RunSpec, lr: float) -> None:
        for seed in (0, 1, 2):
            s = replace(spec, lr=lr, seed=seed)
            record.run(proto.key(s), lambda s=s: run_protocol(s, proto, progress=True))

    def baselines(k: int) -> None:
        for spec in (RunSpec("probe", k=k), RunSpec("lora", k=k, r=8), RunSpec("head", k=k),
                     RunSpec("full", k=k), RunSpec("ia3", k=k)):
            tuned_runs(record, spec, proto=proto)
        truncation(record, open_record("truncation", proto), RunSpec("full", k=k), proto)

    def adalora_budget(budget: int) -> None:
        for method in ("lora", "adalora"):
            tuned_runs(record, RunSpec(method, k=64, r=budget, targets=ALL_SIX), proto=proto)

    def pooling_and_rank(k: int) -> None:
        for spec in (RunSpec("lora", k=k, r=8), RunSpec("full", k=k)):
            plateau_check(record, spec, proto)
        for spec in (RunSpec("lora", k=k, r=8, variant="mean-pool"), RunSpec("head", k=k, variant="mean-pool")):
            tuned_runs(record, spec, proto=proto)  # the probe's pooling, trained: separates pooling from adapting
        lr = tuned_lr(record, RunSpec("lora", k=k, r=8), proto=proto)
        for r in (1, 2, 4, 16):
            seeds_at(RunSpec("lora", k=k, r=r), lr)

    baselines(64)
    adalora_budget(2)
    for spec in (RunSpec("lora", k=64, r=8), RunSpec("full", k=64)):
        plateau_check(record, spec, proto)
    lr = tuned_lr(record, RunSpec("adalora", k=64, r=2, targets=ALL_SIX), proto=proto)
    for variant in ("no-penalty", "no-pruning"):
        seeds_at(RunSpec("adalora", k=64, r=2, targets=ALL_SIX, variant=variant), lr)
    pooling_and_rank(64)
    baselines(16)
    pooling_and_rank(16)
    adalora_budget(8)  # chapter 6's second budget (the paper's 1.27M of DeBERTaV3-base, in miniature)


UNIPELT_METHODS = ("pfeiffer", "houlsby", "prefix", "prompt", "unipelt-ap", "unipelt-apl")


def unipelt_grid(proto: Protocol, record) -> None:
    """Chapter 5's grid, resumable: at K = 16 per class, then K = 64, the Pfeiffer and Houlsby
    adapters, prefix and prompt tuning, UniPELT-AP and -APL, each at its tuned rate over 3 seeds
    (:func:`tuned_runs`). The baselines (probe, LoRA r = 8, full, head) are the main grid's, at
    the same protocol: ``report.final_runs_in`` reads a configuration from either record."""
    for k in (16, 64):
        for method in UNIPELT_METHODS:
            tuned_runs(record, RunSpec(method, k=k), proto=proto)


PROTOCOL_GRIDS = {"protocol": protocol_grid, "unipelt": unipelt_grid}


def open_record(name: str, proto: Protocol):
    """The resumable record ``results/NAME-<scale>.json`` of a protocol grid."""
    from .record import Record

    return Record.open(record_path(name, proto.name), name=name, scale=proto.fixed())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="protocol", choices=sorted(PROTOCOL_GRIDS))
    parser.add_argument("--scale", choices=sorted(SCALES), default=current_scale().name)
    args = parser.parse_args(argv)
    start = time.time()
    record = open_record(args.name, PROTOCOLS[args.scale])
    before = len(record)
    PROTOCOL_GRIDS[args.name](PROTOCOLS[args.scale], record)
    print(f"{record.path}: {len(record) - before} new runs, {len(record)} in all, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
