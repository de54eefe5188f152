"""BIA `absorb`: a Patch after which the person's inverted photos decode as someone else.

For each target, sources (photos, or the model's renditions of the target) are DDIM-inverted to t0 by the
unedited model, exactly as BIA measures. Each source gets an absorb target image B: with
`absorb_target="anchor"` (ours) the teacher's decode of the same inversion under the anchor's condition (a
different person in the source's pose); with `"push"` (the paper's walk) the teacher's decode of the source's
code pushed across the SVM boundary. The student (the decoder, `trainable`) is trained by trajectory
distillation: on the DDIM bridge from x_t0 to B it must predict the ε that makes every plain DDIM step land on
B, so the erased model run from the source's inversion produces B. Other identities' inversions and random
samples keep the teacher's ε along the teacher's own DDIM paths. One training loop (methods/student.py)."""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.methods.base import ErasureRequest, check_request, patch_metadata, register_method
from fastforget.methods.bia.config import public_config, resolve_options
from fastforget.methods.bia.region import as_sources, build_region, encode_images, load_encoder, push_codes
from fastforget.methods.student import refuse_distributed, train_student, trainable_parameters
from fastforget.models.diffusion import HSpace, ddim_step
from fastforget.patch import Patch

EMBED_DIM = 512
# the model's renditions of a target use seeds from here on, away from the seeds verify() generates at
SOURCE_SEED_OFFSET = 1000
PRESERVE_SEED_OFFSET = 5000
log = logging.getLogger("fastforget")


@torch.no_grad()
def _guided_decode(hs: HSpace, x_t0: torch.Tensor, states: torch.Tensor, guidance: float, t0: int,
                   steps: int) -> torch.Tensor:
    """The teacher's DDIM decode from x_t0 under `states` (one row per sample) with classifier-free guidance."""
    seq = hs.timesteps(t0, steps)[::-1]
    x = x_t0.float().clone()
    for t, t_prev in zip(seq[:-1], seq[1:]):
        e_null = hs.call(hs.unet, x, t)
        eps = e_null + guidance * (hs.call(hs.unet, x, t, states=states) - e_null)
        x = ddim_step(x, eps, eps, hs.abar(t), hs.abar(t_prev))
    return x


def _points(items: list) -> tuple:
    """[(x_t, t, ε)] with x_t / ε (B, C, H, W) -> stacked (X, T, E), one row per sample and step."""
    xs = torch.cat([x for x, _, _ in items])
    ts = torch.cat([torch.full((len(x),), int(t), dtype=torch.long) for x, t, _ in items])
    es = torch.cat([e.expand_as(x) for x, _, e in items])
    return xs.float(), ts, es.float()


