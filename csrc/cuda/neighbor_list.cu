// Periodic neighbour lists on the GPU: the CUDA kernels behind backend="cuda".
//
// Torch-free like the CPU core: device pointers, sizes, a dtype code and the
// CUDA stream arrive as integers (see bind_cuda.cpp); the Python glue
// (src/dao/ops/_neighbor_list_cuda.py) allocates every buffer with torch and
// does the small per-system pre-pass. Contract: csrc/neighbor_list.hpp.
//
// Input layout prepared by the glue (atoms *sorted* by (system, bin), so each
// bin of a cell-list system is a contiguous index range):
//   xw    [N, 3] Real    wrapped cartesian positions
//   frac  [N, 3] double  wrapped fractional coordinates (raw on open axes)
//   off   [N, 3] int32   integer offsets removed by the wrapping
//   orig  [N]    int32   index of each sorted atom in the caller's positions
//   sys   [N]    int32   system of each sorted atom
//   bin   [N]    int32   local bin of each sorted atom (cell-list systems)
//   ptr   [B + 1] int64  first sorted atom of each system
//   sys_real [B, 16] double: cell rows a, b, c (9); triangular frame
//            ax, bx, cx, by, cy, cz (6); unused (1)
//   sys_int  [B, 12] int64: periodic[3], use_cells, nbin[3], reach[3],
//            first global bin, unused
//   bin_start [total bins + 1] int64: first sorted atom of each global bin
//
// One thread per sorted atom i (a row) enumerates its neighbours with the
// same two strategies as the CPU core:
//   * small systems: for every j of the system, exactly the image shifts whose
//     image can lie inside the cutoff sphere, found in the triangular frame of
//     the cell (c bounds z, then b bounds y, then a bounds x);
//   * large systems: a cell list in fractional space with bins at least one
//     cutoff high, neighbour bins wrapped with an image shift (so cells
//     thinner than the cutoff work).
// A count pass stores the number of pairs of every row; the glue turns the
// counts into row offsets (torch.cumsum) and the fill pass writes each row
// into its own slice, never past its end, recording how many pairs it found.
// The glue compares both and refills from the fill pass's numbers if a pair at
// the cutoff was decided differently by the two compiled kernels.
//
// The distance test runs in the input dtype (Real); image ranges and bin
// reaches are bounded in double with a small padding, so rounding there never
// drops a pair.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define DAO_HD __host__ __device__ __forceinline__
#else
#define DAO_HD inline
#endif

namespace dao {
namespace cuda_nl {

// Plain integers as they cross the binding (bind_cuda.cpp holds the same
// definition; keep the two in sync).
struct PassArgs {
    std::uintptr_t xw, frac, off, orig, sys, bin, ptr, sys_real, sys_int, bin_start;
    std::uintptr_t counts;  // [N] int64: count pass output / fill pass found-count
    std::uintptr_t row_off;  // [N + 1] int64 (fill pass)
    std::uintptr_t out_i, out_j, out_s, out_d, out_v;  // fill pass; d, v may be 0
    std::uintptr_t error;  // [1] int32, set to 1 when a shift does not fit in int16
    std::uintptr_t stream;
    int64_t n_atoms;
    int64_t n_systems;
    int dtype;  // 0 float32, 1 float64
    double cutoff;
    bool self_interaction;
};

namespace {

constexpr int kThreads = 128;
constexpr double kPad = 1e-9;
constexpr int64_t kMaxShift = 32767;

template <typename Real>
struct Params {
    const Real* xw;
    const double* frac;
    const int32_t* off;
    const int32_t* orig;
    const int32_t* sys;
    const int32_t* bin;
    const int64_t* ptr;
    const double* sys_real;
    const int64_t* sys_int;
    const int64_t* bin_start;
    int64_t* counts;
    const int64_t* row_off;
    int32_t* out_i;
    int32_t* out_j;
    int16_t* out_s;
    Real* out_d;
    Real* out_v;
    int32_t* error;
    int64_t n_atoms;
    double cutoff;
    Real cut2;
    bool self_interaction;
};

// Products and sums that the compiler may not fuse into FMAs: the count and
// fill kernels then round every distance identically, and like the CPU core.
DAO_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}
DAO_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
DAO_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
    return __dadd_rn(a, b);
#else
    return a + b;
#endif
}
DAO_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

template <typename Real>
DAO_HD Real norm2(Real x, Real y, Real z) {
    return add_rn(add_rn(mul_rn(x, x), mul_rn(y, y)), mul_rn(z, z));
}

// s0 * a + s1 * b + s2 * c for one cartesian component (a, b, c strided by 3).
DAO_HD double lattice_point(int64_t s0, int64_t s1, int64_t s2, const double* R, int k) {
    return add_rn(add_rn(mul_rn(double(s0), R[k]), mul_rn(double(s1), R[3 + k])),
                  mul_rn(double(s2), R[6 + k]));
}

DAO_HD int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
    return q;
}

