// Fused predictor / corrector updates of DAO-G sampling on the CPU (torch-free).
//
// Contract (the Python op dao::corrector_step / dao::predictor_step passes
// data_ptr() integers of contiguous tensors; 0 = term absent):
//
//   corrector_step_cpu: out[i] = wrap((frac[i] + a*score[i]) + c*noise[i])
//       coefs (float64) = {a, c}; n = number of scalars (3 N).
//   predictor_step_cpu:
//       out_frac[i] = wrap(((frac[i] + a*score[i]) + c_f*noise_f[i]) - g_f*grad_f[i])
//       out_lat[k]  = (((lat[k] - b*eps[k]) / q) + c_l*noise_l[k]) - g_l*grad_l[k]
//       coefs (float64) = {a, c_f, g_f, b, q, c_l, g_l} (q = sqrt(alpha_t));
//       n_frac = 3 N, n_lat = 9 B scalars.
//
// wrap(x) = x - floor(x), with a result that rounds to 1.0 set to 0.0: the same
// float operations as dao.diffusion.wrap_frac, so the result lies in [0, 1).
// Every coefficient is rounded to the element type first and each product and sum
// is rounded in that type, in the order written above: the same arithmetic as the
// unfused torch loop (tensor * python_float rounds the float to the tensor dtype).
// Elementwise and branch-free per element, so results do not depend on how the
// batch is composed or on the thread count.
//
// FP exceptions are never inspected here. GCC assumes they might be (-ftrapping-math)
// and then keeps every ?: on a float comparison below as a branch, so the loops stay
// scalar (about 3x slower than torch's vectorised ops). Allowing speculation changes
// no result. Set before the includes so that inline helpers share the setting
// (GCC does not inline across different optimisation settings).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace dao {
namespace {

// Below this many scalars per thread a thread costs more than the work it takes.
constexpr int64_t kMinPerThread = int64_t{1} << 16;

// 2^(mantissa bits): from this magnitude on every float is an integer.
template <typename T>
constexpr T kIntegral = T(4503599627370496.0);  // 2^52
template <>
constexpr float kIntegral<float> = 8388608.0f;  // 2^23

// floor(x), bit for bit (signed zeros, NaN and infinities included; checked against
// std::floor on all 2^32 float32 patterns and on random float64 bit patterns, the
// latter also in tests/ops/test_diffusion_step.py), in plain arithmetic the compiler
// vectorises, where std::floor without SSE4.1 is scalar code per element.
// (x + c) - c with c = ±2^52 (2^23) rounds x to an integer exactly (round to
// nearest, the default mode); a result above x is one too high.
template <typename T>
inline T floor_exact(T x) {
    const T c = std::copysign(kIntegral<T>, x);
    T r = std::copysign((x + c) - c, x);
    r = r > x ? r - T(1) : r;
    return std::fabs(x) < kIntegral<T> ? r : x;
}

template <typename T>
inline T wrap_unit(T x) {
    const T y = x - floor_exact(x);
    return y >= T(1) ? y - T(1) : y;
}

template <typename P>
P* as_ptr(std::uintptr_t p) {
    return reinterpret_cast<P*>(p);
}

// Runs body(begin, end) over [0, n) in contiguous ranges on up to num_threads threads.
template <typename F>
void parallel_ranges(int64_t n, int num_threads, F body) {
    const int64_t by_size = std::max<int64_t>(1, n / kMinPerThread);
    const int64_t nt = std::min<int64_t>(std::max(1, num_threads), by_size);
    if (nt <= 1) {
        body(int64_t{0}, n);
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(nt - 1));
    const int64_t chunk = (n + nt - 1) / nt;
    for (int64_t k = 1; k < nt; ++k) {
        const int64_t b = std::min(n, k * chunk), e = std::min(n, (k + 1) * chunk);
        pool.emplace_back([=] { body(b, e); });
    }
    body(int64_t{0}, std::min(n, chunk));
    for (auto& th : pool) th.join();
}

template <typename T>
void frac_update(const T* frac, const T* score, const T* noise, const T* grad, T a, T c, T g,
                 T* out, int64_t begin, int64_t end) {
    // The optional terms are tested once per range, not per element.
    if (noise && grad) {
        for (int64_t i = begin; i < end; ++i)
            out[i] = wrap_unit(((frac[i] + a * score[i]) + c * noise[i]) - g * grad[i]);
    } else if (noise) {
        for (int64_t i = begin; i < end; ++i)
            out[i] = wrap_unit((frac[i] + a * score[i]) + c * noise[i]);
    } else if (grad) {
        for (int64_t i = begin; i < end; ++i)
            out[i] = wrap_unit((frac[i] + a * score[i]) - g * grad[i]);
    } else {
        for (int64_t i = begin; i < end; ++i) out[i] = wrap_unit(frac[i] + a * score[i]);
    }
}

template <typename T>
void lattice_update(const T* lat, const T* eps, const T* noise, const T* grad, T b, T q, T c,
                    T g, T* out, int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
        T y = (lat[k] - b * eps[k]) / q;
        if (noise) y = y + c * noise[k];
        if (grad) y = y - g * grad[k];
        out[k] = y;
    }
}

void check_common(int dtype, int64_t n, const char* what) {
    if (dtype != 0 && dtype != 1)
        throw std::invalid_argument("dtype code must be 0 (float32) or 1 (float64)");
    if (n < 0) throw std::invalid_argument(std::string(what) + ": negative size");
}

void require(std::uintptr_t p, const char* name) {
    if (p == 0) throw std::invalid_argument(std::string(name) + " must not be null");
}

