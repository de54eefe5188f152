"""Anchor identities (who a target turns into) and preservation galleries."""
from __future__ import annotations

import os

import torch

from fastforget.errors import ConflictError, InputError
from fastforget.identity.embeddings import SAME_PERSON_COS  # pool entries this close to a target are the target


POOL_TILE = 65536  # pool rows scored at a time: a pool on disk (a gallery file) is streamed, never loaded


def select_anchors(targets: torch.Tensor, pool, *, tau: float = 0.2, delta: float = 0.01,
                   seed: int = 0, group_seeds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """PIU's rule (`data.py::select_anchor_embedding`): among pool identities with
    |cos(pool, target) − tau| < delta pick one at random under the seed; if none, the one
    nearest to tau. A moderately similar person, not the nearest. Returns (anchors, pool indices).

    `pool`: (M, D) embeddings, or a gallery file (`ff.gallery.open(path)`, or its path) of any size,
    read POOL_TILE rows at a time; the same rows give the same anchors either way. Candidates are
    taken in order of float64 cosine, highest first, ties to the lower index.

    `group_seeds`: [(seed, rows), ...] covering the targets in order: each group draws from its own generator,
    so one call over many requests equals one call per request with that request's seed."""
    from fastforget.identity.embeddings import check_embeddings
    from fastforget.identity.gallery import GalleryFile, is_gallery_file
    from fastforget.kernels.proximity import _source

    if not -1.0 <= float(tau) < SAME_PERSON_COS:
        raise InputError(f"anchor_tau: {tau} is not a cosine below {SAME_PERSON_COS} (PIU uses 0.2)")
    if isinstance(pool, (str, os.PathLike)):
        if not is_gallery_file(pool):
            raise InputError(f"anchor pool {pool}: not a gallery file (write one with ff.gallery.save(path, emb, "
                             "dtype='float16' | 'int8'))")
        pool = GalleryFile(pool)
    if pool is None or len(pool) == 0:
        raise InputError("anchor='auto' needs a pool of identities (retain or a preservation gallery)")
    src = _source(pool)
    if src.shape[1] != targets.shape[1]:
        raise InputError(f"anchor pool: embeddings of size {src.shape[1]}, targets have {targets.shape[1]}")
    # the rule needs every pool entry's cosine (the band may hold entries ranked anywhere): one exact
    # float64 product per tile, keeping per target the band and the entry nearest to tau
    t64 = targets.double()
    band = [[] for _ in range(len(targets))]  # (float64 scores, indices) per tile
    near = [None] * len(targets)  # (gap, -score, index) of the entry nearest to tau so far
    for n0 in range(0, src.shape[0], POOL_TILE):
        idx = torch.arange(n0, min(n0 + POOL_TILE, src.shape[0]))
        vals = src.gather_rows(idx) if not isinstance(pool, torch.Tensor) else pool[n0:n0 + POOL_TILE].double()
        if not isinstance(pool, torch.Tensor):  # stored rows of a file: unit-scaled as embeddings are
            vals = check_embeddings(vals, dim=src.shape[1], name=f"{src.name} rows {n0}..").double()
        sim = t64 @ vals.T
        s32 = sim.float()  # PIU compares float32 cosines
        ok = s32 < SAME_PERSON_COS
        in_band = ((s32 - tau).abs() < delta) & ok
        gap = torch.where(ok, (s32 - tau).abs(), torch.full_like(s32, float("inf")))
        for i in range(len(targets)):
            if in_band[i].any():
                band[i].append((sim[i][in_band[i]], idx[in_band[i]]))
            elif not band[i] and ok[i].any():
                g = gap[i]
                best = (g == g.min()).nonzero().flatten()
                j = best[sim[i][best].argmax()]  # equal gaps: the higher score, then the lower index
                cand = (float(g[j]), -float(sim[i][j]), int(idx[j]))
                near[i] = cand if near[i] is None or cand < near[i] else near[i]
    groups = [(seed, len(targets))] if group_seeds is None else [(int(a), int(b)) for a, b in group_seeds]
    if sum(b for _, b in groups) != len(targets):
        raise InputError(f"group_seeds: the groups cover {sum(b for _, b in groups)} rows, targets has {len(targets)}")
    owner = [g for g, (_, b) in enumerate(groups) for _ in range(b)]
    gens = {}
    chosen = []
    for i in range(len(targets)):
        gen = gens.get(owner[i])
        if gen is None:
            gen = gens[owner[i]] = torch.Generator().manual_seed(groups[owner[i]][0])
        if band[i]:
            sc = torch.cat([b[0] for b in band[i]])
            j = torch.cat([b[1] for b in band[i]])
            order = (-sc).argsort(stable=True)  # tiles arrive in index order: ties stay lower index first
            cand = j[order]
            chosen.append(int(cand[torch.randint(len(cand), (1,), generator=gen)]))
        elif near[i] is not None:
            chosen.append(near[i][2])
        else:
            raise InputError(f"targets[{i}]: every pool identity is the same person (cos >= {SAME_PERSON_COS})")
    chosen = torch.tensor(chosen, dtype=torch.long)
    if isinstance(pool, torch.Tensor):
        return pool[chosen], chosen
    return check_embeddings(src.gather_rows(chosen), dim=src.shape[1], name=src.name), chosen


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
