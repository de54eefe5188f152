"""Face galleries for `preserve=` and anchors: embeddings of many people nobody named, encoded with the
caller's encoder. `ff.gallery.from_folder("faces/", enc)` walks a folder of photos; `save` keeps them
so the next request does not re-encode: as .npy (dtype=None, loaded whole by `load`), or as a
gallery file (dtype="float16" | "int8" | "float32") that `open` memory-maps, for galleries larger
than memory (10M x 512 in int8 is 5 GB on disk and a few hundred MB of memory to search).

Gallery file format, version 1 (little-endian throughout):

    bytes 0..7     magic b"FFGALLRY"
    bytes 8..11    uint32 H: length of the JSON header that follows
    bytes 12..     the header, UTF-8 JSON: {"format": "fastforget-gallery", "version": 1,
                   "dtype": "float16" | "int8" | "float32", "rows": N, "dim": D,
                   "rows_offset": 4096, "scale_offset": S or null, "normalized": true}
    4096..         N x D rows, row-major, of `dtype`
    S..            int8 only: N float32 per-row scales, S = 4096 + N*D rounded up to 64 bytes

A row's value is its stored row (float16 / float32), or scale * row (int8: scale = max|x| / 127 of
the unit row it came from). The file ends exactly after the last array; anything else is a damaged
file and `open` refuses it. Searches are exact for the stored values.
"""
from __future__ import annotations

import builtins
import json
import logging
import os
import struct
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


MAGIC = b"FFGALLRY"
FORMAT_VERSION = 1
ROWS_OFFSET = 4096
FILE_DTYPES = {"float16": np.float16, "int8": np.int8, "float32": np.float32}
CHUNK_ROWS = 65536  # rows converted and written (or read) at a time


def save(path, embeddings, dtype: str | None = None, *, overwrite: bool = False, progress: bool = False) -> Path:
    """Save a gallery. dtype=None: a .npy of float32 unit rows (read back whole by `load`). dtype="float16",
    "int8" or "float32": a gallery file (format in the module docstring) that `open` memory-maps.

    `embeddings`: an (N, D) tensor / array (a np.memmap is read in chunks), an opened gallery file, or an
    iterable of (n, D) chunks, so a gallery larger than memory can be written; every row is checked
    (finite, non-zero) and scaled to unit norm. Written to a temporary beside `path` and renamed into
    place; an existing `path` is kept unless overwrite=True."""
    from fastforget.identity.embeddings import check_embeddings
    from fastforget.io import atomic_write_bytes
    import io

    if dtype is None:
        buf = io.BytesIO()
        np.save(buf, check_embeddings(embeddings, name="gallery").numpy(), allow_pickle=False)
        return atomic_write_bytes(path, buf.getvalue(), overwrite=overwrite, name="gallery")
    if dtype not in FILE_DTYPES:
        raise InputError(f"gallery dtype: expected None, 'float16', 'int8' or 'float32', got {dtype!r}")
    return write_file(path, _chunks(embeddings), dtype, overwrite=overwrite, progress=progress)


def _chunks(embeddings):
    """(n, D) pieces of `embeddings`, whatever form it has, CHUNK_ROWS at a time."""
    if isinstance(embeddings, GalleryFile):
        for s in range(0, embeddings.shape[0], CHUNK_ROWS):
            yield embeddings.values(s, min(s + CHUNK_ROWS, embeddings.shape[0]))
    elif isinstance(embeddings, (np.ndarray, torch.Tensor)):
        if embeddings.ndim != 2:
            raise InputError(f"gallery: expected an (N, D) array, got shape {tuple(embeddings.shape)}")
        for s in range(0, embeddings.shape[0], CHUNK_ROWS):
            yield embeddings[s:s + CHUNK_ROWS]
    else:
        try:
            it = iter(embeddings)
        except TypeError:
            raise InputError(f"gallery: expected an (N, D) array, a gallery file or an iterable of (n, D) chunks, "
                             f"got {type(embeddings).__name__}") from None
        yield from it


