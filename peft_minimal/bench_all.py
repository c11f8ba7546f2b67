"""One table for every method: ``python -m peft_minimal.bench all [--reps N] [--batch-size B]
[--length L] [--json PATH]``.

Every method of :func:`peft_minimal.experiments.prepare` (the book's settings) on MiniLM, with one
fixed batch of 20 Newsgroups messages (default 32 x 128 tokens):

* **training step / full fine-tuning**: a step is forward, backward and AdamW (AdaLoRA's also its
  orthogonality penalty and its rank allocator, pruning at every timed step); all methods take
  turns in one process (:func:`peft_minimal.bench.round_robin`), the median of per-round ratios;
  every ratio comes with a distribution-free 95% interval for that median
  (:func:`peft_minimal.bench.median_interval`), and a target is read against the interval:
  ``met`` (all of it inside), ``missed`` (all outside) or ``within noise``;
* **training step / peft** for the methods Hugging Face ``peft`` has (LoRA, AdaLoRA, (IA)³, prefix
  and prompt tuning): ``peft``'s model is built from *our* config and holds *our* weights
  (:func:`~peft_minimal.bench_twin.peft_twin`; :func:`~peft_minimal.bench_twin.max_output_difference` checks that both compute the same logits), the
  two steps interleaved; target <= 1.00;
* **inference / base model** (eval, no_grad): unmerged, and merged
  (:func:`peft_minimal.registry.merge_and_unload`) where the method can merge; target for merged
  1.00 +/- 0.02, since a merged model *is* a plain model;
* **peak memory of a training step**: each method built alone in a fresh subprocess that runs a
  few steps on the same batch; CUDA ``max_memory_allocated``, or on a CPU the process's peak
  resident set while stepping (Python, torch and the model included; :func:`measure_memory`),
  in MiB and / full fine-tuning, and what the steps add to the built model's memory;
* **trainable parameters** (the task head included, as peft counts them).

The table is printed with each target beside the ratio it applies to, and everything is written
to a JSON file with the device, package versions, threads, batch shape and repetitions.
peft's model of each method (its "twin") lives in :mod:`peft_minimal.bench_twin`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import experiments, registry
from .bench import encoder_and_batch, inference, median_interval, median_ratios, ratio_times, ratio_verdict, round_robin
from .bench_twin import Contender, max_output_difference, ours, peft_twin
from .layers import count_parameters
from .models import device
from .record import environment

METHODS = ("full", "head", "lora", "adalora", "ia3", "bitfit", "pfeiffer", "houlsby", "prefix", "prompt",
           "unipelt-ap", "unipelt-apl")
PEFT_HAS = ("lora", "adalora", "ia3", "prefix", "prompt")
STEP_TARGET = 1.00                 # ours / peft, at most
MERGED_TARGET = (0.98, 1.02)       # merged / base model
Build = Callable[[str], nn.Module]


def merged_copy(model: nn.Module) -> nn.Module | None:
    """A merged, unloaded copy of ``model`` (a plain model), or None where the method cannot merge."""
    if not hasattr(model, "peft_config") or not registry.method_of(model).can_merge:
        return None
    return registry.merge_and_unload(copy.deepcopy(model))


# --- peak memory: each method alone in a fresh process ---

def _status_mib(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from Linux's /proc, in MiB; None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart this process's VmHWM from its current RSS (Linux >= 4.0); False where that cannot be done."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _ru_maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def measure_memory(method: str, inputs: dict, steps: int, build: Build) -> dict:
    """In this process: build ``method``, then ``steps`` training steps. ``built_mib``: memory held
    once the model is built; ``peak_mib``: the peak while stepping, of the whole process (CUDA:
    allocated tensors; CPU: resident set, so Python, torch and the model count too).

    On a CPU the peak is Linux's VmHWM restarted after the build, so loading the checkpoint does not
    count. Not ``ru_maxrss``: a subprocess inherits its parent's peak through ``exec`` (a fresh
    Python started by a 3 GiB benchmark reports 3 GiB), and loading can peak above the steps.
    Without /proc (macOS) it falls back to ``ru_maxrss``, loading included (``measure`` says which)."""
    dev = inputs["input_ids"].device
    model = build(method).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        built, measure = torch.cuda.max_memory_allocated() / 2**20, "cuda max_memory_allocated"
    else:
        built = _status_mib("VmRSS") or _ru_maxrss_mib()
        measure = "VmHWM after the build" if _reset_peak_rss() else "ru_maxrss, loading included"
    step = ours(model).step(inputs)
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _status_mib("VmHWM") if measure.startswith("VmHWM") else _ru_maxrss_mib()
    return {"built_mib": built, "peak_mib": peak, "step_extra_mib": peak - built, "measure": measure}


def memory_in_subprocess(method: str, inputs: dict, steps: int = 3, adalora_steps: int = 100) -> dict[str, float]:
    """:func:`measure_memory` in a fresh Python process (MiniLM by :func:`experiments.prepare`),
    so the peak belongs to that method alone; the batch travels through a temporary file."""
    root = str(Path(__file__).resolve().parent.parent)  # the child imports this copy of the package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.pt"
        torch.save({k: v.cpu() for k, v in inputs.items()}, path)
        out = subprocess.run([sys.executable, "-m", "peft_minimal.bench_all", "memory", method, str(path),
                              "--steps", str(steps), "--adalora-steps", str(adalora_steps)],
                             capture_output=True, text=True, env=env, cwd=root, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- the table ---

def run_all(inputs: dict, build: Build, plain: Callable[[], nn.Module], reps: int, warmup: int = 2,
            memory: Callable[[str], dict] | None = None, methods: tuple[str, ...] = METHODS) -> dict:
    """Every measurement for every method (see the module docstring): the JSON record's ``methods``
    part plus ``base_inference_ms``. ``build(method)``: our model; ``plain()``: a fresh copy of the
    base model; ``memory(method)``: :func:`memory_in_subprocess` (or a stand-in; None: skipped)."""
    models = {m: build(m) for m in methods}
    out: dict[str, dict] = {}
    for m, model in models.items():
        trainable, total = count_parameters(model)
        adapter = registry.count_adapter_parameters(model) if hasattr(model, "peft_config") else None
        out[m] = {"trainable": trainable, "total": total, "adapter_parameters": adapter}
    twins = {m: peft_twin(models[m], plain()) for m in methods if m in PEFT_HAS}
    for m, twin in twins.items():  # eval mode: making the steps below puts every model back in training mode
        out[m]["peft"] = {"max_abs_logit_difference": max_output_difference(models[m], twin.model, inputs)}
    steps = {m: ours(model).step(inputs) for m, model in models.items()}  # one optimizer each, for both phases
    time_training(steps, twins, inputs, reps, warmup, out)
    base_ms = time_inference(models, plain(), inputs, reps, warmup, out)
    del models, steps, twins
    if memory is not None:
        print("peak memory, each method in a fresh process ...", flush=True)
        for m in methods:
            out[m]["memory"] = memory(m)
        if "full" in out:
            for m in methods:
                out[m]["memory"]["peak_vs_full"] = out[m]["memory"]["peak_mib"] / out["full"]["memory"]["peak_mib"]
    return {"base_inference_ms": base_ms, "methods": out}


def interval_fields(times: dict[str, list[float]], name: str, reference: str, prefix: str) -> dict:
    """``<prefix>_interval``: the 95% interval of the median per-round ratio (:func:`median_interval`)."""
    low, high, coverage = median_interval(ratio_times(times, name, reference))
    return {f"{prefix}_interval": [low, high], f"{prefix}_interval_coverage": round(coverage, 3)}


def time_training(steps: dict[str, Callable[[], None]], twins: dict[str, Contender], inputs: dict, reps: int,
                  warmup: int, out: dict[str, dict]) -> None:
    """All steps in turn (ratios to full fine-tuning's), then each against its peft twin's."""
    print(f"training steps, {len(steps)} methods in turn, {reps} rounds ...", flush=True)
    times = round_robin(steps, reps, warmup)
    reference = "full" if "full" in steps else next(iter(steps))
    for m, ratio in median_ratios(times, reference).items():
        out[m].update(step_ms=statistics.median(times[m]) * 1e3, step_vs_full=ratio,
                      **interval_fields(times, m, reference, "step_vs_full"))
    for m, twin in twins.items():
        print(f"{m}: ours vs peft, {reps} pairs ...", flush=True)
        pair = round_robin({"ours": steps[m], "peft": twin.step(inputs)}, reps, warmup)
        ratio = median_ratios(pair, "peft")["ours"]
        fields = interval_fields(pair, "ours", "peft", "step_ratio")
        out[m]["peft"].update(step_ratio=ratio, ours_ms=statistics.median(pair["ours"]) * 1e3,
                              peft_ms=statistics.median(pair["peft"]) * 1e3, **fields,
                              target=f"<= {STEP_TARGET:.2f}", verdict=ratio_verdict(*fields["step_ratio_interval"], None, STEP_TARGET))


def time_inference(models: dict[str, nn.Module], base: nn.Module, inputs: dict, reps: int, warmup: int,
                   out: dict[str, dict]) -> float:
    """Every model unmerged, and a merged copy where it can merge, in turn with the base model;
    returns the base model's median milliseconds."""
    print("inference, unmerged and merged, in turn with the base model ...", flush=True)
    runs = {"base": inference(base, inputs)}
    for m, model in models.items():
        runs[m] = inference(model, inputs)
        merged = merged_copy(model)
        if merged is not None:
            out[m]["merged_max_abs_logit_difference"] = max_output_difference(merged, model, inputs)
            runs[f"{m}+merged"] = inference(merged, inputs)
    times = round_robin(runs, reps, warmup)
    ratios = median_ratios(times, "base")
    for m in models:
        out[m].update(inference_ms=statistics.median(times[m]) * 1e3, inference_vs_base=ratios[m],
                      **interval_fields(times, m, "base", "inference_vs_base"))
        if f"{m}+merged" in ratios:
            r = ratios[f"{m}+merged"]
            fields = interval_fields(times, f"{m}+merged", "base", "merged_vs_base")
            out[m].update(merged_ms=statistics.median(times[f"{m}+merged"]) * 1e3, merged_vs_base=r, **fields,
                          merged_target="1.00 +/- 0.02", merged_verdict=ratio_verdict(*fields["merged_vs_base_interval"], *MERGED_TARGET))
    return statistics.median(times["base"]) * 1e3


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None else format(x, spec)


def with_interval(r: dict, key: str, verdict: str | None = None) -> str:
    """``0.986 [0.97, 1.00]`` and the verdict, if any: a ratio with its 95% interval over rounds."""
    low, high = r[f"{key}_interval"]
    return f"{r[key]:.3f} [{low:.2f}, {high:.2f}]" + (f" {verdict}" if verdict else "")


def table(methods: dict[str, dict]) -> str:
    """The printed table: one row per method, each ratio with its 95% interval over the rounds
    and, where a target applies, the verdict of the interval against it (:func:`ratio_verdict`)."""
    head = (f"{'method':<12} {'trainable':>11} {'step/full':>9} {'step/peft (<=1.00)':>33} "
            f"{'infer/base':>10} {'merged/base (1.00+-0.02)':>33} {'peak mem/full (MiB, +steps)':>28}")
    rows = [head, "-" * len(head)]
    for m, r in methods.items():
        peft_col = "—"
        if "step_ratio" in r.get("peft", {}):
            peft_col = with_interval(r["peft"], "step_ratio", r["peft"]["verdict"])
        merged_col = "cannot merge" if m not in ("full", "head") else "plain model"
        if "merged_vs_base" in r:
            merged_col = with_interval(r, "merged_vs_base", r["merged_verdict"])
        mem = r.get("memory")
        mem_col = "—" if not mem else (f"{_fmt(mem.get('peak_vs_full'), '.2f')} ({mem['peak_mib']:.0f}, "
                                       f"+{mem['peak_mib'] - mem['built_mib']:.0f})")
        rows.append(f"{m:<12} {r['trainable']:>11,} {_fmt(r.get('step_vs_full')):>9} {peft_col:>33} "
                    f"{_fmt(r.get('inference_vs_base')):>10} {merged_col:>33} {mem_col:>28}")
    return "\n".join(rows)


def record(result: dict, inputs: dict, reps: int, warmup: int, memory_steps: int, seconds: float) -> dict:
    """The JSON a chapter reads: the numbers and what produced them."""
    import peft

    dev = inputs["input_ids"].device
    return {"name": "bench-all", "environment": {**environment(), "peft": peft.__version__},
            "device": dev.type, "threads": torch.get_num_threads(),
            "batch": {"batch_size": inputs["input_ids"].shape[0], "length": inputs["input_ids"].shape[1]},
            "reps": reps, "warmup": warmup, "memory_steps": memory_steps,
            "memory_measure": "cuda max_memory_allocated" if dev.type == "cuda"
            else "peak resident set (VmHWM) of a fresh process while stepping: Python, torch, the model, the steps",
            "targets": {"step_vs_peft": f"<= {STEP_TARGET:.2f}", "merged_vs_base": "1.00 +/- 0.02"},
            "wall_seconds": round(seconds, 1), **result}


def main_all(reps: int, batch_size: int = 32, length: int = 128, json_path: str | None = None,
             warmup: int = 2, memory_steps: int = 3) -> dict:
    start = time.time()
    base, inputs = encoder_and_batch(batch_size, length)
    adalora_steps = max(100, 2 * 3 * (reps + warmup))  # every timed step inside the budgeting phase
    dev = device()

    def build(method: str) -> nn.Module:
        return experiments.prepare(method, steps=adalora_steps)[0].to(dev)

    result = run_all(inputs, build, lambda: copy.deepcopy(base), reps, warmup,
                     memory=lambda m: memory_in_subprocess(m, inputs, memory_steps, adalora_steps))
    data = record(result, inputs, reps, warmup, memory_steps, time.time() - start)
    print(table(data["methods"]))
    path = Path(json_path) if json_path else experiments.RESULTS / f"bench-{dev.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path} ({data['wall_seconds']:.0f} s)")
    return data


def main(argv: list[str] | None = None) -> None:
    """``python -m peft_minimal.bench_all memory METHOD BATCH.pt``: the subprocess of
    :func:`memory_in_subprocess`; prints one JSON line. (The table itself: ``bench all``.)"""
    parser = argparse.ArgumentParser(description="peak memory of one method's training steps")
    parser.add_argument("what", choices=["memory"])
    parser.add_argument("method", choices=sorted(experiments.BUILDERS))
    parser.add_argument("batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--adalora-steps", type=int, default=100)
    args = parser.parse_args(argv)
    dev = device()
    inputs = {k: v.to(dev) for k, v in torch.load(args.batch).items()}
    result = measure_memory(args.method, inputs, args.steps,
                            lambda m: experiments.prepare(m, steps=args.adalora_steps)[0])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
