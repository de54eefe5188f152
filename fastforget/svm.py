"""Linear SVM and boundary helpers backed by the C++ extension ``fastforget._native``.

``LinearSVM`` solves the same problem as scikit-learn's ``LinearSVC(dual=True)``::

    min_w,b  0.5 * (|w|^2 + (b / s)^2) + sum_i C_i * loss(y_i * (w . x_i + b))

with ``loss`` = hinge or squared hinge, the intercept learnt as the weight of an extra constant
feature of value ``s = intercept_scaling`` (so it is regularised, as in liblinear / sklearn), and
``C_i = C * class_weight[y_i] * sample_weight_i``. The solver is liblinear's dual coordinate descent
with shrinking (Hsieh et al. 2008), run on dense float32 rows with double-precision w.

``tol`` has liblinear's meaning (sklearn's default 1e-4), not a relative objective tolerance: the
solver stops when, over all samples, the projected gradients of the dual lie within ``tol`` of each
other and of zero (upstream liblinear's rule; sklearn's vendored copy checks only the spread, so it
may stop a few passes earlier). At that point the duality gap is at most ``2 * tol * sum_i C_i``.
``max_iter`` counts passes over the data, as in liblinear.

Dual coordinate descent is fastest when n <= d or C is small. For n >> d with weakly regularised,
overlapping classes (e.g. C=1 on raw features with |x|^2 ~ d) it may need more than ``max_iter``
passes; sklearn's ``LinearSVC(dual="auto")`` switches to a primal Newton solver in that regime.
"""
from __future__ import annotations

import numbers
import os
import warnings
from typing import Any

import numpy as np

from . import _native

try:  # the package's typed input error (a ValueError subclass); plain ValueError if absent
    from .errors import InputError as _InputError
except ImportError:  # pragma: no cover
    _InputError = ValueError

__all__ = ["LinearSVM", "ConvergenceWarning", "sample_neighbors", "nearest_to_hyperplane"]


class ConvergenceWarning(UserWarning):
    """The solver stopped at ``max_iter`` before reaching ``tol``."""


