"""Triton kernels of ``dao::edge_attention_core`` (the ``backend="triton"`` path).

Same contract as the reference twin
:func:`dao.reference.edge_attention.edge_attention_core`: for every destination
atom i and head h, scores s_ij = q_i·k_j + u_i·z_ij over the atoms j of i's
crystal (self pair included), α = softmax_j(s), and the outputs
o_i = Σ_j α_ij v_j, y_i = Σ_j α_ij z_ij and lse_i = log Σ_j exp(s_ij). z_ij is the
LayerNorm (no affine) of x_ij = [sin 2πkΔ_a, cos 2πkΔ_a, gram_c] with
Δ = (f_j − f_i) mod 1; D = 6K + 9.

Design. Integer frequencies make the Fourier features separable: with the
per-atom phases S_n = sin 2πk f_n, C_n = cos 2πk f_n (one row P_n = [S_n, C_n] of
6K values per atom, computed once per call in float64),

    sin 2πkΔ = S_j C_i − C_j S_i,   cos 2πkΔ = C_j C_i + S_j S_i,

i.e. the trig part of x_ij is R_i P_j with R_i a rotation per (axis, frequency).
So every per-edge quantity is a dot product of per-atom vectors:
u_i·x_ij = (R_iᵀu_i)·P_j + u_i^gram·gram_c, Σ_c x_ij,c = (R_iᵀ1)·P_j + Σ gram_c and
Σ_c x_ij,c² = 3K + Σ gram_c² (sin² + cos² = 1), which gives the LayerNorm mean m_ij
and scale r_ij = 1/√(var_ij + eps) without any per-edge transcendental. Sums over
j of weighted z_ij become R_i Σ_j w_ij P_j minus scalar terms. The pair loop is
thus flash attention with GEMM tiles: a program owns BLOCK_I destinations of one
crystal and all heads (rows (h, i)), loops over the crystal's sources in blocks
of BLOCK_J and over the 3K trig columns in chunks of BLOCK_T (so D up to 777 costs
no registers), and never writes per-edge data to memory.

* Forward (``_edge_attention_fwd_kernel``): online softmax; o accumulates in
  registers, Σ_j w_ij P_j ([N, H, 6K], one row per destination and head) in a
  scratch buffer the program owns (read-modify-write, a barrier after each
  source block); the epilogue rotates it back into y.
* Backward, flash-attention style, α recomputed from lse:
  dα_ij = dO_i·v_j + dY_i·z_ij, ds = α(dα − Dlt_i) with Dlt_i = dO_i·o_i + dY_i·y_i;
  the edge-feature gradient dz_ij = Σ_h α dY_ih + ds u_ih goes through the
  LayerNorm backward, dx = r(dz − mean dz) − r² mean(dz·z)(x − m). Its last term
  changes only the length of the rotated vectors, so it drops out of the
  coordinate gradient and enters only dgram. Two kernels and no atomics:
  ``_edge_attention_bwd_dst_kernel`` (per destination tile: dq, du, the
  destination half of dfrac and per-tile dgram partials) and
  ``_edge_attention_bwd_src_kernel`` (per source tile, the same tiles recomputed
  by symmetry: dk, dv and the source half of dfrac).

Precision: float64 inputs compute in float64; float32 and bfloat16 in float32
(dots with ``input_precision="ieee"``, no TF32). For bfloat16 inputs o, y and the
gradients are returned in bfloat16 and lse in float32, and the backward recomputes
o and y in float32 for Dlt (their bf16 rounding would break Σ_j ds_ij = 0). The
phases come from (k·f mod 1) in float64, so even k = 127 keeps fp32 rounding on
sin and cos. du and dgram sum ds against the gram features of z, large and nearly
the same for every j; they use Σ_j ds_ij = 0 to sum only the differences from the
self pair. At the paper's sizes (MP-20-like batch, K = 128, H = 8, d = 48) the
float32 kernels then stay within half the float32 tolerance row, where PyTorch's
own float32 evaluation of the twin misses it up to 28-fold (du).

Launches are plain ``kernel[grid](...)`` calls inside the existing
``dao::edge_attention_core`` custom ops, so they also run under
``TRITON_INTERPRET=1`` (set it before triton is first imported). The kernels
compile for sm_90 (float32, float64, bfloat16 inputs); block sizes and warps are
not tuned on hardware yet.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from dao._graph import memoized

__all__ = ["edge_attention_core_backward", "edge_attention_core_forward"]

# Every dot dimension is at least 16 (the smallest tl.dot tile on NVIDIA GPUs).
_BLOCK_I = 16
_BLOCK_J = 16
_BLOCK_T = 16
_BLOCK_GRAM = 16
# Head-dim chunk of the score dots q·k and dO·v.
_BLOCK_EC = 16
_TWO_PI = tl.constexpr(2.0 * math.pi)


# ----------------------------------------------------------------- helpers


@triton.jit
def _dot(a, b):
    """a @ b in the operands' (compute) dtype, IEEE arithmetic (no TF32). ``out_dtype``
    is passed because Triton <= 3.6 requires it for float64 (its default is float32)."""
    return tl.dot(a, b, input_precision="ieee", out_dtype=a.dtype)


@triton.jit
def _dot_acc(a, b, acc):
    """acc + a @ b, as :func:`_dot`."""
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)


@triton.jit
def _row_sums(
    w_ptr,
    row,
    mrow,
    g,
    D,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_GRAM: tl.constexpr,
):
    """Per (h, i) row of a [N, H, D] field w: (w^gram·gram_c, Σ_c w_c), both [BH, BI]."""
    cdt = g.dtype
    t6 = D - 9
    total = tl.zeros([BLOCK_H, BLOCK_I], dtype=cdt)
    for c0 in range(0, t6, BLOCK_T):
        cc = c0 + tl.arange(0, BLOCK_T)
        mask = mrow[:, :, None] & (cc < t6)[None, None, :]
        w = tl.load(w_ptr + row[:, :, None] * D + cc[None, None, :], mask=mask, other=0.0)
        total += tl.sum(w.to(cdt), axis=2)
    gg = tl.arange(0, BLOCK_GRAM)
    mask = mrow[:, :, None] & (gg < 9)[None, None, :]
    wg = tl.load(w_ptr + row[:, :, None] * D + t6 + gg[None, None, :], mask=mask, other=0.0)
    wg = wg.to(cdt)
    return tl.sum(wg * g[None, None, :], axis=2), total + tl.sum(wg, axis=2)


@triton.jit
def _rotated(w_ptr, row, mrow, tt, mt, si, ci, T3, D):
    """R_iᵀ w on trig columns tt of a [N, H, D] field: the (sin, cos) halves, [BH, BI, BT] each."""
    cdt = si.dtype
    off = row[:, :, None] * D + tt[None, None, :]
    mask = mrow[:, :, None] & mt[None, None, :]
    ws = tl.load(w_ptr + off, mask=mask, other=0.0).to(cdt)
    wc = tl.load(w_ptr + off + T3, mask=mask, other=0.0).to(cdt)
    return ws * ci[None, :, :] + wc * si[None, :, :], wc * ci[None, :, :] - ws * si[None, :, :]


@triton.jit
def _accumulate(
    acc_ptr,
    mask,
    scale,
    w,
    sj,
    cj,
    T3,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Both halves of acc [BH, BI, BT] (sin at acc_ptr, cos T3 further) become
    scale·acc + w [BH·BI, BJ] @ (sj, cj) [BJ, BT] (read-modify-write)."""
    new = tl.reshape(_dot(w, sj), (BLOCK_H, BLOCK_I, BLOCK_T))
    tl.store(acc_ptr, tl.load(acc_ptr, mask=mask, other=0.0) * scale + new, mask=mask)
    new = tl.reshape(_dot(w, cj), (BLOCK_H, BLOCK_I, BLOCK_T))
    tl.store(acc_ptr + T3, tl.load(acc_ptr + T3, mask=mask, other=0.0) * scale + new, mask=mask)


