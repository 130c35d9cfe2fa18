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
#include "parallel.hpp"

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
    Vec3 a{}, b{}, c{};  // cell rows
    bool periodic[3] = {false, false, false};
    double height[3] = {0, 0, 0};  // distance between lattice planes
    bool use_cells = false;
    // Rows of the reduced basis in terms of the given one: reduced = U . L.
    // Shifts found in the reduced basis map back as S = S' . U.
    int32_t U[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
    bool reduced = false;
    // Cell list (only when use_cells).
    int64_t nbin[3] = {1, 1, 1};
    int64_t reach[3] = {0, 0, 0};  // neighbour bins to visit on each side
    double fmin[3] = {0, 0, 0};    // fractional origin of the bin grid
    double fwidth[3] = {1, 1, 1};  // fractional width of one bin
    std::vector<int64_t> bin_start;  // [nbins + 1]
    std::vector<int32_t> bin_atoms;  // global atom indices sorted by bin
    std::vector<double> bx, by, bz;  // wrapped positions in bin order
    int64_t n_bins() const { return nbin[0] * nbin[1] * nbin[2]; }
};

struct AtomData {
    std::vector<Vec3> frac;    // wrapped fractional coordinates [N]
    std::vector<Vec3> xw;      // wrapped cartesian positions [N]
    std::vector<int32_t> off;  // [N, 3] floor of the original fractional coords
};

template <typename T>
struct Chunk {
    std::vector<int32_t> i, j;
    std::vector<int16_t> s;
    std::vector<T> d, v;
    void reserve(size_t n, const Options& opt) {
        i.reserve(n);
        j.reserve(n);
        s.reserve(3 * n);
        if (opt.want_distances) d.reserve(n);
        if (opt.want_vectors) v.reserve(3 * n);
    }
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
                 int num_threads) const override;
};

