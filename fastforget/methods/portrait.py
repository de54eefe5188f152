"""Encoder-only erasure for portrait generators (IP-Adapter FaceID, InstantID): only the image projection
(ArcFace embedding -> ID tokens) is edited; the UNets are never touched, so one erased projection serves every
generator that shares it (IREU's setting, arXiv 2606.29880; only its abstract is public).

Notation. e: a unit identity embedding (scaled by the model's `embedding_norm`); T(e): its ID tokens
(`model.id_tokens`). The projection's FIRST linear layer (FaceID MLPProjModel `proj.0` = diffusers
`ff.net.0.proj`; InstantID Resampler `proj_in`) gives the pre-activations u(e) = W1 e + b1, one "unit" per
output channel; its LAST linear layer (FaceID `proj.2` = `ff.net.2`; Resampler `proj_out`) reads hidden
features x(e) (FaceID: GELU(u), one row; Resampler: its 16 latents, one row each) into the pre-norm tokens
W2 x + b2. Each target t has an anchor a(t) (who it becomes, chosen by `erase`); "held" identities are the
caller's `retain`, the preservation set and the zero embedding (the classifier-free-guidance negative).

closed_form (this family's branch of the registered `closed_form`; same options, own defaults)
    Least squares on one linear layer of the projection, with x̃ = [x; 1] so the bias is solved with the
    weight: FaceID's last layer (x = its hidden features), the Resampler's first layer (x = the embedding;
    its last layer reads 16 latent rows per person through a space every person shares, too little room):
        min_W  w_e Σ_t ‖W x̃_t − W0 x̃_a(t)‖² + w_p Σ_h ‖W x̃_h − W0 x̃_h‖² + λ ‖W − W0‖²_F
        W = W0 M A⁻¹,  A = λI + w_e Σ x̃_t x̃_tᵀ + w_p G_h,  M = λI + w_e Σ x̃_a x̃_tᵀ + w_p G_h
    (the form of UCE / TIME / the Arc2Face closed_form). Target rows are the target and `neighbours`
    embeddings at cosine `neighbour_cos` of it (other photos of the person), each row mapped to its anchor's
    (so the tokens become the anchor's); held rows keep theirs (the caller's `retain` rows weighted
    `retain_weight` / `preserve_weight`). One float64 Cholesky solve of a (features + 1)² system:
    milliseconds, any number of identities at once.

encoder_finetune (IREU's baseline, as its abstract describes it)
    Every parameter of the image projection is fine-tuned (Adam, `steps`) to minimise the identity
    similarity of generations for the targets and maximise it for held identities:
        L = mean_t cos(E(G(T'(e_t))), e_t) − retain_weight · mean_h cos(E(G(T'(e_h))), e_h)
    `objective="generation"`: G is the frozen UNet's one-step denoised estimate x̂0 from x_t (x_t = the
    unedited model's generation of that identity, noised to t ~ U[0.3, 0.8]·T), E the caller's encoder
    (needs a differentiable one: the testbed's). `objective="tokens"`: the same similarity on the ID tokens
    themselves, cos(T'(e), T(e)) (any encoder). "auto": generation when the encoder is differentiable.

ireu (ours: locate identity-related features offline, perturb only those)
    FaceID (MLP projection u = W1 e + b1, h = GELU(u), tokens = LN(W2 h + b2)):
    1. Localisation, offline (the projection and a population only: the preservation set and `retain`, else
       random unit vectors, up to `population`). Per hidden unit j: its identity sensitivity
       s_j = ‖W2[:, j]‖² Var_pop(h_j) (the share of the tokens' variation across people that passes through
       j) and the cost of freezing it, ‖W2[:, j]‖² (Var_pop(h_j) + (h_j(0) − mean_pop h_j)²) (0 = the zero
       embedding, guidance's negative). The identity-related units are the fewest holding `identity_share`
       of Σ s; they are never repurposed.
    2. Perturbation: the 2K cheapest units (K targets) are frozen at their population mean (folded into b2)
       and rebuilt as one gate per target t: units a, b read the unit embedding as κ cos(e, t) with biases
       −κ·lo, −κ·hi (`gate_cos` = (lo, hi), κ = 60), and write ±o_t, so the pair answers
       GELU(κ(c − lo)) − GELU(κ(c − hi)): ≈ 0 below cosine lo to the target, a ramp, flat above hi. The K
       outputs o_t solve (one K×K system) for every target getting exactly its anchor's pre-norm tokens.
       Nothing else changes: everyone farther than `lo` from every target (unrelated people are at cosine
       ~0) sees only the frozen units' cost; other photos of the person (ArcFace cosine 0.6–0.9) fall in
       the gate. Milliseconds; no generator is run, so the edit does not depend on the UNet (IREU's
       transfer claim). At most hidden/4 targets per request.
    InstantID (Resampler; no per-unit nonlinearity on the embedding):
    1. Offline, per first-layer unit: read-out gain g_j = E_pop ‖∂T/∂u_j‖² (autograd, 8 Gaussian probes),
       spread σ_j² = Var_pop(u_j), sensitivity s_j = σ_j² g_j; identity-related units: the fewest holding
       `identity_share` of Σ s (cached per projection weights and population).
    2. Per request: among those, per target the fewest units holding `coverage` of its
       c_j = (u_j(a) − u_j(t))² g_j; S = their union.
    3. Only the rows S of the first layer change, by ΔW solving in float64
           min  Σ_t ‖ΔW x̃_t − (u_S(a_t) − u_S(t))‖² + w_p Σ_p ‖ΔW x̃_p‖² + w_r Σ_h ‖ΔW x̃_h‖² + λ ‖ΔW‖²
       over the population p and the hard-held rows h (`retain`, the zero embedding).

Every method returns a Patch of image-projection tensors only (`model.identity_parameter_names()`); it
applies unchanged to another generator loaded with the same adapter. Randomness comes from one CPU
generator seeded with `seed`: the same request gives the same patch bytes.
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.identity.embeddings import EMBED_DIM, random_unit_vectors
from fastforget.identity.embeddings import unit_vectors_at_cosine as neighbours_of
from fastforget.methods.base import (MAX_BATCH, MAX_LR, MAX_SAMPLES, ErasureRequest, MethodConfig, Option,
                                     check_cos_pair, check_request, patch_metadata, register_method)
from fastforget.patch import Patch

PORTRAIT_FAMILIES = ("ip_adapter_faceid", "instantid")
REQUIRES = ("id_tokens", "image_proj", "identity_parameter_names")
ROW_BATCH = 256  # embeddings per projection pass (a Resampler holds 16 latents per row)

# measured on the testbed (benchmarks/portrait_quality.py, 10 targets, 2,000 preserved identities): erase_weight
# 30 left AccU 0.075 on A; 300 gave AccU 0, AccR 0.95 (n=3, 15 steps), neighbours did not help
CLOSED_FORM_PORTRAIT_DEFAULTS = {"erase_weight": 300.0, "preserve_weight": 1.0, "retain_weight": 100.0, "lam": 1e-3,
                                 "neighbours": 0, "neighbour_cos": [0.75, 0.95], "use_preserve": True,
                                 "neighbour_map": "anchor"}
FINETUNE_CONFIG = MethodConfig("encoder_finetune", {
    "steps": Option(200, "int", "IREU's encoder fine-tuning baseline, at the testbed's scale", lo=1),
    "lr": Option(1e-3, "float", "Adam on the image projection only", lo=0.0, strict=True, hi=MAX_LR),
    "micro_batch": Option(8, "int", "rows per step", lo=1, hi=MAX_BATCH),
    "retain_weight": Option(1.0, "float", "weight of held people (retain, preservation)", lo=0.0),
    "objective": Option("auto", "choice", "'generation': identity similarity of the frozen UNet's one-step "
                        "denoised estimate (needs a differentiable encoder); 'tokens': the same on the ID tokens; "
                        "'auto': generation when the encoder is differentiable", choices=("auto", "generation",
                        "tokens")),
})
IREU_CONFIG = MethodConfig("ireu", {
    "gate_cos": Option([0.6, 0.8], "any", "gate opens between these cosines to a target (0 < low < high < 1): a "
                       "photo of the person (>= 0.8) is redirected, others (< 0.6) untouched"),
    "identity_share": Option(0.95, "float", "share of identity sensitivity the located units carry", lo=0.0,
                             strict=True, hi=1.0),
    "coverage": Option(0.9, "float", "share of a target's first-layer response the gates cover", lo=0.0,
                       strict=True, hi=1.0),
    "preserve_weight": Option(0.003, "float", "weight of the preservation rows in the least squares", lo=0.0),
    "retain_weight": Option(100.0, "float", "named (retain) rows held hard", lo=0.0),
    "lam": Option(0.01, "float", "λI keeps the system positive definite", lo=0.0, strict=True),
    "population": Option(4096, "int", "random identities used to locate identity-related units", lo=16,
                         hi=MAX_SAMPLES),
})
FINETUNE_DEFAULTS = FINETUNE_CONFIG.defaults
IREU_DEFAULTS = IREU_CONFIG.defaults
GATE_SHARPNESS = 3.0 / 0.05  # a gate unit's pre-activation is -3 (GELU ~ -0.004) 0.05 below its threshold


def is_portrait(model) -> bool:
    return getattr(model, "family", None) in PORTRAIT_FAMILIES and all(hasattr(model, a) for a in REQUIRES)


def _check_portrait(name: str, model) -> None:
    if not is_portrait(model):
        raise InputError(f"model: {name} edits the image projection of a portrait generator (IP-Adapter FaceID, "
                         f"InstantID); this is a {getattr(model, 'family', None) or type(model).__name__} model")


def _check_request(name: str, request: ErasureRequest) -> None:
    check_request(name, request, anchors=True, dim=EMBED_DIM)


# ---------------------------------------------------------------- the projection's layers
def _layers(model) -> tuple[str, str]:
    """Module names (inside `model.image_proj`) of the first and the last linear layer."""
    p = model.image_proj
    if hasattr(p, "ff") and hasattr(p, "norm"):         # IPAdapterFaceIDImageProjection
        return "ff.net.0.proj", "ff.net.2"
    if hasattr(p, "proj_in") and hasattr(p, "proj_out"):  # IPAdapterPlusImageProjection (InstantID)
        return "proj_in", "proj_out"
    raise InputError(f"model: unknown image projection {type(p).__name__}")


def _qualified(model, module: str) -> list[str]:
    """Patch names of a projection submodule's weight and bias."""
    prefix = model.identity_parameter_names()[0].rsplit(".", 1)[0]
    head = prefix[:prefix.index(".image_projection_layers.0") + len(".image_projection_layers.0")]
    return [f"{head}.{module}.{p}" for p, _ in model.image_proj.get_submodule(module).named_parameters()]


