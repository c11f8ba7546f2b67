"""Two processes under torchrun (gloo, CPU) train like one process with the same global batch.

One ``torchrun --standalone --nproc_per_node=2`` launch runs LoRA and AdaLoRA (tests/ddp_worker.py);
each rank holds 8 rows of every 16-row batch. The reference is the same run in this process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

from peft_minimal import distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ddp_worker  # noqa: E402

# Two processes sum the gradient in another order than one process (each half, then the halves),
# and each shard trims its own padding: float32 rounding, nothing more. Measured max differences
# on the 2-core CPU (torch 2.13): weights 1.1e-7 (LoRA), 5.0e-8 (AdaLoRA), 1.1e-7 (AdaLoRA without
# the penalty); losses 1.2e-7, 1.2e-7, 1.8e-7.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "ddp_worker.py"), str(out)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def one_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun worker
    try:
        yield {method: ddp_worker.run(method) for method in ddp_worker.METHODS}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ddp_worker.METHODS)
def test_two_processes_match_one(ranks, one_process, method):
    assert [r["world_size"] for r in ranks] == [2, 2]
    rank0, rank1, one = ranks[0][method], ranks[1][method], one_process[method]
    for name in rank0["state"]:  # DDP keeps the ranks identical, to the bit
        assert torch.equal(rank0["state"][name], rank1["state"][name]), name
    assert rank0["losses"] == rank1["losses"] and rank0["curve"] == rank1["curve"]  # all-reduced
    weights = max((rank0["state"][n] - one["state"][n]).abs().max().item() for n in one["state"])
    losses = max(abs(a - b) for a, b in zip(rank0["losses"], one["losses"]))
    print(f"\n{method}: 2 processes vs 1, max |Δ weight| = {weights:.2e}, max |Δ loss| = {losses:.2e}")
    assert len(rank0["losses"]) == len(one["losses"]) == ddp_worker.STEPS
    assert weights < TOLERANCE and losses < TOLERANCE
    assert [p["val_accuracy"] for p in rank0["curve"]] == [p["val_accuracy"] for p in one["curve"]]
    assert rank0["best_step"] == one["best_step"]


@pytest.mark.parametrize("method", ["adalora", "adalora-no-penalty"])
def test_adalora_masks_are_the_same_on_every_rank_at_every_step(ranks, one_process, method):
    """The allocator scores |w · grad| after DDP's all-reduce, so every rank prunes the same triplets
    (scores from each rank's local gradient would not agree: peft #479, PR #855).

    Without the penalty this check has teeth: with each rank's local gradient (the loop's
    backward under ``no_sync()``, tried by hand) the two ranks' masks differ from step 2 on.
    With it, on this tiny model, the penalty's gradient (the same on every rank) dominates P's
    and Q's scores, and even local gradients happened to give equal masks."""
    rank0, rank1 = ranks[0][method]["patterns"], ranks[1][method]["patterns"]
    assert len(rank0) == ddp_worker.STEPS and any(rank0)
    for step, (a, b) in enumerate(zip(rank0, rank1), start=1):
        assert a == b, f"the ranks' AdaLoRA masks differ after step {step}"
    assert rank0 == one_process[method]["patterns"]  # and they are one process's masks


def test_a_run_resumed_under_torchrun_is_the_unbroken_run(ranks):
    """AdaLoRA stopped at step 4 (rank 0 saves), then resumed by both ranks from that one file."""
    for rank in ranks:
        whole, resumed = rank["adalora"], rank["adalora-resumed"]
        assert resumed["losses"] == whole["losses"] and resumed["curve"] == whole["curve"]
        assert resumed["patterns"] == whole["patterns"][4:]  # the allocator went on where it stopped
        for name in whole["state"]:
            assert torch.equal(resumed["state"][name], whole["state"][name]), name


def test_only_unused_trainable_parameters_turn_on_find_unused_parameters(tiny_bert):
    from peft_minimal import lora
    inputs = {"input_ids": torch.randint(1, 100, (2, 6)), "labels": torch.tensor([0, 1])}
    model = lora.add_lora(tiny_bert, lora.LoRAConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert distributed.unused_parameters(model, inputs) == []
    model.bert.spare = torch.nn.Linear(2, 2)  # trainable, never called by forward
    state = torch.get_rng_state()
    assert distributed.unused_parameters(model, inputs) == ["bert.spare.bias", "bert.spare.weight"]
    assert torch.equal(torch.get_rng_state(), state)  # the probe draws nothing the run would see


def test_shards_make_up_the_one_process_batches():
    data = TensorDataset(torch.arange(44))  # 5 batches of 8 and 4 rows dropped, each pass

    def passes(loader, n=3):  # the generator must advance between passes as the plain loader's does
        return [[b[0].tolist() for b in loader] for _ in range(n)]
    one = passes(DataLoader(data, batch_size=8, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3)))
    shards = [passes(distributed.sharded_loader(data, 8, torch.Generator().manual_seed(3), rank, 4)) for rank in range(4)]
    for p, one_pass in enumerate(one):
        assert [sum((s[p][i] for s in shards), []) for i in range(len(one_pass))] == one_pass
    assert len(set(sum(one[0], []))) == 40
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        distributed.ShardedBatches(BatchSampler(range(10), 6, True), 0, 4)
