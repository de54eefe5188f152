// Dense float32 linear SVM: dual coordinate descent with shrinking (Hsieh et al. 2008),
// the algorithm of liblinear's solve_l2r_l1l2_svc, written for dense rows.
//
//   primal  min_w  0.5 |w|^2 + sum_i C_i loss(y_i w.x_i)      (x_i carries an extra feature B = bias)
//   dual    min_a  0.5 a^T (Q + D) a - e^T a,  0 <= a_i <= U_i,  Q_ij = y_i y_j x_i.x_j
//   hinge:          D_ii = 0,          U_i = C_i
//   squared_hinge:  D_ii = 1/(2 C_i),  U_i = inf
//
// Stopping rule (upstream liblinear's eps): over the full set of coordinates, the projected
// gradients PG satisfy max PG - min PG <= tol and |PG| <= tol (sklearn's vendored copy checks only
// the range; the extra test bounds the duality gap).  Data stay float32 (a quarter of the bytes of
// liblinear's {int, double} sparse nodes: memory traffic is what bounds the CD loop); w and every
// dot product are double so the optimisation is as exact as liblinear's.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FF_X86 1
#endif

#include "rng.h"

namespace py = pybind11;
using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;
using I8Array = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;

namespace fastforget {
namespace {

// ---------------------------------------------------------------- dense kernels
// Portable versions (the compiler's baseline ISA); four partial sums keep the add chain short.
double dot_generic(const float* x, const double* w, int64_t d) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    s0 += static_cast<double>(x[j]) * w[j];
    s1 += static_cast<double>(x[j + 1]) * w[j + 1];
    s2 += static_cast<double>(x[j + 2]) * w[j + 2];
    s3 += static_cast<double>(x[j + 3]) * w[j + 3];
  }
  for (; j < d; ++j) s0 += static_cast<double>(x[j]) * w[j];
  return (s0 + s1) + (s2 + s3);
}

double sqnorm_generic(const float* x, int64_t d) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    s0 += static_cast<double>(x[j]) * x[j];
    s1 += static_cast<double>(x[j + 1]) * x[j + 1];
    s2 += static_cast<double>(x[j + 2]) * x[j + 2];
    s3 += static_cast<double>(x[j + 3]) * x[j + 3];
  }
  for (; j < d; ++j) s0 += static_cast<double>(x[j]) * x[j];
  return (s0 + s1) + (s2 + s3);
}

void axpy_generic(double a, const float* x, double* w, int64_t d) {
  for (int64_t j = 0; j < d; ++j) w[j] += a * static_cast<double>(x[j]);
}

// w += a * xi, then return xn . w (the next coordinate's dot) in the same pass over w.
double axpy_dot_generic(double a, const float* xi, const float* xn, double* w, int64_t d, const float*) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= d; j += 4) {
    w[j] += a * static_cast<double>(xi[j]);
    w[j + 1] += a * static_cast<double>(xi[j + 1]);
    w[j + 2] += a * static_cast<double>(xi[j + 2]);
    w[j + 3] += a * static_cast<double>(xi[j + 3]);
    s0 += static_cast<double>(xn[j]) * w[j];
    s1 += static_cast<double>(xn[j + 1]) * w[j + 1];
    s2 += static_cast<double>(xn[j + 2]) * w[j + 2];
    s3 += static_cast<double>(xn[j + 3]) * w[j + 3];
  }
  for (; j < d; ++j) {
    w[j] += a * static_cast<double>(xi[j]);
    s0 += static_cast<double>(xn[j]) * w[j];
  }
  return (s0 + s1) + (s2 + s3);
}

double dot_pf_generic(const float* x, const double* w, int64_t d, const float*) { return dot_generic(x, w, d); }

#ifdef FF_X86
// AVX2+FMA versions, picked at run time (the build sets no -march): float rows widened to double.
__attribute__((target("avx2,fma"))) inline double hsum256(__m256d v) {
  __m128d lo = _mm256_castpd256_pd128(v), hi = _mm256_extractf128_pd(v, 1);
  lo = _mm_add_pd(lo, hi);
  return _mm_cvtsd_f64(_mm_add_sd(lo, _mm_unpackhi_pd(lo, lo)));
}

