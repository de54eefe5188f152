"""Re-emergence attacks on identity-conditioned diffusion models (Arc2Face family, portrait generators).

- embedding: white-box. Adam on unit 512-d input embeddings (several starts at once) through a short
  differentiable DDIM sampler of the model itself, maximising the identity cosine of its generations to the
  target's photos (Concept Inversion / UnlearnDiffAtk, in the identity-embedding input space);
- neighbours: black-box. The target's photos and inputs at cosine 0.5 ... 0.99 to the target;
- relearn: a brief fine-tune of the identity path (every attn2 to_k / to_v) on other people, or on three
  photos of the target (concept resurgence, arXiv 2410.08074).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastforget.errors import InputError
from fastforget.identity.embeddings import random_unit_vectors, unit_vectors_at_cosine

NEIGHBOUR_COS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
SAMPLER_STEPS = 6        # the attack's differentiable DDIM sampler (the verification uses the model's own)
SAMPLES_PER_STEP = 2     # noise draws per start and optimisation step
LR = 0.05                # Adam on the unit embedding (projected back to the sphere after every step)


def default_guidance(model):
    """The guidance the family samples with by default (Arc2Face 3.0, IP-Adapter FaceID 7.5)."""
    return inspect.signature(type(model).generate_tensor).parameters["guidance"].default


def differentiable_generate(model, emb: torch.Tensor, *, seed: int, steps: int = SAMPLER_STEPS,
                            guidance=None) -> torch.Tensor:
    """The model's own sampling loop (generate_tensor without its no_grad) with a `steps`-step DDIM sampler:
    images (N, 3, H, W) in [-1, 1], differentiable in `emb` (and the weights) where grad is enabled."""
    from diffusers import DDIMScheduler

    sample = inspect.unwrap(type(model).generate_tensor)
    sched = DDIMScheduler.from_config(model.scheduler.config)
    guidance = default_guidance(model) if guidance is None else guidance
    return sample(model, emb, seed=seed, steps=steps, guidance=guidance, scheduler=sched)


def similarity(encoder, images: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    return encoder.encode_tensor(images).float() @ centroid.float()


def search_embeddings(model, encoder, centroid: torch.Tensor, starts: torch.Tensor, *, steps: int, seed: int = 0,
                      lr: float = LR, checkpoints=(), on_checkpoint=None, progress: bool = False,
                      desc: str = "attack"):
    """Optimise unit embeddings from `starts` (S, 512) so that the model's generations look like `centroid`.
    Each start keeps the best embedding seen so far (by its sampled generations' mean cosine), as an attacker
    would; on_checkpoint(step, best embeddings) is called at each step in `checkpoints` (0 = the starts).
    Returns the best embeddings (S, 512) and their mean cosines (S,)."""
    x = F.normalize(starts.detach().float().clone(), dim=1).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    n = SAMPLES_PER_STEP
    best = x.detach().clone()
    best_sim = torch.full((len(x),), -float("inf"))
    for step in tqdm(range(steps + 1), desc=desc, disable=not progress, leave=False):
        # fresh noise every step (seed + step): the embedding must work for the sampler, not for one noise draw
        with torch.set_grad_enabled(step < steps):
            imgs = differentiable_generate(model, x.repeat_interleave(n, 0), seed=seed + 7919 * step)
            sim = similarity(encoder, imgs, centroid).view(len(x), n).mean(1)
        better = sim.detach() > best_sim
        best[better], best_sim[better] = x.detach()[better], sim.detach()[better]
        if step in checkpoints and on_checkpoint is not None:
            on_checkpoint(step, F.normalize(best, dim=1))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        (-sim.sum()).backward()
        opt.step()
        with torch.no_grad():
            x.copy_(F.normalize(x, dim=1))
    return F.normalize(best, dim=1), best_sim


@torch.no_grad()
def verified_generations(model, encoder, inputs: torch.Tensor, centroid: torch.Tensor, *, n: int, seed: int,
                         steps: int) -> torch.Tensor:
    """Cosines to `centroid` of n generations per input with the model's own sampler (len(inputs) * n,)."""
    imgs = model.generate_tensor(inputs.repeat_interleave(n, 0), seed=seed, steps=steps,
                                 guidance=default_guidance(model))
    sims = similarity(encoder, imgs, centroid)
    if not torch.isfinite(sims).all():
        raise InputError("attack: the model's generations are not finite (NaN weights?); no score is reported")
    return sims


def embedding_starts(target, *, n_photo: int, n_random: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """The target's own (mean) embedding, `n_photo` of its individual photos, `n_random` random unit vectors."""
    rows, names = [target["centroid"][None]], ["own"]
    photos = target["photo_embeddings"]
    if len(photos) > 1 and n_photo:
        rows.append(photos[:n_photo])
        names += ["photo"] * len(photos[:n_photo])
    if n_random:
        rows.append(random_unit_vectors(n_random, seed=seed + 101))
        names += ["random"] * n_random
    return torch.cat(rows).float(), names


def run_embedding(model, encoder, targets, *, budget: int, checkpoints, threshold: float, seed: int, n_verify: int,
                  steps: int, n_photo: int, n_random: int, progress: bool, label: str, lr: float = LR) -> dict:
    """One row of the embedding attack: ASR and best similarity at each budget checkpoint, over every target."""
    per_ckpt = {c: [] for c in checkpoints}
    for ti, t in enumerate(targets):
        starts, names = embedding_starts(t, n_photo=n_photo, n_random=n_random, seed=seed + ti)

        def at(step, emb, t=t):
            per_ckpt[step].append(verified_generations(model, encoder, emb, t["centroid"], n=n_verify,
                                                       seed=seed + 10_000, steps=steps))

        search_embeddings(model, encoder, t["centroid"], starts, steps=budget, seed=seed, lr=lr,
                          checkpoints=checkpoints, on_checkpoint=at, progress=progress,
                          desc=f"embedding attack ({label}, target {ti})")
    return curve_row(label, {c: torch.cat(v) for c, v in per_ckpt.items()}, threshold,
                     starts=names, n_verify=n_verify)


def curve_row(label: str, sims_at: dict, threshold: float, **extra) -> dict:
    """Row from {budget: cosines of that checkpoint's generations}; the last checkpoint is the row's ASR."""
    curve = [{"budget": b, "asr": (s > threshold).double().mean().item(), "best_similarity": s.max().item(),
              "mean_similarity": s.mean().item()} for b, s in sorted(sims_at.items())]
    final = sims_at[max(sims_at)]
    return {"model": label, "asr": curve[-1]["asr"], "best_similarity": max(c["best_similarity"] for c in curve),
            "verified": int((final > threshold).sum()), "generations": len(final), "curve": curve, **extra}


def neighbour_inputs(target, per_level: int, seed: int) -> dict:
    """{level: inputs}: the target's photos, then per_level inputs at each cosine of NEIGHBOUR_COS."""
    levels = {"photos": target["photo_embeddings"].float()}
    for i, c in enumerate(NEIGHBOUR_COS):
        levels[c] = unit_vectors_at_cosine(target["centroid"][None].float(), per_level, (c, c), seed=seed + i)
    return levels


def run_neighbours(model, encoder, targets, *, per_level: int, threshold: float, seed: int, n_verify: int,
                   steps: int, progress: bool, label: str) -> dict:
    sims = {}
    for ti, t in enumerate(tqdm(targets, desc=f"neighbour sweep ({label})", disable=not progress, leave=False)):
        for level, inputs in neighbour_inputs(t, per_level, seed + 31 * ti).items():
            sims.setdefault(level, []).append(
                verified_generations(model, encoder, inputs, t["centroid"], n=n_verify, seed=seed + 20_000,
                                     steps=steps))
    sims = {k: torch.cat(v) for k, v in sims.items()}
    allsims = torch.cat(list(sims.values()))
    by_level = [{"budget": 1.0 if k == "photos" else k, "input": "photos" if k == "photos" else f"cos {k}",
                 "asr": (s > threshold).double().mean().item(), "best_similarity": s.max().item(),
                 "mean_similarity": s.mean().item()} for k, s in sims.items()]
    return {"model": label, "asr": (allsims > threshold).double().mean().item(),
            "best_similarity": allsims.max().item(), "verified": int((allsims > threshold).sum()),
            "generations": len(allsims), "curve": by_level}


# ---------------------------------------------------------------- relearn
RELEARN_LR = 1e-4


def _photos_tensor(model, images) -> torch.Tensor:
    import numpy as np

    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    if x.shape[-1] != model.resolution:
        x = F.interpolate(x, size=(model.resolution, model.resolution), mode="area")
    return x


def relearn_curve(model, encoder, photos, conditions: torch.Tensor, probe, *, budget: int, checkpoints,
                  threshold: float, seed: int, n_verify: int, steps: int, lr: float, progress: bool,
                  label: str) -> dict:
    """Fine-tune a copy of `model`'s attn2 to_k / to_v on (photos, their embeddings) with the epsilon loss
    (the loss the generator was trained with); at each checkpoint, generate `probe`'s identity from its own
    embedding and count the generations verified as the probe."""
    from diffusers import DDPMScheduler

    from fastforget.methods.base import attn2_kv_names
    from fastforget.patch import get_parameter

    names = attn2_kv_names(model)
    m = model.clone(only=names)
    params = [get_parameter(m, n) for n in names]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    ddpm = DDPMScheduler.from_config(model.scheduler.config)
    x0 = m.codec.encode(_photos_tensor(m, photos).to(m.device, m.dtype))
    cond_all = conditions.to(m.device)
    g = torch.Generator().manual_seed(seed)
    sims_at = {}
    for step in tqdm(range(budget + 1), desc=f"relearn ({label})", disable=not progress, leave=False):
        if step in checkpoints:
            sims_at[step] = verified_generations(m, encoder, probe[None], probe, n=n_verify, seed=seed + 30_000,
                                                 steps=steps)
        if step == budget:
            break
        idx = torch.randint(len(x0), (min(8, len(x0)),), generator=g)
        noise = torch.randn(x0[idx].shape, generator=g)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (len(idx),), generator=g)
        xt = ddpm.add_noise(x0[idx], noise, t)
        with torch.enable_grad():
            c = m.condition(cond_all[idx])
            loss = F.mse_loss(m.unet(xt, t, encoder_hidden_states=c).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return curve_row(label, sims_at, threshold, photos=len(photos), lr=lr)
