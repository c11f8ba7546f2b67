"""The book's grids of runs: ``python -m peft_minimal.grid [protocol|unipelt|compare|gpu] [--scale ci|full]``.

:func:`tuned_lr` picks each method's rate on validation alone (from ``LR_GRIDS``, widened past an
edge), :func:`tuned_runs` adds seeds at that rate, :func:`plateau_check` re-runs a tuned
configuration twice as long. :func:`protocol_grid` is the grid chapters 1-4 read, written run by
run to ``results/protocol-<scale>.json`` so that a grid cut off anywhere resumes where it
stopped; :func:`unipelt_grid` (``python -m peft_minimal.grid unipelt``) is chapter 5's, in
``results/unipelt-<scale>.json``, and :func:`compare_grid` chapter 6's (the methods at two
budgets), in ``results/compare-<scale>.json``. One run is ``runs.run_protocol``::

    rate grid (seed 0, validation only) ──► best rate ──► its kept weights read on test
                                                  └─────► seeds 1, 2 at that rate, read on test
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from functools import partial

import torch

from .experiments import ALL_SIX, SCALES, current_scale, prepare, record_path
from .models import device
# the run-level names stay importable from here (chapters and coursework use grid.RunSpec etc.)
from .runs import (LORA_ALPHA, PROTOCOLS, Protocol, RunSpec, current_protocol, finish_on_test,  # noqa: F401
                   protocol_data, replay, run_protocol, score_on_test, state_path)

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
    3. LoRA (r = 8 on q, v; r = 2 on all six) and full fine-tuning once more with twice the
       steps (:func:`plateau_check`): their curves were still rising at the end.
    4. At budget 2, AdaLoRA without its orthogonality penalty and without pruning (the SVD form
       alone), at AdaLoRA's rate.
    5. LoRA r = 8 and the head reading the masked mean of the tokens (the probe's pooling)
       instead of [CLS] through the untrained pooler, each tuned. (LoRA's rank sweep at K = 64
       is in the GPU record, :func:`gpu_grid`.)
    6. The low-data axis: the probe at K = 16, 256 and the whole pool; the baselines of 1 at
       K = 16 (each tuned again: a rate tuned on 64 per class need not suit 16); their plateau
       checks and the mean-pooled runs at K = 16; then LoRA and AdaLoRA at budget 8, and the run
       twice as long of either whose seed-0 curve was still rising (:func:`plateau_check_if_rising`),
       so that chapter 6's verdicts at that budget know whether a method was still learning."""
    def seeds_at(spec: RunSpec, lr: float) -> None:
        for seed in (0, 1, 2):
            s = replace(spec, lr=lr, seed=seed)
            record.run(proto.key(s), lambda s=s: run_protocol(s, proto, progress=True))

    def baselines(k: int) -> None:
        for spec in (RunSpec("probe", k=k), RunSpec("lora", k=k, r=8), RunSpec("head", k=k),
                     RunSpec("full", k=k), RunSpec("ia3", k=k)):
            tuned_runs(record, spec, proto=proto)
        if k == 64:  # chapter 1 reads the spectrum of one full update; K = 64's is the one it shows
            truncation(record, open_record("truncation", proto), RunSpec("full", k=k), proto)

    def adalora_budget(budget: int) -> None:
        for method in ("lora", "adalora"):
            tuned_runs(record, RunSpec(method, k=64, r=budget, targets=ALL_SIX), proto=proto)

    def mean_pooled(k: int) -> None:
        for spec in (RunSpec("lora", k=k, r=8, variant="mean-pool"), RunSpec("head", k=k, variant="mean-pool")):
            tuned_runs(record, spec, proto=proto)  # the probe's pooling, trained: separates pooling from adapting

    baselines(64)
    adalora_budget(2)
    for spec in (RunSpec("lora", k=64, r=8), RunSpec("full", k=64), RunSpec("lora", k=64, r=2, targets=ALL_SIX)):
        plateau_check(record, spec, proto)
    lr = tuned_lr(record, RunSpec("adalora", k=64, r=2, targets=ALL_SIX), proto=proto)
    for variant in ("no-penalty", "no-pruning"):
        seeds_at(RunSpec("adalora", k=64, r=2, targets=ALL_SIX, variant=variant), lr)
    mean_pooled(64)
    for k in (16, 256, None):
        tuned_runs(record, RunSpec("probe", k=k), seeds=(0, 1, 2) if k else (0,), proto=proto)
    baselines(16)
    for spec in (RunSpec("lora", k=16, r=8), RunSpec("full", k=16)):
        plateau_check(record, spec, proto)
    mean_pooled(16)
    adalora_budget(8)  # chapter 6's second budget (the paper's 1.27M of DeBERTaV3-base, in miniature)
    for method in ("lora", "adalora"):
        plateau_check_if_rising(record, RunSpec(method, k=64, r=8, targets=ALL_SIX), proto)


