"""Property-based tests of the rule users rely on: every entry point (ff.erase, ff.verify, ff.load,
ff.load_encoder, encoder.encode, model.generate, model.generate_tensor, each method's options) given
arbitrary input returns a result or raises a fastforget.errors.FastForgetError whose message names the
offending input (argument, option or file name): never a raw exception, never a hang, never a changed
input (the caller's weights and arrays), never a non-finite output.

Most generated cases are invalid and refused before any work (cheap); the valid ones run on the tiny
random Arc2Face release layout of test_models. Deterministic (derandomize=True). The last test checks
and prints how many cases ran in total."""
from __future__ import annotations

import atexit
import collections
import math
import re
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fastforget as ff
from fastforget.errors import FastForgetError
from fastforget.methods.base import _REGISTRY, register_method, validate_options
from test_models import _emb, _tiny_parts, release  # noqa: F401  (fixture: tiny Arc2Face release layout)

CASES: collections.Counter = collections.Counter()  # cases run, per property
ACCEPTED: collections.Counter = collections.Counter()  # of which returned a result (the rest: a typed error)
PLANNED: dict = {}
MIN_TOTAL = 1000
PER_CASE_S = 60  # a case running longer than this is a hang


def cfg(n: int, name: str):
    PLANNED[name] = n
    return settings(deadline=None, max_examples=n, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


class Hang(BaseException):
    """Raised by the alarm in a case that runs past PER_CASE_S (BaseException: no `except Exception` eats it)."""


@contextmanager
def no_hang(seconds: int = PER_CASE_S):
    import threading

    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield  # no alarms here (Windows, a worker thread): pytest's own timeout, if any, applies
        return

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _names(msg: str, name: str) -> bool:
    """`name` appears in `msg` as a word (so 'n' does not match inside 'neighbours')."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


def call(fn, names, case: str):
    """Run fn: a result, or a FastForgetError naming one of `names`. Anything else fails the property."""
    CASES[case] += 1
    try:
        with no_hang():
            out = fn()
        ACCEPTED[case] += 1
        return out, None
    except FastForgetError as exc:
        msg = str(exc)
        assert any(_names(msg, str(n)) for n in names), f"{type(exc).__name__} names none of {names}: {msg[:300]}"
        return None, exc
    except Hang:
        raise AssertionError(f"{case}: hang (> {PER_CASE_S}s)") from None
    except Exception as exc:  # the property: never a raw exception
        raise AssertionError(f"{case}: raw {type(exc).__name__}: {str(exc)[:300]}") from exc


# ---------------------------------------------------------------- snapshots (never a changed input)
def snap(x):
    """A comparable copy of an input (arrays by bytes, so NaN == NaN)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return ("t", str(t.dtype), tuple(t.shape), t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                if t.numel() and t.dtype != torch.bool else t.tolist())
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            return ("o", x.shape, repr(x.tolist()))
        return ("a", str(x.dtype), x.shape, x.tobytes())
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [snap(v) for v in x])
    if isinstance(x, dict):
        return ("d", [(repr(k), snap(v)) for k, v in x.items()])
    if isinstance(x, float) and math.isnan(x):
        return ("nan",)
    try:
        return ("r", repr(x)) if not hasattr(x, "tobytes") else ("b", x.tobytes())
    except Exception:
        return ("id", id(x))


def weights(model):
    """Every weight of the model, flattened into one float64 vector (names and shapes alongside)."""
    names, flat = [], []
    for part in ("unet", "text_encoder", "vae"):
        module = getattr(model, part, None)
        for n, t in (module.state_dict().items() if module is not None else ()):
            names.append((f"{part}.{n}", tuple(t.shape)))
            flat.append(t.detach().reshape(-1).double())
    return names, torch.cat(flat)


def assert_weights(model, before):
    names, flat = weights(model)
    assert names == before[0] and flat.shape == before[1].shape, "the caller's model changed its parameters"
    if not torch.equal(flat, before[1]):
        i = int((flat != before[1]).nonzero()[0])
        sizes = np.cumsum([math.prod(s) for _, s in names])
        raise AssertionError(f"the caller's model changed: {names[int(np.searchsorted(sizes, i, 'right'))][0]}")


def assert_unit(e, n=None):
    assert isinstance(e, torch.Tensor) and e.dtype == torch.float32 and e.ndim == 2 and e.shape[1] == 512, e
    assert n is None or e.shape[0] == n
    assert torch.isfinite(e).all(), "non-finite embeddings"
    assert torch.allclose(e.norm(dim=1), torch.ones(len(e)), atol=1e-4), "embeddings are not unit norm"


# ---------------------------------------------------------------- strategies
NASTY_NUMBERS = [float("nan"), float("inf"), -float("inf"), 0, -1, -0.0, 0.5, 1.5, 2 ** 31, 2 ** 63, 2 ** 64,
                 2 ** 70, 2 ** 2000, -2 ** 70, 1e308, -1e308, 1e-300, 5e-324, np.float32("nan"), np.int64(-5),
                 np.uint64(2 ** 64 - 1), np.float64(1e308), np.bool_(True), np.int8(3), np.float16(65504)]
junk_scalar = st.one_of(
    st.none(), st.booleans(), st.text(max_size=6), st.binary(max_size=4), st.sampled_from(NASTY_NUMBERS),
    st.integers(), st.floats(), st.complex_numbers(max_magnitude=10), st.builds(object), st.just({}),
    st.just(set()), st.just(range(3)), st.just(Path("/nonexistent/ffprop")),
    st.builds(lambda s: np.full(s, np.nan), st.sampled_from([(), (2,), (2, 2)])),
    st.sampled_from([np.array(["a", "b"]), np.zeros(0), np.ones(3), np.arange(4), torch.ones(2), torch.tensor(7)]))
junk = st.recursive(junk_scalar, lambda c: st.one_of(st.lists(c, max_size=3), st.tuples(c, c),
                                                     st.dictionaries(st.text(max_size=3), c, max_size=2)),
                    max_leaves=4)