// Integer range of s with |(df + s) * h + base| < r, padded by kPad.
DAO_HD void image_range(double df, double base, double h, double r, bool periodic, int64_t& lo,
                        int64_t& hi) {
    if (!periodic) {
        lo = 0;
        hi = 0;
        return;
    }
    const double center = -base / h - df;
    const double half = r / fabs(h) + kPad;
    lo = static_cast<int64_t>(ceil(center - half));
    hi = static_cast<int64_t>(floor(center + half));
}

// Collects the pairs of one row: counts them, and in the fill pass writes
// those that fit in the row's slice of the output.
template <typename Real, bool kFill>
struct Row {
    const Params<Real>& p;
    int64_t i;
    int32_t oi0, oi1, oi2;
    int64_t n;
    int64_t base, cap;
    bool overflow;

    DAO_HD Row(const Params<Real>& params, int64_t row) : p(params), i(row), n(0), base(0), cap(0),
                                                          overflow(false) {
        oi0 = p.off[3 * i];
        oi1 = p.off[3 * i + 1];
        oi2 = p.off[3 * i + 2];
        if (kFill) {
            base = p.row_off[i];
            cap = p.row_off[i + 1] - base;
        }
    }

    DAO_HD void emit(int64_t j, int64_t s0, int64_t s1, int64_t s2, Real dx, Real dy, Real dz,
                     Real d2) {
        // Shift relative to the positions as given.
        const int64_t t0 = s0 - p.off[3 * j] + oi0;
        const int64_t t1 = s1 - p.off[3 * j + 1] + oi1;
        const int64_t t2 = s2 - p.off[3 * j + 2] + oi2;
        if (t0 > kMaxShift || t0 < -kMaxShift || t1 > kMaxShift || t1 < -kMaxShift ||
            t2 > kMaxShift || t2 < -kMaxShift) {
            overflow = true;
        }
        if (kFill && n < cap) {
            const int64_t q = base + n;
            p.out_i[q] = p.orig[i];
            p.out_j[q] = p.orig[j];
            p.out_s[3 * q] = static_cast<int16_t>(t0);
            p.out_s[3 * q + 1] = static_cast<int16_t>(t1);
            p.out_s[3 * q + 2] = static_cast<int16_t>(t2);
            if (p.out_d) p.out_d[q] = sqrt(d2);
            if (p.out_v) {
                p.out_v[3 * q] = dx;
                p.out_v[3 * q + 1] = dy;
                p.out_v[3 * q + 2] = dz;
            }
        }
        ++n;
    }
};

template <typename Real, bool kFill>
DAO_HD void row_by_images(const Params<Real>& p, int64_t s, Row<Real, kFill>& row) {
    const double* R = p.sys_real + 16 * s;
    const int64_t* I = p.sys_int + 12 * s;
    const bool per0 = I[0] != 0, per1 = I[1] != 0, per2 = I[2] != 0;
    const double ax = R[9], bx = R[10], cx = R[11], by = R[12], cy = R[13], cz = R[14];
    const double rc = p.cutoff;
    const double rc2 = rc * rc;
    const int64_t i = row.i;
    const double fi0 = p.frac[3 * i], fi1 = p.frac[3 * i + 1], fi2 = p.frac[3 * i + 2];
    const Real xi0 = p.xw[3 * i], xi1 = p.xw[3 * i + 1], xi2 = p.xw[3 * i + 2];
    const int64_t end = p.ptr[s + 1];
    for (int64_t j = p.ptr[s]; j < end; ++j) {
        const double df0 = p.frac[3 * j] - fi0;
        const double df1 = p.frac[3 * j + 1] - fi1;
        const double df2 = p.frac[3 * j + 2] - fi2;
        const Real dx0 = p.xw[3 * j] - xi0;
        const Real dx1 = p.xw[3 * j + 1] - xi1;
        const Real dx2 = p.xw[3 * j + 2] - xi2;
        int64_t c_lo, c_hi;
        image_range(df2, 0.0, cz, rc, per2, c_lo, c_hi);
        for (int64_t sc = c_lo; sc <= c_hi; ++sc) {
            const double w = df2 + double(sc);
            const double z = w * cz;
            const double ry2 = rc2 - z * z;
            if (ry2 < -kPad * rc2) continue;
            const double ry = sqrt(fmax(ry2, 0.0)) * (1.0 + kPad);
            int64_t b_lo, b_hi;
            image_range(df1, w * cy, by, ry, per1, b_lo, b_hi);
            for (int64_t sb = b_lo; sb <= b_hi; ++sb) {
                const double v = df1 + double(sb);
                const double y = v * by + w * cy;
                const double rx2 = ry2 - y * y;
                if (rx2 < -kPad * rc2) continue;
                const double rx = sqrt(fmax(rx2, 0.0)) * (1.0 + kPad);
                int64_t a_lo, a_hi;
                image_range(df0, v * bx + w * cx, ax, rx, per0, a_lo, a_hi);
                for (int64_t sa = a_lo; sa <= a_hi; ++sa) {
                    if (i == j && sa == 0 && sb == 0 && sc == 0 && !p.self_interaction) continue;
                    // Exact test in the original frame, in the input dtype.
                    const Real d0 = dx0 + Real(lattice_point(sa, sb, sc, R, 0));
                    const Real d1 = dx1 + Real(lattice_point(sa, sb, sc, R, 1));
                    const Real d2 = dx2 + Real(lattice_point(sa, sb, sc, R, 2));
                    const Real dd = norm2(d0, d1, d2);
                    if (dd < p.cut2) row.emit(j, sa, sb, sc, d0, d1, d2, dd);
                }
            }
        }
    }
}

