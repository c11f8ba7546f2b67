"""One small training loop for every chapter: AdamW, linear warmup/decay, clipping, evaluation.

The loop is deliberately plain so a reader can see each step. Two hooks let methods plug in
without a loop of their own:

* ``extra_loss(model) -> Tensor`` is added to the task loss (AdaLoRA's orthogonality term);
* ``after_step(model, step)`` runs after ``optimizer.step()`` and before ``zero_grad()``,
  while gradients are still there (AdaLoRA's ``RankAllocator.update_and_allocate``);
  ``step`` counts the optimizer steps taken so far, 1 to ``config.steps``, so the last call
  gets ``step == config.steps`` (AdaLoRA's ``total_step``).

Given a ``validation`` set and ``config.eval_every``, the loop records a learning curve
(validation accuracy and loss, and the mean training loss since the last point) and, with
``config.keep_best``, ends holding the trainable weights of its best validation point: the
validation split picks the step, the test split is never seen here.

A batch of three tensors is (input ids, attention mask, labels) for classification; a
batch of one tensor is a block of token ids for causal language modelling.

The same loop runs under ``torchrun`` (see :mod:`peft_minimal.distributed`): after
``distributed.setup()`` it wraps the model in DDP, gives each process its shard of every
batch and averages the logged numbers over the processes. Given a
:class:`~peft_minimal.checkpoint.Checkpointing`, it saves what a step depends on and resumes
from it (see :mod:`peft_minimal.checkpoint`). Neither changes a one-process run's numbers.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from tqdm import tqdm

from . import checkpoint, distributed
from .checkpoint import Checkpointing
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
    eval_every: int = 0      # validation every N steps (0: never); needs a validation set
    keep_best: bool = True   # end with the weights of the best validation accuracy
    keep_best_after: int = 0  # only points from this step on may be kept (AdaLoRA: budget final)
    stop_at: int | None = None  # stop early with the schedule of ``steps`` (re-checks a record's curve)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    peak_memory_mb: float | None = None  # GPU only
    curve: list[dict] = field(default_factory=list)  # {step, train_loss, val_accuracy, val_loss}
    best_step: int | None = None  # the curve point whose weights the model ends with


@dataclass
class Evaluation:
    accuracy: float
    loss: float                # mean cross-entropy
    predictions: torch.Tensor  # arg-max label of every example, in data set order


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
          dev: torch.device | None = None, validation: Dataset | None = None,
          checkpointing: Checkpointing | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad for ``config.steps`` optimizer steps.

    With ``validation`` and ``config.eval_every > 0`` it also records the learning curve
    (see the module docstring) and, if ``config.keep_best``, restores the best point's weights.
    With ``checkpointing`` it saves there and, if a checkpoint is there already, resumes from it.
    Inside a process group (``torchrun``) ``model`` is the plain model, with its method added:
    the loop wraps it in DDP itself, and the hooks, evaluation and the result see it unwrapped.
    """
    dev = dev or default_device()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameter: add a method or unfreeze something")
    if config.eval_every and validation is None:
        raise ValueError("eval_every needs a validation set: train(..., validation=...)")
    seed_everything(config.seed)
    model.to(dev).train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_schedule(s, config.steps, warmup))
    generator = torch.Generator().manual_seed(config.seed)
    if distributed.is_distributed():
        loader = distributed.sharded_loader(dataset, config.batch_size, generator)
    else:
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            generator=generator)
    use_bf16 = config.bf16 and dev.type == "cuda"
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    result = TrainResult()
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    since_eval: list[float] = []
    skip = 0  # batches of the current pass already taken (resuming)
    stateful = checkpointing.objects(after_step) if checkpointing is not None else {}
    saved = checkpoint.load(checkpointing) if checkpointing is not None else None
    if saved is not None:
        skip = _resume(saved, config, model, optimizer, scheduler, stateful, generator, result, dev)
        best, since_eval = saved["best"], saved["since_eval"]
    net = model
    if distributed.is_distributed():  # the method is added and frozen already: now wrap
        share = config.batch_size // distributed.world_size()
        net = distributed.wrap(model, dev, model_inputs(default_collate([dataset[i] for i in range(share)]), dev))
    if saved is not None:
        checkpoint.set_rng_states(saved["rng"])
    start = time.perf_counter()
    last = min(config.stop_at or config.steps, config.steps)
    bar = tqdm(total=last, initial=result.steps, disable=not (config.progress and distributed.is_main()),
               mininterval=2.0, desc="train")
    while result.steps < last:
        epoch_start = generator.get_state()  # a checkpoint replays this pass's order from here
        batches = iter(loader)
        for _ in range(skip):
            next(batches)
        taken, skip = skip, 0
        for batch in batches:
            taken += 1
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = net(**model_inputs(batch, dev)).loss
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
            value = distributed.mean(loss.detach())  # loss.item() in one process
            result.losses.append(value)
            since_eval.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            if config.eval_every and (result.steps % config.eval_every == 0 or result.steps == config.steps):
                scores = evaluate(model, validation, config.eval_batch_size, dev)
                model.train()
                result.curve.append({"step": result.steps, "train_loss": sum(since_eval) / len(since_eval),
                                     "val_accuracy": scores.accuracy, "val_loss": scores.loss})
                since_eval = []
                eligible = result.steps >= config.keep_best_after
                if eligible and (best is None or scores.accuracy > best[0]):  # ties keep the earlier point
                    best = (scores.accuracy, trainable_state(model))
                    result.best_step = result.steps
            if checkpointing is not None and (result.steps == last or (
                    checkpointing.every and result.steps % checkpointing.every == 0)):
                checkpoint.save(checkpointing, {
                    "config": asdict(config), "step": result.steps, "trainable": trainable_state(model),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "stateful": {name: obj.state_dict() for name, obj in stateful.items()},
                    "epoch_start": epoch_start, "taken": taken, "rng": checkpoint.rng_states(),
                    "losses": result.losses, "curve": result.curve, "best_step": result.best_step,
                    "best": best, "since_eval": since_eval})
            if result.steps >= last:
                break
    bar.close()
    del net  # a DDP wrapper; its gradient hooks go with it
    result.seconds = time.perf_counter() - start
    if best is not None and config.keep_best:
        model.load_state_dict(best[1], strict=False)
    elif best is not None:
        result.best_step = config.steps
    if dev.type == "cuda":
        result.peak_memory_mb = torch.cuda.max_memory_allocated(dev) / 2**20
    model.eval()
    return result


