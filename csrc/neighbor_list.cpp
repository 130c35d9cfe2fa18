// CPU periodic neighbour lists. See neighbor_list.hpp for the contract.
//
// Two strategies, chosen per system:
//   * small cells: for each atom pair, enumerate exactly the integer image
//     shifts whose image can lie inside the cutoff sphere. The cell is written
//     in a triangular frame (a along x, b in the xy plane) so the admissible
//     range of S_c follows from z alone, of S_b from (y, z), of S_a from
//     (x, y, z): almost every enumerated image is a hit, however skewed the
//     cell and however many images the cutoff spans.
//   * large cells: a cell list in fractional space with bins at least one
//     cutoff high (plane spacing, so triclinic cells are exact); neighbour bins
//     wrap with an image shift, so cells thinner than the cutoff work too.
// Work is split into chunks of consecutive atoms handed to std::threads; each
// chunk keeps its own buffers so the output order is deterministic (by i).
#include "neighbor_list.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

namespace dao {
namespace nl {
namespace {

constexpr int32_t kMaxShift = std::numeric_limits<int16_t>::max();
// Fractional padding of enumeration bounds: candidates within this margin are
// decided by the exact distance test, so rounding never drops a pair.
constexpr double kPad = 1e-9;

struct Vec3 {
    double x, y, z;
};

inline Vec3 operator+(Vec3 a, Vec3 b) { return {a.x + b.x, a.y + b.y, a.z + b.z}; }
inline Vec3 operator-(Vec3 a, Vec3 b) { return {a.x - b.x, a.y - b.y, a.z - b.z}; }
inline Vec3 operator*(double s, Vec3 a) { return {s * a.x, s * a.y, s * a.z}; }
inline double dot(Vec3 a, Vec3 b) { return a.x * b.x + a.y * b.y + a.z * b.z; }
inline Vec3 cross(Vec3 a, Vec3 b) {
    return {a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x};
}
inline double norm(Vec3 a) { return std::sqrt(dot(a, a)); }

// Per-system precomputation shared by both strategies.
struct System {
    int64_t begin = 0, end = 0;
    Vec3 a{}, b{}, c{};          // cell rows
    bool periodic[3] = {false, false, false};
    // Triangular frame: x = u*ax + v*bx + w*cx, y = v*by + w*cy, z = w*cz.
    double ax = 0, bx = 0, cx = 0, by = 0, cy = 0, cz = 0;
    double height[3] = {0, 0, 0};  // distance between lattice planes
    bool use_cells = false;
    // Cell list (only when use_cells).
    int64_t nbin[3] = {1, 1, 1};
    int64_t reach[3] = {0, 0, 0};  // neighbour bins to visit on each side
    double fmin[3] = {0, 0, 0};    // fractional origin of the bin grid
    double fwidth[3] = {1, 1, 1};  // fractional width of one bin
    std::vector<int64_t> bin_start;  // [nbins + 1]
    std::vector<int64_t> bin_atoms;  // local atom indices sorted by bin
    std::vector<int64_t> atom_bin;   // [n] bin of each local atom
    std::vector<Vec3> sorted_xw;     // wrapped positions in bin order
};

struct AtomData {
    std::vector<Vec3> frac;     // wrapped fractional coordinates [N]
    std::vector<Vec3> xw;       // wrapped cartesian positions [N]
    std::vector<int32_t> off;   // [N, 3] floor of the original fractional coords
};

template <typename T>
struct Chunk {
    std::vector<int32_t> i, j;
    std::vector<int16_t> s;
    std::vector<T> d, v;
};

template <typename T>
class ResultImpl final : public Result {
  public:
    std::vector<Chunk<T>> chunks;
    bool want_d = true, want_v = false;

    int64_t size() const override {
        int64_t n = 0;
        for (const auto& c : chunks) n += static_cast<int64_t>(c.i.size());
        return n;
    }

