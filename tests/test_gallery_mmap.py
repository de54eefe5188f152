"""Gallery files (ff.gallery.save(..., dtype=...) / ff.gallery.open): exact search over memory-mapped
float16 / int8 rows, flat memory, and typed errors for damaged files."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget.errors import EmbeddingError, InputError, OutputExistsError
from fastforget.identity import gallery as G
from fastforget.identity.embeddings import check_embeddings
from fastforget.kernels import proximity as P

DTYPES = ["float16", "int8"]


def rows_with_ties(n, d, seed):
    """Random rows, some duplicated (exact ties) and some near-duplicates closer than bf16 resolves."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, d, generator=gen)
    g[7::50] = g[3].clone()  # ties with row 3
    g[11::97] = g[5] + 1e-4 * torch.randn(len(g[11::97]), d, generator=gen)
    q = torch.randn(9, d, generator=gen)
    q[0] = g[3]  # its best rows are a tie block
    q[1] = g[5]
    return q, g


def file_values(gf):
    """float64 values of every row, read through the same gather the re-rank uses."""
    return gf.gather_rows(torch.arange(gf.shape[0]))


def exact(q, values, k, exclude=None, normalize=True):
    return P.proximity_topk_reference(q, values, k, normalize=normalize, exclude=exclude)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 9,000 x 64 rows (three bf16 tiles, the last ragged) as float16 and int8 gallery files."""
    q, g = rows_with_ties(9000, 64, seed=0)
    out = {}
    for dtype in DTYPES:
        path = tmp_path_factory.mktemp("g") / f"g_{dtype}.ffg"
        G.write_file(path, [g[:5000], g[5000:]], dtype)  # two chunks: how a beyond-RAM gallery is written
        out[dtype] = ff.gallery.open(path)
    return q, g, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("candidates", ["auto", "bf16", "int8", "fp32"])
def test_file_search_equals_float64_search(files, dtype, candidates):
    q, _, gfs = files
    gf = gfs[dtype]
    vals = file_values(gf)
    exclude = torch.full((len(q),), -1)
    exclude[0], exclude[2], exclude[4] = 3, 8999, 4500  # a tied row, the ragged tile's last row, mid-file
    for k in (1, 10, 60):  # 60 > the 51-row tie block: the tie spills past the candidates of one tile
        for excl in (None, exclude):
            if candidates == "auto":
                s, i = ff.kernels.proximity_topk(q, gf, k, exclude=excl)
            else:
                s, i = P.proximity_topk_torch(q, gf, k, True, excl, candidates=candidates)
            rs, ri = exact(q, vals, k, exclude=excl)
            assert torch.equal(i, ri), f"{int((i != ri).any(1).sum())} queries differ (k={k})"
            torch.testing.assert_close(s.double(), rs.double(), rtol=1e-6, atol=1e-7)
    # ties go to the lower index: query 0 is row 3, whose copies 7, 57, 107, ... all score 1
    assert ff.kernels.proximity_topk(q[:1], gf, 4)[1].tolist() == [[3, 7, 57, 107]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_tiles_and_k_beyond_a_tile(files, dtype):
    # tiles of 64 rows and k = 100 > a tile: the first tiles cannot bound the k-th score yet
    q, _, gfs = files
    gf = gfs[dtype]
    q64 = P._queries64(q, True)
    cq, cj, overflow = P.scan_blocked(q64, gf, 100, True, None, "bf16", tile=64, workers=2)
    s, i = P.rerank_exact(q64, gf, 100, True, None, cq, cj, overflow)
    assert torch.equal(i, exact(q, file_values(gf), 100)[1])


def test_raw_inner_product_and_zero_rows(tmp_path):
    # write_file(normalize=False) keeps rows as given: zero rows score 0, norms matter
    q, g = rows_with_ties(3000, 40, seed=1)
    g[100] = 0
    g[::3] *= 3.0
    for dtype in ("int8", "float16", "float32"):
        path = tmp_path / f"raw_{dtype}.ffg"
        G.write_file(path, [g], dtype, normalize=False)
        with ff.gallery.open(path) as gf:
            vals = file_values(gf)
            assert torch.equal(vals[100], torch.zeros(40, dtype=torch.float64))
            for normalize in (True, False):
                i = ff.kernels.proximity_topk(q, gf, 12, normalize=normalize)[1]
                assert torch.equal(i, exact(q, vals, 12, normalize=normalize)[1]), (dtype, normalize)
            # a query orthogonal to everything but the zero row still gets an exact, tie-ordered answer
            i = ff.kernels.proximity_topk(torch.zeros(1, 40), gf, 5, normalize=True)[1]
            assert i.tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_save_open_round_trip(tmp_path, dtype):
    gen = torch.Generator().manual_seed(2)
    emb = F.normalize(torch.randn(300, 512, generator=gen), dim=1)
    path = ff.gallery.save(tmp_path / "faces.ffg", emb, dtype=dtype)
    with ff.gallery.open(path) as gf:
        assert gf.shape == (300, 512) and gf.dtype == dtype and len(gf) == 300
        v = gf.values()
        if dtype == "float16":
            assert torch.equal(v, check_embeddings(emb).half().float())  # rows are checked and unit-scaled first
            assert gf.array.dtype == np.float16 and isinstance(gf.array, np.memmap)
        else:
            assert gf.array.dtype == np.int8 and gf.scale.shape == (300,)
            assert float((v - emb).abs().max()) <= float(emb.abs().max(1).values.max()) / 254 + 1e-6
        # the stored rows of the file ARE the gallery: load() reads them whole as unit rows
        torch.testing.assert_close(ff.gallery.load(path), F.normalize(v.double(), dim=1).float())
        copy = pickle.loads(pickle.dumps(gf))  # e.g. sent to a Ray worker: by path, a few hundred bytes
        assert len(pickle.dumps(gf)) < 1000 and copy.shape == gf.shape and torch.equal(copy.values(), v)
    size = os.path.getsize(path)
    assert size == 4096 + 300 * 512 * (2 if dtype == "float16" else 1) + (4 * 300 + 0 if dtype == "int8" else 0)


def test_save_never_overwrites_and_leaves_nothing_on_error(tmp_path):
    emb = F.normalize(torch.randn(10, 512), dim=1)
    path = ff.gallery.save(tmp_path / "g.ffg", emb, dtype="int8")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        ff.gallery.save(path, emb * 2, dtype="int8")
    assert path.read_bytes() == before
    bad = emb.clone()
    bad[4, 0] = float("nan")
    with pytest.raises(EmbeddingError, match="gallery rows 10..19"):  # the second chunk, named by its rows
        G.write_file(tmp_path / "h.ffg", [emb, bad], "float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.ffg"]  # no partial file, no temporary
    with pytest.raises(InputError, match="gallery dtype"):
        ff.gallery.save(tmp_path / "x.ffg", emb, dtype="bfloat16")
    with pytest.raises(InputError, match=r"expected an \(n, 512\) chunk"):
        G.write_file(tmp_path / "x.ffg", [emb, emb[:, :10]], "int8")
    path.chmod(0o644)
    ff.gallery.save(path, emb * 2, dtype="float16", overwrite=True)
    assert ff.gallery.open(path).dtype == "float16"


def _damage(path, tmp_path, how):
    data = bytearray(path.read_bytes())
    out = tmp_path / f"bad_{how}.ffg"
    hlen = struct.unpack("<I", data[8:12])[0]
    header = json.loads(data[12:12 + hlen])
    if how == "truncated":
        data = data[:-100]
    elif how == "longer":
        data += b"\0" * 8
    elif how == "magic":
        data[:8] = b"NOTAGALL"
    elif how in ("dtype", "version", "rows", "json"):
        if how == "json":
            blob = b"{not json"
        else:
            header.update({"dtype": {"dtype": "int4"}, "version": {"version": 9}, "rows": {"rows": -3}}[how])
            blob = json.dumps(header).encode()
        data[8:ROWS] = struct.pack("<I", len(blob)) + blob + b"\0" * (ROWS - 12 - len(blob))
    elif how == "scale":
        data[header["scale_offset"] + 4 * 17:header["scale_offset"] + 4 * 18] = struct.pack("<f", -1.0)
    out.write_bytes(bytes(data))
    return out


ROWS = G.ROWS_OFFSET


@pytest.mark.parametrize("how, match", [
    ("truncated", "truncated"), ("longer", "longer than its header"), ("magic", "not a fastforget gallery file"),
    ("dtype", "unknown gallery row dtype"), ("version", "version 9"), ("rows", "damaged gallery file header"),
    ("json", "damaged gallery file header"), ("scale", r"row scale\(s\) at \[17\]"),
])
def test_damaged_files_raise_typed_errors_naming_the_file(tmp_path, how, match):
    path = ff.gallery.save(tmp_path / "g.ffg", F.normalize(torch.randn(40, 512), dim=1), dtype="int8")
    bad = _damage(path, tmp_path, how)
    with pytest.raises(InputError, match=match) as exc:
        ff.gallery.open(bad)
    assert str(bad) in str(exc.value)


def test_other_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        ff.gallery.open(tmp_path / "missing.ffg")
    npy = tmp_path / "g.npy"
    ff.gallery.save(npy, F.normalize(torch.randn(5, 512), dim=1))
    with pytest.raises(InputError, match="a .npy array, not a gallery file"):
        ff.gallery.open(npy)
    # NaN rows in a float16 file (written by something else) are found while searching, named by file and rows
    q, g = rows_with_ties(5000, 32, seed=3)
    path = G.write_file(tmp_path / "nan.ffg", [g], "float16")
    data = bytearray(path.read_bytes())
    off = ROWS + (4500 * 32 + 3) * 2
    data[off:off + 2] = np.array([np.nan], dtype="<f2").tobytes()
    path.write_bytes(bytes(data))
    with ff.gallery.open(path) as gf:
        for fmt in ("bf16", "int8", "fp32"):
            with pytest.raises(InputError, match=rf"{path}.*NaN or inf in rows 4096\.\.4999|{path}.*NaN or inf"):
                P.proximity_topk_torch(q, gf, 3, True, None, candidates=fmt)
        with pytest.raises(ValueError, match="embedding size 31"):
            ff.kernels.proximity_topk(q[:, :31], gf, 3)
        with pytest.raises(ValueError, match="larger than the gallery size"):
            ff.kernels.proximity_topk(q, gf, 5001)
        with pytest.raises(ff.kernels.KernelBackendError, match="cannot read a gallery file"):
            ff.kernels.proximity_topk(q, gf, 3, backend="triton")


def test_memory_stays_flat_on_a_file_many_tiles_long(tmp_path):
    # 240,000 x 128 float16 = 59 MB on disk, 59 bf16 tiles of 4,096 rows; peak resident memory of a fresh
    # process searching it must grow by far less than the file (tiles are read, not kept or mapped)
    path = tmp_path / "big.ffg"
    gen = torch.Generator().manual_seed(4)
    G.write_file(path, (torch.randn(40_000, 128, generator=gen) for _ in range(6)), "float16")
    size_mb = path.stat().st_size / 2 ** 20
    script = textwrap.dedent(f"""
        import torch, fastforget as ff
        torch.set_num_threads(1)
        def mb(field):
            for line in open("/proc/self/status"):
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        gf = ff.gallery.open({str(path)!r})
        q = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
        ff.kernels.proximity_topk(q[:2], gf, 10)
        base = mb("VmRSS")
        ff.kernels.proximity_topk(q, gf, 10)
        print(base, mb("VmHWM"))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    base, peak = map(float, out.stdout.split())
    assert peak - base < size_mb / 3, f"peak RSS grew {peak - base:.1f} MB searching a {size_mb:.0f} MB file"


