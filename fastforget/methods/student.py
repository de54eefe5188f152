"""The one student-training loop of the fine-tuning methods (piu, esd_x, bia absorb, and the next ones).

A frozen teacher (the caller's UNet, only ever run forward under no_grad), a float32 student copy of it with a
trainable subset, AdamW, micro-batches with gradient accumulation, a tqdm bar, and the changed tensors
extracted for a Patch. The method supplies `loss_fn(student, teacher) -> (loss, {name: float})`; every random
draw is the method's, from its own seeded generator, so a seed gives the same patch bytes on CPU.

Data-parallel (torchrun, see fastforget.distributed): with a process group of world size W > 1 the student is
wrapped in DistributedDataParallel. Every rank draws the WHOLE micro-batch from the method's generator (so the
generators stay in step and rank r's rows are the rows a single process would draw), then runs the teacher
and the student only on its rows, `student_shard(b)`, and returns its rows' share of the batch mean
(`shard_mse_loss`: partial sum / the full micro-batch). train_student multiplies by W before backward, so
DDP's gradient average is the single-process gradient of the mean over the whole micro-batch, uneven shards
included; the loss parts are summed over the ranks, so the history is the single-process one. A loss_fn that
does not shard must not run distributed: train_student refuses unless `sharded=True`."""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastforget import distributed
from fastforget.errors import InputError


@dataclass
class StudentResult:
    new: dict               # "unet.<param>" -> tensor, only the tensors that changed (teacher dtype, CPU)
    history: dict           # loss part -> per-step values
    trainable_parameters: int


def trainable_parameters(unet, modules: list[str] | None, what: str = "trainable") -> dict:
    """{qualified name: parameter} of the given modules of `unet` (None: every parameter). Unknown module
    names raise InputError naming them."""
    if modules is None:
        return dict(unet.named_parameters())
    params = {}
    for m in modules:
        try:
            mod = unet.get_submodule(m)
        except AttributeError:
            raise InputError(f"option {what!r}: the UNet has no module {m!r}") from None
        for p, t in mod.named_parameters():
            params[f"{m}.{p}"] = t
    if not params:
        raise InputError(f"option {what!r}: {modules!r} selects no parameters")
    return params


def student_shard(n: int) -> slice:
    """This rank's rows of a micro-batch of `n` rows: contiguous, sizes differing by at most one (the first
    n % W ranks take one more); slice(0, n) without a process group."""
    w, r = distributed.world_size(), distributed.rank()
    if w == 1:
        return slice(0, n)
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


def shard_mse_loss(pred: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """This shard's share of the mean squared error over a micro-batch of `n` rows (pred / target hold only
    the shard's rows): summed over the ranks it is F.mse_loss over the whole micro-batch. Without a process
    group it IS F.mse_loss(pred, target) (the same bytes as before data-parallel existed)."""
    if distributed.world_size() == 1:
        return F.mse_loss(pred, target)
    return F.mse_loss(pred, target, reduction="sum") / (n * math.prod(pred.shape[1:]))


def check_shardable(what: str, n: int) -> None:
    """InputError naming `what` (e.g. "piu: option 'micro_batch'") when a micro-batch of `n` rows cannot give
    every rank at least one row."""
    w = distributed.world_size()
    if n < w:
        raise InputError(f"{what} = {n} is smaller than the data-parallel world size {w}: every process needs at "
                         f"least one row of each micro-batch (use a micro-batch >= {w} or fewer processes)")


def refuse_distributed(method: str) -> None:
    """InputError for a method whose loss does not shard when a process group of world size > 1 is running."""
    w = distributed.world_size()
    if w > 1:
        raise InputError(f"{method} does not run data-parallel (world size {w}): run it in one process (its loss "
                         "does not split over ranks)")


def _contiguous_group_norm_inputs(student, modules: list[str] | None) -> None:
    """Workaround for a CPU crash in torch: GroupNorm backward on a channels-last input that does not require
    grad (while the norm's weight does) segfaults (seen with torch 2.13 on UNet2DModel, whose attention blocks
    hand channels-last tensors to the next resnet). Inputs of trainable GroupNorms are made contiguous; the
    values are unchanged."""
    def pre(module, args):
        return (args[0].contiguous(),) + tuple(args[1:])

    roots = [student] if modules is None else [student.get_submodule(m) for m in modules]
    for root in roots:
        for mod in root.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.register_forward_pre_hook(pre)


def train_student(teacher, modules: list[str] | None, loss_fn, *, steps: int, lr: float,
                  weight_decay: float = 0.0, accumulation: int = 1, progress: bool = True, desc: str = "train",
                  prepare=None, sharded: bool = False) -> StudentResult:
    """Train a copy of `teacher` on `modules` (None: all of it) with AdamW for `steps` optimiser steps of
    `accumulation` micro-batches each; `loss_fn(student, teacher)` draws one micro-batch and returns
    (loss, {part: float}). `prepare(student)` runs once before training (e.g. install a fused attention
    processor). Returns the changed tensors under "unet.<name>" and the per-step loss history.

    `sharded=True` declares that loss_fn computes only this rank's rows (`student_shard`, `shard_mse_loss`);
    then, under a process group of world size > 1, training is data-parallel (see the module docstring; DDP's
    rule: the student is called once per micro-batch). A loss_fn that is not sharded raises InputError under a
    process group."""
    from tqdm import tqdm

    world = distributed.world_size()
    if world > 1 and not sharded:
        refuse_distributed(desc)

    student = copy.deepcopy(teacher).float()
    student.train(False)  # no dropout: deterministic
    student.requires_grad_(False)
    params = trainable_parameters(student, modules)
    for t in params.values():
        t.requires_grad_(True)
    _contiguous_group_norm_inputs(student, modules)
    if prepare is not None:
        prepare(student)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=weight_decay)
    trained = student
    if world > 1:
        # DDP only reduces parameters that require grad; all ranks start from the same copy of the teacher
        device = next(iter(params.values())).device
        trained = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device] if device.type == "cuda" else None)
    history: dict[str, list] = {}
    bar = tqdm(range(steps), desc=desc, disable=not progress or not distributed.is_main(), leave=False)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for micro in range(accumulation):
            # all-reduce the gradients once per step: on the last micro-batch of the accumulation
            sync = world == 1 or micro == accumulation - 1
            with contextlib.nullcontext() if sync else trained.no_sync():
                loss, parts = loss_fn(trained, teacher)
                if world == 1:
                    (loss / accumulation).backward()
                else:  # DDP averages over the ranks; the shards' losses already sum to the batch mean
                    (loss * (world / accumulation)).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v) / accumulation
        if world > 1:
            totals = _sum_over_ranks(totals, next(iter(params.values())).device)
        opt.step()
        for k, v in totals.items():
            history.setdefault(k, []).append(round(v, 7))
        bar.set_postfix({k: f"{v:.4f}" for k, v in totals.items()})
    bar.close()

    new = {}
    originals = dict(teacher.named_parameters())
    with torch.no_grad():
        for pname, t in params.items():
            orig = originals[pname]
            value = t.detach().to(orig.dtype).cpu()
            if not torch.equal(value, orig.detach().cpu()):
                new[f"unet.{pname}"] = value
    return StudentResult(new, history, sum(t.numel() for t in params.values()))


def _sum_over_ranks(totals: dict, device) -> dict:
    """{part: value} summed over the ranks (each rank holds its shard's share of the batch mean)."""
    import torch.distributed as dist

    keys = list(totals)  # the same parts in the same order on every rank: the same loss_fn
    vec = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(vec)
    return dict(zip(keys, vec.tolist()))
