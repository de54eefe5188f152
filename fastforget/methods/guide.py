"""GUIDE (Seo et al., CVPR 2024): forget a person in a StyleGAN2 from one photo.

The photo is inverted into W+ with the unedited generator (w_u). Its "UFO" target is the point on the
other side of the average latent, w_t = w_avg − d·(w_u − w_avg)/‖w_u − w_avg‖ (norm over the whole W+
tensor); the synthesis weights are then fine-tuned ("latent target unlearning") so that G(w_u) draws
what the unedited G₀ draws at w_t, with three losses (KHU-AGI/GUIDE `unlearn.py`):

    local        1e-2·MSE + 1.0·perceptual + 0.1·ID       between G(w_u)     and G₀(w_t)
    adjacency    the same three terms, batch 2,            between G(w_u + Δ) and G₀(w_t + Δ),
                 Δ = α(w_r − w_u)/‖w_r − w_u‖, w_r a random latent, α ~ U(0, α_max)
    global       1.0·perceptual, batch 2 random latents,   between G(w)       and G₀(w)

Adam, lr 1e-4, 1000 iterations; only synthesis weights change (the mapping network is untouched).
`guide_average` is GUIDE's baseline: w_t = w_avg.

What is ours, not the paper's:
* distances are in units of this model's latent spread: `spread(model)` = median ‖w − w_avg‖ of
  mapped random z (`model.w_spread`) × √n_latent, i.e. how far a typical person's W+ lies from the
  average over the whole tensor, because GUIDE's d = 30 and α_max = 15 are EG3D-FFHQ numbers.
  Default d = 1.0 spread (w_t is the mirror image of a typical person through the average),
  α_max = 0.5 spread (GUIDE's α_max / d).
* the perceptual term: no VGG / LPIPS weights can be downloaded here, so it is the L1 distance of
  Laplacian pyramids (5 levels, Bojanowski et al. 2018's "Lap1" loss), which needs no weights;
* the ID term uses the caller's encoder when it is differentiable (the testbed's); an ONNX Runtime
  encoder has no gradients, so the term is left out and the patch metadata says so.
"""
from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.methods.base import ErasureRequest, MethodConfig, Option, patch_metadata, register_method
from fastforget.patch import Patch

log = logging.getLogger("fastforget")

GUIDE_CONFIG = MethodConfig("guide", {
    "steps": Option(1000, "int", "GUIDE's schedule (unlearn.py: 1,000 iterations)", lo=1, hi=100_000, source="paper"),
    "lr": Option(1e-4, "float", "GUIDE's Adam learning rate", lo=0.0, strict=True, hi=1.0, source="paper"),
    "distance": Option(1.0, "float", "UFO distance d in spreads (GUIDE's d = 30 on EG3D-FFHQ, about one typical "
                       "person's distance from the average)", lo=0.0),
    "alpha_max": Option(0.5, "float", "adjacency radius in spreads (GUIDE's α_max / d = 15 / 30)", lo=0.0),
    "adjacency_batch": Option(2, "int", "GUIDE's adjacency batch", lo=0, hi=1024, source="paper"),
    "global_batch": Option(2, "int", "GUIDE's global-preservation batch", lo=0, hi=1024, source="paper"),
    "mse_weight": Option(1e-2, "float", "GUIDE's local / adjacency MSE weight", lo=0.0, source="paper"),
    "perceptual_weight": Option(1.0, "float", "GUIDE's perceptual weight (here a Laplacian-pyramid L1: no "
                                "LPIPS weights can be shipped)", lo=0.0, source="paper"),
    "id_weight": Option(0.1, "float", "GUIDE's ID weight (needs a differentiable encoder)", lo=0.0, source="paper"),
    "adjacency_weight": Option(1.0, "float", "GUIDE weighs its three losses equally", lo=0.0, source="paper"),
    "global_weight": Option(1.0, "float", "GUIDE weighs its three losses equally; 5 keeps other people better "
                            "and catches fewer other photos (README sweep)", lo=0.0, source="paper"),
    "target": Option("extra", "choice", "UFO (GUIDE); 'average' is GUIDE's own baseline (w_t = w_avg)",
                     choices=("extra", "average"), source="paper"),
    "invert_steps": Option(None, "int", "inversion steps (None: the adapter's default, 300)", lo=1, hi=100_000),
    "neighbours": Option(0, "int", "identity neighbours mined per target (0 = GUIDE as published; 8 catches "
                         "more of the person's other photos at a cost to other people, README sweep)", lo=0, hi=1024),
    "neighbour_radius": Option(1.5, "float", "where neighbours start, in spreads from w_u (other photos of a "
                               "testbed person invert 1.2-1.8 spreads away)", lo=0.0),
    "neighbour_steps": Option(40, "int", "Adam steps pulling each neighbour back to the target's identity", lo=0,
                              hi=100_000),
    "neighbour_batch": Option(2, "int", "neighbours in each step's local term (as GUIDE's adjacency batch)", lo=0,
                              hi=1024),
    "global_mix": Option(0.0, "float", "share of the global batch drawn with an independent w per style input "
                         "(inverted photos' W+ look like that; 0 = GUIDE)", lo=0.0, hi=1.0),
    "global_id_weight": Option(0.0, "float", "ID term in the global loss, also on retain= people (0 = GUIDE)",
                               lo=0.0),
})
GUIDE_DEFAULTS = GUIDE_CONFIG.defaults
AVERAGE_CONFIG = MethodConfig("guide_average", {**GUIDE_CONFIG.options, "target": Option(
    "average", "choice", "GUIDE's baseline: w_t = w_avg", choices=("extra", "average"), source="paper")})


