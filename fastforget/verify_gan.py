"""verify() for latent generators (StyleGAN2): GUIDE's metrics and ours. Imports no method.

GUIDE measures identity by inverting the person's photo into W+ with the unedited generator and
comparing what the unedited and the erased generator draw there (ID, lower is better); ID_others does
the same for other photos of the person. We add what a deletion request needs to be checked against:
the erased generation's cosine to the photo itself next to a stranger floor (photo vs random people
the model draws), how well other people and random latents keep their identity, and a Fréchet
distance between encoder features of samples before and after (FD_pre; no Inception weights here).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import InputError

MAX_SAMPLES = 100_000


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D) (FID's formula), with
    tr √(Σa Σb) = Σ √eig(√Σa Σb √Σa) from symmetric eigendecompositions (no scipy)."""
    a, b = a.double(), b.double()
    mu = a.mean(0) - b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    ev, vec = torch.linalg.eigh(ca)
    root = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    tr_covmean = torch.linalg.eigvalsh(root @ cb @ root).clamp_min(0).sqrt().sum()
    return float(mu @ mu + ca.trace() + cb.trace() - 2 * tr_covmean)


def labelled_grid(rows: list[np.ndarray], row_labels: list[str], col_labels: list[str] | None = None,
                  scale: int = 3) -> np.ndarray:
    """rows: each (k, H, W, 3) uint8 -> one picture with a label left of every row and above every
    column (PIL's built-in font), 2-px white gutters."""
    from PIL import Image, ImageDraw

    h, w = rows[0].shape[1:3]
    h, w = h * scale, w * scale
    ncol = max(len(r) for r in rows)
    left = 8 + 6 * max(len(s) for s in row_labels)
    top = 16 if col_labels else 2
    canvas = Image.new("RGB", (left + ncol * (w + 2) + 2, top + len(rows) * (h + 2) + 2), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (r, lab) in enumerate(zip(rows, row_labels)):
        y = top + i * (h + 2)
        draw.text((4, y + h // 2 - 5), lab, fill="black")
        for j, t in enumerate(r):
            tile = Image.fromarray(np.ascontiguousarray(t)).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (left + j * (w + 2), y))
    for j, lab in enumerate(col_labels or []):
        draw.text((left + j * (w + 2) + 2, 2), lab, fill="black")
    return np.asarray(canvas)


def _cos(a, b):
    return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


@torch.no_grad()
def verify_gan(model, targets, *, baseline, encoder, others=None, retain=None, n: int = 500, fd_n: int = 2000,
               seed: int = 0, latents=None, progress: bool = False):
    """Report for an erased latent generator.

    targets: photos of the forgotten people (the ones given to erase); `latents`: their W+ as erase
    inverted them (else they are inverted here with `baseline`); others: other photos of the same
    people; retain: photos of other people; n random latents and fd_n samples for FD_pre."""
    from fastforget.identity.encoder import as_image_batch
    from fastforget.models.common import check_int, check_seed
    from fastforget.verify import Report

    n = check_int(n, "n", 1, MAX_SAMPLES)
    fd_n = check_int(fd_n, "fd_n", 2, MAX_SAMPLES)
    seed = check_seed(seed, 2 ** 20, "seed")
    if baseline is None:
        raise InputError("baseline: verifying a GAN compares it with the unedited generator; pass baseline=")
    for what, m in (("model", model), ("baseline", baseline)):
        if not hasattr(m, "synthesis"):
            raise InputError(f"{what}: expected a latent generator (StyleGAN2), got {type(m).__name__}")
    photos = as_image_batch(targets, "targets")
    other_photos = as_image_batch(others, "others") if others is not None else None
    retain_photos = as_image_batch(retain, "retain") if retain is not None else None
    t0 = time.perf_counter()
    enc = encoder

    def embed(imgs_or_tensor):
        if isinstance(imgs_or_tensor, torch.Tensor):
            return torch.cat([enc.encode_tensor(imgs_or_tensor[i:i + 256]).float() for i in
                              range(0, len(imgs_or_tensor), 256)])
        return enc.encode(imgs_or_tensor).float()

    def invert(imgs):
        with torch.enable_grad():
            e = enc if getattr(enc, "differentiable", False) else None  # ONNX Runtime: the pixel loss alone
            return baseline.invert(imgs, encoder=e, seed=seed, progress=progress).detach()

    def before_after(w, photo_emb):
        e0, e1 = embed(baseline.synthesis(w)), embed(model.synthesis(w))
        return {"id": _cos(e0, e1), "photo_before": _cos(e0, photo_emb), "photo_after": _cos(e1, photo_emb)}

    w_u = latents if latents is not None else invert(photos)
    p_emb = embed(photos)
    m_t = before_after(w_u, p_emb)
    metrics = {"id": float(m_t["id"].mean()), "id_photo_before": float(m_t["photo_before"].mean()),
               "id_photo": float(m_t["photo_after"].mean())}
    if other_photos is not None:
        w_o = invert(other_photos)
        m_o = before_after(w_o, embed(other_photos))
        metrics.update(id_others=float(m_o["id"].mean()), id_others_photo_before=float(m_o["photo_before"].mean()),
                       id_others_photo=float(m_o["photo_after"].mean()))
    if retain_photos is not None:
        w_r = invert(retain_photos)
        m_r = before_after(w_r, embed(retain_photos))
        metrics.update(retain_photo_before=float(m_r["photo_before"].mean()),
                       retain_photo=float(m_r["photo_after"].mean()), retain_id=float(m_r["id"].mean()))
        metrics["retain_ratio"] = metrics["retain_photo"] / max(metrics["retain_photo_before"], 1e-8)
    gen = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(max(n, fd_n), baseline.style_dim, generator=gen)
    feats0, feats1 = [], []
    for i in range(0, len(z), 256):
        w = baseline.mapping(z[i:i + 256])
        w = w[:, None].expand(len(w), baseline.n_latent, baseline.style_dim)
        feats0.append(embed(baseline.synthesis(w)))
        feats1.append(embed(model.synthesis(w)))
    f0, f1 = torch.cat(feats0), torch.cat(feats1)
    metrics["random_id"] = float(_cos(f0[:n], f1[:n]).mean())
    metrics["fd_pre"] = frechet_distance(f0[:fd_n], f1[:fd_n])
    # stranger floor: the target photos against the people the unedited model draws at random
    metrics["stranger"] = float((F.normalize(p_emb, dim=-1) @ F.normalize(f0[:n], dim=-1).T).mean())
    for k, v in metrics.items():
        if not np.isfinite(v):
            from fastforget.errors import FitError

            raise FitError(f"verify: metric {k!r} is not finite ({v}); the erased generator draws NaN images")
    metrics["seconds"] = time.perf_counter() - t0
    # picture: photo | unedited G0(w_u) | erased G(w_u), one column per target photo (up to 6)
    from fastforget.identity.embeddings import to_uint8

    k = min(len(photos), 6)
    size = baseline.size
    ph = torch.stack([torch.from_numpy(p).permute(2, 0, 1).float() / 127.5 - 1 for p in photos[:k]]) \
        if len({p.shape for p in photos[:k]}) == 1 else None
    if ph is not None and ph.shape[-1] != size:
        ph = F.interpolate(ph, size=(size, size), mode="bilinear", align_corners=False)
    grid_rows, grid_labels = [], []
    if ph is not None:
        grid_rows.append(to_uint8(ph)); grid_labels.append("photo")
    grid_rows += [to_uint8(baseline.synthesis(w_u[:k])), to_uint8(model.synthesis(w_u[:k]))]
    grid_labels += ["unedited", "erased"]
    grid = labelled_grid(grid_rows, grid_labels, [f"target {i}" for i in range(k)])
    details = {"protocol": "gan (GUIDE: inversion with the unedited generator)", "n_random": n, "fd_n": fd_n,
               "seed": seed, "encoder": type(enc).__name__}
    return Report(metrics, details, grid)
