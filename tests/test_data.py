import pytest
import torch

from peft_minimal.data import TextData, lm_blocks, load_text_classification


def test_newsgroups_as_shipped():
    train = load_text_classification("20newsgroups", "train")
    test = load_text_classification("20newsgroups", "test")
    assert (len(train), len(test)) == (11314, 7532)
    assert len(train.label_names) == 20 and set(train.labels) == set(range(20))


@pytest.mark.parametrize("name, total, classes", [("sms_spam", 5574, 2), ("bbc_news", 2225, 5)])
def test_seeded_splits(name, total, classes):
    a, b = load_text_classification(name, "train", seed=0), load_text_classification(name, "test", seed=0)
    assert len(a) + len(b) == total and len(a.label_names) == classes
    assert load_text_classification(name, "train", seed=0).texts == a.texts
    other = load_text_classification(name, "train", seed=1), load_text_classification(name, "test", seed=1)
    assert other[0].texts != a.texts
    assert sorted(other[0].texts + other[1].texts) == sorted(a.texts + b.texts)  # a partition of one set


def test_subset_is_seeded_and_sized():
    data = TextData([str(i) for i in range(10)], list(range(10)), ["x"])
    assert len(data.subset(4, seed=3)) == 4
    assert data.subset(4, seed=3).texts == data.subset(4, seed=3).texts
    assert data.subset(None) is data


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_text_classification("sms_spam", "validation")


def test_lm_blocks():
    class Tok:
        eos_token_id = 0
        def __call__(self, text):
            return {"input_ids": [len(w) for w in text.split()]}
    blocks = lm_blocks(Tok(), ["a bb ccc", "dddd"], block_size=3)
    assert torch.equal(blocks, torch.tensor([[1, 2, 3], [0, 4, 0]]))
    with pytest.raises(ValueError, match="fewer than one block"):
        lm_blocks(Tok(), ["a"], block_size=8)