def _proj_input(model, emb: torch.Tensor) -> torch.Tensor:
    """What the projection module takes (unit embeddings scaled by embedding_norm, the family's shape);
    keeps the graph of `emb`."""
    x = emb.to(model.device, model.dtype) * model.embedding_norm
    return model._projection_input(x)


def _tokens(model, emb: torch.Tensor, proj=None) -> torch.Tensor:
    """ID tokens (N, tokens, D) of unit embeddings; `proj`: another projection module (a trained copy)."""
    return (proj or model.image_proj)(_proj_input(model, emb)).float()


@torch.no_grad()
def _inputs_of(model, emb: torch.Tensor, module: str) -> torch.Tensor:
    """Inputs of a projection submodule, (N, rows, features) float64: the first layer reads one row (the scaled
    embedding); FaceID's last layer 1 row, the Resampler's 16 (one per latent)."""
    layer = model.image_proj.get_submodule(module)
    out, seen = [], []
    hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        for i in range(0, len(emb), ROW_BATCH):
            seen.clear()
            model.image_proj(_proj_input(model, emb[i:i + ROW_BATCH]))
            x = seen[0]
            out.append(x.reshape(x.shape[0], -1, x.shape[-1]).double().cpu())
    finally:
        hook.remove()
    return torch.cat(out)


