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
void forward_crystal_gemm(const Shape&, DType, const ForwardArgs&, const void*, const void*,
                          int64_t, void*);
void backward_crystal_gemm(const Shape&, DType, const BackwardArgs&, const void*, const void*,
                           const void*, int64_t, void*);
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
//
// With `tabt`, each crystal's rows are also written transposed, [6K, n_c] at offset
// p0·6K, and axis-major: rows a·2K + k (sin) and a·2K + K + k (cos), so that one
// axis is one block of rows (the right-hand side of the gemm kernels' products
// over the table index). The rotation runs for up to 8 atoms at once (independent
// chains); every atom's values are those of the one-atom recurrence.
template <typename T>
void fourier_tables(const T* frac, const int64_t* ptr, int64_t n_crystals, int64_t K, T* tab,
                    T* tabt, int num_threads) {
    constexpr int64_t kGrain = 256, kLanes = 8;
    const int64_t K6 = 6 * K;
    std::vector<int64_t> items;  // (crystal, first atom) of runs of <= kGrain atoms
    for (int64_t c = 0; c < n_crystals; ++c)
        for (int64_t at = ptr[c]; at < ptr[c + 1]; at += kGrain) {
            items.push_back(c);
            items.push_back(at);
        }
    parallel_for(static_cast<int64_t>(items.size() / 2), num_threads, [&](int64_t w) {
        const int64_t c = items[2 * w], p0 = ptr[c], nc = ptr[c + 1] - p0;
        const int64_t first = items[2 * w + 1];
        const int64_t last = std::min(ptr[c + 1], first + kGrain);
        for (int64_t at0 = first; at0 < last; at0 += kLanes) {
            const int64_t nb = std::min(kLanes, last - at0);
            for (int a = 0; a < 3; ++a) {
                double c1[kLanes], s1[kLanes], sn[kLanes], cs[kLanes];
                for (int64_t b = 0; b < nb; ++b) {
                    const double f = static_cast<double>(frac[3 * (at0 + b) + a]);
                    const double x = f - std::floor(f);
                    c1[b] = std::cos(kTwoPi * x);
                    s1[b] = std::sin(kTwoPi * x);
                    sn[b] = 0.0;  // k = 0
                    cs[b] = 1.0;
                }
                for (int64_t k = 0; k < K; ++k) {
                    T* col = tabt ? tabt + p0 * K6 + (2 * a * K + k) * nc + (at0 - p0) : nullptr;
#pragma omp simd
                    for (int64_t b = 0; b < nb; ++b) {
                        T* row = tab + (at0 + b) * K6;
                        row[a * K + k] = static_cast<T>(sn[b]);
                        row[3 * K + a * K + k] = static_cast<T>(cs[b]);
                        if (col) {
                            col[b] = static_cast<T>(sn[b]);
                            col[K * nc + b] = static_cast<T>(cs[b]);
                        }
                        const double s_next = sn[b] * c1[b] + cs[b] * s1[b];
                        cs[b] = cs[b] * c1[b] - sn[b] * s1[b];
                        sn[b] = s_next;
                    }
                }
            }
        }
    });
}

template <typename T>
struct Tables {
    std::vector<T> tab, tabt;  // tabt only for the gemm kernels
};