@st.composite
def embeddings(draw, valid_weight: int = 1):
    """Identity embeddings, mostly wrong: shapes, dtypes, values, containers."""
    kinds = ["valid"] * valid_weight + ["shape", "nonfinite", "zero", "huge", "ints", "dtype", "lists", "ragged",
                                       "empty", "junk", "tensor", "tiny"]
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(1, 3))
    base = F.normalize(torch.randn(n, 512, generator=torch.Generator().manual_seed(draw(st.integers(0, 99)))),
                       dim=1).double().numpy()
    if kind == "valid":
        scale = draw(st.sampled_from([1.0, 1e-3, 7.0, 1e30, -2.0]))
        how = draw(st.sampled_from(["np32", "np64", "np16", "t32", "t64", "tbf16", "list", "row", "tgrad", "tT"]))
        x = base * scale
        return {"np32": lambda: x.astype(np.float32), "np64": lambda: x,
                "np16": lambda: base.astype(np.float16), "t32": lambda: torch.from_numpy(x).float(),
                "t64": lambda: torch.from_numpy(x), "tbf16": lambda: torch.from_numpy(base).bfloat16(),
                "list": lambda: x.tolist(), "row": lambda: x[0].astype(np.float32),
                "tgrad": lambda: torch.from_numpy(base).float().requires_grad_(),
                "tT": lambda: torch.from_numpy(np.ascontiguousarray(base.T)).float().T}[how]()
    if kind == "shape":
        shape = draw(st.sampled_from([(n, 0), (n, 1), (n, 3), (n, 511), (n, 513), (n, 1024), (1, 2, 512),
                                      (2, 512, 1), (512, n), (), (0,), (3,), (1, 1, 1, 512)]))
        return np.ones(shape, np.float32)
    if kind == "nonfinite":
        x = base.copy()
        x[draw(st.integers(0, n - 1)), draw(st.integers(0, 511))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return draw(st.sampled_from([lambda a: a, lambda a: torch.from_numpy(a).float(), lambda a: a.tolist()]))(x)
    if kind == "zero":
        x = base.copy()
        x[draw(st.integers(0, n - 1))] = 0.0
        return x.astype(np.float32)
    if kind == "huge":
        v = draw(st.sampled_from([1e30, 1e300, 1.7e308, 2 ** 70, 2 ** 1100, -2 ** 1100]))
        if isinstance(v, int):
            return [[v] * 512 for _ in range(n)]
        return np.full((n, 512), v)
    if kind == "ints":
        return draw(st.sampled_from([np.ones((n, 512), np.int64), np.ones((n, 512), np.uint8),
                                     torch.ones(n, 512, dtype=torch.int32), [[1] * 512] * n]))
    if kind == "dtype":
        return draw(st.sampled_from([np.ones((n, 512), bool), np.ones((n, 512), complex),
                                     np.ones((n, 512), object), np.full((n, 512), "a"),
                                     torch.ones(n, 512, dtype=torch.complex64), torch.ones(n, 512, dtype=torch.bool),
                                     np.ones((n, 512), "datetime64[s]")]))
    if kind == "lists":
        bad = draw(junk_scalar)
        rows = base.tolist()
        rows[0][draw(st.integers(0, 511))] = bad
        return rows
    if kind == "ragged":
        return [[0.1] * 512, [0.1] * draw(st.sampled_from([0, 1, 511, 513]))]
    if kind == "empty":
        return draw(st.sampled_from([np.zeros((0, 512), np.float32), torch.zeros(0, 512), [], [[]], (), np.zeros(0)]))
    if kind == "tiny":
        return base * draw(st.sampled_from([1e-30, 1e-310, 5e-324]))
    if kind == "tensor":
        return draw(st.sampled_from([torch.ones(1, 2, 512), torch.full((1, 512), float("nan")).half(),
                                     torch.ones(2, 512).half() * 60000, torch.empty(0, 512).T]))
    return draw(junk)


def bad_ints(valid):
    """Integer arguments: a few valid values and many wrong ones (no mid-size valid values: they cost time)."""
    return st.one_of(st.sampled_from(valid), st.sampled_from([0, -1, -2 ** 70, 2 ** 31, 2 ** 63, 2 ** 64, 2 ** 70,
                                                              2 ** 2000, 10 ** 9, 1.0, 1.5, True, False, "2", None,
                                                              np.int64(-3), np.uint64(2 ** 64 - 1), np.float64(2),
                                                              float("nan"), float("inf"), [1], np.array([1])]),
                     junk_scalar)


def bad_seeds(valid=(0, 1, 123)):
    return st.one_of(st.sampled_from(valid), st.sampled_from([-1, -2 ** 70, 2 ** 64 - 1, 2 ** 64, 2 ** 70,
                                                              2 ** 64 - 2 ** 20, 1.0, 0.5, True, False, "0",
                                                              np.int64(5), np.uint64(2 ** 64 - 1), np.bool_(False),
                                                              float("nan"), [0], (0, 1), np.array([0])]),
                     junk_scalar)


def bad_floats(valid):
    return st.one_of(st.sampled_from(valid), st.sampled_from(NASTY_NUMBERS), st.sampled_from(NASTY_NUMBERS),
                     st.floats(), junk_scalar)


testbed_ids = st.one_of(
    st.sampled_from([0, 7, -1, 2 ** 31, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 2 ** 70, -2 ** 70, np.int64(-1),
                     np.uint64(2 ** 63),
                     np.uint64(2 ** 64 - 1), np.int8(-3), np.array([3, 4]), np.array([2 ** 62]), np.array([-5]),
                     np.array([], np.int64), np.array([[1, 2]]), np.array([1, 2], np.uint64), range(2), range(0),
                     (1,), [], [0, 0], [1, True], [1, 2.0], [np.int64(2), 3], [2 ** 70, 1], [1, -1]]),
    st.lists(st.integers(-2, 10 ** 6), min_size=1, max_size=2))


@st.composite
def images(draw, tmp: Path | None = None):
    from PIL import Image

    tmp = tmp or IMG_DIR
    kind = draw(st.sampled_from(["valid", "valid", "valid", "array", "array", "pil", "list", "path", "junk"]))
    if kind == "valid":  # usable faces (the testbed's are 32 px): arrays, floats in [0, 1], PIL, mixed sizes
        rng = np.random.default_rng(draw(st.integers(0, 9)))
        n, side = draw(st.integers(1, 3)), draw(st.sampled_from([16, 32, 48]))
        a = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        return draw(st.sampled_from([lambda: a, lambda: a[0], lambda: a.astype(np.float32) / 255,
                                     lambda: list(a), lambda: [a[0], a[0][:16, :20]],
                                     lambda: Image.fromarray(a[0]).convert("L")]))()
    if kind in ("array", "list"):
        ndim = draw(st.sampled_from([0, 1, 2, 3, 3, 4, 4, 5]))
        side = lambda: draw(st.sampled_from([0, 1, 15, 16, 32, 33]))  # noqa: E731
        shape = {0: (), 1: (side(),), 2: (side(), side()), 3: (side(), side(), draw(st.sampled_from([3, 3, 1, 4]))),
                 4: (draw(st.sampled_from([0, 1, 2])), side(), side(), draw(st.sampled_from([3, 3, 4]))),
                 5: (1, 1, 16, 16, 3)}[ndim]
        dtype = draw(st.sampled_from(["uint8", "uint8", "uint16", "int32", "float32", "float64", "float16", "bool",
                                      "complex64", "object", "int8"]))
        fill = draw(st.sampled_from(["rand", "zero", "max", "nan", "inf", "neg", "over"]))
        rng = np.random.default_rng(draw(st.integers(0, 9)))
        a = rng.integers(0, 256, shape).astype(dtype) if dtype not in ("float32", "float64", "float16") else \
            rng.random(shape).astype(dtype)
        if a.size and dtype not in ("bool", "object"):
            if fill == "zero":
                a[...] = 0
            elif fill == "max":
                a[...] = np.iinfo(a.dtype).max if np.issubdtype(a.dtype, np.integer) else 1.0
            elif fill in ("nan", "inf") and np.issubdtype(a.dtype, np.inexact):
                a.flat[0] = np.nan if fill == "nan" else np.inf
            elif fill == "neg" and not np.issubdtype(a.dtype, np.unsignedinteger):
                a.flat[0] = -1
            elif fill == "over" and np.issubdtype(a.dtype, np.floating):
                a.flat[0] = 1.5
        return list(a) if kind == "list" and ndim == 4 else [a, a] if kind == "list" else a
    if kind == "pil":
        mode = draw(st.sampled_from(["RGB", "L", "P", "RGBA", "LA", "1", "CMYK", "YCbCr", "HSV", "LAB", "I", "F",
                                     "I;16", "I;16B", "RGBX"]))
        size = draw(st.sampled_from([(1, 1), (15, 40), (16, 16), (32, 32), (40, 24)]))
        return [Image.new(mode, size)] if draw(st.booleans()) else Image.new(mode, size)
    if kind == "path":
        what = draw(st.sampled_from(["missing", "dir", "garbage", "empty", "png", "png16", "truncated", "long", "nul",
                                     "tiny_png", "palette_png", "jpeg"]))
        f = tmp / f"img_{what}_{draw(st.integers(0, 3))}.png"
        if what == "missing":
            f = tmp / "no_such_photo.png"
        elif what == "dir":
            f = tmp / "a_folder.png"
            f.mkdir(exist_ok=True)
        elif what == "garbage":
            f.write_bytes(draw(st.binary(min_size=1, max_size=64)))
        elif what == "empty":
            f.write_bytes(b"")
        elif what in ("png", "truncated", "jpeg"):
            g = f.with_suffix(".jpg") if what == "jpeg" else f
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(g)
            if what == "truncated":
                g.write_bytes(g.read_bytes()[:60])
            f = g
        elif what == "png16":
            Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(f)
        elif what == "tiny_png":
            Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(f)
        elif what == "palette_png":
            Image.new("P", (32, 32)).save(f)
        elif what == "long":
            f = tmp / ("x" * 300 + ".png")
        elif what == "nul":
            return "photo\0.png"
        form = draw(st.sampled_from(["str", "path", "list"]))
        return str(f) if form == "str" else f if form == "path" else [str(f)]
    return draw(junk)


ERASE_PARAMS = {"model", "targets", "method", "retain", "anchor", "encoder", "seed", "progress", "preserve", "salt",
                "report", "verify_n", "anchor_tau"}


# ---------------------------------------------------------------- fixtures
IMG_DIR = Path(tempfile.mkdtemp(prefix="ffprop_files_"))  # module level: @example and strategies use it
atexit.register(shutil.rmtree, IMG_DIR, True)


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache_one_thread(tmp_path_factory):
    """The cache in a temporary folder; one torch thread (the cases are tiny: on a shared 2-core machine a
    second thread's spin-waits made each case 10x slower). Both restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTFORGET_CACHE", str(tmp_path_factory.mktemp("ffprop_cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(release):  # noqa: F811
    class Tiny(tuple):
        def __repr__(self):  # hypothesis prints fixtures of a failing case
            return "<tiny release model, weights>"

    model = ff.load(*release)
    return Tiny((model, weights(model)))


@pytest.fixture(scope="module")
def probe():
    """A registered method that records the request and returns an empty patch: erase() runs every check
    and every resolution step, and nothing is fitted."""
    class Seen(list):
        def __repr__(self):  # hypothesis prints fixtures of a failing case
            return f"<{len(self)} request(s)>"

    seen = Seen()

    @register_method("_ffprop_probe")
    def _probe(model, request, *, seed=0, progress=True, **options):
        seen.append(request)
        return ff.Patch({}, {}, {"method": "_ffprop_probe"})

    yield seen
    _REGISTRY.pop("_ffprop_probe", None)


PRESERVE = _emb(32, 77)


def check_request(req, n_targets=None):
    assert_unit(req.targets, n_targets)
    assert_unit(req.anchors, len(req.targets))
    for x in (req.retain, req.preserve):
        if x is not None and len(x):
            assert_unit(x)
    assert isinstance(req.salt, str) and req.salt


# ---------------------------------------------------------------- check_embeddings (every embedding input)
@cfg(250, "check_embeddings")
@given(x=embeddings(valid_weight=3), name=st.sampled_from(["targets", "retain", "anchor", "preserve", "strangers"]))
def test_check_embeddings(x, name):
    from fastforget.identity.embeddings import check_embeddings

    before = snap(x)
    out, err = call(lambda: check_embeddings(x, name=name), [name], "check_embeddings")
    assert snap(x) == before, "the caller's array changed"
    if err is None:
        assert_unit(out)
    else:
        assert isinstance(err, ff.errors.InputError)


# ---------------------------------------------------------------- erase: identity arguments (nothing fitted)
@cfg(100, "erase_identities")
@given(which=st.sampled_from(["targets", "retain", "anchor", "preserve"]), x=embeddings(valid_weight=2),
       extra=st.sampled_from(["plain", "plain", "ids", "same", "string", "npy"]),
       ids=st.sampled_from([0, -1, 2 ** 70, [0, 1], np.array([3]), [True], np.array([2 ** 62]), (5,)]))
def test_erase_identity_arguments(tiny, probe, tmp_path_factory, which, x, extra, ids):
    model, w0 = tiny
    targets = _emb(2, 1)
    kw = {"targets": targets, "retain": None, "anchor": "auto", "preserve": PRESERVE}
    if extra == "ids":
        x = ids  # testbed ids on a model without an encoder
    elif extra == "same":
        x = targets.clone() if which != "preserve" else torch.cat([targets, PRESERVE])
    elif extra == "string":
        x = {"targets": "photo.jpg", "retain": "nobody", "anchor": "someone", "preserve": "gallery"}[which]
    elif extra == "npy" and which == "preserve":
        d = tmp_path_factory.mktemp("npy")
        f = d / "gallery.npy"
        arr = x if isinstance(x, np.ndarray) and x.dtype != object else np.asarray([1, 2, 3])
        np.save(f, arr, allow_pickle=False) if arr.dtype != object else f.write_bytes(b"garbage")
        x = str(f)
    kw[which] = x
    before = snap(x)
    probe.clear()
    names = [which, "encoder"]
    if isinstance(x, str):
        names.append(x)
    res, err = call(lambda: ff.erase(model, method="_ffprop_probe", report=False, progress=False, **kw), names,
                    "erase_identities")
    assert snap(x) == before, "the caller's input changed"
    assert_weights(model, w0)
    if err is None:
        assert len(probe) == 1
        check_request(probe[0])
        assert_unit(res.anchors)
    else:
        assert not probe, "the method ran although the request was refused"


# ---------------------------------------------------------------- erase on the testbed: ids and images
@cfg(40, "erase_testbed_ids")
@given(which=st.sampled_from(["targets", "retain", "preserve"]), x=st.one_of(testbed_ids, images()))
@example(which="targets", x=[2 ** 63])
@example(which="retain", x=np.array([], np.int64))
@example(which="preserve", x=np.array([2 ** 64 - 1], np.uint64))
@example(which="targets", x=[[np.zeros((32, 32, 3), np.uint8)], [1]])
def test_erase_testbed_ids_and_images(demo_model, probe, which, x):
    """Testbed identity ids and images go through the testbed encoder: bad ids (negative, beyond int64) and bad
    images are refused naming the argument (and the image); nothing is fitted."""
    kw = {"targets": [1], "retain": None, "preserve": PRESERVE, which: x}
    if which == "retain" and isinstance(x, list) and any(type(v) is int and v == 1 for v in x):
        kw["targets"] = [2]
    before = snap(x)
    probe.clear()
    names = [which, f"{which}[0]", f"{which}[1]"] + ([Path(x).name] if isinstance(x, (str, Path)) else [])
    res, err = call(lambda: ff.erase(demo_model, method="_ffprop_probe", report=False, progress=False, **kw), names,
                    "erase_testbed_ids")
    assert snap(x) == before
    if err is None:
        assert len(probe) == 1
        check_request(probe[0])
    else:
        assert not probe


# ---------------------------------------------------------------- erase: scalar arguments (nothing fitted)
SCALARS = {
    "seed": bad_seeds(), "salt": st.one_of(st.text(max_size=5), junk_scalar),
    "anchor_tau": bad_floats([0.0, 0.2, -1.0, 0.89, 0.9, 1.0]),
    "verify_n": bad_ints([1, 10_001]), "progress": st.one_of(st.just(False), junk_scalar),
    "report": st.one_of(st.just(False), junk_scalar.filter(lambda v: v is not True)),
    "method": st.one_of(st.text(max_size=8), st.sampled_from(["Closed_Form", "", "piu "]), junk_scalar),
    "model": st.one_of(junk_scalar.filter(lambda v: not isinstance(v, (str, Path))),
                       st.text(min_size=1, max_size=8).map(lambda s: "/nonexistent/" + s)),
    "encoder": st.one_of(junk_scalar.filter(lambda v: v is not None),
                         st.sampled_from(["x.onnx", "/nonexistent", "a" * 300, "a\0b"]))}


@cfg(250, "erase_scalars")
@given(args=st.sampled_from(sorted(SCALARS)).flatmap(lambda w: st.tuples(st.just(w), SCALARS[w])))
@example(args=("report", np.array([np.nan, np.nan])))
@example(args=("anchor_tau", 2 ** 2000))
@example(args=("verify_n", 10 ** 9))
@example(args=("encoder", "a" * 300))
@example(args=("seed", 2 ** 64 - 1))
def test_erase_scalar_arguments(tiny, probe, args):
    model, w0 = tiny
    which, value = args
    kw = {"model": model, "targets": _emb(1, 3), "method": "_ffprop_probe", "preserve": PRESERVE, "report": False,
          "progress": False, which: value}
    if which == "verify_n":  # a valid verify_n is followed by a bad anchor_tau: nothing is generated
        kw.update(report=True, anchor_tau=float("nan"))
    probe.clear()
    names = [which] + (["progress / report"] if which in ("progress", "report") else []) + \
        (["anchor_tau"] if which == "verify_n" else [])
    if isinstance(value, (str, Path)):
        names.append(str(value))
    res, err = call(lambda: ff.erase(**kw), names, "erase_scalars")
    assert_weights(model, w0)
    if err is None:
        assert len(probe) == 1
        check_request(probe[0], 1)
    else:
        assert not probe


# ---------------------------------------------------------------- method options via ff.erase
OPTION_KEYS = {
    "closed_form": ["erase_weight", "preserve_weight", "retain_weight", "lam", "neighbours", "neighbour_cos",
                    "use_preserve"],
    "uce": ["erase_weight", "preserve_weight", "retain_weight", "lam", "neighbours", "neighbour_cos", "use_preserve"],
    "piu": ["steps", "lr", "weight_decay", "micro_batch", "accumulation", "eta", "lambda_p", "layers"],
    "esd_x": ["steps", "lr", "eta", "micro_batch"],
    "bia": ["mode", "t0", "inversion_steps", "decode_steps", "asymmetric", "neighbours", "radius_max",
            "radius_units", "tau", "C", "rebalance_tries", "k_nearest", "push_margin", "wrapper_threshold",
            "mse_weight", "perceptual_weight", "halvings", "n_augment", "n_sources", "source_steps", "source_guidance",
            "chunk", "steps", "lr", "weight_decay", "batch", "preserve_weight", "trainable", "n_negatives",
            "n_preserve", "n_random", "absorb_target", "anchor_guidance"],
}
option_value = st.one_of(
    junk, st.sampled_from(NASTY_NUMBERS), st.integers(-3, 5), st.floats(-2, 2),
    st.sampled_from(["auto", "x", "full", "absorb", "edit", "relative", "absolute", "x0", "eps", ""]),
    st.lists(st.one_of(st.floats(), st.sampled_from(NASTY_NUMBERS), st.text(max_size=3)), max_size=3),
    st.sampled_from([[0.5, 0.9], (0.9, 0.5), [-1, 0.99], [0.5, 1.0], np.array([0.2, 0.3]), np.array([0.2, 0.3, 0.4]),
                     ["up_blocks.0.resnets"], [""], np.array(["a", "b"]), np.float32(0.5), [True, False]]))


@st.composite
def option_dicts(draw, method):
    keys = OPTION_KEYS[method]
    known = draw(st.dictionaries(st.sampled_from(keys), option_value, min_size=0, max_size=3))
    unknown = draw(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda s: s not in ERASE_PARAMS
                                                                          and s not in keys),
                                   option_value, max_size=1)) if draw(st.integers(0, 4)) == 0 else {}
    return {**known, **unknown}


def _bad_keys(method, options):
    bad = []
    for k, v in options.items():
        try:
            validate_options(method, {k: v})
        except FastForgetError:
            bad.append(k)
    return bad


@cfg(300, "options")
@given(args=st.sampled_from(sorted(OPTION_KEYS)).flatmap(lambda m: st.tuples(st.just(m), option_dicts(m))))
@example(args=("closed_form", {"neighbour_cos": [2 ** 2000, 1]}))
@example(args=("uce", {"lam": 2 ** 2000, "neighbours": 2 ** 70}))
@example(args=("closed_form", {"neighbours": 10 ** 9}))
@example(args=("bia", {"push_margin": 2 ** 2000}))
@example(args=("bia", {"push_margin": [0, 2 ** 2000], "mode": np.array(["a", "b"])}))
@example(args=("piu", {"layers": np.array([0.2, 0.3]), "lr": 2 ** 2000}))
@example(args=("esd_x", {"eta": -2 ** 2000}))
def test_method_options_through_erase(tiny, args):
    """Each option is checked on its own (a dict is refused iff one of its options is), before any work; a bad
    one is named. seed=-1 stops erase right after the option check, so an accepted dict costs nothing."""
    model, w0 = tiny
    method, options = args
    before = snap(options)
    bad, err = None, None
    try:
        bad = _bad_keys(method, options)
    except Exception as exc:
        raise AssertionError(f"validate_options({method!r}, one option): raw {type(exc).__name__}: {exc}") from exc
    _, err = call(lambda: ff.erase(model, _emb(1, 3), method=method, seed=-1, report=False, **options),
                  (bad or ["seed"]) + [repr(k) for k in bad], "options")
    assert err is not None  # seed=-1 is always refused
    msg = str(err)
    ACCEPTED["options"] += not bad  # the options were accepted (erase got as far as the seed)
    if bad:
        assert any(_names(msg, k) or repr(k) in msg for k in bad), f"names none of the bad options {bad}: {msg}"
    else:
        assert msg.startswith("seed"), f"options {options!r} were refused: {msg}"
    assert snap(options) == before


# ---------------------------------------------------------------- closed_form / uce: accepted options fit
fit_options = st.fixed_dictionaries({}, optional={
    "erase_weight": st.sampled_from([1e-300, 1e-6, 1.0, 50.0, 1e6, 1e300, 1.7e308]),
    "preserve_weight": st.sampled_from([0, 0.0, 1e-300, 1.0, 1e300]),
    "retain_weight": st.sampled_from([0.0, 1e-300, 1.0, 1e300]),
    "lam": st.sampled_from([1e-300, 1e-12, 0.1, 10.0, 1e300]),
    "neighbours": st.sampled_from([0, 1, 3]),
    "neighbour_cos": st.sampled_from([[0.75, 0.95], [-1.0, -1.0], [0.999, 0.999], [-1, 0.9999999]]),
    "use_preserve": st.booleans()})


@cfg(20, "fit")
@given(method=st.sampled_from(["closed_form", "uce"]), options=fit_options,
       tau=st.sampled_from([0.0, 0.2, -1.0, 0.85]), retain=st.sampled_from([None, 2, 5]),
       preserve=st.sampled_from(["given", None]))
def test_closed_form_fits_never_crash(tiny, method, options, tau, retain, preserve):
    """Options the checker accepts are fitted: a finite patch, or a typed FitError/InputError naming the
    method or an option; the caller's model and arrays are untouched."""
    model, w0 = tiny
    targets = _emb(2, 11)
    ret = _emb(retain, 12) if retain else None
    pres = PRESERVE if preserve == "given" else None
    before = snap((targets, ret))
    res, err = call(lambda: ff.erase(model, targets, method=method, retain=ret, preserve=pres, anchor_tau=tau,
                                     report=False, progress=False, **options),
                    [method, "anchor_tau", "anchor='auto'", *options], "fit")
    assert snap((targets, ret)) == before
    assert_weights(model, w0)
    if err is None:
        assert all(torch.isfinite(v).all() for v in res.patch.new.values())
        assert res.patch.names and all(".attn2.to_" in n for n in res.patch.names)
        assert_unit(res.anchors, 2)


# ---------------------------------------------------------------- piu / esd_x / bia: accepted edge options fit
FAST = {"piu": {"steps": 1, "micro_batch": 1, "accumulation": 1},
        "esd_x": {"steps": 1, "micro_batch": 1},
        "bia": {"t0": 50, "inversion_steps": 1, "decode_steps": 1, "neighbours": 2, "n_sources": 1, "source_steps": 1,
                "steps": 1, "batch": 1, "n_negatives": 1, "n_preserve": 0, "n_random": 1, "halvings": 0,
                "rebalance_tries": 0, "chunk": 2}}
TINY_FLOATS, HUGE = [1e-300, 5e-324], [1e300, 1.7e308]
EDGES = {
    "piu": {"lr": TINY_FLOATS + [1.0], "weight_decay": [0.0] + HUGE, "eta": [-1e300, 0.0, 1e300],
            "lambda_p": [0.0] + HUGE,
            "layers": ["auto", "x", "full", ["mid_block.attentions.0.transformer_blocks.0.attn2"]],
            "micro_batch": [2], "accumulation": [2]},
    "esd_x": {"lr": TINY_FLOATS + [1.0], "eta": [-1e300, 0.0, 1e300], "micro_batch": [2]},
    "bia": {"radius_max": TINY_FLOATS + [1e6], "C": TINY_FLOATS + HUGE,
            "lr": TINY_FLOATS + [1.0], "tau": [-1.0, 1.0], "push_margin": [0, [0, 1e300], [5, 5]],
            "wrapper_threshold": [0.0, 1e300], "mse_weight": [0.0, 1e300], "perceptual_weight": [0.0, 1e300],
            "preserve_weight": [0.0, 1e300], "source_guidance": [0.0, 100.0], "asymmetric": [False],
            "anchor_guidance": [0.0, 100.0], "absorb_target": ["push"], "radius_units": ["absolute"], "t0": [1, 999],
            "trainable": [["conv_in"], "up_blocks.0.resnets"], "halvings": [3], "rebalance_tries": [2],
            "k_nearest": [1], "chunk": [1, 2 ** 40], "n_preserve": [2]},
}


@st.composite
def edge_options(draw):
    method = draw(st.sampled_from(sorted(EDGES)))
    keys = draw(st.lists(st.sampled_from(sorted(EDGES[method])), min_size=1, max_size=2, unique=True))
    return method, {**FAST[method], **{k: draw(st.sampled_from(EDGES[method][k])) for k in keys}}


@cfg(30, "fit_finetune")
@given(args=edge_options())
@example(args=("piu", {**FAST["piu"], "lr": 1.0, "eta": 1e300}))
@example(args=("bia", {**FAST["bia"], "anchor_guidance": 100.0}))
def test_finetune_and_bia_fits_never_crash(tiny, encoder, args):
    """Accepted extreme options (tiny and huge weights, learning rates, margins) fit to a finite patch or raise a
    typed error naming the method or an option (FitError: non-finite weights, nothing applied)."""
    model, w0 = tiny
    method, options = args
    targets = _emb(1, 31)
    res, err = call(lambda: ff.erase(model, targets, method=method, encoder=encoder, preserve=PRESERVE,
                                     report=False, progress=False, **options), [method, *options], "fit_finetune")
    assert_weights(model, w0)
    if err is None:  # (an lr of 1e-300 changes nothing: an empty patch)
        assert all(torch.isfinite(v).all() for v in res.patch.new.values())


# ---------------------------------------------------------------- generate / generate_tensor
@st.composite
def generate_args(draw):
    kw = {"embeddings": _emb(1, 5), "seed": 0, "steps": 1, "guidance": 3.0}
    which = draw(st.sampled_from(["embeddings", "seed", "steps", "guidance", "output_type", "batch_size", "extra",
                                  "seed_list", None]))
    if which == "embeddings":
        kw["embeddings"] = draw(embeddings())
    elif which == "seed":
        kw["seed"] = draw(bad_seeds())
    elif which == "seed_list":
        kw["embeddings"] = _emb(2, 5)
        kw["seed"] = draw(st.sampled_from([[], [0], [0, 1], [0, 1, 2], (0, -1), [0, 2 ** 64], [0, 1.5], [0, True],
                                           [0, "1"], [np.int64(1), np.uint64(2)]]))
    elif which == "steps":
        kw["steps"] = draw(bad_ints([1, 2, 1000, 1001]))
    elif which == "guidance":
        kw["guidance"] = draw(bad_floats([None, 0.0, 1.0, 7.5, 1e6, 1e30, 1e308]))
    elif which == "output_type":
        kw["output_type"] = draw(st.one_of(st.sampled_from(["pil", "np", "pt", "PIL", "latent", "", None]),
                                           st.text(max_size=4), junk_scalar))
    elif which == "batch_size":
        kw["batch_size"] = draw(bad_ints([1, 64]))
    elif which == "extra":
        kw[draw(st.sampled_from(["cond", "scheduler", "progress", "foo", "height", "num_images"]))] = draw(junk_scalar)
    return which, kw


def _check_images(out, kind, n):
    if kind == "tensor":
        assert isinstance(out, torch.Tensor) and out.shape[0] == n and torch.isfinite(out).all()
        assert out.min() >= -1 and out.max() <= 1
    elif kind == "pil":
        assert isinstance(out, list) and len(out) == n
    else:
        arr = out.numpy() if isinstance(out, torch.Tensor) else out
        assert len(arr) == n and np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1


def _gen(which, **kw):
    return which, {"embeddings": _emb(2 if which == "seed_list" else 1, 5), "seed": 0, "steps": 1, "guidance": 3.0,
                   **kw}


@cfg(130, "generate")
@given(args=generate_args(), entry=st.sampled_from(["generate", "generate_tensor"]))
@example(args=_gen("seed_list", seed=[0]), entry="generate_tensor")
@example(args=_gen("seed_list", seed=[]), entry="generate")
@example(args=_gen("batch_size", batch_size=0), entry="generate_tensor")
@example(args=_gen("extra", cond=object()), entry="generate_tensor")
@example(args=_gen("extra", scheduler=range(3)), entry="generate")
@example(args=_gen("extra", foo=1), entry="generate")
@example(args=_gen("guidance", guidance=1e30), entry="generate_tensor")
@example(args=_gen("output_type", output_type=None), entry="generate")
@example(args=_gen("output_type", output_type=np.array(["pil", "np"])), entry="generate")
def test_generate(tiny, args, entry):
    model, w0 = tiny
    which, kw = args
    if entry == "generate_tensor":  # its own signature: no output_type, no **kw
        if which == "output_type" or (which == "extra" and set(kw) - {"seed", "steps", "guidance", "embeddings",
                                                                      "cond", "scheduler", "progress"}):
            which, kw = None, {k: v for k, v in kw.items() if k in ("embeddings", "seed", "steps", "guidance")}
    emb = kw.pop("embeddings")
    before = snap((emb, kw))
    name = {"seed_list": "seed", "extra": next((k for k in kw if k not in ("seed", "steps", "guidance")), "x"),
            None: "embeddings"}.get(which, which)
    out, err = call(lambda: getattr(model, entry)(emb, **kw), [name, "seed[0]", "seed[1]"], entry)
    assert snap((emb, kw)) == before
    assert_weights(model, w0)
    if err is None:
        n = len(kw["seed"]) if isinstance(kw["seed"], (list, tuple)) else \
            (1 if isinstance(emb, np.ndarray) and emb.ndim == 1 else len(emb))
        _check_images(out, "tensor" if entry == "generate_tensor" else kw.get("output_type", "pil"), n)


# ---------------------------------------------------------------- verify
@st.composite
def verify_args(draw):
    kw = {"targets": _emb(1, 21), "n": 1, "steps": 1, "neighbours": 1}
    which = draw(st.sampled_from(["targets", "retain", "strangers", "anchors", "n", "neighbours", "seed", "steps",
                                  "guidance", "salt", "baseline", "encoder", "target_ids", "model", None]))
    if which in ("targets", "retain", "strangers", "anchors"):
        kw[which] = draw(embeddings())
    elif which in ("n", "neighbours"):
        kw[which] = draw(bad_ints([1, 2, 10 ** 4 + 1, 10 ** 5]))
    elif which == "seed":
        kw["seed"] = draw(bad_seeds((0, 2 ** 64 - 2 ** 20)))
    elif which == "steps":
        kw["steps"] = draw(bad_ints([1, 1001, 10 ** 6]))
    elif which == "guidance":
        kw["guidance"] = draw(bad_floats([None, 0.0, 1e6, 1e30, 1e308]))
    elif which == "salt":
        kw["salt"] = draw(st.one_of(st.text(max_size=4), junk_scalar))
    elif which in ("baseline", "model"):
        kw[which] = draw(st.one_of(junk_scalar.filter(lambda v: v is not None and not isinstance(v, (str, Path))),
                                   st.sampled_from(["/nonexistent/m", "a" * 300, "a\0b", ""])))
    elif which == "encoder":
        kw["encoder"] = draw(st.one_of(junk_scalar.filter(lambda v: v is not None),
                                       st.sampled_from(["x.onnx", "/nonexistent", "a" * 300])))
    elif which == "target_ids":
        kw["target_ids"] = draw(st.one_of(junk_scalar.filter(lambda v: v is not None),
                                          st.sampled_from([[0, 1], [-1], [2 ** 70], ["a"], np.array([1.5])])))
    return which, kw


@cfg(60, "verify")
@given(args=verify_args())
@example(args=("target_ids", {"targets": _emb(1, 21), "n": 1, "steps": 1, "neighbours": 1, "target_ids": [2 ** 70]}))
@example(args=("target_ids", {"targets": _emb(1, 21), "n": 1, "steps": 1, "neighbours": 1, "target_ids": "a"}))
@example(args=("n", {"targets": _emb(1, 21), "n": 10 ** 5, "steps": 1, "neighbours": 1}))
@example(args=("neighbours", {"targets": _emb(1, 21), "n": 1, "steps": 1, "neighbours": 2 ** 70}))
@example(args=("guidance", {"targets": _emb(1, 21), "n": 1, "steps": 1, "neighbours": 1, "guidance": 1e30}))
def test_verify(tiny, encoder, args):
    model, w0 = tiny
    which, kw = args
    kw.setdefault("encoder", encoder)
    m = kw.pop("model", model)
    before = snap({k: v for k, v in kw.items() if k != "encoder"})
    names = [which or "targets"] + ([str(kw[which])] if isinstance(kw.get(which), str) else []) + \
        (["model"] if which == "baseline" else [])
    rep, err = call(lambda: ff.verify(m, **kw), names, "verify")
    assert snap({k: v for k, v in kw.items() if k != "encoder"}) == before
    assert_weights(model, w0)
    if err is None:
        for k, v in rep.metrics.items():
            assert v is None or math.isfinite(v), f"metric {k} = {v}"


# ---------------------------------------------------------------- encoder.encode (images)
@cfg(150, "encode")
@given(x=images(), batch_size=st.one_of(st.just("default"), st.just("default"), bad_ints([1, 2, 512])))
@example(x=["x" * 300 + ".png"], batch_size="default")
@example(x="/tmp/" + "x" * 5000, batch_size="default")
@example(x=[[np.zeros((32, 32, 3), np.uint8)], [1]], batch_size="default")
@example(x=[[[0, 0, 0]] * 16, [[0, 0]] * 16], batch_size="default")
@example(x=np.zeros((1, 32, 32, 3), np.uint8), batch_size=0)
@example(x=np.zeros((1, 32, 32, 3), np.uint8), batch_size=None)
def test_encode(encoder, x, batch_size):
    before = snap(x)
    kw = {} if isinstance(batch_size, str) and batch_size == "default" else {"batch_size": batch_size}
    names = ["targets", "batch_size"] + ([Path(x).name] if isinstance(x, (str, Path)) else [])
    out, err = call(lambda: encoder.encode(x, name="targets", **kw), names, "encode")
    assert snap(x) == before
    if err is None:
        assert_unit(out)


# ---------------------------------------------------------------- ff.load / ff.load_encoder
@st.composite
def model_paths(draw):
    tmp = Path(tempfile.mkdtemp(dir=IMG_DIR))
    what = draw(st.sampled_from(["missing", "empty_dir", "junk_dir", "garbage_file", "long", "nul", "junk",
                                 "manifest", "release_parts"]))
    if what == "missing":
        return str(tmp / ("missing_" + draw(st.text("abc_-.", min_size=1, max_size=6))))
    if what == "empty_dir":
        d = tmp / "empty_model"
        d.mkdir(exist_ok=True)
        return d
    if what == "junk_dir":
        d = tmp / "junk_model"
        d.mkdir(exist_ok=True)
        name = draw(st.sampled_from(["config.json", "model_index.json", "fastforget.json", "unet", "weights.bin"]))
        (d / name).write_bytes(draw(st.sampled_from([b"", b"{", b"[]", b"{\"_class_name\": 3}", b"\xff\xfe",
                                                     b"{\"family\": \"arc2face\"}", b"{\"family\": [1]}"])))
        return d
    if what == "garbage_file":
        f = tmp / ("model" + draw(st.sampled_from([".safetensors", ".ckpt", ".bin", ".onnx", ".json", ""])))
        f.write_bytes(draw(st.binary(max_size=32)))
        return f
    if what == "long":
        return "m" * draw(st.sampled_from([256, 300, 5000]))
    if what == "nul":
        return "demo\0"
    if what == "manifest":  # a fastforget folder whose manifest is wrong
        d = tmp / "ff_model"
        d.mkdir(exist_ok=True)
        json_value = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
                               st.lists(st.integers(), max_size=2), st.just({}))
        meta = draw(st.dictionaries(st.sampled_from(["family", "unshuffle", "resolution", "source"]), json_value,
                                    max_size=2))
        import json

        (d / "fastforget.json").write_text(json.dumps(meta))
        return d
    if what == "release_parts":
        d = tmp / "partial"
        d.mkdir(exist_ok=True)
        for sub in draw(st.lists(st.sampled_from(["arc2face", "encoder", "unet", "text_encoder", "scheduler"]),
                                 max_size=3, unique=True)):
            (d / sub).mkdir(exist_ok=True)
        return d
    return draw(junk)