def _quantize(x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows (float32 unit rows, or float64 raw ones) -> (stored rows, per-row float32 scale or None),
    little-endian numpy arrays ready to write."""
    if dtype != "int8":
        rows, scale = x.to(torch.float16 if dtype == "float16" else torch.float32), None
    else:
        scale = (x.abs().amax(1) / 127.0).to(torch.float32)
        rows = torch.round(x / torch.where(scale > 0, scale, 1.0).to(x.dtype)[:, None]).clamp_(-127, 127)
        rows, scale = rows.to(torch.int8), scale.numpy().astype("<f4", copy=False)
    rows = rows.numpy()
    return rows.astype(rows.dtype.newbyteorder("<"), copy=False), scale


def write_file(path, chunks, dtype: str, *, overwrite: bool = False, normalize: bool = True,
               progress: bool = False) -> Path:
    """Write (n, D) chunks as a gallery file. normalize=True (what `save` does): rows checked and scaled
    to unit norm; False: rows stored as given (finite), e.g. raw vectors for an inner-product search."""
    from tqdm import tqdm

    from fastforget.identity.embeddings import check_embeddings
    from fastforget.io import atomic_file

    n, dim, scales = 0, None, []
    with atomic_file(path, overwrite, name="gallery") as f, \
            tqdm(desc="gallery file", unit=" rows", disable=not progress, leave=False) as bar:
        f.write(b"\0" * ROWS_OFFSET)
        for chunk in chunks:
            x = chunk.detach().cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk)
            if x.ndim != 2 or x.shape[0] == 0 or (dim is not None and x.shape[1] != dim):
                raise InputError(f"gallery: rows {n}..: expected an (n, {dim or 'D'}) chunk, got shape {x.shape}")
            dim = x.shape[1]
            name = f"gallery rows {n}..{n + x.shape[0] - 1}"
            if normalize:
                x = check_embeddings(x, dim=dim, name=name)  # float32 unit rows
            else:
                if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
                    raise InputError(f"{name}: expected finite floating-point rows")
                x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
                if dtype == "float16" and float(x.abs().max()) > np.finfo(np.float16).max:
                    raise InputError(f"{name}: values beyond float16's range; save as 'float32' or 'int8'")
            rows, scale = _quantize(x, dtype)
            f.write(rows.tobytes())
            if scale is not None:
                scales.append(scale)
            n += x.shape[0]
            bar.update(x.shape[0])
        if n == 0:
            raise InputError("gallery: no rows to save")
        scale_offset = None
        if dtype == "int8":
            end = ROWS_OFFSET + n * dim
            scale_offset = -(-end // 64) * 64
            f.write(b"\0" * (scale_offset - end))
            f.write(np.concatenate(scales).astype("<f4").tobytes())
        header = json.dumps({"format": "fastforget-gallery", "version": FORMAT_VERSION, "dtype": dtype,
                             "rows": n, "dim": dim, "rows_offset": ROWS_OFFSET, "scale_offset": scale_offset,
                             "normalized": bool(normalize)}).encode()
        f.seek(0)
        f.write(MAGIC + struct.pack("<I", len(header)) + header)
    return Path(path)


class GalleryFile:
    """A gallery file opened for reading (`open`): memory-mapped rows, read in tiles by the search.

    `shape` (N, D), `dtype` ("float16" | "int8" | "float32"), `array` (the rows as a read-only
    np.memmap), `scale` (int8: per-row float32 scales, else None). `values(start, stop)` returns row
    values as float32; `proximity_topk(queries, file, k)` searches it exactly. The search reads tiles
    with positional reads rather than through the mapping, so its memory stays flat however large the
    file is (mapped pages would count towards the process's resident memory)."""

    device = torch.device("cpu")
    reads_into = True  # read_rows(..., out=buffer): the search reuses one buffer for every tile

    def __init__(self, path):
        path = Path(path)
        self.path, self.name = path, str(path)
        if not path.is_file():
            raise InputError(f"gallery file not found: {path}")
        size = path.stat().st_size
        with builtins.open(path, "rb") as f:
            head = f.read(ROWS_OFFSET)
        if head[:6] == b"\x93NUMPY":
            raise InputError(f"{path}: a .npy array, not a gallery file: read it with ff.gallery.load, or write a "
                             "gallery file with ff.gallery.save(path, emb, dtype='float16' | 'int8')")
        if len(head) < 12 or head[:8] != MAGIC:
            raise InputError(f"{path}: not a fastforget gallery file (no {MAGIC!r} magic at its start)")
        (hlen,) = struct.unpack("<I", head[8:12])
        try:
            if 12 + hlen > ROWS_OFFSET:
                raise ValueError("header longer than its 4096-byte block")
            h = json.loads(head[12:12 + hlen].decode())
            version, dtype, n, dim = h["version"], h["dtype"], h["rows"], h["dim"]
            rows_offset, scale_offset = h["rows_offset"], h["scale_offset"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: damaged gallery file header ({str(exc)[:80]})") from None
        if version != FORMAT_VERSION:
            raise InputError(f"{path}: gallery file version {version!r}; this fastforget reads version {FORMAT_VERSION}")
        if dtype not in FILE_DTYPES:
            raise InputError(f"{path}: unknown gallery row dtype {dtype!r} (expected {', '.join(FILE_DTYPES)})")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (n, dim)) \
                or rows_offset != ROWS_OFFSET:
            raise InputError(f"{path}: damaged gallery file header (rows {n!r}, dim {dim!r}, offset {rows_offset!r})")
        self.dtype, self.shape = dtype, (n, dim)
        self.itemsize = np.dtype(FILE_DTYPES[dtype]).itemsize
        self.row_bytes = dim * self.itemsize
        end = rows_offset + n * self.row_bytes
        if dtype == "int8":
            if scale_offset != -(-end // 64) * 64:
                raise InputError(f"{path}: damaged gallery file header (scale offset {scale_offset!r})")
            end = scale_offset + 4 * n
        elif scale_offset is not None:
            raise InputError(f"{path}: damaged gallery file header ({dtype} rows have no scales)")
        if size != end:
            raise InputError(f"{path}: gallery file is {'truncated' if size < end else 'longer than its header says'}"
                             f" ({size} bytes; {n} x {dim} {dtype} rows need {end})")
        self.array = np.memmap(path, dtype=np.dtype(FILE_DTYPES[dtype]).newbyteorder("<"), mode="r",
                               offset=rows_offset, shape=(n, dim))
        self.scale = None
        if dtype == "int8":
            self.scale = torch.from_numpy(np.fromfile(path, dtype="<f4", count=n, offset=scale_offset).astype(np.float32))
            bad = ~(torch.isfinite(self.scale) & (self.scale >= 0))
            if bool(bad.any()):
                raise InputError(f"{path}: damaged gallery file: row scale(s) at {bad.nonzero().flatten().tolist()[:5]} "
                                 "are negative, NaN or inf")
        self._fd = os.open(path, os.O_RDONLY)
        self._np_dtype = np.dtype(FILE_DTYPES[dtype]).newbyteorder("<")
        self.row_dtype = {"float16": torch.float16, "int8": torch.int8, "float32": torch.float32}[dtype]

    # ---- the row-source interface of fastforget.kernels.proximity_topk
    def read_rows(self, start: int, stop: int, out: torch.Tensor | None = None):
        """Stored rows [start, stop) as a tensor (float16 / float32 / int8) and their scales (int8) or None.
        `out`: a contiguous CPU tensor of `row_dtype` and shape (stop - start, D) to read into (returned)."""
        if out is None:
            out = torch.from_numpy(np.empty((stop - start, self.shape[1]), dtype=self._np_dtype))
        elif out.dtype != self.row_dtype or tuple(out.shape) != (stop - start, self.shape[1]) \
                or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"read_rows out: expected a contiguous CPU {self.row_dtype} tensor of shape "
                             f"({stop - start}, {self.shape[1]}), got {out.dtype} {tuple(out.shape)}")
        # numpy's view of the same memory (a little-endian host: the file's byte order)
        self._pread(memoryview(out.numpy()).cast("B"), self.row_bytes * start)
        return out, None if self.scale is None else self.scale[start:stop]

    def gather_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """float64 values of rows `idx` (any order, repeats allowed), read in runs of consecutive rows."""
        idx = idx.to(torch.int64).cpu()
        if idx.numel() == 0:
            return torch.empty((0, self.shape[1]), dtype=torch.float64)
        uniq, inverse = torch.unique(idx, return_inverse=True)
        if bool(uniq[0] < 0) or bool(uniq[-1] >= self.shape[0]):
            raise IndexError(f"{self.name}: row index out of range [0, {self.shape[0]})")
        buf = np.empty((len(uniq), self.shape[1]), dtype=self._np_dtype)
        view = memoryview(buf).cast("B")
        u = uniq.numpy()
        breaks = np.flatnonzero(np.diff(u) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(u)]):
            self._pread(view[a * self.row_bytes:b * self.row_bytes], self.row_bytes * int(u[a]))
        vals = torch.from_numpy(buf).to(torch.float64)
        if self.scale is not None:
            vals *= self.scale[uniq].to(torch.float64)[:, None]
        return vals[inverse]

    def _pread(self, view, offset: int):
        offset += ROWS_OFFSET
        while len(view):
            got = os.preadv(self._fd, [view], offset)
            if got <= 0:
                raise InputError(f"{self.name}: gallery file shrank while it was being read")
            view, offset = view[got:], offset + got

    # ---- convenience
    def values(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """float32 row values [start, stop) (the whole gallery by default: mind its size)."""
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        rows, scale = self.read_rows(start, stop)
        v = rows.to(torch.float32)
        return v * scale[:, None] if scale is not None else v

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"GalleryFile({self.name!r}, rows={self.shape[0]}, dim={self.shape[1]}, dtype={self.dtype})"

    def close(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __getstate__(self):  # pickled by path (to a worker process): never the rows themselves
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()


def open(path) -> GalleryFile:  # noqa: A001  (ff.gallery.open, the public name)
    """Open a gallery file written by `save(..., dtype=...)` as a memory-mapped GalleryFile; the header
    and size are checked here (InputError naming the file), rows while they are read."""
    return GalleryFile(path)


def is_gallery_file(path) -> bool:
    """Whether `path` is a file that starts with the gallery file magic."""
    try:
        with builtins.open(path, "rb") as f:
            return f.read(8) == MAGIC
    except (OSError, TypeError):
        return False


def load(path) -> torch.Tensor:
    """A saved gallery as (N, D) float32 unit rows in memory: a .npy, or a gallery file read whole."""
    from fastforget.identity.embeddings import check_embeddings

    path = Path(path)
    if not path.is_file():
        raise InputError(f"gallery file not found: {path}")
    if is_gallery_file(path):
        with GalleryFile(path) as g:
            return torch.cat([check_embeddings(g.gather_rows(torch.arange(s, min(s + CHUNK_ROWS, g.shape[0]))),
                                               dim=g.shape[1], name=str(path))
                              for s in range(0, g.shape[0], CHUNK_ROWS)])
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{path}: not a .npy array of embeddings ({str(exc)[:120]})") from None
    return check_embeddings(arr, name=str(path))
