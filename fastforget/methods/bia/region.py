"""BIA's region: the source inverted into h-space, neighbours decoded and labelled by identity cosine, the SVM
boundary, and the push across it (shared by edit mode and absorb_target='push')."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.models.diffusion import HSpace

# neighbours decoded per radius probe when every neighbour fell on one side of tau
PROBE_NEIGHBOURS = 16


# ---------------------------------------------------------------- identity side
def encode_images(encoder, x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> unit embeddings, through encode_tensor when the encoder has one."""
    if hasattr(encoder, "encode_tensor"):
        with torch.no_grad():
            dev = next(encoder.net.parameters()).device if hasattr(encoder, "net") else x.device
            return F.normalize(encoder.encode_tensor(x.float().to(dev)).float().cpu(), dim=1)
    from fastforget.models.arc2face import to_uint8

    return F.normalize(encoder.encode(to_uint8(x)).float().cpu(), dim=1)


def _features(encoder, x: torch.Tensor) -> list[torch.Tensor]:
    """Early features for the perceptual term: the testbed encoder's stem and first block, or
    (for encoders without a torch network, e.g. ArcFace ONNX) the image at three scales."""
    net = getattr(encoder, "net", None)
    if net is not None and hasattr(net, "stem") and hasattr(net, "blocks"):
        res = getattr(encoder, "resolution", x.shape[-1])
        dev = next(net.parameters()).device
        x = x.float().to(dev)
        if x.shape[-1] != res or x.shape[-2] != res:
            x = F.interpolate(x, size=(res, res), mode="area")
        with torch.no_grad():
            f1 = net.stem(x)
            f2 = net.blocks[0](f1)
        return [f1.cpu(), f2.cpu()]
    return [x.float().cpu(), F.avg_pool2d(x.float(), 2).cpu(), F.avg_pool2d(x.float(), 4).cpu()]


def wrapper_loss(encoder, edited: torch.Tensor, source: torch.Tensor, mse_weight: float = 1.0,
                 perceptual_weight: float = 0.5) -> torch.Tensor:
    """Per image: mse_weight·MSE (images in [-1, 1]) + perceptual_weight·relative L1 of early encoder
    features (mean |f_edit − f_src| / mean |f_src|, per layer, averaged) — the stand-in for VGG-L1."""
    src = source.float().cpu().expand_as(edited) if source.shape[0] == 1 else source.float().cpu()
    mse = ((edited.float().cpu() - src) ** 2).flatten(1).mean(1)
    fe, fs = _features(encoder, edited), _features(encoder, src)
    perc = torch.stack([(a - b).abs().flatten(1).mean(1) / b.abs().flatten(1).mean(1).clamp_min(1e-8)
                        for a, b in zip(fe, fs)]).mean(0)
    return mse_weight * mse + perceptual_weight * perc


# ---------------------------------------------------------------- region
@dataclass
class Region:
    """The black hole around one source: SVM in h − h_r coordinates scaled by 1/radius."""

    x_t0: torch.Tensor          # (1, C, H, W) inverted source
    h_r: torch.Tensor           # (1, c, h, w) its code
    reference: torch.Tensor     # (512,) the source's embedding (labels are cosines to it)
    radius: float               # neighbourhood radius R in h units
    w: np.ndarray               # SVM weights (D,) on (h − h_r)/R; > 0 means "similar"
    b: float
    codes: torch.Tensor         # (M, D) neighbour deltas h − h_r (h units)
    labels: np.ndarray          # (M,) 1 = similar (inside)
    cos: np.ndarray             # (M,) cosine of each decoded neighbour to the reference
    images: torch.Tensor        # (M, 3, H, W) decoded neighbours
    accuracy: float
    label_rule: str
    fraction_above_tau: float = float("nan")   # before any median fallback
    probes: list | None = None                  # radius probes: [{radius, fraction_similar}]

    @property
    def normal(self) -> torch.Tensor:
        """Unit normal in h space, pointing to the dissimilar side, shaped like h."""
        n = -torch.from_numpy(self.w).float()
        return (n / n.norm()).view_as(self.h_r)

    def outside_distance(self, deltas: torch.Tensor) -> np.ndarray:
        """Signed distance (h units) of codes h_r + delta from the boundary; > 0 on the dissimilar side."""
        x = deltas.reshape(len(deltas), -1).double().numpy() / self.radius
        return -(x @ self.w + self.b) / np.linalg.norm(self.w) * self.radius

    def summary(self) -> dict:
        return {"svm_accuracy": round(self.accuracy, 4), "fraction_similar": round(float(self.labels.mean()), 4),
                "radius": round(self.radius, 5), "h_norm": round(float(self.h_r.norm()), 4),
                "source_inside_distance": round(float(-self.outside_distance(torch.zeros(1, self.w.size))[0]), 5),
                "label_rule": self.label_rule, "fraction_above_tau": round(self.fraction_above_tau, 4),
                "cos_mean": round(float(self.cos.mean()), 4), "cos_min": round(float(self.cos.min()), 4),
                "radius_probes": self.probes or []}


