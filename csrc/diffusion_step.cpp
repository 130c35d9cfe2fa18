// Fused predictor / corrector updates of DAO-G sampling (CPU). Placeholder: filled
// in by the fused-diffusion-step work.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace dao {
void register_diffusion_step(py::module_& /*m*/) {}
}  // namespace dao
