// Fused Crysformer edge attention on the CPU: the driver. See edge_attention.hpp
// for the contract and edge_attention_kernels.inc for the per-crystal kernels.
//
// One work item per crystal (handed out dynamically to std::threads, largest
// first): every write of the backward (dk, dv, dfrac of its atoms, dgram of the
// crystal) then belongs to one thread, so there are no atomics and results do
// not depend on the thread count. The kernels are compiled for the baseline
// instruction set and, on x86-64, for AVX2 + FMA; the driver picks AVX2 when the
// CPU has it (DAO_EDGE_ATTENTION_ISA=generic forces the baseline).
#define DAO_EA_ISA generic
#include "edge_attention_kernels.inc"
#undef DAO_EA_ISA

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include <pybind11/pybind11.h>

#include "parallel.hpp"

namespace py = pybind11;

namespace dao {
namespace ea {

#if DAO_EA_HAVE_AVX2
namespace avx2 {
void forward_crystal(const Shape&, DType, const ForwardArgs&, const void*, int64_t, void*);
void backward_crystal(const Shape&, DType, const BackwardArgs&, const void*, const void*, int64_t,
                      void*, double*);
}  // namespace avx2
#endif

namespace {

constexpr double kTwoPi = 6.283185307179586476925286766559;

// Per-atom Fourier tables: row n = [sin 2πk f_a (a-major), cos 2πk f_a], 6K values,
// by rotation in double precision (error ~K ulp) and rounded to T once. The
// pair features follow exactly from the angle-difference identities,
//   sin 2πk(f_j − f_i) = S_j C_i − C_j S_i,   cos 2πk(f_j − f_i) = C_j C_i + S_j S_i,
// and the integer part of f_j − f_i drops out of both (k is an integer): no
// trigonometry per pair, and no rounding of large arguments 2πk·Δ.
template <typename T>
std::vector<T> fourier_tables(const T* frac, int64_t n, int64_t K, int num_threads) {
    std::vector<T> tab(static_cast<size_t>(n * 6 * K));
    const int64_t grain = 256;
    parallel_for((n + grain - 1) / grain, num_threads, [&](int64_t w) {
        for (int64_t at = w * grain; at < std::min(n, (w + 1) * grain); ++at) {
            T* row = tab.data() + at * 6 * K;
            for (int a = 0; a < 3; ++a) {
                const double f = static_cast<double>(frac[3 * at + a]);
                const double x = f - std::floor(f);
                const double c1 = std::cos(kTwoPi * x), s1 = std::sin(kTwoPi * x);
                double sn = 0.0, cs = 1.0;  // k = 0
                for (int64_t k = 0; k < K; ++k) {
                    row[a * K + k] = static_cast<T>(sn);
                    row[3 * K + a * K + k] = static_cast<T>(cs);
                    const double s_next = sn * c1 + cs * s1;
                    cs = cs * c1 - sn * s1;
                    sn = s_next;
                }
            }
        }
    });
    return tab;
}

std::vector<int64_t> crystals_by_size(const Shape& sh, const int64_t* ptr) {
    std::vector<int64_t> order(static_cast<size_t>(sh.n_crystals));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
        return ptr[a + 1] - ptr[a] > ptr[b + 1] - ptr[b];
    });
    return order;
}

void check(const Shape& sh, const int64_t* ptr) {
    if (sh.n_atoms < 0 || sh.n_crystals < 0 || sh.heads < 1 || sh.d < 1 || sh.num_freqs < 1)
        throw std::invalid_argument("edge_attention: sizes must be positive");
    if (sh.dim != 6 * sh.num_freqs + 9)
        throw std::invalid_argument("edge_attention: dim must be 6 * num_freqs + 9");
    if (!(sh.eps > 0.0)) throw std::invalid_argument("edge_attention: eps must be > 0");
    if (sh.n_crystals > 0) {
        if (ptr[0] != 0 || ptr[sh.n_crystals] != sh.n_atoms)
            throw std::invalid_argument("edge_attention: ptr must run from 0 to n_atoms");
        for (int64_t c = 0; c < sh.n_crystals; ++c)
            if (ptr[c + 1] < ptr[c])
                throw std::invalid_argument("edge_attention: ptr must be non-decreasing");
    } else if (sh.n_atoms != 0) {
        throw std::invalid_argument("edge_attention: atoms without crystals");
    }
}

bool use_avx2() {
#if DAO_EA_HAVE_AVX2
    static const bool ok = [] {
        const char* env = std::getenv("DAO_EDGE_ATTENTION_ISA");
        if (env && std::string(env) == "generic") return false;
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }();
    return ok;
#else
    return false;
#endif
}

// Scratch per thread, in doubles (8-byte aligned for float and double alike).
struct Scratch {
    std::vector<double> t, d;
};

template <typename T>
void forward_impl(const Shape& sh, DType dt, const ForwardArgs& a, int num_threads) {
    const std::vector<int64_t> order = crystals_by_size(sh, a.ptr);
    const std::vector<T> tab =
        fourier_tables(static_cast<const T*>(a.frac), sh.n_atoms, sh.num_freqs, num_threads);
    const bool avx = use_avx2();
    parallel_for(sh.n_crystals, num_threads, [&](int64_t item) {
        thread_local Scratch scratch;
        const int64_t c = order[static_cast<size_t>(item)];
        const int64_t nc = a.ptr[c + 1] - a.ptr[c];
        const size_t need = static_cast<size_t>(sh.dim + nc * sh.dim + nc * sh.heads);
        if (scratch.t.size() * sizeof(double) < need * sizeof(T))
            scratch.t.resize(need * sizeof(T) / sizeof(double) + 1);
#if DAO_EA_HAVE_AVX2
        if (avx) {
            avx2::forward_crystal(sh, dt, a, tab.data(), c, scratch.t.data());
            return;
        }
#endif
        (void)avx;
        generic::forward_crystal(sh, dt, a, tab.data(), c, scratch.t.data());
    });
}

template <typename T>
void backward_impl(const Shape& sh, DType dt, const BackwardArgs& a, int num_threads) {
    const std::vector<int64_t> order = crystals_by_size(sh, a.ptr);
    const std::vector<T> tab =
        fourier_tables(static_cast<const T*>(a.frac), sh.n_atoms, sh.num_freqs, num_threads);
    std::vector<T> two_pi_k(static_cast<size_t>(sh.num_freqs));
    for (int64_t kk = 0; kk < sh.num_freqs; ++kk)
        two_pi_k[kk] = static_cast<T>(kTwoPi * static_cast<double>(kk));
    const bool avx = use_avx2();
    parallel_for(sh.n_crystals, num_threads, [&](int64_t item) {
        thread_local Scratch scratch;
        const int64_t c = order[static_cast<size_t>(item)];
        const int64_t nc = a.ptr[c + 1] - a.ptr[c];
        const size_t need =
            static_cast<size_t>(4 * nc * sh.dim + sh.dim + sh.heads + nc * sh.heads);
        if (scratch.t.size() * sizeof(double) < need * sizeof(T))
            scratch.t.resize(need * sizeof(T) / sizeof(double) + 1);
        if (scratch.d.size() < static_cast<size_t>(4 * nc + 1)) scratch.d.resize(4 * nc + 1);
#if DAO_EA_HAVE_AVX2
        if (avx) {
            avx2::backward_crystal(sh, dt, a, tab.data(), two_pi_k.data(), c, scratch.t.data(),
                                   scratch.d.data());
            return;
        }
#endif
        (void)avx;
        generic::backward_crystal(sh, dt, a, tab.data(), two_pi_k.data(), c, scratch.t.data(),
                                  scratch.d.data());
    });
}

}  // namespace