def _to_numpy(a: Any, name: str) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device) or array-like."""
    if type(a).__module__.startswith("torch"):
        a = a.detach().cpu()
        if a.dtype.is_complex or str(a.dtype) in ("torch.bfloat16", "torch.float16"):
            a = a.float()
        a = a.numpy()
    try:
        return np.asarray(a)
    except Exception as e:  # ragged lists and the like
        raise _InputError(f"{name} cannot be converted to an array: {e}") from None


def _as_float32_2d(X: Any, name: str = "X") -> np.ndarray:
    X = _to_numpy(X, name)
    if X.ndim != 2:
        raise _InputError(f"{name} must be 2-D (n_samples, n_features), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise _InputError(f"{name} is empty: shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.number) or X.dtype == np.bool_) or np.iscomplexobj(X):
        raise _InputError(f"{name} must be real numeric, got dtype {X.dtype}")
    if X.dtype != np.float32:
        with np.errstate(over="ignore"):
            X = X.astype(np.float32)  # values beyond float32 range become inf and are rejected
    return np.ascontiguousarray(X)


def _native_call(fn, *args, **kwargs):
    """Call into _native, re-raising its ValueErrors (bad input found in C++) as the typed error."""
    try:
        return fn(*args, **kwargs)
    except _InputError:
        raise
    except ValueError as e:
        raise _InputError(str(e)) from None


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LinearSVM:
    """Binary linear SVM, scikit-learn style (``fit`` / ``decision_function`` / ``predict`` / ``score``).

    Parameters
    ----------
    C : inverse regularisation strength (> 0).
    loss : ``"squared_hinge"`` (default, as LinearSVC) or ``"hinge"``.
    class_weight : None, ``"balanced"`` (n / (2 * count_c)) or a dict {label: weight}.
    tol : liblinear stopping tolerance on the dual projected gradients (see module docstring).
    max_iter : maximum number of passes over the data; a ``ConvergenceWarning`` is issued if hit.
    seed : seed of the SplitMix64 stream that permutes the coordinates; same seed, same bytes.
    fit_intercept, intercept_scaling : as LinearSVC (intercept = weight of a constant feature).
    n_threads : threads for the row norms and ``decision_function`` (None: the cores this process
        may use). The coordinate-descent loop itself is sequential, so results do not depend on it.

    Attributes after ``fit``: ``classes_`` (2,), ``coef_`` (1, d) float64, ``intercept_`` (1,),
    ``alpha_`` (n,) dual variables, ``n_iter_``, ``converged_``, ``n_features_in_``.
    ``decision_function > 0`` means ``classes_[1]``.
    """

    def __init__(
        self,
        C: float = 1.0,
        loss: str = "squared_hinge",
        class_weight: None | str | dict = None,
        tol: float = 1e-4,
        max_iter: int = 1000,
        seed: int = 0,
        fit_intercept: bool = True,
        intercept_scaling: float = 1.0,
        n_threads: int | None = None,
    ):
        self.C = C
        self.loss = loss
        self.class_weight = class_weight
        self.tol = tol
        self.max_iter = max_iter
        self.seed = seed
        self.fit_intercept = fit_intercept
        self.intercept_scaling = intercept_scaling
        self.n_threads = n_threads

    # sklearn-compatible parameter access (enough for clone / GridSearchCV)
    def get_params(self, deep: bool = True) -> dict:
        return {k: getattr(self, k) for k in
                ("C", "loss", "class_weight", "tol", "max_iter", "seed", "fit_intercept",
                 "intercept_scaling", "n_threads")}

    def set_params(self, **params) -> "LinearSVM":
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise _InputError(f"unknown parameter {k!r} for LinearSVM")
            setattr(self, k, v)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"LinearSVM({args})"

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        if isinstance(self.C, bool) or not isinstance(self.C, numbers.Real) or not (0 < self.C < np.inf):
            raise _InputError(f"C must be a positive finite number, got {self.C!r}")
        if self.loss not in ("hinge", "squared_hinge"):
            raise _InputError(f"loss must be 'hinge' or 'squared_hinge', got {self.loss!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, numbers.Real) or not (0 < self.tol < np.inf):
            raise _InputError(f"tol must be a positive finite number, got {self.tol!r}")
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) or self.max_iter < 1:
            raise _InputError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise _InputError(f"seed must be an integer, got {self.seed!r}")
        if self.fit_intercept and not (0 < float(self.intercept_scaling) < np.inf):
            raise _InputError(f"intercept_scaling must be positive and finite, got {self.intercept_scaling!r}")
        if self.n_threads is not None and (not isinstance(self.n_threads, numbers.Integral) or self.n_threads < 1):
            raise _InputError(f"n_threads must be None or an integer >= 1, got {self.n_threads!r}")

    def _threads(self) -> int:
        return int(self.n_threads) if self.n_threads is not None else _default_threads()

    def _class_weights(self, classes: np.ndarray, y_idx: np.ndarray) -> np.ndarray:
        cw = self.class_weight
        if cw is None:
            return np.ones(2)
        if isinstance(cw, str):
            if cw != "balanced":
                raise _InputError(f"class_weight must be None, 'balanced' or a dict, got {cw!r}")
            counts = np.bincount(y_idx, minlength=2)
            return len(y_idx) / (2.0 * counts)
        if isinstance(cw, dict):
            out = np.ones(2)
            known = {c.item() if hasattr(c, "item") else c for c in classes}
            for k, v in cw.items():
                kk = k.item() if hasattr(k, "item") else k
                if kk not in known:
                    raise _InputError(f"class_weight has label {k!r}, which is not in y (classes {classes.tolist()})")
                v = float(v)
                if not (0 <= v < np.inf):
                    raise _InputError(f"class_weight[{k!r}] must be finite and >= 0, got {v}")
                out[int(np.flatnonzero(classes == k)[0])] = v
            return out
        raise _InputError(f"class_weight must be None, 'balanced' or a dict, got {type(cw).__name__}")

    # ------------------------------------------------------------------ API
    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "LinearSVM":
        self._check_params()
        X = _as_float32_2d(X)
        n, d = X.shape
        y = _to_numpy(y, "y")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()
        if y.ndim != 1:
            raise _InputError(f"y must be 1-D, got shape {y.shape}")
        if y.shape[0] != n:
            raise _InputError(f"shape mismatch: X has {n} rows but y has {y.shape[0]} labels")
        if y.dtype.kind in "fc" and not np.all(np.isfinite(y)):
            raise _InputError("y contains NaN or inf")
        if y.dtype == object and any(v is None for v in y):
            raise _InputError("y contains None")
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise _InputError(f"y has only one class ({classes[0]!r}); LinearSVM needs two")
        if len(classes) > 2:
            raise _InputError(f"y has {len(classes)} classes; LinearSVM is binary (exactly two classes)")
        y_idx = y_idx.ravel()
        cw = self._class_weights(classes, y_idx)
        Ci = self.C * cw[y_idx]
        if sample_weight is not None:
            sw = _to_numpy(sample_weight, "sample_weight").astype(np.float64).ravel()
            if sw.shape[0] != n:
                raise _InputError(f"shape mismatch: X has {n} rows but sample_weight has {sw.shape[0]} entries")
            if not np.all(np.isfinite(sw)) or np.any(sw < 0):
                raise _InputError("sample_weight must be finite and >= 0")
            Ci = Ci * sw
        Ci = np.ascontiguousarray(Ci, dtype=np.float64)
        ypm = np.where(y_idx == 1, 1, -1).astype(np.int8)
        bias = float(self.intercept_scaling) if self.fit_intercept else 0.0
        res = _native_call(_native.svm_fit,
            X, ypm, Ci, loss=1 if self.loss == "hinge" else 2, tol=float(self.tol),
            max_iter=int(self.max_iter), seed=int(self.seed) & 0xFFFFFFFFFFFFFFFF, bias=bias,
            n_threads=self._threads(),
        )
        self.classes_ = classes
        self.coef_ = np.asarray(res["w"]).reshape(1, d)
        self.intercept_ = np.array([res["intercept"]], dtype=np.float64)
        self.alpha_ = np.asarray(res["alpha"])
        self.n_iter_ = int(res["n_iter"])
        self.converged_ = bool(res["converged"])
        self.n_features_in_ = d
        if not self.converged_:
            warnings.warn(
                f"LinearSVM did not converge in max_iter={self.max_iter} passes (tol={self.tol}); "
                "increase max_iter or scale the data",
                ConvergenceWarning, stacklevel=2,
            )
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise _InputError("this LinearSVM is not fitted yet: call fit(X, y) first")

    def decision_function(self, X: Any) -> np.ndarray:
        """Signed score w . x + b for each row (float64, shape (n,)); > 0 means classes_[1]."""
        self._check_fitted()
        X = _as_float32_2d(X)
        if X.shape[1] != self.n_features_in_:
            raise _InputError(f"shape mismatch: X has {X.shape[1]} features, the model was fitted on {self.n_features_in_}")
        dec = _native_call(_native.svm_decision, X, self.coef_.ravel(), float(self.intercept_[0]), n_threads=self._threads())
        if not np.all(np.isfinite(dec)):
            raise _InputError(f"X contains NaN or inf (row {int(np.flatnonzero(~np.isfinite(dec))[0])})")
        return dec

    def predict(self, X: Any) -> np.ndarray:
        """The label (one of ``classes_``) of each row."""
        self._check_fitted()
        return self.classes_[(self.decision_function(X) > 0).astype(np.intp)]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy of ``predict(X)`` against ``y``."""
        y = _to_numpy(y, "y").ravel()
        pred = self.predict(X)
        if y.shape[0] != pred.shape[0]:
            raise _InputError(f"shape mismatch: X has {pred.shape[0]} rows but y has {y.shape[0]} labels")
        return float(np.average(pred == y, weights=None if sample_weight is None else _to_numpy(sample_weight, "sample_weight").ravel()))


