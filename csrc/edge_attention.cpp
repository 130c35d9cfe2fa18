#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace dao {
void register_edge_attention(py::module_& /*m*/) {}
}  // namespace dao
