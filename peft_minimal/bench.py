"""Speed benchmarks: ``python -m peft_minimal.bench {all,lora,adalora,ia3,bf16} [--reps N]``.

Timing targets live here, not in tests: they print ratios measured in one process, with the
contenders interleaved (A, B, A, B, ...; several in turn with :func:`round_robin`, the order
reversed every other round) so that all see the same machine state, and the median of the
per-round ratios is reported.

``all`` (:mod:`peft_minimal.bench_all`) is the one table for every method of
:func:`peft_minimal.experiments.prepare`: training step against full fine-tuning and against
Hugging Face ``peft`` where it has the method, unmerged and merged inference against the base
model, peak memory and trainable parameters, written to ``results/bench-<device>.json`` for the
chapters. It takes ``--batch-size``, ``--length`` and ``--json``; the sections below are the
older single-method benchmarks it grew from.

``lora`` compares, on MiniLM with the same batch and targets (query, value; r = 8):
* a ``peft_minimal`` LoRA training step against a Hugging Face ``peft`` LoRA step
  (target: ratio <= 1.00);
* merged-LoRA inference against the base model (target: 1.00 +/- 0.02, since a merged
  model *is* a plain model).

``adalora`` compares AdaLoRA training steps (forward with the orthogonality penalty,
backward, optimizer step, then the allocator's ``update_and_allocate``) on all six BERT
matrix types, init_r = 12, target_r = 8, pruning at every step:
* ``peft_minimal`` against Hugging Face ``peft`` (target: ratio <= 1.05);
* ``peft_minimal`` AdaLoRA against ``peft_minimal`` LoRA r = 8 on the same matrices: the
  price of scoring and masking (the paper reports +11% time per epoch).

``ia3`` compares, on MiniLM with the paper's places (key, value, the FFN's output.dense):
* a ``peft_minimal`` (IA)³ training step against a Hugging Face ``peft`` (IA)³ step on the
  same modules (target: ratio <= 1.00);
* merged-(IA)³ inference against the base model (target: 1.00 +/- 0.02).

``bf16`` asks whether bf16 autocast should be the default on *this* device (it is the
default on a GPU; on a CPU only if it is faster at equal accuracy). Two LoRA runs on MiniLM
from the same initial weights take the same batches of 20 Newsgroups, one step each in turn
(fp32, bf16, bf16, fp32, ...), so both see the same machine state; it prints the median of the
per-pair step-time ratios bf16 / fp32 and, at the end, each run's training loss and accuracy
on held-out validation messages. Run it on an otherwise idle machine: a busy CPU makes the
ratio noise.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from math import comb
from typing import Callable

import torch

from . import adalora, ia3, lora
from .data import load_text_classification, tokenize
from .models import device, load_encoder
from .train import model_inputs, seed_everything


def round_robin(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 3) -> dict[str, list[float]]:
    """Seconds of each of ``fns``, ``reps`` times, taking turns: every round calls each once, in
    the given order on even rounds and reversed on odd ones, so no contender always runs right
    after the same neighbour (or always first, with the warmest cache). ``warmup`` untimed rounds first."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(reps):
        for name in (names if i % 2 == 0 else names[::-1]):
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratios(times: dict[str, list[float]], reference: str) -> dict[str, float]:
    """Per contender, the median over rounds of its time / the reference's time in the same round."""
    return {name: statistics.median(ratio_times(times, name, reference)) for name in times}


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of ``values`` (here: per-round time ratios):
    the order statistics ``x_(k)`` and ``x_(n-k+1)`` with the largest ``k`` such that a
    Binomial(n, 1/2) count falls below ``k`` with probability at most (1 - confidence) / 2.
    Returns (low, high, coverage); with too few rounds for ``confidence`` (n < 6 at 95%), the
    whole range and the coverage it has."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    tail, below, k = (1 - confidence) / 2, 0.0, 0   # below = P(B <= k - 1)
    while k < n // 2 and below + comb(n, k) / 2 ** n <= tail:
        below += comb(n, k) / 2 ** n
        k += 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k], 1 - 2 * sum(comb(n, i) for i in range(k)) / 2 ** n


def ratio_verdict(low: float, high: float, lower_bound: float | None, upper_bound: float) -> str:
    """A target read against a ratio's interval: ``met`` when the whole interval is inside
    [lower_bound, upper_bound], ``missed`` when the whole interval is outside, otherwise
    ``within noise`` (the rounds cannot tell)."""
    lower_bound = -float("inf") if lower_bound is None else lower_bound
    if lower_bound <= low and high <= upper_bound:
        return "met"
    if high < lower_bound or low > upper_bound:
        return "missed"
    return "within noise"


