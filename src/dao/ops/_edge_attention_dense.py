"""The ``"dense"`` backend of ``dao::edge_attention_core``: the pair loop as batched
matrix products over crystals padded to the widest one (cuBLAS on a GPU).

Same exact rewrite as the C++ ``gemm`` kernel (``csrc/edge_attention.cpp``), written
with torch operations so that a GPU runs it on its matrix units instead of a
hand-written pair loop. With per-atom Fourier tables t_j = [sin 2πk f_j, cos 2πk f_j]
(6K values, angles reduced mod 1 in float64) and Δf_ij = f_j − f_i:

* φ(Δf_ij)·u = a_i·t_j, where a_i is u rotated by atom i's table
  (sin(x − y) = sin x cos y − cos x sin y, and the cos rule): per head the Fourier part
  of every score is one product [N_b·H, 6K] × [6K, N_b] per crystal;
* the LayerNorm mean of x_ij = [φ(Δf_ij), g] is (r_i·t_j + Σg) / D with r_i the rotated
  all-ones vector; Σx² = 3K + Σg² exactly (sin² + cos² = 1), so the variance is closed
  form and rstd_ij is a [N_b, N_b] table shared by all heads;
* y_i = Σ_j α_ij rstd_ij (x_ij − μ_ij): the Fourier part is (Σ_j w_ij t_j) rotated back
  by atom i's table, w = α·rstd, one product [N_b·H, N_b] × [N_b, 6K] per crystal.

Crystals are padded to N_max atoms (padding keys masked out of the softmax, padding
rows never read back), so a batch is a handful of ``bmm`` calls whatever its size
mix. Nothing is kept between forward and backward: the backward recomputes this
forward under autograd and differentiates it, so memory between the two stays at
the node level, as for the other backends (transient [B, N_max·H, 6K] tensors live
only inside one call). 16-bit inputs are computed in float32 and returned in their
dtype (lse in float32, as the Triton kernel).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dao._graph import memoized


class DenseLayout(NamedTuple):
    """Where every atom sits in the padded [B, N_max] grid."""

    width: int  # N_max: atoms of the largest crystal
    pos: Tensor  # [N] slot of each atom in the flattened grid: crystal · N_max + rank
    gather: Tensor  # [B · N_max] atom in each slot (0 for padding: masked downstream)
    valid: Tensor  # [B, N_max] bool, slot holds an atom


def dense_layout(batch: Tensor, ptr: Tensor) -> DenseLayout:
    """The padded layout of ``batch`` (memoized inside :func:`dao._graph.static_batch`;
    it reads the largest crystal size back from the device once)."""
    return memoized("dense_layout", batch, _dense_layout, ptr)


def _dense_layout(batch: Tensor, ptr: Tensor) -> DenseLayout:
    n, b = batch.numel(), ptr.numel() - 1
    counts = ptr[1:] - ptr[:-1]
    width = max(int(counts.max()), 1) if b else 1
    atoms = torch.arange(n, device=batch.device)
    pos = batch * width + (atoms - ptr[batch])
    gather = torch.zeros(b * width, dtype=torch.int64, device=batch.device)
    gather.index_copy_(0, pos, atoms)
    valid = torch.zeros(b * width, dtype=torch.bool, device=batch.device)
    valid.index_fill_(0, pos, True)
    return DenseLayout(width, pos, gather, valid.view(b, width))


def fourier_tables(frac: Tensor, num_freqs: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(sin, cos) of 2πk f for k = 0..K−1 per atom and axis, [N, 3K] (axis-major, as the
    edge features), the angle k·f reduced mod 1 in float64 before the 2π; differentiable
    in ``frac``."""
    k = torch.arange(num_freqs, device=frac.device, dtype=torch.float64)
    turns = frac.to(torch.float64).unsqueeze(-1) * k  # [N, 3, K]
    # Subtracting the integer part changes nothing mathematically (its gradient is 0)
    # but keeps sin/cos arguments within [0, 2π).
    angle = (2.0 * math.pi) * (turns - torch.floor(turns).detach())
    n = frac.shape[0]
    return angle.sin().to(dtype).reshape(n, -1), angle.cos().to(dtype).reshape(n, -1)


