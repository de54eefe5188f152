"""Generic identity helpers every family shares: embedding checks, the unit-vector-at-cosine
sampler, image <-> tensor conversion, and identity sets (targets / retain in any accepted form)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fastforget.errors import EmbeddingError, InputError

EMBED_DIM = 512
# ArcFace embeddings of one person sit at cosine ~0.6-0.9; above this two rows are one person
SAME_PERSON_COS = 0.9


def check_embeddings(emb, dim: int = EMBED_DIM, name: str = "embeddings") -> torch.Tensor:
    """(N, dim) finite, non-zero float32, L2-normalised. Raises EmbeddingError naming `name`."""
    if isinstance(emb, np.ndarray):
        if not (np.issubdtype(emb.dtype, np.floating)):
            raise EmbeddingError(f"{name}: embeddings must be floating point, got dtype {emb.dtype}")
        emb = torch.from_numpy(np.ascontiguousarray(emb))
    if not isinstance(emb, torch.Tensor):
        try:
            emb = torch.as_tensor(np.asarray(emb, dtype=np.float64))
        except (TypeError, ValueError, OverflowError):  # OverflowError: ints beyond float64 (2**1100)
            raise EmbeddingError(f"{name}: expected an (N, {dim}) array of embeddings, got {type(emb).__name__}") from None
    if not torch.is_floating_point(emb):
        raise EmbeddingError(f"{name}: embeddings must be floating point, got {emb.dtype}")
    if emb.ndim == 1:
        emb = emb[None]
    if emb.ndim != 2 or emb.shape[1] != dim:
        raise EmbeddingError(f"{name}: expected shape (N, {dim}), got {tuple(emb.shape)} "
                             f"(wrong embedding size: ArcFace embeddings are {dim}-d)")
    if emb.shape[0] == 0:
        raise EmbeddingError(f"{name}: no embeddings (shape {tuple(emb.shape)})")
    emb = emb.detach().double()  # norms of huge finite values overflow in float32
    bad = ~torch.isfinite(emb).all(dim=1)
    if bad.any():
        raise EmbeddingError(f"{name}: row(s) {bad.nonzero().flatten().tolist()[:10]} contain NaN or inf")
    mx = emb.abs().amax(dim=1)
    zero = mx * dim ** 0.5 < 1e-6  # the norm is at most max|x|·√dim
    if zero.any():
        raise EmbeddingError(f"{name}: row(s) {zero.nonzero().flatten().tolist()[:10]} are zero vectors")
    scaled = emb / mx[:, None]  # scale first: huge finite rows (1e30) would overflow a float32 norm
    return (scaled / scaled.norm(dim=1, keepdim=True)).float()


def unit_vectors_at_cosine(anchors: torch.Tensor, n: int, cos_range=(0.75, 0.95), seed: int = 0) -> torch.Tensor:
    """(K*n, D) unit vectors, n per anchor row (grouped), each at a cosine drawn uniformly from
    `cos_range` to its anchor: how other photos of a person (or near look-alikes) sit in ArcFace space."""
    if n <= 0:
        return anchors.new_zeros((0, anchors.shape[1]))
    g = torch.Generator().manual_seed(seed)
    k, d = anchors.shape
    t = anchors.repeat_interleave(n, 0)
    u = torch.randn(k * n, d, generator=g, dtype=torch.float64).to(t.dtype)
    u = F.normalize(u - (u * t).sum(1, keepdim=True) * t, dim=1)
    c = torch.empty(k * n, 1).uniform_(*cos_range, generator=g)
    return F.normalize(c * t + (1 - c ** 2).sqrt() * u, dim=1)


def random_unit_vectors(n: int, dim: int = EMBED_DIM, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64),
                       dim=1).float()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.detach().float().permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------- identity sets
def is_id_list(x) -> bool:
    """Testbed identity ids: an int, a non-empty list/tuple/range of ints, or a 1-D integer array."""
    if isinstance(x, (bool, np.bool_)):
        return False
    if isinstance(x, (int, np.integer)):
        return True
    if isinstance(x, (list, tuple, range)) and len(x) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in x):
        return True
    return isinstance(x, np.ndarray) and x.ndim == 1 and np.issubdtype(x.dtype, np.integer)


def is_embedding_like(x) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, np.ndarray):
        # images are uint8 (H, W, 3) / (N, H, W, 3); anything else numeric is meant as embeddings
        return not (x.dtype == np.uint8 and x.ndim in (3, 4) and x.shape[-1] == 3) and \
            not (np.issubdtype(x.dtype, np.floating) and x.ndim in (3, 4) and x.shape[-1] == 3)
    if isinstance(x, (list, tuple)) and len(x) and all(isinstance(r, (list, tuple)) for r in x):
        return True  # list of lists of numbers
    return False


def identity_sets(x, encoder=None, name: str = "targets", per_identity: int = 8, seed: int = 0):
    """targets / retain in any accepted form -> list of (k_i, 512) unit embeddings, one per identity.

    Testbed identity ids are rendered `per_identity` times (k_i = per_identity); images (paths,
    PIL, uint8 arrays) are one identity per image; numeric arrays are embeddings, one per row."""
    if x is None:
        raise InputError(f"{name}: no identities given")
    if is_id_list(x):
        from fastforget.testbed import render

        vals = [int(x)] if isinstance(x, (int, np.integer)) else [int(v) for v in x]  # exact: no int64 wrap-around
        if not vals:
            raise InputError(f"{name}: no identities given (an empty id array)")
        bad = [v for v in vals if not 0 <= v < 2 ** 63]
        if bad:
            raise InputError(f"{name}: testbed identity ids must be >= 0 and < 2**63, got {bad[0]}")
        ids = np.asarray(vals, dtype=np.int64)
        if encoder is None:
            raise InputError(f"{name}: testbed identity ids need an encoder (ff.load_encoder('demo'))")
        ims, _ = render(ids, per_identity, seed=seed)
        return list(check_embeddings(encoder.encode(ims), name=name).view(len(ids), per_identity, -1))
    if is_embedding_like(x):
        return list(check_embeddings(x, name=name)[:, None])
    if encoder is None:
        raise InputError(f"{name}: images need an encoder (pass encoder=ff.load_encoder(...))")
    return list(check_embeddings(encoder.encode(x, name=name), name=name)[:, None])


def to_embeddings(x, encoder=None, name: str = "targets", per_identity: int = 8, seed: int = 0) -> torch.Tensor:
    """One unit embedding per identity (the normalised mean of its set), (N, 512) float32."""
    if x is None:
        return None
    return F.normalize(torch.stack([s.mean(0) for s in identity_sets(x, encoder, name, per_identity, seed)]), dim=1)
