// pybind11 entry points of the CUDA neighbour-list kernels (built with
// DAO_ENABLE_CUDA=ON; otherwise bind_cuda_stub.cpp is linked instead).
//
// Torch-free: device pointers, sizes, the dtype code and the CUDA stream cross
// as integers. The Python glue (src/dao/ops/_neighbor_list_cuda.py) allocates
// every buffer with torch (so the caching allocator is used), runs the count
// pass, sizes the outputs, then runs the fill pass; see neighbor_list.cu for
// the buffer layout.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace dao {
namespace cuda_nl {

// Same definition as in neighbor_list.cu; keep the two in sync.
struct PassArgs {
    std::uintptr_t xw, frac, off, orig, sys, bin, ptr, sys_real, sys_int, bin_start;
    std::uintptr_t counts;
    std::uintptr_t row_off;
    std::uintptr_t out_i, out_j, out_s, out_d, out_v;
    std::uintptr_t error;
    std::uintptr_t stream;
    int64_t n_atoms;
    int64_t n_systems;
    int dtype;
    double cutoff;
    bool self_interaction;
};

void count_pass(const PassArgs& a);
void fill_pass(const PassArgs& a);

}  // namespace cuda_nl

namespace {

#define DAO_NL_LAYOUT                                                                          \
    "buffers: dict of device pointers (int) named xw, frac, off, orig, sys, bin, ptr, "       \
    "sys_real, sys_int, bin_start, counts, error (and row_off, out_i, out_j, out_s, out_d, " \
    "out_v for the fill pass; out_d/out_v 0 when not wanted); layout in "                     \
    "csrc/cuda/neighbor_list.cu. Enqueued on `stream` (a cudaStream_t as int)."

cuda_nl::PassArgs make_args(const py::dict& buffers, int64_t n_atoms, int64_t n_systems,
                            int dtype, double cutoff, bool self_interaction,
                            std::uintptr_t stream) {
    auto get = [&](const char* key) -> std::uintptr_t {
        if (!buffers.contains(key)) return 0;
        return buffers[key].cast<std::uintptr_t>();
    };
    cuda_nl::PassArgs a{};
    a.xw = get("xw");
    a.frac = get("frac");
    a.off = get("off");
    a.orig = get("orig");
    a.sys = get("sys");
    a.bin = get("bin");
    a.ptr = get("ptr");
    a.sys_real = get("sys_real");
    a.sys_int = get("sys_int");
    a.bin_start = get("bin_start");
    a.counts = get("counts");
    a.row_off = get("row_off");
    a.out_i = get("out_i");
    a.out_j = get("out_j");
    a.out_s = get("out_s");
    a.out_d = get("out_d");
    a.out_v = get("out_v");
    a.error = get("error");
    a.stream = stream;
    a.n_atoms = n_atoms;
    a.n_systems = n_systems;
    a.dtype = dtype;
    a.cutoff = cutoff;
    a.self_interaction = self_interaction;
    return a;
}

}  // namespace

void register_cuda(py::module_& m) {
    m.attr("WITH_CUDA") = true;
    m.def(
        "neighbor_list_cuda_count",
        [](const py::dict& buffers, int64_t n_atoms, int64_t n_systems, int dtype,
           double cutoff, bool self_interaction, std::uintptr_t stream) {
            const auto a =
                make_args(buffers, n_atoms, n_systems, dtype, cutoff, self_interaction, stream);
            py::gil_scoped_release release;
            cuda_nl::count_pass(a);
        },
        py::arg("buffers"), py::arg("n_atoms"), py::arg("n_systems"), py::arg("dtype"),
        py::arg("cutoff"), py::arg("self_interaction"), py::arg("stream"),
        "Count pass: number of pairs of every sorted atom into counts [N] int64. " DAO_NL_LAYOUT);
    m.def(
        "neighbor_list_cuda_fill",
        [](const py::dict& buffers, int64_t n_atoms, int64_t n_systems, int dtype,
           double cutoff, bool self_interaction, std::uintptr_t stream) {
            const auto a =
                make_args(buffers, n_atoms, n_systems, dtype, cutoff, self_interaction, stream);
            py::gil_scoped_release release;
            cuda_nl::fill_pass(a);
        },
        py::arg("buffers"), py::arg("n_atoms"), py::arg("n_systems"), py::arg("dtype"),
        py::arg("cutoff"), py::arg("self_interaction"), py::arg("stream"),
        "Fill pass: writes the pairs of row i into row_off[i]..row_off[i + 1] and the number "
        "found into counts. " DAO_NL_LAYOUT);
}

}  // namespace dao
