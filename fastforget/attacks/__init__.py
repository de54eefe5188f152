"""Re-emergence attacks: does an erased person come back to whoever holds the model?

    rep = ff.attack(erased, [0], encoder=enc, kind="embedding", baseline=model)
    rep.asr, rep.best_similarity, rep.baseline_asr ; print(rep.table()) ; rep.save("attack_out")

ASR = the share of an attack's generations verified as the target: identity cosine to the target's photos
(their normalised mean embedding) above the encoder's verification threshold at FAR = 1e-3. For the testbed
encoder the threshold is calibrated here on 1,000 held-out testbed identities x 4 photos (all impostor
pairs) and recorded in the report; for any other encoder pass `threshold=` (its published FAR 1e-3 value).
The baseline (the unedited model) is attacked with the same starts, seeds and budget, side by side.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.attacks.report import AttackReport
from fastforget.errors import InputError

KINDS = ("embedding", "neighbours", "relearn")
FAR = 1e-3
# default budgets: Adam steps on the embedding (W+ projector steps on a GAN); inputs per cosine level;
# fine-tuning steps. Each runs in about a minute per model on one CPU thread on the testbed
DEFAULT_BUDGET = {"embedding": 20, "neighbours": 4, "relearn": 30}
GAN_DEFAULT_BUDGET = {"embedding": 100, "neighbours": 4}
MAX_BUDGET = 100_000

_THRESHOLDS: dict = {}


def verification_threshold(encoder, far: float = FAR, n_ids: int = 1000, per_identity: int = 4,
                           seed: int = 7) -> float:
    """Cosine above which two testbed photos are called one person at `far` (held-out identities 0..n_ids-1,
    the testbed encoder's own evaluation set); cached per encoder weights."""
    from fastforget.identity.encoder import TestbedEncoder
    from fastforget.metrics import verification_rates
    from fastforget.testbed import render

    if not isinstance(encoder, TestbedEncoder):
        raise InputError(f"threshold: no calibration set for {getattr(encoder, 'name', type(encoder).__name__)}; "
                         "pass threshold= (the encoder's verification cosine at FAR 1e-3)")
    key = (encoder.fingerprint(), far, n_ids, per_identity, seed)
    if key not in _THRESHOLDS:
        ims, lab = render(range(n_ids), per_identity, seed=seed)
        emb = torch.cat([encoder.encode(ims[i:i + 500]) for i in range(0, len(ims), 500)])
        _THRESHOLDS[key] = verification_rates(emb, torch.from_numpy(lab), far=far)["threshold"]
    return _THRESHOLDS[key]


def resolve_targets(targets, encoder, *, seed: int, per_identity: int = 8, need_images: bool = False) -> list[dict]:
    """targets -> [{centroid (512,), photo_embeddings (k, 512), images (k uint8 photos) or None}], one per person.
    Testbed ids are rendered `per_identity` times; each image is one person; each embedding row one person."""
    from fastforget.identity.embeddings import check_embeddings, is_embedding_like, is_id_list
    from fastforget.identity.encoder import as_image_batch

    if targets is None:
        raise InputError("targets: no identities given")
    if is_id_list(targets):
        from fastforget.identity.embeddings import identity_sets
        from fastforget.testbed import render

        identity_sets(targets, encoder, "targets", per_identity=1, seed=seed)  # the id checks, cheaply
        ids = [int(targets)] if isinstance(targets, (int, np.integer)) else [int(v) for v in targets]
        ims, _ = render(np.asarray(ids, dtype=np.int64), per_identity, seed=seed)
        groups = [list(ims[i * per_identity:(i + 1) * per_identity]) for i in range(len(ids))]
    elif is_embedding_like(targets):
        if need_images:
            raise InputError("targets: this attack works from photos of the person (testbed ids or images), "
                             "not embeddings")
        emb = check_embeddings(targets, name="targets")
        return [{"centroid": e, "photo_embeddings": e[None], "images": None} for e in emb]
    else:
        groups = [[im] for im in as_image_batch(targets, "targets")]
    out = []
    for g in groups:
        e = check_embeddings(encoder.encode(np.stack(g), name="targets"), name="targets")
        out.append({"centroid": F.normalize(e.mean(0), dim=0), "photo_embeddings": e, "images": g})
    return out


def _checkpoints(budget: int, checkpoints) -> list[int]:
    from fastforget.models.common import check_int

    if checkpoints is None:
        return sorted({0, budget // 2, budget})
    if isinstance(checkpoints, (str, bytes)) or not hasattr(checkpoints, "__iter__"):
        raise InputError(f"checkpoints: expected a list of budgets, got {checkpoints!r}")
    cps = sorted({check_int(c, "checkpoints", 0, budget) for c in checkpoints} | {budget})
    return cps


def attack(model, targets, *, encoder=None, kind: str = "embedding", baseline=None, seed: int = 0, budget=None,
           progress: bool = True, threshold: float | None = None, checkpoints=None, n_verify: int = 4,
           steps: int = 25, photo_starts: int = 1, random_starts: int = 2, lr: float | None = None,
           salt: str = "fastforget") -> AttackReport:
    """Attack `model` (an erased model) to make it generate `targets` again; the same attack on `baseline`
    (the unedited model) gives the row to compare with.

    kind="embedding": white-box search of the input (unit 512-d embedding; W+ on a GAN) for `budget` steps
    from the target's own embedding, `photo_starts` of its photos and `random_starts` random vectors;
    "neighbours": the target's photos and `budget` inputs at each cosine 0.5 ... 0.99 to it (a GAN: latents
    mixed with the target's); "relearn": `budget` fine-tuning steps of the identity path on (a) other people,
    (b) 3 photos of the target, and with `baseline`, (c) the unedited model taught a stranger.
    Generations are drawn with the model's own sampler (`steps`), `n_verify` per found input; `checkpoints`
    (budgets) give the ASR-vs-budget curve. `lr`: Adam's step for the embedding search (default 0.05) or the
    relearn fine-tune (default 1e-4); a GAN's W+ projection keeps its own schedule and starts from
    1 + photo_starts + random_starts photos of the person."""
    from fastforget.identity.encoder import resolve_encoder
    from fastforget.models import load
    from fastforget.models.common import check_float, check_int, check_seed
    from fastforget.patch import fingerprint_embeddings
    from fastforget.verify import check_salt

    if kind not in KINDS:
        raise InputError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    seed = check_seed(seed, 2 ** 20, "seed")
    if not isinstance(progress, bool):
        raise InputError(f"progress: expected True or False, got {progress!r}")
    check_salt(salt)
    n_verify = check_int(n_verify, "n_verify", 1, 1000)
    steps = check_int(steps, "steps", 1, 1000)
    photo_starts = check_int(photo_starts, "photo_starts", 0, 64)
    random_starts = check_int(random_starts, "random_starts", 0, 64)
    if threshold is not None:
        threshold = check_float(threshold, "threshold")
        if not -1.0 < threshold < 1.0:
            raise InputError(f"threshold: a cosine in (-1, 1), got {threshold}")
    model = load(model)
    baseline = load(baseline) if baseline is not None else None
    is_gan = hasattr(model, "synthesis")
    family = getattr(model, "family", type(model).__name__)
    if baseline is not None and hasattr(baseline, "synthesis") != is_gan:
        raise InputError("baseline: must be the same family as model (the unedited version of it)")
    if not is_gan and not (hasattr(model, "condition") or hasattr(model, "id_tokens")):
        raise InputError(f"model: attacks regenerate an identity, which this {family} model cannot (it has no "
                         "identity conditioning)")
    if kind == "relearn" and not hasattr(model, "condition"):
        raise InputError(f"kind: relearn fine-tunes an Arc2Face-family model's identity path; not available for "
                         f"this {family} model")
    defaults = GAN_DEFAULT_BUDGET if is_gan else DEFAULT_BUDGET
    budget = defaults[kind] if budget is None else check_int(budget, "budget", 1, MAX_BUDGET)
    cps = _checkpoints(budget, checkpoints) if kind != "neighbours" else [budget]
    lr = None if lr is None else check_float(lr, "lr", 0.0)
    encoder = resolve_encoder(encoder, model, "attack")
    if kind in ("embedding", "relearn") and not encoder.differentiable:
        raise InputError(f"encoder: {encoder.name} gives no gradients (ONNX Runtime); the {kind} attack scores "
                         "generations inside the optimisation and needs a differentiable encoder")
    # ---- cheap checks done; now the work
    t0 = time.perf_counter()
    thr = verification_threshold(encoder) if threshold is None else threshold
    tg = resolve_targets(targets, encoder, seed=seed, need_images=is_gan or kind == "relearn")
    models = [("attacked", model)] + ([("unedited", baseline)] if baseline is not None else [])
    rows = []
    if is_gan:
        from fastforget.attacks import gan

        for label, m in models:
            if kind == "embedding":
                rows.append(gan.run_embedding(m, encoder, tg, budget=budget, checkpoints=cps, threshold=thr,
                                              seed=seed, n_starts=1 + photo_starts + random_starts,
                                              progress=progress, label=label))
            else:
                rows.append(gan.run_neighbours(m, encoder, tg, per_level=budget, threshold=thr, seed=seed,
                                               progress=progress, label=label, source=baseline))
    elif kind == "embedding":
        from fastforget.attacks import diffusion

        for label, m in models:
            rows.append(diffusion.run_embedding(m, encoder, tg, budget=budget, checkpoints=cps, threshold=thr,
                                                seed=seed, n_verify=n_verify, steps=steps, n_photo=photo_starts,
                                                n_random=random_starts, progress=progress, label=label,
                                                **({} if lr is None else {"lr": lr})))
    elif kind == "neighbours":
        from fastforget.attacks import diffusion

        for label, m in models:
            rows.append(diffusion.run_neighbours(m, encoder, tg, per_level=budget, threshold=thr, seed=seed,
                                                 n_verify=1, steps=steps, progress=progress, label=label))
    else:
        rows = _relearn(model, baseline, encoder, tg, budget=budget, checkpoints=cps, threshold=thr, seed=seed,
                        n_verify=n_verify, steps=steps, lr=lr, progress=progress)
    details = {"family": family, "budget": budget, "seed": seed, "n_verify": n_verify, "sampling_steps": steps,
               "curve_unit": {"embedding": "W+ steps" if is_gan else "Adam steps",
                              "neighbours": "mix with the target's latent" if is_gan else "cosine to the target",
                              "relearn": "fine-tuning steps"}[kind],
               "targets": fingerprint_embeddings(torch.stack([t["centroid"] for t in tg]), salt),
               "threshold_source": "testbed calibration: 1000 held-out identities x 4 photos" if threshold is None
               else "given", "seconds": time.perf_counter() - t0}
    return AttackReport(kind, rows, thr, FAR, details)


def _relearn(model, baseline, encoder, tg, *, budget, checkpoints, threshold, seed, n_verify, steps, lr, progress):
    """On the attacked model: (b) 3 photos of the target (the first row: the report's ASR), (a) other people
    only; with a baseline on the testbed, (c) the unedited model taught a stranger, scored against the stranger."""
    from fastforget.attacks.diffusion import RELEARN_LR, relearn_curve
    from fastforget.identity.encoder import TestbedEncoder
    from fastforget.testbed import render

    lr = RELEARN_LR if lr is None else lr
    kw = dict(budget=budget, checkpoints=checkpoints, threshold=threshold, seed=seed, n_verify=n_verify,
              steps=steps, lr=lr, progress=progress)
    testbed_world = isinstance(encoder, TestbedEncoder)
    rows = []
    for ti, t in enumerate(tg):
        three = t["images"][:3]
        if testbed_world:  # other people: 8 held-out testbed identities x 2 photos (ids never used elsewhere)
            others, _ = render(np.arange(900_000 + 8 * ti, 900_008 + 8 * ti), 2, seed=seed)
            others = list(others)
        else:  # the other targets' photos are the only other people at hand
            others = [im for j, u in enumerate(tg) if j != ti for im in u["images"]]
        rows_t = [relearn_curve(model, encoder, three, encoder.encode(np.stack(three)), t["centroid"],
                                label="attacked + 3 target photos", **kw)]
        if others:
            rows_t.append(relearn_curve(model, encoder, others, encoder.encode(np.stack(others)), t["centroid"],
                                        label="attacked + other people", **kw))
        if baseline is not None and testbed_world:
            s_ims, _ = render(np.array([950_000 + ti]), 8, seed=seed)
            s_emb = encoder.encode(s_ims)
            rows_t.append(relearn_curve(baseline, encoder, list(s_ims[:3]), s_emb[:3],
                                        F.normalize(s_emb.mean(0), dim=0), label="unedited + 3 stranger photos",
                                        **kw))
        rows.append(rows_t)
    if len(rows) == 1:
        return rows[0]
    merged = []  # several targets: pool each setting's generations
    for j, r0 in enumerate(rows[0]):
        parts = [r[j] for r in rows]
        curve = []
        for ci, c in enumerate(r0["curve"]):
            w = [p["curve"][ci] for p in parts]
            curve.append({"budget": c["budget"], "asr": float(np.mean([x["asr"] for x in w])),
                          "best_similarity": max(x["best_similarity"] for x in w),
                          "mean_similarity": float(np.mean([x["mean_similarity"] for x in w]))})
        merged.append({**r0, "asr": curve[-1]["asr"], "best_similarity": max(p["best_similarity"] for p in parts),
                       "verified": sum(p["verified"] for p in parts),
                       "generations": sum(p["generations"] for p in parts), "curve": curve})
    return merged


__all__ = ["attack", "AttackReport", "verification_threshold", "KINDS"]
