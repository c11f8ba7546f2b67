"""Few-shot classification with a decoder: in-context learning against (IA)³.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning" (NeurIPS 2022, arXiv:2205.05638) claim that (IA)³ trained on K examples
beats putting the same K examples into the prompt, and costs less per prediction, because
the prompt of in-context learning (ICL) grows with K. This module tests that small:

* **rank classification** (as T-Few does): a class's score is the log-likelihood of its
  label word after the prompt, never a free generation; the prediction is the best score.
  Label words must be one token each (``" business"``, ...), so one forward pass scores all;
* **ICL**: an instruction, K examples per class (shuffled by the seed), then the query;
* **(IA)³**: the instruction and the query only, with (IA)³ vectors trained on the same K
  examples per class by cross-entropy over the class scores (T-Few's rank-classification loss);
* **zero-shot**: the instruction and the query, no examples, no training.

The prompt's shared start (instruction and demonstrations) is run once and its keys and
values are reused for every query; the scores equal those of the whole prompt (a test checks).
"""
from __future__ import annotations

import copy
import inspect
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import ia3
from .data import TextData, load_text_classification
from .layers import count_parameters
from .models import device, load_decoder
from .train import seed_everything


@dataclass(frozen=True)
class FewShotConfig:
    k: int = 1                  # training examples per class (demonstrations for ICL)
    seed: int = 0               # draws the K examples and their order (and the batches)
    steps: int = 20             # (IA)³ optimizer steps
    lr: float = 3e-2            # (IA)³ learning rate (AdamW, constant)
    batch_size: int = 5
    test_per_class: int = 40    # fixed, stratified test titles (seed 0)
    eval_batch_size: int = 40
    instruction: str = ("Classify each BBC News headline by topic: business, entertainment, "
                        "politics, sports or tech.\n\n")
    template: str = "Headline: {text}\nTopic:"


def titles(data: TextData) -> TextData:
    """The first line of each article: its headline."""
    return TextData([t.split("\n", 1)[0].strip() for t in data.texts], list(data.labels), data.label_names)