template <typename T>
void corrector_typed(std::uintptr_t frac, std::uintptr_t score, std::uintptr_t noise,
                     const double* coefs, std::uintptr_t out, int64_t n, int num_threads) {
    const T a = static_cast<T>(coefs[0]), c = static_cast<T>(coefs[1]);
    const T* f = as_ptr<const T>(frac);
    const T* s = as_ptr<const T>(score);
    const T* z = as_ptr<const T>(noise);
    T* o = as_ptr<T>(out);
    parallel_ranges(n, num_threads, [&](int64_t b, int64_t e) {
        frac_update<T>(f, s, z, nullptr, a, c, T(0), o, b, e);
    });
}

void corrector_step_cpu(std::uintptr_t frac, std::uintptr_t score, std::uintptr_t noise,
                        std::uintptr_t coefs, std::uintptr_t out, int64_t n, int dtype,
                        int num_threads) {
    check_common(dtype, n, "corrector_step_cpu");
    require(coefs, "coefs");
    if (n == 0) return;
    require(frac, "frac");
    require(score, "score");
    require(out, "out");
    const double* k = as_ptr<const double>(coefs);
    py::gil_scoped_release release;
    if (dtype == 0)
        corrector_typed<float>(frac, score, noise, k, out, n, num_threads);
    else
        corrector_typed<double>(frac, score, noise, k, out, n, num_threads);
}

template <typename T>
void predictor_typed(std::uintptr_t frac, std::uintptr_t score, std::uintptr_t noise_f,
                     std::uintptr_t grad_f, std::uintptr_t lat, std::uintptr_t eps,
                     std::uintptr_t noise_l, std::uintptr_t grad_l, const double* k,
                     std::uintptr_t out_f, std::uintptr_t out_l, int64_t n_frac, int64_t n_lat,
                     int num_threads) {
    const T a = static_cast<T>(k[0]), c_f = static_cast<T>(k[1]), g_f = static_cast<T>(k[2]);
    const T b = static_cast<T>(k[3]), q = static_cast<T>(k[4]);
    const T c_l = static_cast<T>(k[5]), g_l = static_cast<T>(k[6]);
    const T* f = as_ptr<const T>(frac);
    const T* s = as_ptr<const T>(score);
    const T* zf = as_ptr<const T>(noise_f);
    const T* gf = as_ptr<const T>(grad_f);
    const T* l = as_ptr<const T>(lat);
    const T* e = as_ptr<const T>(eps);
    const T* zl = as_ptr<const T>(noise_l);
    const T* gl = as_ptr<const T>(grad_l);
    T* of = as_ptr<T>(out_f);
    T* ol = as_ptr<T>(out_l);
    // One index space over both arrays: coordinates first, then lattices.
    parallel_ranges(n_frac + n_lat, num_threads, [&](int64_t lo, int64_t hi) {
        if (lo < n_frac) frac_update<T>(f, s, zf, gf, a, c_f, g_f, of, lo, std::min(hi, n_frac));
        if (hi > n_frac) {
            lattice_update<T>(l, e, zl, gl, b, q, c_l, g_l, ol, std::max(lo, n_frac) - n_frac,
                              hi - n_frac);
        }
    });
}

void predictor_step_cpu(std::uintptr_t frac, std::uintptr_t score, std::uintptr_t noise_f,
                        std::uintptr_t grad_f, std::uintptr_t lat, std::uintptr_t eps,
                        std::uintptr_t noise_l, std::uintptr_t grad_l, std::uintptr_t coefs,
                        std::uintptr_t out_f, std::uintptr_t out_l, int64_t n_frac,
                        int64_t n_lat, int dtype, int num_threads) {
    check_common(dtype, n_frac, "predictor_step_cpu (coordinates)");
    check_common(dtype, n_lat, "predictor_step_cpu (lattices)");
    require(coefs, "coefs");
    if (n_frac > 0) {
        require(frac, "frac");
        require(score, "score");
        require(out_f, "out_frac");
    }
    if (n_lat > 0) {
        require(lat, "lattice");
        require(eps, "eps");
        require(out_l, "out_lattice");
    }
    if (n_frac + n_lat == 0) return;
    const double* k = as_ptr<const double>(coefs);
    py::gil_scoped_release release;
    if (dtype == 0)
        predictor_typed<float>(frac, score, noise_f, grad_f, lat, eps, noise_l, grad_l, k, out_f,
                               out_l, n_frac, n_lat, num_threads);
    else
        predictor_typed<double>(frac, score, noise_f, grad_f, lat, eps, noise_l, grad_l, k, out_f,
                                out_l, n_frac, n_lat, num_threads);
}

}  // namespace

void register_diffusion_step(py::module_& m) {
    m.def("corrector_step_cpu", &corrector_step_cpu, py::arg("frac"), py::arg("score"),
          py::arg("noise"), py::arg("coefs"), py::arg("out"), py::arg("n"), py::arg("dtype"),
          py::arg("num_threads") = 1,
          "Fused DAO-G corrector on n scalars: out = wrap(frac + a score + c noise); "
          "coefs = float64 {a, c}; noise = 0 leaves the term out.");
    m.def("predictor_step_cpu", &predictor_step_cpu, py::arg("frac"), py::arg("score"),
          py::arg("noise_frac"), py::arg("grad_frac"), py::arg("lattice"), py::arg("eps"),
          py::arg("noise_lattice"), py::arg("grad_lattice"), py::arg("coefs"),
          py::arg("out_frac"), py::arg("out_lattice"), py::arg("n_frac"), py::arg("n_lattice"),
          py::arg("dtype"), py::arg("num_threads") = 1,
          "Fused DAO-G predictor over coordinates (n_frac scalars) and lattices (n_lattice "
          "scalars) in one pass; coefs = float64 {a, c_f, g_f, b, q, c_l, g_l}; a zero "
          "pointer leaves its term out.");
}

}  // namespace dao
