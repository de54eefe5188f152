// fastforget._native: one module, each source file registers its functions.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace fastforget {
void register_sampling(py::module_& m);
void register_svm(py::module_& m);
}  // namespace fastforget

PYBIND11_MODULE(_native, m) {
  m.doc() = "fastforget native helpers (C++17): boundary sampling, linear SVM";
  fastforget::register_sampling(m);
  fastforget::register_svm(m);
}
