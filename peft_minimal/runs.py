"""The book's protocol, one run at a time: what a run is, how it trains, how it is scored.

A :class:`RunSpec` names one run (method, rate, seed, K per class, rank, targets); a
:class:`Protocol` fixes its sizes at a scale. :func:`run_protocol` trains on K examples per
class of the pool left after the validation split (``protocol.carve_validation``), records a
learning curve on validation, keeps the best point and reads the whole test split once
(:func:`score_on_test`). A run that may lose a rate grid does not read the test split: its kept
weights wait at :func:`state_path` until :func:`finish_on_test` reads the winner. The grids that
run many of these (rates, seeds, records) are in ``grid.py``::

    few_shot(pool, K, seed) ──► train, curve on validation ──► best point ──► test split (once)
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import adalora, unipelt
from .data import load_text_classification, tokenize
from .experiments import current_scale, prepare
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
    size: int | None = None  # an adapter's bottleneck b, a prefix's or prompt's P; None: the paper's setting

    def key(self) -> str:
        parts = [self.method, f"k={self.k or 'all'}", f"seed={self.seed}"]
        if self.method in ("lora", "adalora"):
            parts += [f"r={self.r}", "t=" + ",".join(self.targets)]
        if self.size is not None:
            parts.append(f"size={self.size}")
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
    model, tokenizer = prepare(spec.method, spec.r, spec.seed, spec.targets, steps, LORA_ALPHA, spec.variant, spec.size)
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


def replay(recorded: dict, proto: Protocol, stop_at: int, return_model: bool = False) -> dict:
    """Re-run the first ``stop_at`` steps of a ``recorded`` run on this machine and set each
    live curve point beside the recorded one: the chapters' check that a record's numbers come
    from the code they show. ``accuracy_gap`` is the largest validation-accuracy difference,
    ``loss_gap`` the largest relative validation-loss difference; the model is kept on request."""
    spec = RunSpec(**{**recorded["spec"], "targets": tuple(recorded["spec"]["targets"])})
    live, model = run_protocol(spec, proto, return_model=True, stop_at=stop_at)
    pairs = list(zip(live["curve"], recorded["curve"]))
    out = {"spec": spec, "live": live, "pairs": pairs,
           "accuracy_gap": max(abs(a["val_accuracy"] - b["val_accuracy"]) for a, b in pairs),
           "loss_gap": max(abs(a["val_loss"] - b["val_loss"]) / b["val_loss"] for a, b in pairs)}
    return {**out, "model": model} if return_model else out


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
        model, _ = prepare(spec.method, spec.r, spec.seed, spec.targets, run["steps"], LORA_ALPHA, spec.variant, spec.size)
        model.load_state_dict(torch.load(path), strict=False)
        fields = score_on_test(model.to(device()), proto)
    else:
        again, model = run_protocol(spec, proto, progress=True, return_model=True)
        fields = again if again["curve"] != run["curve"] else score_on_test(model, proto)
    return record.update(key, fields)
