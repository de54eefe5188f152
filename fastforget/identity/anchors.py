"""Anchor identities (who a target turns into) and preservation galleries."""
from __future__ import annotations

import torch

from fastforget.errors import ConflictError, InputError
from fastforget.identity.embeddings import SAME_PERSON_COS  # pool entries this close to a target are the target


def select_anchors(targets: torch.Tensor, pool: torch.Tensor, *, tau: float = 0.2, delta: float = 0.01,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PIU's rule (`data.py::select_anchor_embedding`): among pool identities with
    |cos(pool, target) − tau| < delta pick one at random under the seed; if none, the one
    nearest to tau. A moderately similar person, not the nearest. Returns (anchors, pool indices)."""
    if not -1.0 <= float(tau) < SAME_PERSON_COS:
        raise InputError(f"anchor_tau: {tau} is not a cosine below {SAME_PERSON_COS} (PIU uses 0.2)")
    if pool is None or len(pool) == 0:
        raise InputError("anchor='auto' needs a pool of identities (retain or a preservation gallery)")
    # the rule needs every pool entry's cosine (the band may hold entries ranked anywhere), so this is
    # one exact float64 product, not a top-k: pools are galleries of thousands, milliseconds here
    sim = targets.double() @ pool.double().T
    scores, idx = sim.sort(dim=1, descending=True, stable=True)
    scores = scores.float()
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for i in range(len(targets)):
        s, j = scores[i], idx[i]
        ok = s < SAME_PERSON_COS
        band = ((s - tau).abs() < delta) & ok
        if band.any():
            cand = j[band]
            chosen.append(int(cand[torch.randint(len(cand), (1,), generator=g)]))
        elif ok.any():
            gap = torch.where(ok, (s - tau).abs(), torch.full_like(s, float("inf")))
            chosen.append(int(j[gap.argmin()]))
        else:
            raise InputError(f"targets[{i}]: every pool identity is the same person (cos >= {SAME_PERSON_COS})")
    chosen = torch.tensor(chosen, dtype=torch.long)
    return pool[chosen], chosen


def check_request(targets: torch.Tensor, anchors: torch.Tensor | None, retain: torch.Tensor | None) -> None:
    """Typed errors for self-contradicting requests."""
    if retain is not None and len(retain):
        sim = targets @ retain.T
        hit = (sim > 0.999).nonzero()
        if len(hit):
            i, j = hit[0].tolist()
            raise ConflictError(f"targets[{i}] is also in retain (retain[{j}]): a person cannot be both "
                                "forgotten and retained")
    if anchors is not None:
        if anchors.shape != targets.shape:
            raise InputError(f"anchor: expected one embedding per target, shape {tuple(targets.shape)}, "
                             f"got {tuple(anchors.shape)}")
        same = ((anchors * targets).sum(1) > 0.999).nonzero().flatten()
        if len(same):
            raise ConflictError(f"anchor[{int(same[0])}] equals targets[{int(same[0])}]: the anchor must be "
                                "someone else")


_GALLERY_CACHE: dict = {}


def testbed_gallery(encoder, n: int = 2000, first_id: int = 900_000, seed: int = 0) -> torch.Tensor:
    """Embeddings of n testbed identities reserved for preservation (never used by benchmarks).
    Cached per encoder object: erase() calls it on every request."""
    from fastforget.testbed import render

    key = (id(encoder), n, first_id, seed)
    if key in _GALLERY_CACHE and _GALLERY_CACHE[key][0] is encoder:
        return _GALLERY_CACHE[key][1]
    out = []
    for i in range(0, n, 500):
        ims, _ = render(range(first_id + i, first_id + min(n, i + 500)), 1, seed=seed + i)
        out.append(encoder.encode(ims))
    gallery = torch.cat(out)
    _GALLERY_CACHE.clear()  # one gallery at a time is enough; keeps memory flat
    _GALLERY_CACHE[key] = (encoder, gallery)
    return gallery
