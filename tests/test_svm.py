"""fastforget.svm: the native dual-CD linear SVM against scikit-learn, its optimality, determinism
and input checks; and the thin wrappers around the native boundary-sampling helpers."""
import warnings

import numpy as np
import pytest

import fastforget.svm as svm
from fastforget import _native


def blobs(n, d, sep, seed=0, scale=1.0):
    """Two overlapping (or, for large sep, separable) Gaussian blobs, float32, labels {0, 1}."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    X = rng.standard_normal((n, d)) + np.outer((2 * y - 1) * sep / 2, u)
    return (X * scale).astype(np.float32), y


def objectives(X, y01, model, loss):
    """Primal P(w, b), dual D(alpha) and max |projected gradient|, all in float64.
    The bias is the weight of a constant feature of value 1 (intercept_scaling=1), as in liblinear."""
    X = X.astype(np.float64)
    y = np.where(y01 == model.classes_[1], 1.0, -1.0)
    C = model.C
    a = model.alpha_
    w, b = model.coef_.ravel(), model.intercept_[0]
    # the primal point is the one the dual variables define
    np.testing.assert_allclose((a * y) @ X, w, rtol=0, atol=1e-9 * max(1.0, np.abs(w).max()))
    np.testing.assert_allclose((a * y).sum(), b, rtol=0, atol=1e-9 * max(1.0, abs(b)))
    margin = y * (X @ w + b)
    reg = 0.5 * (w @ w + b * b)
    if loss == "hinge":
        P = reg + C * np.maximum(0.0, 1.0 - margin).sum()
        D = a.sum() - reg
        G = margin - 1.0
        upper = C
    else:
        P = reg + C * (np.maximum(0.0, 1.0 - margin) ** 2).sum()
        D = a.sum() - reg - (a ** 2).sum() / (4.0 * C)
        G = margin - 1.0 + a / (2.0 * C)
        upper = np.inf
    PG = np.where(a <= 0, np.minimum(G, 0.0), np.where(a >= upper, np.maximum(G, 0.0), G))
    return P, D, np.abs(PG).max()


# ----------------------------------------------------------------------------- vs scikit-learn
CASES = {
    "separable": dict(n=600, d=30, sep=8.0),
    "overlapping": dict(n=1500, d=40, sep=1.5),
    "high_dim": dict(n=200, d=1500, sep=1.0),
}


@pytest.mark.filterwarnings("ignore:Liblinear failed to converge")
@pytest.mark.parametrize("loss", ["squared_hinge", "hinge"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_sklearn_linearsvc(case, loss):
    sklearn_svm = pytest.importorskip("sklearn.svm")
    c = CASES[case]
    X, y = blobs(c["n"], c["d"], c["sep"], seed=1, scale=1.0 / np.sqrt(c["d"]) * 3)
    Xt, yt = blobs(2000, c["d"], c["sep"], seed=2, scale=1.0 / np.sqrt(c["d"]) * 3)
    ours = svm.LinearSVM(C=1.0, loss=loss, tol=1e-4, max_iter=5000).fit(X, y)
    ref = sklearn_svm.LinearSVC(C=1.0, loss=loss, tol=1e-4, max_iter=5000, dual=True, random_state=0).fit(X, y)
    assert ours.converged_
    for A, B in ((X, y), (Xt, yt)):
        assert abs(ours.score(A, B) - ref.score(A, B)) <= 0.005
        same_sign = np.mean(np.sign(ours.decision_function(A)) == np.sign(ref.decision_function(A)))
        assert same_sign >= 0.99
    assert ours.coef_.shape == ref.coef_.shape == (1, c["d"])
    assert ours.intercept_.shape == ref.intercept_.shape == (1,)
    cos = (ours.coef_ @ ref.coef_.T).item() / (np.linalg.norm(ours.coef_) * np.linalg.norm(ref.coef_))
    assert cos > 0.999


@pytest.mark.parametrize("class_weight", ["balanced", {0: 3.0, 1: 0.5}])
def test_class_weight_matches_sklearn(class_weight):
    sklearn_svm = pytest.importorskip("sklearn.svm")
    rng = np.random.default_rng(3)
    y = (rng.random(1200) < 0.2).astype(int)  # imbalanced 20 / 80
    X = (rng.standard_normal((1200, 20)) + 1.2 * y[:, None] * (np.arange(20) < 3)).astype(np.float32) / 3
    ours = svm.LinearSVM(C=1.0, class_weight=class_weight).fit(X, y)
    ref = sklearn_svm.LinearSVC(C=1.0, class_weight=class_weight, dual=True).fit(X, y)
    same = np.mean(np.sign(ours.decision_function(X)) == np.sign(ref.decision_function(X)))
    assert same >= 0.99
    assert abs(ours.score(X, y) - ref.score(X, y)) <= 0.005
    plain = svm.LinearSVM(C=1.0).fit(X, y)
    assert not np.array_equal(plain.coef_, ours.coef_)  # the weights do change the problem


# ----------------------------------------------------------------------------- optimality
@pytest.mark.parametrize("loss", ["squared_hinge", "hinge"])
@pytest.mark.parametrize("C", [0.1, 1.0])
@pytest.mark.parametrize("sep", [1.0, 6.0])
def test_duality_gap_below_tol(loss, C, sep):
    """liblinear's rule stops when every projected gradient is within tol of 0; at that point
    P - D = sum_i [alpha_i G_i + C max(0, -G_i)] <= 2 tol sum_i C_i, so the gap per unit of C is below tol."""
    tol = 1e-4
    X, y = blobs(500, 25, sep, seed=4)
    m = svm.LinearSVM(C=C, loss=loss, tol=tol, max_iter=20000).fit(X, y)
    assert m.converged_ and 0 < m.n_iter_ < 20000
    P, D, pg = objectives(X, y, m, loss)
    assert pg <= tol * 1.01
    assert -1e-9 * abs(P) <= P - D <= tol * C * len(y)
    if loss == "squared_hinge":  # smooth dual: the gap is far smaller, relative to the objective too
        assert (P - D) / P <= tol


def test_tighter_tol_gives_smaller_gap():
    X, y = blobs(800, 30, 2.0, seed=5, scale=0.5)
    gaps = []
    for tol in (1e-2, 1e-4, 1e-6):
        m = svm.LinearSVM(loss="hinge", tol=tol, max_iter=50000).fit(X, y)
        P, D, _ = objectives(X, y, m, "hinge")
        gaps.append(P - D)
    assert gaps[0] > gaps[1] > gaps[2] >= -1e-9


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_any_thread_count():
    X, y = blobs(700, 64, 1.0, seed=6, scale=0.3)
    a = svm.LinearSVM(seed=7, n_threads=1).fit(X, y)
    b = svm.LinearSVM(seed=7, n_threads=2).fit(X, y)
    c = svm.LinearSVM(seed=7, n_threads=2).fit(X.copy(), y.copy())
    assert a.coef_.tobytes() == b.coef_.tobytes() == c.coef_.tobytes()
    assert a.intercept_.tobytes() == b.intercept_.tobytes() == c.intercept_.tobytes()
    assert a.alpha_.tobytes() == c.alpha_.tobytes() and a.n_iter_ == c.n_iter_
    d = svm.LinearSVM(seed=8).fit(X, y)
    assert d.coef_.tobytes() != a.coef_.tobytes()  # another permutation stream...
    np.testing.assert_allclose(d.coef_, a.coef_, atol=1e-3 * np.abs(a.coef_).max())  # ...same optimum


def test_fits_from_python_threads():
    """fit releases the GIL and keeps no global state: concurrent fits equal serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    data = [blobs(600, 80, 1.0, seed=s, scale=0.3) for s in range(4)]
    serial = [svm.LinearSVM(n_threads=1).fit(X, y).coef_ for X, y in data]
    with ThreadPoolExecutor(4) as ex:
        par = list(ex.map(lambda Xy: svm.LinearSVM(n_threads=1).fit(*Xy).coef_, data))
    assert all(a.tobytes() == b.tobytes() for a, b in zip(serial, par))