def sample_neighbors(h: Any, n: int, sigma: float, radius_max: float, seed: int = 0) -> np.ndarray:
    """``n`` codes ``h + r * normalize(sigma * N(0, I))``, ``r ~ U(0, radius_max)``; float32 (n, h.size).

    ``h`` (numpy or torch) is flattened; reshape the result to ``(n, *h.shape)`` if needed.
    Deterministic under ``seed`` (one SplitMix64 stream per row).
    """
    h = np.ascontiguousarray(_to_numpy(h, "h"), dtype=np.float32).ravel()
    return _native_call(_native.sample_neighbors, h, int(n), float(sigma), float(radius_max), int(seed) & 0xFFFFFFFFFFFFFFFF)


def nearest_to_hyperplane(X: Any, w: Any, b: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int64) and signed distances (float32) of the ``k`` rows of ``X`` closest to
    ``w . x + b = 0``, nearest first (ties by index). ``w`` may be ``coef_`` of shape (1, d)."""
    X = _as_float32_2d(X)
    w = np.ascontiguousarray(_to_numpy(w, "w"), dtype=np.float32)
    if w.ndim == 2 and w.shape[0] == 1:
        w = w.ravel()
    b = _to_numpy(b, "b")
    if b.size != 1:
        raise _InputError(f"b must be a scalar, got shape {b.shape}")
    idx, dist = _native_call(_native.nearest_to_hyperplane, X, w, float(b.reshape(())), int(k))
    return np.asarray(idx), np.asarray(dist)