def _last_inputs(model, emb: torch.Tensor) -> torch.Tensor:
    """Inputs of the last linear layer, (N, rows, hidden) float64: FaceID 1 row, the Resampler 16."""
    return _inputs_of(model, emb, _layers(model)[1])


def _with_units(model, emb: torch.Tensor, u: torch.Tensor | None = None, delta=None):
    """Run the projection with the first layer's output replaced by `u` (N, [1,] units) or shifted by
    `delta(x)` (added to the first layer's output, x its input); returns (tokens, first-layer output)."""
    first, _ = _layers(model)
    layer = model.image_proj.get_submodule(first)
    seen = []

    def hook(module, args, out):
        if u is not None:
            out = u.reshape(out.shape).to(out.dtype)
        if delta is not None:
            out = out + delta(args[0])
        seen.append(out)
        return out

    h = layer.register_forward_hook(hook)
    try:
        tokens = model.image_proj(_proj_input(model, emb)).float()
    finally:
        h.remove()
    return tokens, seen[0]


# ---------------------------------------------------------------- closed_form
def _gram(rows: torch.Tensor) -> torch.Tensor:
    x = F.pad(rows.reshape(-1, rows.shape[-1]), (0, 1), value=1.0)
    return x.T @ x


def _closed_form_layer(model) -> str:
    """FaceID: the last linear layer (its hidden features separate people); the Resampler: its first layer,
    which reads the embedding itself (its last layer reads 16 latent rows per person through a 1,280-wide
    (here: small) space shared by everyone: too little room to move one person alone)."""
    first, last = _layers(model)
    return last if hasattr(model.image_proj, "ff") else first


