// pybind11 bindings of the torch-free core. Tensors never cross this boundary:
// the Python layer passes data_ptr() integers, sizes and dtype codes.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>

#include "neighbor_list.hpp"
#include "parallel.hpp"

namespace py = pybind11;

namespace dao {
void register_cuda(py::module_& m);  // csrc/cuda/bind_cuda.cpp or its stub
void register_edge_attention(py::module_& m);  // csrc/edge_attention.cpp
void register_diffusion_step(py::module_& m);  // csrc/diffusion_step.cpp
}

namespace {

template <typename P>
P* as_ptr(std::uintptr_t p) {
    return reinterpret_cast<P*>(p);
}

std::unique_ptr<dao::nl::Result> neighbor_list_cpu(std::uintptr_t positions, std::uintptr_t cell,
                                                   std::uintptr_t ptr, std::uintptr_t pbc,
                                                   int64_t n_atoms, int64_t n_systems, int dtype,
                                                   double cutoff, bool self_interaction,
                                                   bool want_distances, bool want_vectors,
                                                   int num_threads, int64_t cell_list_min_atoms) {
    if (dtype != 0 && dtype != 1) throw std::invalid_argument("dtype code must be 0 (f32) or 1 (f64)");
    dao::nl::Input in;
    in.positions = as_ptr<const void>(positions);
    in.cell = as_ptr<const void>(cell);
    in.ptr = as_ptr<const int64_t>(ptr);
    in.pbc = as_ptr<const uint8_t>(pbc);
    in.n_atoms = n_atoms;
    in.n_systems = n_systems;
    in.dtype = static_cast<dao::nl::DType>(dtype);
    dao::nl::Options opt;
    opt.cutoff = cutoff;
    opt.self_interaction = self_interaction;
    opt.want_distances = want_distances;
    opt.want_vectors = want_vectors;
    opt.num_threads = num_threads;
    opt.cell_list_min_atoms = cell_list_min_atoms;
    py::gil_scoped_release release;
    return dao::nl::compute(in, opt);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "dao-csp compiled core (torch-free: pointers and sizes as integers)";

    py::class_<dao::nl::Result>(m, "NeighborResult")
        .def("size", &dao::nl::Result::size, "Number of pairs found.")
        .def(
            "copy_to",
            [](const dao::nl::Result& r, std::uintptr_t i, std::uintptr_t j, std::uintptr_t shifts,
               std::uintptr_t distances, std::uintptr_t vectors, int num_threads) {
                py::gil_scoped_release release;
                r.copy_to(as_ptr<int32_t>(i), as_ptr<int32_t>(j), as_ptr<int16_t>(shifts),
                          as_ptr<void>(distances), as_ptr<void>(vectors), num_threads);
            },
            py::arg("i"), py::arg("j"), py::arg("shifts"), py::arg("distances"),
            py::arg("vectors"), py::arg("num_threads") = 1,
            "Copy the pairs into caller-allocated buffers (0 = not wanted).");

    m.def("neighbor_list_cpu", &neighbor_list_cpu, py::arg("positions"), py::arg("cell"),
          py::arg("ptr"), py::arg("pbc"), py::arg("n_atoms"), py::arg("n_systems"),
          py::arg("dtype"), py::arg("cutoff"), py::arg("self_interaction"),
          py::arg("want_distances"), py::arg("want_vectors"), py::arg("num_threads"),
          py::arg("cell_list_min_atoms") = 0,
          "Periodic neighbour list of a batch of systems on the CPU (see neighbor_list.hpp).");

    // "openmp": parallel_for shares the OpenMP thread team (torch's, once torch is
    // imported); "threads": one std::thread pool per call (see parallel.hpp).
    m.attr("PARALLEL_BACKEND") = dao::parallel_uses_openmp() ? "openmp" : "threads";

    dao::register_edge_attention(m);
    dao::register_diffusion_step(m);
    dao::register_cuda(m);
}
