"""fastforget.svm.LinearSVM vs scikit-learn LinearSVC on BIA-sized problems.

    python benchmarks/bench_svm.py                     # the four default problems, one table
    python benchmarks/bench_svm.py --sizes 1024x32768 --repeat 3
    python benchmarks/bench_svm.py --sklearn-dual auto # against sklearn's default solver choice

Both sides solve the same problem (same C, loss, tol, max_iter; the intercept as a regularised
constant feature). By default sklearn runs its dual coordinate descent (dual=True), the same
algorithm as ours, so the ratio is implementation speed; ``--sklearn-dual auto`` lets sklearn pick
its primal Newton solver when n > d. Fit times include input checks and conversions on both sides.
Accuracy is measured on a held-out draw of the same distribution.

Data: two overlapping Gaussian blobs in float32, like h-space / embedding features of two groups:
isotropic unit noise plus a shared rank-16 component, class means +-sep/2 along a random direction,
sep = 3 * max(1, (d/n)^(1/4)) so that every problem is learnable from its n samples.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np

DEFAULT_SIZES = "128x32768,1024x32768,4096x512,20000x1280"


def make_blobs(n: int, d: int, seed: int, n_test: int):
    rng = np.random.default_rng(seed)
    sep = 3.0 * max(1.0, (d / n) ** 0.25)
    u = rng.standard_normal(d)
    u = (u / np.linalg.norm(u)).astype(np.float32)
    A = (0.25 * rng.standard_normal((16, d))).astype(np.float32)

    def draw(m):
        y = rng.integers(0, 2, m)
        X = rng.standard_normal((m, d), dtype=np.float32)
        X += rng.standard_normal((m, 16), dtype=np.float32) @ A
        X += ((2 * y - 1) * (sep / 2)).astype(np.float32)[:, None] * u
        return X, y

    return draw(n), draw(n_test)


def timed_fit(make, X, y, repeat):
    best, model = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        model = make().fit(X, y)
        best = min(best, time.perf_counter() - t0)
    return best, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxD (default: %(default)s)")
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--loss", default="squared_hinge", choices=["squared_hinge", "hinge"])
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--max-iter", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="threads for ours (default: all usable cores)")
    p.add_argument("--repeat", type=int, default=1, help="fits per side; the fastest is reported")
    p.add_argument("--sklearn-dual", default="true", choices=["true", "auto"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from sklearn.svm import LinearSVC

    import fastforget.svm as ffsvm
    from fastforget import _native

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s]
    rows = []
    notes = set()
    for n, d in sizes:
        (X, y), (Xt, yt) = make_blobs(n, d, args.seed, n_test=1000 if d > 4096 else 4000)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t_ours, ours = timed_fit(
                lambda: ffsvm.LinearSVM(C=args.C, loss=args.loss, tol=args.tol, max_iter=args.max_iter,
                                        n_threads=args.threads, seed=args.seed),
                X, y, args.repeat)
            t_sk, sk = timed_fit(
                lambda: LinearSVC(C=args.C, loss=args.loss, tol=args.tol, max_iter=args.max_iter,
                                  dual=True if args.sklearn_dual == "true" else "auto", random_state=args.seed),
                X, y, args.repeat)
        sk_capped = any("converge" in str(w.message) and "Liblinear" in str(w.message) for w in caught)
        mark_o = "*" if not ours.converged_ else ""
        mark_s = "*" if sk_capped else ""
        if mark_o or mark_s:
            notes.add("* stopped at max_iter before reaching tol")
        rows.append((f"{n} x {d}", f"{t_ours:.3f}{mark_o}", f"{t_sk:.3f}{mark_s}", f"{t_sk / t_ours:.1f}x",
                     f"{ours.score(Xt, yt):.4f}", f"{sk.score(Xt, yt):.4f}"))
        print(f"  done {n} x {d}: ours {t_ours:.3f}s ({ours.n_iter_} passes), sklearn {t_sk:.3f}s "
              f"({int(np.max(sk.n_iter_))} iterations)", file=sys.stderr, flush=True)
        del X, Xt

    head = ("problem (n x d)", "ours (s)", "sklearn (s)", "speedup", "acc ours", "acc sklearn")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    print(f"LinearSVM (fastforget._native, {_native.svm_simd}, {args.threads or ffsvm._default_threads()} threads) "
          f"vs sklearn LinearSVC(dual={args.sklearn_dual}); C={args.C}, loss={args.loss}, tol={args.tol}, "
          f"max_iter={args.max_iter}; held-out accuracy")
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    for note in sorted(notes):
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