// x . w; pf: a row read a few steps later, prefetched one cache line per 16 floats so the
// random row order does not stall on DRAM latency (pf may be x itself).
__attribute__((target("avx2,fma"))) double dot_pf_avx2(const float* x, const double* w, int64_t d, const float* pf) {
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + j), _MM_HINT_T0);
    a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j)), _mm256_loadu_pd(w + j), a0);
    a1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j + 4)), _mm256_loadu_pd(w + j + 4), a1);
    a2 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j + 8)), _mm256_loadu_pd(w + j + 8), a2);
    a3 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j + 12)), _mm256_loadu_pd(w + j + 12), a3);
  }
  for (; j + 4 <= d; j += 4)
    a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + j)), _mm256_loadu_pd(w + j), a0);
  double s = hsum256(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  for (; j < d; ++j) s += static_cast<double>(x[j]) * w[j];
  return s;
}

__attribute__((target("avx2,fma"))) double dot_avx2(const float* x, const double* w, int64_t d) {
  return dot_pf_avx2(x, w, d, x);
}

// w += a * xi and xn . w(updated) in one pass: saves a full read of w per coordinate step
// (the CD loop is bound by memory traffic, not arithmetic). Same summation layout as dot_pf_avx2.
__attribute__((target("avx2,fma"))) double axpy_dot_avx2(double a, const float* xi, const float* xn, double* w,
                                                         int64_t d, const float* pf) {
  const __m256d va = _mm256_set1_pd(a);
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + j), _MM_HINT_T0);
    __m256d w0 = _mm256_fmadd_pd(va, _mm256_cvtps_pd(_mm_loadu_ps(xi + j)), _mm256_loadu_pd(w + j));
    __m256d w1 = _mm256_fmadd_pd(va, _mm256_cvtps_pd(_mm_loadu_ps(xi + j + 4)), _mm256_loadu_pd(w + j + 4));
    __m256d w2 = _mm256_fmadd_pd(va, _mm256_cvtps_pd(_mm_loadu_ps(xi + j + 8)), _mm256_loadu_pd(w + j + 8));
    __m256d w3 = _mm256_fmadd_pd(va, _mm256_cvtps_pd(_mm_loadu_ps(xi + j + 12)), _mm256_loadu_pd(w + j + 12));
    _mm256_storeu_pd(w + j, w0);
    _mm256_storeu_pd(w + j + 4, w1);
    _mm256_storeu_pd(w + j + 8, w2);
    _mm256_storeu_pd(w + j + 12, w3);
    a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(xn + j)), w0, a0);
    a1 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(xn + j + 4)), w1, a1);
    a2 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(xn + j + 8)), w2, a2);
    a3 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(xn + j + 12)), w3, a3);
  }
  for (; j + 4 <= d; j += 4) {
    __m256d w0 = _mm256_fmadd_pd(va, _mm256_cvtps_pd(_mm_loadu_ps(xi + j)), _mm256_loadu_pd(w + j));
    _mm256_storeu_pd(w + j, w0);
    a0 = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(xn + j)), w0, a0);
  }
  double s = hsum256(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  for (; j < d; ++j) {
    w[j] += a * static_cast<double>(xi[j]);
    s += static_cast<double>(xn[j]) * w[j];
  }
  return s;
}

__attribute__((target("avx2,fma"))) double sqnorm_avx2(const float* x, int64_t d) {
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    __m256d v0 = _mm256_cvtps_pd(_mm_loadu_ps(x + j)), v1 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 4));
    __m256d v2 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 8)), v3 = _mm256_cvtps_pd(_mm_loadu_ps(x + j + 12));
    a0 = _mm256_fmadd_pd(v0, v0, a0);
    a1 = _mm256_fmadd_pd(v1, v1, a1);
    a2 = _mm256_fmadd_pd(v2, v2, a2);
    a3 = _mm256_fmadd_pd(v3, v3, a3);
  }
  for (; j + 4 <= d; j += 4) {
    __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + j));
    a0 = _mm256_fmadd_pd(v, v, a0);
  }
  double s = hsum256(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  for (; j < d; ++j) s += static_cast<double>(x[j]) * x[j];
  return s;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(double a, const float* x, double* w, int64_t d) {
  const __m256d va = _mm256_set1_pd(a);
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    __m256d w0 = _mm256_fmadd_pd(va, _mm256_cvtps_pd(_mm_loadu_ps(x + j)), _mm256_loadu_pd(w + j));
    __m256d w1 = _mm256_fmadd_pd(va, _mm256_cvtps_pd(_mm_loadu_ps(x + j + 4)), _mm256_loadu_pd(w + j + 4));
    _mm256_storeu_pd(w + j, w0);
    _mm256_storeu_pd(w + j + 4, w1);
  }
  for (; j < d; ++j) w[j] += a * static_cast<double>(x[j]);
}
#endif

