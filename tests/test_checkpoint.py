"""Checkpoint and resume: a run stopped at step 5 and resumed ends bit-identical to an unbroken one."""
import copy

import pytest
import torch
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from peft_minimal import adalora, lora
from peft_minimal.checkpoint import Checkpointing
from peft_minimal.train import TrainConfig, seed_everything, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dropout_bert():
    """conftest's tiny BERT with dropout on, so that resuming must restore the random generators."""
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=100, num_labels=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(cfg).eval()


def toy(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0  # some padding, so batches differ in length
    return TensorDataset(ids, mask, ids[:, 0] % 3)


def run(base, method, config, checkpointing=None):
    """A fresh copy of ``base`` with ``method`` added from seed 0, trained; returns what it ends with."""
    model = copy.deepcopy(base)
    seed_everything(0)
    extra, hook = None, None
    if method == "lora":
        lora.add_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    else:  # AdaLoRA as grid.run_protocol wires it: the allocator hook and the orthogonality penalty
        cfg = adalora.AdaLoRAConfig(init_r=6, target_r=4, alpha=12, total_step=config.steps, tinit=2, tfinal=3,
                                    orth_reg_weight=0.1, dropout=0.1, target_modules=["query", "value"],
                                    modules_to_save=["classifier"])
        adalora.add_adalora(model, cfg)
        hook = adalora.RankAllocator(model, cfg).update_and_allocate
        extra = lambda m: 0.1 * adalora.orthogonal_regularization(m)  # noqa: E731
    result = train(model, toy(64, 0), config, extra_loss=extra, after_step=hook, dev=CPU,
                   validation=toy(24, 5), checkpointing=checkpointing)
    return result, model.state_dict()


@pytest.mark.parametrize("method,stop", [("lora", 5), ("lora", 4), ("adalora", 5)])
def test_stopped_and_resumed_run_is_the_unbroken_run(dropout_bert, method, stop, tmp_path):
    config = TrainConfig(steps=12, batch_size=16, lr=2e-2, progress=False, eval_every=3)
    whole, whole_state = run(dropout_bert, method, config)
    part, _ = run(dropout_bert, method, TrainConfig(**{**config.__dict__, "stop_at": stop}), Checkpointing(tmp_path))
    assert part.steps == stop and (tmp_path / "checkpoint.pt").exists()
    torch.manual_seed(123)  # the resumed run must not depend on the generators it finds
    resumed, resumed_state = run(dropout_bert, method, config, Checkpointing(tmp_path))
    assert resumed.steps == 12 and resumed.losses == whole.losses  # 4 batches a pass: stop 4 ends a pass
    assert resumed.curve == whole.curve and resumed.best_step == whole.best_step
    assert resumed_state.keys() == whole_state.keys()
    for name in whole_state:
        assert torch.equal(resumed_state[name], whole_state[name]), name


def test_checkpoints_every_n_steps_and_refuses_another_configuration(tiny_bert, tmp_path):
    config = TrainConfig(steps=6, batch_size=16, lr=2e-2, progress=False)
    run(tiny_bert, "lora", TrainConfig(**{**config.__dict__, "stop_at": 4}), Checkpointing(tmp_path, every=3))
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 4
    with pytest.raises(ValueError, match="another configuration"):
        run(tiny_bert, "lora", TrainConfig(**{**config.__dict__, "lr": 1e-2}), Checkpointing(tmp_path))


def test_allocator_state_round_trips(tiny_bert):
    cfg = adalora.AdaLoRAConfig(init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2)
    model = adalora.add_adalora(copy.deepcopy(tiny_bert), cfg)
    allocator = adalora.RankAllocator(model, cfg)
    model(input_ids=torch.randint(1, 100, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    allocator.update_and_allocate(model, 3)
    other = adalora.RankAllocator(model, cfg)
    other.load_state_dict(copy.deepcopy(allocator.state_dict()))
    assert other.rank_pattern == allocator.rank_pattern and other.history == allocator.history
    for name, value in allocator.exp_avg_unc.items():
        assert torch.equal(other.exp_avg_unc[name], value)


def test_resuming_without_the_saved_hook_state_is_an_error(tiny_bert, tmp_path):
    """A hook that hides its allocator in a closure must name it in ``stateful``, or resuming refuses."""
    config = TrainConfig(steps=4, batch_size=16, lr=2e-2, progress=False)
    holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # anything with a state_dict
    run(tiny_bert, "lora", TrainConfig(**{**config.__dict__, "stop_at": 2}),
        Checkpointing(tmp_path, stateful={"allocator": holder}))
    with pytest.raises(ValueError, match="holds the state of"):
        run(tiny_bert, "lora", config, Checkpointing(tmp_path))