template <typename T>
void ResultImpl<T>::copy_to(int32_t* i, int32_t* j, int16_t* shifts, void* distances,
                            void* vectors, int num_threads) const {
    if ((distances && !want_d) || (vectors && !want_v)) {
        throw std::invalid_argument("copy_to: distances/vectors were not computed");
    }
    std::vector<int64_t> offset(chunks.size() + 1, 0);
    for (size_t k = 0; k < chunks.size(); ++k) {
        offset[k + 1] = offset[k] + static_cast<int64_t>(chunks[k].i.size());
    }
    T* dist = static_cast<T*>(distances);
    T* vec = static_cast<T*>(vectors);
    parallel_for(static_cast<int64_t>(chunks.size()), num_threads, [&](int64_t k) {
        const auto& c = chunks[k];
        const size_t n = c.i.size();
        if (n == 0) return;
        const int64_t o = offset[k];
        std::memcpy(i + o, c.i.data(), n * sizeof(int32_t));
        std::memcpy(j + o, c.j.data(), n * sizeof(int32_t));
        std::memcpy(shifts + 3 * o, c.s.data(), 3 * n * sizeof(int16_t));
        if (dist) std::memcpy(dist + o, c.d.data(), n * sizeof(T));
        if (vec) std::memcpy(vec + 3 * o, c.v.data(), 3 * n * sizeof(T));
    });
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// Pairwise size reduction of the basis (each vector shortened by integer
// multiples of the others until none changes): removes shear, so plane spacings
// come close to the vector lengths. U tracks the unimodular change of basis.
void reduce_basis(System& sys) {
    Vec3 v[3] = {sys.a, sys.b, sys.c};
    int64_t u[3][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}};
    for (int iter = 0; iter < 100; ++iter) {
        bool changed = false;
        for (int i = 0; i < 3; ++i) {
            for (int j = 0; j < 3; ++j) {
                if (i == j) continue;
                const double mu = std::nearbyint(dot(v[i], v[j]) / dot(v[j], v[j]));
                if (mu == 0.0 || std::abs(mu) > 1e6) continue;
                const Vec3 w = v[i] - mu * v[j];
                if (!(dot(w, w) < dot(v[i], v[i]) * (1.0 - 1e-12))) continue;
                v[i] = w;
                for (int k = 0; k < 3; ++k) u[i][k] -= static_cast<int64_t>(mu) * u[j][k];
                changed = true;
            }
        }
        if (!changed) break;
    }
    for (int i = 0; i < 3; ++i) {
        for (int k = 0; k < 3; ++k) {
            if (std::abs(u[i][k]) > kMaxShift) return;  // keep the given basis
        }
    }
    sys.a = v[0];
    sys.b = v[1];
    sys.c = v[2];
    for (int i = 0; i < 3; ++i) {
        for (int k = 0; k < 3; ++k) sys.U[3 * i + k] = static_cast<int32_t>(u[i][k]);
    }
    sys.reduced = !(u[0][0] == 1 && u[1][1] == 1 && u[2][2] == 1 && u[0][1] == 0 &&
                    u[0][2] == 0 && u[1][0] == 0 && u[1][2] == 0 && u[2][0] == 0 && u[2][1] == 0);
}

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
    // A sheared cell and its reduced basis hold the same lattice, so the pairs
    // are the same; the reduced one is far cheaper (fewer images, taller bins).
    // Only fully periodic cells: an open axis must not mix with periodic ones.
    if (sys.periodic[0] && sys.periodic[1] && sys.periodic[2]) reduce_basis(sys);
    const Vec3 rbxc = cross(sys.b, sys.c), rcxa = cross(sys.c, sys.a), raxb = cross(sys.a, sys.b);
    const double rdet = dot(sys.a, rbxc);
    sys.height[0] = std::abs(rdet) / norm(rbxc);
    sys.height[1] = std::abs(rdet) / norm(rcxa);
    sys.height[2] = std::abs(rdet) / norm(raxb);

    // Inverse cell (columns = reciprocal vectors / det): f = x . L^-1.
    const Vec3 r0 = (1.0 / rdet) * rbxc, r1 = (1.0 / rdet) * rcxa, r2 = (1.0 / rdet) * raxb;
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
                const Vec3& fr = atoms.frac[i];
                const double f = k == 0 ? fr.x : (k == 1 ? fr.y : fr.z);
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
    // Too few bins to gain anything: the image list of the whole cell is faster.
    if (total < 27.0) return;
    sys.use_cells = true;
    for (int k = 0; k < 3; ++k) {
        sys.nbin[k] = nbin[k];
        sys.fmin[k] = fmin[k];
        sys.fwidth[k] = fspan[k] / double(nbin[k]);
        const double bin_height = sys.fwidth[k] * sys.height[k];
        const double reach = std::ceil(cutoff / bin_height * (1.0 + kPad));
        // Open axes have no images: no bin farther than the grid is ever
        // needed (and a flat layer of atoms would otherwise give a huge reach).
        sys.reach[k] = sys.periodic[k] ? static_cast<int64_t>(reach)
                                       : std::min<int64_t>(nbin[k] - 1, static_cast<int64_t>(
                                                                            std::min(reach, 1e9)));
    }
    const int64_t nb = sys.n_bins();
    std::vector<int64_t> atom_bin(n_local);
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
        atom_bin[li] = bin;
        ++count[bin + 1];
    }
    for (int64_t b = 0; b < nb; ++b) count[b + 1] += count[b];
    sys.bin_start = count;
    sys.bin_atoms.resize(n_local);
    sys.bx.resize(n_local);
    sys.by.resize(n_local);
    sys.bz.resize(n_local);
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (int64_t li = 0; li < n_local; ++li) {
        const int64_t p = fill[atom_bin[li]]++;
        const Vec3& x = atoms.xw[sys.begin + li];
        sys.bin_atoms[p] = static_cast<int32_t>(sys.begin + li);
        sys.bx[p] = x.x;
        sys.by[p] = x.y;
        sys.bz[p] = x.z;
    }
}

// Candidate neighbours of a group of centre atoms: image positions with the
// atom index and the (wrapped-frame) image shift, structure of arrays so the
// distance loop vectorises.
struct Candidates {
    std::vector<double> x, y, z, d2;
    std::vector<int32_t> j;
    std::vector<int32_t> s;  // [M, 3]
    void clear() {
        x.clear();
        y.clear();
        z.clear();
        j.clear();
        s.clear();
    }
    void push(double px, double py, double pz, int32_t atom, int32_t s0, int32_t s1, int32_t s2) {
        x.push_back(px);
        y.push_back(py);
        z.push_back(pz);
        j.push_back(atom);
        s.push_back(s0);
        s.push_back(s1);
        s.push_back(s2);
    }
    size_t size() const { return x.size(); }
};

// Half-list search, full-list output: each unordered pair is tested once and
// written in both directions, (i, j, S) and (j, i, -S).
template <typename T>
struct Emitter {
    Chunk<T>& out;
    const AtomData& atoms;
    const Options& opt;
    const int32_t* U = nullptr;  // basis change of the current system (see System::U)