void forward(const Shape& shape, DType dtype, const ForwardArgs& args, int num_threads) {
    check(shape, args.ptr);
    if (dtype == DType::F32)
        forward_impl<float>(shape, dtype, args, num_threads);
    else
        forward_impl<double>(shape, dtype, args, num_threads);
}

void backward(const Shape& shape, DType dtype, const BackwardArgs& args, int num_threads) {
    check(shape, args.ptr);
    if (dtype == DType::F32)
        backward_impl<float>(shape, dtype, args, num_threads);
    else
        backward_impl<double>(shape, dtype, args, num_threads);
}

const char* isa() { return use_avx2() ? "avx2" : "generic"; }

}  // namespace ea

namespace {
template <typename P>
P* as_ptr(std::uintptr_t p) {
    return reinterpret_cast<P*>(p);
}

ea::Shape make_shape(int64_t n_atoms, int64_t n_crystals, int64_t heads, int64_t d, int64_t dim,
                     int64_t num_freqs, double eps) {
    ea::Shape sh;
    sh.n_atoms = n_atoms;
    sh.n_crystals = n_crystals;
    sh.heads = heads;
    sh.d = d;
    sh.dim = dim;
    sh.num_freqs = num_freqs;
    sh.eps = eps;
    return sh;
}

ea::DType make_dtype(int code) {
    if (code != 0 && code != 1)
        throw std::invalid_argument("edge_attention: dtype code must be 0 (f32) or 1 (f64)");
    return static_cast<ea::DType>(code);
}
}  // namespace