def _resume(saved: dict, config: TrainConfig, model: nn.Module, optimizer, scheduler, stateful: dict,
            generator: torch.Generator, result: TrainResult, dev: torch.device) -> int:
    """Put a checkpoint back (see :mod:`peft_minimal.checkpoint`); returns the batches to skip."""
    same = ("steps", "batch_size", "lr", "seed", "warmup_ratio", "weight_decay", "eval_every")
    mismatch = {k: (saved["config"][k], getattr(config, k)) for k in same if saved["config"][k] != getattr(config, k)}
    if mismatch:
        raise ValueError(f"the checkpoint was made with another configuration (saved, now): {mismatch}")
    if saved["stateful"].keys() != stateful.keys():
        raise ValueError(f"the checkpoint holds the state of {sorted(saved['stateful'])}, "
                         f"this run has {sorted(stateful)} (Checkpointing.stateful, the after_step hook)")
    model.load_state_dict(saved["trainable"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    for name, obj in stateful.items():
        obj.load_state_dict(checkpoint.to_device(saved["stateful"][name], dev))
    generator.set_state(saved["epoch_start"])
    result.steps, result.losses = saved["step"], saved["losses"]
    result.curve, result.best_step = saved["curve"], saved["best_step"]
    return saved["taken"]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every trainable parameter (what a run changes), keyed as in ``state_dict``."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 128,
             dev: torch.device | None = None) -> Evaluation:
    """Accuracy, mean cross-entropy and the predicted label of every example of ``dataset``.

    Inside a process group each process reads every w-th example and the sums are all-reduced,
    so every process gets the whole data set's numbers."""
    dev = dev or default_device()
    model.to(dev).eval()
    if distributed.is_distributed():
        shard = Subset(dataset, distributed.strided_indices(len(dataset)))
        predictions, correct, loss_sum = _evaluation_sums(model, DataLoader(shard, batch_size=batch_size), dev)
        totals = distributed.sum_over_ranks(torch.tensor([correct, loss_sum], dtype=torch.float64))
        everyone = distributed.gather_strided(torch.cat([torch.empty(0, dtype=torch.long), *predictions]),
                                              len(dataset))
        return Evaluation(int(totals[0]) / len(dataset), totals[1].item() / len(dataset), everyone)
    predictions, correct, loss_sum = _evaluation_sums(model, DataLoader(dataset, batch_size=batch_size), dev)
    return Evaluation(correct / len(dataset), loss_sum / len(dataset), torch.cat(predictions))


def _evaluation_sums(model: nn.Module, loader: DataLoader, dev: torch.device) -> tuple[list[torch.Tensor], int, float]:
    """Predicted labels (one tensor a batch), correct count and summed cross-entropy."""
    predictions, correct, loss_sum = [], 0, 0.0
    for batch in loader:
        inputs = model_inputs(batch, dev)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(-1).cpu())
        correct += (predictions[-1] == labels.cpu()).sum().item()
    return predictions, correct, loss_sum


def evaluate_accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 128,
                      dev: torch.device | None = None) -> float:
    """Share of examples whose arg-max logit is the label."""
    return evaluate(model, dataset, batch_size, dev).accuracy


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