def fit_portrait_closed_form(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True,
                             **options) -> Patch:
    """closed_form for portrait generators (see the module docstring): the last linear layer of the image
    projection, in one float64 solve. Called by the registered `closed_form` for this family."""
    from fastforget.methods.closed_form import _resolve

    _check_portrait("closed_form", model)
    _check_request("closed_form", request)
    cfg = _resolve("closed_form", CLOSED_FORM_PORTRAIT_DEFAULTS, options)
    k = len(request.targets)
    near = neighbours_of(request.targets, cfg["neighbours"], tuple(cfg["neighbour_cos"]), seed)
    src = torch.cat([request.targets, near])
    owner = torch.cat([torch.arange(k), torch.arange(k).repeat_interleave(cfg["neighbours"])])
    layer_name = _closed_form_layer(model)
    rows_of = lambda e: _inputs_of(model, e, layer_name)  # noqa: E731
    x_src = rows_of(src)
    if cfg["neighbour_map"] == "transport":  # a neighbour t + δ goes to a + δ
        dst = torch.cat([request.anchors, F.normalize(request.anchors[owner[k:]] + near - request.targets[owner[k:]],
                                                      dim=1)])
        x_dst = rows_of(dst)
    else:
        x_dst = rows_of(request.anchors)[owner]
    xs = F.pad(x_src.reshape(-1, x_src.shape[-1]), (0, 1), value=1.0)
    xd = F.pad(x_dst.reshape(-1, x_dst.shape[-1]), (0, 1), value=1.0)
    x_null = rows_of(torch.zeros(1, EMBED_DIM))  # the zero embedding: guidance's negative branch
    gp = _gram(x_null)
    held_rows = x_null.shape[1]
    w_p, w_r = cfg["preserve_weight"], cfg["retain_weight"]
    w_r = w_p if w_r is None else w_r
    if request.retain is not None and len(request.retain):
        x = rows_of(request.retain)
        gp += (w_r / w_p if w_p > 0 else 1.0) * _gram(x)
        held_rows += x.shape[0] * x.shape[1]
    if cfg["use_preserve"] and request.preserve is not None and len(request.preserve):
        for i in range(0, len(request.preserve), 1024):
            x = rows_of(request.preserve[i:i + 1024])
            gp += _gram(x)
            held_rows += x.shape[0] * x.shape[1]
    d = xs.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    a = cfg["lam"] * eye + cfg["erase_weight"] * xs.T @ xs + w_p * gp
    m = cfg["lam"] * eye + cfg["erase_weight"] * xd.T @ xs + w_p * gp
    try:
        tmap = torch.cholesky_solve(m.T, torch.linalg.cholesky(a)).T   # W A = W0 M
    except torch.linalg.LinAlgError:
        from fastforget.errors import FitError

        raise FitError(f"closed_form: the solve is not numerically positive definite with options 'lam' = "
                       f"{cfg['lam']}, 'erase_weight' = {cfg['erase_weight']}, 'preserve_weight' = {w_p}; raise "
                       "'lam' or lower the weights") from None
    layer = model.image_proj.get_submodule(layer_name)
    w_name, b_name = _qualified(model, layer_name)
    w0 = torch.cat([layer.weight.detach().double().cpu(), layer.bias.detach().double().cpu()[:, None]], dim=1)
    w_new = w0 @ tmap
    meta = _meta("closed_form", model, request, cfg, seed, layer=layer_name, target_rows=int(xs.shape[0]),
                 preserved_rows=int(held_rows), rows_per_target=1 + cfg["neighbours"])
    return Patch.from_edit(model, {w_name: w_new[:, :-1].float(), b_name: w_new[:, -1].float()}, meta)


# ---------------------------------------------------------------- shared by the iterative methods
def _held_pool(request: ErasureRequest, limit: int, seed: int) -> tuple[torch.Tensor, str]:
    """Rows to hold (and to localise on): retain + preservation set, at most `limit` (a seeded subset)."""
    parts, kind = [], []
    if request.retain is not None and len(request.retain):
        parts.append(request.retain.float())
        kind.append("retain")
    if request.preserve is not None and len(request.preserve):
        p = request.preserve.float()
        room = max(0, limit - sum(len(x) for x in parts))
        if len(p) > room:
            p = p[torch.randperm(len(p), generator=torch.Generator().manual_seed(seed + 3))[:room]]
        parts.append(p)
        kind.append("preserve")
    if not parts:
        return random_unit_vectors(limit, seed=seed + 2), "random"
    return torch.cat(parts)[:limit], "+".join(kind)