def test_decision_function_threads_agree():
    X, y = blobs(3000, 100, 1.0, seed=9, scale=0.3)
    m1 = svm.LinearSVM(n_threads=1).fit(X, y)
    m2 = svm.LinearSVM(n_threads=2).fit(X, y)
    d1, d2 = m1.decision_function(X), m2.decision_function(X)
    assert d1.dtype == np.float64 and d1.shape == (3000,)
    assert d1.tobytes() == d2.tobytes()
    ref = X.astype(np.float64) @ m1.coef_.ravel() + m1.intercept_[0]
    np.testing.assert_allclose(d1, ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- API
@pytest.mark.parametrize("labels", [(0, 1), (-1, 1), (3, 7), ("cat", "dog"), (True, False)])
def test_any_two_labels(labels):
    X, y01 = blobs(300, 10, 6.0, seed=10)
    y = np.array(labels, dtype=object if isinstance(labels[0], str) else None)[y01]
    m = svm.LinearSVM().fit(X, y)
    assert list(m.classes_) == sorted(set(labels))
    pred = m.predict(X)
    assert set(pred.tolist()) <= set(labels)
    assert m.score(X, y) >= 0.98
    # decision > 0 means classes_[1], as in sklearn
    np.testing.assert_array_equal(pred == m.classes_[1], m.decision_function(X) > 0)


def test_torch_and_float64_inputs():
    torch = pytest.importorskip("torch")
    X, y = blobs(400, 16, 3.0, seed=11)
    a = svm.LinearSVM().fit(X, y)
    b = svm.LinearSVM().fit(torch.from_numpy(X), torch.from_numpy(y))
    c = svm.LinearSVM().fit(X.astype(np.float64), y.tolist())
    d = svm.LinearSVM().fit(np.asfortranarray(X), y)
    assert a.coef_.tobytes() == b.coef_.tobytes() == c.coef_.tobytes() == d.coef_.tobytes()
    np.testing.assert_array_equal(a.predict(torch.from_numpy(X)), a.predict(X))


def test_sample_weight_and_no_intercept():
    sklearn_svm = pytest.importorskip("sklearn.svm")
    X, y = blobs(500, 12, 2.0, seed=12)
    sw = np.random.default_rng(0).uniform(0.2, 2.0, len(y))
    ours = svm.LinearSVM(C=0.5).fit(X, y, sample_weight=sw)
    ref = sklearn_svm.LinearSVC(C=0.5, dual=True).fit(X, y, sample_weight=sw)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=2e-3 * np.abs(ref.coef_).max())
    m = svm.LinearSVM(fit_intercept=False).fit(X, y)
    assert m.intercept_[0] == 0.0