    void copy_to(int32_t* i, int32_t* j, int16_t* shifts, void* distances, void* vectors,
                 int num_threads) const override {
        if ((distances && !want_d) || (vectors && !want_v)) {
            throw std::invalid_argument("copy_to: distances/vectors were not computed");
        }
        std::vector<int64_t> offset(chunks.size() + 1, 0);
        for (size_t k = 0; k < chunks.size(); ++k) {
            offset[k + 1] = offset[k] + static_cast<int64_t>(chunks[k].i.size());
        }
        T* dist = static_cast<T*>(distances);
        T* vec = static_cast<T*>(vectors);
        auto work = [&](size_t k) {
            const auto& c = chunks[k];
            const size_t n = c.i.size();
            if (n == 0) return;
            const int64_t o = offset[k];
            std::memcpy(i + o, c.i.data(), n * sizeof(int32_t));
            std::memcpy(j + o, c.j.data(), n * sizeof(int32_t));
            std::memcpy(shifts + 3 * o, c.s.data(), 3 * n * sizeof(int16_t));
            if (dist) std::memcpy(dist + o, c.d.data(), n * sizeof(T));
            if (vec) std::memcpy(vec + 3 * o, c.v.data(), 3 * n * sizeof(T));
        };
        const int nt = std::max(1, std::min<int>(num_threads, static_cast<int>(chunks.size())));
        if (nt == 1) {
            for (size_t k = 0; k < chunks.size(); ++k) work(k);
            return;
        }
        std::atomic<size_t> next{0};
        std::vector<std::thread> pool;
        for (int t = 0; t < nt; ++t) {
            pool.emplace_back([&] {
                for (size_t k = next++; k < chunks.size(); k = next++) work(k);
            });
        }
        for (auto& th : pool) th.join();
    }
};

// Runs fn(k) for k in [0, n) on up to num_threads threads; the first exception
// is rethrown after all threads have joined.
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn) {
    const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n)));
    if (nt <= 1) {
        for (int64_t k = 0; k < n; ++k) fn(k);
        return;
    }
    std::atomic<int64_t> next{0};
    std::mutex err_mutex;
    std::exception_ptr err;
    std::vector<std::thread> pool;
    for (int t = 0; t < nt; ++t) {
        pool.emplace_back([&] {
            try {
                for (int64_t k = next++; k < n; k = next++) fn(k);
            } catch (...) {
                std::lock_guard<std::mutex> lock(err_mutex);
                if (!err) err = std::current_exception();
                next = n;
            }
        });
    }
    for (auto& th : pool) th.join();
    if (err) std::rethrow_exception(err);
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

