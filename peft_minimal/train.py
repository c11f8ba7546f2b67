"""One small training loop for every chapter: AdamW, linear warmup/decay, clipping, evaluation.

The loop is deliberately plain so a reader can see each step. Two hooks let methods plug in
without a loop of their own:

* ``extra_loss(model) -> Tensor`` is added to the task loss (AdaLoRA's orthogonality term);
* ``after_step(model, step)`` runs after ``optimizer.step()`` and before ``zero_grad()``,
  while gradients are still there (AdaLoRA's ``RankAllocator.update_and_allocate``);
  ``step`` counts the optimizer steps taken so far, 1 to ``config.steps``, so the last call
  gets ``step == config.steps`` (AdaLoRA's ``total_step``).

A batch of three tensors is (input ids, attention mask, labels) for classification; a
batch of one tensor is a block of token ids for causal language modelling.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .models import device as default_device


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: bool = False  # autocast to bfloat16; used only on a GPU
    eval_batch_size: int = 128
    progress: bool = True


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    peak_memory_mb: float | None = None  # GPU only


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and GPU) so a run repeats exactly on one machine."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_inputs(batch, dev: torch.device) -> dict[str, torch.Tensor]:
    if len(batch) == 3:
        ids, mask, labels = batch
        length = int(mask.sum(1).max())  # drop columns that are padding in every row
        return {"input_ids": ids[:, :length].to(dev), "attention_mask": mask[:, :length].to(dev),
                "labels": labels.to(dev)}
    (ids,) = batch
    return {"input_ids": ids.to(dev), "labels": ids.to(dev)}


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warmup to 1, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model: nn.Module, dataset: Dataset, config: TrainConfig,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
          after_step: Callable[[nn.Module, int], None] | None = None,
          dev: torch.device | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad for ``config.steps`` optimizer steps."""
    dev = dev or default_device()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter: add a method or unfreeze something")
    seed_everything(config.seed)
    model.to(dev).train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_schedule(s, config.steps, warmup))
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(config.seed))
    use_bf16 = config.bf16 and dev.type == "cuda"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    result = TrainResult()
    start = time.perf_counter()
    bar = tqdm(total=config.steps, disable=not config.progress, mininterval=2.0, desc="train")
    while result.steps < config.steps:
        for batch in loader:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(**model_inputs(batch, dev)).loss
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            result.steps += 1
            if after_step is not None:
                after_step(model, result.steps)
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if result.steps >= config.steps:
                break
    bar.close()
    result.seconds = time.perf_counter() - start
    if dev.type == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    model.eval()
    return result


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 128,
                      dev: torch.device | None = None) -> float:
    """Share of examples whose arg-max logit is the label."""
    dev = dev or default_device()
    model.to(dev).eval()
    correct = 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        inputs = model_inputs(batch, dev)
        labels = inputs.pop("labels")
        correct += (model(**inputs).logits.argmax(-1) == labels).sum().item()
    return correct / len(dataset)


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8,
               dev: torch.device | None = None) -> float:
    """exp(mean next-token cross-entropy) over rows of token ids (all rows the same length)."""
    dev = dev or default_device()
    model.to(dev).eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i: i + batch_size].to(dev)
        n = ids.numel() - ids.shape[0]  # predicted tokens: all but the first of each row
        total += model(input_ids=ids, labels=ids).loss.item() * n
        count += n
    return math.exp(total / count)