class _Scores(NamedTuple):
    """What the forward and the backward both compute from the inputs."""

    lay: DenseLayout
    sin: Tensor  # [N, 3K] per-atom tables
    cos: Tensor
    g_atom: Tensor  # [N, 9] gram of each atom's crystal
    a_ext: Tensor  # [B, N_max, H + 1, 6K]: u rotated per head, then the rotated ones
    table: Tensor  # [B, N_max, 6K]: [sin, cos] of the padded atoms
    u_sum: Tensor  # [B, H, N_max]: Σ_m u_m
    mean: Tensor  # [B, N_max, N_max]: LayerNorm mean of x_ij
    rstd: Tensor  # [B, N_max, N_max]: its 1/√(var + eps)
    rstd_c: Tensor  # rstd_ij − rstd_ii: row-centred (see _dense_grads)
    mean_rstd_c: Tensor  # μ_ij rstd_ij − μ_ii rstd_ii
    pre: Tensor  # [B, H, N_max, N_max]: u_i·(x_ij − μ_ij), the edge score before rstd
    qp: Tensor  # [B, H, N_max, d]
    kp: Tensor
    vp: Tensor
    alpha: Tensor  # [B, H, N_max, N_max] attention weights (0 for padding keys)
    lse: Tensor  # [B, H, N_max]


def _scores(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps) -> _Scores:
    n, heads, _ = q.shape
    dim = u.shape[2]
    k3 = 3 * num_freqs
    lay = dense_layout(batch, ptr)
    b, w = gram.shape[0], lay.width
    sin, cos = fourier_tables(frac, num_freqs, q.dtype)  # [N, 3K]
    s1, c1 = sin.unsqueeze(1), cos.unsqueeze(1)
    u_sin, u_cos, u_gram = u[..., :k3], u[..., k3 : 2 * k3], u[..., 2 * k3 :]
    # a_i (u rotated by atom i's table): a_i·t_j = u_i·φ(f_j − f_i); and as one more
    # "head" r_i, the rotated ones: r_i·t_j = Σ φ(f_j − f_i), for the LayerNorm mean.
    a = torch.cat([u_sin * c1 + u_cos * s1, u_cos * c1 - u_sin * s1], dim=-1)  # [N, H, 6K]
    ones_rot = torch.cat([cos + sin, cos - sin], dim=-1).unsqueeze(1)  # [N, 1, 6K]
    a_ext = _pad(torch.cat([a, ones_rot], dim=1), lay, b)  # [B, N_max, H + 1, 6K]
    table = _pad(torch.cat([sin, cos], dim=-1), lay, b)  # [B, N_max, 6K]
    g_atom = gram.index_select(0, batch)  # [N, 9]
    u_g = _pad((u_gram * g_atom.unsqueeze(1)).sum(-1), lay, b).transpose(1, 2)  # [B, H, i]
    u_sum = _pad(u.sum(-1), lay, b).transpose(1, 2)  # [B, H, i]

    prod = torch.bmm(a_ext.view(b, w * (heads + 1), -1), table.transpose(1, 2))
    prod = prod.view(b, w, heads + 1, w).transpose(1, 2)  # [B, H + 1, i, j]
    # The statistics in float64 (tables of [B, N_max, N_max]: cheap): Σx²/D − μ² loses
    # digits to cancellation when the lattice block dominates (large cells).
    g64 = gram.to(torch.float64)
    mean64 = (prod[:, heads].to(torch.float64) + g64.sum(-1).view(b, 1, 1)) / dim  # [B, i, j]
    sq_mean = ((3 * num_freqs + g64.square().sum(-1)) / dim).view(b, 1, 1)  # Σx²/D
    rstd64 = torch.rsqrt(sq_mean - mean64.square() + eps)
    mr64 = mean64 * rstd64
    rstd_c = (rstd64 - rstd64.diagonal(dim1=1, dim2=2).unsqueeze(-1)).to(q.dtype)
    mean_rstd_c = (mr64 - mr64.diagonal(dim1=1, dim2=2).unsqueeze(-1)).to(q.dtype)
    rstd, mean = rstd64.to(q.dtype), mean64.to(q.dtype)
    pre = prod[:, :heads] - mean.unsqueeze(1) * u_sum.unsqueeze(-1) + u_g.unsqueeze(-1)
    qp, kp, vp = (_pad(t, lay, b).transpose(1, 2) for t in (q, k, v))  # [B, H, N_max, d]
    scores = torch.matmul(qp, kp.transpose(-1, -2)) + pre * rstd.unsqueeze(1)
    # Padding keys get the lowest finite score, not -inf: the rows of an empty crystal
    # (all padding) then stay finite, and a NaN there would reach real gradients
    # through the products of the backward (0·NaN), though the rows are never read.
    scores = scores.masked_fill(~lay.valid.view(b, 1, 1, w), torch.finfo(q.dtype).min)
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, i]
    alpha = torch.exp(scores - lse.unsqueeze(-1))
    return _Scores(lay, sin, cos, g_atom, a_ext, table, u_sum, mean, rstd, rstd_c, mean_rstd_c,
                   pre, qp, kp, vp, alpha, lse)  # fmt: skip


