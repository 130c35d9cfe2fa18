// Periodic neighbour lists for batches of crystals: the torch-free CPU core.
//
// Everything crosses this boundary as plain pointers and sizes so the compiled
// module never links libtorch. The Python layer (src/dao/ops/neighbor_list.py)
// validates and allocates; this core computes.
//
// Conventions (shared with every backend and with the reference twin):
//   * positions [n_atoms, 3] cartesian, cell [n_systems, 3, 3] row vectors
//     (x = f . L), ptr [n_systems + 1] int64 offsets of each system's atoms,
//     pbc [n_systems, 3] uint8 per-axis periodicity.
//   * Full list: every ordered pair (i, j) with |r_j - r_i + S . L| < cutoff
//     (strict) for integer image shift S; i == j only with S != 0 unless
//     self_interaction is set. Indices are global (into positions).
//   * vector = r_j - r_i + S . L, distance = |vector|; S is reported relative to
//     the positions as given (atoms outside the cell are fine).
//   * The decision |d| < cutoff is taken in double precision for every dtype.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dao {
namespace nl {

enum class DType : int { Float32 = 0, Float64 = 1 };

struct Options {
    double cutoff = 0.0;
    bool self_interaction = false;
    bool want_distances = true;
    bool want_vectors = false;
    int num_threads = 1;
    // Systems with more atoms than this use a cell list; smaller ones enumerate
    // the periodic images inside the cutoff sphere pair by pair. 0 = automatic.
    int64_t cell_list_min_atoms = 0;
};

struct Input {
    const void* positions = nullptr;  // [n_atoms, 3], dtype
    const void* cell = nullptr;       // [n_systems, 3, 3], dtype
    const int64_t* ptr = nullptr;     // [n_systems + 1]
    const uint8_t* pbc = nullptr;     // [n_systems, 3]
    int64_t n_atoms = 0;
    int64_t n_systems = 0;
    DType dtype = DType::Float64;
};

// Pairs found by compute(), held in per-chunk buffers until the caller has
// allocated outputs of the right size (size()) and asks for copy_to().
class Result {
  public:
    virtual ~Result() = default;
    virtual int64_t size() const = 0;
    // i, j: int32 [P]; shifts: int16 [P, 3]; distances: dtype [P] (may be
    // null); vectors: dtype [P, 3] (may be null). Only buffers requested in
    // Options may be non-null.
    virtual void copy_to(int32_t* i, int32_t* j, int16_t* shifts, void* distances,
                         void* vectors, int num_threads) const = 0;
};

// Throws std::invalid_argument with a message saying what was wrong.
std::unique_ptr<Result> compute(const Input& input, const Options& options);

}  // namespace nl
}  // namespace dao
