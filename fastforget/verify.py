"""verify() and its Report: the papers' metrics for any erased model. Imports no method."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import EmbeddingError, InputError
from fastforget.identity.embeddings import check_embeddings, to_embeddings, to_uint8, unit_vectors_at_cosine


# verify draws n images per identity at seed + i (retain at +10,000, ...): more per identity than that is no
# measurement, only hours of sampling and gigabytes of conditioning states
MAX_PER_IDENTITY = 10_000


def check_salt(salt) -> str:
    if not isinstance(salt, str) or not salt:
        raise InputError(f"salt: expected a non-empty string, got {salt!r}")
    return salt


# ---------------------------------------------------------------- report
@dataclass
class Report:
    metrics: dict
    details: dict = field(default_factory=dict)
    grid: np.ndarray | None = None  # uint8 image: before/after generations

    def to_json(self) -> str:
        return json.dumps({"metrics": self.metrics, **self.details}, indent=2, sort_keys=True, default=float)

    def save(self, directory, overwrite: bool = True) -> Path:
        """report.json (+ report.png, the before/after grid) into `directory`, each written atomically."""
        import io

        from fastforget.io import atomic_write_bytes

        directory = Path(directory)
        atomic_write_bytes(directory / "report.json", self.to_json().encode(), overwrite=overwrite)
        if self.grid is not None:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(self.grid).save(buf, format="PNG")
            atomic_write_bytes(directory / "report.png", buf.getvalue(), overwrite=overwrite)
        return directory

    def table(self) -> str:
        keys = ["ism_f", "ism_r", "acc_u", "acc_r", "srk", "neighbour_ism", "stranger_ism", "drift"]
        return "  ".join(f"{k}={self.metrics[k]:.3f}" for k in keys if self.metrics.get(k) is not None)

    def __getitem__(self, k):
        return self.metrics[k]


def _upscale(tiles: np.ndarray, scale: int) -> np.ndarray:
    return tiles.repeat(scale, axis=-3).repeat(scale, axis=-2) if scale > 1 else tiles


def image_grid(rows: list[np.ndarray], scale: int = 3) -> np.ndarray:
    """rows: each (k, H, W, 3) uint8 -> one picture, rows stacked, 2-px white gutters."""
    h, w = rows[0].shape[1:3]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + 2) + 2, ncol * (w + 2) + 2, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            canvas[2 + i * (h + 2):2 + i * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = t
    return _upscale(canvas, scale)


@torch.no_grad()
def verify(model, targets, retain=None, encoder=None, n: int = 25, seed: int = 0, *, baseline=None,
           steps: int = 25, guidance: float = 3.0, neighbours: int = 8, strangers=None,
           target_ids=None, anchors=None, salt: str = "fastforget", others=None,
           protocol: str = "generation") -> Report:
    """Measure how well `targets` are forgotten and `retain` kept (the papers' metrics).

    ISM_f / ISM_r: cosine of generations to the identity's centroid; AccU / AccR: nearest-centroid
    accuracy among targets ∪ retain (∪ strangers); SRK = AccR / (AccU + 0.01); neighbour ISM:
    generations from embeddings at cos 0.7–0.9 of a target, scored against the target; stranger
    ISM: generations of other identities scored against the targets (the floor); drift: mean
    absolute pixel change (0–1 scale) of retained generations vs `baseline` at the same seeds.

    `anchors` (the identities the targets were mapped to, as `erase` chose them) join the
    candidate classes, as in PIU's protocol where the anchor is one of the retained identities:
    a generation that became the anchor counts as the anchor, not as the target. They also give
    `anchor_ism`: generations of the anchors scored against their targets, the level an
    anchor-replacement method's neighbour ISM can go down to (PIU's anchors sit at cos 0.2).

    A StyleGAN2 (a model with a synthesis network) is measured as GUIDE measures it
    (fastforget.verify_gan): targets and `others` are photos of the forgotten person(s), `retain`
    photos of other people, `baseline` the unedited generator (required), 20·n random latents and
    80·n samples for FD_pre.

    `protocol="reconstruction"` measures a diffusion model as BIA does (see `verify_reconstruction`):
    `targets` are photos of the forgotten person (the first one the source), `others` more photos of the
    person, `retain` photos of other people; `baseline` (the unedited model) is required."""
    from fastforget.identity.encoder import resolve_encoder
    from fastforget.metrics import identity_scores
    from fastforget.models import load
    from fastforget.models.common import check_int, check_sampling, check_seed
    from fastforget.patch import fingerprint_embeddings

    n = check_int(n, "n", 1, MAX_PER_IDENTITY)
    neighbours = check_int(neighbours, "neighbours", 1, MAX_PER_IDENTITY)
    seed = check_seed(seed, 2 ** 20, "seed")  # verify draws images at seed + offsets up to 50,000 + N
    steps, guidance = check_sampling(steps, guidance)
    check_salt(salt)
    if protocol not in ("generation", "reconstruction"):
        raise InputError(f"protocol: expected 'generation' or 'reconstruction', got {protocol!r}")
    model = load(model)
    baseline = load(baseline) if baseline is not None else None
    if protocol == "reconstruction":
        if baseline is None:
            raise InputError("baseline: the reconstruction protocol inverts photos with the unedited model; pass it")
        return verify_reconstruction(model, targets, baseline=baseline, encoder=resolve_encoder(encoder, model, "verify"),
                                     others=others, retain=retain, seed=seed)
    if hasattr(model, "synthesis"):  # a latent generator (StyleGAN2): GUIDE's protocol, see verify_gan
        from fastforget.verify_gan import verify_gan

        return verify_gan(model, targets, baseline=baseline, encoder=resolve_encoder(encoder, model, "verify"),
                          others=others, retain=retain, n=20 * n, fd_n=80 * n, seed=seed)
    for what, m in (("model", model), ("baseline", baseline)):
        if m is not None and not (hasattr(m, "condition") or hasattr(m, "id_tokens")):  # Arc2Face, portrait models
            raise InputError(f"{what}: verify generates identities, which this {getattr(m, 'family', '')} model "
                             "cannot (it has no identity conditioning)")
    encoder = resolve_encoder(encoder, model, "verify")
    t0 = time.perf_counter()
    tgt = to_embeddings(targets, encoder, "targets", seed=seed)
    ret = to_embeddings(retain, encoder, "retain", seed=seed) if retain is not None else None
    strg = to_embeddings(strangers, encoder, "strangers", seed=seed) if strangers is not None else None
    anc = check_embeddings(anchors, name="anchors") if anchors is not None else None
    if target_ids is not None:  # testbed ids of the targets (other renders of them are scored)
        from fastforget.identity.embeddings import is_id_list

        ids = [int(v) for v in np.atleast_1d(np.asarray(target_ids, dtype=object))] if is_id_list(target_ids) else []
        if len(ids) != len(tgt) or not all(0 <= v < 2 ** 63 for v in ids):
            raise InputError(f"target_ids: expected one testbed identity id (an integer >= 0) per target "
                             f"({len(tgt)}), got {target_ids!r}")
        target_ids = ids
    if anc is not None and anc.shape != tgt.shape:
        raise EmbeddingError(f"anchors: expected one per target ({tuple(tgt.shape)}), got {tuple(anc.shape)}")
    k = len(tgt)
    cents = [tgt] + [x for x in (ret, strg, anc) if x is not None]
    cents = torch.cat(cents)
    labels_all = torch.arange(len(cents))

    def gen(m, emb, s):
        return m.generate_tensor(emb.repeat_interleave(n, 0), seed=s, steps=steps, guidance=guidance)

    def enc(x):
        return encoder.encode_tensor(x)

    metrics, timings = {}, {}
    ts = time.perf_counter()
    g_f = gen(model, tgt, seed)
    timings["generate_targets_s"] = time.perf_counter() - ts
    s_f = identity_scores(enc(g_f), labels_all[:k].repeat_interleave(n), cents, labels_all)
    metrics.update(ism_f=s_f["ism"], acc_u=s_f["accuracy"])
    if ret is not None:
        g_r = gen(model, ret, seed + 10_000)
        s_r = identity_scores(enc(g_r), labels_all[k:k + len(ret)].repeat_interleave(n), cents, labels_all)
        metrics.update(ism_r=s_r["ism"], acc_r=s_r["accuracy"])
        metrics["srk"] = metrics["acc_r"] / (metrics["acc_u"] + 0.01)
    else:
        g_r = None
        metrics.update(ism_r=None, acc_r=None, srk=None)
    # neighbours: embeddings at cos 0.7-0.9 of each target, one generation each
    nb = unit_vectors_at_cosine(tgt, neighbours, (0.7, 0.9), seed=seed + 7)
    g_nb = model.generate_tensor(nb, seed=seed + 20_000, steps=steps, guidance=guidance)
    e_nb = enc(g_nb).view(k, neighbours, -1)
    metrics["neighbour_ism"] = (e_nb * tgt[:, None]).sum(-1).mean().item()
    if target_ids is not None:  # other photos of the target (testbed renders)
        from fastforget.testbed import render

        ims, _ = render(np.atleast_1d(target_ids), 4, seed=seed + 99)
        other = encoder.encode(ims).view(k, 4, -1).mean(1)
        g_o = model.generate_tensor(F.normalize(other, dim=1), seed=seed + 30_000, steps=steps, guidance=guidance)
        metrics["other_photo_ism"] = (enc(g_o) * tgt).sum(-1).mean().item()
    # stranger floor: generations of identities that are not the targets, scored against the targets
    floor_src = strg if strg is not None else ret
    if floor_src is None:
        floor_src = F.normalize(torch.randn(8, tgt.shape[1], generator=torch.Generator().manual_seed(seed + 5)), dim=1)
    g_s = model.generate_tensor(floor_src, seed=seed + 40_000, steps=steps, guidance=guidance)
    metrics["stranger_ism"] = (enc(g_s) @ tgt.T).mean().item()
    if anc is not None:
        src = baseline if baseline is not None else model  # the anchors as the unedited model draws them
        g_a = src.generate_tensor(anc, seed=seed + 50_000, steps=steps, guidance=guidance)
        metrics["anchor_ism"] = (enc(g_a) * tgt).sum(-1).mean().item()
    grid_rows = []
    if baseline is not None:
        b_f = gen(baseline, tgt, seed)
        metrics["ism_f_before"] = (enc(b_f).view(k, n, -1) * tgt[:, None]).sum(-1).mean().item()
        grid_rows += [to_uint8(b_f[i * n:(i + 1) * n]) for i in range(min(k, 4))]
        grid_rows += [to_uint8(g_f[i * n:(i + 1) * n]) for i in range(min(k, 4))]
        if ret is not None:
            b_r = gen(baseline, ret, seed + 10_000)
            metrics["drift"] = ((g_r - b_r).abs().mean() / 2).item()
            metrics["retain_cos_to_before"] = (enc(g_r) * enc(b_r)).sum(-1).mean().item()
            grid_rows += [to_uint8(b_r[:n]), to_uint8(g_r[:n])]
        else:
            metrics["drift"] = None
    else:
        metrics["drift"] = None
        grid_rows = [to_uint8(g_f[i * n:(i + 1) * n]) for i in range(min(k, 4))]
    timings["total_s"] = time.perf_counter() - t0
    grid = None
    if grid_rows:  # portrait generators: rows and columns labelled
        grid = _labelled_portrait_grid(grid_rows, min(k, 4), baseline is not None, ret is not None, n) \
            if hasattr(model, "id_tokens") else image_grid(grid_rows)
    details = {"n_per_identity": n, "steps": steps, "guidance": guidance, "seed": seed, "timings": timings,
               "targets": fingerprint_embeddings(tgt, salt), "n_retain": 0 if ret is None else len(ret),
               "grid_rows": "rows 1..k: targets before; then targets after; then retain[0] before / after"
               if baseline is not None else "targets after"}
    return Report(metrics, details, grid)


def _labelled_portrait_grid(rows: list, k: int, before_after: bool, retained: bool, n: int) -> np.ndarray:
    """verify's rows (targets before, targets after, retain[0] before / after), each row and column labelled
    (fastforget.verify_gan.labelled_grid); sample j of a row before and after uses the same seed."""
    from fastforget.verify_gan import labelled_grid

    if before_after:
        labels = [f"target {i} before" for i in range(k)] + [f"target {i} after" for i in range(k)]
        labels += ["retained before", "retained after"] if retained else []
    else:
        labels = [f"target {i} after" for i in range(k)]
    return labelled_grid(rows, labels, [f"sample {j + 1}" for j in range(n)], scale=3)




# ---------------------------------------------------------------- BIA's protocol: inversion and reconstruction
def _photo_tensor(photos, name: str, resolution: int) -> torch.Tensor:
    """Photos (paths, PIL, uint8 arrays) -> (N, 3, R, R) float in [-1, 1] at the model's resolution."""
    from fastforget.identity.encoder import as_image_batch

    arrs = as_image_batch(photos, name=name)
    out = []
    for a in arrs:
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 127.5 - 1
        if t.shape[-1] != resolution or t.shape[-2] != resolution:
            t = F.interpolate(t, size=(resolution, resolution), mode="area" if t.shape[-1] > resolution else "bilinear")
        out.append(t)
    return torch.cat(out)