def _pad(x: Tensor, lay: DenseLayout, b: int, zero: bool = False) -> Tensor:
    """[N, ...] -> [B, N_max, ...]; padding slots hold atom 0's row, or 0 with ``zero``."""
    out = x.index_select(0, lay.gather).view(b, lay.width, *x.shape[1:])
    if zero:
        out = out * lay.valid.view(b, lay.width, *([1] * (x.dim() - 1)))
    return out


def _unpad(x: Tensor, lay: DenseLayout) -> Tensor:
    """[B, N_max, ...] -> [N, ...]."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, lay.pos)


def _rotate(x: Tensor, sin: Tensor, cos: Tensor, sign: float = 1.0) -> Tensor:
    """[..., 6K] = [x_s, x_c] rotated by per-atom angles: [x_s·cos + σ x_c·sin,
    x_c·cos − σ x_s·sin] with σ = ``sign`` (−1 is the inverse rotation); sin and cos
    [N, 3K] broadcast over the head axis of x [N, H, 6K]."""
    k3 = sin.shape[-1]
    s1, c1 = sin.unsqueeze(1), cos.unsqueeze(1)
    xs, xc = x[..., :k3], x[..., k3:]
    if sign > 0:
        return torch.cat([xs * c1 + xc * s1, xc * c1 - xs * s1], dim=-1)
    return torch.cat([xs * c1 - xc * s1, xc * c1 + xs * s1], dim=-1)


def _y(sc: _Scores, heads: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """(y [N, H, D], acc [N, H, 6K] = Σ_j w_ij t_j, w_sum [N, H]) with w = α·rstd."""
    b, w = sc.table.shape[0], sc.lay.width
    wgt = sc.alpha * sc.rstd.unsqueeze(1)  # [B, H, i, j]
    wgt_t = wgt.transpose(1, 2)  # [B, i, H, j]
    acc = _unpad(torch.bmm(wgt_t.reshape(b, w * heads, w), sc.table).view(b, w, heads, -1), sc.lay)
    w_sum = _unpad(wgt_t.sum(-1), sc.lay)  # [N, H]
    w_mean = _unpad((wgt * sc.mean.unsqueeze(1)).sum(-1).transpose(1, 2), sc.lay)  # [N, H]
    # Σ_j w_ij φ(f_j − f_i) = acc rotated back by atom i's table
    y = torch.cat(
        [_rotate(acc, sc.sin, sc.cos, -1.0), w_sum.unsqueeze(-1) * sc.g_atom.unsqueeze(1)], dim=-1
    ) - w_mean.unsqueeze(-1)
    return y, acc, w_sum


def _float(*ts: Tensor) -> tuple[torch.dtype, list[Tensor]]:
    """(the compute dtype, the tensors in it): float32 for 16-bit inputs."""
    dt = torch.float32 if ts[0].dtype in (torch.float16, torch.bfloat16) else ts[0].dtype
    return dt, [t.to(dt) for t in ts]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def dense_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    frac: Tensor,
    gram: Tensor,
    batch: Tensor,
    ptr: Tensor,
    num_freqs: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(o [N, H, d], y [N, H, D], lse [N, H]) as the reference core, written with
    differentiable torch operations (the op's forward runs it without autograd; the
    tests also differentiate it against :func:`dense_backward`)."""
    n, heads, _ = q.shape
    out_dtype = q.dtype
    _, (q, k, v, u, frac, gram) = _float(q, k, v, u, frac, gram)
    if n == 0:  # nothing to gather from; the products keep autograd connected
        return (q * 0).to(out_dtype), (u * 0).to(out_dtype), q.new_zeros(0, heads)
    sc = _scores(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)
    o = _unpad(torch.matmul(sc.alpha, sc.vp).transpose(1, 2), sc.lay)  # [N, H, d]
    y, _, _ = _y(sc, heads, u.shape[2])
    lse = _unpad(sc.lse.transpose(1, 2), sc.lay)
    return o.to(out_dtype), y.to(out_dtype), lse.to(_lse_dtype(out_dtype))


