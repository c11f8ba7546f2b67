"""One training run of the torchrun tests (tests/test_distributed.py) on a tiny BERT: LoRA, AdaLoRA,
or AdaLoRA without its orthogonality penalty (``adalora-no-penalty``).

``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py OUT``
writes ``OUT/rank<r>.pt`` from each process; :func:`run` called in one process is the reference.
"""
import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from peft_minimal import adalora, distributed, lora
from peft_minimal.checkpoint import Checkpointing
from peft_minimal.train import TrainConfig, seed_everything, train

STEPS, BATCH = 10, 16
METHODS = ("lora", "adalora", "adalora-no-penalty")


def toy(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, 7:] = 0  # padded rows: a shard trims its own padding columns, the whole batch its own
    return TensorDataset(ids, mask, ids[:, 0] % 3)


def run(method: str, checkpoint_dir: Path | None = None, stop_at: int | None = None) -> dict:
    torch.manual_seed(0)  # conftest's tiny BERT
    model = BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    seed_everything(0)
    extra, hook, patterns, stateful = None, None, [], {}
    if method == "lora":
        lora.add_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    else:  # as grid.run_protocol wires it: allocator hook and (unless no-penalty) orthogonality penalty
        cfg = adalora.AdaLoRAConfig(init_r=6, target_r=3, alpha=12, total_step=STEPS, tinit=1, tfinal=2,
                                    orth_reg_weight=0.1, target_modules=["query", "key", "value"],
                                    modules_to_save=["classifier"])
        adalora.add_adalora(model, cfg)
        allocator = adalora.RankAllocator(model, cfg)
        stateful = {"allocator": allocator}  # the hook below hides it from the loop
        if method == "adalora":
            extra = lambda m: 0.1 * adalora.orthogonal_regularization(m)  # noqa: E731

        def hook(m, step):
            allocator.update_and_allocate(m, step)
            patterns.append(dict(allocator.rank_pattern or {}))  # the mask after every step
    config = TrainConfig(steps=STEPS, batch_size=BATCH, lr=2e-2, progress=False, eval_every=5, stop_at=stop_at)
    result = train(model, toy(96, 0), config, extra_loss=extra, after_step=hook, dev=torch.device("cpu"),
                   validation=toy(30, 5),
                   checkpointing=Checkpointing(checkpoint_dir, stateful=stateful) if checkpoint_dir else None)
    return {"losses": result.losses, "curve": result.curve, "best_step": result.best_step,
            "state": {k: v.clone() for k, v in model.state_dict().items()}, "patterns": patterns}


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.setup()
    out = Path(sys.argv[1])
    records = {method: run(method) for method in METHODS}
    run("adalora", out / "checkpoint", stop_at=4)  # rank 0 writes it, both ranks resume from it
    records["adalora-resumed"] = run("adalora", out / "checkpoint")
    records["world_size"] = distributed.world_size()
    torch.save(records, out / f"rank{distributed.rank()}.pt")  # every rank, so the test can compare them
    distributed.cleanup()