def per_class(data: TextData, n: int, seed: int) -> TextData:
    """``n`` examples of every class, drawn by ``seed``, then shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    idx = [i for c in range(len(data.label_names))
           for i in rng.permutation([j for j, y in enumerate(data.labels) if y == c])[:n]]
    idx = [idx[i] for i in rng.permutation(len(idx))]
    return TextData([data.texts[i] for i in idx], [data.labels[i] for i in idx], data.label_names)


def label_token_ids(tokenizer, label_names: list[str]) -> list[int]:
    """The one token of each label word after a space; refuses multi-token words."""
    ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in label_names]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"label words must be one token each, got {dict(zip(label_names, ids))}")
    return [i[0] for i in ids]


def build_prompt(config: FewShotConfig, demos: TextData | None, text: str) -> tuple[str, str]:
    """(shared prefix, query): the instruction and the demonstrations, then the query."""
    prefix = config.instruction
    if demos is not None:
        prefix += "".join(f"{config.template.format(text=t)} {demos.label_names[y]}\n\n"
                          for t, y in zip(demos.texts, demos.labels))
    return prefix, config.template.format(text=text)


def label_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, label_ids: list[int],
                   past=None) -> torch.Tensor:
    """Log-probability of each label token after the last real token of each right-padded row
    of ``ids`` (after a cached prefix ``past``, if given): shape ``(rows, labels)``. Only the
    needed rows of the output layer are computed."""
    full_mask = mask if past is None else torch.cat([mask.new_ones(len(ids), past.get_seq_length()), mask], 1)
    hidden = model.model(input_ids=ids, attention_mask=full_mask, use_cache=past is not None,
                         **{_cache_argument(model): past}).last_hidden_state
    last = hidden[torch.arange(len(ids), device=ids.device), mask.sum(1) - 1]
    return model.lm_head(last).float().log_softmax(-1)[:, label_ids]


def _cache_argument(model: nn.Module) -> str:
    """``cache`` (transformers 5.x) or ``past_key_values`` (before it was renamed)."""
    return "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"


def _pad(rows: list[list[int]], pad_id: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], device=dev)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=dev)
    return ids, mask


@torch.no_grad()
def score(model: nn.Module, prefix_ids: list[int], query_ids: list[list[int]], label_ids: list[int],
          pad_id: int, batch_size: int = 40) -> torch.Tensor:
    """Label log-likelihoods ``(queries, labels)`` of ``prefix + query`` for every query; the
    prefix runs once and its keys and values serve every batch."""
    dev = next(model.parameters()).device
    model.eval()
    past = None
    if prefix_ids:
        out = model.model(input_ids=torch.tensor([prefix_ids], device=dev), use_cache=True)
        past = getattr(out, "cache", None) or out.past_key_values
    out = []
    for i in range(0, len(query_ids), batch_size):
        ids, mask = _pad(query_ids[i: i + batch_size], pad_id, dev)
        cache = None
        if past is not None:
            cache = copy.deepcopy(past)
            cache.batch_repeat_interleave(len(ids))
        out.append(label_logprobs(model, ids, mask, label_ids, cache).cpu())
    return torch.cat(out)


def train_ia3(model: nn.Module, rows: list[list[int]], labels: list[int], label_ids: list[int], pad_id: int,
              config: FewShotConfig) -> list[float]:
    """Train the model's trainable parameters (its (IA)³ vectors) on tokenized prompts by
    cross-entropy over the label scores; constant rate, batches drawn by ``config.seed``."""
    dev = next(model.parameters()).device
    seed_everything(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    rng, order, losses = random.Random(config.seed), [], []
    target = torch.tensor(labels, device=dev)
    model.train()
    for _ in range(config.steps):
        if len(order) < config.batch_size:
            order += rng.sample(range(len(rows)), len(rows))
        batch, order = order[:config.batch_size], order[config.batch_size:]
        ids, mask = _pad([rows[i] for i in batch], pad_id, dev)
        loss = F.cross_entropy(label_logprobs(model, ids, mask, label_ids), target[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def bbc_titles(config: FewShotConfig) -> tuple[TextData, TextData]:
    """BBC News headlines: the training split (to draw K from) and the fixed test titles."""
    return (titles(load_text_classification("bbc_news", "train")),
            per_class(titles(load_text_classification("bbc_news", "test")), config.test_per_class, seed=0))


def run_fewshot(method: str, config: FewShotConfig, model: nn.Module | None = None, tokenizer=None) -> dict:
    """One run, ``method`` in ``zero`` (no examples), ``icl`` (K per class in the prompt) or
    ``ia3`` (trained on K per class, none in the prompt), on SmolLM2-135M-Instruct by default."""
    if method not in ("zero", "icl", "ia3"):
        raise ValueError(f"method must be zero, icl or ia3, got {method!r}")
    if model is None:
        model, tokenizer = load_decoder()
    model.to(device())
    train_pool, test = bbc_titles(config)
    demos = per_class(train_pool, config.k, config.seed) if method != "zero" else None
    label_ids = label_token_ids(tokenizer, test.label_names)
    encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    record = {"method": method, "k": config.k if demos else 0, "seed": config.seed, "config": asdict(config)}
    start = time.perf_counter()
    if method == "ia3":
        ia3.add_ia3(model, ia3.IA3Config.for_model(model))
        rows = [sum(map(encode, build_prompt(config, None, t)), []) for t in demos.texts]  # as scored
        losses = train_ia3(model, rows, demos.labels, label_ids, tokenizer.pad_token_id, config)
        record.update(trainable=count_parameters(model)[0], first_loss=losses[0], final_loss=sum(losses[-5:]) / 5)
    prefix, _ = build_prompt(config, demos if method == "icl" else None, "")
    prefix_ids = encode(prefix)
    queries = [encode(build_prompt(config, None, t)[1]) for t in test.texts]
    scores = score(model, prefix_ids, queries, label_ids, tokenizer.pad_token_id, config.eval_batch_size)
    predictions = scores.argmax(-1)
    record.update(accuracy=float((predictions == torch.tensor(test.labels)).float().mean()),
                  predictions=predictions.tolist(), test_size=len(test),
                  prompt_tokens=len(prefix_ids) + float(np.mean([len(q) for q in queries])),
                  seconds=time.perf_counter() - start)
    return record


def ia3_vs_icl(scale, ks: tuple[int, ...] = (1, 4), seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    """The recorded grid: zero-shot once, then ICL and (IA)³ for every K and seed (the same
    K examples for both). ``scale`` is accepted like every grid's; the sizes are the config's."""
    runs = [run_fewshot("zero", FewShotConfig())]
    for k in ks:
        for seed in seeds:
            for method in ("icl", "ia3"):
                runs.append(run_fewshot(method, FewShotConfig(k=k, seed=seed)))
                print(f"K={k} seed={seed} {method}: accuracy {runs[-1]['accuracy']:.3f}, {runs[-1]['seconds']:.0f} s", flush=True)
    return runs