def build_region(hs: HSpace, source: torch.Tensor, encoder, cfg: dict, *, seed: int, progress: bool = False,
                 source_seed: int = 0) -> Region:
    """Invert `source` (1, 3, H, W), sample and decode neighbours, label them, fit the SVM."""
    from fastforget.svm import LinearSVM, sample_neighbors

    z0 = hs.encode(source, seed=source_seed)
    x_t0 = hs.invert(z0, cfg["t0"], cfg["inversion_steps"])
    h_r = hs.code(x_t0, cfg["t0"])
    reference = encode_images(encoder, source)[0]
    radius = cfg["radius_max"] * (float(h_r.norm()) if cfg["radius_units"] == "relative" else 1.0)
    rule = "tau"

    def decode_and_label(n, r, s):
        nb = sample_neighbors(h_r.cpu(), n, 1.0, r, seed=s)  # normalize(σ·N(0, I)): σ cancels
        d = torch.from_numpy(nb) - h_r.reshape(1, -1).cpu()
        im = hs.generate_from(x_t0, cfg["t0"], cfg["decode_steps"], d.view(-1, *h_r.shape[1:]),
                              asymmetric=cfg["asymmetric"], chunk=cfg["chunk"], progress=progress,
                              desc="bia neighbours")
        c = (encode_images(encoder, im) @ reference).numpy()
        return d, im, c, (c > cfg["tau"]).astype(np.int64)

    # one class only: widen (all similar) or narrow (none) the ball, probing with a few neighbours
    probes = []
    for attempt in range(cfg["rebalance_tries"]):
        *_, lab = decode_and_label(min(PROBE_NEIGHBOURS, cfg["neighbours"]), radius, seed + 1000 * (attempt + 1))
        probes.append({"radius": round(radius, 5), "fraction_similar": round(float(lab.mean()), 4)})
        if 0 < lab.mean() < 1:
            break
        radius = radius * (2.0 if lab.mean() == 1 else 0.5)
    deltas, imgs, cos, labels = decode_and_label(cfg["neighbours"], radius, seed)
    frac_tau = float(labels.mean())
    if labels.min() == labels.max():
        # last resort: split at the median cosine, so the boundary still separates the more from the less similar
        warnings.warn(f"bia: all {len(labels)} neighbours fell on one side of tau={cfg['tau']} (cosines "
                      f"{cos.min():.3f}..{cos.max():.3f}); labelling by the median cosine instead", stacklevel=3)
        labels = (cos > np.median(cos)).astype(np.int64)
        if labels.min() == labels.max():
            labels = (np.argsort(np.argsort(cos)) >= len(cos) // 2).astype(np.int64)
        rule = "median"
    X = (deltas / radius).numpy().astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svm = LinearSVM(C=cfg["C"], seed=seed).fit(X, labels)
    w = svm.coef_.ravel().astype(np.float64)
    b = float(svm.intercept_[0])
    if svm.classes_[1] != 1:  # decision > 0 means "similar"
        w, b = -w, -b
    acc = float(svm.score(X, labels))
    return Region(x_t0, h_r.cpu(), reference, radius, w, b, deltas, labels, cos, imgs, acc, rule, frac_tau, probes)


def _margins(cfg: dict, n: int, gen: torch.Generator) -> torch.Tensor:
    lo, hi = cfg["push_margin"]
    return torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=gen)