UNIPELT_METHODS = ("pfeiffer", "houlsby", "prefix", "prompt", "unipelt-ap", "unipelt-apl")


def unipelt_grid(proto: Protocol, record) -> None:
    """Chapter 5's grid, resumable: at K = 16 per class, then K = 64, the Pfeiffer and Houlsby
    adapters, prefix and prompt tuning, UniPELT-AP and -APL, each at its tuned rate over 3 seeds
    (:func:`tuned_runs`); after K = 16, each of them once more with twice the steps
    (:func:`plateau_check`: the first adapter curves were still rising at step 200); after
    K = 64, those whose seed-0 curve still rose (:func:`plateau_check_if_rising`, for chapter
    6's plateau table). The baselines (probe, LoRA r = 8, full, head) are the main grid's, at
    the same protocol: ``report.final_runs_in`` reads a configuration from either record."""
    for k in (16, 64):
        for method in UNIPELT_METHODS:
            tuned_runs(record, RunSpec(method, k=k), proto=proto)
        for method in UNIPELT_METHODS:
            if k == 16:
                plateau_check(record, RunSpec(method, k=k), proto)
            else:
                plateau_check_if_rising(record, RunSpec(method, k=k), proto)


# Chapter 6's two budgets, in adapter numbers saved: about LoRA r = 2 and r = 8 on all six matrix
# types (82,944 and 331,776 on MiniLM; AdaLoRA's budgets 2 and 8; four times apart, as AdaLoRA's
# Table 1 goes from 0.32M to 1.27M on DeBERTaV3-base). Adapters at AdapterHub-style reduction
# factors within 11% of them (Pfeiffer b = 16, 64: 76,128 and 297,600; Houlsby b = 8, 32: 78,432
# and 299,904); the prefix exactly (P 2 L d with P = 18, 72; it trains its MLP besides).
BUDGET_SIZES = {"pfeiffer": (16, 64), "houlsby": (8, 32), "prefix": (18, 72)}
BUDGET_RANKS = (2, 8)


# The methods at the papers' settings (chapters 2-5), which the protocol and unipelt records hold
# at K = 16 and 64: on the whole pool no record holds them, so compare_specs(None) adds them.
PAPER_SETTINGS = [RunSpec("probe"), RunSpec("head"), RunSpec("full"), RunSpec("lora", r=8), RunSpec("ia3"),
                  RunSpec("adalora", r=2, targets=ALL_SIX), *(RunSpec(method) for method in UNIPELT_METHODS),
                  # the readout (chapter 6): at K = 64 the head alone on mean-pooled tokens had the highest mean
                  RunSpec("head", variant="mean-pool"), RunSpec("lora", r=8, variant="mean-pool")]


def compare_specs(k: int | None) -> list[RunSpec]:
    """Chapter 6's configurations at ``k`` per class (None: the whole pool): BitFit, the Pfeiffer
    and Houlsby adapters and the prefix at :data:`BUDGET_SIZES`, and LoRA and AdaLoRA on all six
    matrix types at ranks :data:`BUDGET_RANKS` except at K = 64 (the main grid holds them); on
    the whole pool, the methods at the papers' settings as well (:data:`PAPER_SETTINGS`)."""
    specs = [RunSpec("bitfit", k=k)]
    specs += [RunSpec(method, k=k, size=size) for method, sizes in BUDGET_SIZES.items() for size in sizes]
    if k != 64:
        specs += [RunSpec(method, k=k, r=r, targets=ALL_SIX) for r in BUDGET_RANKS for method in ("lora", "adalora")]
    if k is None:
        specs += [replace(spec, k=None) for spec in PAPER_SETTINGS if spec not in specs]
    return specs


def plateau_check_if_rising(record, spec: RunSpec, proto: Protocol) -> dict | None:
    """:func:`plateau_check` for ``spec`` when seed 0's tuned run ended with its curve still rising
    (chapter 2's ``plateaued`` flag false); None when it had flattened. Runs cut short would
    compare speed of optimisation, not the methods."""
    lr = tuned_lr(record, spec, 0, proto)
    if record[proto.key(replace(spec, lr=lr, seed=0))]["plateaued"]:
        return None
    return plateau_check(record, spec, proto)


def compare_grid(proto: Protocol, record, ks: tuple[int, ...] = (64, 16)) -> None:
    """Chapter 6's grid, resumable, at K = 64 then K = 16 per class (or the ``ks`` given:
    ``python -m peft_minimal.grid compare --k 16`` runs one half, so two processes can fill the
    record side by side): :func:`compare_specs`, each at its tuned rate over 3 seeds
    (:func:`tuned_runs`); then, once every comparison run of those K is in, the run twice as long
    for each configuration whose seed-0 curve was still rising (:func:`plateau_check_if_rising`).
    The methods at the papers' settings are read from the ``protocol`` and ``unipelt`` records.
    The whole pool (1,200 steps a run) is the GPU grid's last step."""
    for k in ks:
        for spec in compare_specs(k):
            tuned_runs(record, spec, proto=proto)
    for k in ks:
        for spec in compare_specs(k):
            plateau_check_if_rising(record, spec, proto)


