"""Torch-free helpers shared by the serving runtime: typed errors, the manifest reader.

Nothing here imports torch (or fastforget's core, which does) until an error is raised, so
`fastforget.export.runtime` runs on a serving box that has only numpy and onnxruntime.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "fastforget.onnx/1"
TRT_FORMAT = "fastforget.tensorrt/1"
EMBED_DIM = 512

_FALLBACK = {"InputError": ValueError, "EmbeddingError": ValueError, "ModelLoadError": OSError,
             "OutputExistsError": FileExistsError, "BackendUnavailableError": RuntimeError}


def error(kind: str, msg: str) -> Exception:
    """An instance of fastforget.errors.<kind> (or export's BackendUnavailableError); a builtin
    exception of the same meaning when fastforget's core cannot be imported."""
    try:
        if kind == "BackendUnavailableError":
            from fastforget.export.errors import BackendUnavailableError as cls
        else:
            from fastforget import errors

            cls = getattr(errors, kind)
    except ImportError:  # pragma: no cover - serving box without the full package
        cls = _FALLBACK[kind]
    return cls(msg)


def read_manifest(directory, expect: str | tuple = FORMAT) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise error("ModelLoadError", f"{directory}: no {MANIFEST} (not a folder written by fastforget.export)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise error("ModelLoadError", f"{path}: not valid JSON ({exc})") from None
    expect = (expect,) if isinstance(expect, str) else tuple(expect)
    if manifest.get("format") not in expect:
        raise error("ModelLoadError", f"{path}: format {manifest.get('format')!r}, expected {' or '.join(expect)}")
    return manifest


def check_embeddings_np(emb, name: str = "embeddings", dim: int = EMBED_DIM) -> np.ndarray:
    """(N, dim) finite non-zero float32 (normalisation happens inside the conditioner graph)."""
    try:
        arr = np.asarray(emb, dtype=np.float32)
    except (TypeError, ValueError):
        raise error("EmbeddingError", f"{name}: expected an (N, {dim}) array of embeddings, "
                                      f"got {type(emb).__name__}") from None
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise error("EmbeddingError", f"{name}: expected shape (N, {dim}), got {tuple(arr.shape)} "
                                      f"(ArcFace embeddings are {dim}-d)")
    if len(arr) == 0:
        raise error("EmbeddingError", f"{name}: no embeddings (N = 0)")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise error("EmbeddingError", f"{name}: row(s) {np.nonzero(bad)[0].tolist()[:10]} contain NaN or inf")
    zero = np.linalg.norm(arr, axis=1) < 1e-6
    if zero.any():
        raise error("EmbeddingError", f"{name}: row(s) {np.nonzero(zero)[0].tolist()[:10]} are zero vectors")
    return np.ascontiguousarray(arr)


def pixel_shuffle(x: np.ndarray, r: int) -> np.ndarray:
    """numpy torch.nn.functional.pixel_shuffle: (N, C*r*r, H, W) -> (N, C, H*r, W*r)."""
    if r == 1:
        return x
    n, c, h, w = x.shape
    out_c = c // (r * r)
    return x.reshape(n, out_c, r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(n, out_c, h * r, w * r)