    inline void push(int32_t i, int32_t j, int32_t s0, int32_t s1, int32_t s2, T d, T vx, T vy,
                     T vz) {
        out.i.push_back(i);
        out.j.push_back(j);
        out.s.push_back(static_cast<int16_t>(s0));
        out.s.push_back(static_cast<int16_t>(s1));
        out.s.push_back(static_cast<int16_t>(s2));
        if (opt.want_distances) out.d.push_back(d);
        if (opt.want_vectors) {
            out.v.push_back(vx);
            out.v.push_back(vy);
            out.v.push_back(vz);
        }
    }

    // (i, j) with wrapped-frame shift S; reported shifts refer to the
    // positions as given: S - off_j + off_i.
    inline void pair(int32_t i, int32_t j, const int32_t* S, double d2, double dx, double dy,
                     double dz) {
        const int64_t r0 = S[0] - atoms.off[3 * j] + atoms.off[3 * i];
        const int64_t r1 = S[1] - atoms.off[3 * j + 1] + atoms.off[3 * i + 1];
        const int64_t r2 = S[2] - atoms.off[3 * j + 2] + atoms.off[3 * i + 2];
        // Back to the given basis: S = S' . U.
        const int64_t s0 = r0 * U[0] + r1 * U[3] + r2 * U[6];
        const int64_t s1 = r0 * U[1] + r1 * U[4] + r2 * U[7];
        const int64_t s2 = r0 * U[2] + r1 * U[5] + r2 * U[8];
        if (std::abs(s0) > kMaxShift || std::abs(s1) > kMaxShift || std::abs(s2) > kMaxShift) {
            fail("an image shift does not fit in int16; wrap positions into the cell first");
        }
        const T d = static_cast<T>(std::sqrt(d2));
        push(i, j, int32_t(s0), int32_t(s1), int32_t(s2), d, T(dx), T(dy), T(dz));
        push(j, i, int32_t(-s0), int32_t(-s1), int32_t(-s2), d, T(-dx), T(-dy), T(-dz));
    }

    inline void self_pair(int32_t i) { push(i, i, 0, 0, 0, T(0), T(0), T(0), T(0)); }
};

inline bool lex_positive(const int32_t* S) {
    return S[0] > 0 || (S[0] == 0 && (S[1] > 0 || (S[1] == 0 && S[2] > 0)));
}

// Test centre atom i (wrapped position xi) against candidates [k0, M).
// Candidates of atom i itself are kept only for lexicographically positive
// shifts (the negative ones are the reverse pairs); S = 0 is the self pair.
template <typename T>
inline void scan(int32_t i, const Vec3& xi, Candidates& c, size_t k0, double rc2,
                 Emitter<T>& em) {
    const size_t m = c.size();
    const double* X = c.x.data();
    const double* Y = c.y.data();
    const double* Z = c.z.data();
    double* D2 = c.d2.data();
    for (size_t k = k0; k < m; ++k) {
        const double dx = X[k] - xi.x, dy = Y[k] - xi.y, dz = Z[k] - xi.z;
        D2[k] = dx * dx + dy * dy + dz * dz;
    }
    for (size_t k = k0; k < m; ++k) {
        if (!(D2[k] < rc2)) continue;
        const int32_t j = c.j[k];
        const int32_t* S = c.s.data() + 3 * k;
        if (j == i) {
            if (S[0] == 0 && S[1] == 0 && S[2] == 0) {
                if (em.opt.self_interaction) em.self_pair(i);
                continue;
            }
            if (!lex_positive(S)) continue;
        }
        em.pair(i, j, S, D2[k], X[k] - xi.x, Y[k] - xi.y, Z[k] - xi.z);
    }
}

