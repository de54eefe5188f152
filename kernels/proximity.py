"""Proximity top-k: the k gallery rows most similar (cosine) to each query, without the Q x N score matrix.

The result is exact: identical to a float64 search (rows normalised with F.normalize, one dot
product per pair), ties broken by lower index. Both backends run the same two stages:

1. a candidate pass over gallery tiles in a fast number format (Triton fp32 on GPU; on CPU int8,
   bf16 or fp32, whichever the CPU multiplies fastest, int8 / bf16 hits re-scored in fp32 while
   the tile is in cache) that keeps, per query, every row whose score *could* reach the exact
   top-k given a proven bound on that format's error, chosen by measurement per stored row type.
   bf16 (AMX) multiplies the rows as stored (float32, float16 or int8 from a gallery file) and
   scales by 1 / |row| only where it looks; int8 rows of a gallery file are multiplied as stored,
   int8 x int8 on AMX-INT8 / VNNI through oneDNN, the threshold folded into the product
   (`_Int8AmxTile`);
2. an exact float64 re-rank of those candidates. A query whose candidates overflow the buffer is
   searched exactly instead.

Why the candidates are complete: every approximate score s~ obeys |s~ - s| <= eps, so every
score is at least lo = s~ - eps. If L is the k-th largest lo over the gallery, the exact k-th
best score is >= L, and a row can only be in the exact top-k (ties included) if s~ + eps >= L.
"""
from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .dispatch import ANY_DEVICE, HAS_TRITON, KernelBackendError, register, requires_triton, select

U32 = 2.0 ** -24  # unit roundoff of float32
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
U_OUT = 1.01 * U_BF16  # bf16 matmul output rounding, relative to the rounded value
NORM_EPS = 1e-12  # as F.normalize: x / max(|x|, eps), so a zero row scores 0
MAX_TRITON_K = 128
CANDIDATE_CAP = 16384  # candidates per query before it is searched exactly instead
_INT32_MIN = -(2 ** 31)


