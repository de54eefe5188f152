"""Fine-tuning erasers on attn2: `piu` (PIU, Cancino et al.) and its `esd_x` baseline (ESD-x, Gandikota et al.).

Both train a copy of the UNet's cross-attention against a frozen teacher ε* (the caller's UNet,
only ever run forward under no_grad) on noisy latents made from pure noise: z0 ~ N(0, I) of
`model.sample_shape`, x_t = DDPM add_noise(z0, ε, t), t ~ U[0, num_train_timesteps). No images
are needed. The caller's model is never modified: the result is a Patch of the changed tensors.

piu (PIU's `training/losses.py`, `training/runner.py`):

    L = ‖ε_θ(x_t, c_f) − [ε*(x_t, c_a) − η (ε*(x_t, c_f) − ε*(x_t, c_a))]‖²
        + λ_p ‖ε_θ(x'_t, c_r) − ε*(x'_t, c_r)‖²              η = 1, λ_p = 10

  AdamW lr 1e-4, weight decay 0.01, 400 steps of micro-batch 16 × accumulation 2, fp32.
  - c_f: each micro-batch sample picks a target uniformly and mixes 3 of that target's
    embeddings with Dirichlet(1, 1, 1) weights (renormalised); c_a is THAT target's anchor.
    A target has one embedding (its row of `request.targets`) unless the caller passes
    `request.extra["target_sets"]` (one (n_i, 512) array per target). When a target has fewer
    than 3 embeddings, its set is completed with jittered copies of the target at cosine 0.9
    (target·0.9 + √0.19·u, u a random unit vector orthogonal to it), drawn once before training.
    With more than 3, each sample draws 3 distinct ones.
  - c_r: a fresh micro-batch each step, drawn from `request.retain` if given, else the
    `request.preserve` rows, else random unit vectors; x'_t are separate noisy latents.
  - trainable: all parameters (to_q, to_k, to_v, to_out, ...) of the chosen attn2 modules.
    layers="auto": for an SD-1.5 block layout (4 down blocks, attn2 in down_blocks.0-2 and
    up_blocks.1-3, cross_attention_dim 768: Arc2Face) PIU's set, attn2 of down_blocks.2,
    mid_block, up_blocks.1, up_blocks.2 (9 of 16). For any other UNet: the ceil(9/16 · n)
    (at least 1) attn2 modules with the highest identity sensitivity, see
    `rank_identity_sensitive_attn2`. layers="x": every attn2. layers="full": the whole UNet
    (the patch holds every UNet tensor that changed). Or a list of attn2 module names.

esd_x (ESD-x as PIU runs it as a baseline): every attn2 parameter is trained so that

    ε_θ(x_t, c_target) → ε*(x_t, c_null) − η (ε*(x_t, c_target) − ε*(x_t, c_null)),  η = 1

  c_null = the empty prompt (Arc2Face's negative branch), c_target = a target embedding picked
  uniformly per sample. Adam (AdamW without weight decay, as ESD), lr 1e-5, 1000 steps,
  micro-batch 16. No preservation term: that is what makes it the baseline.

Conditioning: the text encoder is not trained. The fixed states (anchors, null prompt, a
retain pool of up to 4096 rows) are computed once up front under no_grad; the forget mixes and
random retain vectors are fresh every step and are encoded per micro-batch, also under no_grad
(the text encoder costs <1% of a UNet training step).

Determinism: every random draw (latents, noise, timesteps, target picks, Dirichlet weights,
jitter, retain picks) comes from one CPU torch.Generator seeded with `seed`; no global RNG.
On CPU the same request and seed give identical patch tensors. The training UNet runs in eval
mode (no dropout). On GPU, its attn2 modules use fastforget's fused masked cross-attention
processor (Triton forward and backward); on CPU that processor dispatches to torch SDPA.
Metadata holds salted fingerprints of targets and anchors and the per-step losses, never raw
embeddings.

Data-parallel (torchrun, fastforget.distributed): `micro_batch` is the global micro-batch. Every rank
draws it whole from the generator (so the draws stay in step) and runs the teacher and the student on its
rows only (`student_shard`); the patch equals the single-process one within float tolerance.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastforget.errors import InputError
from fastforget.methods.base import (MAX_BATCH, MAX_LR, ErasureRequest, MethodConfig, Option, check_request,
                                     patch_metadata, register_method)
from fastforget.methods.student import check_shardable, shard_mse_loss, student_shard, train_student
from fastforget.patch import Patch

EMBED_DIM = 512
PIU_FRACTION = 9 / 16  # PIU trains 9 of SD-1.5's 16 attn2 modules
PIU_SD15_BLOCKS = ("down_blocks.2.", "mid_block.", "up_blocks.1.", "up_blocks.2.")
JITTER_COS = 0.9
MAX_CACHED_RETAIN = 4096

def _layers_option(default: str, reason: str, source: str) -> Option:
    return Option(default, "any", reason, source=source)


PIU_CONFIG = MethodConfig("piu", {
    "steps": Option(400, "int", "PIU's schedule (runner.py)", lo=1, source="paper"),
    "lr": Option(1e-4, "float", "PIU's AdamW learning rate", lo=0.0, strict=True, hi=MAX_LR, source="paper"),
    "weight_decay": Option(0.01, "float", "PIU's AdamW weight decay", lo=0.0, source="paper"),
    "micro_batch": Option(16, "int", "PIU's micro-batch", lo=1, hi=MAX_BATCH, source="paper"),
    "accumulation": Option(2, "int", "PIU's gradient accumulation (effective batch 32)", lo=1, source="paper"),
    "eta": Option(1.0, "float", "guidance away from the target toward the anchor (PIU's η)", source="paper"),
    "lambda_p": Option(10.0, "float", "weight of the preservation term (PIU's λ_p)", lo=0.0, source="paper"),
    "layers": _layers_option("auto", "PIU's 9 identity-sensitive attn2 of SD-1.5; elsewhere the same fraction "
                             "ranked by identity sensitivity", "paper"),
})
ESD_X_CONFIG = MethodConfig("esd_x", {
    "steps": Option(1000, "int", "ESD's schedule", lo=1, source="paper"),
    "lr": Option(1e-5, "float", "ESD's Adam learning rate", lo=0.0, strict=True, hi=MAX_LR, source="paper"),
    "eta": Option(1.0, "float", "negative guidance scale (ESD's η)", source="paper"),
    "micro_batch": Option(16, "int", "PIU's batch for its ESD-x baseline", lo=1, hi=MAX_BATCH, source="paper"),
})
PIU_DEFAULTS = PIU_CONFIG.defaults
ESD_X_DEFAULTS = ESD_X_CONFIG.defaults


# ---------------------------------------------------------------- options
def _resolve_options(name: str, config: MethodConfig, options: dict) -> dict:
    cfg = config.resolve(options)
    check_shardable(f"{name}: option 'micro_batch'", cfg["micro_batch"])  # data-parallel: a row per rank
    if "layers" in cfg:
        v = cfg["layers"]
        if isinstance(v, (list, tuple)):
            if not v or not all(isinstance(s, str) for s in v):
                raise InputError(f"{name}: option 'layers' must be 'auto', 'x', 'full' or a non-empty list "
                                 f"of attn2 module names, got {v!r}")
            cfg["layers"] = list(v)
        elif not isinstance(v, str) or v not in ("auto", "x", "full"):  # an array would compare elementwise
            raise InputError(f"{name}: option 'layers' must be 'auto', 'x', 'full' or a list of attn2 module "
                             f"names, got {v!r}")
    return cfg


# ---------------------------------------------------------------- layer choice
def _sample_xt(sched, shape, gen: torch.Generator):
    """Noisy latents from pure noise: (x_t, t), drawn on CPU from `gen`."""
    z0 = torch.randn(shape, generator=gen)
    noise = torch.randn(shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (shape[0],), generator=gen)
    return sched.add_noise(z0, noise, t), t


def _ddpm(model):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(model.scheduler.config)


@torch.no_grad()
def rank_identity_sensitive_attn2(model, seed: int = 0, n_pairs: int = 4) -> list[tuple[str, float]]:
    """Every attn2 module of `model.unet` with its identity sensitivity, highest first.

    Sensitivity = mean over `n_pairs` random unit embedding pairs (e1, e2), each with its own
    random (x_t, t), of ‖A(c(e1)) − A(c(e2))‖ / ‖A(c(e1))‖, where A(c) is the attn2 module's
    output (the attention branch, before the residual add) in a UNet pass on x_t conditioned on
    c. Measured with forward hooks on one UNet pass over the 2·n_pairs batch; deterministic
    under `seed`. The model is not modified (hooks are removed afterwards).
    """
    if n_pairs < 1:
        raise InputError(f"n_pairs must be >= 1, got {n_pairs}")
    modules = model.attn2_modules()
    if not modules:
        raise InputError("the model's UNet has no attn2 (cross-attention) modules")
    gen = torch.Generator().manual_seed(int(seed))
    emb = F.normalize(torch.randn(2 * n_pairs, EMBED_DIM, generator=gen), dim=1)
    xt, t = _sample_xt(_ddpm(model), model.sample_shape(n_pairs), gen)
    cond = model.condition(emb)
    outputs: dict = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out))
             for name, m in modules.items()]
    try:
        model.unet(torch.cat([xt, xt]).to(model.device, model.dtype), torch.cat([t, t]).to(model.device),
                   encoder_hidden_states=cond.to(model.dtype))
    finally:
        for h in hooks:
            h.remove()
    scores = []
    for name in modules:
        out = outputs[name]
        out = out[0] if isinstance(out, tuple) else out
        o1, o2 = out.float().flatten(1).chunk(2)
        ratio = (o1 - o2).norm(dim=1) / o1.norm(dim=1).clamp_min(1e-12)
        scores.append((name, float(ratio.mean())))
    order = {name: i for i, name in enumerate(modules)}
    return sorted(scores, key=lambda s: (-s[1], order[s[0]]))


def _is_sd15_layout(model) -> bool:
    unet = model.unet
    names = list(model.attn2_modules())
    downs = {int(n.split(".")[1]) for n in names if n.startswith("down_blocks.")}
    ups = {int(n.split(".")[1]) for n in names if n.startswith("up_blocks.")}
    return (len(getattr(unet, "down_blocks", [])) == 4 and downs == {0, 1, 2} and ups == {1, 2, 3}
            and unet.config.cross_attention_dim == 768)


def resolve_layers(model, layers, seed: int = 0) -> tuple[list[str] | None, dict]:
    """The attn2 module names to train (None: the whole UNet) and a record of how they were chosen."""
    modules = model.attn2_modules()
    if not modules:
        raise InputError("the model's UNet has no attn2 (cross-attention) modules to fine-tune")
    if layers == "full":
        return None, {"rule": "full"}
    if layers == "x":
        return list(modules), {"rule": "x"}
    if isinstance(layers, (list, tuple)):
        names = [n[len("unet."):] if n.startswith("unet.") else n for n in layers]
        bad = [n for n in names if n not in modules]
        if bad:
            raise InputError(f"option 'layers': {bad[:5]} are not attn2 modules of this UNet "
                             f"(e.g. {list(modules)[:3]})")
        keep = set(names)
        return [n for n in modules if n in keep], {"rule": "list"}
    if _is_sd15_layout(model):
        return [n for n in modules if n.startswith(PIU_SD15_BLOCKS)], {"rule": "piu_sd15"}
    ranked = rank_identity_sensitive_attn2(model, seed=seed)
    k = max(1, math.ceil(PIU_FRACTION * len(ranked)))
    chosen = {n for n, _ in ranked[:k]}
    return [n for n in modules if n in chosen], {
        "rule": "sensitivity", "sensitivity": {n: round(s, 6) for n, s in ranked}}


# ---------------------------------------------------------------- conditions
def _unit_orthogonal(t: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.randn(n, t.shape[0], generator=gen, dtype=torch.float64)
    t64 = t.double()[None]
    u = u - (u * t64).sum(1, keepdim=True) * t64
    return F.normalize(u, dim=1)


def _forget_sets(request: ErasureRequest, gen: torch.Generator) -> list[torch.Tensor]:
    """Per target, an (m >= 3, 512) set of its embeddings to mix (see the module docstring)."""
    k = len(request.targets)
    given = request.extra.get("target_sets") if isinstance(request.extra, dict) else None
    if given is not None:
        if len(given) != k:
            raise InputError(f"request.extra['target_sets'] must hold one array per target ({k}), got {len(given)}")
        sets = []
        for i, s in enumerate(given):
            s = torch.as_tensor(s, dtype=torch.float32)
            s = s[None] if s.ndim == 1 else s
            if s.ndim != 2 or s.shape[1] != EMBED_DIM or len(s) == 0 or not torch.isfinite(s).all():
                raise InputError(f"request.extra['target_sets'][{i}] must be a finite ({EMBED_DIM},) or "
                                 f"(n, {EMBED_DIM}) array")
            sets.append(F.normalize(s, dim=1))
    else:
        sets = [request.targets[i:i + 1].float() for i in range(k)]
    out = []
    for i, s in enumerate(sets):
        if len(s) < 3:
            centre = F.normalize(request.targets[i].float(), dim=0)
            u = _unit_orthogonal(centre, 3 - len(s), gen)
            jit = JITTER_COS * centre.double()[None] + math.sqrt(1 - JITTER_COS ** 2) * u
            s = torch.cat([s, F.normalize(jit, dim=1).float()])
        out.append(s)
    return out


def _dirichlet_mix(sets: list[torch.Tensor], which: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """For each picked target, a Dirichlet(1,1,1) mix of 3 of its embeddings, renormalised to unit norm."""
    rows = []
    for i in which.tolist():
        s = sets[i]
        idx = torch.randperm(len(s), generator=gen)[:3] if len(s) > 3 else torch.arange(3)
        w = -torch.log1p(-torch.rand(3, generator=gen))  # Exp(1) draws, normalised: Dirichlet(1, 1, 1)
        w = w / w.sum()
        rows.append((w[:, None] * s[idx]).sum(0))
    return F.normalize(torch.stack(rows), dim=1)


@torch.no_grad()
def _encode(model, emb: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model.condition(emb[i:i + batch]).float() for i in range(0, len(emb), batch)])


class _RetainSampler:
    """Fresh retain conditions each step: from request.retain, else request.preserve, else random unit vectors."""

    def __init__(self, model, request: ErasureRequest):
        self.model = model
        pool = request.retain if request.retain is not None and len(request.retain) else None
        self.source = "retain" if pool is not None else None
        if pool is None and request.preserve is not None and len(request.preserve):
            pool, self.source = request.preserve, "preserve"
        self.source = self.source or "random"
        self.pool = None if pool is None else pool.float()
        self.states = _encode(model, self.pool) if pool is not None and len(pool) <= MAX_CACHED_RETAIN else None

    def __call__(self, n: int, gen: torch.Generator) -> torch.Tensor:
        if self.pool is None:
            with torch.no_grad():
                return self.model.condition(F.normalize(torch.randn(n, EMBED_DIM, generator=gen), dim=1)).float()
        idx = torch.randint(0, len(self.pool), (n,), generator=gen)
        if self.states is not None:
            return self.states[idx.to(self.states.device)]
        with torch.no_grad():
            return self.model.condition(self.pool[idx]).float()


# ---------------------------------------------------------------- training
def _install_fused(unet, model, device) -> str | None:
    """Fused cross-attention processor on the TRAINING UNet's attn2, if the kernel dispatch can run it here."""
    try:
        from fastforget.kernels import KernelBackendError, set_fused_cross_attention
        from fastforget.kernels.dispatch import select
    except ImportError:  # pragma: no cover - kernels are part of the package
        return None
    seq_len = model._prompt_ids.shape[1]
    try:
        backends = set()
        for name, m in unet.named_modules():
            if name.endswith("attn2"):
                head_dim = m.to_k.out_features // m.heads
                backends.add(select("masked_cross_attention", device, torch.float32, lk=seq_len, d=head_dim).name)
        set_fused_cross_attention(unet)
    except KernelBackendError:
        if device.type == "cuda":
            raise
        return None  # an explicit FASTFORGET_KERNELS choice that cannot run on CPU: keep diffusers' processor
    return "+".join(sorted(backends))


