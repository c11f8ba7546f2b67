"""Peak GPU memory of a training step: ``python tools/gpu_memory.py [--out DIR]``.

On CUDA only: the peak ``torch.cuda.max_memory_allocated`` of one training step (forward,
backward, AdamW step) of full fine-tuning and of LoRA r = 8 on (query, value), each with and
without gradient checkpointing, at a batch of 32 x 256 tokens, in fp32 and in bf16 autocast;
it prints a table and writes ``DIR/gpu-memory.json``. (The protocol's runs on a GPU are
``python -m peft_minimal.grid gpu``; ``tools/device_run.sh`` runs both on a lent GPU.)
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: the package is in the repo root
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from peft_minimal.models import device  # noqa: E402


def versions() -> dict[str, Any]:
    """What made a number: the device's name and the torch and transformers versions."""
    import transformers

    return {"device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__}



# ── memory ───────────────────────────────────────────────────────────────────────────────
def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing, by the name transformers gives it (as in
    tests/test_gradient_checkpointing.py: ``activation_checkpointing_enable`` from 5.24)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def memory_batch(batch_size: int, length: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """``batch_size`` 20 Newsgroups messages at exactly ``length`` tokens (padded, never trimmed)."""
    from peft_minimal.data import load_text_classification, tokenize
    from peft_minimal.models import load_encoder

    tokenizer = load_encoder(num_labels=20)[1]
    data = load_text_classification("20newsgroups", "train").subset(batch_size, seed=0)
    ids, mask, labels = tokenize(tokenizer, data, length).tensors
    return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)}


def step_memory(method: str, checkpointing: bool, bf16: bool, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Peak allocated memory (MiB) of a first and a second training step of ``method`` on MiniLM."""
    from peft_minimal.experiments import prepare

    mib = 2 ** 20
    dev = inputs["input_ids"].device
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = prepare(method, r=8, seed=0)[0].to(dev).train()
    if checkpointing:
        enable_checkpointing(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    weights = torch.cuda.memory_allocated() - before

    def step() -> tuple[float, float]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / mib, time.perf_counter() - start

    first, _ = step()  # creates AdamW's moments
    second, seconds = step()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"method": method, "checkpointing": checkpointing, "bf16": bf16, "trainable": trainable,
            "weights_mib": round(weights / mib, 1), "first_step_peak_mib": round(first, 1),
            "step_peak_mib": round(second, 1), "step_ms": round(seconds * 1e3, 1)}


def run_memory_check(out: Path, batch_size: int, length: int) -> Path | None:
    """The memory table (CUDA only); writes ``out/gpu-memory.json`` and returns its path."""
    if not torch.cuda.is_available():
        print("memory: needs CUDA (torch.cuda.max_memory_allocated); no GPU here, skipped")
        return None
    dev = device()
    inputs = memory_batch(batch_size, length, dev)
    rows = []
    print(f"peak allocated memory of a training step, batch {batch_size} x {length} tokens, "
          f"{versions()['device_name']} (MiB above what was allocated before the model)")
    print(f"{'method':8s} {'ckpt':>5s} {'bf16':>5s} {'trainable':>10s} {'weights':>8s} {'1st step':>9s} "
          f"{'step':>8s} {'ms':>7s}")
    for bf16 in (False, True):
        for method in ("full", "lora"):
            for checkpointing in (False, True):
                row = step_memory(method, checkpointing, bf16, inputs)
                rows.append(row)
                print(f"{method:8s} {str(checkpointing):>5s} {str(bf16):>5s} {row['trainable']:10d} "
                      f"{row['weights_mib']:8.1f} {row['first_step_peak_mib']:9.1f} {row['step_peak_mib']:8.1f} "
                      f"{row['step_ms']:7.1f}", flush=True)
    path = out / "gpu-memory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"batch_size": batch_size, "length": length, **versions(),
                                "lora": {"r": 8, "alpha": 16, "targets": ["query", "value"]},
                                "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results", help="folder of gpu-memory.json")
    parser.add_argument("--batch-size", type=int, default=32, help="messages per step")
    parser.add_argument("--length", type=int, default=256, help="tokens per message")
    args = parser.parse_args(argv)
    run_memory_check(args.out, args.batch_size, args.length)


if __name__ == "__main__":
    main()