# ----------------------------------------------------------------------------------------------
# Triton kernel: similarity tile and running top-k merge in one program
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _proximity_topk_kernel(
        Q, G, EXCL, KEYS, n_q, N, D, rows_per_split,
        stride_qm, stride_qd, stride_gn, stride_gd,
        NORMALIZE: tl.constexpr, HAS_EXCL: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    ):
        # one program: BLOCK_Q queries against gallery rows [split * rows_per_split, +rows_per_split);
        # it keeps the KP best (score, index) pairs packed in one int64 key, so one max orders by
        # score and then by lower index, and every key is distinct
        pid_q = tl.program_id(0)
        split = tl.program_id(1)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < n_q
        if HAS_EXCL:
            excl = tl.load(EXCL + offs_q, mask=q_ok, other=-1)
        slots = tl.arange(0, KP)
        # distinct empty keys below any real key (a real key is >= -2**63 + 2**55)
        running = tl.zeros((BLOCK_Q, KP), tl.int64) - 9223372036854775807 + slots[None, :]
        start = split * rows_per_split
        end = tl.minimum(start + rows_per_split, N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < end
            acc = tl.zeros((BLOCK_Q, BLOCK_N), tl.float32)
            sq = tl.zeros((BLOCK_N,), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_ok = offs_d < D
                q = tl.load(Q + offs_q[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=q_ok[:, None] & d_ok[None, :], other=0.0)
                g = tl.load(G + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                            mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(q, tl.trans(g), acc, input_precision="ieee")  # tf32 would void the error bound
                if NORMALIZE:
                    sq += tl.sum(g * g, 1)
            if NORMALIZE:
                acc = acc / tl.maximum(tl.sqrt(sq), 1e-12)[None, :]
            bits = acc.to(tl.int32, bitcast=True)
            ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # float order as signed int order
            key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - offs_n[None, :]).to(tl.int64)
            valid = q_ok[:, None] & n_ok[None, :]
            if HAS_EXCL:
                valid = valid & (offs_n[None, :] != excl[:, None])
            key = tl.where(valid, key, -9223372036854775807 - 1)
            # insertion merge: while a row's best tile key beats its worst kept key, swap them in;
            # after the first tiles this loop rarely runs, so no tile is sorted
            best = tl.max(key, 1)
            worst = tl.min(running, 1)
            while tl.sum((best > worst).to(tl.int32), 0) > 0:
                take = best > worst
                slot = tl.argmin(running, 1)
                running = tl.where(take[:, None] & (slots[None, :] == slot[:, None]), best[:, None], running)
                key = tl.where(take[:, None] & (key == best[:, None]), -9223372036854775807 - 1, key)
                best = tl.max(key, 1)
                worst = tl.min(running, 1)
        out = KEYS + (split * n_q + offs_q[:, None]) * KP + tl.arange(0, KP)[None, :]
        tl.store(out, running, mask=q_ok[:, None])


def _decode_keys(keys: torch.Tensor):
    """int64 keys -> (float32 scores, int64 indices); empty slots decode to index -1 / score NaN-free -inf."""
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32)
    idx = 0x7FFFFFFF - (keys & 0xFFFFFFFF)
    empty = keys < -(2 ** 63) + 2 ** 55  # the kernel's distinct empty-slot keys
    return torch.where(empty, float("-inf"), scores), torch.where(empty, -1, idx)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def scan_triton(q32, g, k, normalize, exclude, n_split=None, empty=torch.empty):
    """Triton candidate pass: per query the KP best fp32 scores (sorted) and their indices."""
    n_q, D = q32.shape
    N = g.shape[0]
    KP = max(16, _next_pow2(min(2 * k, k + 16)))  # room past k so the completeness check rarely fails
    BLOCK_Q, BLOCK_N, BLOCK_D = 16, 64, min(64, max(16, _next_pow2(D)))
    if n_split is None:
        programs = 4 * torch.cuda.get_device_properties(g.device).multi_processor_count if g.is_cuda else 2
        n_split = max(1, min(triton.cdiv(N, BLOCK_N), triton.cdiv(programs, triton.cdiv(n_q, BLOCK_Q))))
    rows_per_split = triton.cdiv(triton.cdiv(N, n_split), BLOCK_N) * BLOCK_N
    n_split = triton.cdiv(N, rows_per_split)
    keys = empty((n_split, n_q, KP), dtype=torch.int64, device=g.device)
    excl = exclude if exclude is not None else q32
    _proximity_topk_kernel[(triton.cdiv(n_q, BLOCK_Q), n_split)](
        q32, g, excl, keys, n_q, N, D, rows_per_split, *q32.stride(), *g.stride(),
        NORMALIZE=normalize, HAS_EXCL=exclude is not None,
        BLOCK_Q=BLOCK_Q, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, KP=KP, num_warps=4,
    )
    keys = keys.permute(1, 0, 2).reshape(n_q, n_split * KP).sort(dim=1, descending=True).values[:, :KP]
    return _decode_keys(keys)


# ----------------------------------------------------------------------------------------------
# Error bounds of the candidate formats (all in units of |q| * |g|max for this tile)
# ----------------------------------------------------------------------------------------------
def _eps_fp32(D: int) -> float:
    # fp32 representation of q and of the normalised gallery row: relative <= (D/2 + 6) u each side
    # (sum of squares gamma_D/2, sqrt, reciprocal, product); fp32 accumulation of D products, any
    # order: gamma_D <= 1.01 D u. Together < 2 (D + 8) u; 1.001 absorbs second-order terms.
    eps = 2.0 * (D + 8) * U32 * 1.001
    if torch.get_float32_matmul_precision() != "highest":
        # fp32 matmuls may then round inputs to tf32 or bf16: add the bf16 input rounding of both sides
        eps += 2.0 * U_BF16 + U_BF16 ** 2
    return eps


def _eps_int8(e_q, qn_int8, e_g, gn, D):
    # q~ = c_q qi, g~ = c_t gi (int8, int32 dot exact):
    # |q.g - q~.g~| = |(q - q~).g + q~.(g - g~)| <= |q - q~| |g| + |q~| |g - g~|
    return (e_q * gn + qn_int8 * e_g) * (1.0 + 1e-6) + 1e-12 * (qn_int8 + e_q) * gn


# ----------------------------------------------------------------------------------------------
# Galleries the blocked pass reads: an in-memory tensor, or any object with the row-source methods
# ----------------------------------------------------------------------------------------------
class TensorRows:
    """An in-memory (N, D) gallery seen as a row source.

    A row source (this, or a memory-mapped gallery file: `fastforget.gallery.open`) has `shape`,
    `device`, `name`, `read_rows(start, stop) -> (rows, scale)` (stored rows in float64 / float32 /
    float16 / bfloat16 / int8, and a float32 per-row scale or None: row value = scale * rows) and
    `gather_rows(idx) -> float64 values`. The search reads it one tile at a time, so its size is
    bounded by the disk, not by memory.
    """

    name = "gallery"

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.shape = tuple(g.shape)
        self.device = g.device
        self.row_dtype = g.dtype

    def read_rows(self, start: int, stop: int):
        return self.g[start:stop], None

    def gather_rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.g.index_select(0, idx).to(torch.float64)


def is_row_source(x) -> bool:
    return hasattr(x, "read_rows") and hasattr(x, "gather_rows") and hasattr(x, "shape")


def _source(g):
    return g if is_row_source(g) else TensorRows(g)


def _values32(rows, scale):
    """fp32 row values of a tile read from a source (exact for fp16 / bf16 / int8 rows without a scale)."""
    v = rows.to(torch.float32)
    return v * scale[:, None] if scale is not None else v


def _nonfinite(src, n0, n1):
    from fastforget.errors import InputError

    return InputError(f"{src.name} contains NaN or inf in rows {n0}..{n1 - 1} (or a row whose norm overflows float32)")


# ----------------------------------------------------------------------------------------------
# CPU (and any-device) blocked candidate pass
# ----------------------------------------------------------------------------------------------
def cpu_candidate_formats() -> list[str]:
    """Candidate formats this CPU runs natively: fp32 always; bf16 with AVX512-BF16 or AMX-BF16; int8 with
    VNNI or AMX-INT8 (where torch._int_mm exists)."""
    try:
        caps = torch.cpu.get_capabilities()
    except Exception:  # older torch: no capability query, stay exact-format
        return ["fp32"]
    out = ["fp32"]
    if caps.get("amx_bf16") or caps.get("avx512_bf16"):
        out.append("bf16")
    if (caps.get("avx512_vnni") or caps.get("avx_vnni") or caps.get("amx_int8")) and hasattr(torch, "_int_mm"):
        out.append("int8")
    return out


def _candidate_seconds(fmt: str, q_rows: int = 256, tile: int = 2048, D: int = 512, reps: int = 3,
                       rows: str = "float32") -> float:
    """Best-of-`reps` time of one tile of the candidate pass in `fmt` (the tile's conversion into that format,
    the product with `q_rows` queries, the hit test), on this CPU at the current thread count. `rows`: the
    stored row type the tiles come in ("float32"; "float16" / "int8" for gallery files)."""
    import time

    gen = torch.Generator().manual_seed(0)
    q, g = F.normalize(torch.randn(q_rows, D, generator=gen, dtype=torch.float64), dim=1), torch.randn(tile, D, generator=gen)
    g = {"int8": lambda: torch.round(g * 20).clamp_(-127, 127).to(torch.int8), "float16": g.half}.get(rows, lambda: g)()
    buffers = _Buffers()
    block = _QueryBlock(q, torch.arange(q_rows), fmt, 10)
    block.best_lo.fill_(0.25)  # a bound as after the first tiles: few hits
    if fmt == "bf16" or fmt == "int8" and g.dtype in AMX_INT8_ROWS and int8_amx_available(D):
        kind = _Int8AmxTile if fmt == "int8" else _Bf16Tile
        run = lambda: kind(g, None, True, D, buffers=buffers).candidates(block, D, 0, None, buffers)  # noqa: E731
    else:  # the blocked pass's _Tile (fp32; int8 through torch._int_mm)
        def run():
            t = _Tile(g if g.dtype != torch.int8 else g.to(torch.float32), fmt, True, D)
            X, a, eps = t.approx(block, fmt, D)
            return _tile_hits(X, _to_x_threshold(block.threshold() - eps, a, X))
    run()  # first call: oneDNN kernel generation
    best = float("inf")
    for _ in range(reps):  # CPU time of the process: on shared cores, wall time counts the other jobs
        t0 = time.process_time()
        run()
        best = min(best, time.process_time() - t0)
    return best


@functools.lru_cache(maxsize=None)
def cpu_candidate_format(rows: str = "float32") -> str:
    """The format the CPU multiplies fastest, measured once per process among those it runs natively
    (AMX bf16 on recent Xeons, VNNI int8 or AVX512-BF16 on others, fp32 elsewhere): CPU kinds change
    between machines, and capability flags alone do not rank them. Any choice gives exact results.
    `rows="int8"` / `"float16"`: for the tiles of a gallery file of that type, measured separately (the int8
    format multiplies int8 rows as stored: oneDNN's AMX-INT8 / VNNI linear where `int8_amx_available`)."""
    options = cpu_candidate_formats()
    if len(options) == 1:
        return options[0]
    try:
        times = {fmt: _candidate_seconds(fmt) if rows == "float32" else _candidate_seconds(fmt, rows=rows)
                 for fmt in options}
    except RuntimeError:  # a format the build cannot run after all
        return "fp32"
    return min(times, key=times.get)


class _Buffers:
    """One worker's scratch tensors, reused tile after tile instead of fresh allocations (whose pages the
    kernel would zero and fault in again each time); each view is valid until the next get of its name."""

    def __init__(self):
        self._flat = {}

    def get(self, name, shape, dtype):
        n = 1
        for d in shape:
            n *= d
        flat = self._flat.get(name)
        if flat is None or flat.dtype != dtype or flat.numel() < n:
            flat = self._flat[name] = torch.empty(n, dtype=dtype)
        return flat[:n].view(shape)


class _QueryBlock:
    """Per query block: query operands, the k best lower bounds so far, and the candidates kept."""

    def __init__(self, q64, rows, fmt, k):
        self.rows = rows  # global query indices of this block
        self.k = k
        qb = q64[rows]
        self.qn = torch.linalg.vector_norm(qb, dim=1) * (1.0 + 1e-12)  # 1 (0 for a zero query) once normalised
        self.q32 = qb.to(torch.float32)
        if fmt == "int8":
            c = qb.abs().amax(1) / 127.0
            c = torch.where(c > 0, c, torch.ones_like(c))
            qi = torch.round(qb / c[:, None])
            self.c = c
            self.e = torch.linalg.vector_norm(qb - c[:, None] * qi, dim=1) * (1.0 + 1e-12)
            self.qn_int8 = torch.linalg.vector_norm(c[:, None] * qi, dim=1) * (1.0 + 1e-12)
            self.op = qi.to(torch.int8)
            self.zp = torch.zeros(len(rows), dtype=torch.int64)
            self._packed = None
        else:
            self.op = self.q32.to(torch.bfloat16) if fmt == "bf16" else self.q32
        if fmt == "bf16":  # |bf16(q) - q|, exact enough in float64: the bf16 pass's input error on this side
            self.dq = torch.linalg.vector_norm(self.op.to(torch.float64) - qb, dim=1) * (1.0 + 1e-12)
        n = len(rows)
        self.best_lo = torch.full((n, k), float("-inf"), dtype=torch.float64, device=q64.device)
        self.hits: list[tuple] = []  # (local query, gallery index, lo, hi)
        self.counts = torch.zeros(n, dtype=torch.int64, device=q64.device)
        self.overflow = torch.zeros(n, dtype=torch.bool, device=q64.device)

    def packed(self, tile_rows):
        """The int8 queries prepacked as oneDNN's linear weight (once per block)."""
        if self._packed is None:
            self._packed = torch.ops.onednn.qlinear_prepack(self.op, [tile_rows, self.op.shape[1]])
        return self._packed

    def threshold(self):
        return torch.where(self.overflow, float("inf"), self.best_lo[:, -1])


class _Tile:
    """A gallery tile in fp32 with its int8 / fp32 candidate operand and the facts its error bound needs
    (bf16 tiles: _Bf16Tile)."""

    def __init__(self, gt, fmt, normalize, D):
        self.gf = gt.to(torch.float32)
        nrm = torch.linalg.vector_norm(self.gf, dim=1)
        if not bool(torch.isfinite(nrm).all()):
            raise ValueError("gallery contains NaN or inf (or a row whose norm overflows float32)")
        rel = (D + 8) * U32
        # |g| bound: 1 once normalised (F.normalize semantics: 0 for a zero row), else the largest norm
        self.gn = 1.0 if normalize else float(nrm.max()) * (1.0 + rel)
        self.scale = 1.0 / nrm.clamp_min(NORM_EPS) if normalize else torch.ones_like(nrm)
        if fmt == "int8":
            top = float((torch.maximum(self.gf.amax(1), -self.gf.amin(1)) * self.scale).max())  # no |g| copy
            # one fp32-representable scale per tile, so the int32 dot itself orders a query's scores
            self.c = float(np.float32(top / 127.0)) if top > 0 else 1.0
            r = self.gf * (self.scale / self.c)[:, None]
            gi = torch.round(r)
            e_units = torch.linalg.vector_norm(r.sub_(gi), dim=1)  # r - round(r) is exact in fp32
            # |g - c gi| <= c |r - gi| + |g - c r|, the second term being fp32 scaling error
            self.e = self.c * float(e_units.max()) * (1.0 + 2 * rel) + 2 * rel * self.gn
            self.op = gi.to(torch.int8)
        else:
            self.op = self.gf * self.scale[:, None] if normalize else self.gf

    def approx(self, block: _QueryBlock, fmt, D):
        """Approximate scores X (Qb, T) and per query a, eps with score~ = a * X, |score~ - score| <= eps."""
        if fmt == "int8":
            return (torch._int_mm(block.op, self.op.T), block.c * self.c,
                    _eps_int8(block.e, block.qn_int8, self.e, self.gn, D))
        eps = _eps_fp32(D) * block.qn * self.gn + 1e-30
        return block.op @ self.op.T, torch.ones_like(block.qn), eps

    def approx_fp32(self, block: _QueryBlock, D):
        """Dense fp32 scores of the whole tile (same bound as the fp32 format)."""
        X = block.q32 @ self.gf.T
        X *= self.scale  # (q . g) / |g|: the tile was not normalised for int8 / bf16
        return X, torch.ones_like(block.qn), _eps_fp32(D) * block.qn * self.gn + 1e-30

    def rescore_fp32(self, block: _QueryBlock, rows, cols, D):
        """fp32 scores of a few (query, tile row) pairs from the tile in cache, and their error bound."""
        s = block.q32.index_select(0, rows).mul_(self.gf.index_select(0, cols)).sum(1) * self.scale[cols]
        return s.to(torch.float64), _eps_fp32(D) * block.qn[rows] * self.gn + 1e-30


def _multipliers(nrm, scale, normalize):
    """Per row s_j with score = (q . rows_j) s_j: 1 / |rows_j| (0 for a zero row) when normalising, else the
    stored scale (1 without one)."""
    if normalize:
        return torch.where(nrm > NORM_EPS if scale is None else (nrm > 0) & (scale != 0), 1.0 / nrm, 0.0)
    return scale if scale is not None else torch.ones_like(nrm)


class _Bf16Tile:
    """A tile for the bf16 (AMX) pass, multiplied as stored: no normalised or fp32 copy of the tile.

    score~ = s_j * X_j with X = bf16(q) . bf16(rows_j) (fp32 accumulation, bf16 result) and the per-row
    scale s_j = 1 / |rows_j| (normalize) or the stored scale (raw inner product): rounding rows_j
    instead of rows_j / |rows_j| to bf16 is the same relative error (bound: `approx`).
    Which (query, row) pairs may pass is decided in X units against the tile's extreme s_j (a superset),
    and every pair found is re-scored in fp32 from the stored rows.
    """

    def __init__(self, rows, scale, normalize, D, src=None, n0=0, buffers=None):
        self.rows = rows
        buffers = buffers or _Buffers()
        T = len(rows)
        wide = torch.float64 if rows.dtype == torch.float64 else torch.float32
        nrm = buffers.get("nrm", (T,), torch.float32)  # norms of the stored rows
        self.op = op = buffers.get("op", (T, D), torch.bfloat16)  # the bf16 operand, reused tile after tile
        rel = (D + 8) * U32
        # int8 rows carry their own max, so their norms differ (~2x across a tile): the multiplier goes into
        # the operand (below), computed slice by slice as the norms come
        prescaled = rows.dtype == torch.int8
        if rows.dtype in (torch.int8, torch.float16):
            # in slices that stay in cache: int8 / float16 -> fp32 (exact), norms, [x s_j], -> bf16
            scratch = buffers.get("scratch", (min(T, CONVERT_ROWS), D), torch.float32)
            for i in range(0, T, CONVERT_ROWS):
                j = min(i + CONVERT_ROWS, T)
                sc = scratch[:j - i]
                sc.copy_(rows[i:j])
                torch.linalg.vector_norm(sc, dim=1, out=nrm[i:j])
                if prescaled:
                    sc.mul_(_multipliers(nrm[i:j], None if scale is None else scale[i:j], normalize)[:, None])
                op[i:j].copy_(sc)
        elif rows.dtype == torch.float32:
            # norms, then the bf16 copy while the slice is in cache (10% faster per search than two whole passes)
            for i in range(0, T, CONVERT_ROWS):
                j = min(i + CONVERT_ROWS, T)
                torch.linalg.vector_norm(rows[i:j], dim=1, out=nrm[i:j])
                op[i:j].copy_(rows[i:j])
        else:  # float64 / bfloat16 rows
            r = rows.to(wide)
            nrm.copy_(torch.linalg.vector_norm(r, dim=1))
            op.copy_(r)
        if not bool(torch.isfinite(nrm).all()) or (scale is not None and not bool(torch.isfinite(scale).all())):
            raise _nonfinite(src or TensorRows(rows), n0, n0 + len(rows))
        s = _multipliers(nrm, scale, normalize)
        self.gn = 1.0 if normalize else float((nrm * s.abs()).max()) * (1.0 + 2 * rel) if len(nrm) else 0.0
        self.s = s  # fp32 scores of stored rows: (q . rows_j) * s_j
        # |bf16(r) - r| <= rho |r| per row: bf16 holds int8 exactly, else relative rounding u_bf16
        self.rho = 0.0 if rows.dtype == torch.int8 else U_BF16
        self.theta = 0.0 if not normalize else rel  # relative error of s_j = 1 / |r_j| in fp32
        pos = s[s > 0]
        if not prescaled and (pos.numel() and float(pos.max()) > 1.01 * float(pos.min()) or bool((s < 0).any())):
            # rows of unequal norm (raw embeddings): one X threshold would be loose for most rows
            r = rows.to(wide)
            op.copy_(r.mul_(s.to(wide)[:, None]) if r is not rows else r * s.to(wide)[:, None])
            prescaled = True
        if prescaled:
            # op_j = bf16(fp32(rows_j s_j)) = r^_j (1 + theta)(1 + u32)(1 + u_b) elementwise, r^_j the unit
            # (normalize) or scaled row: rho covers all three, and X needs no multiplier
            self.rho = (U_BF16 + U32 + self.theta) * 1.001
            self.theta = 0.0
            self.sx = (s != 0).to(torch.float32)
        else:
            self.sx = s  # the multiplier of X: score~_j = sx_j X_j
        pos = self.sx[self.sx > 0]
        self.s_max = float(pos.max()) if pos.numel() else 0.0
        self.s_min = float(pos.min()) if pos.numel() else 1.0

    def vals32(self, cols=None):
        r = self.rows if cols is None else self.rows.index_select(0, cols)
        return r.to(torch.float32)

    def approx(self, block: "_QueryBlock", D, out=None):
        """X (Qb, T) bf16 and per query E with |sx_j X_j - score_j| <= U_OUT |sx_j X_j| + E.

        X~ = bf16(acc) for the fp32 sum acc of exact products of q_b = bf16(q), r_b = bf16(r):
        |X~ - acc| <= u_b |X~| (round to nearest), |acc - q_b.r_b| <= gamma_D |q_b| |r_b|,
        |q_b.r_b - q.r| <= |dq| |r| + |q_b| rho |r|. With |q_b| <= |q| + |dq|, |r_b| <= (1 + rho) |r|
        and sx_j = s_j = (1 + theta) / |r_j| (normalize; else s_j |r_j| <= gn), per query (a prescaled
        operand has sx_j = 1 and its r is the unit / scaled row: the same bound, with its rho):
        E = gn (1 + theta) [gamma_D (|q| + |dq|)(1 + rho) + |dq| + (|q| + |dq|) rho] + gn theta |q|.
        About half of a bound in units of |q| |g| alone (3 u_b): the output rounding scales with the
        score (~0.2 at the top-k, not 1), |dq| is measured, and int8 rows have rho = 0."""
        qn, dq = block.qn, block.dq
        gamma = 1.01 * D * U32
        E = self.gn * (1 + self.theta) * (gamma * (qn + dq) * (1 + self.rho) + dq + (qn + dq) * self.rho) \
            + self.gn * self.theta * qn
        X = torch.matmul(block.op, self.op.T, out=out) if out is not None else block.op @ self.op.T
        return X, E * (1.0 + 1e-6) + 1e-30

    def approx_fp32(self, block: "_QueryBlock", D):
        """Dense fp32 scores of the whole tile, and their bound."""
        X = block.q32 @ self.vals32().T
        X *= self.s
        return X, _eps_fp32(D) * block.qn * self.gn + 1e-30

    def rescore_fp32(self, block: "_QueryBlock", rows, cols, D, chunk=256):
        # chunks small enough to stay in cache: one large gather is ~6x slower here (page faults)
        out = torch.empty(rows.numel(), dtype=torch.float32)
        bq = torch.empty((min(chunk, rows.numel()), D), dtype=torch.float32)
        bg = torch.empty_like(bq) if self.rows.dtype == torch.float32 else None
        for i in range(0, rows.numel(), chunk):
            r, c = rows[i:i + chunk], cols[i:i + chunk]
            m = r.numel()
            torch.index_select(block.q32, 0, r, out=bq[:m])
            g = torch.index_select(self.rows, 0, c, out=bg[:m]) if bg is not None else self.vals32(c)
            torch.sum(bq[:m].mul_(g), 1, out=out[i:i + m])
        s = out.mul_(self.s[cols])
        return s.to(torch.float64), _eps_fp32(D) * block.qn[rows] * self.gn + 1e-30

    def candidates(self, block, D, n0, exclude, buffers=None):
        """(query, tile row) pairs that may reach the block's top-k; some may be excluded rows."""
        out = buffers.get("X", (len(block.rows), len(self.rows)), torch.bfloat16) if buffers else None
        X, E = self.approx(block, D, out=out)
        _exclude(X, block, n0, exclude)
        return _bf16_hits(X, self.x_threshold(block.threshold() - E))

    def x_threshold(self, t):
        """Per query: the lowest X that may have s_j X + U_OUT |s_j X| >= t for some row of this tile (t =
        L - E), as bf16, rounded down."""
        if self.s_max is None:
            return torch.full_like(t, float("-inf"))
        t = torch.where(t > 0, t / (1 + U_OUT), t / (1 - U_OUT))
        tx = torch.where(t > 0, t / self.s_max if self.s_max > 0 else torch.full_like(t, float("inf")),
                         t / self.s_min)
        return _to_x_threshold(tx, torch.ones_like(tx), torch.empty(0, dtype=torch.bfloat16))


def _bf16_hits(X, thr):
    """(row, col) of the bf16 X >= thr[row]; strided groups of columns, their maxima taken on the bits.

    A positive bf16 orders like its int16 bits, and every negative one (and -0) has negative bits: so
    for thr > 0 a group holds a value >= thr iff its largest int16 is >= thr's bits. Rows with
    thr <= 0 test every group."""
    n_rows, T = X.shape
    if T % GROUP:
        return (X >= thr[:, None]).nonzero(as_tuple=True)
    width = T // GROUP  # group c: columns c, c + width, c + 2 width, ... (max over a strided dim vectorises)
    tbits = torch.where(thr > 0, thr.view(torch.int16), torch.iinfo(torch.int16).min)
    Xv = X.view(n_rows, GROUP, width)
    hr, hg = (Xv.view(torch.int16).amax(1) >= tbits[:, None]).nonzero(as_tuple=True)
    sel_hot, sel_m = (Xv[hr, :, hg] >= thr[hr][:, None]).nonzero(as_tuple=True)
    return hr[sel_hot], hg[sel_hot] + sel_m * width


class _Int8AmxTile(_Bf16Tile):
    """A tile of int8 rows (an int8 gallery file) multiplied as stored, int8 x int8 on AMX-INT8 / VNNI through
    oneDNN's quantized linear (`torch.ops.onednn.qlinear_pointwise`): the tile is the activation (uint8 =
    row + 128, zero point 128), the block's int8 queries (q~ = c_q qi, `_QueryBlock`) the weight, prepacked
    once per block. The int32 sums X = qi . r_j are exact.

    Error: score~ = c_q s_j X_j with s_j the row multiplier (1 / |r_j| in fp32, relative error theta; or the
    stored scale) and |score - score~| <= gn (1 + theta) |q - q~| + theta |q| =: E_q, as the rows are exact.
    A pair may reach the top-k only if c_q s_j X_j >= t_q = L_q - E_q. For t_q > 0 that is
    X_j c_q / (t_q o) >= 1 / (s_j o) =: a_j, so the per-query threshold goes into the weight scales
    w_q = c_q / (t_q o) and the product's uint8 output u = sat(round(z)), z = fp32(X w_q) (relative error
    < 2^-21), is tested against one integer per row: u_j >= floor(a_j (1 - 2^-20)) - 1 keeps every pair with
    z_j >= a_j (round to nearest moves z by <= 1/2; the test allows 1). o puts the largest finite a_j at 200
    (u saturates at 255). A row with s_j = 0 (score 0) gets 255, a superset. Blocks with a query at
    t_q <= 0 (no bound yet) go dense, as do early tiles with many hits; every pair found is re-scored in
    fp32 from the stored rows, as in the bf16 pass. About 2.5x faster per tile than bf16 on AMX here
    (no conversion of the tile, a product twice as fast, a uint8 output tested by rows), with a looser
    bound (|q - q~| ~ 7e-3 against ~2e-3) that keeps a few more pairs.
    """

    def __init__(self, rows, scale, normalize, D, src=None, n0=0, buffers=None):
        self.rows = rows
        buffers = buffers or _Buffers()
        T = len(rows)
        nrm = buffers.get("nrm", (T,), torch.float32)
        scratch = buffers.get("scratch", (min(T, CONVERT_ROWS), D), torch.float32)
        for i in range(0, T, CONVERT_ROWS):  # sums of squares of integers below 2^24: exact norms
            j = min(i + CONVERT_ROWS, T)
            torch.linalg.vector_norm(scratch[:j - i].copy_(rows[i:j]), dim=1, out=nrm[i:j])
        if scale is not None and not bool(torch.isfinite(scale).all()):
            raise _nonfinite(src or TensorRows(rows), n0, n0 + T)
        rel = (D + 8) * U32
        s = _multipliers(nrm, scale, normalize)
        self.s = s
        self.gn = 1.0 if normalize else float((nrm * s.abs()).max()) * (1.0 + 2 * rel)
        self.theta = rel if normalize else 0.0
        self.u8 = torch.bitwise_xor(rows.view(torch.uint8), 128, out=buffers.get("u8", (T, D), torch.uint8))
        inv = torch.where(s > 0, 1.0 / s.to(torch.float64), float("inf"))
        finite = inv[torch.isfinite(inv)]
        self.o = float(finite.max()) / 200.0 if finite.numel() else 1.0
        a = torch.where(torch.isfinite(inv), inv / self.o * (1.0 - 2.0 ** -20), 1e9)
        # 0..255 (uint8, as the product): a row no product can pass (s_j = 0) gets 255, a superset
        self.U = (a.floor() - 1.0).clamp(0.0, 255.0).to(torch.uint8)
        self.ok = not bool((s < 0).any())  # a negative multiplier (not from a gallery file) flips the test

    def candidates(self, block, D, n0, exclude, buffers=None):
        E = (self.gn * (1.0 + self.theta) * block.e + self.theta * block.qn) * (1.0 + 1e-6) + 1e-30
        t = block.threshold() - E
        if not self.ok or bool((t <= 0).any()):
            return None, None  # dense
        w = (block.c / (t * self.o)).to(torch.float32)  # t = inf (an overflowed query): 0, nothing kept
        if not bool(torch.isfinite(w).all()):
            return None, None
        u = torch.ops.onednn.qlinear_pointwise(self.u8, 1.0, 128, block.packed(len(self.rows)), w, block.zp, None,
                                               1.0, 0, None, "none", [], "")  # (T, Qb) uint8
        hot = (u.amax(1) >= self.U).nonzero(as_tuple=True)[0]
        T, Qb = u.shape
        if hot.numel() <= T // 2 or (T * Qb) % 8:
            rows, sel_hot = (u[hot] >= self.U[hot][:, None]).T.nonzero(as_tuple=True)  # by query, as the scan wants
            return rows, hot[sel_hot]
        # early tiles, most rows hot: test every pair, and find the few that pass 8 bytes at a time
        m = torch.ge(u, self.U[:, None]).view(-1)
        words = m.view(torch.int64).nonzero(as_tuple=True)[0]
        w_i, byte = m.view(-1, 8)[words].nonzero(as_tuple=True)
        flat = words[w_i] * 8 + byte
        order = torch.argsort(flat % Qb, stable=True)  # by query
        flat = flat[order]
        return flat % Qb, flat // Qb


@functools.lru_cache(maxsize=None)
def int8_amx_available(D: int = 64) -> bool:
    """Whether oneDNN's int8 linear (torch.ops.onednn.qlinear_*, the AMX-INT8 / VNNI product) runs here and
    keeps what `_Int8AmxTile` relies on: exact int32 sums (float32 output) and uint8 output within 1/2 of
    the scaled sum, saturating. Checked once per inner size D on random data."""
    try:
        gen = torch.Generator().manual_seed(D)
        qi = torch.randint(-127, 128, (37, D), dtype=torch.int8, generator=gen)
        gi = torch.randint(-127, 128, (70, D), dtype=torch.int8, generator=gen)
        gu = gi.view(torch.uint8) ^ 128
        packed = torch.ops.onednn.qlinear_prepack(qi, [70, D])
        X = gi.to(torch.float64) @ qi.to(torch.float64).T
        zp = torch.zeros(37, dtype=torch.int64)
        x32 = torch.ops.onednn.qlinear_pointwise(gu, 1.0, 128, packed, torch.ones(37), zp, None, 1.0, 0,
                                                 torch.float32, "none", [], "")
        w = (torch.rand(37, generator=gen) * 400 / max(1.0, float(X.abs().max()))).to(torch.float32)
        u = torch.ops.onednn.qlinear_pointwise(gu, 1.0, 128, packed, w, zp, None, 1.0, 0, None, "none", [], "")
        z = (X * w.to(torch.float64)).clamp(0, 255)
        return u.dtype == torch.uint8 and torch.equal(x32.to(torch.float64), X) and \
            bool(((u.to(torch.float64) - z).abs() <= 0.5 + 1e-3).all())
    except (RuntimeError, AttributeError, TypeError):  # no oneDNN quantized ops in this build
        return False


def _scan_block_bf16(block, tile: _Bf16Tile, D, n0, exclude, first, buffers=None):
    """Fold one bf16 (or AMX int8) tile into the block's candidates and k-th lower bound (as _scan_block)."""
    k = block.k
    if first:  # no bound yet: the tile's own dense fp32 k-th best gives one
        X, eps = tile.approx_fp32(block, D)
        _exclude(X, block, n0, exclude)
        L = X.topk(k, dim=1).values[:, -1].to(torch.float64) - eps if X.shape[1] >= k else block.threshold()
        dense = True
    else:
        rows, cols = tile.candidates(block, D, n0, exclude, buffers)
        dense = rows is None or rows.numel() > len(block.rows) * len(tile.rows) // 160
        if dense:  # early tiles: one dense fp32 product is cheaper
            X, eps = tile.approx_fp32(block, D)
            _exclude(X, block, n0, exclude)
            L = block.threshold()
    if dense:
        rows, cols = _tile_hits(X, _to_x_threshold(L - eps, torch.ones_like(eps), X))
    if exclude is not None:  # a -inf sentinel passes a -inf threshold
        keep = cols + n0 != exclude[block.rows][rows]
        rows, cols = rows[keep], cols[keep]
    if dense:
        s, e = X[rows, cols].to(torch.float64), eps[rows]
    else:
        s, e = tile.rescore_fp32(block, rows, cols, D)
    lo, hi = s - e, s + e
    block.best_lo = _merge_best(block.best_lo, rows, lo, k)
    block.hits.append((rows, cols + n0, lo, hi))
    block.counts += torch.bincount(rows, minlength=len(block.rows))


def _to_x_threshold(t, a, X):
    """Lowest X that may pass `a * X >= t`, rounded down so the test only ever keeps more."""
    t = t / a
    if not X.dtype.is_floating_point:
        return (t.floor() - 1).clamp(_INT32_MIN, 2 ** 31 - 1).to(X.dtype)
    margin = t.abs() * torch.finfo(X.dtype).eps + 1e-30  # >= the cast's rounding (half a spacing)
    return torch.where(torch.isfinite(t), t - margin, t).to(X.dtype)


def _sentinel(X):
    return _INT32_MIN if not X.dtype.is_floating_point else float("-inf")


def _merge_best(best, rows, vals, k):
    """Merge (row, value) pairs, rows ascending, into the per-row k largest values `best` (Qb, k)."""
    if rows.numel() == 0:
        return best
    counts = torch.bincount(rows, minlength=best.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - starts[rows]
    dense = torch.full((best.shape[0], int(counts.max())), float("-inf"), dtype=best.dtype, device=best.device)
    dense[rows, pos] = vals
    return torch.cat([best, dense], 1).topk(best.shape[1], dim=1).values


GROUP = 32  # gallery rows per group max: one pass over X finds the few groups worth a look
# stored row types _Int8AmxTile takes. float16 / float32 rows quantised to int8 per row (max, scale, round, exact
# residual for the bound) were tried: in eager torch that costs 6.6 ms per 4,096-row tile in a search against
# 1.9 ms for the bf16 conversion, more than the faster product saves (1,000 queries x 1M float16 rows: 3.8 s
# against 2.7 s CPU)
AMX_INT8_ROWS = (torch.int8,)
CONVERT_ROWS = 512  # rows converted at a time (fp32 slice of 1 MB at D = 512: stays in cache)


def _tile_hits(X, thr):
    """(row, col) of X >= thr[row], found through group maxima so X is read once."""
    n_rows, T = X.shape
    if T % GROUP:
        return (X >= thr[:, None]).nonzero(as_tuple=True)
    Xg = X.view(n_rows, T // GROUP, GROUP)
    hr, hg = (Xg.amax(-1) >= thr[:, None]).nonzero(as_tuple=True)
    sel_hot, sel_col = (Xg[hr, hg] >= thr[hr][:, None]).nonzero(as_tuple=True)
    return hr[sel_hot], hg[sel_hot] * GROUP + sel_col


def _exclude(X, block, n0, exclude):
    if exclude is not None:
        ex = exclude[block.rows] - n0
        inside = (ex >= 0) & (ex < X.shape[1])
        X[inside.nonzero(as_tuple=True)[0], ex[inside]] = _sentinel(X)


def _scan_block(block, tile, fmt, D, n0, exclude, first):
    """Fold one tile into the block's candidates and k-th lower bound."""
    k = block.k
    X, a, eps = tile.approx(block, fmt, D)
    _exclude(X, block, n0, exclude)
    if first and X.shape[1] >= k:
        # this tile's k-th best lower bound already bounds L from below: without it the first tile
        # would keep every row
        L = a * X.topk(k, dim=1).values[:, -1].to(torch.float64) - eps
    else:
        L = block.threshold()
    # a row can reach the top-k only if score >= L, so only if score~ >= L - eps
    rows, cols = _tile_hits(X, _to_x_threshold(L - eps, a, X))
    if fmt != "fp32" and rows.numel() > X.numel() // 160:
        # early tiles, while L is still low: one dense fp32 product costs about as much as
        # re-scoring 1/160 of the tile's pairs one by one
        X, a, eps = tile.approx_fp32(block, D)
        _exclude(X, block, n0, exclude)
        rows, cols = _tile_hits(X, _to_x_threshold(L - eps, a, X))
        fmt = "fp32"
    if exclude is not None:  # a -inf sentinel passes a -inf threshold
        keep = cols + n0 != exclude[block.rows][rows]
        rows, cols = rows[keep], cols[keep]
    if fmt == "fp32":
        s, e = a[rows] * X[rows, cols].to(torch.float64), eps[rows]
    else:  # the coarse bound found the hits; the fp32 bound (~1e-4) decides which stay candidates
        s, e = tile.rescore_fp32(block, rows, cols, D)
    lo, hi = s - e, s + e
    block.best_lo = _merge_best(block.best_lo, rows, lo, k)
    block.hits.append((rows, cols + n0, lo, hi))
    block.counts += torch.bincount(rows, minlength=len(block.rows))


def _prune(block):
    """Drop candidates that can no longer reach the top-k; a query still over the cap overflows."""
    rows, idx, lo, hi = (torch.cat(t) for t in zip(*block.hits))
    keep = hi >= block.best_lo[:, -1][rows]
    rows, idx, lo, hi = rows[keep], idx[keep], lo[keep], hi[keep]
    block.counts = torch.bincount(rows, minlength=len(block.rows))
    block.overflow |= block.counts > CANDIDATE_CAP
    keep = ~block.overflow[rows]
    block.hits = [(rows[keep], idx[keep], lo[keep], hi[keep])]


def _scan_tiles(q64, src, k, normalize, exclude, fmt, starts, tile, q_block):
    """One worker: fold the gallery tiles starting at `starts` into fresh query-block states."""
    n_q, D = q64.shape
    blocks = [_QueryBlock(q64, torch.arange(s, min(s + q_block, n_q), device=q64.device), fmt, k)
              for s in range(0, n_q, q_block)]
    buffers = _Buffers()
    reads_into = getattr(src, "reads_into", False)  # a gallery file reads tiles into a reused buffer
    for t, n0 in enumerate(starts):
        n1 = min(n0 + tile, src.shape[0])
        if reads_into:
            rows, scale = src.read_rows(n0, n1, out=buffers.get("rows", (n1 - n0, D), src.row_dtype))
        else:
            rows, scale = src.read_rows(n0, n1)
        if fmt == "bf16":
            gt = _Bf16Tile(rows, scale, normalize, D, src, n0, buffers)
        elif fmt == "int8" and rows.dtype in AMX_INT8_ROWS and int8_amx_available(D):
            gt = _Int8AmxTile(rows, scale, normalize, D, src, n0, buffers)
        else:
            try:
                gt = _Tile(_values32(rows, scale) if scale is not None else rows, fmt, normalize, D)
            except ValueError:
                raise _nonfinite(src, n0, n0 + len(rows)) from None
        for block in blocks:
            if isinstance(gt, _Bf16Tile):
                _scan_block_bf16(block, gt, D, n0, exclude, first=t == 0, buffers=buffers)
            else:
                _scan_block(block, gt, fmt, D, n0, exclude, first=t == 0)
            if (t + 1) % 64 == 0 or block.counts.max() > CANDIDATE_CAP:
                _prune(block)
    return blocks


def _single_threaded(fn, *args):
    torch.set_num_threads(1)  # OpenMP thread count is per calling thread: this worker only
    return fn(*args)


TILE_ROWS = {"bf16": 4096, "int8": 1024, "fp32": 1024}  # measured: AMX wants wide tiles (int8 files: 4096 too)


def scan_blocked(q64, g, k, normalize, exclude, fmt, tile=None, q_block=1024, workers=None):
    """Blocked candidate pass: (query index, gallery index) candidate pairs and the overflowed queries.

    Tiles are dealt round-robin to `workers` threads (default torch.get_num_threads()), each running
    single-threaded ops: on shared cores, many small multi-threaded ops would each wait for a
    descheduled thread. Each worker keeps its own k-th lower bounds; they are merged at the end.
    """
    g = _source(g)
    if tile is None:
        amx_int8 = fmt == "int8" and getattr(g, "row_dtype", None) in AMX_INT8_ROWS and int8_amx_available(g.shape[1])
        tile = TILE_ROWS["bf16" if amx_int8 else fmt]
    starts = list(range(0, g.shape[0], tile))
    workers = max(1, min(workers or torch.get_num_threads(), len(starts))) if g.device.type == "cpu" else 1
    args = (q64, g, k, normalize, exclude, fmt)
    if workers == 1:
        parts = [_scan_tiles(*args, starts, tile, q_block)]
    else:
        threads = torch.get_num_threads()
        try:
            with ThreadPoolExecutor(workers) as pool:
                parts = list(pool.map(lambda w: _single_threaded(_scan_tiles, *args, starts[w::workers], tile, q_block),
                                      range(workers)))
        finally:
            torch.set_num_threads(threads)  # also restores MKL's process-wide count
    cand_q, cand_j, overflow = [], [], []
    for blocks in zip(*parts):  # the same query block from every worker
        block = blocks[0]
        block.best_lo = torch.cat([b.best_lo for b in blocks], 1).topk(k, dim=1).values
        block.hits = [h for b in blocks for h in b.hits]
        block.overflow = torch.stack([b.overflow for b in blocks]).any(0)
        _prune(block)
        rows, idx, _, _ = block.hits[0]
        cand_q.append(block.rows[rows])
        cand_j.append(idx)
        overflow.append(block.overflow)
    return torch.cat(cand_q), torch.cat(cand_j), torch.cat(overflow)


# ----------------------------------------------------------------------------------------------
# Exact stage (float64) shared by both backends
# ----------------------------------------------------------------------------------------------
def _exact_rows(g, idx, normalize):
    rows = _source(g).gather_rows(idx)
    return F.normalize(rows, dim=1, eps=NORM_EPS) if normalize else rows


# "Exact" means: rows normalised with F.normalize in float64, then one elementwise product summed
# per (query, row) pair. Unlike a GEMM, whose summation order depends on where a pair lands, this
# gives equal rows bit-equal scores, so ties go to the lower index everywhere.
def _exact_pair_scores(q64, g, qi, gi, normalize):
    """Float64 scores of the pairs (query qi[n], gallery row gi[n])."""
    return _exact_rows(g, gi, normalize).mul_(q64.index_select(0, qi)).sum(1)


def exact_topk(q64, g, k, normalize, exclude, elements=1 << 22):
    """Exact float64 search in gallery tiles, ties to the lower index: the overflow fallback and the reference."""
    n_q, D = q64.shape
    per_pass = max(1, elements // (D * 1024))  # queries per pass, so a tile holds >= 1024 rows
    if n_q > per_pass:
        parts = [exact_topk(q64[i:i + per_pass], g, k, normalize,
                            None if exclude is None else exclude[i:i + per_pass], elements)
                 for i in range(0, n_q, per_pass)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    tile = max(1, elements // max(1, n_q * D))  # (n_q, tile, D) products at a time
    best_s = torch.empty((n_q, 0), dtype=torch.float64, device=q64.device)
    best_j = torch.empty((n_q, 0), dtype=torch.int64, device=q64.device)
    for n0 in range(0, g.shape[0], tile):
        j = torch.arange(n0, min(n0 + tile, g.shape[0]), device=q64.device)
        s = (q64[:, None, :] * _exact_rows(g, j, normalize)[None]).sum(-1)
        if exclude is not None:
            s = s.masked_fill(j[None, :] == exclude[:, None], float("-inf"))
        # earlier rows come first, so a stable sort keeps the lower index first among equal scores
        s, order = torch.cat([best_s, s], 1).sort(dim=1, descending=True, stable=True)
        best_s = s[:, :k]
        best_j = torch.cat([best_j, j.expand(n_q, -1)], 1).gather(1, order[:, :k])
    return best_s, best_j


def rerank_exact(q64, g, k, normalize, exclude, cand_q, cand_j, overflow, chunk=4096):
    """Exact scores for the candidate pairs, top-k per query; overflowed queries searched exactly."""
    n_q = q64.shape[0]
    counts = torch.bincount(cand_q, minlength=n_q)
    overflow = overflow | (counts > CANDIDATE_CAP) | (counts < k)  # < k cannot happen: a safety net
    keep = ~overflow[cand_q]
    cand_q, cand_j = cand_q[keep], cand_j[keep]
    s = torch.cat([_exact_pair_scores(q64, g, cand_q[i:i + chunk], cand_j[i:i + chunk], normalize)
                   for i in range(0, cand_q.numel(), chunk)]
                  or [torch.empty(0, dtype=torch.float64, device=q64.device)])
    # order by query, then score descending, then index ascending (stable sorts, last key first)
    order = cand_j.argsort(stable=True)
    order = order[(-s[order]).argsort(stable=True)]
    order = order[cand_q[order].argsort(stable=True)]
    cq, cj, cs = cand_q[order], cand_j[order], s[order]
    counts = torch.bincount(cq, minlength=n_q)
    rank = torch.arange(cq.numel(), device=cq.device) - (torch.cumsum(counts, 0) - counts)[cq]
    top = rank < k
    scores = torch.empty((n_q, k), dtype=torch.float64, device=q64.device)
    idx = torch.empty((n_q, k), dtype=torch.int64, device=q64.device)
    scores[cq[top], rank[top]] = cs[top]
    idx[cq[top], rank[top]] = cj[top]
    ov = overflow.nonzero(as_tuple=True)[0]
    if ov.numel():
        scores[ov], idx[ov] = exact_topk(q64[ov], g, k, normalize, None if exclude is None else exclude[ov])
    return scores, idx


# ----------------------------------------------------------------------------------------------
# Backends and the public function
# ----------------------------------------------------------------------------------------------
def _queries64(q, normalize):
    q64 = q.to(torch.float64)
    return F.normalize(q64, dim=1, eps=NORM_EPS) if normalize else q64


@functools.lru_cache(maxsize=None)
def _int_mm_exact(D: int) -> bool:
    """Whether torch._int_mm (private) multiplies correctly at inner size D here (CPU, D = 1: it does not)."""
    gen = torch.Generator().manual_seed(D)
    a = torch.randint(-127, 128, (3, D), dtype=torch.int8, generator=gen)
    b = torch.randint(-127, 128, (70, D), dtype=torch.int8, generator=gen)
    try:
        return torch.equal(torch._int_mm(a, b.T), a.to(torch.int32) @ b.to(torch.int32).T)
    except RuntimeError:
        return False


def proximity_topk_torch(q, g, k, normalize, exclude, candidates="auto"):
    """torch backend: blocked candidate pass (int8 / bf16 / fp32) and exact float64 re-rank."""
    q64 = _queries64(q, normalize)
    rows = getattr(g, "row_dtype", getattr(g, "dtype", None))  # a gallery file's stored type, or the tensor's
    if candidates == "auto":
        kind = {torch.int8: "int8", torch.float16: "float16"}.get(rows)
        candidates = "fp32" if g.device.type != "cpu" else cpu_candidate_format(kind) if kind \
            else cpu_candidate_format()
    if candidates not in ("int8", "bf16", "fp32"):
        raise ValueError(f"candidates must be 'auto', 'int8', 'bf16' or 'fp32', got {candidates!r}")
    if candidates == "int8" and (g.device.type != "cpu" or not (
            rows in AMX_INT8_ROWS and int8_amx_available(g.shape[1]) or _int_mm_exact(g.shape[1]))):
        candidates = "fp32"
    cand_q, cand_j, overflow = scan_blocked(q64, g, k, normalize, exclude, candidates)
    return rerank_exact(q64, g, k, normalize, exclude, cand_q, cand_j, overflow)


def proximity_topk_triton(q, g, k, normalize, exclude, n_split=None, empty=torch.empty):
    """triton backend: fused similarity + top-k kernel (fp32), then the exact float64 re-rank."""
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gallery contains NaN or inf")
    q64 = _queries64(q, normalize)
    s, j = scan_triton(q64.to(torch.float32), g, k, normalize, exclude, n_split=n_split, empty=empty)
    D = g.shape[1]
    gn = 1.0 if normalize else float(torch.linalg.vector_norm(g.float(), dim=1).max()) * (1 + (D + 8) * U32)
    eps = _eps_fp32(D) * torch.linalg.vector_norm(q64, dim=1) * (1.0 + 1e-12) * gn + 1e-30
    s = s.to(torch.float64)
    L = s[:, k - 1] - eps
    last = s[:, -1]  # any row outside the buffer scores at most this
    overflow = (j[:, -1] >= 0) & (last + eps >= L)
    keep = (j >= 0) & (s + eps[:, None] >= L[:, None])
    cand_q = torch.arange(q.shape[0], device=g.device)[:, None].expand_as(j)[keep]
    return rerank_exact(q64, g, k, normalize, exclude, cand_q, j[keep], overflow)


register("proximity_topk", "triton", devices=("cuda",), dtypes=(torch.float32, torch.float16, torch.bfloat16),
         fits=lambda k, n, d: None if k <= MAX_TRITON_K and n < 2 ** 31 else
         f"k = {k} > {MAX_TRITON_K} or N = {n} >= 2**31",
         requires=requires_triton, interpretable=True)(proximity_topk_triton)
register("proximity_topk", "torch", devices=ANY_DEVICE,
         dtypes=(torch.float64, torch.float32, torch.float16, torch.bfloat16))(proximity_topk_torch)


def _as_tensor(x, name):
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    return x


def _validate(queries, gallery, k, exclude):
    q = _as_tensor(queries, "queries")
    g = gallery if is_row_source(gallery) else _as_tensor(gallery, "gallery")
    for name, t in (("queries", q), ("gallery", g)) if isinstance(g, torch.Tensor) else (("queries", q),):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (rows, embedding dim), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have embedding size {q.shape[1]} but gallery has {g.shape[1]}")
    if len(g.shape) != 2:
        raise ValueError(f"gallery must be 2-D (rows, embedding dim), got shape {tuple(g.shape)}")
    if q.device != g.device:
        raise ValueError(f"queries are on {q.device} but gallery is on {g.device}")
    if not bool(torch.isfinite(q).all()):
        raise ValueError("queries contain NaN or inf")
    N = g.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k > N:
        raise ValueError(f"k = {k} is larger than the gallery size N = {N}")
    if exclude is not None:
        exclude = _as_tensor(exclude, "exclude").to(device=g.device)
        if exclude.dtype.is_floating_point or tuple(exclude.shape) != (q.shape[0],):
            raise ValueError(f"exclude must be an integer tensor of shape ({q.shape[0]},), "
                             f"got {exclude.dtype} {tuple(exclude.shape)}")
        exclude = exclude.to(torch.int64)
        if bool(((exclude < -1) | (exclude >= N)).any()):
            raise ValueError(f"exclude values must be gallery indices in [0, {N}) or -1 (none)")
        if k > N - 1 and bool((exclude >= 0).any()):
            raise ValueError(f"k = {k} is larger than the N - 1 = {N - 1} gallery rows left after exclude")
    return q, g, k, exclude


@torch.no_grad()
def proximity_topk(queries, gallery, k, *, normalize=True, exclude=None, backend=None):
    """The k gallery rows most similar to each query: (scores (Q, k) float32, indices (Q, k) int64).

    Cosine similarity when `normalize` (zero rows score 0), raw inner product otherwise. Sorted by
    score descending, ties to the lower index; identical to an exact float64 search. `exclude`: an
    optional (Q,) int64 gallery index to skip per query (-1: none). Accepts torch tensors or numpy
    arrays; results are on the queries' device (CPU for numpy). `gallery` may also be a gallery file
    opened with `fastforget.gallery.open(path)` (float16 / int8 rows, memory-mapped): it is read in
    tiles, so memory stays flat whatever its size, and the result is exact for the stored rows.
    """
    q, g, k, exclude = _validate(queries, gallery, k, exclude)
    if q.shape[0] == 0:
        return torch.empty((0, k), dtype=torch.float32, device=g.device), \
            torch.empty((0, k), dtype=torch.int64, device=g.device)
    if not isinstance(g, torch.Tensor):  # a gallery file: read in tiles by the blocked CPU pass
        if backend not in (None, "auto", "torch"):
            raise KernelBackendError(f"proximity_topk: backend {backend!r} cannot read a gallery file; "
                                     "use 'torch' (or 'auto')")
        scores, idx = proximity_topk_torch(q, g, k, normalize, exclude)
        return scores.to(torch.float32), idx
    if g.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        g = g.to(torch.float32)
    impl = select("proximity_topk", g.device, g.dtype, backend, k=k, n=g.shape[0], d=g.shape[1])
    scores, idx = impl.fn(q, g, k, normalize, exclude)
    return scores.to(torch.float32), idx


def proximity_topk_reference(queries, gallery, k, *, normalize=True, exclude=None):
    """Exact float64 search (full score matrix in tiles), for tests and benchmarks."""
    q, g, k, exclude = _validate(queries, gallery, k, exclude)
    s, j = exact_topk(_queries64(q, normalize), g, k, normalize, exclude)
    return s.to(torch.float32), j