template <typename T>
void prepare_system(const T* pos, const T* cell, const uint8_t* pbc, int64_t s, double cutoff,
                    int64_t cell_list_min_atoms, System& sys, AtomData& atoms) {
    const T* L = cell + 9 * s;
    sys.a = {double(L[0]), double(L[1]), double(L[2])};
    sys.b = {double(L[3]), double(L[4]), double(L[5])};
    sys.c = {double(L[6]), double(L[7]), double(L[8])};
    for (int k = 0; k < 3; ++k) sys.periodic[k] = pbc[3 * s + k] != 0;
    for (int k = 0; k < 9; ++k) {
        if (!std::isfinite(double(L[k]))) {
            std::ostringstream m;
            m << "cell of system " << s << " contains NaN or inf";
            fail(m.str());
        }
    }
    const Vec3 bxc = cross(sys.b, sys.c), cxa = cross(sys.c, sys.a), axb = cross(sys.a, sys.b);
    const double det = dot(sys.a, bxc);
    const double scale = norm(sys.a) * norm(sys.b) * norm(sys.c);
    if (!(std::abs(det) > 1e-12 * scale) || scale == 0.0) {
        std::ostringstream m;
        m << "cell of system " << s << " is singular (det = " << det
          << "); give three linearly independent lattice vectors";
        fail(m.str());
    }
    sys.height[0] = std::abs(det) / norm(bxc);
    sys.height[1] = std::abs(det) / norm(cxa);
    sys.height[2] = std::abs(det) / norm(axb);
    // Triangular frame.
    const double la = norm(sys.a);
    const Vec3 e1 = (1.0 / la) * sys.a;
    const Vec3 n = (1.0 / norm(axb)) * axb;
    const Vec3 e2 = cross(n, e1);
    sys.ax = la;
    sys.bx = dot(sys.b, e1);
    sys.by = dot(sys.b, e2);
    sys.cx = dot(sys.c, e1);
    sys.cy = dot(sys.c, e2);
    sys.cz = dot(sys.c, n);

    // Inverse cell (columns = reciprocal vectors / det): f = x . L^-1.
    const Vec3 r0 = (1.0 / det) * bxc, r1 = (1.0 / det) * cxa, r2 = (1.0 / det) * axb;
    for (int64_t i = sys.begin; i < sys.end; ++i) {
        const Vec3 x{double(pos[3 * i]), double(pos[3 * i + 1]), double(pos[3 * i + 2])};
        if (!std::isfinite(x.x) || !std::isfinite(x.y) || !std::isfinite(x.z)) {
            std::ostringstream m;
            m << "position of atom " << i << " contains NaN or inf";
            fail(m.str());
        }
        double f[3] = {dot(x, r0), dot(x, r1), dot(x, r2)};
        int32_t o[3] = {0, 0, 0};
        for (int k = 0; k < 3; ++k) {
            if (!sys.periodic[k]) continue;
            const double fl = std::floor(f[k]);
            if (std::abs(fl) > kMaxShift) {
                std::ostringstream m;
                m << "atom " << i << " lies " << fl << " cells outside its cell along axis " << k
                  << "; image shifts are stored as int16, wrap positions into the cell first";
                fail(m.str());
            }
            o[k] = static_cast<int32_t>(fl);
            f[k] -= fl;
            if (f[k] >= 1.0) {  // rounding of f - floor(f) for tiny negative f
                f[k] -= 1.0;
                o[k] += 1;
            }
        }
        atoms.frac[i] = {f[0], f[1], f[2]};
        atoms.xw[i] = f[0] * sys.a + f[1] * sys.b + f[2] * sys.c;
        for (int k = 0; k < 3; ++k) atoms.off[3 * i + k] = o[k];
    }

    // Strategy and cell-list grid.
    const int64_t n_local = sys.end - sys.begin;
    const int64_t threshold = cell_list_min_atoms > 0 ? cell_list_min_atoms : 64;
    if (n_local < threshold) return;
    int64_t nbin[3];
    double fmin[3], fspan[3];
    for (int k = 0; k < 3; ++k) {
        if (sys.periodic[k]) {
            fmin[k] = 0.0;
            fspan[k] = 1.0;
        } else {
            double lo = std::numeric_limits<double>::infinity(), hi = -lo;
            for (int64_t i = sys.begin; i < sys.end; ++i) {
                const double f = k == 0 ? atoms.frac[i].x : (k == 1 ? atoms.frac[i].y : atoms.frac[i].z);
                lo = std::min(lo, f);
                hi = std::max(hi, f);
            }
            fmin[k] = lo;
            fspan[k] = std::max(hi - lo, 1e-12);
        }
        const double extent = fspan[k] * sys.height[k];
        nbin[k] = std::max<int64_t>(1, static_cast<int64_t>(std::floor(extent / cutoff)));
    }
    // Keep the grid at most a few bins per atom (huge sparse cells).
    const double max_bins = 4.0 * double(n_local) + 27.0;
    double total = double(nbin[0]) * double(nbin[1]) * double(nbin[2]);
    if (total > max_bins) {
        const double shrink = std::cbrt(max_bins / total);
        for (int k = 0; k < 3; ++k) {
            nbin[k] = std::max<int64_t>(1, static_cast<int64_t>(std::floor(double(nbin[k]) * shrink)));
        }
        total = double(nbin[0]) * double(nbin[1]) * double(nbin[2]);
    }
    // Too few bins to gain anything: the pairwise image enumeration is faster.
    if (total < 27.0) return;
    sys.use_cells = true;
    for (int k = 0; k < 3; ++k) {
        sys.nbin[k] = nbin[k];
        sys.fmin[k] = fmin[k];
        sys.fwidth[k] = fspan[k] / double(nbin[k]);
        const double bin_height = sys.fwidth[k] * sys.height[k];
        sys.reach[k] = static_cast<int64_t>(std::ceil(cutoff / bin_height * (1.0 + kPad)));
    }
    const int64_t nb = nbin[0] * nbin[1] * nbin[2];
    sys.atom_bin.resize(n_local);
    std::vector<int64_t> count(nb + 1, 0);
    for (int64_t li = 0; li < n_local; ++li) {
        const Vec3& f = atoms.frac[sys.begin + li];
        const double fk[3] = {f.x, f.y, f.z};
        int64_t idx[3];
        for (int k = 0; k < 3; ++k) {
            int64_t q = static_cast<int64_t>(std::floor((fk[k] - sys.fmin[k]) / sys.fwidth[k]));
            idx[k] = std::min<int64_t>(std::max<int64_t>(q, 0), nbin[k] - 1);
        }
        const int64_t bin = (idx[0] * nbin[1] + idx[1]) * nbin[2] + idx[2];
        sys.atom_bin[li] = bin;
        ++count[bin + 1];
    }
    for (int64_t b = 0; b < nb; ++b) count[b + 1] += count[b];
    sys.bin_start = count;
    sys.bin_atoms.resize(n_local);
    sys.sorted_xw.resize(n_local);
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (int64_t li = 0; li < n_local; ++li) {
        const int64_t p = fill[sys.atom_bin[li]]++;
        sys.bin_atoms[p] = li;
        sys.sorted_xw[p] = atoms.xw[sys.begin + li];
    }
}