def _new_values(model, proj, names: list[str]) -> dict:
    """{patch name: trained value} for the projection tensors in `names` that changed."""
    trained = dict(proj.named_parameters())
    head = model.identity_parameter_names()[0]
    head = head[:head.index(".image_projection_layers.0") + len(".image_projection_layers.0")]
    out = {}
    for n in names:
        local = n[len(head) + 1:]
        new = trained[local].detach().float().cpu()
        if not torch.equal(new, dict(model.image_proj.named_parameters())[local].detach().float().cpu()):
            out[n] = new
    return out


def _meta(name: str, model, request, cfg: dict, seed: int, **extra) -> dict:
    return patch_metadata(name, cfg, request, seed, family=model.family, **extra)


# ---------------------------------------------------------------- encoder_finetune (IREU's baseline)
def _resolve_finetune(options: dict) -> dict:
    return FINETUNE_CONFIG.resolve(options)


def _to_sample_space(model, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> the UNet's sample space (pixel-unshuffled, or VAE latents)."""
    if model.vae is None:
        return F.pixel_unshuffle(images, model.unshuffle) if model.unshuffle > 1 else images
    lat = model.vae.encode(images.to(model.device, model.dtype)).latent_dist.mean
    cfg = model.vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1).to(lat)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1).to(lat)
        return (lat - mean) * cfg.scaling_factor / std
    return lat * cfg.scaling_factor


