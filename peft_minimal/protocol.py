"""How the book measures: splits, tuned rates, learning curves, seeds, intervals, a probe.

Every comparison in the book goes through this module, so every chapter measures the same way::

    20 Newsgroups train (11,314) ──┬── validation: V per class, seeded (picks rates and steps)
                                   └── pool ──> K per class, seeded by the run (low-data axis)
    20 Newsgroups test (7,532)   ───── read once per finished run: the final numbers

1. **Splits** (:func:`carve_validation`, :func:`per_class`): stratified and seeded. The
   validation split is the same for every run; a low-data run draws its K examples per class
   from the rest with its own seed, so seeds vary the data as well as the initialisation.
2. **Learning curves and steps**: each run evaluates on validation every ``eval_every`` steps
   and keeps its best validation point (``train.TrainConfig.keep_best``); :func:`plateaued`
   says whether the curve had flattened by the end; :class:`StepClock` times a training step
   without the curve's validation passes.
3. **Tuned rates** (:func:`best_learning_rate`): each method gets the rate of its grid
   (≥ 3 values, seed 0) with the best validation accuracy.
4. **Seeds and intervals**: mean ± std over seeds (:func:`mean_std`); differences as paired
   95% intervals, paired by seed (:func:`paired_interval`, Student's t) or over test messages
   (:func:`bootstrap_interval`); :func:`verdict` says "A beats B" only when 0 is outside.
5. **Baselines**: a linear probe on cached mean-pooled features of the frozen encoder
   (:func:`linear_probe`; all-MiniLM-L6-v2 was trained with mean pooling) and, in
   ``experiments``, the head on BERT's [CLS] pooler (a pooler this model never trained).
"""
from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import TextData

CACHE = Path(os.environ.get("PEFT_CACHE", Path.home() / ".cache" / "peft_minimal"))


