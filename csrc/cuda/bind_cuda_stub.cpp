// Linked when the package is built without CUDA: the same entry points exist
// and raise a clear error, so callers never degrade silently.
#include <pybind11/pybind11.h>

#include <stdexcept>

namespace py = pybind11;

namespace dao {

void register_cuda(py::module_& m) {
    m.attr("WITH_CUDA") = false;
    // The same entry points as csrc/cuda/bind_cuda.cpp, each raising.
    for (const char* name : {"neighbor_list_cuda_count", "neighbor_list_cuda_fill"}) {
        m.def(name, [](py::args, py::kwargs) -> py::object {
            throw std::runtime_error(
                "dao was not built with CUDA: reinstall with DAO_ENABLE_CUDA=ON and a CUDA "
                "toolkit (DAO_ENABLE_CUDA=ON pip install .), or use backend='triton' / 'torch'");
        });
    }
}

}  // namespace dao
