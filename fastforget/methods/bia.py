"""BIA: a black-hole region around an identity in the diffusion h-space (mid-block output).

Following the paper and its public code (mshaheryar91/BlA, itself built on Asyrp):

1. **Inversion.** The source image (a photo, or for `erase` the model's own rendition of the
   target: generated from the target embedding at a fixed seed) is DDIM-inverted (η = 0) from
   t = 0 to t0 = 500 in 40 steps with the unconditional branch (the null condition of an
   ID-conditioned UNet, or a plain `UNet2DModel`). Its code h_r is the mid-block output of the
   UNet at (x_t0, t0), read by a forward hook on `unet.mid_block`.
2. **Neighbours.** M = 128 codes h_r + r·normalize(σ·N(0, I)), σ = 0.15, r ~ U(0, R), are decoded
   by Asyrp's generative process from x_t0 with the mid-block output shifted by the same
   Δh = h − h_r at every step, and labelled 1 ("inside": still the person) when the identity
   encoder's cosine to the source's embedding exceeds τ = 0.35.
3. **Boundary.** A linear SVM (C = 1, `fastforget.svm.LinearSVM`) separates the labels; its
   normal, oriented to the dissimilar side, points out of the black hole.
4. **Two modes.**
   * `edit` (the public code; :func:`bia_edit`): per image, resample M codes, keep the K = 8
     nearest the hyperplane, push each across it along the normal and decode with Asyrp's
     asymmetric step (x0 from the edited ε, direction from the original ε). A push is accepted
     when the wrapper loss 1.0·MSE + 0.5·perceptual stays under 0.35; else it is halved (≤ 5
     tries). Returns edited images, never a Patch.
   * `absorb` (what the paper claims, default for `erase`): weights after the mid block are
     fine-tuned so that codes inside the region decode as the teacher decodes them pushed
     across the boundary, while codes outside (neighbours labelled 0) and other identities
     decode exactly as before. The result is a Patch. The match is on the denoised image
     (`absorb_target="x0"`): matching the teacher's ε at the pushed code (`"eps"`) leaves the
     generations unchanged, as Asyrp found for an ε shift applied in both DDIM terms
     (measured on the demo: ISM_f 0.729 -> 0.730 with "eps", -> 0.485 with "x0").

Deviations, all documented in README.md (section `bia`): the paper's radius U(0, 0.35) and push
Δ ~ U(100, 120) are in CelebA-HQ DDPM h units; here the radius is relative to ‖h_r‖ by default
and the push is "the distance needed to cross the boundary plus a margin" in units of the
neighbourhood radius. The perceptual term uses L1 between early features of the identity
encoder's network (VGG weights cannot be downloaded here), relative to the source's features.
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.methods.base import (MAX_BATCH, MAX_LR, MAX_SAMPLES, ErasureRequest, check_int, check_number,
                                     merge_options, register_method)
from fastforget.models.common import MAX_GUIDANCE
from fastforget.models.unconditional import UnconditionalDiffusion  # noqa: F401  (moved to models/; kept importable)
from fastforget.patch import Patch, fingerprint_embeddings

EMBED_DIM = 512
# the model's renditions of a target use seeds from here on, away from the seeds verify() generates at
SOURCE_SEED_OFFSET = 1000
# neighbours decoded per radius probe when every neighbour fell on one side of tau
PROBE_NEIGHBOURS = 16
log = logging.getLogger("fastforget")

BIA_DEFAULTS = {
    "mode": "absorb",             # "absorb" (Patch) | "edit" (images: use bia_edit)
    # inversion / decoding (Asyrp)
    "t0": 500, "inversion_steps": 40, "decode_steps": 40, "asymmetric": True,
    # neighbourhood and labels
    "neighbours": 128, "sigma": 0.15, "radius_max": 0.35, "radius_units": "relative",
    "tau": 0.35, "C": 1.0, "rebalance_tries": 2,
    # walk / push
    "k_nearest": 8, "push_margin": [1.0, 1.2], "wrapper_threshold": 0.35, "mse_weight": 1.0,
    "perceptual_weight": 0.5, "halvings": 5,
    # sources (erase only has embeddings: the model renders the person)
    "n_sources": 4, "source_steps": 25, "source_guidance": 3.0, "source_images": None,
    "encoder": None, "chunk": 64,
    # absorb (weight update)
    "steps": 100, "lr": 3e-4, "weight_decay": 0.0, "batch": 8, "preserve_weight": 1.0,
    "trainable": ["up_blocks.0.resnets"], "absorb_codes": 8, "n_preserve": 4,
    "absorb_target": "x0", "conditional": True,
}
EDIT_KEYS = ("t0", "inversion_steps", "decode_steps", "asymmetric", "neighbours", "sigma", "radius_max",
             "radius_units", "tau", "C", "rebalance_tries", "k_nearest", "push_margin", "wrapper_threshold",
             "mse_weight", "perceptual_weight", "halvings", "source_steps", "source_guidance", "chunk")


# ================================================================ options
def resolve_options(options: dict, *, allowed=None) -> dict:
    """Defaults + options, checked. Unknown names raise InputError naming them."""
    cfg = merge_options("bia", BIA_DEFAULTS, options, allowed)

    limits = {"batch": MAX_BATCH, "n_sources": MAX_BATCH, "n_preserve": MAX_BATCH, "neighbours": MAX_SAMPLES,
              "k_nearest": MAX_SAMPLES, "absorb_codes": MAX_SAMPLES}

    def pos_int(key, minimum=1):
        check_int("bia", cfg, key, minimum, limits.get(key))

    def num(key, lo=None, strict=False, hi=None):
        check_number("bia", cfg, key, lo, strict, hi)

    for k in ("inversion_steps", "decode_steps", "k_nearest", "n_sources", "source_steps", "chunk", "steps",
              "batch", "t0"):
        pos_int(k)
    pos_int("neighbours", 2)
    for k in ("rebalance_tries", "halvings", "absorb_codes", "n_preserve"):
        pos_int(k, 0)
    for k in ("sigma", "C"):
        num(k, 0.0, strict=True)
    num("lr", 0.0, strict=True, hi=MAX_LR)
    num("radius_max", 0.0, strict=True, hi=1e6)  # x ||h_r|| (or absolute): larger overflows float32 to NaN codes
    for k in ("wrapper_threshold", "mse_weight", "perceptual_weight", "weight_decay", "preserve_weight"):
        num(k, 0.0)
    num("tau")
    num("source_guidance", 0.0, hi=MAX_GUIDANCE)
    if "tau" in cfg and not -1.0 <= cfg["tau"] <= 1.0:
        raise InputError(f"bia: option 'tau' must lie in [-1, 1], got {cfg['tau']}")
    if "mode" in cfg and (not isinstance(cfg["mode"], str) or cfg["mode"] not in ("absorb", "edit")):
        raise InputError(f"bia: option 'mode' must be 'absorb' or 'edit', got {cfg['mode']!r}")
    if "radius_units" in cfg and (not isinstance(cfg["radius_units"], str)
                                  or cfg["radius_units"] not in ("relative", "absolute")):
        raise InputError(f"bia: option 'radius_units' must be 'relative' (x ||h_r||) or 'absolute', "
                         f"got {cfg['radius_units']!r}")
    if "absorb_target" in cfg and (not isinstance(cfg["absorb_target"], str)
                                   or cfg["absorb_target"] not in ("x0", "eps")):
        raise InputError(f"bia: option 'absorb_target' must be 'x0' or 'eps', got {cfg['absorb_target']!r}")
    for key in ("asymmetric", "conditional"):
        if key in cfg and not isinstance(cfg[key], (bool, np.bool_)):
            raise InputError(f"bia: option {key!r} must be True or False, got {cfg[key]!r}")
    if "push_margin" in cfg:
        v = cfg["push_margin"]
        try:
            lo, hi = (float(v), float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else map(float, v)
        except (TypeError, ValueError, OverflowError):
            raise InputError(f"bia: option 'push_margin' must be a number or a (low, high) pair, got {v!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise InputError(f"bia: option 'push_margin' must satisfy 0 <= low <= high, got {v!r}")
        cfg["push_margin"] = [lo, hi]
    if "trainable" in cfg:
        v = cfg["trainable"]
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
            raise InputError(f"bia: option 'trainable' must be a non-empty list of UNet module names, got {v!r}")
        cfg["trainable"] = list(v)
    return cfg


def _public_config(cfg: dict, encoder) -> dict:
    """The resolved options as JSON-able metadata: no images, no embeddings, the encoder by name."""
    out = dict(cfg)
    if "encoder" in out:
        out["encoder"] = getattr(encoder, "name", type(encoder).__name__) if encoder is not None else None
    if out.get("source_images") is not None:
        out["source_images"] = f"given ({len(out['source_images'])} images, not stored)"
    return out


# ================================================================ the h-space view of a model
class _MidHook:
    """Forward hook on `mid_block`: records its output and/or adds a per-sample shift to it."""

    def __init__(self):
        self.delta: torch.Tensor | None = None
        self.capture = False
        self.h: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        if self.capture:
            self.h = out.detach()
        if self.delta is not None:
            out = out + self.delta.to(out.dtype)
            return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out
        return output


@contextmanager
def mid_block_hook(unet):
    """Install a `_MidHook` on `unet.mid_block` for the duration of the block (always removed)."""
    if getattr(unet, "mid_block", None) is None:
        raise InputError(f"bia: {type(unet).__name__} has no mid_block: h-space needs a UNet with a middle block")
    hook = _MidHook()
    handle = unet.mid_block.register_forward_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()


class HSpace:
    """A UNet called through its unconditional branch, with DDIM (η = 0) inversion and Asyrp decoding.

    Works for an Arc2Face-family adapter (UNet2DConditionModel fed the null condition) and for an
    unconditional `UNet2DModel` (bare, in an `UnconditionalDiffusion`, or any object with `.unet`
    and `.scheduler`). `states` is the null condition (1, L, D) or None."""

    def __init__(self, model):
        from diffusers import DDPMScheduler

        if hasattr(model, "null_condition") and hasattr(model, "unet"):
            self.unet = model.unet
            with torch.no_grad():
                self.null_states = model.null_condition(1).detach()
            self.codec = model.codec
            self.scheduler_config = model.scheduler.config
            self.resolution = int(model.resolution)
            self.model = model
        else:
            if hasattr(model, "unet"):
                unet, sched = model.unet, getattr(model, "scheduler", None)
            else:
                unet, sched = model, None
            if not hasattr(unet, "mid_block") or not hasattr(unet, "config"):
                raise InputError(f"bia: cannot use a {type(model).__name__}: expected an Arc2Face-family model, a "
                                 "diffusers UNet2DModel, or an object with .unet (and .scheduler)")
            self.unet = unet
            self.null_states = None
            self.codec = getattr(model, "codec", None)
            self.scheduler_config = (sched if sched is not None else DDPMScheduler(num_train_timesteps=1000)).config
            ss = unet.config.sample_size
            self.resolution = int(ss if isinstance(ss, int) else ss[0])
            self.model = model
        sched = DDPMScheduler.from_config(self.scheduler_config)
        self.alphas_cumprod = sched.alphas_cumprod.double()
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.prediction_type = sched.config.prediction_type

    # -------------------------------------------------------- basics
    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    @property
    def conditional(self) -> bool:
        return self.null_states is not None

    def encode(self, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Images in [-1, 1] -> sample space."""
        x = x.to(self.device, self.dtype)
        if self.codec is None:
            return x
        return self.codec.encode(x, generator=torch.Generator(self.device).manual_seed(seed))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = z if self.codec is None else self.codec.decode(z)
        return out.float().clamp(-1, 1)

    def abar(self, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        return self.alphas_cumprod[t.long().cpu()].to(self.device, torch.float32)

    def call(self, unet, x, t, states=None, hook: _MidHook | None = None, delta=None) -> torch.Tensor:
        """ε prediction of `unet` at (x, t), mid-block output shifted by `delta` (per sample or None).

        `states` None means the unconditional branch (null condition, or no condition at all)."""
        n = x.shape[0]
        dtype = next(unet.parameters()).dtype
        tt = torch.as_tensor(t, device=x.device)
        tt = (tt.expand(n) if tt.ndim == 0 else tt).long()
        if hook is not None:
            hook.delta = delta
        try:
            if self.null_states is not None:
                s = self.null_states.expand(n, -1, -1) if states is None else states
                out = unet(x.to(dtype), tt, encoder_hidden_states=s.to(x.device, dtype)).sample
            else:
                out = unet(x.to(dtype), tt).sample
        finally:
            if hook is not None:
                hook.delta = None
        out = out.float()
        if self.prediction_type == "epsilon":
            return out
        ab = self.abar(tt).view(-1, *([1] * (x.ndim - 1)))
        a, s_ = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "v_prediction":
            return a * out + s_ * x.float()
        if self.prediction_type == "sample":
            return (x.float() - a * out) / s_
        raise InputError(f"bia: unsupported prediction_type {self.prediction_type!r}")

    def timesteps(self, t0: int, steps: int) -> list[int]:
        if not 0 < t0 < self.num_train_timesteps:
            raise InputError(f"bia: t0 must lie in (0, {self.num_train_timesteps}), got {t0}")
        seq = np.round(np.linspace(0, t0, steps + 1)).astype(int)
        return sorted(set(seq.tolist()))

    # -------------------------------------------------------- DDIM η = 0
    @torch.no_grad()
    def invert(self, z0: torch.Tensor, t0: int, steps: int) -> torch.Tensor:
        """DDIM inversion (η = 0, unconditional branch) from t = 0 to t0; returns x_t0."""
        seq = self.timesteps(t0, steps)
        x = z0.float()
        for t, t_next in zip(seq[:-1], seq[1:]):
            eps = self.call(self.unet, x, t)
            a, a_n = self.abar(t), self.abar(t_next)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = a_n.sqrt() * x0 + (1 - a_n).sqrt() * eps
        return x

    @torch.no_grad()
    def code(self, x_t: torch.Tensor, t0: int) -> torch.Tensor:
        """h = mid-block output of the unconditional UNet at (x_t0, t0)."""
        with mid_block_hook(self.unet) as hook:
            hook.capture = True
            self.call(self.unet, x_t, t0, hook=hook)
            return hook.h.float().clone()

    @torch.no_grad()
    def generate_from(self, x_t: torch.Tensor, t0: int, steps: int, delta: torch.Tensor | None = None,
                      asymmetric: bool = True, chunk: int = 64, progress: bool = False,
                      desc: str = "bia decode", decode: bool = True) -> torch.Tensor:
        """Asyrp's generative process from x_t0 to 0 with the mid-block output shifted by `delta`
        (one row per output, or None) at every step. Asymmetric: x0 from the edited ε, the direction
        term from the original ε (one batched call for both). Returns images in [-1, 1] (the UNet's
        samples when decode=False)."""
        from tqdm import tqdm

        seq = self.timesteps(t0, steps)[::-1]
        n = x_t.shape[0] if delta is None else delta.shape[0]
        if x_t.shape[0] == 1 and n > 1:
            x_t = x_t.expand(n, *x_t.shape[1:])
        outs = []
        with mid_block_hook(self.unet) as hook:
            for i in tqdm(range(0, n, chunk), desc=desc, disable=not progress, leave=False):
                x = x_t[i:i + chunk].float().clone()
                d = None if delta is None else delta[i:i + chunk].to(self.device)
                b = x.shape[0]
                for t, t_prev in zip(seq[:-1], seq[1:]):
                    if d is None:
                        eps_e = eps_o = self.call(self.unet, x, t)
                    elif asymmetric:
                        eps = self.call(self.unet, torch.cat([x, x]), t, hook=hook,
                                        delta=torch.cat([d, torch.zeros_like(d)]))
                        eps_e, eps_o = eps[:b], eps[b:]
                    else:
                        eps_e = eps_o = self.call(self.unet, x, t, hook=hook, delta=d)
                    a, a_p = self.abar(t), self.abar(t_prev)
                    x0 = (x - (1 - a).sqrt() * eps_e) / a.sqrt()
                    x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps_o
                outs.append(self.decode(x) if decode else x)
        return torch.cat(outs)


# ================================================================ identity side
def _encode_images(encoder, x: torch.Tensor) -> torch.Tensor:
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


# ================================================================ region
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
    reference = _encode_images(encoder, source)[0]
    radius = cfg["radius_max"] * (float(h_r.norm()) if cfg["radius_units"] == "relative" else 1.0)
    rule = "tau"

    def decode_and_label(n, r, s):
        nb = sample_neighbors(h_r.cpu(), n, cfg["sigma"], r, seed=s)
        d = torch.from_numpy(nb) - h_r.reshape(1, -1).cpu()
        im = hs.generate_from(x_t0, cfg["t0"], cfg["decode_steps"], d.view(-1, *h_r.shape[1:]),
                              asymmetric=cfg["asymmetric"], chunk=cfg["chunk"], progress=progress,
                              desc="bia neighbours")
        c = (_encode_images(encoder, im) @ reference).numpy()
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
    cos = _encode_images(encoder, images) @ region.reference
    shape = region.h_r.shape[1:]
    return {"images": images, "accepted": accepted, "wrapper_loss": loss, "push": push, "tries": tries,
            "crossed": crossed, "identity_cos": cos, "shift": (base + push[:, None] * normal).view(n, *shape),
            "positions": final.view(n, *shape)}


# ================================================================ sources
def _as_sources(hs: HSpace, x, cfg: dict, seed: int) -> tuple[torch.Tensor, str]:
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


def _load_encoder(encoder, model):
    """The caller's encoder; the testbed's only for the testbed model (no silent fallback)."""
    from fastforget.identity.encoder import resolve_encoder

    return resolve_encoder(encoder, model, "bia")


# ================================================================ edit mode
def bia_edit(model, image_or_embedding, encoder=None, *, seed: int = 0, progress: bool = False,
             **options) -> dict:
    """BIA as the public code does it: edit images, never weights.

    `image_or_embedding`: images (uint8 (N, H, W, 3), paths, PIL, or a float tensor (N, 3, H, W) in
    [-1, 1]) or identity embeddings (N, 512), rendered by `model` at `seed` (ID-conditioned models).
    Returns a dict: `images` (N, K, 3, H, W) in [-1, 1] (K = k_nearest pushed codes per source),
    `accepted` (N, K) bool, `crossed` (N, K) bool (the final code is outside the region),
    `wrapper_loss`, `push` (h units), `tries`, `identity_cos` (N, K) to the source, `sources`,
    `reconstructions` (undedited decode of the inverted source), `regions` (summaries) and `config`."""
    from fastforget.svm import nearest_to_hyperplane, sample_neighbors

    cfg = resolve_options(options, allowed=EDIT_KEYS)
    encoder = _load_encoder(encoder, model)
    hs = HSpace(model)
    sources, origin = _as_sources(hs, image_or_embedding, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("images", "accepted", "crossed", "wrapper_loss", "push", "tries", "identity_cos",
                           "reconstructions", "regions")}
    for i in range(len(sources)):
        src = sources[i:i + 1]
        region = build_region(hs, src, encoder, cfg, seed=seed + 17 * i, progress=progress, source_seed=seed + i)
        out["reconstructions"].append(hs.generate_from(region.x_t0, cfg["t0"], cfg["decode_steps"]))
        # the walk: resample M codes, keep the K nearest the hyperplane, push them across
        nb = sample_neighbors(region.h_r, cfg["neighbours"], cfg["sigma"], region.radius, seed=seed + 17 * i + 1)
        deltas = torch.from_numpy(nb) - region.h_r.reshape(1, -1)
        k = min(cfg["k_nearest"], len(deltas))
        idx, _ = nearest_to_hyperplane((deltas / region.radius).numpy(), region.w, region.b, k)
        res = push_codes(hs, region, deltas[torch.from_numpy(idx.astype(np.int64))], src, encoder, cfg, gen,
                         progress=progress)
        for key in ("images", "accepted", "crossed", "wrapper_loss", "push", "tries", "identity_cos"):
            out[key].append(res[key])
        out["regions"].append(region.summary())
    result = {k: torch.stack(v) for k, v in out.items() if k not in ("regions", "reconstructions")}
    result["reconstructions"] = torch.cat(out["reconstructions"])
    result["sources"] = sources
    result["source_origin"] = origin
    result["regions"] = out["regions"]
    result["config"] = cfg
    return result


# ================================================================ absorb mode
def _trainable_params(unet, names: list[str]) -> dict:
    params = {}
    for m in names:
        try:
            mod = unet.get_submodule(m)
        except AttributeError:
            raise InputError(f"bia: option 'trainable': the UNet has no module {m!r}") from None
        for p, t in mod.named_parameters():
            params[f"{m}.{p}"] = t
    if not params:
        raise InputError(f"bia: option 'trainable' {names!r} selects no parameters")
    return params


def _contiguous_group_norm_inputs(unet, names: list[str]) -> None:
    """Workaround for a CPU crash in torch: GroupNorm backward on a channels-last input that does not
    require grad (while the norm's weight does) segfaults (seen with torch 2.13 on UNet2DModel, whose
    attention blocks hand channels-last tensors to the next resnet). Inputs of the trainable GroupNorms
    are made contiguous; the values are unchanged."""
    def pre(module, args):
        return (args[0].contiguous(),) + tuple(args[1:])

    for m in names:
        for mod in unet.get_submodule(m).modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.register_forward_pre_hook(pre)


def _check_request(request: ErasureRequest) -> None:
    t = request.targets
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[1] != EMBED_DIM or len(t) == 0:
        raise InputError(f"bia: request.targets must be a non-empty (N, {EMBED_DIM}) tensor")


@register_method("bia", validate=lambda o: resolve_options(o))
def fit_bia(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    """BIA `absorb`: fine-tune the weights after the mid block so that codes inside each target's black
    hole decode as the teacher decodes them pushed across the boundary; codes outside and other
    identities are held. Returns a Patch of the changed tensors (default: `up_blocks.0.resnets`).

    Options (see BIA_DEFAULTS): mode, t0, inversion_steps, decode_steps, asymmetric, neighbours, sigma,
    radius_max, radius_units, tau, C, rebalance_tries, k_nearest, push_margin, wrapper_threshold,
    mse_weight, perceptual_weight, halvings, n_sources, source_steps, source_guidance, source_images,
    encoder, chunk, steps, lr, weight_decay, batch, preserve_weight, trainable, absorb_codes, n_preserve,
    absorb_target ("x0": match the teacher's pushed decode; "eps": match the teacher's ε with the
    pushed code), conditional (also train the target-conditioned branch of ID-conditioned models)."""
    from tqdm import tqdm

    from fastforget import __version__

    cfg = resolve_options(options)
    if cfg["mode"] == "edit":
        raise InputError("bia: mode='edit' edits images and returns no Patch; call "
                         "fastforget.methods.bia.bia_edit(model, images_or_embeddings, encoder)")
    _check_request(request)
    t_start = time.perf_counter()
    timings = {}
    encoder = _load_encoder(cfg["encoder"] if cfg["encoder"] is not None else request.encoder, model)
    hs = HSpace(model)
    _trainable_params(hs.unet, cfg["trainable"])  # unknown module names fail before any work
    device = hs.device
    gen = torch.Generator().manual_seed(seed)
    n_src = cfg["n_sources"]

    # ---------------------------------------------------- sources: the model's renditions (or given photos)
    given = cfg["source_images"]
    n_targets = len(request.targets)
    if given is not None:
        src_all, _ = _as_sources(hs, given, cfg, seed)
        if len(src_all) % n_targets:
            raise InputError(f"bia: option 'source_images' must hold a multiple of {n_targets} images "
                             f"(one group per target), got {len(src_all)}")
        per = len(src_all) // n_targets
        groups = [src_all[i * per:(i + 1) * per] for i in range(n_targets)]
    else:
        if not hs.conditional:
            raise InputError("bia: an unconditional model cannot render the targets; pass "
                             "source_images= photos of each target")
        groups = []
        for i in range(n_targets):
            emb = request.targets[i:i + 1].repeat(n_src, 1)
            with torch.no_grad():
                groups.append(hs.model.generate_tensor(emb, seed=seed + SOURCE_SEED_OFFSET + 97 * i,
                                                       steps=cfg["source_steps"],
                                                       guidance=cfg["source_guidance"]).float().cpu())
    timings["sources_s"] = time.perf_counter() - t_start

    # ---------------------------------------------------- regions, pushed decodes
    erase_items, keep_items, regions = [], [], []  # items: (A image, B image or None, delta or None, cond)
    t1 = time.perf_counter()
    for i, group in enumerate(groups):
        region = build_region(hs, group[:1], encoder, cfg, seed=seed + 31 * i, progress=progress,
                              source_seed=seed + 31 * i)
        summ = region.summary()
        # the sources themselves (code delta 0 at their own inversion)
        pushed_src = []
        for j in range(len(group)):
            x_t0 = region.x_t0 if j == 0 else hs.invert(hs.encode(group[j:j + 1], seed=seed + 31 * i + j),
                                                           cfg["t0"], cfg["inversion_steps"])
            # other sources: their own code, pushed along the same normal (Asyrp: h-space directions are
            # shared across images), by their distance to the boundary measured relative to h_r
            d0 = (hs.code(x_t0, cfg["t0"]).cpu() - region.h_r) if j else torch.zeros_like(region.h_r)
            res = push_codes(hs, region, d0, group[j:j + 1], encoder, cfg, gen, x_t0=x_t0, own=d0,
                             progress=progress)
            shift = res["shift"]
            pushed_src.append({"accepted": bool(res["accepted"][0]), "crossed": bool(res["crossed"][0]),
                               "cos_before": round(float(_encode_images(encoder, group[j:j + 1])[0]
                                                         @ region.reference), 4),
                               "cos_after": round(float(res["identity_cos"][0]), 4),
                               "wrapper_loss": round(float(res["wrapper_loss"][0]), 4)})
            erase_items.append(dict(a=group[j:j + 1], b=res["images"], delta=None, shift=shift, target=i))
        # codes inside the region (label 1): their decodes -> their pushed decodes
        inside = np.flatnonzero(region.labels == 1)
        outside = np.flatnonzero(region.labels == 0)
        pick_in = inside[torch.randperm(len(inside), generator=gen)[:cfg["absorb_codes"]].numpy()] \
            if len(inside) else inside
        if len(pick_in):
            deltas = region.codes[torch.from_numpy(pick_in)].view(len(pick_in), *region.h_r.shape[1:])
            res = push_codes(hs, region, deltas, group[:1], encoder, cfg, gen, progress=progress)
            for r, j in enumerate(pick_in):
                erase_items.append(dict(a=region.images[j:j + 1], b=res["images"][r:r + 1], delta=deltas[r:r + 1],
                                        shift=res["shift"][r:r + 1] - deltas[r:r + 1], target=None))
            summ["inside_accepted"] = round(float(res["accepted"].float().mean()), 4)
            summ["inside_cos_after"] = round(float(res["identity_cos"].mean()), 4)
        pick_out = outside[torch.randperm(len(outside), generator=gen)[:cfg["absorb_codes"]].numpy()] \
            if len(outside) else outside
        for j in pick_out:
            keep_items.append(dict(a=region.images[j:j + 1],
                                   delta=region.codes[j:j + 1].view(1, *region.h_r.shape[1:]), cond=None))
        summ["sources"] = pushed_src
        regions.append(summ)
    timings["regions_s"] = time.perf_counter() - t1

    # ---------------------------------------------------- other identities: held fixed
    t2 = time.perf_counter()
    pool = [x for x in (request.retain, request.preserve) if x is not None and len(x)]
    others = None
    if pool and hs.conditional and cfg["n_preserve"]:
        ret = request.retain if request.retain is not None else torch.zeros(0, EMBED_DIM)
        pres = request.preserve if request.preserve is not None else torch.zeros(0, EMBED_DIM)
        take_r = ret[:cfg["n_preserve"]]
        rest = cfg["n_preserve"] - len(take_r)
        take_p = pres[torch.randperm(len(pres), generator=gen)[:rest]] if rest > 0 and len(pres) else pres[:0]
        others = torch.cat([take_r, take_p]).float()
        with torch.no_grad():
            imgs = hs.model.generate_tensor(others, seed=seed + 5000, steps=cfg["source_steps"],
                                            guidance=cfg["source_guidance"]).float().cpu()
            conds = hs.model.condition(others).detach()
        for j in range(len(others)):
            keep_items.append(dict(a=imgs[j:j + 1], delta=None, cond=conds[j:j + 1]))
    elif cfg["n_preserve"]:
        # unconditional model: the teacher's own samples from noise are the "other identities"
        noise = torch.randn(cfg["n_preserve"], *region.x_t0.shape[1:], generator=gen).to(device)
        with torch.no_grad():
            imgs = hs.generate_from(noise, hs.num_train_timesteps - 1, cfg["decode_steps"], chunk=cfg["chunk"])
        for j in range(len(imgs)):
            keep_items.append(dict(a=imgs[j:j + 1].cpu(), delta=None, cond=None))
    timings["preserve_s"] = time.perf_counter() - t2
    target_conds = None
    if hs.conditional and cfg["conditional"]:
        with torch.no_grad():
            target_conds = hs.model.condition(request.targets).detach()

    # ---------------------------------------------------- training (student: a copy of the UNet)
    t3 = time.perf_counter()
    teacher = hs.unet
    student = copy.deepcopy(teacher).float()
    student.eval().requires_grad_(False)
    params = _trainable_params(student, cfg["trainable"])
    for t in params.values():
        t.requires_grad_(True)
    _contiguous_group_norm_inputs(student, cfg["trainable"])
    opt = torch.optim.AdamW(list(params.values()), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    n_e = max(1, cfg["batch"] // 2) if keep_items else cfg["batch"]
    n_k = cfg["batch"] - n_e if keep_items else 0
    T = hs.num_train_timesteps
    a_enc = torch.cat([hs.encode(it["a"], seed=seed) for it in erase_items]).float()
    b_enc = torch.cat([hs.encode(it["b"], seed=seed) for it in erase_items]).float()
    k_enc = torch.cat([hs.encode(it["a"], seed=seed) for it in keep_items]).float() if keep_items else None
    h_shape = region.h_r.shape[1:]
    zeros_h = torch.zeros(1, *h_shape)
    null = hs.null_states

    def states_for(cond_choice):
        """(B, L, D) condition states, the null condition where the choice is None; None if unconditional."""
        if null is None:
            return None
        return torch.cat([null if c is None else c for c in cond_choice]).to(device)

    history = {"erase": [], "keep": []}
    bar = tqdm(range(cfg["steps"]), desc="bia absorb", disable=not progress, leave=False)
    with mid_block_hook(student) as s_hook, mid_block_hook(teacher) as t_hook:
        for _ in bar:
            opt.zero_grad(set_to_none=True)
            # ---- erase: codes inside -> the teacher's decode of the pushed code
            ie = torch.randint(len(erase_items), (n_e,), generator=gen)
            te = torch.randint(0, T, (n_e,), generator=gen)
            ne = torch.randn(n_e, *a_enc.shape[1:], generator=gen)
            use_c = torch.rand(n_e, generator=gen) < 0.5
            ab = hs.abar(te).view(-1, 1, 1, 1)
            xe = ab.sqrt() * a_enc[ie].to(device) + (1 - ab).sqrt() * ne.to(device)
            items = [erase_items[int(j)] for j in ie]
            conds = [target_conds[it["target"]:it["target"] + 1]
                     if (target_conds is not None and it["target"] is not None and bool(u)) else None
                     for it, u in zip(items, use_c)]
            st = states_for(conds)
            din = torch.cat([it["delta"] if it["delta"] is not None else zeros_h for it in items]).to(device)
            eps_s = hs.call(student, xe, te.to(device), st, hook=s_hook, delta=din)
            if cfg["absorb_target"] == "x0":
                # ā-weighted x0 error == (1 − ā)-weighted ε error against the ε that denoises to B
                x0_s = (xe - (1 - ab).sqrt() * eps_s) / ab.sqrt()
                loss_e = (ab * (x0_s - b_enc[ie].to(device)) ** 2).mean()
            else:
                dsh = torch.cat([it["shift"] for it in items]).to(device)
                with torch.no_grad():
                    eps_t = hs.call(teacher, xe, te.to(device), st, hook=t_hook, delta=din + dsh)
                loss_e = ((1 - ab) * (eps_s - eps_t) ** 2).mean()
            loss = loss_e
            # ---- keep: codes outside the region and other identities decode as before
            if n_k:
                ik = torch.randint(len(keep_items), (n_k,), generator=gen)
                tk = torch.randint(0, T, (n_k,), generator=gen)
                nk = torch.randn(n_k, *k_enc.shape[1:], generator=gen)
                drop = torch.rand(n_k, generator=gen) < 0.5
                abk = hs.abar(tk).view(-1, 1, 1, 1)
                xk = abk.sqrt() * k_enc[ik].to(device) + (1 - abk).sqrt() * nk.to(device)
                kitems = [keep_items[int(j)] for j in ik]
                kconds = [None if (it["cond"] is None or bool(d)) else it["cond"] for it, d in zip(kitems, drop)]
                sk = states_for(kconds)
                dk = torch.cat([it["delta"] if it["delta"] is not None else zeros_h for it in kitems]).to(device)
                with torch.no_grad():
                    eps_tk = hs.call(teacher, xk, tk.to(device), sk, hook=t_hook, delta=dk)
                eps_sk = hs.call(student, xk, tk.to(device), sk, hook=s_hook, delta=dk)
                loss_k = ((1 - abk) * (eps_sk - eps_tk) ** 2).mean()
                loss = loss + cfg["preserve_weight"] * loss_k
                history["keep"].append(round(float(loss_k.detach()), 7))
            loss.backward()
            opt.step()
            history["erase"].append(round(float(loss_e.detach()), 7))
            bar.set_postfix(erase=f"{history['erase'][-1]:.4f}", keep=f"{history['keep'][-1]:.4f}" if n_k else "-")
    bar.close()
    timings["train_s"] = time.perf_counter() - t3

    new = {}
    originals = dict(teacher.named_parameters())
    with torch.no_grad():
        for pname, t in params.items():
            orig = originals[pname]
            value = t.detach().to(orig.dtype).cpu()
            if not torch.equal(value, orig.detach().cpu()):
                new[f"unet.{pname}"] = value
    timings["total_s"] = time.perf_counter() - t_start
    meta = {"method": "bia", "mode": "absorb", "config": _public_config(cfg, encoder), "seed": seed,
            "targets": fingerprint_embeddings(request.targets, request.salt), "anchors_used": False,
            "version": __version__, "trainable_modules": cfg["trainable"],
            "trainable_parameters": sum(t.numel() for t in params.values()),
            "regions": regions, "erase_items": len(erase_items), "keep_items": len(keep_items),
            "loss": history}
    # wall-clock times go to the log, not the metadata: the same seed must give the same patch bytes
    log.info("bia: %s", ", ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    return Patch.from_edit(model, new, meta)