def _train(name: str, model, request: ErasureRequest, *, cfg: dict, seed: int, progress: bool,
           modules: list[str] | None, loss_fn, extra_meta: dict) -> Patch:
    """The shared student loop (fastforget.methods.student) on the chosen attn2 modules; the Patch of the
    changed tensors, with the shared metadata."""
    fused = {}

    def prepare(student):
        fused["backend"] = _install_fused(student, model, model.device)

    res = train_student(model.unet, modules, loss_fn, steps=cfg["steps"], lr=cfg["lr"],
                        weight_decay=cfg.get("weight_decay", 0.0), accumulation=cfg.get("accumulation", 1),
                        progress=progress, desc=name, prepare=prepare, sharded=True)
    meta = patch_metadata(name, cfg, request, seed, trainable_modules=modules if modules is not None else "full",
                          trainable_parameters=res.trainable_parameters, fused_attention=fused.get("backend"),
                          loss=res.history, **extra_meta)
    return Patch.from_edit(model, res.new, meta)


def _teacher_eps(teacher, x, t, c):
    with torch.no_grad():
        dtype = next(teacher.parameters()).dtype
        return teacher(x.to(dtype), t, encoder_hidden_states=c.to(dtype)).sample.float()


# ---------------------------------------------------------------- methods
@register_method("piu", validate=lambda o: _resolve_options("piu", PIU_CONFIG, o),
                 requires=("condition", "attn2_modules"))