class _OneStep:
    """x̂0 of the frozen UNet from x_t, with the ID tokens of a projection being trained, decoded to images."""

    def __init__(self, model, seed: int):
        from diffusers import DDPMScheduler

        self.model = model
        self.sched = DDPMScheduler.from_config(model.scheduler.config)
        pipe = model.pipeline()
        states, added = model._prompt_states(pipe, [model.default_prompt], [model.default_negative_prompt], False)
        self.states, self.added = states.detach(), {k: v.detach() for k, v in added.items()}
        self.n_train = self.sched.config.num_train_timesteps

    def __call__(self, emb: torch.Tensor, z0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        m, b = self.model, len(emb)
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(int(0.3 * self.n_train), int(0.8 * self.n_train), (b,), generator=gen)
        zt = self.sched.add_noise(z0, noise, t)
        added = {k: v.expand(b, *v.shape[1:]) for k, v in self.added.items()}
        added["image_embeds"] = [_proj_input(m, emb)[:, None]]  # the UNet's own (trained) projection runs on it
        eps = m.unet(zt.to(m.device, m.dtype), t.to(m.device), encoder_hidden_states=self.states.expand(b, -1, -1),
                     added_cond_kwargs=added).sample.float()
        abar = self.sched.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        x0 = ((zt - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-4, 4)
        return m._decode(x0.to(m.dtype)).float().clamp(-1, 1)


def _reference_samples(model, emb: torch.Tensor, seed: int) -> torch.Tensor:
    """The unedited model's generations of `emb` (10 steps, guidance 3) in the UNet's sample space."""
    with torch.no_grad():
        imgs = model.generate_tensor(emb, seed=seed, steps=10, guidance=3.0)
        return torch.cat([_to_sample_space(model, imgs[i:i + 8]).float().cpu() for i in range(0, len(imgs), 8)])


@register_method("encoder_finetune", validate=_resolve_finetune, requires=REQUIRES)
def fit_encoder_finetune(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True,
                         **options) -> Patch:
    """IREU's baseline: fine-tune the whole image projection on identity similarity (module docstring)."""
    from tqdm import tqdm

    cfg = _resolve_finetune(options)
    _check_portrait("encoder_finetune", model)
    _check_request("encoder_finetune", request)
    enc = request.encoder
    differentiable = enc is not None and getattr(enc, "differentiable", False)
    objective = cfg["objective"]
    if objective == "auto":
        objective = "generation" if differentiable else "tokens"
    if objective == "generation" and not differentiable:
        raise InputError("encoder_finetune: objective 'generation' needs a differentiable identity encoder (the "
                         "testbed's); this encoder has no gradients: use objective='tokens'")
    gen = torch.Generator().manual_seed(int(seed))
    targets = request.targets.float()
    held, held_kind = _held_pool(request, 64 if objective == "generation" else MAX_SAMPLES, seed)
    names = model.identity_parameter_names()
    work = model.clone(only=names)
    proj = work.image_proj
    for p in proj.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(list(proj.parameters()), lr=cfg["lr"])
    b = cfg["micro_batch"]
    with torch.no_grad():
        t_ref, h_ref = _tokens(model, targets).flatten(1), _tokens(model, held).flatten(1)
    if objective == "generation":
        one_step = _OneStep(work, seed)
        z_t, z_h = _reference_samples(model, targets, seed), _reference_samples(model, held, seed + 10_000)
    history = []
    bar = tqdm(range(cfg["steps"]), desc="encoder_finetune", disable=not progress, leave=False)
    for _ in bar:
        it = torch.randint(0, len(targets), (min(b, len(targets)),), generator=gen)
        ih = torch.randint(0, len(held), (b,), generator=gen)
        if objective == "generation":
            e = torch.cat([targets[it], held[ih]])
            imgs = one_step(e, torch.cat([z_t[it], z_h[ih]]), gen)
            sim = (enc.encode_tensor(imgs) * e.to(imgs.device)).sum(-1)
        else:
            e = torch.cat([targets[it], held[ih]])
            tok = _tokens(work, e).flatten(1)
            sim = F.cosine_similarity(tok, torch.cat([t_ref[it], h_ref[ih]]), dim=1)
        forget, keep = sim[:len(it)].mean(), sim[len(it):].mean()
        loss = forget - cfg["retain_weight"] * keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append([round(forget.item(), 6), round(keep.item(), 6)])
        bar.set_postfix(forget=f"{forget.item():.3f}", keep=f"{keep.item():.3f}")
    bar.close()
    new = _new_values(model, proj, names)
    return Patch.from_edit(model, new, _meta("encoder_finetune", model, request, cfg, seed, objective=objective,
                                             held=held_kind, similarity_forget_keep=history))


# ---------------------------------------------------------------- ireu (ours)
def _resolve_ireu(options: dict) -> dict:
    cfg = IREU_CONFIG.resolve(options)
    check_cos_pair("ireu", cfg, "gate_cos", strict=True)
    return cfg


_LOCALISE_CACHE: dict = {}


def localise(model, population: torch.Tensor, *, probes: int = 8, seed: int = 0) -> dict:
    """Offline step of ireu: per first-layer unit the read-out gain g, spread σ², identity sensitivity
    s = σ² g, and the identity-related units (sorted by s, descending). Cached per projection weights and
    population."""
    from fastforget.models.registry import module_fingerprint

    key = hashlib.sha256((module_fingerprint(model.image_proj) + str(model.embedding_norm)).encode()
                         + population.detach().float().cpu().numpy().tobytes()
                         + f"{probes}/{seed}".encode()).hexdigest()
    if key in _LOCALISE_CACHE:
        return _LOCALISE_CACHE[key]
    gen = torch.Generator().manual_seed(seed + 17)
    us, gains = [], None
    for i in range(0, len(population), ROW_BATCH):
        e = population[i:i + ROW_BATCH]
        with torch.no_grad():
            _, u0 = _with_units(model, e)
        u = u0.detach().float().clone().requires_grad_(True)
        with torch.enable_grad():
            tok, _ = _with_units(model, e, u=u)
            g = torch.zeros_like(u)
            for _ in range(probes):
                r = torch.randn(tok.shape, generator=gen).to(tok)
                (grad,) = torch.autograd.grad((tok * r).sum(), u, retain_graph=True)
                g += grad.square()
        us.append(u0.detach().double().cpu().reshape(len(e), -1))
        gsum = (g / probes).double().cpu().reshape(len(e), -1).sum(0)
        gains = gsum if gains is None else gains + gsum
    u = torch.cat(us)
    gain = gains / len(population)
    spread = u.var(0, unbiased=True)
    sens = spread * gain
    order = torch.argsort(sens, descending=True, stable=True)
    stats = {"mean": u.mean(0), "gain": gain, "spread": spread, "sensitivity": sens, "order": order}
    if len(_LOCALISE_CACHE) > 8:
        _LOCALISE_CACHE.clear()
    _LOCALISE_CACHE[key] = stats
    return stats


def _fewest(values: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the fewest entries of `values` (>= 0) whose sum reaches `share` of the total."""
    order = torch.argsort(values, descending=True, stable=True)
    cum = values[order].cumsum(0)
    n = int((cum < share * cum[-1]).sum()) + 1
    return order[:min(n, len(values))]


def select_units(model, stats: dict, targets: torch.Tensor, anchors: torch.Tensor, *, identity_share: float,
                 coverage: float) -> tuple[torch.Tensor, dict]:
    """Per-request step of ireu: the identity-related units carrying each target -> anchor difference."""
    identity_units = _fewest(stats["sensitivity"], identity_share)
    mask = torch.zeros(len(stats["gain"]), dtype=torch.bool)
    mask[identity_units] = True
    with torch.no_grad():
        _, ut = _with_units(model, targets)
        _, ua = _with_units(model, anchors)
    diff = (ut.double().cpu().reshape(len(targets), -1) - ua.double().cpu().reshape(len(anchors), -1)).square()
    contrib = diff * stats["gain"][None] * mask[None]
    chosen = torch.zeros_like(mask)
    per_target = []
    for c in contrib:
        idx = _fewest(c, coverage)
        chosen[idx] = True
        per_target.append(len(idx))
    units = chosen.nonzero().flatten()
    return units, {"units": len(mask), "identity_units": len(identity_units), "edited_units": len(units),
                   "edited_units_per_target": per_target}


def _first_inputs(model, emb: torch.Tensor) -> torch.Tensor:
    """Inputs of the first linear layer (the scaled embedding), (N, 512 + 1) float64 with a trailing 1 (bias)."""
    x = _inputs_of(model, emb, _layers(model)[0])
    return F.pad(x.reshape(-1, x.shape[-1]), (0, 1), value=1.0)


def gate_response(cos: torch.Tensor, gate_cos) -> torch.Tensor:
    """A target gate's output at cosine `cos` to its target: GELU(κ(c − lo)) − GELU(κ(c − hi)), 0 below lo, a ramp
    to κ(hi − lo) at hi, flat above."""
    lo, hi = gate_cos
    c = cos.double()
    return F.gelu(GATE_SHARPNESS * (c - lo)) - F.gelu(GATE_SHARPNESS * (c - hi))


@torch.no_grad()
def _ireu_gates(model, request: ErasureRequest, cfg: dict, seed: int, population, pop_kind) -> Patch:
    """ireu for FaceID's MLP: localise generic hidden units offline, rebuild two of them per target as a gate
    that fires only on that identity and writes its anchor's tokens (module docstring)."""
    from fastforget.errors import FitError

    first, last = _layers(model)
    l1, l2 = model.image_proj.get_submodule(first), model.image_proj.get_submodule(last)
    targets, anchors = request.targets.float(), request.anchors.float()
    k = len(targets)
    # 1. offline: what freezing each hidden unit at its population mean costs the pre-norm tokens
    h_pop = _last_inputs(model, population)[:, 0]                      # (N, H) = GELU(u)
    h_null = _last_inputs(model, torch.zeros(1, EMBED_DIM))[0, 0]      # guidance's negative branch
    w2 = l2.weight.detach().double().cpu()
    out_norm = w2.square().sum(0)
    mu, var = h_pop.mean(0), h_pop.var(0)
    sensitivity = out_norm * var                                        # identity variance through unit j
    cost = out_norm * (var + (h_null - mu).square())
    identity_units = _fewest(sensitivity, cfg["identity_share"])
    generic = len(mu) - len(identity_units)
    if 2 * k > min(generic, len(mu) // 2):
        raise FitError(f"ireu: {k} targets need {2 * k} generic hidden units; this projection has {generic} of "
                       f"{len(mu)}: erase at most {min(generic, len(mu) // 2) // 2} identities per request (or use "
                       "closed_form)")
    cost_generic = cost.clone()
    cost_generic[identity_units] = float("inf")  # identity-related units are never repurposed
    free = torch.argsort(cost_generic, stable=True)[:2 * k]
    # 2. freeze them into the bias; what is left of every output without them
    b2 = l2.bias.detach().double().cpu() + w2[:, free] @ mu[free]
    w2_new = w2.clone()
    w2_new[:, free] = 0
    h_t = _last_inputs(model, targets)[:, 0]
    h_a = _last_inputs(model, anchors)[:, 0]
    y_anchor = h_a @ w2.T + l2.bias.detach().double().cpu()            # the anchors' pre-norm tokens, unedited
    delta = y_anchor - (h_t @ w2_new.T + b2)
    # 3. per target a gate (units a, b): it answers cos(e, t) with gate_response; jointly solved so that each
    # target gets exactly its anchor's tokens even where gates overlap
    t_unit = F.normalize(targets.double(), dim=1)
    resp = gate_response(t_unit @ t_unit.T, cfg["gate_cos"])           # (K targets, K gates)
    out = torch.linalg.solve(resp, delta)                               # (K gates, out)
    w1 = l1.weight.detach().double().cpu().clone()
    b1 = l1.bias.detach().double().cpu().clone()
    lo, hi = cfg["gate_cos"]
    ua, ub = free[0::2], free[1::2]
    w1[ua] = w1[ub] = GATE_SHARPNESS * t_unit / model.embedding_norm
    b1[ua], b1[ub] = -GATE_SHARPNESS * lo, -GATE_SHARPNESS * hi
    w2_new[:, ua], w2_new[:, ub] = out.T, -out.T
    held = [x for x in (request.retain, anchors) if x is not None and len(x)]
    in_gate = int(sum(((F.normalize(x.double(), dim=1) @ t_unit.T) > lo).any(1).sum() for x in held))
    n1, b1n = _qualified(model, first)
    n2, b2n = _qualified(model, last)
    extra = {"layer": [first, last], "population": pop_kind, "population_size": len(population),
             "units": len(mu), "identity_units": len(identity_units), "gate_units": free.tolist(),
             "gate_units_identity_share": float(sensitivity[free].sum() / sensitivity.sum()),
             "held_in_a_gate": in_gate}
    return Patch.from_edit(model, {n1: w1.float(), b1n: b1.float(), n2: w2_new.float(), b2n: b2.float()},
                           _meta("ireu", model, request, cfg, seed, **extra))


@register_method("ireu", validate=_resolve_ireu, requires=REQUIRES)
def fit_ireu(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    """IREU (ours): localise identity-related features offline, then perturb only those for the targets
    (module docstring): FaceID by target gates, the Resampler by least squares on its first layer."""
    cfg = _resolve_ireu(options)
    _check_portrait("ireu", model)
    _check_request("ireu", request)
    population, pop_kind = _held_pool(request, cfg["population"], seed)
    fit = _ireu_gates if hasattr(model.image_proj, "ff") else _ireu_least_squares
    return fit(model, request, cfg, seed, population, pop_kind)


def _ireu_least_squares(model, request: ErasureRequest, cfg: dict, seed: int, population, pop_kind) -> Patch:
    """ireu's perturbation for the Resampler (no per-unit nonlinearity on the embedding): the selected
    first-layer rows, by least squares (module docstring, InstantID)."""
    stats = localise(model, population, seed=seed)
    targets, anchors = request.targets.float(), request.anchors.float()
    units, unit_info = select_units(model, stats, targets, anchors, identity_share=cfg["identity_share"],
                                    coverage=cfg["coverage"])
    with torch.no_grad():
        d = (_with_units(model, anchors)[1] - _with_units(model, targets)[1]).reshape(len(targets), -1)
    d = d.double().cpu()[:, units]                                # wanted change of the selected units
    x_f = _first_inputs(model, targets)
    pop_rows = _first_inputs(model, population)
    gram = cfg["preserve_weight"] * pop_rows.T @ pop_rows
    held = [_first_inputs(model, torch.zeros(1, EMBED_DIM))]     # guidance's negative branch: held hard
    if request.retain is not None and len(request.retain):
        held.append(_first_inputs(model, request.retain.float()))
    for x in held:
        gram += cfg["retain_weight"] * x.T @ x
    a = cfg["lam"] * torch.eye(x_f.shape[1], dtype=torch.float64) + x_f.T @ x_f + gram
    try:
        delta = torch.cholesky_solve((x_f.T @ d), torch.linalg.cholesky(a)).T   # (units, 512 + 1)
    except torch.linalg.LinAlgError:
        from fastforget.errors import FitError

        raise FitError(f"ireu: the solve is not numerically positive definite with 'lam' = {cfg['lam']}; raise "
                       "it or lower the weights") from None
    first, _ = _layers(model)
    layer = model.image_proj.get_submodule(first)
    w_name, b_name = _qualified(model, first)
    w = layer.weight.detach().double().cpu().clone()
    bias = layer.bias.detach().double().cpu().clone()
    w[units] += delta[:, :-1]
    bias[units] += delta[:, -1]
    extra = {"layer": first, "population": pop_kind, "population_size": len(population),
             "units_edited": units.tolist(), **unit_info}
    return Patch.from_edit(model, {w_name: w.float(), b_name: bias.float()},
                           _meta("ireu", model, request, cfg, seed, **extra))