# ── 1. splits ────────────────────────────────────────────────────────────────────────────
def per_class(labels: Sequence[int], k: int, seed: int) -> tuple[list[int], list[int]]:
    """Indices of ``k`` seeded random examples of every class, and of all the others.

    Raises ``ValueError`` if a class has fewer than ``k`` examples, because a silently
    smaller class would make "K per class" untrue.
    """
    labels = np.asarray(labels)
    if k < 1:
        raise ValueError(f"k must be at least 1 example per class, got {k}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise ValueError(f"class {c} has {len(members)} examples, fewer than k={k}")
        picked.extend(rng.permutation(members)[:k].tolist())
    chosen = set(picked)
    return sorted(picked), [i for i in range(len(labels)) if i not in chosen]


def take(data: TextData, indices: Sequence[int]) -> TextData:
    return TextData([data.texts[i] for i in indices], [data.labels[i] for i in indices], data.label_names)


def carve_validation(train: TextData, per_label: int, seed: int = 0) -> tuple[TextData, TextData]:
    """``(pool, validation)``: ``per_label`` examples of every class held out for validation."""
    held, rest = per_class(train.labels, per_label, seed)
    return take(train, rest), take(train, held)


def few_shot(pool: TextData, k: int | None, seed: int) -> TextData:
    """``k`` examples per class of ``pool`` (seeded), or the whole pool when ``k`` is None."""
    return pool if k is None else take(pool, per_class(pool.labels, k, seed)[0])


# ── 2. curves ────────────────────────────────────────────────────────────────────────────
def plateaued(curve: Sequence[dict], tolerance: float = 0.01) -> bool:
    """True if the last third of the curve gained at most ``tolerance`` validation accuracy
    over the best point before it: more steps would not have changed the verdict much."""
    accuracies = [point["val_accuracy"] for point in curve]
    if len(accuracies) < 3:
        return False
    cut = len(accuracies) - max(1, len(accuracies) // 3)
    return max(accuracies[cut:]) - max(accuracies[:cut]) <= tolerance


class StepClock:
    """An ``after_step`` hook that times optimizer steps. ``train_seconds`` includes the validation
    passes of the learning curve; the median time between consecutive steps does not (and shrugs
    off a busy machine's slow moments)."""

    def __init__(self) -> None:
        self.last, self.times = None, []

    def __call__(self, model, step: int) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now

    def seconds_per_step(self) -> float | None:
        return round(statistics.median(self.times), 4) if self.times else None


# ── 3. tuned rates ───────────────────────────────────────────────────────────────────────
def best_learning_rate(runs: Sequence[dict]) -> float:
    """The ``lr`` of the run with the best validation accuracy (lower validation loss breaks ties).

    ``runs`` are records with ``lr``, ``val_accuracy`` and ``val_loss`` (the kept point's).
    """
    if len({run["lr"] for run in runs}) < 3:
        raise ValueError("a learning rate is chosen from a grid of at least 3 values")
    return min(runs, key=lambda run: (-run["val_accuracy"], run["val_loss"]))["lr"]


# ── 4. seeds and intervals ───────────────────────────────────────────────────────────────
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Interval:
    """A difference ``a - b`` and its confidence interval."""

    difference: float
    low: float
    high: float
    n: int
    how: str

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def paired_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Interval:
    """Interval for mean(a - b) with a and b paired by seed: Student's t on the differences
    (``scipy.stats.ttest_rel``). Needs ≥ 2 pairs; with 3 seeds t has 2 degrees of freedom,
    so the interval is wide: 4.3 standard errors each way."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need at least 2 paired values, got {len(a)} and {len(b)}")
    diff = a - b
    if np.allclose(diff, diff[0]):  # t is undefined for identical differences; the interval is a point
        return Interval(float(diff.mean()), float(diff[0]), float(diff[0]), len(a), "paired t (constant)")
    ci = stats.ttest_rel(a, b).confidence_interval(confidence)
    return Interval(float(diff.mean()), float(ci.low), float(ci.high), len(a), "paired t over seeds")


def bootstrap_interval(correct_a: np.ndarray, correct_b: np.ndarray, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> Interval:
    """Interval for accuracy(a) - accuracy(b) by a paired bootstrap over test messages
    (``scipy.stats.bootstrap``). Each argument is 0/1 per message, or a seeds x messages
    array whose seed average is used: it measures test-set noise, not seed noise."""
    from scipy import stats

    a = np.asarray(correct_a, dtype=float).reshape(-1, np.shape(correct_a)[-1]).mean(0)
    b = np.asarray(correct_b, dtype=float).reshape(-1, np.shape(correct_b)[-1]).mean(0)
    res = stats.bootstrap((a - b,), np.mean, confidence_level=confidence, n_resamples=resamples,
                          method="percentile", rng=np.random.default_rng(seed))
    ci = res.confidence_interval
    return Interval(float((a - b).mean()), float(ci.low), float(ci.high), len(a), "paired bootstrap over messages")


def verdict(interval: Interval, a: str, b: str) -> str:
    """The sentence the book may write about ``a`` against ``b``, given their interval."""
    if interval.low > 0:
        return f"{a} beats {b} by {interval}"
    if interval.high < 0:
        return f"{b} beats {a} by {-interval.difference:+.3f} [{-interval.high:+.3f}, {-interval.low:+.3f}]"
    return f"no difference measured at this size between {a} and {b}: {interval}"


def pack_correct(predictions: torch.Tensor, labels: Sequence[int]) -> str:
    """0/1 correctness per message as a hex string (942 bytes for 7,532 messages), for records."""
    correct = (predictions.cpu().numpy() == np.asarray(labels)).astype(np.uint8)
    return np.packbits(correct).tobytes().hex()


def unpack_correct(packed: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))[:n]


# ── 5. the linear probe ──────────────────────────────────────────────────────────────────
@torch.no_grad()
def mean_pooled_features(encoder: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int,
                         batch_size: int = 128, cache: bool = True) -> np.ndarray:
    """Masked mean of the frozen encoder's last hidden states, L2-normalised (as
    sentence-transformers computes all-MiniLM-L6-v2's embeddings). Cached on disk by a hash of
    the model's weights, the length and the texts, so each is computed once."""
    key = hashlib.sha256(f"{max_length}|".encode())
    for name, tensor in sorted(encoder.state_dict().items()):  # ~64 entries of every tensor
        flat = tensor.detach().flatten()
        key.update(name.encode() + flat[:: max(1, flat.numel() // 64)].cpu().float().numpy().tobytes())
    for text in texts:
        key.update(text.encode("utf-8", "replace") + b"\0")
    path = CACHE / "features" / f"{key.hexdigest()[:24]}.npy"
    if cache and path.is_file():
        return np.load(path)
    encoder.eval()
    dev = next(encoder.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i: i + batch_size]), truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt").to(dev)
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu())
    features = torch.cat(out).numpy()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, features)
    return features


PROBE_C = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 10.0)


def linear_probe(train_x: np.ndarray, train_y: Sequence[int], val_x: np.ndarray, val_y: Sequence[int],
                 cs: Sequence[float] = PROBE_C, max_iter: int = 5000):
    """Multinomial logistic regression (scikit-learn, L-BFGS) on standardised features, its
    inverse regularisation ``C`` chosen on validation. Trained to convergence: raises if
    L-BFGS stops at ``max_iter``. Returns ``(fitted pipeline, {C: validation accuracy})``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scores, fitted = {}, {}
    for c in cs:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
        model.fit(train_x, train_y)
        if model[-1].n_iter_.max() >= max_iter:
            raise RuntimeError(f"the probe did not converge in {max_iter} L-BFGS iterations (C={c})")
        scores[c], fitted[c] = float(model.score(val_x, val_y)), model
    best = max(cs, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    return fitted[best], scores