@cfg(120, "load")
@given(spec=model_paths(), base=st.one_of(st.none(), st.none(), junk_scalar, st.just("/nonexistent/sd15")),
       extra=st.one_of(st.just({}), st.dictionaries(st.sampled_from(["allow_nonfinite", "foo", "dtype"]), junk_scalar,
                                                    max_size=1)))
@example(spec="m" * 5000, base=None, extra={})
@example(spec="demo\0", base=None, extra={})
@example(spec="demo", base=None, extra={"allow_nonfinite": "no"})
def test_load(spec, base, extra):
    names = ["model", "load", "base", "allow_nonfinite", *extra] + \
        ([str(spec), Path(str(spec)).name] if isinstance(spec, (str, Path)) else [])
    kw = {**({"base": base} if base is not None else {}), **extra}
    out, err = call(lambda: ff.load(spec, **kw), names, "load")
    if err is None:
        assert out.is_testbed or out.source  # only "demo"-like specs can load here


@cfg(40, "load_release_options")
@given(base=st.one_of(junk_scalar, st.sampled_from(["", "/nonexistent", "b" * 300, "sd\0"])),
       allow_nonfinite=st.one_of(st.just(False), junk_scalar))
@example(base=123, allow_nonfinite=False)
@example(base=b"/tmp", allow_nonfinite=False)
def test_load_release_options(release, base, allow_nonfinite):  # noqa: F811
    """The release layout with a wrong `base` (or a non-bool allow_nonfinite): refused before any part loads."""
    models, real_base = release
    kw = {"allow_nonfinite": allow_nonfinite} if allow_nonfinite is not False else {}
    names = ["base", "allow_nonfinite", str(models)] + ([str(base)] if isinstance(base, (str, Path)) else [])
    out, err = call(lambda: ff.load(models, base=base, **kw), names, "load_release_options")
    if err is None:  # base=None / "" is dropped; only a real base folder loads
        assert out.source