def test_anchor_selection_streams_a_file_and_matches_the_tensor_rule(tmp_path, monkeypatch):
    from fastforget.identity import anchors as A

    gen = torch.Generator().manual_seed(5)
    pool = F.normalize(torch.randn(3000, 512, generator=gen), dim=1)
    targets = F.normalize(torch.randn(4, 512, generator=gen), dim=1)
    targets[3] = pool[123]  # that row is the target itself (cos 1): never its anchor
    path = ff.gallery.save(tmp_path / "pool.ffg", pool, dtype="int8")
    in_ram = ff.gallery.load(path)
    for tau in (0.05, 0.0, 0.3):  # random 512-d rows sit at |cos| < 0.2: at 0.3 the nearest to tau is taken
        want = A.select_anchors(targets, in_ram, tau=tau, seed=3)
        monkeypatch.setattr(A, "POOL_TILE", 700)  # many tiles, the last ragged: same rule, same anchors
        for pool_arg in (path, ff.gallery.open(path)):
            got = A.select_anchors(targets, pool_arg, tau=tau, seed=3)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        monkeypatch.setattr(A, "POOL_TILE", 65536)
        cos = (targets.double() * in_ram[want[1]].double()).sum(1)
        assert (cos < 0.9).all() and want[1][3] != 123
        if tau != 0.3:
            assert ((cos - tau).abs() < 0.01).all()
    with pytest.raises(InputError, match="not a gallery file"):
        A.select_anchors(targets, str(tmp_path / "pool.npy"))


