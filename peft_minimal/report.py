"""Reading a protocol record: final runs per configuration, tables, paired verdicts, curves.

The chapters draw every table and chart of the protocol grid through these few functions,
so the selection rule is written once: a configuration's *final* runs are its runs that read
the test split (the rate-grid winner and the other seeds at its rate); rate-grid losers only
appear in :func:`rate_grid`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .protocol import Interval, bootstrap_interval, mean_std, paired_interval, plateaued, unpack_correct


def matches(run: dict, selector: dict) -> bool:
    """True if the run's spec has every ``selector`` value (``targets`` compared as lists)."""
    spec = run["spec"]
    return all(list(spec[k]) == list(v) if k == "targets" else spec.get(k, "") == v for k, v in selector.items())


def final_runs(record: dict, steps: int | None = None, **selector) -> list[dict]:
    """The runs of one configuration that were read on test, ordered by seed (only those of
    ``steps`` steps, if given). A selector without ``variant`` means the plain method
    (``variant=""``).

    Raises if they disagree on the rate (one configuration has one tuned rate) or on the run
    length, or if none exist."""
    selector = {"variant": "", **selector}
    runs = sorted((r for r in record["runs"].values() if matches(r, selector) and "test_accuracy" in r
                   and (steps is None or r.get("steps") == steps)), key=lambda r: r["spec"]["seed"])
    if not runs:
        raise LookupError(f"no finished run matches {selector}; is the grid still running?")
    rates = {r["spec"]["lr"] for r in runs}
    if len(rates) > 1:
        raise ValueError(f"{selector} has final runs at several rates {sorted(rates)}; narrow it with lr=")
    lengths = {r.get("steps") for r in runs}
    if len(lengths) > 1:
        raise ValueError(f"{selector} has final runs of several lengths {sorted(lengths)}; narrow it with steps=")
    return runs


def final_runs_in(records: Sequence[dict], **selector) -> list[dict]:
    """:func:`final_runs` of a configuration from whichever of ``records`` holds it: chapter 5
    reads its own methods from the ``unipelt`` record and the baselines from the ``protocol``
    record. The records must share the protocol (``scale``); one configuration lives in one."""
    if len({repr(record["scale"]) for record in records}) > 1:
        raise ValueError(f"the records were made at different protocols: {[record['scale'] for record in records]}")
    found = []
    for record in records:
        try:
            found.append(final_runs(record, **selector))
        except LookupError:
            pass
    if len(found) != 1:
        raise LookupError(f"{len(found)} of the {len(records)} records hold final runs of {selector}; expected one")
    return found[0]


def rate_grid(record: dict, steps: int, **selector) -> list[tuple[float, float]]:
    """``(lr, validation accuracy)`` of a configuration's rate grid (seed 0, runs of ``steps``
    steps: a plateau check of twice the length is not part of the grid), by rate."""
    runs = [r for r in record["runs"].values()
            if matches(r, {"variant": "", **selector, "seed": 0}) and r.get("steps") == steps]
    return sorted({(r["spec"]["lr"], r["val_accuracy"]) for r in runs})


def unpaired_scale(accuracy: float, n: int) -> float:
    """The 95% half-width of a difference between two independent accuracies near ``accuracy``
    on ``n`` messages each: 1.96 · sqrt(2p(1 − p)/n). A loose bound for two runs read on the same
    messages: their errors are correlated, so a paired test would detect smaller differences
    than this (the bound is conservative); the book's chapters use it only as a rough scale for
    the plateau check."""
    return 1.96 * (2 * accuracy * (1 - accuracy) / n) ** 0.5


