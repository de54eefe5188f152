"""Face galleries for `preserve=`: embeddings of many people nobody named, encoded with the caller's
encoder. `ff.gallery.from_folder("faces/", enc)` walks a folder of photos; save / load keep the
array as .npy so the next request does not re-encode."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fastforget.errors import InputError

log = logging.getLogger("fastforget")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def from_folder(folder, encoder, *, recursive: bool = True, batch_size: int = 64, progress: bool = True,
                skip_unusable: bool = True) -> torch.Tensor:
    """(N, 512) unit embeddings, one per image file under `folder` (sorted paths, so the order is stable).
    Images the encoder cannot use (no face, unreadable) are skipped with one warning that counts them,
    unless `skip_unusable=False`; a folder with no usable image raises InputError naming it."""
    from tqdm import tqdm

    from fastforget.identity.encoder import load_encoder

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"gallery folder not found: {folder}")
    encoder = load_encoder(encoder)
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    out, skipped = [], []
    for i in tqdm(range(0, len(files), batch_size), desc="gallery", disable=not progress, leave=False):
        chunk = files[i:i + batch_size]
        try:
            out.append(encoder.encode([str(p) for p in chunk], name="gallery"))
        except InputError:
            if not skip_unusable:
                raise
            for p in chunk:  # find the unusable ones
                try:
                    out.append(encoder.encode([str(p)], name="gallery"))
                except InputError:
                    skipped.append(p.name)
    if skipped:
        log.warning("gallery %s: skipped %d unusable image(s), e.g. %s", folder, len(skipped), skipped[:3])
    if not out:
        raise InputError(f"{folder}: none of the {len(files)} images could be encoded")
    return torch.cat(out)


def save(path, embeddings) -> Path:
    from fastforget.identity.embeddings import check_embeddings
    from fastforget.io import atomic_write_bytes
    import io

    buf = io.BytesIO()
    np.save(buf, check_embeddings(embeddings, name="gallery").numpy(), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue(), overwrite=True)


def load(path) -> torch.Tensor:
    from fastforget.identity.embeddings import check_embeddings

    path = Path(path)
    if not path.is_file():
        raise InputError(f"gallery file not found: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: not a .npy array of embeddings ({str(exc)[:120]})") from None
    return check_embeddings(arr, name=str(path))