struct Kernels {
  double (*dot)(const float*, const double*, int64_t);
  double (*dot_pf)(const float*, const double*, int64_t, const float*);
  double (*axpy_dot)(double, const float*, const float*, double*, int64_t, const float*);
  double (*sqnorm)(const float*, int64_t);
  void (*axpy)(double, const float*, double*, int64_t);
  const char* name;
};

const Kernels& kernels() {
  static const Kernels k = [] {
#ifdef FF_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return Kernels{dot_avx2, dot_pf_avx2, axpy_dot_avx2, sqnorm_avx2, axpy_avx2, "avx2"};
#endif
    return Kernels{dot_generic, dot_pf_generic, axpy_dot_generic, sqnorm_generic, axpy_generic, "generic"};
  }();
  return k;
}

// ---------------------------------------------------------------- threading
// Static contiguous split of [0, n) over at most n_threads std::threads (no exceptions inside f).
template <class F>
void parallel_for(int64_t n, int n_threads, int64_t min_chunk, F f) {
  int64_t t = std::max<int64_t>(1, std::min<int64_t>(n_threads, n / std::max<int64_t>(1, min_chunk)));
  if (t <= 1) {
    f(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  const int64_t step = (n + t - 1) / t;
  for (int64_t k = 1; k < t; ++k) {
    const int64_t b = k * step, e = std::min(n, b + step);
    if (b < e) pool.emplace_back([=, &f] { f(b, e); });
  }
  f(int64_t{0}, std::min(n, step));
  for (auto& th : pool) th.join();
}

// Unbiased enough (bias < range / 2^64) bounded integer from the deterministic stream.
inline int64_t bounded(SplitMix64& rng, int64_t range) {
#ifdef __SIZEOF_INT128__
  return static_cast<int64_t>((static_cast<unsigned __int128>(rng.next()) * static_cast<uint64_t>(range)) >> 64);
#else
  return static_cast<int64_t>(rng.next() % static_cast<uint64_t>(range));
#endif
}

int resolve_threads(int n_threads) {
  if (n_threads > 0) return n_threads;
  const unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

// ---------------------------------------------------------------- solver
struct FitResult {
  std::vector<double> w;
  double wb = 0.0;  // weight of the bias feature (intercept = wb * bias)
  std::vector<double> alpha;
  int64_t n_iter = 0;
  bool converged = false;
  int64_t bad_row = -1;  // first row with NaN/inf, if any
};

// loss: 1 = hinge (L1-loss), 2 = squared hinge (L2-loss). yp: +1/-1. Cp: per-sample C (0 = ignored).
FitResult dcd_fit(const float* X, int64_t n, int64_t d, const int8_t* yp, const double* Cp, int loss, double tol,
                  int64_t max_iter, uint64_t seed, double bias, int n_threads) {
  const Kernels& K = kernels();
  FitResult r;
  r.w.assign(d, 0.0);
  r.alpha.assign(n, 0.0);
  std::vector<double> QD(n), diag(n), upper(n);
  const double inf = std::numeric_limits<double>::infinity();
  const double B2 = bias * bias;

  // Q_ii = |x_i|^2 + bias^2 (+ D_ii), in parallel; a non-finite norm means the row holds NaN/inf,
  // so the same pass validates X without a second read of it.
  {
    const int64_t min_chunk = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, d));
    parallel_for(n, n_threads, min_chunk, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) QD[i] = K.sqnorm(X + i * d, d);
    });
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(QD[i])) {
      r.bad_row = i;
      return r;
    }
    if (loss == 2) {
      diag[i] = Cp[i] > 0 ? 0.5 / Cp[i] : 0.0;
      upper[i] = inf;
    } else {
      diag[i] = 0.0;
      upper[i] = Cp[i];
    }
    QD[i] += B2 + diag[i];
  }

  // Samples with C_i = 0 carry no loss: their alpha stays 0 and they never enter the loop.
  std::vector<int64_t> index;
  index.reserve(n);
  for (int64_t i = 0; i < n; ++i)
    if (Cp[i] > 0) index.push_back(i);
  const int64_t l = static_cast<int64_t>(index.size());
  int64_t active_size = l;

  // Rows are visited in random order, so the hardware prefetcher cannot see the next one coming:
  // prefetch the row `ahead` steps later (at least ~4 KiB ahead) while streaming the current one.
  const int64_t ahead = 1 + std::min<int64_t>(8, (4096 + 4 * d - 1) / (4 * d));

  SplitMix64 rng(seed);
  double PGmax_old = inf, PGmin_old = -inf;
  double* w = r.w.data();
  double& wb = r.wb;
  double* alpha = r.alpha.data();
  int64_t iter = 0;
  while (iter < max_iter) {
    double PGmax_new = -inf, PGmin_new = inf;
    for (int64_t i = 0; i < active_size; ++i) std::swap(index[i], index[i + bounded(rng, active_size - i)]);

    bool have_xw = false;  // xw already holds x_{index[s]} . w (computed fused with the last update)
    double xw = 0.0;
    for (int64_t s = 0; s < active_size; ++s) {
      const int64_t i = index[s];
      const double yi = yp[i];
      const float* xi = X + i * d;
      const float* pf = X + index[std::min(s + ahead, active_size - 1)] * d;
      if (!have_xw) xw = K.dot_pf(xi, w, d, pf);
      have_xw = false;
      const double C = upper[i];
      const double G = yi * (xw + wb * bias) - 1.0 + alpha[i] * diag[i];

      double PG = 0.0;
      if (alpha[i] == 0.0) {
        if (G > PGmax_old) {  // shrink: stays at the lower bound
          std::swap(index[s], index[--active_size]);
          --s;
          continue;
        }
        if (G < 0) PG = G;
      } else if (alpha[i] == C) {
        if (G < PGmin_old) {  // shrink: stays at the upper bound
          std::swap(index[s], index[--active_size]);
          --s;
          continue;
        }
        if (G > 0) PG = G;
      } else {
        PG = G;
      }
      PGmax_new = std::max(PGmax_new, PG);
      PGmin_new = std::min(PGmin_new, PG);

      if (std::fabs(PG) > 1e-12) {
        const double a_old = alpha[i];
        alpha[i] = std::min(std::max(a_old - G / QD[i], 0.0), C);
        const double delta = (alpha[i] - a_old) * yi;
        if (s + 1 < active_size) {
          xw = K.axpy_dot(delta, xi, X + index[s + 1] * d, w, d, pf);
          have_xw = true;
        } else {
          K.axpy(delta, xi, w, d);
        }
        wb += delta * bias;
      }
    }
    ++iter;

    if (active_size == 0 ||
        (PGmax_new - PGmin_new <= tol && std::fabs(PGmax_new) <= tol && std::fabs(PGmin_new) <= tol)) {
      if (active_size == l) {
        r.converged = true;
        break;
      }
      // converged on the shrunk set: re-check every coordinate before stopping
      active_size = l;
      PGmax_old = inf;
      PGmin_old = -inf;
      continue;
    }
    PGmax_old = PGmax_new <= 0 ? inf : PGmax_new;
    PGmin_old = PGmin_new >= 0 ? -inf : PGmin_new;
  }
  r.n_iter = iter;
  return r;
}

