import numpy as np
import pytest
import torch
from scipy import stats

from peft_minimal import protocol
from peft_minimal.data import TextData


def labelled(n_per_class=(30, 20, 10)):
    labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]
    return TextData([f"text {i}" for i in range(len(labels))], labels, ["a", "b", "c"])


def test_per_class_is_stratified_seeded_and_disjoint():
    data = labelled()
    held, rest = protocol.per_class(data.labels, 4, seed=0)
    assert np.bincount(np.array(data.labels)[held]).tolist() == [4, 4, 4]
    assert sorted(held + rest) == list(range(len(data))) and not set(held) & set(rest)
    assert protocol.per_class(data.labels, 4, seed=0) == (held, rest)
    assert protocol.per_class(data.labels, 4, seed=1)[0] != held
    with pytest.raises(ValueError, match="fewer than k=11"):
        protocol.per_class(data.labels, 11, seed=0)


def test_validation_is_carved_from_train_and_few_shot_from_the_rest():
    pool, validation = protocol.carve_validation(labelled(), per_label=5, seed=0)
    assert len(validation) == 15 and len(pool) == 45
    assert not set(pool.texts) & set(validation.texts)
    shot = protocol.few_shot(pool, 3, seed=2)
    assert sorted(np.bincount(shot.labels)) == [3, 3, 3] and set(shot.texts) <= set(pool.texts)
    assert protocol.few_shot(pool, None, seed=2) is pool


def test_plateau_detection():
    rising = [{"val_accuracy": a} for a in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    flat = [{"val_accuracy": a} for a in (0.1, 0.5, 0.6, 0.6, 0.605, 0.59)]
    assert not protocol.plateaued(rising)
    assert protocol.plateaued(flat)
    assert not protocol.plateaued(flat[:2])


def test_best_learning_rate_uses_validation_and_needs_a_grid():
    runs = [{"lr": 1e-3, "val_accuracy": 0.5, "val_loss": 1.0}, {"lr": 3e-3, "val_accuracy": 0.6, "val_loss": 1.2},
            {"lr": 1e-2, "val_accuracy": 0.6, "val_loss": 0.9}]
    assert protocol.best_learning_rate(runs) == 1e-2  # tie on accuracy: the lower loss
    with pytest.raises(ValueError, match="at least 3"):
        protocol.best_learning_rate(runs[:2])


def test_paired_interval_is_students_t_on_the_differences():
    a, b = [0.61, 0.63, 0.60, 0.64], [0.58, 0.59, 0.59, 0.60]
    d = np.subtract(a, b)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    interval = protocol.paired_interval(a, b)
    assert interval.difference == pytest.approx(d.mean())
    assert (interval.low, interval.high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert interval.excludes_zero()
    assert protocol.verdict(interval, "A", "B").startswith("A beats B")
    assert protocol.verdict(protocol.paired_interval(b, a), "A", "B").startswith("B beats A")
    noisy = protocol.paired_interval([0.6, 0.5, 0.7], [0.55, 0.62, 0.6])
    assert not noisy.excludes_zero() and "no difference measured" in protocol.verdict(noisy, "A", "B")
    with pytest.raises(ValueError, match="2 paired"):
        protocol.paired_interval([0.5], [0.4])


def test_constant_differences_give_a_point_interval():
    interval = protocol.paired_interval([0.5, 0.6, 0.7], [0.4, 0.5, 0.6])
    assert (interval.low, interval.high) == pytest.approx((0.1, 0.1))


def test_bootstrap_interval_covers_the_difference_and_shrinks_with_more_messages():
    rng = np.random.default_rng(0)
    small = protocol.bootstrap_interval(rng.random(400) < 0.7, rng.random(400) < 0.6)
    large = protocol.bootstrap_interval(rng.random(8000) < 0.7, rng.random(8000) < 0.6)
    assert large.low < 0.1 < large.high and large.excludes_zero()
    assert (large.high - large.low) < (small.high - small.low) / 3
    same = rng.random(500) < 0.5
    assert protocol.bootstrap_interval(same, same).high == 0.0
    seeds = np.stack([same, same, same])  # seeds x messages: the seed average is used
    assert protocol.bootstrap_interval(seeds, seeds).difference == 0.0


def test_correctness_packs_into_hex_and_back():
    labels = [i % 5 for i in range(7532)]
    predictions = torch.tensor([(i * 7) % 5 for i in range(7532)])
    packed = protocol.pack_correct(predictions, labels)
    assert len(packed) == 2 * 942
    assert protocol.unpack_correct(packed, 7532).tolist() == (predictions.numpy() == np.array(labels)).tolist()


class WordTokenizer:
    """Token id = word length (1..20), so the tiny BERT can read it; pads to the longest."""

    def __call__(self, texts, truncation=True, max_length=16, padding=True, return_tensors="pt"):
        rows = [[min(len(w), 20) for w in t.split()][:max_length] for t in texts]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return _Batch(input_ids=ids, attention_mask=mask)


class _Batch(dict):
    def to(self, dev):
        return _Batch({k: v.to(dev) for k, v in self.items()})


def test_mean_pooled_features_ignore_padding_and_are_cached(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    texts = ["a bb ccc", "dddd eeeee ffffff gg h iii jjjj"]
    together = protocol.mean_pooled_features(tiny_bert.bert, WordTokenizer(), texts, 16)
    alone = protocol.mean_pooled_features(tiny_bert.bert, WordTokenizer(), texts[:1], 16, cache=False)
    np.testing.assert_allclose(together[0], alone[0], atol=1e-5)  # padding in the batch changes nothing
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert len(list(tmp_path.rglob("*.npy"))) == 1
    tiny_bert.bert.forward = lambda *a, **k: pytest.fail("a cache hit must not run the encoder")
    np.testing.assert_array_equal(protocol.mean_pooled_features(tiny_bert.bert, WordTokenizer(), texts, 16),
                                  together)


def test_linear_probe_chooses_c_on_validation_and_must_converge():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 3
    def sample(n):
        y = rng.integers(0, 3, n)
        return centers[y] + rng.normal(size=(n, 8)), y
    (tx, ty), (vx, vy) = sample(300), sample(150)
    probe, scores = protocol.linear_probe(tx, ty, vx, vy, cs=(0.001, 1.0))
    assert set(scores) == {0.001, 1.0} and probe[-1].C == max(scores, key=lambda c: (scores[c], -c))
    assert probe.score(vx, vy) > 0.9
    with pytest.raises(RuntimeError, match="did not converge"):
        protocol.linear_probe(tx, ty, vx, vy, cs=(100.0,), max_iter=1)


def test_feature_cache_is_keyed_by_the_weights(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(protocol, "CACHE", tmp_path)
    before = protocol.mean_pooled_features(tiny_bert.bert, WordTokenizer(), ["a bb ccc"], 16)
    with torch.no_grad():
        tiny_bert.bert.embeddings.word_embeddings.weight.mul_(2)
    after = protocol.mean_pooled_features(tiny_bert.bert, WordTokenizer(), ["a bb ccc"], 16)
    assert not np.allclose(before, after) and len(list(tmp_path.rglob("*.npy"))) == 2
