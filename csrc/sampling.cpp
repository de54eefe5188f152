// Neighbour sampling around a code and nearest-to-hyperplane selection (BIA's rules).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "rng.h"

namespace py = pybind11;
using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

namespace fastforget {

static void check_finite(const float* p, size_t n, const char* name) {
  for (size_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) throw py::value_error(std::string(name) + " contains NaN or inf");
}

// h + r * normalize(sigma * N(0, I)), r ~ U(0, radius_max); one independent stream per row.
py::array_t<float> sample_neighbors(F32Array h, int64_t n, double sigma, double radius_max, uint64_t seed) {
  if (h.ndim() != 1) throw py::value_error("h must be a 1-D code (flatten it first), got ndim=" + std::to_string(h.ndim()));
  if (n <= 0) throw py::value_error("n must be positive, got " + std::to_string(n));
  if (!(sigma > 0) || !std::isfinite(sigma)) throw py::value_error("sigma must be a positive finite number");
  if (!(radius_max >= 0) || !std::isfinite(radius_max)) throw py::value_error("radius_max must be >= 0 and finite");
  const int64_t d = h.shape(0);
  if (d == 0) throw py::value_error("h is empty");
  const float* hp = h.data();
  check_finite(hp, d, "h");
  py::array_t<float> out({n, d});
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<double> dir(d);
    for (int64_t i = 0; i < n; ++i) {
      SplitMix64 rng(stream_seed(seed, static_cast<uint64_t>(i)));
      double norm2 = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        dir[j] = sigma * rng.normal();
        norm2 += dir[j] * dir[j];
      }
      const double r = radius_max * rng.uniform();
      const double scale = r / std::max(std::sqrt(norm2), 1e-12);
      float* row = op + i * d;
      for (int64_t j = 0; j < d; ++j) row[j] = static_cast<float>(hp[j] + scale * dir[j]);
    }
  }
  return out;
}

// Indices of the k rows of X closest to the hyperplane w.x + b = 0 (smallest |w.x + b| / |w|),
// ties broken by index; returns (indices, signed distances).
py::tuple nearest_to_hyperplane(F32Array X, F32Array w, double b, int64_t k) {
  if (X.ndim() != 2) throw py::value_error("X must be 2-D (n, d)");
  if (w.ndim() != 1) throw py::value_error("w must be 1-D (d,)");
  const int64_t n = X.shape(0), d = X.shape(1);
  if (w.shape(0) != d)
    throw py::value_error("w has " + std::to_string(w.shape(0)) + " entries but X has " + std::to_string(d) + " columns");
  if (k <= 0 || k > n) throw py::value_error("k must be in [1, n=" + std::to_string(n) + "], got " + std::to_string(k));
  if (!std::isfinite(b)) throw py::value_error("b is NaN or inf");
  const float* xp = X.data();
  const float* wp = w.data();
  check_finite(wp, d, "w");
  check_finite(xp, static_cast<size_t>(n) * d, "X");
  std::vector<double> dist(n);
  std::vector<int64_t> order(n);
  {
    py::gil_scoped_release release;
    double wn = 0.0;
    for (int64_t j = 0; j < d; ++j) wn += static_cast<double>(wp[j]) * wp[j];
    wn = std::sqrt(wn);
    if (wn == 0.0) throw std::invalid_argument("w is the zero vector");
    for (int64_t i = 0; i < n; ++i) {
      double s = b;
      const float* row = xp + i * d;
      for (int64_t j = 0; j < d; ++j) s += static_cast<double>(row[j]) * wp[j];
      dist[i] = s / wn;
    }
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t c) {
      const double da = std::fabs(dist[a]), dc = std::fabs(dist[c]);
      return da < dc || (da == dc && a < c);
    });
  }
  py::array_t<int64_t> idx(k);
  py::array_t<float> sd(k);
  for (int64_t i = 0; i < k; ++i) {
    idx.mutable_at(i) = order[i];
    sd.mutable_at(i) = static_cast<float>(dist[order[i]]);
  }
  return py::make_tuple(idx, sd);
}

void register_sampling(py::module_& m) {
  m.def("sample_neighbors", &sample_neighbors, py::arg("h"), py::arg("n"), py::arg("sigma"), py::arg("radius_max"),
        py::arg("seed") = 0, "h + r*normalize(sigma*N(0,I)), r~U(0,radius_max): n rows, deterministic under seed");
  m.def("nearest_to_hyperplane", &nearest_to_hyperplane, py::arg("X"), py::arg("w"), py::arg("b"), py::arg("k"),
        "indices and signed distances of the k rows nearest the hyperplane w.x+b=0");
}

}  // namespace fastforget