def ratio_times(times: dict[str, list[float]], name: str, reference: str) -> list[float]:
    """The per-round ratios time(name) / time(reference) of a :func:`round_robin` result."""
    return [t / r for t, r in zip(times[name], times[reference], strict=True)]


def interleaved_ratio(a: Callable[[], None], b: Callable[[], None], reps: int, warmup: int = 3) -> tuple[float, float, float]:
    """Median over ``reps`` pairs of time(a) / time(b), with the median times of each."""
    times = round_robin({"a": a, "b": b}, reps, warmup)
    return median_ratios(times, "b")["a"], statistics.median(times["a"]), statistics.median(times["b"])


def training_step(model: torch.nn.Module, inputs: dict) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def inference(model: torch.nn.Module, inputs: dict) -> Callable[[], None]:
    model.eval()
    inputs = {k: v for k, v in inputs.items() if k != "labels"}

    @torch.no_grad()
    def run() -> None:
        model(**inputs)
    return run


def encoder_and_batch(batch_size: int, length: int) -> tuple[torch.nn.Module, dict]:
    """MiniLM on the device and one fixed batch of 20 Newsgroups messages for it."""
    base, tokenizer = load_encoder(num_labels=20)
    data = load_text_classification("20newsgroups", "train").subset(batch_size, seed=0)
    ids, mask, labels = tokenize(tokenizer, data, length).tensors
    return base.to(device()), model_inputs((ids, mask, labels), device())


def compare_with_peft(name: str, ours, theirs, merge_and_unload, base, inputs: dict, reps: int) -> dict[str, float]:
    """Training-step ratio ours / peft, then merged inference / base model, both interleaved."""
    step_ratio, t_ours, t_peft = interleaved_ratio(training_step(ours, inputs), training_step(theirs, inputs), reps)
    print(f"{name} training step: peft_minimal {t_ours * 1e3:.1f} ms, peft {t_peft * 1e3:.1f} ms, "
          f"ratio {step_ratio:.3f} (target <= 1.00)")
    merged = merge_and_unload(ours)
    merged_ratio, t_merged, t_base = interleaved_ratio(inference(merged, inputs), inference(base, inputs), reps)
    print(f"merged-{name} inference: {t_merged * 1e3:.1f} ms, base model {t_base * 1e3:.1f} ms, "
          f"ratio {merged_ratio:.3f} (target 1.00 +/- 0.02)")
    return {"step_ratio": step_ratio, "merged_ratio": merged_ratio}


def bench_lora(reps: int, batch_size: int = 32, length: int = 128) -> dict[str, float]:
    import peft

    base, inputs = encoder_and_batch(batch_size, length)
    targets = ["query", "value"]
    seed_everything(0)
    ours = lora.add_lora(copy.deepcopy(base), lora.LoRAConfig(r=8, alpha=16, target_modules=targets,
                                                              modules_to_save=["classifier"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                                      modules_to_save=["classifier"]))
    return compare_with_peft("LoRA", ours, theirs, lora.merge_and_unload, base, inputs, reps)


def adalora_step(model: torch.nn.Module, inputs: dict, allocate: Callable[[int], None],
                 penalty: Callable[[], torch.Tensor] | None) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    step_count = [0]

    def step() -> None:
        loss = model(**inputs).loss
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        optimizer.step()
        step_count[0] += 1
        allocate(step_count[0])
        optimizer.zero_grad(set_to_none=True)
    return step


ALL_SIX = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def bench_adalora(reps: int, batch_size: int = 32, length: int = 128) -> dict[str, float]:
    import peft

    base, inputs = encoder_and_batch(batch_size, length)
    # a schedule long enough that every timed step is inside the budgeting phase
    total = 100 * (reps + 3)
    config = adalora.AdaLoRAConfig(init_r=12, target_r=8, alpha=16, total_step=total, orth_reg_weight=0.5,
                                   target_modules=ALL_SIX, modules_to_save=["classifier"])
    seed_everything(0)
    ours = adalora.add_adalora(copy.deepcopy(base), config)
    allocator = adalora.RankAllocator(ours, config)
    ours_step = adalora_step(ours, inputs, lambda t: allocator.update_and_allocate(ours, t),
                             lambda: config.orth_reg_weight * adalora.orthogonal_regularization(ours))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.AdaLoraConfig(
        init_r=12, target_r=8, lora_alpha=16, total_step=total, orth_reg_weight=0.5, target_modules=ALL_SIX,
        modules_to_save=["classifier"], task_type="SEQ_CLS"))  # task_type: so peft adds its penalty
    theirs_step = adalora_step(theirs, inputs, theirs.base_model.update_and_allocate, None)
    ratio, t_ours, t_peft = interleaved_ratio(ours_step, theirs_step, reps)
    print(f"AdaLoRA training step: peft_minimal {t_ours * 1e3:.1f} ms, peft {t_peft * 1e3:.1f} ms, "
          f"ratio {ratio:.3f} (target <= 1.05)")
    plain = lora.add_lora(copy.deepcopy(base), lora.LoRAConfig(r=8, alpha=16, target_modules=ALL_SIX,
                                                               modules_to_save=["classifier"]))
    overhead, t_ours, t_lora = interleaved_ratio(ours_step, training_step(plain, inputs), reps)
    print(f"AdaLoRA step vs LoRA r=8 step (same matrices): {t_ours * 1e3:.1f} ms vs {t_lora * 1e3:.1f} ms, "
          f"ratio {overhead:.3f} (paper: +11% time per epoch)")
    return {"step_ratio": ratio, "overhead_vs_lora": overhead}