def plateau_check(record: dict, steps: int, n_val: int | None = None, **selector) -> dict:
    """The protocol's plateau check (``grid.plateau_check``) of one configuration: its seed-0
    run at the tuned rate, ``steps`` long, against the same run twice as long, by best
    validation accuracy. A ``gain`` inside the noise of a difference says the protocol's length
    was enough; a larger one, that the configuration was still learning. With ``n_val`` (the
    validation messages) the result holds that rough scale, ``noise`` (:func:`unpaired_scale`)."""
    selector = {"variant": "", **selector}
    lr = final_runs(record, **selector)[0]["spec"]["lr"]

    def run_of(length: int) -> dict:
        found = [r for r in record["runs"].values()
                 if matches(r, {**selector, "seed": 0, "lr": lr}) and r.get("steps") == length]
        if not found:
            raise LookupError(f"no {length}-step run of {selector} at lr={lr:g}; is the grid still running?")
        return found[0]

    short, long = run_of(steps), run_of(2 * steps)
    return {"lr": lr, "short": short["val_accuracy"], "short_best_step": short["best_step"],
            "long": long["val_accuracy"], "long_best_step": long["best_step"],
            "gain": long["val_accuracy"] - short["val_accuracy"], "long_curve": long["curve"],
            **({"noise": unpaired_scale(short["val_accuracy"], n_val)} if n_val else {})}


def accuracies(runs: Sequence[dict]) -> list[float]:
    return [r["test_accuracy"] for r in runs]


def summary(name: str, runs: Sequence[dict]) -> dict:
    """One table row: trainable parameters, rate, test accuracy mean ± std over seeds, and
    whether every learning curve had flattened (``None`` for runs without a curve: the probe)."""
    mean, std = mean_std(accuracies(runs))
    curves = [r["curve"] for r in runs if "curve" in r]
    return {"name": name, "trainable": runs[0]["trainable"], "lr": runs[0]["spec"].get("lr"),
            "seeds": len(runs), "mean": mean, "std": std,
            "plateaued": all(plateaued(c) for c in curves) if curves else None}


def paired(runs_a: Sequence[dict], runs_b: Sequence[dict]) -> Interval:
    """Paired-by-seed 95% interval of accuracy(a) - accuracy(b), over the seeds both have."""
    a = {r["spec"]["seed"]: r["test_accuracy"] for r in runs_a}
    b = {r["spec"]["seed"]: r["test_accuracy"] for r in runs_b}
    seeds = sorted(a.keys() & b.keys())
    return paired_interval([a[s] for s in seeds], [b[s] for s in seeds])


def gap_change(a_1: Sequence[dict], b_1: Sequence[dict], a_2: Sequence[dict], b_2: Sequence[dict]) -> Interval:
    """Paired-by-seed 95% interval of how much a gap changes between two settings:
    ``(acc(a_1) - acc(b_1)) - (acc(a_2) - acc(b_2))`` per seed (e.g. AdaLoRA minus LoRA at the low
    budget against the same at the high budget), over the seeds all four have. Runs of one seed
    share the training sample, so the four pair."""
    by_seed = [{r["spec"]["seed"]: r["test_accuracy"] for r in runs} for runs in (a_1, b_1, a_2, b_2)]
    seeds = sorted(set.intersection(*(set(d) for d in by_seed)))
    gap_1 = [by_seed[0][s] - by_seed[1][s] for s in seeds]
    gap_2 = [by_seed[2][s] - by_seed[3][s] for s in seeds]
    return paired_interval(gap_1, gap_2)


def compare_gaps(a_1: Sequence[dict], b_1: Sequence[dict], a_2: Sequence[dict], b_2: Sequence[dict],
                 n_test: int) -> dict:
    """:func:`gap_change` by the book's rule, as :func:`compare` does for one difference: the
    change of the gap ``(a_1 - b_1) - (a_2 - b_2)`` paired by seed, and by a paired bootstrap
    over test messages of the seed-averaged correctness; ``ranked`` (the change is measured)
    only when both intervals exclude 0 on the same side."""
    by_seed = gap_change(a_1, b_1, a_2, b_2)
    mean = [correct_matrix(runs, n_test).mean(0) for runs in (a_1, b_1, a_2, b_2)]
    by_message = bootstrap_interval(mean[0] - mean[1], mean[2] - mean[3])
    ranked = (by_seed.low > 0 and by_message.low > 0) or (by_seed.high < 0 and by_message.high < 0)
    return {"by_seed": by_seed, "by_message": by_message, "ranked": ranked}


