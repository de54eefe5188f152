"""BIA's edit mode, as the public code does it: images are edited in h-space, weights never are."""
from __future__ import annotations

import numpy as np
import torch

from fastforget.methods.bia.config import EDIT_KEYS, resolve_options
from fastforget.methods.bia.region import as_sources, build_region, load_encoder, push_codes
from fastforget.models.diffusion import HSpace


def bia_edit(model, image_or_embedding, encoder=None, *, seed: int = 0, progress: bool = False,
             **options) -> dict:
    """BIA as the public code does it: edit images, never weights.

    `image_or_embedding`: images (uint8 (N, H, W, 3), paths, PIL, or a float tensor (N, 3, H, W) in
    [-1, 1]) or identity embeddings (N, 512), rendered by `model` at `seed` (ID-conditioned models).
    Returns a dict: `images` (N, K, 3, H, W) in [-1, 1] (K = k_nearest pushed codes per source),
    `accepted` (N, K) bool, `crossed` (N, K) bool (the final code is outside the region),
    `wrapper_loss`, `push` (h units), `tries`, `identity_cos` (N, K) to the source, `sources`,
    `reconstructions` (unedited decode of the inverted source), `regions` (summaries), `config`, and
    `acceptance_rate` / `accepted_identity_cos` (mean cosine of the accepted edits to their source; NaN if none)."""
    from fastforget.svm import nearest_to_hyperplane, sample_neighbors

    cfg = resolve_options(options, allowed=EDIT_KEYS)
    encoder = load_encoder(encoder, model)
    hs = HSpace(model)
    sources, origin = as_sources(hs, image_or_embedding, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("images", "accepted", "crossed", "wrapper_loss", "push", "tries", "identity_cos",
                           "reconstructions", "regions")}
    for i in range(len(sources)):
        src = sources[i:i + 1]
        region = build_region(hs, src, encoder, cfg, seed=seed + 17 * i, progress=progress, source_seed=seed + i)
        out["reconstructions"].append(hs.generate_from(region.x_t0, cfg["t0"], cfg["decode_steps"]))
        # the walk: resample M codes, keep the K nearest the hyperplane, push them across
        nb = sample_neighbors(region.h_r, cfg["neighbours"], 1.0, region.radius, seed=seed + 17 * i + 1)
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
    acc = result["accepted"]
    result["acceptance_rate"] = float(acc.float().mean())
    result["accepted_identity_cos"] = float(result["identity_cos"][acc].mean()) if acc.any() else float("nan")
    return result