template <typename T>
struct Emitter {
    Chunk<T>& out;
    const AtomData& atoms;
    const Options& opt;

    inline void emit(int64_t i, int64_t j, int32_t sa, int32_t sb, int32_t sc, double d2,
                     const Vec3& v) {
        const int32_t s0 = sa - atoms.off[3 * j] + atoms.off[3 * i];
        const int32_t s1 = sb - atoms.off[3 * j + 1] + atoms.off[3 * i + 1];
        const int32_t s2 = sc - atoms.off[3 * j + 2] + atoms.off[3 * i + 2];
        if (std::abs(s0) > kMaxShift || std::abs(s1) > kMaxShift || std::abs(s2) > kMaxShift) {
            fail("an image shift does not fit in int16; wrap positions into the cell first");
        }
        out.i.push_back(static_cast<int32_t>(i));
        out.j.push_back(static_cast<int32_t>(j));
        out.s.push_back(static_cast<int16_t>(s0));
        out.s.push_back(static_cast<int16_t>(s1));
        out.s.push_back(static_cast<int16_t>(s2));
        if (opt.want_distances) out.d.push_back(static_cast<T>(std::sqrt(d2)));
        if (opt.want_vectors) {
            out.v.push_back(static_cast<T>(v.x));
            out.v.push_back(static_cast<T>(v.y));
            out.v.push_back(static_cast<T>(v.z));
        }
    }
};

// Integer range of s with |(df + s) * h + base| < r, padded by kPad.
inline void image_range(double df, double base, double h, double r, bool periodic, int64_t& lo,
                        int64_t& hi) {
    if (!periodic) {
        lo = 0;
        hi = 0;
        return;
    }
    const double ah = std::abs(h);
    const double center = -base / h - df;  // value of s that zeroes the component
    const double half = r / ah + kPad;
    lo = static_cast<int64_t>(std::ceil(center - half));
    hi = static_cast<int64_t>(std::floor(center + half));
}

