"""Closed-form erasure on attn2 to_k / to_v (the UCE / TIME / MACE family), many identities per solve.

Every attn2 reads the same text-encoder states c, so one D x D map serves all of them:

    min_W  w_e Σ_t ‖W c_t − W0 c_a(t)‖² + w_p Σ_p ‖W c_p − W0 c_p‖² + λ ‖W − W0‖²_F
    W = W0 · M · A⁻¹,   A = λI + w_e Σ c_t c_tᵀ + w_p Σ c_p c_pᵀ,   M = λI + w_e Σ c_a c_tᵀ + w_p Σ c_p c_pᵀ

summed over ALL tokens of each condition (TIME). Targets come with neighbours (embeddings at
cosine 0.75–0.95 of the target, as other photos of the person would give), all mapped to the
target's anchor. The preserved rows are the retained identities, the null condition and — by
default — a large preservation set, because holding only the few named identities lets
unnamed ones drift. Solved in float64; milliseconds once the states are computed.

`uce` is the same solver with UCE's settings (erase scale 20, preserve scale 1, λ 0.7, no
neighbours, only the named retained identities preserved) — the baseline PIU compares to.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from fastforget import __version__
from fastforget.errors import InputError
from fastforget.identity.embeddings import unit_vectors_at_cosine as neighbours_of
from fastforget.methods.base import (ErasureRequest, MethodConfig, Option, attn2_kv_names, check_cos_pair,
                                     register_method)
from fastforget.patch import Patch, fingerprint_embeddings, get_parameter


@torch.no_grad()
def _states(model, emb: torch.Tensor, batch: int = 32) -> torch.Tensor:
    if emb.shape[0] == 0:
        return torch.zeros(0, model._prompt_ids.shape[1], model.text_width, dtype=torch.float64)
    return torch.cat([model.condition(emb[i:i + batch]).double().cpu() for i in range(0, len(emb), batch)])


_GRAM_CACHE: dict = {}
STATE_BATCH = 32  # text-encoder sequences per pass: CLIP-L activations of 32 x 77 tokens stay ~0.1 GB


@torch.no_grad()
def _gram(model, emb: torch.Tensor, batch: int = 32, disk: bool = False) -> torch.Tensor:
    """Σ over embeddings and tokens of c cᵀ, accumulated in float64 chunk by chunk. Cached (MACE's
    cached preservation statistics) in memory and, with `disk` (the large preservation set), in the
    user's cache folder keyed by the text encoder's weight hash: the next request reuses it."""
    import hashlib

    from fastforget.identity.preservation import load_cached_tensor, save_cached_tensor
    from fastforget.models.registry import module_fingerprint

    key = hashlib.sha256((module_fingerprint(model.text_encoder) + str(tuple(model._prompt_ids[0].tolist()))).encode()
                         + emb.detach().float().cpu().numpy().tobytes()).hexdigest()
    if key in _GRAM_CACHE:
        return _GRAM_CACHE[key].clone()
    g = load_cached_tensor("gram", key) if disk else None
    if g is None:
        d = model.text_width
        g = torch.zeros(d, d, dtype=torch.float64)
        for i in range(0, len(emb), batch):
            s = _states(model, emb[i:i + batch]).reshape(-1, d)
            g += s.T @ s
        if disk:
            save_cached_tensor("gram", key, g)
    if len(_GRAM_CACHE) > 8:
        _GRAM_CACHE.clear()
    _GRAM_CACHE[key] = g.clone()
    return g


def solve_kv_map(model, request: ErasureRequest, *, erase_weight: float, preserve_weight: float, lam: float,
                 neighbours: int, neighbour_cos, use_preserve: bool, seed: int, retain_weight: float | None = None,
                 neighbour_map: str = "anchor", adversarial=None):
    """The D x D float64 map T with W_new = W0 T for every attn2 to_k / to_v, and the row counts.
    `adversarial`: (embeddings (M, 512), owner (M,)) found to still regenerate target owner[j]; each is
    mapped onto that target's anchor like the target itself (RECE's added rows)."""
    retain_weight = preserve_weight if retain_weight is None else retain_weight
    d = model.text_width
    k = len(request.targets)
    n_per = 1 + neighbours
    # rows of target i: the target and its neighbours, all mapped to anchor i. Streamed in small batches
    # (text-encoder activations stay small) into Σ c_t c_tᵀ and per-target sums of c_t, so that
    # Σ c_a c_tᵀ = Σ_i A_iᵀ (Σ_rows of i S): each anchor's states are computed once, not once per row
    near = neighbours_of(request.targets, neighbours, neighbour_cos, seed)
    src = torch.cat([request.targets, near])
    owner = torch.cat([torch.arange(k), torch.arange(k).repeat_interleave(neighbours)])
    anchor_states = _states(model, request.anchors)                      # (K, L, d)
    gtt = torch.zeros(d, d, dtype=torch.float64)
    sums = torch.zeros_like(anchor_states)                                 # (K, L, d)
    gat = torch.zeros(d, d, dtype=torch.float64)
    if neighbour_map == "transport":
        # a neighbour t + δ goes to a + δ: only the target's own direction is moved, so the edit spends one
        # direction per target instead of one per neighbour
        dst = torch.cat([request.anchors, F.normalize(request.anchors[owner[k:]] + near - request.targets[owner[k:]],
                                                      dim=1)])
    for i in range(0, len(src), STATE_BATCH):
        s = _states(model, src[i:i + STATE_BATCH])
        flat = s.reshape(-1, d)
        gtt += flat.T @ flat
        if neighbour_map == "transport":
            gat += _states(model, dst[i:i + STATE_BATCH]).reshape(-1, d).T @ flat
        else:
            sums.index_add_(0, owner[i:i + STATE_BATCH], s)
    if neighbour_map != "transport":
        gat = torch.einsum("kla,klb->ab", anchor_states, sums)
    n_adv = 0
    if adversarial is not None and len(adversarial[0]):
        adv_emb, adv_owner = adversarial
        n_adv = len(adv_emb)
        for i in range(0, n_adv, STATE_BATCH):
            s = _states(model, adv_emb[i:i + STATE_BATCH])
            gtt += s.reshape(-1, d).T @ s.reshape(-1, d)
            gat += torch.einsum("kla,klb->ab", anchor_states[adv_owner[i:i + STATE_BATCH]], s)
    keep = [model.null_condition(1).double().cpu().reshape(-1, d)]
    gp = keep[0].T @ keep[0]
    n_keep = keep[0].shape[0]
    if request.retain is not None and len(request.retain):
        # the people the caller named are held retain_weight / preserve_weight times harder than anonymous rows
        gp += (retain_weight / preserve_weight if preserve_weight > 0 else 1.0) * _gram(model, request.retain)
        n_keep += len(request.retain) * model._prompt_ids.shape[1]
    if use_preserve and request.preserve is not None and len(request.preserve):
        gp += _gram(model, request.preserve, disk=True)
        n_keep += len(request.preserve) * model._prompt_ids.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    a = lam * eye + erase_weight * gtt + preserve_weight * gp
    m = lam * eye + erase_weight * gat + preserve_weight * gp
    # W A = W0 M  ->  T = M A^{-1}; A is symmetric positive definite
    chol = torch.linalg.cholesky(a)
    t = torch.cholesky_solve(m.T, chol).T
    return t, {"target_rows": (len(src) + n_adv) * anchor_states.shape[1], "preserved_rows": n_keep,
               "rows_per_target": n_per, "adversarial_rows": n_adv}


def _config(name: str, defaults: dict) -> MethodConfig:
    """The closed-form options (one definition each, `_OPTIONS`) with this method's / family's defaults."""
    return MethodConfig(name, {k: replace(_OPTIONS[k], default=v) for k, v in defaults.items()})


def _resolve(name: str, defaults: dict, options: dict) -> dict:
    opts = dict(options)
    as_preserve = "retain_weight" in opts and opts["retain_weight"] is None  # None: as preserve_weight
    if as_preserve:
        del opts["retain_weight"]
    cfg = _config(name, defaults).resolve(opts)
    if as_preserve:
        cfg["retain_weight"] = None
    check_cos_pair(name, cfg, "neighbour_cos")
    return cfg


def _solve(name, model, request, cfg, seed, adversarial=None):
    try:
        return solve_kv_map(model, request, erase_weight=cfg["erase_weight"],
                            preserve_weight=cfg["preserve_weight"], lam=cfg["lam"],
                            neighbours=cfg["neighbours"], neighbour_cos=tuple(cfg["neighbour_cos"]),
                            use_preserve=cfg["use_preserve"], seed=seed, retain_weight=cfg["retain_weight"],
                            neighbour_map=cfg["neighbour_map"], adversarial=adversarial)
    except torch.linalg.LinAlgError:  # lam too small (or weights too large) for float64: A is not positive definite
        from fastforget.errors import FitError

        raise FitError(f"{name}: the solve is not numerically positive definite with options 'lam' = {cfg['lam']}, "
                       f"'erase_weight' = {cfg['erase_weight']}, 'preserve_weight' = {cfg['preserve_weight']}; "
                       "raise 'lam' (default 0.1) or lower the weights") from None


def _edited_weights(model, tmap: torch.Tensor) -> dict:
    return {p: (get_parameter(model, p).detach().double().cpu() @ tmap).to(torch.float32)
            for p in attn2_kv_names(model)}


def _adversarial_rounds(name, model, request, cfg, seed, progress, tmap, counts):
    """RECE-style hardening: each round attacks the edited model (white-box: Adam on the input embedding through
    a short differentiable sampler, from the target's own embedding and random starts; black-box: a sweep of
    inputs at cosine 0.5-0.99 to the target), keeps every input whose generations are still verified as the
    target, adds it to the erased rows (mapped to the target's anchor) and solves again."""
    import time

    from tqdm import tqdm

    from fastforget.attacks import verification_threshold
    from fastforget.attacks.diffusion import differentiable_generate, search_embeddings, similarity
    from fastforget.identity.embeddings import random_unit_vectors

    enc = request.encoder
    if enc is None or not getattr(enc, "differentiable", False):
        raise InputError(f"{name}: option 'adversarial_rounds' attacks the edited model and needs a differentiable "
                         "identity encoder in the request (erase(..., encoder=...)); got "
                         f"{getattr(enc, 'name', None) or 'none'}")
    thr = cfg["adversarial_threshold"] if cfg["adversarial_threshold"] is not None else verification_threshold(enc)
    found, owner, log = [], [], []
    k = len(request.targets)
    for r in tqdm(range(cfg["adversarial_rounds"]), desc=f"{name} adversarial rounds", disable=not progress,
                  leave=False):
        t0 = time.perf_counter()
        edited = model.clone(only=attn2_kv_names(model))
        for p, w in _edited_weights(model, tmap).items():
            get_parameter(edited, p).data.copy_(w)
        hits = 0
        for i in range(k):
            tgt = request.targets[i]
            # seeds far from the attack's own (ff.attack draws its random starts at seed + 101 + target)
            rs = seed + 50_000 + 1000 * r + i
            starts = torch.cat([tgt[None], random_unit_vectors(cfg["adversarial_starts"] - 1, seed=rs)])
            emb, sim = search_embeddings(edited, enc, tgt, starts, steps=cfg["adversarial_steps"], seed=rs)
            cand, csim = [emb], [sim]
            if cfg["adversarial_sweep"]:
                sweep = neighbours_of(tgt[None], cfg["adversarial_sweep"], (0.5, 0.99), rs)
                with torch.no_grad():
                    imgs = differentiable_generate(edited, sweep.repeat_interleave(2, 0), seed=rs)
                    cand.append(sweep)
                    csim.append(similarity(enc, imgs, tgt).view(len(sweep), 2).mean(1))
            cand, csim = torch.cat(cand), torch.cat(csim)
            keep = csim > thr
            found.append(cand[keep])
            owner += [i] * int(keep.sum())
            hits += int(keep.sum())
        log.append({"round": r + 1, "inputs_found": hits, "seconds": time.perf_counter() - t0})
        if not hits:  # nothing regenerates a target any more at this search budget
            break
        adv = (torch.cat(found), torch.tensor(owner, dtype=torch.long))
        tmap, counts = _solve(name, model, request, cfg, seed, adversarial=adv)
        log[-1]["seconds"] = time.perf_counter() - t0
    return tmap, {**counts, "adversarial": {"threshold": thr, "rounds": log}}


def _fit(name, model, request, *, seed, progress, defaults, options):
    cfg = _resolve(name, defaults, options)
    tmap, counts = _solve(name, model, request, cfg, seed)
    if cfg["adversarial_rounds"]:
        tmap, counts = _adversarial_rounds(name, model, request, cfg, seed, progress, tmap, counts)
    new = _edited_weights(model, tmap)
    meta = {"method": name, "config": cfg, "seed": seed, **counts,
            "targets": fingerprint_embeddings(request.targets, request.salt),
            "anchors": fingerprint_embeddings(request.anchors, request.salt), "version": __version__}
    return Patch.from_edit(model, new, meta)


# measured (benchmarks/preservation.py; README "Preservation"): with the default preservation set, these are the
# only settings swept that met both scenarios: a copy of the testbed (AccR 0.925, ISM_r 0.626 >= 0.95 x unedited,
# AccU 0) and a random-weight Arc2Face (unnamed identities move 0.087 of the target->anchor distance, named 0.033).
# Neighbours are transported (t + δ -> a + δ) and few (4): each neighbour mapped onto the anchor spends one more
# direction of the D x D map, and identities nobody named overlap every direction it spends (16 -> 4 with
# transport: unnamed movement 0.30 -> 0.11). The named (retain) rows are held 50x harder than anonymous rows.
# adversarial_rounds > 0 hardens the erase (RECE): see _adversarial_rounds; its found inputs are never stored
MAX_ROUNDS = 100
# neighbours per target: each is one more text-encoder pass (and a float64 512-d row); 10**9 would never finish
MAX_NEIGHBOURS = 1000
_OPTIONS = {
    "erase_weight": Option(10.0, "float", "how hard targets (and neighbours) go to their anchors; with the default "
                           "preservation set the only setting swept that met both README scenarios", lo=0.0,
                           strict=True),
    "preserve_weight": Option(0.2, "float", "weight of rows nobody named; 0.1 (or erase_weight 20) moved unnamed "
                              "people less on a random-weight Arc2Face but cost the testbed copy ISM_r", lo=0.0),
    "retain_weight": Option(10.0, "float", "named (retain) rows are held 50x harder than anonymous ones; None: as "
                            "preserve_weight", lo=0.0),
    "lam": Option(0.1, "float", "λI keeps the system positive definite", lo=0.0, strict=True),
    "neighbours": Option(4, "int", "inputs near each target also erased; each spends one direction of the DxD map "
                         "(16 -> 4 with transport: unnamed movement 0.30 -> 0.11)", lo=0, hi=MAX_NEIGHBOURS),
    "neighbour_cos": Option([0.75, 0.95], "any", "cosine band of the neighbours (another photo of the person): "
                            "a (low, high) pair, -1 <= low <= high < 1"),
    "use_preserve": Option(True, "bool", "hold the preservation set (people nobody named stay put)"),
    "neighbour_map": Option("transport", "choice", "'transport' maps t + δ -> a + δ (keeps the neighbour's offset); "
                            "'anchor' maps every neighbour onto the anchor", choices=("anchor", "transport")),
    "adversarial_rounds": Option(0, "int", "RECE-style hardening rounds (README 'Does the person come back?'); "
                                 "0: off", lo=0, hi=MAX_ROUNDS),
    "adversarial_steps": Option(10, "int", "white-box search steps per round", lo=1, hi=10_000),
    "adversarial_starts": Option(4, "int", "search starts per target: its own embedding + random", lo=1, hi=256),
    "adversarial_sweep": Option(16, "int", "neighbour-sweep inputs per round (cos 0.5-0.99)", lo=0, hi=4096),
    "adversarial_threshold": Option(None, "float", "verified-as-target cosine (None: the encoder's FAR 1e-3 "
                                    "threshold)", lo=-1.0, hi=1.0),
}
CLOSED_FORM_CONFIG = MethodConfig("closed_form", _OPTIONS)
CLOSED_FORM_DEFAULTS = CLOSED_FORM_CONFIG.defaults
# uce: the published closed form (targets -> anchors, retained rows held alike), no neighbours, no preservation set
UCE_DEFAULTS = {**CLOSED_FORM_DEFAULTS, "erase_weight": 20.0, "preserve_weight": 1.0, "retain_weight": None,
                "lam": 0.7, "neighbours": 0, "use_preserve": False, "neighbour_map": "anchor"}
UCE_CONFIG = _config("uce", UCE_DEFAULTS)


@register_method("closed_form", validate=lambda o: _resolve("closed_form", CLOSED_FORM_DEFAULTS, o),
                 requires=("condition|id_tokens", "attn2_modules|image_proj"))
def fit_closed_form(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    if hasattr(model, "id_tokens"):  # portrait generators: the image projection's last layer (methods/portrait.py)
        from fastforget.methods.portrait import fit_portrait_closed_form

        return fit_portrait_closed_form(model, request, seed=seed, progress=progress, **options)
    return _fit("closed_form", model, request, seed=seed, progress=progress, defaults=CLOSED_FORM_DEFAULTS,
                options=options)


@register_method("uce", validate=lambda o: _resolve("uce", UCE_DEFAULTS, o),
                 requires=("condition", "attn2_modules"))
def fit_uce(model, request: ErasureRequest, *, seed: int = 0, progress: bool = True, **options) -> Patch:
    return _fit("uce", model, request, seed=seed, progress=progress, defaults=UCE_DEFAULTS, options=options)
