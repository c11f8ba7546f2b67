"""A one-rank NCCL check: ``torchrun --standalone --nproc_per_node=1 tools/nccl_check.py``.

With one process ``peft_minimal.distributed.setup`` joins no process group (a group of one
changes nothing), so a one-GPU ``scale_out`` run never touches NCCL. This joins a group of one
by hand, all-reduces a tensor and takes one DDP step of LoRA-wrapped MiniLM, so the NCCL path
(the process group, DDP's gradient all-reduce) is exercised on a machine with a single GPU.
On a CPU it uses ``gloo``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402


def main() -> None:
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    x = torch.full((4,), float(dist.get_rank() + 1), device=dev)
    dist.all_reduce(x)
    print(f"{backend}: world {dist.get_world_size()}, all_reduce -> {x.tolist()}")

    from peft_minimal.experiments import prepare

    model = prepare("lora", r=8, seed=0)[0].to(dev).train()
    ddp = DistributedDataParallel(model, device_ids=[dev.index] if cuda else None)
    ids = torch.randint(1000, 2000, (8, 32), device=dev)
    loss = ddp(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.arange(8, device=dev)).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    print(f"DDP step over {backend}: loss {loss.item():.4f}, {sum(g is not None for g in grads)}/{len(grads)} "
          f"trainable tensors got gradients, torch {torch.__version__}"
          + (f", NCCL {torch.cuda.nccl.version()}" if cuda else ""))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
