"""The one student-training loop of the fine-tuning methods (piu, esd_x, bia absorb, and the next ones).

A frozen teacher (the caller's UNet, only ever run forward under no_grad), a float32 student copy of it with a
trainable subset, AdamW, micro-batches with gradient accumulation, a tqdm bar, and the changed tensors
extracted for a Patch. The method supplies `loss_fn(student, teacher) -> (loss, {name: float})`; every random
draw is the method's, from its own seeded generator, so a seed gives the same patch bytes on CPU."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

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
                  prepare=None) -> StudentResult:
    """Train a copy of `teacher` on `modules` (None: all of it) with AdamW for `steps` optimiser steps of
    `accumulation` micro-batches each; `loss_fn(student, teacher)` draws one micro-batch and returns
    (loss, {part: float}). `prepare(student)` runs once before training (e.g. install a fused attention
    processor). Returns the changed tensors under "unet.<name>" and the per-step loss history."""
    from tqdm import tqdm

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
    history: dict[str, list] = {}
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for _micro in range(accumulation):
            loss, parts = loss_fn(student, teacher)
            (loss / accumulation).backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v) / accumulation
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
