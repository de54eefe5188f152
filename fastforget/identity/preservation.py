"""Preservation sets: the many identities nobody named that an edit must leave where they are.

With a face gallery at hand, pass it (`preserve=` embeddings, `ff.gallery.from_folder`, a .npy, or a
gallery file of any size: `from_gallery_file`). Without
one, the default is built from what the model and the encoder give: the generator draws faces from
random identity vectors and the caller's encoder re-encodes them (these lie where the encoder puts
faces; random unit vectors do not: face embeddings fill a small part of the sphere), and samples of a
zero-mean Gaussian with the drawn set's covariance are added (drawn faces share a bias that real
people do not; see `gaussian_samples`), and 6,000 random unit vectors: any unit vector is an input a
caller may send, and on a model whose drawn faces carry little structure (random weights) they are
what keeps unnamed inputs in place (unnamed movement 0.30 -> 0.11 there; no loss on the testbed copy). The testbed (`ff.load("demo")`) uses 2,000 identities
reserved for it instead. Measured in benchmarks/preservation.py.

Computed once per (model weights, encoder, recipe) and cached on disk in the user's cache folder
($FASTFORGET_CACHE, else $XDG_CACHE_HOME/fastforget, else ~/.cache/fastforget), never inside the
model folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fastforget.identity.embeddings import random_unit_vectors

log = logging.getLogger("fastforget")

# measured on a copy of the testbed folder (benchmarks/preservation.py): see README "Preservation"
DEFAULT_RECIPE = {"drawn": 256, "draw_steps": 10, "draw_guidance": 3.0, "samples": 2000, "random": 6000, "seed": 0,
                  "version": 3}


@dataclass
class PreservationSet:
    embeddings: torch.Tensor      # (N, 512) unit: every identity held fixed
    anchor_pool: object           # (M, 512) tensor, or a GalleryFile: who a target may turn into
    kind: str                     # "gallery", "gallery file", "testbed", "drawn+random"
    key: str                      # cache key (hash of model weights, encoder and recipe)


def cache_dir() -> Path:
    root = os.environ.get("FASTFORGET_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fastforget"


def model_key(model) -> str:
    from fastforget.models.registry import module_fingerprint

    return module_fingerprint(*(getattr(model, part, None) for part in ("unet", "text_encoder", "vae")))


def from_gallery(embeddings: torch.Tensor) -> PreservationSet:
    key = hashlib.sha256(embeddings.detach().cpu().numpy().tobytes()).hexdigest()
    return PreservationSet(embeddings, embeddings, "gallery", key)


FILE_PRESERVE_ROWS = 10_000  # rows of a gallery file held fixed by the edit (the default set holds ~8,000)


def from_gallery_file(path, max_rows: int | None = None) -> PreservationSet:
    """A gallery file (`ff.gallery.save(..., dtype=...)`) of any size as the preservation set: every row
    when it holds at most `max_rows`, else `max_rows` evenly spaced rows (an edit's statistics need a
    sample of the people, not ten million of them); anchors are drawn from the whole file, streamed."""
    from fastforget.identity.embeddings import check_embeddings
    from fastforget.identity.gallery import GalleryFile

    g = GalleryFile(path)
    n, max_rows = g.shape[0], max_rows or FILE_PRESERVE_ROWS
    idx = torch.arange(n) if n <= max_rows else torch.linspace(0, n - 1, max_rows).round().long().unique()
    if n > max_rows:
        log.info("preserve %s: %d of its %d rows held fixed (evenly spaced); anchors come from all of them",
                 path, len(idx), n)
    emb = check_embeddings(g.gather_rows(idx), dim=g.shape[1], name=str(path))
    key = hashlib.sha256(str(g.shape).encode() + g.dtype.encode() + emb.numpy().tobytes()).hexdigest()
    return PreservationSet(emb, g, "gallery file", key)


def testbed_set(encoder) -> PreservationSet:
    from fastforget.identity.anchors import testbed_gallery

    g = testbed_gallery(encoder)
    return PreservationSet(g, g, "testbed", "testbed-" + encoder.fingerprint()[:16])


@torch.no_grad()
def drawn_identities(model, encoder, n: int, *, steps: int, guidance: float, seed: int, progress: bool = True,
                     batch: int = 16) -> torch.Tensor:
    """n embeddings of faces the model draws from random identity vectors, re-encoded by `encoder`."""
    from tqdm import tqdm

    z = random_unit_vectors(n, seed=seed + 1)
    out = []
    for i in tqdm(range(0, n, batch), desc="preservation set: drawing identities", disable=not progress,
                  leave=False):
        imgs = model.generate_tensor(z[i:i + batch], seed=seed + 10_000 + i, steps=steps, guidance=guidance)
        out.append(encoder.encode_tensor(imgs).detach().float().cpu())
    return F.normalize(torch.cat(out), dim=1)


def gaussian_samples(emb: torch.Tensor, n: int, seed: int = 0, shrink: float = 0.05) -> torch.Tensor:
    """n unit vectors from a zero-mean Gaussian with the covariance of `emb` (shrunk towards its mean
    variance so that directions the drawn faces did not reach keep a little mass).

    Why zero-mean: faces a generator draws from random identity vectors share a bias (testbed: mean
    pairwise cosine 0.13, |mean| 0.36), while an ArcFace encoder spreads real people around the origin
    (unrelated identities at cosine ~0; testbed gallery: 0.001). Their covariance does span where
    faces lie (85% of a real gallery's variance in the drawn set's top 25 directions, against 89% in the
    gallery's own), so the samples keep it and drop the bias."""
    if n <= 0:
        return emb.new_zeros((0, emb.shape[1]))
    x = emb.double()
    xc = x - x.mean(0)
    cov = xc.T @ xc / max(len(x) - 1, 1)
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(cov)
    root = evecs * evals.clamp_min(0).sqrt()
    z = torch.randn(n, x.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return F.normalize(z @ root.T, dim=1).float()


def default_set(model, encoder, *, progress: bool = True, recipe: dict | None = None,
                use_cache: bool = True) -> PreservationSet:
    """The default preservation set for `model` scored by `encoder` (see the module docstring)."""
    if getattr(model, "is_testbed", False):
        return testbed_set(encoder)
    recipe = {**DEFAULT_RECIPE, **(recipe or {})}
    key = hashlib.sha256(json.dumps({"model": model_key(model), "encoder": encoder.fingerprint(),
                                     "recipe": recipe}, sort_keys=True).encode()).hexdigest()
    path = cache_dir() / "preservation" / f"{key}.safetensors"
    if use_cache and path.is_file():
        try:
            from safetensors.torch import load_file

            t = load_file(str(path))
            return PreservationSet(t["embeddings"], t["anchor_pool"], "drawn+random", key)
        except Exception as exc:  # a damaged cache entry is recomputed, never trusted
            log.warning("preservation cache %s unreadable (%s); recomputing", path, exc)
    drawn = drawn_identities(model, encoder, recipe["drawn"], steps=recipe["draw_steps"],
                             guidance=recipe["draw_guidance"], seed=recipe["seed"], progress=progress) \
        if recipe["drawn"] else torch.zeros(0, 512)
    fitted = gaussian_samples(drawn, recipe["samples"], seed=recipe["seed"] + 3) if len(drawn) >= 2 \
        else torch.zeros(0, 512)
    rnd = random_unit_vectors(recipe["random"], seed=recipe["seed"] + 2)
    emb = torch.cat([drawn, fitted, rnd]).contiguous()
    if not len(emb):
        from fastforget.errors import InputError

        raise InputError("preserve: the recipe holds no identities (drawn, samples and random are all 0)")
    pool = drawn if len(drawn) else rnd
    if use_cache:
        _save(path, {"embeddings": emb, "anchor_pool": pool.contiguous()})
    return PreservationSet(emb, pool, "drawn+random", key)


def _save(path: Path, tensors: dict) -> None:
    """Best effort: a cache that cannot be written costs time, not correctness."""
    from safetensors.torch import save

    from fastforget.io import atomic_write_bytes

    try:
        atomic_write_bytes(path, save(tensors), overwrite=True)
    except OSError as exc:
        log.warning("cannot write the preservation cache %s (%s); it will be recomputed next time", path, exc)


def load_cached_tensor(name: str, key: str):
    from safetensors.torch import load_file

    path = cache_dir() / name / f"{key}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["value"]
        except Exception as exc:
            log.warning("cache %s unreadable (%s); recomputing", path, exc)
    return None


def save_cached_tensor(name: str, key: str, value: torch.Tensor) -> None:
    _save(cache_dir() / name / f"{key}.safetensors", {"value": value.contiguous()})