// ---------------------------------------------------------------- bindings
py::dict svm_fit(F32Array X, I8Array y, F64Array C, int loss, double tol, int64_t max_iter, uint64_t seed,
                 double bias, int n_threads) {
  if (X.ndim() != 2) throw py::value_error("X must be 2-D (n_samples, n_features), got ndim=" + std::to_string(X.ndim()));
  const int64_t n = X.shape(0), d = X.shape(1);
  if (n == 0 || d == 0) throw py::value_error("X is empty: shape (" + std::to_string(n) + ", " + std::to_string(d) + ")");
  if (y.ndim() != 1 || y.shape(0) != n)
    throw py::value_error("y must be 1-D with " + std::to_string(n) + " entries (one per row of X)");
  if (C.ndim() != 1 || C.shape(0) != n)
    throw py::value_error("C must be 1-D with " + std::to_string(n) + " entries (one per row of X)");
  if (loss != 1 && loss != 2) throw py::value_error("loss must be 1 (hinge) or 2 (squared_hinge)");
  if (!(tol > 0) || !std::isfinite(tol)) throw py::value_error("tol must be a positive finite number");
  if (max_iter < 1) throw py::value_error("max_iter must be >= 1");
  if (!std::isfinite(bias) || bias < 0) throw py::value_error("bias must be finite and >= 0");
  const int8_t* yp = y.data();
  const double* cp = C.data();
  for (int64_t i = 0; i < n; ++i) {
    if (yp[i] != 1 && yp[i] != -1) throw py::value_error("y must hold only +1 / -1 (row " + std::to_string(i) + ")");
    if (!(cp[i] >= 0) || !std::isfinite(cp[i]))
      throw py::value_error("per-sample C must be finite and >= 0 (row " + std::to_string(i) + ")");
  }
  const int threads = resolve_threads(n_threads);
  FitResult r;
  {
    py::gil_scoped_release release;
    r = dcd_fit(X.data(), n, d, yp, cp, loss, tol, max_iter, seed, bias, threads);
  }
  if (r.bad_row >= 0) throw py::value_error("X contains NaN or inf (row " + std::to_string(r.bad_row) + ")");
  py::array_t<double> w(d), alpha(n);
  std::copy(r.w.begin(), r.w.end(), w.mutable_data());
  std::copy(r.alpha.begin(), r.alpha.end(), alpha.mutable_data());
  py::dict out;
  out["w"] = w;
  out["intercept"] = r.wb * bias;
  out["alpha"] = alpha;
  out["n_iter"] = r.n_iter;
  out["converged"] = r.converged;
  return out;
}