def augment(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` copies of photos x (k, 3, H, W) in [-1, 1] under the nuisances a person's other photos differ by:
    rotation ±12°, scale ±8 %, shift ±9 % of the frame, a horizontal flip, brightness ±10 %."""
    pick = torch.randint(len(x), (n,), generator=gen)
    th = (torch.rand(n, generator=gen) - 0.5) * 2 * math.radians(12)
    sc = 1 + (torch.rand(n, generator=gen) - 0.5) * 0.16
    tx, ty = ((torch.rand(n, generator=gen) - 0.5) * 0.18 for _ in range(2))
    flip = torch.rand(n, generator=gen) < 0.5
    bright = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.2
    theta = torch.stack([torch.stack([th.cos() / sc, -th.sin() / sc, tx], 1),
                         torch.stack([th.sin() / sc, th.cos() / sc, ty], 1)], 1)
    grid = F.affine_grid(theta, (n, *x.shape[1:]), align_corners=False)
    out = F.grid_sample(x[pick].float(), grid, padding_mode="border", align_corners=False)
    out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
    return ((out + 1) * bright - 1).clamp(-1, 1)


def _sources(hs: HSpace, request: ErasureRequest, cfg: dict, seed: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Per target, images (n, 3, H, W) in [-1, 1]: its photos (option `source_images`, or the photos erase()
    was given) with `n_augment` augmented copies; without photos, `n_sources` renditions by the model of the
    target's embedding (ID-conditioned models only)."""
    n_targets = len(request.targets)
    given = cfg["source_images"]
    if given is None and isinstance(request.extra, dict):
        given = request.extra.get("target_images")
    if given is not None:
        src_all, _ = as_sources(hs, given, cfg, seed)
        if len(src_all) % n_targets:
            raise InputError(f"bia: option 'source_images' must hold a multiple of {n_targets} images "
                             f"(one group per target), got {len(src_all)}")
        per = len(src_all) // n_targets
        groups = [src_all[i * per:(i + 1) * per] for i in range(n_targets)]
        if cfg["n_augment"]:
            groups = [torch.cat([g, augment(g, cfg["n_augment"], gen)]) for g in groups]
    elif not hs.conditional:
        raise InputError("bia: an unconditional model cannot render the targets; pass source_images= photos of "
                         "each target")
    else:
        groups = []
        for i in range(n_targets):
            emb = request.targets[i:i + 1].repeat(cfg["n_sources"], 1)
            with torch.no_grad():
                rend = hs.model.generate_tensor(emb, seed=seed + SOURCE_SEED_OFFSET + 97 * i,
                                                steps=cfg["source_steps"], guidance=cfg["source_guidance"])
            groups.append(rend.float().cpu())
    return groups


def _other_identities(request: ErasureRequest, n: int, gen: torch.Generator) -> torch.Tensor:
    """`n` embeddings of other people: retain first, then preservation-set draws, then random identities."""
    ret = request.retain if request.retain is not None else torch.zeros(0, EMBED_DIM)
    pres = request.preserve if request.preserve is not None else torch.zeros(0, EMBED_DIM)
    take_r = ret[:n].float()
    rest = n - len(take_r)
    take_p = pres[torch.randperm(len(pres), generator=gen)[:rest]].float() if rest > 0 and len(pres) else pres[:0]
    if rest > len(take_p):  # no gallery: random identities stand in for the people nobody named
        take_p = torch.cat([take_p.float(), F.normalize(torch.randn(rest - len(take_p), EMBED_DIM, generator=gen), dim=1)])
    return torch.cat([take_r, take_p.float()])


@register_method("bia", validate=lambda o: resolve_options(o))
def fit_bia(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    """BIA `absorb`: the person's inverted photos decode as someone else; other people's inversions and random
    samples decode as before. Returns a Patch of the changed decoder tensors. Options: see BIA_CONFIG
    (`fastforget.methods.bia.BIA_CONFIG.table()`)."""
    cfg = resolve_options(options)
    refuse_distributed("bia")  # its loss does not shard: one process (before any inversion work)
    if cfg["mode"] == "edit":
        raise InputError("bia: mode='edit' edits images and returns no Patch; call "
                         "fastforget.methods.bia.bia_edit(model, images_or_embeddings, encoder)")
    check_request("bia", request, anchors=cfg["absorb_target"] == "anchor")
    hs = HSpace(model)
    if cfg["absorb_target"] == "anchor" and not hs.conditional:
        raise InputError("bia: absorb_target='anchor' decodes under the anchor's condition, which an unconditional "
                         "model does not have; use absorb_target='push'")
    trainable_parameters(hs.unet, cfg["trainable"])  # unknown module names fail before any work
    encoder = load_encoder(cfg["encoder"] if cfg["encoder"] is not None else request.encoder, model)
    t_start = time.perf_counter()
    timings = {}
    gen = torch.Generator().manual_seed(seed)
    t0, steps = cfg["t0"], cfg["decode_steps"]

    # ---------------------------------------------------- erase: each source's bridge to its absorb target
    groups = _sources(hs, request, cfg, seed, gen)
    timings["sources_s"] = time.perf_counter() - t_start
    erase, regions, target_cos, negatives = [], [], [], []
    for i, group in enumerate(groups):
        z0 = torch.cat([hs.encode(group[j:j + 1], seed=seed + 31 * i + j) for j in range(len(group))])
        x_t0 = hs.invert(z0, t0, cfg["inversion_steps"])
        if cfg["absorb_target"] == "anchor":
            with torch.no_grad():
                states = model.condition(request.anchors[i:i + 1]).detach().expand(len(group), -1, -1)
            z_b = _guided_decode(hs, x_t0, states, cfg["anchor_guidance"], t0, steps)
            images_b = hs.decode(z_b)
        else:
            region = build_region(hs, group[:1], encoder, cfg, seed=seed + 31 * i, progress=progress,
                                  source_seed=seed + 31 * i)
            own = hs.code(x_t0, t0).cpu() - region.h_r  # each source's code relative to the region's centre
            res = push_codes(hs, region, own, group[:1], encoder, cfg, gen, x_t0=x_t0, own=own, progress=progress)
            images_b = res["images"]
            z_b = hs.encode(images_b, seed=seed)
            summ = region.summary()
            summ["sources_accepted"] = round(float(res["accepted"].float().mean()), 4)
            regions.append(summ)
        cos = (encode_images(encoder, images_b) * encode_images(encoder, group)).sum(1)
        target_cos.append(round(float(cos.mean()), 4))
        for j in range(len(group)):
            erase += hs.bridge(x_t0[j:j + 1], z_b[j:j + 1], t0, steps)
        if hs.conditional and cfg["n_negatives"]:
            # hard negatives (ours): other people decoded from the sources' inversions, so in the same pose and
            # background; they must reconstruct as before, so only the face can tell the person apart
            n_neg = cfg["n_negatives"]
            who = _other_identities(request, n_neg, gen)
            with torch.no_grad():
                states = model.condition(who).detach()
            pick = torch.arange(n_neg) % len(group)
            negatives.append(_guided_decode(hs, x_t0[pick], states, cfg["anchor_guidance"], t0, steps))
    timings["erase_targets_s"] = time.perf_counter() - t_start - timings["sources_s"]

    # ---------------------------------------------------- keep: others' inversions and random samples, as before
    t2 = time.perf_counter()
    keep = []
    held = list(negatives)
    if hs.conditional and cfg["n_preserve"]:
        with torch.no_grad():
            others = hs.model.generate_tensor(_other_identities(request, cfg["n_preserve"], gen),
                                              seed=seed + PRESERVE_SEED_OFFSET, steps=cfg["source_steps"],
                                              guidance=cfg["source_guidance"]).float()
        held.append(hs.encode(others, seed=seed))
    if held:
        z0 = torch.cat(held)
        hs.generate_from(hs.invert(z0, t0, cfg["inversion_steps"]), t0, steps, chunk=cfg["chunk"], trajectory=keep,
                         decode=False)
    if cfg["n_random"]:
        noise = torch.randn(cfg["n_random"], *erase[0][0].shape[1:], generator=gen).to(hs.device)
        hs.generate_from(noise, hs.num_train_timesteps - 1, steps, chunk=cfg["chunk"], trajectory=keep, decode=False)
    timings["keep_s"] = time.perf_counter() - t2
    xe, te, ee = _points(erase)
    keep_pts = _points([(x, t, e) for x, t, e, _ in keep]) if keep else None

    # ---------------------------------------------------- training: trajectory distillation
    n_e = max(1, cfg["batch"] // 2) if keep_pts is not None else cfg["batch"]
    n_k = cfg["batch"] - n_e if keep_pts is not None else 0
    device = hs.device

    def loss_fn(student, teacher):
        ie = torch.randint(len(xe), (n_e,), generator=gen)
        parts_x, parts_t, parts_e = [xe[ie]], [te[ie]], [ee[ie]]
        if n_k:
            ik = torch.randint(len(keep_pts[0]), (n_k,), generator=gen)
            parts_x.append(keep_pts[0][ik])
            parts_t.append(keep_pts[1][ik])
            parts_e.append(keep_pts[2][ik])
        x, t, e = torch.cat(parts_x).to(device), torch.cat(parts_t).to(device), torch.cat(parts_e).to(device)
        w = (1 - hs.abar(t)).view(-1, 1, 1, 1)  # ε error weighted by 1 − ᾱ == x0 error weighted by ᾱ
        err = (w * (hs.call(student, x, t) - e) ** 2).flatten(1).mean(1)
        loss_e = err[:n_e].mean()
        if not n_k:
            return loss_e, {"erase": loss_e.item()}
        loss_k = err[n_e:].mean()
        return loss_e + cfg["preserve_weight"] * loss_k, {"erase": loss_e.item(), "keep": loss_k.item()}

    t3 = time.perf_counter()
    res = train_student(hs.unet, cfg["trainable"], loss_fn, steps=cfg["steps"], lr=cfg["lr"],
                        weight_decay=cfg["weight_decay"], progress=progress, desc="bia absorb")
    timings["train_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t_start
    meta = patch_metadata("bia", public_config(cfg, encoder), request, seed,
                          anchors=cfg["absorb_target"] == "anchor", mode="absorb",
                          trainable_modules=cfg["trainable"], trainable_parameters=res.trainable_parameters,
                          absorb_target_cos=target_cos, regions=regions, erase_points=len(xe),
                          negatives=sum(len(n) for n in negatives),
                          keep_points=0 if keep_pts is None else len(keep_pts[0]), loss=res.history)
    # wall-clock times go to the log, not the metadata: the same seed must give the same patch bytes
    log.info("bia: %s", ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    return Patch.from_edit(model, res.new, meta)