void register_edge_attention(py::module_& m) {
    m.def(
        "edge_attention_forward",
        [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t u,
           std::uintptr_t frac, std::uintptr_t gram, std::uintptr_t ptr, std::uintptr_t o,
           std::uintptr_t y, std::uintptr_t lse, int64_t n_atoms, int64_t n_crystals,
           int64_t heads, int64_t d, int64_t dim, int64_t num_freqs, double eps, int dtype,
           int num_threads) {
            const ea::Shape sh = make_shape(n_atoms, n_crystals, heads, d, dim, num_freqs, eps);
            const ea::DType dt = make_dtype(dtype);
            ea::ForwardArgs a{as_ptr<const void>(q),    as_ptr<const void>(k),
                              as_ptr<const void>(v),    as_ptr<const void>(u),
                              as_ptr<const void>(frac), as_ptr<const void>(gram),
                              as_ptr<const int64_t>(ptr), as_ptr<void>(o),
                              as_ptr<void>(y),          as_ptr<void>(lse)};
            py::gil_scoped_release release;
            ea::forward(sh, dt, a, num_threads);
        },
        "Fused edge-attention forward (see edge_attention.hpp): fills o, y, lse.");
    m.def(
        "edge_attention_backward",
        [](std::uintptr_t grad_o, std::uintptr_t grad_y, std::uintptr_t q, std::uintptr_t k,
           std::uintptr_t v, std::uintptr_t u, std::uintptr_t frac, std::uintptr_t gram,
           std::uintptr_t ptr, std::uintptr_t o, std::uintptr_t lse, std::uintptr_t y,
           std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv, std::uintptr_t du,
           std::uintptr_t dfrac, std::uintptr_t dgram, int64_t n_atoms, int64_t n_crystals,
           int64_t heads, int64_t d, int64_t dim, int64_t num_freqs, double eps, int dtype,
           int num_threads) {
            const ea::Shape sh = make_shape(n_atoms, n_crystals, heads, d, dim, num_freqs, eps);
            const ea::DType dt = make_dtype(dtype);
            ea::BackwardArgs a{as_ptr<const void>(grad_o), as_ptr<const void>(grad_y),
                               as_ptr<const void>(q),      as_ptr<const void>(k),
                               as_ptr<const void>(v),      as_ptr<const void>(u),
                               as_ptr<const void>(frac),   as_ptr<const void>(gram),
                               as_ptr<const int64_t>(ptr), as_ptr<const void>(o),
                               as_ptr<const void>(lse),    as_ptr<void>(y),
                               as_ptr<void>(dq),           as_ptr<void>(dk),
                               as_ptr<void>(dv),           as_ptr<void>(du),
                               as_ptr<void>(dfrac),        as_ptr<void>(dgram)};
            py::gil_scoped_release release;
            ea::backward(sh, dt, a, num_threads);
        },
        "Fused edge-attention backward (see edge_attention.hpp): fills y (recomputed) and dq..dgram.");
    m.def("edge_attention_isa", &ea::isa, "Instruction set the CPU kernels run with.");
}

}  // namespace dao