@cfg(40, "load_encoder")
@given(spec=st.one_of(model_paths(), st.sampled_from(["demo", "demo.onnx", "x.safetensors"])),
       onnx_in_dir=st.one_of(st.none(), st.binary(max_size=16)),
       extra=st.one_of(st.just({}), st.dictionaries(st.sampled_from(["providers", "det_size", "foo"]), junk_scalar,
                                                    max_size=1)))
@example(spec="e" * 5000, onnx_in_dir=None, extra={})
@example(spec="x.onnx", onnx_in_dir=None, extra={"foo": 1})
@example(spec="demo", onnx_in_dir=None, extra={"providers": 5})
def test_load_encoder(spec, onnx_in_dir, extra):
    if isinstance(spec, Path) and spec.is_dir() and onnx_in_dir is not None:
        (spec / "arcface.onnx").write_bytes(onnx_in_dir)
    names = ["encoder", "load_encoder", *extra] + \
        ([str(spec), Path(str(spec)).name] if isinstance(spec, (str, Path)) else []) + \
        (["arcface.onnx"] if isinstance(spec, Path) else [])
    out, err = call(lambda: ff.load_encoder(spec, **extra), names, "load_encoder")
    if err is None:
        assert isinstance(out, ff.IdentityEncoder)


# ---------------------------------------------------------------- a corrupt release layout names the bad file
CORRUPTIONS = ["garbage", "empty", "truncated", "json_list", "json_types", "folder", "missing"]