@triton.jit
def _phases(phase_ptr, atoms, matoms, tt, mt, T3, TRANSPOSE: tl.constexpr):
    """(S, C) of atoms × trig columns tt: [n, BT], or [BT, n] with TRANSPOSE."""
    if TRANSPOSE:
        off = atoms[None, :] * (2 * T3) + tt[:, None]
        mask = mt[:, None] & matoms[None, :]
    else:
        off = atoms[:, None] * (2 * T3) + tt[None, :]
        mask = matoms[:, None] & mt[None, :]
    return (
        tl.load(phase_ptr + off, mask=mask, other=0.0),
        tl.load(phase_ptr + off + T3, mask=mask, other=0.0),
    )


@triton.jit
def _pair_dots(
    u_ptr,
    gy_ptr,
    phase_ptr,
    row,
    mrow,
    ii,
    mi,
    jj,
    mj,
    T3,
    D,
    WITH_DY: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Trig parts of u_i·x_ij [BH, BI, BJ], Σ_c x_ij,c [BI, BJ] and (WITH_DY) dY_i·x_ij."""
    cdt = phase_ptr.dtype.element_ty
    a = tl.zeros([BLOCK_R, BLOCK_J], dtype=cdt)
    b = tl.zeros([BLOCK_I, BLOCK_J], dtype=cdt)
    c = tl.zeros([BLOCK_R, BLOCK_J], dtype=cdt)
    for t0 in range(0, T3, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        mt = tt < T3
        sj, cj = _phases(phase_ptr, jj, mj, tt, mt, T3, True)
        si, ci = _phases(phase_ptr, ii, mi, tt, mt, T3, False)
        b = _dot_acc(ci + si, sj, b)
        b = _dot_acc(ci - si, cj, b)
        rs, rc = _rotated(u_ptr, row, mrow, tt, mt, si, ci, T3, D)
        a = _dot_acc(tl.reshape(rs, (BLOCK_R, BLOCK_T)), sj, a)
        a = _dot_acc(tl.reshape(rc, (BLOCK_R, BLOCK_T)), cj, a)
        if WITH_DY:
            rs, rc = _rotated(gy_ptr, row, mrow, tt, mt, si, ci, T3, D)
            c = _dot_acc(tl.reshape(rs, (BLOCK_R, BLOCK_T)), sj, c)
            c = _dot_acc(tl.reshape(rc, (BLOCK_R, BLOCK_T)), cj, c)
    a = tl.reshape(a, (BLOCK_H, BLOCK_I, BLOCK_J))
    return a, b, tl.reshape(c, (BLOCK_H, BLOCK_I, BLOCK_J))


@triton.jit
def _norm_stats(b, g_sum, quad, D, eps):
    """LayerNorm mean m and 1/√(var + eps) of every edge from Σ_c x (trig part b)."""
    m = (b + g_sum) / D
    return m, 1.0 / tl.sqrt(quad - m * m + eps)


@triton.jit
def _heads_tile(ptr, atoms, matoms, hh, mh, ee, me, H, HEAD_DIM, TRANSPOSE: tl.constexpr):
    """A [N, H, d] field on atoms: [BH, n, BE], or [BH, BE, n] with TRANSPOSE."""
    if TRANSPOSE:
        off = (atoms[None, None, :] * H + hh[:, None, None]) * HEAD_DIM + ee[None, :, None]
        mask = mh[:, None, None] & me[None, :, None] & matoms[None, None, :]
    else:
        off = (atoms[None, :, None] * H + hh[:, None, None]) * HEAD_DIM + ee[None, None, :]
        mask = mh[:, None, None] & matoms[None, :, None] & me[None, None, :]
    return tl.load(ptr + off, mask=mask, other=0.0)


@triton.jit
def _head_dots(out, a_ptr, b_ptr, ii, mi, jj, mj, hh, mh, H, HEAD_DIM, BLOCK_EC: tl.constexpr):
    """out [BH, BI, BJ] + Σ_e a[i, h, e]·b[j, h, e] of two [N, H, d] fields, BLOCK_EC of
    d at a time (short dot operands keep registers free)."""
    for e0 in range(0, HEAD_DIM, BLOCK_EC):
        ee = e0 + tl.arange(0, BLOCK_EC)
        me = ee < HEAD_DIM
        a = _heads_tile(a_ptr, ii, mi, hh, mh, ee, me, H, HEAD_DIM, False).to(out.dtype)
        b = _heads_tile(b_ptr, jj, mj, hh, mh, ee, me, H, HEAD_DIM, True).to(out.dtype)
        out = _dot_acc(a, b, out)
    return out


@triton.jit
def _crystal_gram(gram_ptr, crystal, num_freqs, D, BLOCK_GRAM: tl.constexpr):
    """The crystal's gram [BLOCK_GRAM] (zero padded), Σ gram and (3K + Σ gram²) / D."""
    gg = tl.arange(0, BLOCK_GRAM)
    g = tl.load(gram_ptr + crystal * 9 + gg, mask=gg < 9, other=0.0)
    return g, tl.sum(g, axis=0), (3 * num_freqs + tl.sum(g * g, axis=0)) / D


@triton.jit
def _edge_terms(
    q_ptr,
    go_ptr,
    lse,
    dlt,
    ug,
    usum,
    dg,
    dsum,
    k_ptr,
    v_ptr,
    u_ptr,
    gy_ptr,
    phase_ptr,
    row,
    mrow,
    ii,
    mi,
    jj,
    mj,
    hh,
    mh,
    g_sum,
    quad,
    H,
    HEAD_DIM,
    T3,
    D,
    eps,
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_EC: tl.constexpr,
):
    """Backward quantities of a (destination, source) tile, zero outside the crystal.

    Returns α and ds [BH, BI, BJ]; r, m and the LayerNorm-backward scalars
    κ = r·mean(dz) − r²·mean(dz·z)·m and λ = r²·mean(dz·z), all [BI, BJ].
    """
    a, b, c = _pair_dots(
        u_ptr, gy_ptr, phase_ptr, row, mrow, ii, mi, jj, mj, T3, D, True,
        BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_T, BLOCK_R,
    )  # fmt: skip
    m, r = _norm_stats(b, g_sum, quad, D, eps)
    uz = r[None, :, :] * (a + ug[:, :, None] - m[None, :, :] * usum[:, :, None])
    dyz = r[None, :, :] * (c + dg[:, :, None] - m[None, :, :] * dsum[:, :, None])
    s = _head_dots(uz, q_ptr, k_ptr, ii, mi, jj, mj, hh, mh, H, HEAD_DIM, BLOCK_EC)
    valid = mrow[:, :, None] & mj[None, None, :]
    alpha = tl.where(valid, tl.exp(s - lse[:, :, None]), 0.0)
    dalpha = _head_dots(dyz, go_ptr, v_ptr, ii, mi, jj, mj, hh, mh, H, HEAD_DIM, BLOCK_EC)
    ds = alpha * (dalpha - dlt[:, :, None])
    mu1 = tl.sum(alpha * dsum[:, :, None] + ds * usum[:, :, None], axis=0) / D
    mu2 = tl.sum(alpha * dyz + ds * uz, axis=0) / D
    lam = r * r * mu2
    return alpha, ds, r, m, r * mu1 - lam * m, lam


# ----------------------------------------------------------------- kernels


@triton.jit
def _edge_attention_fwd_kernel(
    q_ptr,  # [N, H, d]
    k_ptr,  # [N, H, d]
    v_ptr,  # [N, H, d]
    u_ptr,  # [N, H, D]
    phase_ptr,  # [N, 6K] compute dtype: sin 2πk f (a-major), then cos
    gram_ptr,  # [B, 9] compute dtype
    ptr_ptr,  # [B + 1] int64 first atom of each crystal
    tile_sys_ptr,  # [T] int64 crystal of each destination tile
    tile_start_ptr,  # [T] int64 first destination of each tile
    acc_ptr,  # [N, H, 6K] compute dtype, zeros: Σ_j w_ij P_j scratch
    o_ptr,  # [N, H, d] out
    y_ptr,  # [N, H, D] out
    lse_ptr,  # [N, H] out, compute dtype
    H,
    HEAD_DIM,
    num_freqs,
    eps: tl.constexpr,  # constexpr: a float argument would be float32 in a float64 kernel
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_GRAM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_EC: tl.constexpr,
):
    cdt = phase_ptr.dtype.element_ty
    t3 = 3 * num_freqs
    t6 = 2 * t3
    D = t6 + 9
    tile = tl.program_id(0)
    crystal = tl.load(tile_sys_ptr + tile)
    i0 = tl.load(tile_start_ptr + tile)
    begin = tl.load(ptr_ptr + crystal)
    end = tl.load(ptr_ptr + crystal + 1)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # this program's head group
    ii = i0 + tl.arange(0, BLOCK_I)
    ee = tl.arange(0, BLOCK_E)
    mh, mi, me = hh < H, ii < end, ee < HEAD_DIM
    row = ii[None, :] * H + hh[:, None]  # [BH, BI] index of (i, h) in [N, H]
    mrow = mh[:, None] & mi[None, :]
    g, g_sum, quad = _crystal_gram(gram_ptr, crystal, num_freqs, D, BLOCK_GRAM)
    ug, usum = _row_sums(u_ptr, row, mrow, g, D, BLOCK_H, BLOCK_I, BLOCK_T, BLOCK_GRAM)

    run_max = tl.full([BLOCK_H, BLOCK_I], float("-inf"), dtype=cdt)
    run_sum = tl.zeros([BLOCK_H, BLOCK_I], dtype=cdt)
    w_sum = tl.zeros([BLOCK_H, BLOCK_I], dtype=cdt)
    wm_sum = tl.zeros([BLOCK_H, BLOCK_I], dtype=cdt)
    o_acc = tl.zeros([BLOCK_H, BLOCK_I, BLOCK_E], dtype=cdt)
    for j0 in range(begin, end, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        mj = jj < end
        a, b, _ = _pair_dots(
            u_ptr, u_ptr, phase_ptr, row, mrow, ii, mi, jj, mj, t3, D, False,
            BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_T, BLOCK_R,
        )  # fmt: skip
        m, r = _norm_stats(b, g_sum, quad, D, eps)
        s = r[None, :, :] * (a + ug[:, :, None] - m[None, :, :] * usum[:, :, None])
        s = _head_dots(s, q_ptr, k_ptr, ii, mi, jj, mj, hh, mh, H, HEAD_DIM, BLOCK_EC)
        s = tl.where(mj[None, None, :], s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=2))
        scale = tl.exp(run_max - new_max)
        p = tl.exp(s - new_max[:, :, None])
        run_sum = run_sum * scale + tl.sum(p, axis=2)
        v3 = _heads_tile(v_ptr, jj, mj, hh, mh, ee, me, H, HEAD_DIM, False).to(cdt)
        o_acc = o_acc * scale[:, :, None] + _dot(p, v3)
        w = p * r[None, :, :]
        w_sum = w_sum * scale + tl.sum(w, axis=2)
        wm_sum = wm_sum * scale + tl.sum(w * m[None, :, :], axis=2)
        w2 = tl.reshape(w, (BLOCK_R, BLOCK_J))
        for t0 in range(0, t3, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            mt = tt < t3
            sj, cj = _phases(phase_ptr, jj, mj, tt, mt, t3, False)
            off = acc_ptr + row[:, :, None] * t6 + tt[None, None, :]
            mask = mrow[:, :, None] & mt[None, None, :]
            _accumulate(off, mask, scale[:, :, None], w2, sj, cj, t3, BLOCK_H, BLOCK_I, BLOCK_T)
        # The next block (or the epilogue) reads these rows back, maybe from other threads.
        tl.debug_barrier()
        run_max = new_max

    inv = 1.0 / run_sum
    off3 = (row[:, :, None] * HEAD_DIM) + ee[None, None, :]
    o = o_acc * inv[:, :, None]
    tl.store(o_ptr + off3, o.to(o_ptr.dtype.element_ty), mask=mrow[:, :, None] & me[None, None, :])
    tl.store(lse_ptr + row, (run_max + tl.log(run_sum)).to(lse_ptr.dtype.element_ty), mask=mrow)
    wm = (wm_sum * inv)[:, :, None]
    ydt = y_ptr.dtype.element_ty
    for t0 in range(0, t3, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        mt = tt < t3
        si, ci = _phases(phase_ptr, ii, mi, tt, mt, t3, False)
        mask = mrow[:, :, None] & mt[None, None, :]
        acc = acc_ptr + row[:, :, None] * t6 + tt[None, None, :]
        acc_s = tl.load(acc, mask=mask, other=0.0) * inv[:, :, None]
        acc_c = tl.load(acc + t3, mask=mask, other=0.0) * inv[:, :, None]
        out = y_ptr + row[:, :, None] * D + tt[None, None, :]
        ys = ci[None, :, :] * acc_s - si[None, :, :] * acc_c - wm
        yc = si[None, :, :] * acc_s + ci[None, :, :] * acc_c - wm
        tl.store(out, ys.to(ydt), mask=mask)
        tl.store(out + t3, yc.to(ydt), mask=mask)
    gg = tl.arange(0, BLOCK_GRAM)
    yg = (w_sum * inv)[:, :, None] * g[None, None, :] - wm
    mask = mrow[:, :, None] & (gg < 9)[None, None, :]
    tl.store(y_ptr + row[:, :, None] * D + t6 + gg[None, None, :], yg.to(ydt), mask=mask)


@triton.jit
def _edge_attention_bwd_dst_kernel(
    go_ptr,  # [N, H, d] dO
    gy_ptr,  # [N, H, D] dY
    q_ptr,
    k_ptr,
    v_ptr,
    u_ptr,
    phase_ptr,  # [N, 6K] compute dtype
    gram_ptr,  # [B, 9] compute dtype
    ptr_ptr,  # [B + 1] int64
    tile_sys_ptr,  # [T] int64 crystal of each destination tile
    tile_start_ptr,  # [T] int64 first destination of each tile
    lse_ptr,  # [N, H]
    dlt_ptr,  # [N, H] compute dtype: dO·o + dY·y
    a1_ptr,  # [N, H, 6K] scratch, zeros: Σ_j r α P_j
    a2_ptr,  # [N, H, 6K] scratch, zeros: Σ_j r ds P_j
    a3_ptr,  # [N, 6K] scratch, zeros: Σ_j κ P_j
    dq_ptr,  # [N, H, d] out
    du_ptr,  # [N, H, D] out
    dfrac_ptr,  # [N, 3] out, compute dtype: destination half of dfrac
    dgram_ptr,  # [T, 9] out, compute dtype: per-tile partial sums
    H,
    HEAD_DIM,
    num_freqs,
    eps: tl.constexpr,  # constexpr: a float argument would be float32 in a float64 kernel
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_GRAM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_EC: tl.constexpr,
):
    cdt = phase_ptr.dtype.element_ty
    t3 = 3 * num_freqs
    t6 = 2 * t3
    D = t6 + 9
    tile = tl.program_id(0)
    crystal = tl.load(tile_sys_ptr + tile)
    i0 = tl.load(tile_start_ptr + tile)
    begin = tl.load(ptr_ptr + crystal)
    end = tl.load(ptr_ptr + crystal + 1)
    hh = tl.arange(0, BLOCK_H)
    ii = i0 + tl.arange(0, BLOCK_I)
    ee = tl.arange(0, BLOCK_E)
    mh, mi, me = hh < H, ii < end, ee < HEAD_DIM
    row = ii[None, :] * H + hh[:, None]
    mrow = mh[:, None] & mi[None, :]
    g, g_sum, quad = _crystal_gram(gram_ptr, crystal, num_freqs, D, BLOCK_GRAM)
    ug, usum = _row_sums(u_ptr, row, mrow, g, D, BLOCK_H, BLOCK_I, BLOCK_T, BLOCK_GRAM)
    dg, dsum = _row_sums(gy_ptr, row, mrow, g, D, BLOCK_H, BLOCK_I, BLOCK_T, BLOCK_GRAM)
    lse = tl.load(lse_ptr + row, mask=mrow, other=0.0).to(cdt)
    dlt = tl.load(dlt_ptr + row, mask=mrow, other=0.0)

    dq = tl.zeros([BLOCK_H, BLOCK_I, BLOCK_E], dtype=cdt)
    ra_sum = tl.zeros([BLOCK_H, BLOCK_I], dtype=cdt)
    # Σ_j ds_ij = 0, so a sum of ds times a per-edge factor may subtract any constant
    # from the factor: the self-pair values r0 and r0·m0 leave small differences (the
    # gram features dominate the LayerNorm statistics and hardly change with j),
    # taken without cancellation, so du and dgram keep their digits.
    m0, r0 = _norm_stats(3.0 * num_freqs, g_sum, quad, D, eps)
    rd_sum = tl.zeros([BLOCK_H, BLOCK_I], dtype=cdt)  # Σ_j ds (r − r0)
    rdm_sum = tl.zeros([BLOCK_H, BLOCK_I], dtype=cdt)  # Σ_j ds (r·m − r0·m0)
    kap_sum = tl.zeros([BLOCK_I], dtype=cdt)
    lam_sum = tl.zeros([BLOCK_I], dtype=cdt)
    for j0 in range(begin, end, BLOCK_J):
        jj = j0 + tl.arange(0, BLOCK_J)
        mj = jj < end
        alpha, ds, r, m, kap, lam = _edge_terms(
            q_ptr, go_ptr, lse, dlt, ug, usum, dg, dsum, k_ptr, v_ptr, u_ptr, gy_ptr, phase_ptr,
            row, mrow, ii, mi, jj, mj, hh, mh, g_sum, quad, H, HEAD_DIM, t3, D, eps,
            BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_T, BLOCK_R, BLOCK_EC,
        )  # fmt: skip
        k3 = _heads_tile(k_ptr, jj, mj, hh, mh, ee, me, H, HEAD_DIM, False).to(cdt)
        dq = _dot_acc(ds, k3, dq)
        ra = alpha * r[None, :, :]
        rd = ds * r[None, :, :]
        ra_sum += tl.sum(ra, axis=2)
        dm = m - m0
        dr = dm * (m + m0) * (r * r) * (r0 * r0) / (r + r0)  # r − r0
        rd_sum += tl.sum(ds * dr[None, :, :], axis=2)
        rdm_sum += tl.sum(ds * (r * dm + m0 * dr)[None, :, :], axis=2)
        kap_sum += tl.sum(kap, axis=1)
        lam_sum += tl.sum(lam, axis=1)
        ra2 = tl.reshape(ra, (BLOCK_R, BLOCK_J))
        rd2 = tl.reshape(rd, (BLOCK_R, BLOCK_J))
        for t0 in range(0, t3, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            mt = tt < t3
            sj, cj = _phases(phase_ptr, jj, mj, tt, mt, t3, False)
            off = row[:, :, None] * t6 + tt[None, None, :]
            mask = mrow[:, :, None] & mt[None, None, :]
            _accumulate(a1_ptr + off, mask, 1.0, ra2, sj, cj, t3, BLOCK_H, BLOCK_I, BLOCK_T)
            _accumulate(a2_ptr + off, mask, 1.0, rd2, sj, cj, t3, BLOCK_H, BLOCK_I, BLOCK_T)
            off = ii[:, None] * t6 + tt[None, :]
            mask = mi[:, None] & mt[None, :]
            old = tl.load(a3_ptr + off, mask=mask, other=0.0)
            tl.store(a3_ptr + off, old + _dot(kap, sj), mask=mask)
            old = tl.load(a3_ptr + off + t3, mask=mask, other=0.0)
            tl.store(a3_ptr + off + t3, old + _dot(kap, cj), mask=mask)
        tl.debug_barrier()

    m3 = mrow[:, :, None] & me[None, None, :]
    dq_out = dq_ptr + row[:, :, None] * HEAD_DIM + ee[None, None, :]
    tl.store(dq_out, dq.to(dq_ptr.dtype.element_ty), mask=m3)
    dudt = du_ptr.dtype.element_ty
    rdm = rdm_sum[:, :, None]
    df0 = tl.zeros([BLOCK_I], dtype=cdt)
    df1 = tl.zeros([BLOCK_I], dtype=cdt)
    df2 = tl.zeros([BLOCK_I], dtype=cdt)
    for t0 in range(0, t3, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        mt = tt < t3
        si, ci = _phases(phase_ptr, ii, mi, tt, mt, t3, False)
        off = row[:, :, None] * t6 + tt[None, None, :]
        mask = mrow[:, :, None] & mt[None, None, :]
        a1s = tl.load(a1_ptr + off, mask=mask, other=0.0)
        a1c = tl.load(a1_ptr + off + t3, mask=mask, other=0.0)
        a2s = tl.load(a2_ptr + off, mask=mask, other=0.0)
        a2c = tl.load(a2_ptr + off + t3, mask=mask, other=0.0)
        out = du_ptr + row[:, :, None] * D + tt[None, None, :]
        tl.store(out, (ci[None, :, :] * a2s - si[None, :, :] * a2c - rdm).to(dudt), mask=mask)
        tl.store(out + t3, (si[None, :, :] * a2s + ci[None, :, :] * a2c - rdm).to(dudt), mask=mask)
        us, uc = _rotated(u_ptr, row, mrow, tt, mt, si, ci, t3, D)
        dys, dyc = _rotated(gy_ptr, row, mrow, tt, mt, si, ci, t3, D)
        f = dys * a1c - dyc * a1s + us * a2c - uc * a2s
        off = ii[:, None] * t6 + tt[None, :]
        mask = mi[:, None] & mt[None, :]
        a3s = tl.load(a3_ptr + off, mask=mask, other=0.0)
        a3c = tl.load(a3_ptr + off + t3, mask=mask, other=0.0)
        f2 = (ci + si) * a3c - (ci - si) * a3s - tl.sum(f, axis=0)  # [BI, BT]
        # d/df of the phase 2πk f_a: column t holds axis t // K, frequency t % K.
        f2 *= ((tt % num_freqs).to(cdt) * _TWO_PI)[None, :]
        axis = (tt // num_freqs)[None, :]
        df0 += tl.sum(tl.where(axis == 0, f2, 0.0), axis=1)
        df1 += tl.sum(tl.where(axis == 1, f2, 0.0), axis=1)
        df2 += tl.sum(tl.where(axis == 2, f2, 0.0), axis=1)
    tl.store(dfrac_ptr + ii * 3, df0, mask=mi)
    tl.store(dfrac_ptr + ii * 3 + 1, df1, mask=mi)
    tl.store(dfrac_ptr + ii * 3 + 2, df2, mask=mi)

    gg = tl.arange(0, BLOCK_GRAM)
    mg = gg < 9
    mask = mrow[:, :, None] & mg[None, None, :]
    off = row[:, :, None] * D + t6 + gg[None, None, :]
    dug = rd_sum[:, :, None] * g[None, None, :] - rdm
    tl.store(du_ptr + off, dug.to(dudt), mask=mask)
    ugr = tl.load(u_ptr + off, mask=mask, other=0.0).to(cdt)
    dyg = tl.load(gy_ptr + off, mask=mask, other=0.0).to(cdt)
    part = tl.sum(tl.sum(ra_sum[:, :, None] * dyg + rd_sum[:, :, None] * ugr, axis=0), axis=0)
    part -= tl.sum(kap_sum, axis=0) + tl.sum(lam_sum, axis=0) * g
    tl.store(dgram_ptr + tile * 9 + gg, part, mask=mg)


@triton.jit
def _edge_attention_bwd_src_kernel(
    go_ptr,  # [N, H, d] dO
    gy_ptr,  # [N, H, D] dY
    q_ptr,
    k_ptr,
    v_ptr,
    u_ptr,
    phase_ptr,  # [N, 6K] compute dtype
    gram_ptr,  # [B, 9] compute dtype
    ptr_ptr,  # [B + 1] int64
    tile_sys_ptr,  # [T] int64 crystal of each source tile
    tile_start_ptr,  # [T] int64 first source of each tile
    lse_ptr,  # [N, H]
    dlt_ptr,  # [N, H] compute dtype
    dp_ptr,  # [N, 6K] scratch, zeros: gradient of the source phases P_j
    dfrac_dst_ptr,  # [N, 3] compute dtype, from the destination kernel
    dk_ptr,  # [N, H, d] out
    dv_ptr,  # [N, H, d] out
    dfrac_ptr,  # [N, 3] out
    H,
    HEAD_DIM,
    num_freqs,
    eps: tl.constexpr,  # constexpr: a float argument would be float32 in a float64 kernel
    BLOCK_H: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_GRAM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_EC: tl.constexpr,
):
    cdt = phase_ptr.dtype.element_ty
    t3 = 3 * num_freqs
    t6 = 2 * t3
    D = t6 + 9
    tile = tl.program_id(0)
    crystal = tl.load(tile_sys_ptr + tile)
    j0 = tl.load(tile_start_ptr + tile)
    begin = tl.load(ptr_ptr + crystal)
    end = tl.load(ptr_ptr + crystal + 1)
    hh = tl.arange(0, BLOCK_H)
    jj = j0 + tl.arange(0, BLOCK_J)
    ee = tl.arange(0, BLOCK_E)
    mh, mj, me = hh < H, jj < end, ee < HEAD_DIM
    g, g_sum, quad = _crystal_gram(gram_ptr, crystal, num_freqs, D, BLOCK_GRAM)

    dk = tl.zeros([BLOCK_H, BLOCK_J, BLOCK_E], dtype=cdt)
    dv = tl.zeros([BLOCK_H, BLOCK_J, BLOCK_E], dtype=cdt)
    for i0 in range(begin, end, BLOCK_I):
        ii = i0 + tl.arange(0, BLOCK_I)
        mi = ii < end
        row = ii[None, :] * H + hh[:, None]
        mrow = mh[:, None] & mi[None, :]
        ug, usum = _row_sums(u_ptr, row, mrow, g, D, BLOCK_H, BLOCK_I, BLOCK_T, BLOCK_GRAM)
        dg, dsum = _row_sums(gy_ptr, row, mrow, g, D, BLOCK_H, BLOCK_I, BLOCK_T, BLOCK_GRAM)
        lse = tl.load(lse_ptr + row, mask=mrow, other=0.0).to(cdt)
        dlt = tl.load(dlt_ptr + row, mask=mrow, other=0.0)
        alpha, ds, r, m, kap, lam = _edge_terms(
            q_ptr, go_ptr, lse, dlt, ug, usum, dg, dsum, k_ptr, v_ptr, u_ptr, gy_ptr, phase_ptr,
            row, mrow, ii, mi, jj, mj, hh, mh, g_sum, quad, H, HEAD_DIM, t3, D, eps,
            BLOCK_H, BLOCK_I, BLOCK_J, BLOCK_T, BLOCK_R, BLOCK_EC,
        )  # fmt: skip
        q3 = _heads_tile(q_ptr, ii, mi, hh, mh, ee, me, H, HEAD_DIM, False).to(cdt)
        go3 = _heads_tile(go_ptr, ii, mi, hh, mh, ee, me, H, HEAD_DIM, False).to(cdt)
        dk = _dot_acc(tl.permute(ds, (0, 2, 1)), q3, dk)
        dv = _dot_acc(tl.permute(alpha, (0, 2, 1)), go3, dv)
        # Σ over (h, i): per-head [BJ, BI] @ [BI, BT] products, then a sum over heads.
        ra = tl.permute(alpha * r[None, :, :], (0, 2, 1))
        rd = tl.permute(ds * r[None, :, :], (0, 2, 1))
        kap_t = tl.trans(kap)
        for t0 in range(0, t3, BLOCK_T):
            tt = t0 + tl.arange(0, BLOCK_T)
            mt = tt < t3
            si, ci = _phases(phase_ptr, ii, mi, tt, mt, t3, False)
            us, uc = _rotated(u_ptr, row, mrow, tt, mt, si, ci, t3, D)
            dys, dyc = _rotated(gy_ptr, row, mrow, tt, mt, si, ci, t3, D)
            dps = _dot_acc(rd, us, _dot(ra, dys))
            dps = tl.sum(dps, axis=0) - _dot(kap_t, ci + si)
            dpc = _dot_acc(rd, uc, _dot(ra, dyc))
            dpc = tl.sum(dpc, axis=0) - _dot(kap_t, ci - si)
            off = dp_ptr + jj[:, None] * t6 + tt[None, :]
            mask = mj[:, None] & mt[None, :]
            tl.store(off, tl.load(off, mask=mask, other=0.0) + dps, mask=mask)
            tl.store(off + t3, tl.load(off + t3, mask=mask, other=0.0) + dpc, mask=mask)
        tl.debug_barrier()

    m3 = mh[:, None, None] & mj[None, :, None] & me[None, None, :]
    off3 = (jj[None, :, None] * H + hh[:, None, None]) * HEAD_DIM + ee[None, None, :]
    tl.store(dk_ptr + off3, dk.to(dk_ptr.dtype.element_ty), mask=m3)
    tl.store(dv_ptr + off3, dv.to(dv_ptr.dtype.element_ty), mask=m3)
    df0 = tl.zeros([BLOCK_J], dtype=cdt)
    df1 = tl.zeros([BLOCK_J], dtype=cdt)
    df2 = tl.zeros([BLOCK_J], dtype=cdt)
    for t0 in range(0, t3, BLOCK_T):
        tt = t0 + tl.arange(0, BLOCK_T)
        mt = tt < t3
        sj, cj = _phases(phase_ptr, jj, mj, tt, mt, t3, False)
        off = dp_ptr + jj[:, None] * t6 + tt[None, :]
        mask = mj[:, None] & mt[None, :]
        f = cj * tl.load(off, mask=mask, other=0.0) - sj * tl.load(off + t3, mask=mask, other=0.0)
        f *= ((tt % num_freqs).to(cdt) * _TWO_PI)[None, :]
        axis = (tt // num_freqs)[None, :]
        df0 += tl.sum(tl.where(axis == 0, f, 0.0), axis=1)
        df1 += tl.sum(tl.where(axis == 1, f, 0.0), axis=1)
        df2 += tl.sum(tl.where(axis == 2, f, 0.0), axis=1)
    fdt = dfrac_ptr.dtype.element_ty
    df0 += tl.load(dfrac_dst_ptr + jj * 3, mask=mj, other=0.0)
    df1 += tl.load(dfrac_dst_ptr + jj * 3 + 1, mask=mj, other=0.0)
    df2 += tl.load(dfrac_dst_ptr + jj * 3 + 2, mask=mj, other=0.0)
    tl.store(dfrac_ptr + jj * 3, df0.to(fdt), mask=mj)
    tl.store(dfrac_ptr + jj * 3 + 1, df1.to(fdt), mask=mj)
    tl.store(dfrac_ptr + jj * 3 + 2, df2.to(fdt), mask=mj)


# ----------------------------------------------------------------- launchers


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _phase_table(frac: torch.Tensor, num_freqs: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, 6K] sin 2πk f_a (index a·K + k), then cos, from (k·f mod 1) in float64."""
    k = torch.arange(num_freqs, device=frac.device, dtype=torch.float64)
    angle = (2.0 * math.pi) * torch.remainder(frac.to(torch.float64)[:, :, None] * k, 1.0)
    n = frac.shape[0]
    table = torch.cat([torch.sin(angle).reshape(n, -1), torch.cos(angle).reshape(n, -1)], 1)
    return table.to(dtype).contiguous()


def _tiles(ptr: torch.Tensor, block: int):
    """Tiles of ``block`` consecutive atoms of one crystal: (crystal [T], first atom [T],
    index of the tile within its crystal [T], most tiles of one crystal). Reads sizes
    back from the device, so it is memoized inside :func:`dao._graph.static_batch`
    (sampling loops, CUDA-graph capture)."""
    return memoized("triton_tiles", ptr, _tile_schedule, block)


def _tile_schedule(ptr: torch.Tensor, block: int):
    num = ptr[1:] - ptr[:-1]
    per = (num + block - 1) // block
    n_tiles = int(per.sum())
    dev = ptr.device
    crystal = torch.repeat_interleave(
        torch.arange(per.numel(), device=dev), per, output_size=n_tiles
    )
    local = torch.arange(n_tiles, device=dev) - (torch.cumsum(per, 0) - per)[crystal]
    return crystal, ptr[crystal] + block * local, local, int(per.max()) if per.numel() else 0


#: Environment variable: heads per program of the forward kernel (a power of two; default
#: 1, a value >= H puts all heads in one program). Fewer heads per program give the GPU
#: more programs (the grid is tiles x head groups) at the price of recomputing each
#: tile's head-independent LayerNorm sums per group; the backward kernels always take
#: all heads. Measured on an H200 (CUDA-graph sampling, two leases): one head per
#: program was 12-18 % faster than all eight at the paper size, 4-6 % at the shipped size
#: on MPTS-52 batches and equal (within 0.3 %) on MP-20
#: (benchmarks/results/sampling_gpu_fwd_heads.csv).
FWD_HEADS_ENV = "DAO_TRITON_FWD_HEADS"
FWD_HEADS_DEFAULT = 1


def _forward_heads_per_program(heads: int) -> int:
    every = triton.next_power_of_2(heads)
    env = os.environ.get(FWD_HEADS_ENV)
    if not env:
        return min(every, FWD_HEADS_DEFAULT)
    want = int(env) if env.strip().isdigit() else 0
    if want < 1 or want & (want - 1):
        raise ValueError(f"{FWD_HEADS_ENV} must be a power of two >= 1, got {env!r}")
    return min(every, want)


def _launch_options(heads: int, head_dim: int, heads_per_program: int | None = None) -> dict:
    block_h = heads_per_program or triton.next_power_of_2(heads)
    return dict(
        BLOCK_H=block_h,
        BLOCK_I=_BLOCK_I,
        BLOCK_J=_BLOCK_J,
        BLOCK_E=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_T=_BLOCK_T,
        BLOCK_GRAM=_BLOCK_GRAM,
        BLOCK_R=block_h * _BLOCK_I,
        BLOCK_EC=_BLOCK_EC,
        # Warps per program: one per [BI, BJ] head tile, at least four. Not tuned on
        # hardware; ptxas (sm_90, float32, H = 8, d = 48, K = 128) reports 255
        # registers and 0.4 to 1.1 KB of spill stack per thread with eight.
        num_warps=max(4, block_h),
        # FMA contraction only makes the scalar LayerNorm terms more accurate;
        # passing it keeps Triton's default-change warning away.
        enable_fp_fusion=True,
    )


def edge_attention_core_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    frac: torch.Tensor,
    gram: torch.Tensor,
    batch: torch.Tensor,
    ptr: torch.Tensor,
    num_freqs: int,
    eps: float,
):
    """The fused pair loop of the edge-attention core.

    Args:
        q, k, v: [N, H, d] (q pre-scaled by 1/√d), one float dtype for all inputs
            (float32, float64 or bfloat16).
        u: [N, H, D] per-head edge-score vectors, D = 6K + 9.
        frac: [N, 3] fractional coordinates.
        gram: [B, 9] (or [B, 3, 3]) L·Lᵀ of every crystal.
        batch: [N] int64 sorted crystal index (the layout is read from ``ptr``;
            kept for the signature shared with the other backends).
        ptr: [B + 1] int64 first atom of every crystal, ptr[B] = N.
        num_freqs: K.
        eps: LayerNorm epsilon.

    Returns:
        (o [N, H, d], y [N, H, D], lse [N, H]); o and y in the input dtype, lse in
        the compute dtype (float32 for bfloat16 input).
    """
    cdt = _compute_dtype(q.dtype)
    if q.shape[0] == 0:
        return torch.empty_like(q), torch.empty_like(u), q.new_empty(q.shape[:2], dtype=cdt)
    phase = _phase_table(frac, num_freqs, cdt)
    gram = gram.reshape(-1, 9).to(cdt).contiguous()
    ptr = ptr.to(device=q.device, dtype=torch.int64).contiguous()
    return _forward(q, k, v, u, phase, gram, ptr, num_freqs, eps, q.dtype)


def _forward(q, k, v, u, phase, gram, ptr, num_freqs, eps, out_dtype):
    """The forward launch on prepared phases, gram (compute dtype) and ptr; o and y
    in ``out_dtype``."""
    n, heads, head_dim = q.shape
    dim = u.shape[2]
    cdt = phase.dtype
    q, k, v, u = (t.contiguous() for t in (q, k, v, u))
    o = torch.empty(n, heads, head_dim, dtype=out_dtype, device=q.device)
    y = torch.empty(n, heads, dim, dtype=out_dtype, device=q.device)
    lse = torch.empty(n, heads, dtype=cdt, device=q.device)
    tile_sys, tile_start, _, _ = _tiles(ptr, _BLOCK_I)
    acc = torch.zeros(n, heads, dim - 9, dtype=cdt, device=q.device)
    per_program = _forward_heads_per_program(heads)
    _edge_attention_fwd_kernel[(tile_sys.numel(), triton.cdiv(heads, per_program))](
        q, k, v, u, phase, gram, ptr, tile_sys, tile_start, acc, o, y, lse,
        heads, head_dim, num_freqs, float(eps),
        **_launch_options(heads, head_dim, per_program),
    )  # fmt: skip
    return o, y, lse


def edge_attention_core_backward(
    grad_o: torch.Tensor,
    grad_y: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    frac: torch.Tensor,
    gram: torch.Tensor,
    batch: torch.Tensor,
    ptr: torch.Tensor,
    o: torch.Tensor,
    y: torch.Tensor,
    lse: torch.Tensor,
    num_freqs: int,
    eps: float,
):
    """Gradients of (o, y) of :func:`edge_attention_core_forward` (lse is not differentiated).

    Args:
        grad_o: [N, H, d] and grad_y: [N, H, D], the output gradients.
        q, k, v, u, frac, gram, batch, ptr, num_freqs, eps: the forward's inputs.
        o, y, lse: the forward's outputs.

    Returns:
        (dq, dk, dv [N, H, d], du [N, H, D], dfrac [N, 3], dgram [B, 9]) in the
        input dtype.
    """
    n, heads, head_dim = q.shape
    dim = u.shape[2]
    dtype, dev = q.dtype, q.device
    cdt = _compute_dtype(dtype)
    n_crystals = gram.shape[0]
    dq, dk, dv = (torch.empty(n, heads, head_dim, dtype=dtype, device=dev) for _ in range(3))
    du = torch.empty(n, heads, dim, dtype=dtype, device=dev)
    dfrac = torch.empty(n, 3, dtype=dtype, device=dev)
    if n == 0:
        return dq, dk, dv, du, dfrac, torch.zeros(n_crystals, 9, dtype=dtype, device=dev)
    ts = (grad_o, grad_y, q, k, v, u, lse)
    grad_o, grad_y, q, k, v, u, lse = (t.contiguous() for t in ts)
    phase = _phase_table(frac, num_freqs, cdt)
    gram = gram.reshape(-1, 9).to(cdt).contiguous()
    ptr = ptr.to(device=dev, dtype=torch.int64).contiguous()
    if dtype != cdt:
        # Rounded o and y would put their rounding into Dlt, and ds = α(dα − Dlt)
        # would spread it over every edge (Σ_j ds_ij = 0 no longer holds, which
        # du and dq feel most): recompute them in the compute dtype.
        o, y, _ = _forward(q, k, v, u, phase, gram, ptr, num_freqs, eps, cdt)
    dlt = (grad_o.to(cdt) * o.to(cdt)).sum(-1) + (grad_y.to(cdt) * y.to(cdt)).sum(-1)
    opts = _launch_options(heads, head_dim)

    tile_sys, tile_start, tile_local, max_tiles = _tiles(ptr, _BLOCK_I)
    a1 = torch.zeros(n, heads, dim - 9, dtype=cdt, device=dev)
    a2 = torch.zeros_like(a1)
    a3 = torch.zeros(n, dim - 9, dtype=cdt, device=dev)
    dfrac_dst = torch.empty(n, 3, dtype=cdt, device=dev)
    dgram_part = torch.empty(tile_sys.numel(), 9, dtype=cdt, device=dev)
    _edge_attention_bwd_dst_kernel[(tile_sys.numel(),)](
        grad_o, grad_y, q, k, v, u, phase, gram, ptr, tile_sys, tile_start, lse, dlt,
        a1, a2, a3, dq, du, dfrac_dst, dgram_part, heads, head_dim, num_freqs, float(eps),
        **opts,
    )  # fmt: skip
    # Per-crystal sums of the tile partials in a fixed order (no atomics).
    padded = torch.zeros(n_crystals, max_tiles, 9, dtype=cdt, device=dev)
    padded[tile_sys, tile_local] = dgram_part
    dgram = padded.sum(1).to(dtype)

    src_sys, src_start, _, _ = _tiles(ptr, _BLOCK_J)
    dp = torch.zeros(n, dim - 9, dtype=cdt, device=dev)
    _edge_attention_bwd_src_kernel[(src_sys.numel(),)](
        grad_o, grad_y, q, k, v, u, phase, gram, ptr, src_sys, src_start, lse, dlt,
        dp, dfrac_dst, dk, dv, dfrac, heads, head_dim, num_freqs, float(eps),
        **opts,
    )  # fmt: skip
    return dq, dk, dv, du, dfrac, dgram
