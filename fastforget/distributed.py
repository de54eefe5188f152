"""Data-parallel fine-tuning: the process group torchrun describes, and who this process is in it.

    torchrun --standalone --nproc_per_node 2 -m fastforget.cli erase --model M --target 3 --method piu --out DIR

torchrun starts one process per rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in the
environment; `init_from_env()` joins them (gloo for CPU tensors, nccl for CUDA tensors). From Python:

    import fastforget as ff
    from fastforget import distributed
    distributed.init_from_env()             # or torch.distributed.init_process_group(...) yourself
    res = ff.erase(model, targets, method="piu")
    if distributed.is_main():
        res.save("out")                     # one writer: rank 0
    distributed.barrier()

Every rank runs the same code with the same seed; fastforget.methods.student.train_student then splits each
micro-batch's rows over the ranks (see `student_shard` there). torch.distributed ships with torch: no extra.
Without a process group every function here answers as a single process (rank 0 of 1)."""
from __future__ import annotations

import os

import torch


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_from_env() -> bool:
    """Join the process group torchrun describes when WORLD_SIZE > 1 and none is initialised yet: gloo, and nccl
    for CUDA tensors when CUDA is there (each process's current GPU is the one LOCAL_RANK names). Returns True when it initialised one;
    False for a single process or a group that already exists (the caller's)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or _group_ready():
        return False
    import torch.distributed as dist

    if not dist.is_available():  # pragma: no cover - every official torch build has it
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # CUDA tensors over nccl; a model left on the CPU (the CLI loads there) still trains, over gloo
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return True


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if _group_ready() else 0


def world_size() -> int:
    """The number of processes in the group (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if _group_ready() else 1


def is_main() -> bool:
    """True on rank 0, the one process that writes outputs and prints results."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown() -> None:
    """Leave the process group, if one is initialised (torchrun's processes then exit cleanly)."""
    if _group_ready():
        import torch.distributed as dist

        dist.destroy_process_group()