def test_erase_takes_a_gallery_file_as_preserve_and_anchor(tmp_path, monkeypatch):
    from fastforget.api import _resolve_preserve
    from fastforget.identity import preservation
    from fastforget.identity.anchors import testbed_gallery

    model, enc = ff.load("demo"), ff.load_encoder("demo")
    faces = testbed_gallery(enc, n=200, first_id=800_000)  # identities nobody names in this test
    path = ff.gallery.save(tmp_path / "faces.ffg", faces, dtype="float16")
    pres = _resolve_preserve(path, model, lambda: enc, 0, False)
    assert pres.kind == "gallery file" and len(pres.embeddings) == 200 and len(pres.anchor_pool) == 200
    monkeypatch.setattr(preservation, "FILE_PRESERVE_ROWS", 50)  # a file larger than what an edit holds
    pres = _resolve_preserve(str(path), model, lambda: enc, 0, False)
    assert len(pres.embeddings) == 50 and len(pres.anchor_pool) == 200
    res = ff.erase(model, [3], method="closed_form", encoder=enc, preserve=path, anchor=path, report=False,
                   progress=False)
    stored = ff.gallery.load(path)
    assert float((res.anchors @ stored.T).max()) > 0.9999  # the anchor is a row of the file
    assert abs(float(res.anchors[0] @ enc.encode(ff.testbed.render([3], 1, seed=0)[0])[0]) - 0.2) < 0.2