template <typename T>
void pairs_by_images(const System& sys, int64_t i, const AtomData& atoms, double cutoff,
                     Emitter<T>& em) {
    const double rc2 = cutoff * cutoff;
    const Vec3 fi = atoms.frac[i];
    const Vec3 xi = atoms.xw[i];
    for (int64_t j = sys.begin; j < sys.end; ++j) {
        const Vec3 df = atoms.frac[j] - fi;
        const Vec3 dx = atoms.xw[j] - xi;
        int64_t c_lo, c_hi;
        image_range(df.z, 0.0, sys.cz, cutoff, sys.periodic[2], c_lo, c_hi);
        for (int64_t sc = c_lo; sc <= c_hi; ++sc) {
            const double w = df.z + double(sc);
            const double z = w * sys.cz;
            const double ry2 = rc2 - z * z;
            if (ry2 < -kPad * rc2) continue;
            const double ry = std::sqrt(std::max(ry2, 0.0)) * (1.0 + kPad);
            int64_t b_lo, b_hi;
            image_range(df.y, w * sys.cy, sys.by, ry, sys.periodic[1], b_lo, b_hi);
            for (int64_t sb = b_lo; sb <= b_hi; ++sb) {
                const double v = df.y + double(sb);
                const double y = v * sys.by + w * sys.cy;
                const double rx2 = ry2 - y * y;
                if (rx2 < -kPad * rc2) continue;
                const double rx = std::sqrt(std::max(rx2, 0.0)) * (1.0 + kPad);
                int64_t a_lo, a_hi;
                image_range(df.x, v * sys.bx + w * sys.cx, sys.ax, rx, sys.periodic[0], a_lo,
                            a_hi);
                for (int64_t sa = a_lo; sa <= a_hi; ++sa) {
                    if (i == j && sa == 0 && sb == 0 && sc == 0 && !em.opt.self_interaction) {
                        continue;
                    }
                    // Exact test in the original frame.
                    const Vec3 d = dx + (double(sa) * sys.a + double(sb) * sys.b + double(sc) * sys.c);
                    const double d2 = dot(d, d);
                    if (d2 < rc2) {
                        em.emit(i, j, int32_t(sa), int32_t(sb), int32_t(sc), d2, d);
                    }
                }
            }
        }
    }
}

inline int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
    return q;
}

template <typename T>
void pairs_by_cells(const System& sys, int64_t i, const AtomData& atoms, double cutoff,
                    Emitter<T>& em) {
    const double rc2 = cutoff * cutoff;
    const int64_t li = i - sys.begin;
    const int64_t bin = sys.atom_bin[li];
    const int64_t n1 = sys.nbin[1], n2 = sys.nbin[2];
    const int64_t bidx[3] = {bin / (n1 * n2), (bin / n2) % n1, bin % n2};
    const Vec3 xi = atoms.xw[i];
    const Vec3* xs = sys.sorted_xw.data();
    for (int64_t o0 = -sys.reach[0]; o0 <= sys.reach[0]; ++o0) {
        int64_t t0 = bidx[0] + o0, s0 = 0;
        if (sys.periodic[0]) {
            s0 = floor_div(t0, sys.nbin[0]);
            t0 -= s0 * sys.nbin[0];
        } else if (t0 < 0 || t0 >= sys.nbin[0]) {
            continue;
        }
        for (int64_t o1 = -sys.reach[1]; o1 <= sys.reach[1]; ++o1) {
            int64_t t1 = bidx[1] + o1, s1 = 0;
            if (sys.periodic[1]) {
                s1 = floor_div(t1, n1);
                t1 -= s1 * n1;
            } else if (t1 < 0 || t1 >= n1) {
                continue;
            }
            for (int64_t o2 = -sys.reach[2]; o2 <= sys.reach[2]; ++o2) {
                int64_t t2 = bidx[2] + o2, s2 = 0;
                if (sys.periodic[2]) {
                    s2 = floor_div(t2, n2);
                    t2 -= s2 * n2;
                } else if (t2 < 0 || t2 >= n2) {
                    continue;
                }
                const int64_t nb = (t0 * n1 + t1) * n2 + t2;
                const Vec3 shift = double(s0) * sys.a + double(s1) * sys.b + double(s2) * sys.c;
                const Vec3 base = shift - xi;
                const bool zero_shift = s0 == 0 && s1 == 0 && s2 == 0;
                const int64_t p_end = sys.bin_start[nb + 1];
                for (int64_t p = sys.bin_start[nb]; p < p_end; ++p) {
                    const double dx = xs[p].x + base.x;
                    const double dy = xs[p].y + base.y;
                    const double dz = xs[p].z + base.z;
                    const double d2 = dx * dx + dy * dy + dz * dz;
                    if (d2 < rc2) {
                        const int64_t j = sys.begin + sys.bin_atoms[p];
                        if (j == i && zero_shift && !em.opt.self_interaction) continue;
                        em.emit(i, j, int32_t(s0), int32_t(s1), int32_t(s2), d2, {dx, dy, dz});
                    }
                }
            }
        }
    }
}