@torch.no_grad()
def verify_reconstruction(model, photos, *, baseline, encoder, others=None, retain=None, seed: int = 0,
                          t0: int = 500, steps: int = 40, n_random: int = 32, fd_n: int = 1000,
                          fd_steps: int = 10, chunk: int = 64, progress: bool = False) -> Report:
    """BIA's measurement on the unconditional path (the null condition of an ID-conditioned model, or an
    unconditional UNet): each photo is DDIM-inverted (η = 0) to t0 in `steps` steps by the unedited
    `baseline`, then regenerated by `baseline` (before) and by `model` (after); the identity cosine of each
    regeneration to its photo is reported.

    `photos`: the forgotten person (the first is the source); `others`: more photos of the person (the
    black hole must catch the person, not one picture); `retain`: other people. Also: `n_random` samples
    from pure noise at fixed seeds (cosine after vs before, `steps` steps) and the Fréchet distance between
    encoder features of `fd_n` samples before and after (`fd_steps` steps, seeds 100,000 + i). Stranger
    floor: mean cosine of the other people's photos to the person's photos. Only cosines and distances are
    reported, never images or embeddings."""
    from tqdm import tqdm

    from fastforget.models.common import check_int
    from fastforget.models.diffusion import HSpace
    from fastforget.verify_gan import frechet_distance

    n_random = check_int(n_random, "n_random", 0, MAX_PER_IDENTITY)
    fd_n = check_int(fd_n, "fd_n", 0, 100_000)
    t_start = time.perf_counter()
    before, after = HSpace(baseline), HSpace(model)
    res = before.resolution
    groups = {"source": _photo_tensor(photos, "targets", res)[:1]}
    rest = _photo_tensor(photos, "targets", res)[1:]
    if others is not None:
        rest = torch.cat([rest, _photo_tensor(others, "others", res)])
    if len(rest):
        groups["other_photos"] = rest
    if retain is not None:
        groups["retain"] = _photo_tensor(retain, "retain", res)

    def embed(x):
        return F.normalize(torch.cat([encoder.encode_tensor(x[i:i + chunk]).float().cpu()
                                      for i in range(0, len(x), chunk)]), dim=1)

    metrics, per = {}, {}
    person = embed(torch.cat([groups["source"]] + ([groups["other_photos"]] if "other_photos" in groups else [])))
    for name, x in groups.items():
        x_t0 = before.invert(before.encode(x, seed=seed), t0, steps)
        e = embed(x)
        cos_b = (embed(before.generate_from(x_t0, t0, steps, chunk=chunk)) * e).sum(1)
        cos_a = (embed(after.generate_from(x_t0, t0, steps, chunk=chunk, unet=after.unet)) * e).sum(1)
        metrics[f"{name}_cos_before"] = cos_b.mean().item()
        metrics[f"{name}_cos"] = cos_a.mean().item()
        per[name] = {"before": [round(v, 4) for v in cos_b.tolist()], "after": [round(v, 4) for v in cos_a.tolist()]}
        if name == "retain":
            ratio = cos_a / cos_b.clamp_min(1e-6)
            metrics["retain_ratio"] = (cos_a.mean() / cos_b.mean()).item()
            metrics["retain_ratio_min"] = ratio.min().item()
            metrics["stranger_cos"] = (e @ person.T).mean().item()
    if "stranger_cos" not in metrics:  # no other people given: the model's own random samples are the strangers
        metrics["stranger_cos"] = None
    shape = before.encode(groups["source"]).shape[1:]

    def samples(hs, n, n_steps, seed0, unet):
        out = []
        for i in tqdm(range(0, n, chunk), desc="verify samples", disable=not progress, leave=False):
            z = torch.stack([torch.randn(*shape, generator=torch.Generator().manual_seed(seed0 + j))
                             for j in range(i, min(n, i + chunk))]).to(hs.device)
            out.append(embed(hs.generate_from(z, hs.num_train_timesteps - 1, n_steps, chunk=chunk, unet=unet)))
        return torch.cat(out) if out else torch.zeros(0, 512)

    if n_random:
        r_b = samples(before, n_random, steps, seed + 60_000, before.unet)
        r_a = samples(after, n_random, steps, seed + 60_000, after.unet)
        metrics["random_cos"] = (r_a * r_b).sum(1).mean().item()
        if metrics["stranger_cos"] is None:
            metrics["stranger_cos"] = (r_b @ person.T).mean().item()
    if fd_n >= 2:
        f_b = samples(before, fd_n, fd_steps, seed + 100_000, before.unet)
        f_a = samples(after, fd_n, fd_steps, seed + 100_000, after.unet)
        metrics["fd"] = frechet_distance(f_b, f_a)
        # the same distance between two disjoint halves of the "before" samples: what sampling noise alone gives
        metrics["fd_floor"] = frechet_distance(f_b[: fd_n // 2], f_b[fd_n // 2:]) if fd_n >= 4 else None
    details = {"protocol": "reconstruction (BIA: DDIM η = 0 inversion with the unedited model, unconditional "
                           "branch)", "t0": t0, "steps": steps, "n_random": n_random, "fd_n": fd_n,
               "fd_steps": fd_steps, "seed": seed, "per_photo": per,
               "timings": {"total_s": time.perf_counter() - t_start}}
    return Report(metrics, details)