def compare(a: str, runs_a: Sequence[dict], b: str, runs_b: Sequence[dict], n_test: int) -> dict:
    """``a`` against ``b`` two ways: paired by seed (Student's t, seed noise) and by a paired
    bootstrap over test messages of the seed-averaged correctness (test-sample noise). The
    verdict ranks the two only when *both* intervals exclude 0 on the same side; otherwise it
    says that no difference was measured at this size."""
    by_seed = paired(runs_a, runs_b)
    by_message = bootstrap_interval(correct_matrix(runs_a, n_test), correct_matrix(runs_b, n_test))
    same_side = (by_seed.low > 0 and by_message.low > 0) or (by_seed.high < 0 and by_message.high < 0)
    shown = (by_seed, by_message)
    if not same_side:
        text = f"no difference measured at this size between {a} and {b}:"
    elif by_seed.low > 0:
        text = f"{a} beats {b} by"
    else:  # say it from the winner's side: b - a, both intervals flipped
        text = f"{b} beats {a} by"
        shown = tuple(Interval(-i.difference, -i.high, -i.low, i.n, i.how) for i in shown)
    return {"a": a, "b": b, "by_seed": by_seed, "by_message": by_message, "ranked": same_side,
            "verdict": f"{text} {shown[0]} (paired by seed), {shown[1]} (bootstrap over test messages)"}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The labels of ``points`` (label -> (cost, accuracy)) that no other point dominates (as
    cheap or cheaper *and* as accurate or more, one of them strictly), cheapest first. On means
    over seeds this is a description of the means, not a ranking: two neighbours on the front
    may be inside each other's noise (read :func:`compare` for that)."""
    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] <= a[0] and b[1] >= a[1] and b != a for b in points.values())
    return sorted((label for label, point in points.items() if not dominated(point)), key=lambda l: points[l])


def correct_matrix(runs: Sequence[dict], n: int) -> np.ndarray:
    """seeds x ``n`` test messages, 1 where a run got the message right (for a bootstrap)."""
    return np.stack([unpack_correct(r["test_correct"], n) for r in runs])


PLATEAU_MARK = {True: "yes", False: "no", None: "—"}  # None: no learning curve (the probe)


def markdown_table(rows: Sequence[dict]) -> str:
    """Rows of :func:`summary` as a Markdown table (rendered by the book via ``IPython.display``)."""
    lines = ["| configuration | trainable | rate | test accuracy (mean ± std) | seeds | plateaued |",
             "|---|---:|---:|---:|---:|:---:|"]
    for row in rows:
        rate = f"{row['lr']:g}" if row["lr"] else "—"
        lines.append(f"| {row['name']} | {row['trainable']:,} | {rate} | {row['mean']:.3f} ± {row['std']:.3f} "
                     f"| {row['seeds']} | {PLATEAU_MARK[row['plateaued']]} |")
    return "\n".join(lines)


def plot_curves(ax, runs: Sequence[dict], label: str, color=None) -> None:
    """Validation accuracy against step: the mean over seeds, and a band from min to max."""
    steps = [p["step"] for p in runs[0]["curve"]]
    values = np.array([[p["val_accuracy"] for p in r["curve"]] for r in runs])
    line, = ax.plot(steps, values.mean(0), marker="o", ms=3, label=f"{label} ({len(runs)} seeds)", color=color)
    ax.fill_between(steps, values.min(0), values.max(0), alpha=0.2, color=line.get_color())


def plot_intervals(ax, comparisons: Sequence[dict]) -> None:
    """Each :func:`compare` result as two horizontal 95% intervals of accuracy(a) - accuracy(b):
    paired by seed (thick) and bootstrap over test messages (thin); a pair is ranked only where
    both clear the dashed zero line on the same side."""
    for row, result in enumerate(reversed(list(comparisons))):
        for interval, offset, width in ((result["by_seed"], 0.12, 5), (result["by_message"], -0.12, 1.5)):
            color = "C0" if result["ranked"] else "grey"
            ax.plot([interval.low, interval.high], [row + offset] * 2, color=color, lw=width, solid_capstyle="butt")
            ax.plot(interval.difference, row + offset, "o", color=color, ms=4)
    ax.axvline(0, color="black", ls="--", lw=0.8)
    ax.set_yticks(range(len(comparisons)))
    ax.set_yticklabels([f"{c['a']} − {c['b']}" for c in reversed(list(comparisons))])
    ax.set_xlabel("test accuracy difference, 95% interval (thick: by seed, thin: over messages)")
