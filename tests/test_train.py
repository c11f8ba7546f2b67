import math

import pytest
import torch
from torch.utils.data import TensorDataset

from peft_minimal import lora
from peft_minimal.train import TrainConfig, evaluate_accuracy, linear_schedule, perplexity, seed_everything, train


def toy_classification(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 10), generator=g)
    labels = (ids[:, 0] % 3)  # learnable from the first token
    return TensorDataset(ids, torch.ones_like(ids), labels)


def test_schedule_warms_up_then_decays():
    factors = [linear_schedule(s, 10, 2) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] == pytest.approx(0.125)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


def test_training_learns_and_calls_hooks(tiny_bert):
    lora.add_lora(tiny_bert, lora.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    data = toy_classification()
    seen = []
    result = train(tiny_bert, data, TrainConfig(steps=60, batch_size=16, lr=2e-2, progress=False),
                   extra_loss=lambda m: torch.zeros(()), after_step=lambda m, s: seen.append(s),
                   dev=torch.device("cpu"))
    assert seen == list(range(1, 61)) and result.steps == 60
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    assert evaluate_accuracy(tiny_bert, data, dev=torch.device("cpu")) > 0.5


def test_same_seed_same_numbers(tiny_bert):
    import copy
    runs = []
    for _ in range(2):
        model = copy.deepcopy(tiny_bert)
        seed_everything(0)  # lora_A's random init
        lora.add_lora(model, lora.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
        runs.append(train(model, toy_classification(), TrainConfig(steps=5, batch_size=8, progress=False),
                          dev=torch.device("cpu")).losses)
    assert runs[0] == runs[1]


def test_no_trainable_parameter_is_an_error(tiny_bert):
    for p in tiny_bert.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameter"):
        train(tiny_bert, toy_classification(), TrainConfig(steps=1, progress=False))


def test_perplexity_of_uniform_model_is_vocab_size():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids, labels):
            logits = torch.zeros(*input_ids.shape, 50)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
            return type("Out", (), {"loss": loss})
    blocks = torch.randint(0, 50, (5, 9))
    assert perplexity(Uniform(), blocks, batch_size=2, dev=torch.device("cpu")) == pytest.approx(50, rel=1e-5)
    assert not math.isnan(perplexity(Uniform(), blocks[:1], dev=torch.device("cpu")))


def lora_bert(tiny_bert):
    import copy
    model = copy.deepcopy(tiny_bert)
    seed_everything(0)
    return lora.add_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"],
                                                modules_to_save=["classifier"]))


def test_learning_curve_does_not_change_training_and_keeps_the_best_point(tiny_bert):
    from peft_minimal.train import evaluate
    cpu = torch.device("cpu")
    data, validation = toy_classification(), toy_classification(n=48, seed=5)
    plain = train(lora_bert(tiny_bert), data, TrainConfig(steps=30, batch_size=16, lr=2e-2, progress=False), dev=cpu)
    model = lora_bert(tiny_bert)
    config = TrainConfig(steps=30, batch_size=16, lr=2e-2, progress=False, eval_every=7)
    curved = train(model, data, config, dev=cpu, validation=validation)
    assert curved.losses == plain.losses  # evaluating in between draws no random number
    assert [p["step"] for p in curved.curve] == [7, 14, 21, 28, 30]
    best = max(curved.curve, key=lambda p: p["val_accuracy"])
    assert curved.best_step == best["step"]
    after = evaluate(model, validation, dev=cpu)
    assert after.accuracy == best["val_accuracy"] and after.loss == pytest.approx(best["val_loss"], rel=1e-5)
    assert all(p["train_loss"] > 0 for p in curved.curve)


def test_keep_best_after_and_keep_best_off(tiny_bert):
    cpu = torch.device("cpu")
    data, validation = toy_classification(), toy_classification(n=48, seed=5)
    late = train(lora_bert(tiny_bert), data, TrainConfig(steps=20, batch_size=16, lr=2e-2, progress=False, eval_every=5,
                                                         keep_best_after=15), dev=cpu, validation=validation)
    assert late.best_step >= 15
    last = train(lora_bert(tiny_bert), data, TrainConfig(steps=20, batch_size=16, lr=2e-2, progress=False, eval_every=5,
                                                         keep_best=False), dev=cpu, validation=validation)
    assert last.best_step == 20
    with pytest.raises(ValueError, match="validation set"):
        train(lora_bert(tiny_bert), data, TrainConfig(steps=2, eval_every=1, progress=False), dev=cpu)


def test_stop_at_replays_the_start_of_a_longer_run(tiny_bert):
    cpu = torch.device("cpu")
    data, validation = toy_classification(), toy_classification(n=48, seed=5)
    config = TrainConfig(steps=20, batch_size=16, lr=2e-2, progress=False, eval_every=5)
    whole = train(lora_bert(tiny_bert), data, config, dev=cpu, validation=validation)
    start = train(lora_bert(tiny_bert), data, TrainConfig(**{**config.__dict__, "stop_at": 10}), dev=cpu,
                  validation=validation)
    assert start.steps == 10 and start.losses == whole.losses[:10] and start.curve == whole.curve[:2]