def test_candidate_overflow_on_a_file_falls_back_to_an_exact_streamed_search(tmp_path, monkeypatch):
    # every row ties but one: every row stays a candidate, the queries overflow and are searched exactly
    # by reading the file in tiles
    gen = torch.Generator().manual_seed(8)
    g = torch.randn(1, 32, generator=gen).repeat(1500, 1)
    g[700] += 0.5
    path = G.write_file(tmp_path / "ties.ffg", [g], "float16")
    q = torch.randn(4, 32, generator=gen)
    calls = []
    exact_topk = P.exact_topk
    monkeypatch.setattr(P, "exact_topk", lambda *a, **kw: calls.append(1) or exact_topk(*a, **kw))
    monkeypatch.setattr(P, "CANDIDATE_CAP", 64)
    exclude = torch.tensor([700, 0, -1, 3])
    with ff.gallery.open(path) as gf:
        i = ff.kernels.proximity_topk(q, gf, 5, exclude=exclude)[1]
        assert calls, "the overflowed queries were not searched exactly"
        assert torch.equal(i, exact(q, file_values(gf), 5, exclude=exclude)[1])


amx_int8 = pytest.mark.skipif(not P.int8_amx_available(64), reason="no oneDNN int8 linear in this torch build")


@amx_int8
@pytest.mark.parametrize("normalize", [True, False])
def test_int8_file_amx_hit_test_keeps_every_pair_that_may_reach_the_threshold(files, normalize):
    # the int8 tile (rows as stored, the threshold folded into the product's weight scales) must return every
    # (query, row) whose exact float64 score reaches the block's current bound L, and nothing far below it
    q, _, gfs = files
    gf = gfs["int8"]
    q64 = P._queries64(q, normalize)
    vals = file_values(gf)
    rows, scale = gf.read_rows(0, 4096)
    tile = P._Int8AmxTile(rows, scale, normalize, 64)
    ref = q64 @ (F.normalize(vals[:4096], dim=1) if normalize else vals[:4096]).T
    for pct in (0.9, 0.99, 0.999):
        block = P._QueryBlock(q64, torch.arange(len(q)), "int8", 10)
        block.best_lo[:] = ref.quantile(pct, dim=1)[:, None]  # the bound L per query
        got_q, got_j = tile.candidates(block, 64, 0, None)
        got = set(zip(got_q.tolist(), got_j.tolist()))
        want = set(zip(*(t.tolist() for t in (ref >= block.best_lo[:, -1:]).nonzero(as_tuple=True))))
        assert want <= got, f"{len(want - got)} pairs at or above L were dropped (pct {pct})"
        assert list(got_q) == sorted(got_q.tolist())  # grouped by query, as the scan merges them
        # a superset, but a tight one: the int8 error bound is a few 1e-2 of |q| |g| at most
        lo = (ref[got_q, got_j] - block.best_lo[got_q, -1]) / (q64.norm(dim=1)[got_q] * (1 if normalize else
                                                                                        vals[:4096].norm(dim=1).max()))
        assert float(lo.min()) > -0.05
    # no bound yet (L = -inf): the tile asks for the dense pass instead
    block = P._QueryBlock(q64, torch.arange(len(q)), "int8", 10)
    assert tile.candidates(block, 64, 0, None) == (None, None)