def test_max_iter_warns():
    X, y = blobs(500, 20, 0.5, seed=13)
    with pytest.warns(svm.ConvergenceWarning):
        m = svm.LinearSVM(max_iter=1, tol=1e-8).fit(X, y)
    assert m.n_iter_ == 1 and not m.converged_


def test_params_roundtrip():
    m = svm.LinearSVM(C=2.0, loss="hinge")
    assert m.get_params()["C"] == 2.0
    assert m.set_params(C=3.0).C == 3.0
    assert "LinearSVM(C=3.0" in repr(m)


# ----------------------------------------------------------------------------- errors
def _Xy():
    return blobs(50, 4, 4.0, seed=14)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 7, np.nan, X), y), "NaN or inf"),
        (lambda X, y: (np.where(np.arange(X.size).reshape(X.shape) == 9, np.inf, X), y), "NaN or inf"),
        (lambda X, y: (X, y[:-1]), "shape mismatch"),
        (lambda X, y: (X[0], y), "2-D"),
        (lambda X, y: (X, np.zeros_like(y)), "only one class"),
        (lambda X, y: (X, np.arange(len(y)) % 3), "3 classes"),
        (lambda X, y: (X[:0], y[:0]), "empty"),
        (lambda X, y: (X[:, :0], y), "empty"),
        (lambda X, y: (X, np.where(y == 1, np.nan, 0.0)), "y contains NaN"),
        (lambda X, y: (X, y[:, None].repeat(2, 1)), "1-D"),
    ],
    ids=["nan", "inf", "y_len", "X_1d", "one_class", "three_classes", "empty_rows", "empty_cols", "y_nan", "y_2d"],
)
def test_bad_input_raises_value_error(mutate, match):
    X, y = mutate(*_Xy())
    with pytest.raises(ValueError, match=match):
        svm.LinearSVM().fit(X, y)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(C=0.0), "C must be"),
        (dict(C=float("nan")), "C must be"),
        (dict(loss="log"), "loss must be"),
        (dict(tol=-1.0), "tol must be"),
        (dict(max_iter=0), "max_iter"),
        (dict(class_weight="auto"), "class_weight"),
        (dict(class_weight={5: 1.0}), "not in y"),
        (dict(n_threads=0), "n_threads"),
    ],
)
def test_bad_params_raise(kwargs, match):
    X, y = _Xy()
    with pytest.raises(ValueError, match=match):
        svm.LinearSVM(**kwargs).fit(X, y)