// Small cells: every image of every atom that can lie within the cutoff of
// the cell (fractional coordinates within cutoff/height of [0, 1) along each
// periodic axis), listed by atom; atom i scans the images of atoms j >= i.
template <typename T>
void search_images(const System& sys, const AtomData& atoms, double cutoff, Candidates& c,
                   std::vector<size_t>& start, Emitter<T>& em) {
    const int64_t n = sys.end - sys.begin;
    if (n == 0) return;
    double margin[3];
    for (int k = 0; k < 3; ++k) {
        margin[k] = sys.periodic[k] ? cutoff / sys.height[k] * (1.0 + kPad) + kPad : 0.0;
    }
    c.clear();
    start.assign(static_cast<size_t>(n + 1), 0);
    for (int64_t lj = 0; lj < n; ++lj) {
        const int64_t j = sys.begin + lj;
        start[lj] = c.size();
        const Vec3 f = atoms.frac[j];
        const double fk[3] = {f.x, f.y, f.z};
        int64_t lo[3], hi[3];
        for (int k = 0; k < 3; ++k) {
            if (sys.periodic[k]) {
                lo[k] = static_cast<int64_t>(std::ceil(-margin[k] - fk[k]));
                hi[k] = static_cast<int64_t>(std::floor(1.0 + margin[k] - fk[k]));
            } else {
                lo[k] = hi[k] = 0;
            }
        }
        const Vec3 xj = atoms.xw[j];
        for (int64_t sa = lo[0]; sa <= hi[0]; ++sa) {
            const Vec3 pa = xj + double(sa) * sys.a;
            for (int64_t sb = lo[1]; sb <= hi[1]; ++sb) {
                const Vec3 pb = pa + double(sb) * sys.b;
                for (int64_t sc = lo[2]; sc <= hi[2]; ++sc) {
                    const Vec3 p = pb + double(sc) * sys.c;
                    c.push(p.x, p.y, p.z, int32_t(j), int32_t(sa), int32_t(sb), int32_t(sc));
                }
            }
        }
    }
    start[n] = c.size();
    c.d2.resize(c.size());
    const double rc2 = cutoff * cutoff;
    for (int64_t li = 0; li < n; ++li) {
        const int32_t i = int32_t(sys.begin + li);
        scan<T>(i, atoms.xw[i], c, start[li], rc2, em);
    }
}

inline int64_t floor_div(int64_t a, int64_t b) {
    int64_t q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
    return q;
}

// Large cells, one bin A: its own atoms pairwise (q > p, shift 0), then every
// neighbour bin at a lexicographically positive offset (the negative offsets
// hold the reverse pairs). Bins are contiguous in the sorted arrays, so the
// inner loop runs over plain arrays without gathering.
template <typename T>
void search_bin(const System& sys, int64_t bin, double cutoff, Emitter<T>& em) {
    const int64_t a_begin = sys.bin_start[bin], a_end = sys.bin_start[bin + 1];
    if (a_begin == a_end) return;
    const double rc2 = cutoff * cutoff;
    const double* X = sys.bx.data();
    const double* Y = sys.by.data();
    const double* Z = sys.bz.data();
    const int32_t zero[3] = {0, 0, 0};
    for (int64_t p = a_begin; p < a_end; ++p) {
        const int32_t i = sys.bin_atoms[p];
        if (em.opt.self_interaction) em.self_pair(i);
        for (int64_t q = p + 1; q < a_end; ++q) {
            const double dx = X[q] - X[p], dy = Y[q] - Y[p], dz = Z[q] - Z[p];
            const double d2 = dx * dx + dy * dy + dz * dz;
            if (d2 < rc2) em.pair(i, sys.bin_atoms[q], zero, d2, dx, dy, dz);
        }
    }
    const int64_t n1 = sys.nbin[1], n2 = sys.nbin[2];
    const int64_t bidx[3] = {bin / (n1 * n2), (bin / n2) % n1, bin % n2};
    for (int64_t o0 = 0; o0 <= sys.reach[0]; ++o0) {
        int64_t t0 = bidx[0] + o0, s0 = 0;
        if (sys.periodic[0]) {
            s0 = floor_div(t0, sys.nbin[0]);
            t0 -= s0 * sys.nbin[0];
        } else if (t0 >= sys.nbin[0]) {
            continue;
        }
        for (int64_t o1 = (o0 == 0 ? 0 : -sys.reach[1]); o1 <= sys.reach[1]; ++o1) {
            int64_t t1 = bidx[1] + o1, s1 = 0;
            if (sys.periodic[1]) {
                s1 = floor_div(t1, n1);
                t1 -= s1 * n1;
            } else if (t1 < 0 || t1 >= n1) {
                continue;
            }
            const int64_t o2_lo = (o0 == 0 && o1 == 0) ? 1 : -sys.reach[2];
            for (int64_t o2 = o2_lo; o2 <= sys.reach[2]; ++o2) {
                int64_t t2 = bidx[2] + o2, s2 = 0;
                if (sys.periodic[2]) {
                    s2 = floor_div(t2, n2);
                    t2 -= s2 * n2;
                } else if (t2 < 0 || t2 >= n2) {
                    continue;
                }
                const int64_t nb = (t0 * n1 + t1) * n2 + t2;
                const int64_t b_begin = sys.bin_start[nb], b_end = sys.bin_start[nb + 1];
                if (b_begin == b_end) continue;
                const Vec3 shift = double(s0) * sys.a + double(s1) * sys.b + double(s2) * sys.c;
                const int32_t S[3] = {int32_t(s0), int32_t(s1), int32_t(s2)};
                for (int64_t p = a_begin; p < a_end; ++p) {
                    // Candidate minus centre = (X[q] + shift) - X[p].
                    const double ox = shift.x - X[p], oy = shift.y - Y[p], oz = shift.z - Z[p];
                    const int32_t i = sys.bin_atoms[p];
                    for (int64_t q = b_begin; q < b_end; ++q) {
                        const double dx = X[q] + ox, dy = Y[q] + oy, dz = Z[q] + oz;
                        const double d2 = dx * dx + dy * dy + dz * dz;
                        if (d2 < rc2) em.pair(i, sys.bin_atoms[q], S, d2, dx, dy, dz);
                    }
                }
            }
        }
    }
}