@amx_int8
def test_int8_file_amx_pass_small_tiles_two_workers_and_exclude(files):
    # tiles of 64 rows on two workers, k beyond a tile, excluded rows: index for index the float64 search
    q, _, gfs = files
    gf = gfs["int8"]
    q64 = P._queries64(q, True)
    exclude = torch.full((len(q),), -1)
    exclude[0], exclude[3] = 3, 8999
    for k, excl in ((100, None), (7, exclude)):
        cq, cj, overflow = P.scan_blocked(q64, gf, k, True, excl, "int8", tile=64, workers=2)
        s, i = P.rerank_exact(q64, gf, k, True, excl, cq, cj, overflow)
        assert torch.equal(i, exact(q, file_values(gf), k, exclude=excl)[1])


def test_candidate_format_is_measured_per_stored_row_type():
    fmts = P.cpu_candidate_formats()
    for rows in ("int8", "float16", "float32"):
        assert P.cpu_candidate_format(rows) in fmts
    assert all(P._candidate_seconds(f, q_rows=16, tile=256, D=64, reps=1, rows="int8") > 0 for f in fmts)


def test_read_rows_into_a_reused_buffer(files):
    _, _, gfs = files
    for gf in gfs.values():
        fresh, scale = gf.read_rows(4096, 8192)
        out = torch.empty(4096, gf.shape[1], dtype=gf.row_dtype)
        got, scale2 = gf.read_rows(4096, 8192, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, fresh)
        assert (scale is None and scale2 is None) or torch.equal(scale, scale2)
        with pytest.raises(ValueError, match="read_rows out"):
            gf.read_rows(0, 10, out=torch.empty(10, gf.shape[1], dtype=torch.float64))
