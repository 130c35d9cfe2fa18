// Fused Crysformer edge attention on the CPU (torch-free).
//
// Contract (the Python op dao::edge_attention_core, src/dao/ops/edge_attention.py):
// N atoms of B crystals stored crystal after crystal, ptr[B + 1] the first atom of
// each crystal. For every ordered pair (j -> i) of atoms of one crystal (self pairs
// included) and head h:
//
//   z_ij = LayerNorm_no_affine([sin 2πkΔ_a, cos 2πkΔ_a, gram_c]),  Δ = (f_j − f_i) mod 1
//          (sin block a-major: index a·K + k; cos block at 3K + a·K + k; gram at 6K)
//   s_ij = q_i·k_j + u_i·z_ij           (q and u already scaled by 1/sqrt(d))
//   α_ij = softmax_j s_ij
//   o_i = Σ_j α_ij v_j,  y_i = Σ_j α_ij z_ij,  lse_i = log Σ_j exp s_ij
//
// Shapes (row-major, contiguous): q, k, v, o [N, H, d]; u, y [N, H, D] with
// D = 6K + 9; lse [N, H]; frac [N, 3]; gram [B, 9]. The backward takes the
// gradients of o and y (and o, lse of the forward) and returns those of q, k, v, u,
// frac and gram, plus y recomputed (so no caller has to keep the [N, H, D] y).
// Nothing per edge wider than a few scalars is written to memory (Kernel below):
// the gemm kernels work on per-atom rows and per-pair scalars of one crystal, the
// pairs kernels recompute features per centre atom into a small thread-local buffer.
#pragma once

#include <cstdint>

namespace dao {
namespace ea {

enum class DType : int { F32 = 0, F64 = 1 };

// Which per-crystal kernels run (same contract, same results within rounding):
// Pairs builds each pair's feature vector z_ij and works on it; Gemm never forms
// z_ij and runs the pair loop as small dense products per crystal (see the gemm
// section of edge_attention_kernels.inc).
enum class Kernel : int { Pairs = 0, Gemm = 1 };

struct Shape {
    int64_t n_atoms = 0;
    int64_t n_crystals = 0;
    int64_t heads = 0;
    int64_t d = 0;          // head width
    int64_t dim = 0;        // D = 6K + 9
    int64_t num_freqs = 0;  // K
    double eps = 1e-5;      // LayerNorm epsilon
};

struct ForwardArgs {
    const void* q;
    const void* k;
    const void* v;
    const void* u;
    const void* frac;
    const void* gram;
    const int64_t* ptr;
    void* o;
    void* y;
    void* lse;
};

struct BackwardArgs {
    const void* grad_o;
    const void* grad_y;
    const void* q;
    const void* k;
    const void* v;
    const void* u;
    const void* frac;
    const void* gram;
    const int64_t* ptr;
    const void* o;
    const void* lse;
    void* y;  // output: y recomputed (the forward's y is not kept)
    void* dq;
    void* dk;
    void* dv;
    void* du;
    void* dfrac;
    void* dgram;
};

// Throws std::invalid_argument on inconsistent sizes.
void forward(const Shape& shape, DType dtype, const ForwardArgs& args, Kernel kernel,
             int num_threads);
void backward(const Shape& shape, DType dtype, const BackwardArgs& args, Kernel kernel,
              int num_threads);

}  // namespace ea
}  // namespace dao