def fit_piu(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    """PIU: guided erasure toward each target's anchor on the identity-sensitive attn2, with preservation."""
    cfg = _resolve_options("piu", PIU_CONFIG, options)
    check_request("piu", request, anchors=True)
    modules, layer_info = resolve_layers(model, cfg["layers"], seed=seed)
    gen = torch.Generator().manual_seed(int(seed))
    sched = _ddpm(model)
    device = model.device
    sets = _forget_sets(request, gen)
    anchor_states = _encode(model, request.anchors.float())
    retain = _RetainSampler(model, request) if cfg["lambda_p"] > 0 else None
    b, eta, lam = cfg["micro_batch"], cfg["eta"], cfg["lambda_p"]

    def loss_fn(student, teacher):
        # every rank draws the whole micro-batch (the generator stays in step), then works on its rows only
        s = student_shard(b)
        n = s.stop - s.start
        which = torch.randint(0, len(sets), (b,), generator=gen)
        mix = _dirichlet_mix(sets, which, gen)
        with torch.no_grad():
            cf = model.condition(mix[s]).float()
        ca = anchor_states[which[s].to(anchor_states.device)]
        xf, tf = _sample_xt(sched, model.sample_shape(b), gen)
        xf, tf = xf[s], tf[s]
        xs, ts, cs = [xf, xf], [tf, tf], [ca, cf]
        if retain is not None:
            cr = retain(b, gen)[s]
            xr, tr = _sample_xt(sched, model.sample_shape(b), gen)
            xs, ts, cs = xs + [xr[s]], ts + [tr[s]], cs + [cr]
        x, t, c = torch.cat(xs).to(device), torch.cat(ts).to(device), torch.cat(cs).to(device)
        eps = _teacher_eps(teacher, x, t, c)
        e_anchor, e_forget = eps[:n], eps[n:2 * n]
        target = e_anchor - eta * (e_forget - e_anchor)
        pred = student(x[n:], t[n:], encoder_hidden_states=c[n:]).sample.float()
        forget = shard_mse_loss(pred[:n], target, b)
        if retain is None:
            return forget, {"total": forget.item(), "forget": forget.item()}
        preserve = shard_mse_loss(pred[n:], eps[2 * n:], b)
        loss = forget + lam * preserve
        return loss, {"total": loss.item(), "forget": forget.item(), "preserve": preserve.item()}

    extra = {"layer_rule": layer_info["rule"], "forget_set_sizes": [len(s) for s in sets],
             "retain_source": retain.source if retain is not None else None}
    if "sensitivity" in layer_info:
        extra["sensitivity"] = layer_info["sensitivity"]
    return _train("piu", model, request, cfg=cfg, seed=seed, progress=progress, modules=modules,
                  loss_fn=loss_fn, extra_meta=extra)


@register_method("esd_x", validate=lambda o: _resolve_options("esd_x", ESD_X_CONFIG, o),
                 requires=("condition", "attn2_modules"))
def fit_esd_x(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    """ESD-x baseline: negative guidance away from each target toward the null prompt, all attn2, no preservation."""
    cfg = _resolve_options("esd_x", ESD_X_CONFIG, options)
    check_request("esd_x", request, anchors=True)
    modules, _ = resolve_layers(model, "x")
    gen = torch.Generator().manual_seed(int(seed))
    sched = _ddpm(model)
    device = model.device
    target_states = _encode(model, request.targets.float())
    with torch.no_grad():
        null_state = model.null_condition(1).float()
    b, eta = cfg["micro_batch"], cfg["eta"]

    def loss_fn(student, teacher):
        s = student_shard(b)  # the whole micro-batch is drawn on every rank; this rank's rows are trained
        n = s.stop - s.start
        which = torch.randint(0, len(target_states), (b,), generator=gen)
        ct = target_states[which[s].to(target_states.device)]
        cn = null_state.expand(n, -1, -1)
        x, t = _sample_xt(sched, model.sample_shape(b), gen)
        x, t = x[s].to(device), t[s].to(device)
        eps = _teacher_eps(teacher, torch.cat([x, x]), torch.cat([t, t]), torch.cat([cn, ct]).to(device))
        e_null, e_target = eps[:n], eps[n:]
        target = e_null - eta * (e_target - e_null)
        pred = student(x, t, encoder_hidden_states=ct.to(device)).sample.float()
        loss = shard_mse_loss(pred, target, b)
        return loss, {"total": loss.item()}

    return _train("esd_x", model, request, cfg=cfg, seed=seed, progress=progress, modules=modules,
                  loss_fn=loss_fn, extra_meta={"layer_rule": "x"})