def resolve_options(options: dict, name: str = "guide", config: MethodConfig | None = None) -> dict:
    return (config or GUIDE_CONFIG).resolve(options)


# ---------------------------------------------------------------- losses
def _gauss_down(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :]) / 256.0
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    return F.conv2d(x, k.expand(c, 1, 5, 5), groups=c)[:, :, ::2, ::2]


def laplacian_l1(a: torch.Tensor, b: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Per-image L1 distance of Laplacian pyramids, level j weighted 2^(2j) / numel (Bojanowski et
    al., "Optimizing the Latent Space of Generative Networks", 2018): a weight-free perceptual loss.
    Images (N, 3, H, W) in [-1, 1]; returns (N,)."""
    out = a.new_zeros(a.shape[0])
    for j in range(levels):
        if min(a.shape[-2:]) < 5:
            out = out + 4 ** j * (a - b).abs().flatten(1).mean(1)
            return out
        da, db = _gauss_down(a), _gauss_down(b)
        up = lambda t, ref: F.interpolate(t, size=ref.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
        out = out + 4 ** j * ((a - up(da, a)) - (b - up(db, b))).abs().flatten(1).mean(1)
        a, b = da, db
    return out + 4 ** levels * (a - b).abs().flatten(1).mean(1)


def _terms(x, y, enc, cfg, use_id: bool) -> torch.Tensor:
    """GUIDE's three-term image loss, mean over the batch."""
    loss = cfg["mse_weight"] * F.mse_loss(x, y) + cfg["perceptual_weight"] * laplacian_l1(x, y).mean()
    if use_id and cfg["id_weight"] > 0:
        ex, ey = enc.encode_tensor(x), enc.encode_tensor(y)
        loss = loss + cfg["id_weight"] * (1 - (F.normalize(ex, dim=-1) * F.normalize(ey, dim=-1)).sum(-1)).mean()
    return loss


# ---------------------------------------------------------------- the fit
def spread(model) -> float:
    """How far a typical W+ lies from the average W+ (norm over the whole tensor)."""
    return float(model.w_spread) * float(model.n_latent) ** 0.5


def ufo_targets(model, w_u: torch.Tensor, distance: float, kind: str = "extra") -> torch.Tensor:
    """GUIDE's target latents: w_avg − d·(w_u − w_avg)/‖w_u − w_avg‖ (d in units of model.w_spread),
    or w_avg itself for the "average" baseline. w_u: W+ (N, n_latent, style_dim)."""
    avg = model.w_avg.to(w_u).expand_as(w_u)
    if kind == "average":
        return avg.clone()
    diff = w_u - avg
    norm = diff.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
    return avg - distance * spread(model) * diff / norm


def synthesis_parameter_names(model) -> list[str]:
    return [f"generator.{n}" for n, _ in model.generator.named_parameters() if not n.startswith("style.")]


def target_latents(model, request: ErasureRequest, *, seed: int, progress: bool, invert_steps=None) -> torch.Tensor:
    """W+ of every target photo, inverted with the unedited generator (or given as latents)."""
    w = request.extra.get("target_latents")
    if w is not None:
        return w.detach().float()
    imgs = request.extra.get("target_images")
    if imgs is None:
        raise InputError("guide: targets must be photos (or W+ latents) of the people to forget")
    kw = {} if invert_steps is None else {"steps": invert_steps}
    enc = request.encoder if getattr(request.encoder, "differentiable", False) else None  # else pixels alone
    return model.invert(imgs, encoder=enc, seed=seed, progress=progress, **kw).detach().float()


def mine_neighbours(model, w_u: torch.Tensor, enc, *, m: int, radius: float, steps: int,
                    gen: torch.Generator) -> torch.Tensor:
    """Identity neighbours (ours): for each target, m W+ latents that the unedited generator draws as the
    same person but that lie `radius` spreads from w_u, where other photos of a person invert. Each
    starts at w_u + radius·spread·(w_r − w_u)/‖w_r − w_u‖ (w_r a random latent) and Adam pulls its
    identity back to G₀(w_u)'s while the step away (pose, light, background) stays. (k·m, L, D)."""
    k = len(w_u)
    with torch.no_grad():
        e_u = F.normalize(enc.encode_tensor(model.synthesis(w_u)), dim=-1).repeat_interleave(m, 0)
        z = torch.randn(k * m, model.style_dim, generator=gen)
        w_r = model.mapping(z)[:, None, :].expand(k * m, model.n_latent, model.style_dim)
        start = w_u.repeat_interleave(m, 0)
        d = w_r - start
        w = start + radius * spread(model) * d / d.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
    w = w.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.1 * model.w_spread / model.style_dim ** 0.5)
    for _ in range(steps):
        e = F.normalize(enc.encode_tensor(model.synthesis(w)), dim=-1)
        loss = (1 - (e * e_u).sum(-1)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return w.detach()


def fit_guide_like(name: str, model, request: ErasureRequest, *, seed: int, progress: bool, cfg: dict) -> Patch:
    from tqdm import tqdm

    enc = request.encoder
    use_id = enc is not None and bool(getattr(enc, "differentiable", False))
    if enc is not None and not use_id and cfg["id_weight"] > 0:
        log.warning("%s: the encoder is not differentiable (ONNX Runtime): the ID term is left out", name)
    w_u = target_latents(model, request, seed=seed, progress=progress, invert_steps=cfg["invert_steps"])
    request.extra["w_u"] = w_u  # the report scores the same latents
    w_t = ufo_targets(model, w_u, cfg["distance"], cfg["target"])
    alpha_max = cfg["alpha_max"] * spread(model)

    g0 = model.generator
    student = copy.deepcopy(model)
    for n, p in student.generator.named_parameters():
        p.requires_grad_(not n.startswith("style."))
    for p in g0.parameters():
        p.requires_grad_(False)
    params = [p for p in student.generator.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    gen = torch.Generator().manual_seed(seed)
    k = len(w_u)
    with torch.no_grad():
        y_local = model.synthesis(w_t)

    def random_w(n):
        z = torch.randn(n, model.style_dim, generator=gen)
        with torch.no_grad():
            return model.mapping(z)[:, None, :].expand(n, model.n_latent, model.style_dim).contiguous()

    def mixed_w(n):  # an independent w per style input: inverted photos' W+ vary layer to layer like this
        z = torch.randn(n * model.n_latent, model.style_dim, generator=gen)
        with torch.no_grad():
            return model.mapping(z).view(n, model.n_latent, model.style_dim)

    m = cfg["neighbours"] if use_id else 0
    if cfg["neighbours"] and not use_id:
        log.warning("%s: identity neighbours need a differentiable encoder; none mined", name)
    w_nb = y_nb = None
    if m:
        w_nb = mine_neighbours(model, w_u, enc, m=m, radius=cfg["neighbour_radius"], steps=cfg["neighbour_steps"],
                               gen=gen)
        with torch.no_grad():  # each neighbour goes where its offset from w_u takes the UFO target
            y_nb = model.synthesis(w_t.repeat_interleave(m, 0) + (w_nb - w_u.repeat_interleave(m, 0)))
    n_mix = round(cfg["global_batch"] * cfg["global_mix"])
    w_keep = y_keep = None
    if request.extra.get("retain_images") is not None and cfg["global_batch"] and cfg["global_weight"] > 0:
        # ours: people the caller named to keep are inverted like the target and held where G₀ draws them
        kw = {} if cfg["invert_steps"] is None else {"steps": cfg["invert_steps"]}
        w_keep = model.invert(request.extra["retain_images"], encoder=enc if use_id else None, seed=seed + 1,
                              progress=progress, **kw).detach().float()
        with torch.no_grad():
            y_keep = model.synthesis(w_keep)

    bar = tqdm(range(cfg["steps"]), desc=f"{name}: unlearning", disable=not progress, leave=False)
    last = float("nan")
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        loss = _terms(student.synthesis(w_u), y_local, enc, cfg, use_id)
        if cfg["adjacency_batch"] and cfg["adjacency_weight"] > 0:
            nb = cfg["adjacency_batch"]
            idx = torch.randint(0, k, (nb,), generator=gen)
            w_r = random_w(nb)
            d = w_r - w_u[idx]
            alpha = torch.rand(nb, generator=gen) * alpha_max
            delta = alpha[:, None, None] * d / d.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None]
            with torch.no_grad():
                y_adj = model.synthesis(w_t[idx] + delta)
            loss = loss + cfg["adjacency_weight"] * _terms(student.synthesis(w_u[idx] + delta), y_adj, enc, cfg,
                                                            use_id)
        if m and cfg["neighbour_batch"]:
            idx = torch.randint(0, len(w_nb), (cfg["neighbour_batch"],), generator=gen)
            loss = loss + _terms(student.synthesis(w_nb[idx]), y_nb[idx], enc, cfg, use_id)
        if cfg["global_batch"] and cfg["global_weight"] > 0:
            nb = cfg["global_batch"]
            w = torch.cat([f(c) for f, c in ((random_w, nb - n_mix), (mixed_w, n_mix)) if c])
            with torch.no_grad():
                y_g = model.synthesis(w)
            x_g = student.synthesis(w)
            g_loss = cfg["perceptual_weight"] * laplacian_l1(x_g, y_g).mean()
            if use_id and cfg["global_id_weight"] > 0:
                ex, ey = F.normalize(enc.encode_tensor(x_g), dim=-1), F.normalize(enc.encode_tensor(y_g), dim=-1)
                g_loss = g_loss + cfg["global_id_weight"] * (1 - (ex * ey).sum(-1)).mean()
            if w_keep is not None:
                idx = torch.randint(0, len(w_keep), (nb,), generator=gen)
                x_k = student.synthesis(w_keep[idx])
                k_loss = cfg["perceptual_weight"] * laplacian_l1(x_k, y_keep[idx]).mean()
                if use_id and cfg["global_id_weight"] > 0:
                    ex = F.normalize(enc.encode_tensor(x_k), dim=-1)
                    ey = F.normalize(enc.encode_tensor(y_keep[idx]), dim=-1)
                    k_loss = k_loss + cfg["global_id_weight"] * (1 - (ex * ey).sum(-1)).mean()
                g_loss = g_loss + k_loss
            loss = loss + cfg["global_weight"] * g_loss
        loss.backward()
        opt.step()
        last = float(loss.detach())
        bar.set_postfix(loss=f"{last:.4f}")
    names = synthesis_parameter_names(model)
    sp = dict(student.generator.named_parameters())
    new = {n: sp[n.partition(".")[2]].detach().clone() for n in names}
    new = {n: v for n, v in new.items() if not torch.equal(v, model.generator.get_parameter(n.partition(".")[2]))}
    meta = patch_metadata(name, dict(cfg), request, seed, anchors=False, id_loss=use_id, neighbours_mined=m,
                          retained_people=0 if w_keep is None else len(w_keep), final_loss=last,
                          spread=spread(model))
    return Patch.from_edit(model, new, meta)


@register_method("guide", validate=lambda o: resolve_options(o), requires=("synthesis", "invert", "w_avg"))
def fit_guide(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    return fit_guide_like("guide", model, request, seed=seed, progress=progress, cfg=resolve_options(options))


@register_method("guide_average", validate=lambda o: resolve_options(o, "guide_average", AVERAGE_CONFIG),
                 requires=("synthesis", "invert", "w_avg"))
def fit_guide_average(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    return fit_guide_like("guide_average", model, request, seed=seed, progress=progress,
                          cfg=resolve_options(options, "guide_average", AVERAGE_CONFIG))