template <typename T>
Tables<T> make_tables(const Shape& sh, const void* frac, const int64_t* ptr, bool transposed,
                      int num_threads) {
    Tables<T> t;
    t.tab.resize(static_cast<size_t>(sh.n_atoms * 6 * sh.num_freqs));
    if (transposed) t.tabt.resize(t.tab.size());
    fourier_tables(static_cast<const T*>(frac), ptr, sh.n_crystals, sh.num_freqs, t.tab.data(),
                   transposed ? t.tabt.data() : nullptr, num_threads);
    return t;
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

// Grows the thread's scratch to hold `bytes`.
void* reserve(Scratch& scratch, int64_t bytes) {
    const size_t words = static_cast<size_t>(bytes) / sizeof(double) + 1;
    if (scratch.t.size() < words) scratch.t.resize(words);
    return scratch.t.data();
}

template <typename T>
void forward_impl(const Shape& sh, DType dt, const ForwardArgs& a, Kernel kernel,
                  int num_threads) {
    const std::vector<int64_t> order = crystals_by_size(sh, a.ptr);
    const bool gemm = kernel == Kernel::Gemm;
    const Tables<T> tables = make_tables<T>(sh, a.frac, a.ptr, gemm, num_threads);
    const std::vector<T>& tab = tables.tab;
    const std::vector<T>& tabt = tables.tabt;
    const bool avx = use_avx2();
    parallel_for(sh.n_crystals, num_threads, [&](int64_t item) {
        thread_local Scratch scratch;
        const int64_t c = order[static_cast<size_t>(item)];
        const int64_t nc = a.ptr[c + 1] - a.ptr[c];
        if (gemm) {
            void* work = reserve(scratch, generic::gemm_work_bytes(sh, dt, nc, false));
#if DAO_EA_HAVE_AVX2
            if (avx) {
                avx2::forward_crystal_gemm(sh, dt, a, tab.data(), tabt.data(), c, work);
                return;
            }
#endif
            generic::forward_crystal_gemm(sh, dt, a, tab.data(), tabt.data(), c, work);
            return;
        }
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
void backward_impl(const Shape& sh, DType dt, const BackwardArgs& a, Kernel kernel,
                   int num_threads) {
    const std::vector<int64_t> order = crystals_by_size(sh, a.ptr);
    const bool gemm = kernel == Kernel::Gemm;
    const Tables<T> tables = make_tables<T>(sh, a.frac, a.ptr, gemm, num_threads);
    const std::vector<T>& tab = tables.tab;
    const std::vector<T>& tabt = tables.tabt;
    std::vector<T> two_pi_k(static_cast<size_t>(sh.num_freqs));
    for (int64_t kk = 0; kk < sh.num_freqs; ++kk)
        two_pi_k[kk] = static_cast<T>(kTwoPi * static_cast<double>(kk));
    const bool avx = use_avx2();
    parallel_for(sh.n_crystals, num_threads, [&](int64_t item) {
        thread_local Scratch scratch;
        const int64_t c = order[static_cast<size_t>(item)];
        const int64_t nc = a.ptr[c + 1] - a.ptr[c];
        if (gemm) {
            void* work = reserve(scratch, generic::gemm_work_bytes(sh, dt, nc, true));
#if DAO_EA_HAVE_AVX2
            if (avx) {
                avx2::backward_crystal_gemm(sh, dt, a, tab.data(), tabt.data(), two_pi_k.data(), c,
                                            work);
                return;
            }
#endif
            generic::backward_crystal_gemm(sh, dt, a, tab.data(), tabt.data(), two_pi_k.data(), c,
                                           work);
            return;
        }
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

void forward(const Shape& shape, DType dtype, const ForwardArgs& args, Kernel kernel,
             int num_threads) {
    check(shape, args.ptr);
    if (dtype == DType::F32)
        forward_impl<float>(shape, dtype, args, kernel, num_threads);
    else
        forward_impl<double>(shape, dtype, args, kernel, num_threads);
}

void backward(const Shape& shape, DType dtype, const BackwardArgs& args, Kernel kernel,
              int num_threads) {
    check(shape, args.ptr);
    if (dtype == DType::F32)
        backward_impl<float>(shape, dtype, args, kernel, num_threads);
    else
        backward_impl<double>(shape, dtype, args, kernel, num_threads);
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

ea::Kernel make_kernel(int code) {
    if (code != 0 && code != 1)
        throw std::invalid_argument("edge_attention: kernel code must be 0 (pairs) or 1 (gemm)");
    return static_cast<ea::Kernel>(code);
}
}  // namespace

void register_edge_attention(py::module_& m) {
    m.def(
        "edge_attention_forward",
        [](std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t u,
           std::uintptr_t frac, std::uintptr_t gram, std::uintptr_t ptr, std::uintptr_t o,
           std::uintptr_t y, std::uintptr_t lse, int64_t n_atoms, int64_t n_crystals,
           int64_t heads, int64_t d, int64_t dim, int64_t num_freqs, double eps, int dtype,
           int num_threads, int kernel) {
            const ea::Shape sh = make_shape(n_atoms, n_crystals, heads, d, dim, num_freqs, eps);
            const ea::DType dt = make_dtype(dtype);
            const ea::Kernel kn = make_kernel(kernel);
            ea::ForwardArgs a{as_ptr<const void>(q),    as_ptr<const void>(k),
                              as_ptr<const void>(v),    as_ptr<const void>(u),
                              as_ptr<const void>(frac), as_ptr<const void>(gram),
                              as_ptr<const int64_t>(ptr), as_ptr<void>(o),
                              as_ptr<void>(y),          as_ptr<void>(lse)};
            py::gil_scoped_release release;
            ea::forward(sh, dt, a, kn, num_threads);
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
           int num_threads, int kernel) {
            const ea::Shape sh = make_shape(n_atoms, n_crystals, heads, d, dim, num_freqs, eps);
            const ea::DType dt = make_dtype(dtype);
            const ea::Kernel kn = make_kernel(kernel);
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
            ea::backward(sh, dt, a, kn, num_threads);
        },
        "Fused edge-attention backward (see edge_attention.hpp): fills y (recomputed) and dq..dgram.");
    m.def("edge_attention_isa", &ea::isa, "Instruction set the CPU kernels run with.");
}

}  // namespace dao