template <typename Real, bool kFill>
DAO_HD void row_by_cells(const Params<Real>& p, int64_t s, Row<Real, kFill>& row) {
    const double* R = p.sys_real + 16 * s;
    const int64_t* I = p.sys_int + 12 * s;
    const bool per[3] = {I[0] != 0, I[1] != 0, I[2] != 0};
    const int64_t n0 = I[4], n1 = I[5], n2 = I[6];
    const int64_t r0 = I[7], r1 = I[8], r2 = I[9];
    const int64_t first_bin = I[10];
    const int64_t i = row.i;
    const int64_t b = p.bin[i];
    const int64_t b0 = b / (n1 * n2), b1 = (b / n2) % n1, b2 = b % n2;
    const Real xi0 = p.xw[3 * i], xi1 = p.xw[3 * i + 1], xi2 = p.xw[3 * i + 2];
    // Along open axes only bins of the grid exist: clamp the reach to them
    // (atoms in a plane give a degenerate, very thin bin and a huge reach).
    const int64_t o0_lo = per[0] ? -r0 : (r0 < b0 ? -r0 : -b0);
    const int64_t o0_hi = per[0] ? r0 : (r0 < n0 - 1 - b0 ? r0 : n0 - 1 - b0);
    const int64_t o1_lo = per[1] ? -r1 : (r1 < b1 ? -r1 : -b1);
    const int64_t o1_hi = per[1] ? r1 : (r1 < n1 - 1 - b1 ? r1 : n1 - 1 - b1);
    const int64_t o2_lo = per[2] ? -r2 : (r2 < b2 ? -r2 : -b2);
    const int64_t o2_hi = per[2] ? r2 : (r2 < n2 - 1 - b2 ? r2 : n2 - 1 - b2);
    for (int64_t o0 = o0_lo; o0 <= o0_hi; ++o0) {
        int64_t t0 = b0 + o0, s0 = 0;
        if (per[0]) {
            s0 = floor_div(t0, n0);
            t0 -= s0 * n0;
        } else if (t0 < 0 || t0 >= n0) {
            continue;
        }
        for (int64_t o1 = o1_lo; o1 <= o1_hi; ++o1) {
            int64_t t1 = b1 + o1, s1 = 0;
            if (per[1]) {
                s1 = floor_div(t1, n1);
                t1 -= s1 * n1;
            } else if (t1 < 0 || t1 >= n1) {
                continue;
            }
            for (int64_t o2 = o2_lo; o2 <= o2_hi; ++o2) {
                int64_t t2 = b2 + o2, s2 = 0;
                if (per[2]) {
                    s2 = floor_div(t2, n2);
                    t2 -= s2 * n2;
                } else if (t2 < 0 || t2 >= n2) {
                    continue;
                }
                const int64_t nb = first_bin + (t0 * n1 + t1) * n2 + t2;
                const Real base0 = Real(lattice_point(s0, s1, s2, R, 0)) - xi0;
                const Real base1 = Real(lattice_point(s0, s1, s2, R, 1)) - xi1;
                const Real base2 = Real(lattice_point(s0, s1, s2, R, 2)) - xi2;
                const bool zero_shift = s0 == 0 && s1 == 0 && s2 == 0;
                const int64_t q_end = p.bin_start[nb + 1];
                for (int64_t q = p.bin_start[nb]; q < q_end; ++q) {
                    const Real d0 = p.xw[3 * q] + base0;
                    const Real d1 = p.xw[3 * q + 1] + base1;
                    const Real d2 = p.xw[3 * q + 2] + base2;
                    const Real dd = norm2(d0, d1, d2);
                    if (dd < p.cut2) {
                        if (q == i && zero_shift && !p.self_interaction) continue;
                        row.emit(q, s0, s1, s2, d0, d1, d2, dd);
                    }
                }
            }
        }
    }
}