def dense_forward(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps):
    """The op's forward (no autograd recording)."""
    with torch.no_grad():
        return dense_core(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)


def dense_backward(grad_o, grad_y, q, k, v, u, frac, gram, batch, ptr, num_freqs, eps):
    """(dq, dk, dv, du, dfrac, dgram, y): the scores recomputed (nothing of the forward
    is kept), then the gradients by hand with the same batched products; the chain
    rule step by step is in the comments."""
    n = q.shape[0]
    out_dtype = q.dtype
    _, (grad_o, grad_y, q, k, v, u, frac, gram) = _float(grad_o, grad_y, q, k, v, u, frac, gram)
    if n == 0:
        zeros = tuple(torch.zeros_like(t).to(out_dtype) for t in (q, k, v, u, frac, gram))
        return (*zeros, torch.zeros_like(u).to(out_dtype))
    with torch.no_grad():
        grads = _dense_grads(grad_o, grad_y, q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)
    return tuple(g.to(out_dtype) for g in grads)


def _dense_grads(grad_o, grad_y, q, k, v, u, frac, gram, batch, ptr, num_freqs, eps):
    n, heads, d = q.shape
    dim = u.shape[2]
    k3 = 3 * num_freqs
    b = gram.shape[0]
    sc = _scores(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)
    lay, w = sc.lay, sc.lay.width
    sin, cos, alpha, rstd, mean = sc.sin, sc.cos, sc.alpha, sc.rstd, sc.mean
    y, acc, w_sum = _y(sc, heads, dim)

    # y = [rot⁻¹(acc), w_sum·g] − w_mean: gradients of acc, w_sum, w_mean, and of the
    # tables and g through the rotation and the lattice block
    dy_f, dy_g = grad_y[..., : 2 * k3], grad_y[..., 2 * k3 :]
    d_acc = _rotate(dy_f, sin, cos, 1.0)  # the rotation's transpose is its inverse
    d_w_sum = (dy_g * sc.g_atom.unsqueeze(1)).sum(-1)  # [N, H]
    d_w_mean = -grad_y.sum(-1)  # [N, H]
    acc_s, acc_c = acc[..., :k3], acc[..., k3:]
    dy_s, dy_c = dy_f[..., :k3], dy_f[..., k3:]
    d_sin = (acc_s * dy_c - acc_c * dy_s).sum(1)  # [N, 3K]
    d_cos = (acc_s * dy_s + acc_c * dy_c).sum(1)
    d_g_atom = (w_sum.unsqueeze(-1) * dy_g).sum(1)  # [N, 9]

    # acc_i = Σ_j W_ij t_j, w_sum_i = Σ_j W_ij, w_mean_i = Σ_j W_ij μ_ij; W = α·rstd.
    # dW_ij = d_acc_i·t_j + d_w_sum_i + d_w_mean_i μ_ij; through W = α·rstd that gives
    # dα_ij = dW_ij rstd_ij. The last two terms are nearly constant over j and large for
    # large cells (the lattice block of x is unnormalised), and the softmax backward
    # cancels anything constant over j: they enter dα row-centred (rstd_ij − rstd_ii,
    # μ_ij rstd_ij − μ_ii rstd_ii, taken in float64), which keeps ds accurate in float32.
    d_acc_p = _pad(d_acc, lay, b, zero=True)  # [B, i, H, 6K]
    d_wt = torch.bmm(d_acc_p.view(b, w * heads, -1), sc.table.transpose(1, 2))
    d_wt = d_wt.view(b, w, heads, w).transpose(1, 2)  # [B, H, i, j]: d_acc_i·t_j
    d_w_sum_p = _pad(d_w_sum, lay, b, zero=True).transpose(1, 2).unsqueeze(-1)  # [B, H, i, 1]
    d_w_mean_p = _pad(d_w_mean, lay, b, zero=True).transpose(1, 2).unsqueeze(-1)
    wgt = alpha * rstd.unsqueeze(1)
    d_op = _pad(grad_o, lay, b, zero=True).transpose(1, 2)  # [B, H, i, d]
    # o = α·v: dα += do·v_j, dv = αᵀ do; then the softmax: ds = α (dα − Σ_j α dα)
    d_alpha = (
        d_wt * rstd.unsqueeze(1)
        + d_w_sum_p * sc.rstd_c.unsqueeze(1)
        + d_w_mean_p * sc.mean_rstd_c.unsqueeze(1)
        + torch.matmul(d_op, sc.vp.transpose(-1, -2))
    )
    d_s = alpha * (d_alpha - (alpha * d_alpha).sum(-1, keepdim=True))
    dv = _unpad(torch.matmul(alpha.transpose(-1, -2), d_op).transpose(1, 2), lay)
    # s = q·k + pre·rstd
    dq = _unpad(torch.matmul(d_s, sc.kp).transpose(1, 2), lay)
    dk = _unpad(torch.matmul(d_s.transpose(-1, -2), sc.qp).transpose(1, 2), lay)
    e = d_s * rstd.unsqueeze(1)  # d pre
    d_w = d_wt + d_w_sum_p + d_w_mean_p * mean.unsqueeze(1)
    d_rstd = (d_w * alpha + d_s * sc.pre).sum(1)  # [B, i, j]
    # pre = a·t − μ·u_sum + u_g; rstd = (Σx²/D − μ² + eps)^(−1/2); μ = (r·t + Σg)/D
    rstd3 = rstd * rstd.square()
    d_mean = (
        (wgt * d_w_mean_p).sum(1) - (e * sc.u_sum.unsqueeze(-1)).sum(1) + d_rstd * rstd3 * mean
    )  # [B, i, j]
    # Σ_j e_ij μ_ij and Σ_j e_ij, row-centred as above (Σ_j ds_ij = 0)
    d_u_sum = _unpad(-(d_s * sc.mean_rstd_c.unsqueeze(1)).sum(-1).transpose(1, 2), lay)
    d_u_g = _unpad((d_s * sc.rstd_c.unsqueeze(1)).sum(-1).transpose(1, 2), lay)  # [N, H]
    d_sq = -0.5 * (d_rstd * rstd3).sum((1, 2))  # [B]: d(Σx²/D)
    d_gram = (d_mean.sum((1, 2)) / dim).unsqueeze(-1) + d_sq.unsqueeze(-1) * (2.0 / dim) * gram

    # the products with t: [e (H heads) | dμ/D] against a_ext, and W against d_acc
    e_ext = torch.cat([e, (d_mean / dim).unsqueeze(1)], dim=1).transpose(1, 2)  # [B, i, H+1, j]
    e_ext = e_ext.reshape(b, w * (heads + 1), w)
    d_a_ext = _unpad(torch.bmm(e_ext, sc.table).view(b, w, heads + 1, -1), lay)  # [N, H+1, 6K]
    d_table = torch.baddbmm(
        torch.bmm(e_ext.transpose(1, 2), sc.a_ext.view(b, w * (heads + 1), -1)),
        wgt.transpose(1, 2).reshape(b, w * heads, w).transpose(1, 2),
        d_acc_p.view(b, w * heads, -1),
    )  # [B, j, 6K]
    d_table = _unpad(d_table, lay)  # [N, 6K]
    d_a, d_r = d_a_ext[:, :heads], d_a_ext[:, heads]

    # a = rot(u): du = rot⁻¹(da) (+ Σu and u·g parts); the tables through a, r and t
    u_s, u_c = u[..., :k3], u[..., k3 : 2 * k3]
    da_s, da_c = d_a[..., :k3], d_a[..., k3:]
    du = torch.cat(
        [
            _rotate(d_a, sin, cos, -1.0) + d_u_sum.unsqueeze(-1),
            d_u_sum.unsqueeze(-1) + d_u_g.unsqueeze(-1) * sc.g_atom.unsqueeze(1),
        ],
        dim=-1,
    )
    dr_s, dr_c = d_r[..., :k3], d_r[..., k3:]
    d_sin = d_sin + (u_c * da_s - u_s * da_c).sum(1) + dr_s - dr_c + d_table[:, :k3]
    d_cos = d_cos + (u_s * da_s + u_c * da_c).sum(1) + dr_s + dr_c + d_table[:, k3:]
    d_g_atom = d_g_atom + (d_u_g.unsqueeze(-1) * u[..., 2 * k3 :]).sum(1)
    d_gram = d_gram.index_add(0, batch, d_g_atom)
    # sin/cos of θ = 2πk f: dθ = d_sin·cos − d_cos·sin, df = Σ_k 2πk dθ
    k2pi = (2.0 * math.pi) * torch.arange(num_freqs, device=q.device, dtype=q.dtype)
    d_theta = (d_sin * cos - d_cos * sin).view(n, 3, num_freqs)
    d_frac = (d_theta * k2pi).sum(-1)
    return dq, dk, dv, du, d_frac, d_gram, y