template <typename T>
std::unique_ptr<Result> compute_typed(const Input& in, const Options& opt) {
    const T* pos = static_cast<const T*>(in.positions);
    const T* cell = static_cast<const T*>(in.cell);
    auto result = std::make_unique<ResultImpl<T>>();
    result->want_d = opt.want_distances;
    result->want_v = opt.want_vectors;
    if (in.n_atoms == 0) return result;

    std::vector<System> systems(static_cast<size_t>(in.n_systems));
    AtomData atoms;
    atoms.frac.resize(in.n_atoms);
    atoms.xw.resize(in.n_atoms);
    atoms.off.resize(3 * in.n_atoms);
    for (int64_t s = 0; s < in.n_systems; ++s) {
        systems[s].begin = in.ptr[s];
        systems[s].end = in.ptr[s + 1];
    }
    parallel_for(in.n_systems, opt.num_threads, [&](int64_t s) {
        prepare_system<T>(pos, cell, in.pbc, s, opt.cutoff, opt.cell_list_min_atoms, systems[s],
                          atoms);
    });

    // Chunks of consecutive atoms; several per thread for load balance.
    const int64_t nt = std::max(1, opt.num_threads);
    const int64_t chunk_atoms = std::max<int64_t>(16, in.n_atoms / (8 * nt) + 1);
    const int64_t n_chunks = (in.n_atoms + chunk_atoms - 1) / chunk_atoms;
    result->chunks.resize(static_cast<size_t>(n_chunks));
    // System of the first atom of every chunk.
    std::vector<int64_t> chunk_system(static_cast<size_t>(n_chunks));
    {
        int64_t s = 0;
        for (int64_t k = 0; k < n_chunks; ++k) {
            const int64_t first = k * chunk_atoms;
            while (in.ptr[s + 1] <= first) ++s;
            chunk_system[k] = s;
        }
    }
    parallel_for(n_chunks, opt.num_threads, [&](int64_t k) {
        Chunk<T>& out = result->chunks[k];
        Emitter<T> em{out, atoms, opt};
        const int64_t first = k * chunk_atoms;
        const int64_t last = std::min(in.n_atoms, first + chunk_atoms);
        int64_t s = chunk_system[k];
        for (int64_t i = first; i < last; ++i) {
            while (in.ptr[s + 1] <= i) ++s;
            const System& sys = systems[s];
            if (sys.use_cells) {
                pairs_by_cells<T>(sys, i, atoms, opt.cutoff, em);
            } else {
                pairs_by_images<T>(sys, i, atoms, opt.cutoff, em);
            }
        }
    });
    return result;
}

}  // namespace

std::unique_ptr<Result> compute(const Input& in, const Options& opt) {
    if (!(opt.cutoff > 0.0) || !std::isfinite(opt.cutoff)) {
        std::ostringstream m;
        m << "cutoff must be a positive finite number, got " << opt.cutoff;
        fail(m.str());
    }
    if (in.n_atoms < 0 || in.n_systems < 0) fail("negative n_atoms or n_systems");
    if (in.n_atoms > std::numeric_limits<int32_t>::max()) {
        fail("more than 2^31 - 1 atoms: pair indices are int32");
    }
    if (in.n_systems > 0 && (in.ptr[0] != 0 || in.ptr[in.n_systems] != in.n_atoms)) {
        fail("ptr must start at 0 and end at n_atoms");
    }
    for (int64_t s = 0; s < in.n_systems; ++s) {
        if (in.ptr[s + 1] < in.ptr[s]) fail("ptr must be non-decreasing");
    }
    if (in.n_systems == 0 && in.n_atoms > 0) fail("atoms given but no system");
    switch (in.dtype) {
        case DType::Float32:
            return compute_typed<float>(in, opt);
        case DType::Float64:
            return compute_typed<double>(in, opt);
    }
    fail("unknown dtype code");
}

}  // namespace nl
}  // namespace dao