def bench_ia3(reps: int, batch_size: int = 32, length: int = 128) -> dict[str, float]:
    import peft

    base, inputs = encoder_and_batch(batch_size, length)
    config = ia3.IA3Config.for_model(base, modules_to_save=["classifier"])
    ours = ia3.add_ia3(copy.deepcopy(base), config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(
        target_modules=config.target_modules, feedforward_modules=config.feedforward_modules,
        modules_to_save=["classifier"]))
    return compare_with_peft("(IA)^3", ours, theirs, ia3.merge_and_unload, base, inputs, reps)


def bench_bf16(reps: int, batch_size: int = 32, length: int = 128, validation_per_class: int = 25) -> dict[str, float]:
    """``reps`` training steps of fp32 and of bf16 autocast, interleaved (see the module docstring)."""
    from .protocol import carve_validation
    from .train import evaluate

    dev = device()
    base, tokenizer = load_encoder(num_labels=20)
    pool, validation = carve_validation(load_text_classification("20newsgroups", "train"), validation_per_class)
    ids, mask, labels = tokenize(tokenizer, pool.subset(batch_size * reps, seed=0), length).tensors
    val_set = tokenize(tokenizer, validation, length)
    seed_everything(0)
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        model = copy.deepcopy(base)
        seed_everything(0)  # the same LoRA init for both
        lora.add_lora(model, lora.LoRAConfig(r=8, alpha=16, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
        model.to(dev).train()
        runs[name] = {"model": model, "bf16": bf16, "times": [], "losses": [], "optimizer": torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=6e-3)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for i in range(reps):
        rows = slice(i * batch_size, (i + 1) * batch_size)
        inputs = model_inputs((ids[rows], mask[rows], labels[rows]), dev)
        for name in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            run = runs[name]
            sync()
            start = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run["bf16"]):
                loss = run["model"](**inputs).loss
            loss.backward()
            run["optimizer"].step()
            run["optimizer"].zero_grad(set_to_none=True)
            sync()
            run["times"].append(time.perf_counter() - start)
            run["losses"].append(loss.item())
    skip = min(3, reps - 1)  # the first steps warm caches and allocators
    ratio = statistics.median(b / f for b, f in zip(runs["bf16"]["times"][skip:], runs["fp32"]["times"][skip:]))
    out = {"step_ratio_bf16_over_fp32": ratio}
    for name, run in runs.items():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run["bf16"]):
            scores = evaluate(run["model"], val_set, dev=dev)
        tail = run["losses"][-min(10, reps):]
        out[f"{name}_ms"] = statistics.median(run["times"][skip:]) * 1e3
        out[f"{name}_val_accuracy"], out[f"{name}_last_losses"] = scores.accuracy, sum(tail) / len(tail)
        print(f"{name}: {out[f'{name}_ms']:.1f} ms a step (median), mean loss of the last {len(tail)} steps "
              f"{out[f'{name}_last_losses']:.4f}, validation accuracy {scores.accuracy:.3f} ({len(val_set)} messages)")
    print(f"bf16 autocast / fp32 step time: {ratio:.3f} (median of {reps - skip} interleaved pairs; "
          f"bf16 is worth making the default here only if this is clearly < 1 at equal accuracy)")
    return out


BENCHES = {"lora": bench_lora, "adalora": bench_adalora, "ia3": bench_ia3, "bf16": bench_bf16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="peft_minimal speed benchmarks (ratios)")
    parser.add_argument("method", choices=["all"] + sorted(BENCHES))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="tokens per message (the batch is cut to its longest)")
    parser.add_argument("--json", default=None, help="all: where to write the table (default results/bench-<device>.json)")
    args = parser.parse_args(argv)
    print(f"device: {device()}, torch threads: {torch.get_num_threads()}")
    if args.method == "all":
        from . import bench_all
        bench_all.main_all(args.reps, args.batch_size, args.length, args.json)
    else:
        BENCHES[args.method](args.reps, args.batch_size, args.length)


if __name__ == "__main__":
    main()
