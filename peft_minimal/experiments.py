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
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import lora
from .data import load_text_classification, tokenize
from .layers import count_parameters
from .models import device, load_encoder
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
LEARNING_RATES = {"head": 1e-2, "lora": 6e-3, "full": 3e-4}


def current_scale() -> Scale:
    """The scale named by ``PEFT_SCALE`` (default ``ci``)."""
    name = os.environ.get("PEFT_SCALE", "ci")
    if name not in SCALES:
        raise ValueError(f"PEFT_SCALE must be one of {sorted(SCALES)}, got {name!r}")
    return SCALES[name]


def environment() -> dict:
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": str(device()),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def newsgroups(scale: Scale, tokenizer):
    """Tokenized 20 Newsgroups: the whole train split, a seeded test sample at ci scale."""
    train_set = load_text_classification("20newsgroups", "train")
    test_set = load_text_classification("20newsgroups", "test").subset(scale.test_size, seed=0)
    return tokenize(tokenizer, train_set, scale.max_length), tokenize(tokenizer, test_set, scale.max_length)


def prepare(method: str, r: int = 8, seed: int = 0, targets: tuple[str, ...] = ("query", "value")):
    """MiniLM with a seeded head and the method applied: ``head``, ``lora`` or ``full``."""
    model, tokenizer = load_encoder(num_labels=20, seed=seed)
    if method == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier.")
    elif method == "lora":
        seed_everything(seed)  # lora_A's Kaiming draw
        lora.add_lora(model, lora.LoRAConfig(r=r, alpha=2 * r, target_modules=list(targets),
                                             modules_to_save=["classifier"]))
    elif method != "full":
        raise ValueError(f"method must be head, lora or full, got {method!r}")
    return model, tokenizer


def run_classification(method: str, r: int = 8, seed: int = 0, scale: Scale | None = None,
                       progress: bool = False, return_model: bool = False):
    """Fine-tune MiniLM on 20 Newsgroups with one method; return a record (and the model)."""
    scale = scale or current_scale()
    model, tokenizer = prepare(method, r, seed)
    train_data, test_data = newsgroups(scale, tokenizer)
    config = TrainConfig(steps=scale.steps, batch_size=scale.batch_size, lr=LEARNING_RATES[method],
                         seed=seed, bf16=torch.cuda.is_available(), progress=progress)
    result = train(model, train_data, config)
    trainable, total = count_parameters(model)
    record = {"method": method, "r": r if method == "lora" else None, "seed": seed, "scale": scale.name,
              "train_config": asdict(config), "accuracy": evaluate_accuracy(model, test_data),
              "trainable": trainable, "total": total, "train_seconds": result.seconds,
              "final_loss": sum(result.losses[-10:]) / 10, "peak_memory_mb": result.peak_memory_mb}
    return (record, model) if return_model else record


def lora_rank_sweep(scale: Scale) -> list[dict]:
    """Head only, LoRA (q, v) at r = 1, 2, 4, 8, 16, and full fine-tuning; seed 0."""
    runs = [("head", 8)] + [("lora", r) for r in (1, 2, 4, 8, 16)] + [("full", 8)]
    return [run_classification(m, r=r, seed=0, scale=scale, progress=True) for m, r in runs]


GRIDS = {"lora_rank_sweep": lora_rank_sweep}


def record_path(name: str, scale: str) -> Path:
    return RESULTS / f"{name}-{scale}.json"


def load_record(name: str, scale: str) -> dict:
    path = record_path(name, scale)
    if not path.is_file():
        raise FileNotFoundError(f"no record {path}; run `python -m peft_minimal.experiments {name} --scale {scale}`")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(GRIDS))
    parser.add_argument("--scale", choices=sorted(SCALES), default=current_scale().name)
    args = parser.parse_args(argv)
    start = time.time()
    runs = GRIDS[args.name](SCALES[args.scale])
    record = {"name": args.name, "scale": asdict(SCALES[args.scale]), "environment": environment(),
              "wall_seconds": time.time() - start, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    record_path(args.name, args.scale).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {record_path(args.name, args.scale)} ({len(runs)} runs, {record['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