def push_codes(hs: HSpace, region: Region, deltas: torch.Tensor, source: torch.Tensor, encoder, cfg: dict,
               gen: torch.Generator, x_t0: torch.Tensor | None = None, own: torch.Tensor | None = None,
               progress: bool = False) -> dict:
    """Push codes h_r + deltas across the boundary: Δ = distance to cross + margin·R along the normal,
    decoded asymmetrically from `x_t0` (default: the region's source); Δ is halved while the wrapper
    loss to `source` exceeds its threshold (at most `halvings` times).

    `own`: the code h − h_r that decoding from `x_t0` already produces (another image's inversion),
    so the mid-block shift applied is deltas − own + Δ·normal; zero for the region's own x_t0.
    Returns images, accepted / crossed flags, wrapper_loss, push (Δ, h units), tries, identity_cos
    (to the region's reference), shift (the applied mid-block shifts) and positions (final codes − h_r)."""
    x_t0 = region.x_t0 if x_t0 is None else x_t0
    n = len(deltas)
    dist = torch.from_numpy(region.outside_distance(deltas))
    push = (dist.neg().clamp_min(0) + _margins(cfg, n, gen) * region.radius).float()
    normal = region.normal.reshape(1, -1)
    flat = deltas.reshape(n, -1).float()
    base = flat if own is None else flat - own.reshape(-1, flat.shape[1]).float()
    images = None
    loss = torch.full((n,), float("inf"))
    accepted = torch.zeros(n, dtype=torch.bool)
    tries = torch.zeros(n, dtype=torch.int64)
    todo = torch.arange(n)
    for attempt in range(cfg["halvings"] + 1):
        d = (base[todo] + push[todo, None] * normal).view(len(todo), *region.h_r.shape[1:])
        imgs = hs.generate_from(x_t0, cfg["t0"], cfg["decode_steps"], d, asymmetric=cfg["asymmetric"],
                                chunk=cfg["chunk"], progress=progress, desc="bia push")
        lw = wrapper_loss(encoder, imgs, source, cfg["mse_weight"], cfg["perceptual_weight"])
        if images is None:
            images = torch.zeros(n, *imgs.shape[1:])
        images[todo], loss[todo], tries[todo] = imgs, lw, attempt + 1
        ok = lw < cfg["wrapper_threshold"]
        accepted[todo[ok]] = True
        todo = todo[~ok]
        if len(todo) == 0 or attempt == cfg["halvings"]:
            break
        push[todo] = push[todo] / 2
    final = flat + push[:, None] * normal
    crossed = torch.from_numpy(region.outside_distance(final)) > 0
    cos = encode_images(encoder, images) @ region.reference
    shape = region.h_r.shape[1:]
    return {"images": images, "accepted": accepted, "wrapper_loss": loss, "push": push, "tries": tries,
            "crossed": crossed, "identity_cos": cos, "shift": (base + push[:, None] * normal).view(n, *shape),
            "positions": final.view(n, *shape)}


# ---------------------------------------------------------------- sources
def as_sources(hs: HSpace, x, cfg: dict, seed: int) -> tuple[torch.Tensor, str]:
    """Images (N, 3, H, W) in [-1, 1] at the model's resolution, and what they came from."""
    from fastforget.identity.encoder import as_image_batch
    from fastforget.models.arc2face import check_embeddings

    if isinstance(x, torch.Tensor) and x.ndim == 2 or (isinstance(x, np.ndarray) and x.ndim == 2
                                                        and np.issubdtype(x.dtype, np.floating)):
        emb = check_embeddings(x, name="image_or_embedding")
        if not hs.conditional or not hasattr(hs.model, "generate_tensor"):
            raise InputError("bia: an unconditional model cannot render an embedding; pass source images")
        with torch.no_grad():
            imgs = hs.model.generate_tensor(emb, seed=seed, steps=cfg["source_steps"], guidance=cfg["source_guidance"])
        return imgs.float().cpu(), "generated"
    if isinstance(x, torch.Tensor) and x.ndim in (3, 4):
        t = x[None] if x.ndim == 3 else x
        if t.shape[1] != 3 or not torch.is_floating_point(t) or not torch.isfinite(t).all():
            raise InputError(f"bia: image tensors must be finite float (N, 3, H, W) in [-1, 1], "
                             f"got {tuple(t.shape)} {t.dtype}")
        t = t.float().cpu().clamp(-1, 1)
    else:
        arrs = as_image_batch(x, name="image_or_embedding")
        t = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrs]) \
            if len({a.shape for a in arrs}) == 1 else None
        if t is None:
            t = torch.cat([F.interpolate(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1,
                                         size=(hs.resolution, hs.resolution), mode="area") for a in arrs])
    if t.shape[-1] != hs.resolution or t.shape[-2] != hs.resolution:
        mode = "area" if t.shape[-1] > hs.resolution else "bilinear"
        t = F.interpolate(t, size=(hs.resolution, hs.resolution), mode=mode)
    return t, "images"


def load_encoder(encoder, model):
    """The caller's encoder; the testbed's only for the testbed model (no silent fallback)."""
    from fastforget.identity.encoder import resolve_encoder

    return resolve_encoder(encoder, model, "bia")