// X @ w + b for every row, rows split over threads.
py::array_t<double> svm_decision(F32Array X, F64Array w, double b, int n_threads) {
  if (X.ndim() != 2) throw py::value_error("X must be 2-D (n_samples, n_features), got ndim=" + std::to_string(X.ndim()));
  if (w.ndim() != 1) throw py::value_error("w must be 1-D");
  const int64_t n = X.shape(0), d = X.shape(1);
  if (w.shape(0) != d)
    throw py::value_error("X has " + std::to_string(d) + " features but the model was fitted on " +
                          std::to_string(w.shape(0)));
  py::array_t<double> out(n);
  double* op = out.mutable_data();
  const float* xp = X.data();
  const double* wp = w.data();
  const int threads = resolve_threads(n_threads);
  {
    py::gil_scoped_release release;
    const Kernels& K = kernels();
    const int64_t min_chunk = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, d));
    parallel_for(n, threads, min_chunk, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) op[i] = K.dot(xp + i * d, wp, d) + b;
    });
  }
  return out;
}

}  // namespace

void register_svm(py::module_& m) {
  m.def("svm_fit", &svm_fit, py::arg("X"), py::arg("y"), py::arg("C"), py::arg("loss") = 2, py::arg("tol") = 1e-4,
        py::arg("max_iter") = 1000, py::arg("seed") = 0, py::arg("bias") = 1.0, py::arg("n_threads") = 0,
        "Dual coordinate descent linear SVM (liblinear solve_l2r_l1l2_svc) on dense float32 rows.\n"
        "y: int8 +1/-1; C: per-sample C (float64, 0 = ignore row); loss 1 = hinge, 2 = squared hinge;\n"
        "bias: value of the extra constant feature (0 = no intercept). Returns dict w, intercept, alpha, n_iter, "
        "converged.");
  m.def("svm_decision", &svm_decision, py::arg("X"), py::arg("w"), py::arg("b"), py::arg("n_threads") = 0,
        "X @ w + b in double precision, rows split over n_threads");
  m.attr("svm_simd") = kernels().name;
}

}  // namespace fastforget