// The whole work of one row; shared by the kernels and, for testing the
// enumeration without a GPU, callable from host code.
template <typename Real, bool kFill>
DAO_HD void process_row(const Params<Real>& p, int64_t i) {
    Row<Real, kFill> row(p, i);
    const int64_t s = p.sys[i];
    if (p.sys_int[12 * s + 3] != 0) {
        row_by_cells<Real, kFill>(p, s, row);
    } else {
        row_by_images<Real, kFill>(p, s, row);
    }
    p.counts[i] = row.n;
    if (row.overflow) {
#if defined(__CUDA_ARCH__)
        atomicOr(p.error, 1);
#else
        *p.error = 1;
#endif
    }
}

template <typename Real, bool kFill>
__global__ void __launch_bounds__(kThreads) neighbor_list_rows_kernel(Params<Real> p) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < p.n_atoms) process_row<Real, kFill>(p, i);
}

template <typename T>
T* as_ptr(std::uintptr_t v) {
    return reinterpret_cast<T*>(v);
}

template <typename Real>
Params<Real> make_params(const PassArgs& a) {
    Params<Real> p;
    p.xw = as_ptr<const Real>(a.xw);
    p.frac = as_ptr<const double>(a.frac);
    p.off = as_ptr<const int32_t>(a.off);
    p.orig = as_ptr<const int32_t>(a.orig);
    p.sys = as_ptr<const int32_t>(a.sys);
    p.bin = as_ptr<const int32_t>(a.bin);
    p.ptr = as_ptr<const int64_t>(a.ptr);
    p.sys_real = as_ptr<const double>(a.sys_real);
    p.sys_int = as_ptr<const int64_t>(a.sys_int);
    p.bin_start = as_ptr<const int64_t>(a.bin_start);
    p.counts = as_ptr<int64_t>(a.counts);
    p.row_off = as_ptr<const int64_t>(a.row_off);
    p.out_i = as_ptr<int32_t>(a.out_i);
    p.out_j = as_ptr<int32_t>(a.out_j);
    p.out_s = as_ptr<int16_t>(a.out_s);
    p.out_d = as_ptr<Real>(a.out_d);
    p.out_v = as_ptr<Real>(a.out_v);
    p.error = as_ptr<int32_t>(a.error);
    p.n_atoms = a.n_atoms;
    p.cutoff = a.cutoff;
    p.cut2 = static_cast<Real>(a.cutoff * a.cutoff);
    p.self_interaction = a.self_interaction;
    return p;
}

void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        std::ostringstream m;
        m << "dao neighbor_list CUDA " << what << " failed: " << cudaGetErrorString(err);
        throw std::runtime_error(m.str());
    }
}

template <typename Real, bool kFill>
void launch(const PassArgs& a) {
    if (a.n_atoms == 0) return;
    const Params<Real> p = make_params<Real>(a);
    const int64_t blocks = (a.n_atoms + kThreads - 1) / kThreads;
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
    neighbor_list_rows_kernel<Real, kFill>
        <<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(p);
    check(cudaGetLastError(), kFill ? "fill kernel launch" : "count kernel launch");
}

void validate(const PassArgs& a, bool fill) {
    if (a.dtype != 0 && a.dtype != 1) {
        throw std::invalid_argument("dtype code must be 0 (float32) or 1 (float64)");
    }
    if (a.n_atoms < 0 || a.n_systems < 0) throw std::invalid_argument("negative sizes");
    if (a.n_atoms > 0 && (!a.xw || !a.frac || !a.off || !a.orig || !a.sys || !a.bin || !a.ptr ||
                          !a.sys_real || !a.sys_int || !a.bin_start || !a.counts || !a.error)) {
        throw std::invalid_argument("neighbor_list_cuda: a required buffer is null");
    }
    if (fill && a.n_atoms > 0 && (!a.row_off || !a.out_i || !a.out_j || !a.out_s)) {
        throw std::invalid_argument("neighbor_list_cuda fill: an output buffer is null");
    }
    if (!(a.cutoff > 0.0) || !std::isfinite(a.cutoff)) {
        throw std::invalid_argument("cutoff must be a positive finite number");
    }
}

}  // namespace

void count_pass(const PassArgs& a) {
    validate(a, false);
    if (a.dtype == 0) {
        launch<float, false>(a);
    } else {
        launch<double, false>(a);
    }
}

void fill_pass(const PassArgs& a) {
    validate(a, true);
    if (a.dtype == 0) {
        launch<float, true>(a);
    } else {
        launch<double, true>(a);
    }
}

}  // namespace cuda_nl
}  // namespace dao
