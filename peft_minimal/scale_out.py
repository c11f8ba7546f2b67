"""One fine-tuning run of the book's protocol, on one device or many: ``python -m peft_minimal.scale_out``.

The same command runs in one process, or under ``torchrun`` in as many as there are devices::

    python -m peft_minimal.scale_out --method lora                         # one CPU or GPU
    torchrun --standalone --nproc_per_node=8 -m peft_minimal.scale_out --method lora
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 -m peft_minimal.scale_out --method lora   # on each machine

It trains MiniLM on the whole 20 Newsgroups pool of the protocol at ``PEFT_SCALE`` (``full``
on a GPU: 256 tokens, 3,000 steps of 32 messages), with the learning curve on validation,
then reads the test split; ``--batch-size`` is the *global* batch, split over the processes.
With ``--checkpoint-dir`` it resumes a run that was cut off. Rank 0 prints one JSON line
and, with ``--save``, writes the adapter.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from . import adalora, distributed
from .checkpoint import Checkpointing
from .data import tokenize
from .experiments import LEARNING_RATES, prepare
from .grid import current_protocol, protocol_data
from .io import save_adapter
from .train import TrainConfig, evaluate, train


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["head", "lora", "adalora", "ia3", "full"], default="lora")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the protocol's, all data)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the protocol's)")
    parser.add_argument("--lr", type=float, help="default: the method's rate of experiments.LEARNING_RATES")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", help="save here and resume from here")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--save", help="write the trained adapter here (rank 0)")
    args = parser.parse_args(argv)

    dev = distributed.setup()
    proto = current_protocol()
    steps = args.steps or proto.steps_for(None)
    pool, _, _, val_set, test_set = protocol_data(proto.max_length, proto.validation_per_class)
    model, tokenizer = prepare(args.method, args.r, args.seed, steps=steps)
    train_set = tokenize(tokenizer, pool, proto.max_length)
    config = TrainConfig(steps=steps, batch_size=args.batch_size or proto.batch_size,
                         lr=args.lr or LEARNING_RATES[args.method], seed=args.seed, bf16=dev.type == "cuda",
                         progress=True, eval_every=max(1, steps // proto.evaluations))
    extra_loss, hook = None, None
    if args.method == "adalora":  # wired as grid.run_protocol does
        weight = model.peft_config.orth_reg_weight
        extra_loss = lambda m: weight * adalora.orthogonal_regularization(m)  # noqa: E731
        hook = adalora.RankAllocator(model, model.peft_config).update_and_allocate
        config = replace(config, keep_best_after=steps - model.peft_config.tfinal)
    checkpointing = Checkpointing(args.checkpoint_dir, args.checkpoint_every) if args.checkpoint_dir else None
    result = train(model, train_set, config, extra_loss=extra_loss, after_step=hook, dev=dev,
                   validation=val_set, checkpointing=checkpointing)
    test = evaluate(model, test_set, dev=dev)  # every rank reads its share; the counts are all-reduced
    summary = {"method": args.method, "processes": distributed.world_size(), "device": str(dev),
               "scale": proto.name, "steps": result.steps, "global_batch": config.batch_size,
               "best_step": result.best_step, "train_seconds": round(result.seconds, 1),
               "peak_memory_mb": result.peak_memory_mb, "test_accuracy": test.accuracy,
               "torch": torch.__version__}
    if distributed.is_main():
        print(json.dumps(summary))
        if args.save:
            save_adapter(model, args.save)
    distributed.cleanup()
    return summary


if __name__ == "__main__":
    main()
