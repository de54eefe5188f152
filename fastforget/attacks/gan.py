"""Re-emergence attacks on a StyleGAN2 (GUIDE's setting).

- embedding: white-box. W+ optimised on the attacked generator to reproduce each photo of the target (the
  model's own projector, `invert`, with its identity loss); a generation is the image of the W+ found;
- neighbours: black-box. Latents between the target's own latent (the photo inverted on the unedited
  generator, else on the attacked one) and random latents: w = a·w_target + (1 − a)·w_random for a in 0.5 ... 0.99.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from fastforget.attacks.diffusion import NEIGHBOUR_COS, curve_row


@torch.no_grad()
def _sims(model, encoder, w: torch.Tensor, centroid: torch.Tensor) -> torch.Tensor:
    from fastforget.errors import InputError

    s = encoder.encode_tensor(model.generate_tensor(w)).float() @ centroid.float()
    if not torch.isfinite(s).all():
        raise InputError("attack: the generator's images are not finite (NaN weights?); no score is reported")
    return s


def run_embedding(model, encoder, targets, *, budget: int, checkpoints, threshold: float, seed: int, n_starts: int,
                  progress: bool, label: str) -> dict:
    sims_at = {c: [] for c in checkpoints}
    for ti, t in enumerate(targets):
        photos = t["images"][:n_starts]
        for c in tqdm(checkpoints, desc=f"W+ attack ({label}, target {ti})", disable=not progress, leave=False):
            if c == 0:  # no optimisation: the average face
                w = model.w_avg.detach().float()[None, None].repeat(len(photos), model.n_latent, 1)
            else:  # the projector's schedule depends on its length: each budget is its own run
                w = model.invert(photos, encoder=encoder, steps=c, seed=seed, progress=False)
            sims_at[c].append(_sims(model, encoder, w, t["centroid"]))
    return curve_row(label, {c: torch.cat(v) for c, v in sims_at.items()}, threshold, starts=["photo"] * n_starts)


def run_neighbours(model, encoder, targets, *, per_level: int, threshold: float, seed: int, progress: bool,
                   label: str, source=None) -> dict:
    """`source`: the generator the target's latent is taken from (the unedited one when given), projected with
    invert's defaults (as erase projects the photos it is given)."""
    source = model if source is None else source
    sims, rows = [], []
    for ti, t in enumerate(tqdm(targets, desc=f"latent neighbours ({label})", disable=not progress, leave=False)):
        w_t = source.invert(t["images"][:1], encoder=encoder, seed=seed, progress=False)
        for i, a in enumerate(NEIGHBOUR_COS):
            w_r = model.latents(seed=seed + 1000 * (i + 1) + 97 * ti, n=per_level)
            w_r = w_r[:, None].expand(-1, model.n_latent, -1) if w_r.ndim == 2 else w_r
            s = _sims(model, encoder, a * w_t + (1 - a) * w_r, t["centroid"])
            sims.append(s)
            rows.append((a, s))
    allsims = torch.cat(sims)
    by_level = {}
    for a, s in rows:
        by_level.setdefault(a, []).append(s)
    curve = [{"budget": a, "input": f"mix {a}", "asr": (torch.cat(v) > threshold).double().mean().item(),
              "best_similarity": torch.cat(v).max().item(), "mean_similarity": torch.cat(v).mean().item()}
             for a, v in by_level.items()]
    return {"model": label, "asr": (allsims > threshold).double().mean().item(),
            "best_similarity": allsims.max().item(), "verified": int((allsims > threshold).sum()),
            "generations": len(allsims), "curve": curve}