def gpu_grid(proto: Protocol, record) -> None:
    """The protocol's runs that a GPU finishes in minutes to hours and two CPU cores in days, in a
    record of their own (``results/gpu-<scale>.json``; on CUDA every run uses bf16 autocast), so
    that a comparison reads one record and never sets a GPU run against a CPU run. Resumable, in
    the order of their value if cut off:

    1. At K = 64, 3 seeds, at the rates the CPU grid chose: LoRA r = 8 (q, v), full fine-tuning,
       the [CLS] head, and LoRA r = 2 against AdaLoRA at budget 2 (all six types). The same
       protocol on other hardware, to set against the CPU record seed by seed, and the
       references for what follows.
    2. LoRA r = 2 and AdaLoRA at budget 2 again with twice the steps, read on test: LoRA r = 2's
       curve was still rising when the protocol's run ended (its plateau check).
    3. LoRA's rank sweep at K = 64 (r = 1, 2, 4, 16, alpha fixed) at LoRA r = 8's rate.
    4. LoRA r = 8 and the head reading mean-pooled tokens at K = 64, each at its tuned rate.
    5. K = 16 per class: the probe, LoRA r = 8, the head, full fine-tuning and (IA)³, each tuned.
    6. Chapter 6 on the whole training pool (:func:`compare_specs` with K = None): every method at
       the papers' settings and at the two budgets, each tuned, 3 seeds; the full-data regime of
       the UniPELT paper, which two CPU cores cannot run (1,200 steps a run at the ci scale; over
       a hundred runs). No chapter reads these yet: chapter 6 lists them as the GPU's share."""
    from .report import final_runs

    cpu = open_record("protocol", proto).data
    lora8 = RunSpec("lora", k=64, r=8)
    budget2 = [RunSpec("lora", k=64, r=2, targets=ALL_SIX), RunSpec("adalora", k=64, r=2, targets=ALL_SIX)]

    def cpu_rate(spec: RunSpec) -> float:
        selector = {"method": spec.method, "k": spec.k}
        if spec.method in ("lora", "adalora"):
            selector.update(r=spec.r, targets=list(spec.targets))
        return final_runs(cpu, **selector)[0]["spec"]["lr"]

    def seeds_at(spec: RunSpec, lr: float, at: Protocol = proto) -> None:
        for seed in (0, 1, 2):
            s = replace(spec, lr=lr, seed=seed)
            record.run(at.key(s), lambda s=s: run_protocol(s, at, progress=True))

    for spec in (lora8, RunSpec("full", k=64), RunSpec("head", k=64), *budget2):
        seeds_at(spec, cpu_rate(spec))
    for spec in budget2:
        seeds_at(spec, cpu_rate(spec), doubled(proto))
    for r in (1, 2, 4, 16):
        seeds_at(replace(lora8, r=r), cpu_rate(lora8))
    for spec in (replace(lora8, variant="mean-pool"), RunSpec("head", k=64, variant="mean-pool")):
        tuned_runs(record, spec, proto=proto)
    for spec in (RunSpec("probe", k=16), RunSpec("lora", k=16, r=8), RunSpec("head", k=16),
                 RunSpec("full", k=16), RunSpec("ia3", k=16)):
        tuned_runs(record, spec, proto=proto)
    for spec in compare_specs(None):
        tuned_runs(record, spec, proto=proto)


PROTOCOL_GRIDS = {"protocol": protocol_grid, "unipelt": unipelt_grid, "compare": compare_grid, "gpu": gpu_grid}


def open_record(name: str, proto: Protocol, directory: str | None = None):
    """The resumable record ``results/NAME-<scale>.json`` of a protocol grid (or in ``directory``)."""
    from pathlib import Path

    from .record import Record

    path = record_path(name, proto.name)
    return Record.open(Path(directory) / path.name if directory else path, name=name, scale=proto.fixed())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="protocol", choices=sorted(PROTOCOL_GRIDS))
    parser.add_argument("--scale", choices=sorted(SCALES), default=current_scale().name)
    parser.add_argument("--record-dir", help="keep (and resume) the record in this folder instead of results/")
    parser.add_argument("--k", type=int, choices=(16, 64), help="compare only: run one K per class (one half)")
    args = parser.parse_args(argv)
    if args.k is not None and args.name != "compare":
        parser.error("--k splits the compare grid only")
    start = time.time()
    record = open_record(args.name, PROTOCOLS[args.scale], args.record_dir)
    run_grid = PROTOCOL_GRIDS[args.name]
    if args.k is not None:
        run_grid = partial(compare_grid, ks=(args.k,))
    run_grid(PROTOCOLS[args.scale], record)
    print(f"{record.path}: {len(record.written)} runs computed or updated by this process, {len(record)} in all, "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