@cfg(30, "corrupt_release")
@given(part=st.sampled_from(["models/arc2face/config.json", "models/arc2face/diffusion_pytorch_model.safetensors",
                             "models/encoder/config.json", "models/encoder/pytorch_model.bin",
                             "sd15/vae/config.json", "sd15/vae/diffusion_pytorch_model.safetensors",
                             "sd15/scheduler/scheduler_config.json", "sd15/tokenizer/vocab.json",
                             "sd15/tokenizer/merges.txt"]),
       how=st.sampled_from(CORRUPTIONS), junk_bytes=st.binary(min_size=1, max_size=24))
def test_corrupt_release_is_named(release, tmp_path_factory, part, how, junk_bytes):  # noqa: F811
    import json

    models, base = release
    root = tmp_path_factory.mktemp("corrupt", numbered=True)
    shutil.copytree(models, root / "models")
    shutil.copytree(base, root / "sd15")
    f = root / part
    if how == "garbage":
        f.write_bytes(junk_bytes)
    elif how == "empty":
        f.write_bytes(b"")
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    elif how == "json_list":
        f.write_text("[1, 2]")
    elif how == "json_types":
        if f.suffix == ".json":
            cfg_ = json.loads(f.read_text())
            for k in list(cfg_)[:6]:
                cfg_[k] = "x" if not isinstance(cfg_[k], str) else 7
            f.write_text(json.dumps(cfg_))
        else:
            f.write_bytes(b"{}")
    elif how == "folder":
        f.unlink()
        f.mkdir()
    elif how == "missing":
        f.unlink()
    names = [f.name, f.parent.name, str(f.parent), str(root / "models"), "tokenizer", "vae", "scheduler"]
    out, err = call(lambda: ff.load(root / "models", base=root / "sd15"), names, "corrupt_release")
    if err is None:  # some corruptions are harmless (a tokenizer vocab that still has the prompt's tokens)
        x = out.generate_tensor(_emb(1), steps=1)
        assert torch.isfinite(x).all()