def test_errors_are_typed():
    errors = pytest.importorskip("fastforget.errors")
    X, y = _Xy()
    X[2, 2] = np.inf  # found in C++, re-raised as the package's typed input error
    with pytest.raises(errors.InputError, match="row 2"):
        svm.LinearSVM().fit(X, y)
    with pytest.raises(errors.InputError, match="only one class"):
        svm.LinearSVM().fit(X[:5], np.ones(5))
    with pytest.raises(errors.InputError, match="n must be positive"):
        svm.sample_neighbors(np.zeros(4), 0, 1.0, 1.0)


def test_predict_errors():
    X, y = _Xy()
    with pytest.raises(ValueError, match="not fitted"):
        svm.LinearSVM().predict(X)
    m = svm.LinearSVM().fit(X, y)
    with pytest.raises(ValueError, match="features"):
        m.decision_function(X[:, :3])
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        m.predict(bad)


def test_native_checks_directly():
    X, y = _Xy()
    ypm = np.where(y == 1, 1, -1).astype(np.int8)
    C = np.ones(len(y))
    with pytest.raises(ValueError, match="C must be 1-D"):
        _native.svm_fit(X, ypm, C[:-1])
    with pytest.raises(ValueError, match=r"\+1 / -1"):
        _native.svm_fit(X, (ypm * 2).astype(np.int8), C)
    out = _native.svm_fit(X, ypm, C)
    assert set(out) == {"w", "intercept", "alpha", "n_iter", "converged"}


# ----------------------------------------------------------------------------- boundary helpers
def test_sample_neighbors_wrapper():
    torch = pytest.importorskip("torch")
    h = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    a = svm.sample_neighbors(h, 16, sigma=1.0, radius_max=0.5, seed=3)
    b = svm.sample_neighbors(torch.from_numpy(h), 16, sigma=1.0, radius_max=0.5, seed=3)
    assert isinstance(a, np.ndarray) and a.shape == (16, 32) and a.dtype == np.float32
    assert a.tobytes() == b.tobytes()
    r = np.linalg.norm(a - h.ravel(), axis=1)
    assert np.all(r <= 0.5 + 1e-5)
    assert not np.array_equal(a, svm.sample_neighbors(h, 16, 1.0, 0.5, seed=4))
    with pytest.raises(ValueError):
        svm.sample_neighbors(h, 0, 1.0, 0.5)


def test_nearest_to_hyperplane_wrapper():
    torch = pytest.importorskip("torch")
    X, y = blobs(300, 6, 2.0, seed=15)
    m = svm.LinearSVM().fit(X, y)
    idx, dist = svm.nearest_to_hyperplane(torch.from_numpy(X), m.coef_, m.intercept_, 10)
    assert isinstance(idx, np.ndarray) and idx.dtype == np.int64 and idx.shape == (10,)
    assert dist.dtype == np.float32
    ref = m.decision_function(X) / np.linalg.norm(m.coef_)
    np.testing.assert_array_equal(idx, np.argsort(np.abs(ref), kind="stable")[:10])
    np.testing.assert_allclose(dist, ref[idx], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="b must be a scalar"):
        svm.nearest_to_hyperplane(X, m.coef_, np.zeros(2), 3)
    with pytest.raises(ValueError):
        svm.nearest_to_hyperplane(X, m.coef_.ravel()[:3], 0.0, 3)