// A unit of parallel work: a run of whole small systems, or a run of bins of
// one cell-list system.
struct Work {
    int64_t sys_begin, sys_end;  // systems [sys_begin, sys_end)
    int64_t bin_begin, bin_end;  // bins of system sys_begin, when it uses cells
};

// Pairs expected in a work item from the mean density (a little over, so the
// buffers rarely grow: growing copies and faults in fresh pages).
double expected_pairs(const std::vector<System>& systems, const Work& w, double cutoff) {
    const double sphere = 4.18879020478639 * cutoff * cutoff * cutoff;
    double total = 0.0;
    for (int64_t s = w.sys_begin; s < w.sys_end; ++s) {
        const System& sys = systems[s];
        const double n = double(sys.end - sys.begin);
        const double vol = sys.height[0] * norm(cross(sys.b, sys.c));
        double centres = n;
        if (sys.use_cells) centres = double(sys.bin_start[w.bin_end] - sys.bin_start[w.bin_begin]);
        total += centres * n * sphere / vol;
    }
    return std::min(1.1 * total + 64.0, 4.0e6);
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

    // Work items of roughly `grain` atoms, several per thread for balance.
    const int64_t nt = std::max(1, opt.num_threads);
    const int64_t grain = std::max<int64_t>(64, in.n_atoms / (8 * nt) + 1);
    std::vector<Work> work;
    for (int64_t s = 0; s < in.n_systems;) {
        const System& sys = systems[s];
        if (sys.use_cells) {
            const int64_t nb = sys.n_bins();
            int64_t b0 = 0;
            while (b0 < nb) {
                int64_t b1 = b0, atoms_in = 0;
                while (b1 < nb && atoms_in < grain) {
                    atoms_in += sys.bin_start[b1 + 1] - sys.bin_start[b1];
                    ++b1;
                }
                work.push_back({s, s + 1, b0, b1});
                b0 = b1;
            }
            ++s;
        } else {
            int64_t s1 = s, atoms_in = 0;
            while (s1 < in.n_systems && !systems[s1].use_cells && atoms_in < grain) {
                atoms_in += systems[s1].end - systems[s1].begin;
                ++s1;
            }
            work.push_back({s, s1, 0, 0});
            s = s1;
        }
    }
    result->chunks.resize(work.size());
    parallel_for(static_cast<int64_t>(work.size()), opt.num_threads, [&](int64_t k) {
        thread_local Candidates cand;
        thread_local std::vector<size_t> start;
        Chunk<T>& out = result->chunks[k];
        const Work& w = work[k];
        out.reserve(static_cast<size_t>(expected_pairs(systems, w, opt.cutoff)), opt);
        Emitter<T> em{out, atoms, opt};
        const System& first = systems[w.sys_begin];
        if (first.use_cells) {
            for (int64_t b = w.bin_begin; b < w.bin_end; ++b) {
                em.U = first.U;
                search_bin<T>(first, b, opt.cutoff, em);
            }
        } else {
            for (int64_t s = w.sys_begin; s < w.sys_end; ++s) {
                em.U = systems[s].U;
                search_images<T>(systems[s], atoms, opt.cutoff, cand, start, em);
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