# ---------------------------------------------------------------- a model of another family
@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    folder = tmp_path_factory.mktemp("ddpm") / "ddpm"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return ff.load(folder)


@cfg(20, "other_family")
@given(entry=st.sampled_from(["erase", "verify", "baseline"]),
       method=st.sampled_from(["closed_form", "uce", "piu", "esd_x", "bia"]), report=st.booleans())
def test_unconditional_model_is_refused_by_identity_entry_points(unconditional, tiny, encoder, entry, method, report):
    """An unconditional model (no identity conditioning) given to erase / verify: a typed error naming `model`
    (or `report` / `baseline`, or bia's own refusal), before any work."""
    model, _ = tiny
    if entry == "erase":
        fn = lambda: ff.erase(unconditional, _emb(1, 41), method=method, encoder=encoder, preserve=PRESERVE,  # noqa: E731
                              report=report, progress=False, verify_n=1, **FAST.get(method, {}))
    elif entry == "verify":
        fn = lambda: ff.verify(unconditional, _emb(1, 41), encoder=encoder, n=1, steps=1, neighbours=1)  # noqa: E731
    else:
        fn = lambda: ff.verify(model, _emb(1, 41), encoder=encoder, n=1, steps=1, neighbours=1,  # noqa: E731
                               baseline=unconditional)
    _, err = call(fn, ["model", "report", "baseline", "bia"], "other_family")
    assert err is not None


# ---------------------------------------------------------------- the total
def test_total_cases(request):
    total = sum(CASES.values())
    planned = sum(PLANNED.values())
    line = (f"test_properties: {total} generated cases run ({planned} planned as max_examples): "
            + ", ".join(f"{k}={v} ({ACCEPTED[k]} accepted)" for k, v in sorted(CASES.items())))
    rep = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if rep is not None and capman is not None:
        with capman.global_and_fixture_disabled():  # past pytest's capture: shown without -s
            rep.write_line("\n" + line)
    else:
        print(line, file=sys.stderr)
    if len(CASES) < len(PLANNED):
        pytest.skip("run as a part of the file: the other properties did not all run")
    assert planned >= MIN_TOTAL
    assert total >= MIN_TOTAL, line
