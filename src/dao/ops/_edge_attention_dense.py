"""The ``"dense"`` backend of ``dao::edge_attention_core``: the pair loop as batched
matrix products over crystals padded by size group (cuBLAS on a GPU).

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

Crystals are sorted by size and split into at most three groups, each padded to
its largest crystal (padding keys masked out of the softmax, padding rows never read
back): a batch is a handful of ``bmm`` calls per group whatever its size mix, and the
grouping keeps the padded pairs close to the real ones (64 MPTS-52 crystals: 48,554
pairs, 90,496 padded in two groups, 173,056 in one).

Nothing is kept between forward and backward: the backward recomputes the forward's
pair tables and applies the chain rule by hand (:func:`_group_grads`), so memory
between the two stays at the node level, as for the other backends (the padded
[slots, H + 1, 6K] tensors live only inside one call). 16-bit inputs are computed in
float32 and returned in their dtype (lse in float32, as the Triton kernel).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from dao._graph import memoized


class DenseGroup(NamedTuple):
    """Crystals padded to one width: slots [start, start + B_g·width) of the layout."""

    width: int  # atoms of the group's largest crystal
    start: int  # first slot
    count: int  # B_g crystals
    first: int  # its first crystal in the layout's crystal order


class DenseLayout(NamedTuple):
    """Where every atom sits in the padded groups."""

    groups: tuple[DenseGroup, ...]
    pos: Tensor  # [N] slot of each atom
    gather: Tensor  # [S] atom in each slot (0 for padding: masked downstream)
    valid: Tensor  # [S] bool, slot holds an atom
    crystals: Tensor  # [B] crystal index in group order (crystals sorted by size)


# A further group must remove at least this share of the padded pairs: every group
# costs its own dozen of kernel launches in the forward and three dozen in the backward.
_GROUP_GAIN = 0.25
_MAX_GROUPS = 3


def dense_layout(batch: Tensor, ptr: Tensor) -> DenseLayout:
    """The padded layout of ``batch`` (memoized inside :func:`dao._graph.static_batch`;
    it reads the crystal sizes back from the device once)."""
    return memoized("dense_layout", batch, _dense_layout, ptr)


def split_by_size(sizes: np.ndarray) -> list[tuple[int, int]]:
    """Split crystals sorted by size into at most three runs [a, b) that keep
    Σ_g B_g·width_g² (padded pairs) small; a run is added only where it saves at least
    ``_GROUP_GAIN`` of the pairs (each costs kernel launches).

    Only the ends of runs of equal sizes are tried as split points (moving a split
    inside such a run to its end never costs more), so the search is over at most as
    many points as there are distinct sizes, whatever the batch size."""
    b = len(sizes)
    if b == 0:
        return []
    sq = sizes.astype(np.float64) ** 2
    cuts = np.flatnonzero(sizes[1:] != sizes[:-1]) + 1  # candidate split points
    best = [(float(b * sq[-1]), [(0, b)])]
    if len(cuts) >= 1 and _MAX_GROUPS >= 2:
        cost = cuts * sq[cuts - 1] + (b - cuts) * sq[-1]
        i = int(np.argmin(cost))
        k = int(cuts[i])
        best.append((float(cost[i]), [(0, k), (k, b)]))
    if len(cuts) >= 2 and _MAX_GROUPS >= 3:
        k1, k2 = np.meshgrid(cuts, cuts, indexing="ij")
        cost = k1 * sq[k1 - 1] + (k2 - k1) * sq[k2 - 1] + (b - k2) * sq[-1]
        cost = np.where(k2 > k1, cost, np.inf)
        i1, i2 = np.unravel_index(int(np.argmin(cost)), cost.shape)
        a1, a2 = int(k1[i1, i2]), int(k2[i1, i2])
        best.append((float(cost[i1, i2]), [(0, a1), (a1, a2), (a2, b)]))
    chosen = best[0]
    for cand in best[1:]:
        if cand[0] <= (1.0 - _GROUP_GAIN) * chosen[0]:
            chosen = cand
    return chosen[1]


def _dense_layout(batch: Tensor, ptr: Tensor) -> DenseLayout:
    n, b = batch.numel(), ptr.numel() - 1
    device = batch.device
    counts = (ptr[1:] - ptr[:-1]).cpu().numpy()
    order = np.argsort(counts, kind="stable")
    sizes = counts[order]
    groups, base = [], np.zeros(b, dtype=np.int64)  # base: first slot of each crystal
    start = 0
    for a, e in split_by_size(sizes):
        width = max(int(sizes[e - 1]), 1)
        base[order[a:e]] = start + width * np.arange(e - a)
        groups.append(DenseGroup(width, start, e - a, a))
        start += width * (e - a)
    atoms = torch.arange(n, device=device)
    base_t = torch.as_tensor(base, device=device)
    pos = base_t[batch] + (atoms - ptr[batch]) if n else atoms
    gather = torch.zeros(start, dtype=torch.int64, device=device)
    gather.index_copy_(0, pos, atoms)
    valid = torch.zeros(start, dtype=torch.bool, device=device)
    valid.index_fill_(0, pos, True)
    crystals = torch.as_tensor(order, device=device)
    return DenseLayout(tuple(groups), pos, gather, valid, crystals)


def fourier_phases(frac: Tensor, num_freqs: int, dtype: torch.dtype) -> Tensor:
    """e^{2πi k f} for k = 0..K−1 per atom and axis, [N, 3K] complex (axis-major, as the
    edge features), the angle k·f reduced mod 1 in float64 before the 2π."""
    k = torch.arange(num_freqs, device=frac.device, dtype=torch.float64)
    turns = frac.to(torch.float64).unsqueeze(-1) * k  # [N, 3, K]
    angle = (2.0 * math.pi) * (turns - torch.floor(turns))  # within [0, 2π)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    return torch.polar(torch.ones_like(angle), angle).to(complex_dtype).reshape(frac.shape[0], -1)


def _complex(x: Tensor, k3: int) -> Tensor:
    """[..., 6K] in the features' order [sin block, cos block] -> [..., 3K] complex
    cos + i·sin (a rotation by e^{iθ} is then one complex product)."""
    return torch.complex(x[..., k3 : 2 * k3], x[..., :k3])


def _split(z: Tensor) -> tuple[Tensor, Tensor]:
    """[..., 3K] complex -> (sin block, cos block) = (imaginary, real) parts."""
    return z.imag, z.real


def _interleaved(z: Tensor) -> Tensor:
    """[..., 3K] complex -> [..., 6K] real (cos, sin) pairs: the layout of the padded
    tables, in which a·t is a plain dot product."""
    return torch.view_as_real(z).flatten(-2)


def _from_interleaved(x: Tensor) -> Tensor:
    return torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())


class _Atoms(NamedTuple):
    """Per-atom inputs of the pair products, padded into the layout's slots [S, ...]."""

    phase: Tensor  # [N, 3K] complex e^{iθ} per atom and (axis, k) (unpadded)
    g_atom: Tensor  # [N, 9] gram of each atom's crystal (unpadded)
    a_ext: Tensor  # [S, H + 1, 6K]: u rotated per head, then the rotated ones
    table: Tensor  # [S, 6K]: (cos, sin) pairs
    u_g: Tensor  # [S, H]: u·g (the lattice block of the score)
    u_sum: Tensor  # [S, H]: Σ_m u_m
    q: Tensor  # [S, H, d]
    k: Tensor
    v: Tensor
    gram: Tensor  # [B, 9] in the layout's crystal order


def _atoms(q, k, v, u, frac, gram, batch, lay: DenseLayout, num_freqs: int) -> _Atoms:
    k3 = 3 * num_freqs
    phase = fourier_phases(frac, num_freqs, q.dtype)  # [N, 3K]
    # a_i (u rotated by atom i's table): a_i·t_j = u_i·φ(f_j − f_i); and as one more
    # "head" r_i, the rotated ones: r_i·t_j = Σ φ(f_j − f_i), for the LayerNorm mean.
    # In complex form, with t_j = e^{iθ_j} read as (cos, sin) pairs: a_i = ū_i e^{iθ_i}
    # where ū = u_cos + i u_sin, and r_i = (1 + i) e^{iθ_i}.
    a = _complex(u, k3) * phase.unsqueeze(1)  # [N, H, 3K]
    ones_rot = (phase * (1 + 1j)).unsqueeze(1)  # [N, 1, 3K]
    g_atom = gram.index_select(0, batch)  # [N, 9]
    u_g = (u[..., 2 * k3 :] * g_atom.unsqueeze(1)).sum(-1)  # [N, H]

    def pad(x):
        return x.index_select(0, lay.gather)

    return _Atoms(
        phase, g_atom,
        pad(_interleaved(torch.cat([a, ones_rot], dim=1))), pad(_interleaved(phase)),
        pad(u_g), pad(u.sum(-1)), pad(q), pad(k), pad(v),
        gram.index_select(0, lay.crystals),
    )  # fmt: skip


def _slots(x: Tensor, grp: DenseGroup) -> Tensor:
    """The group's slots of x [S, ...] as [B_g, width, ...] (a view)."""
    return x.narrow(0, grp.start, grp.count * grp.width).view(grp.count, grp.width, *x.shape[1:])


class _Pairs(NamedTuple):
    """One group's pair-level tables, [B_g, ...] with i, j < width."""

    mean: Tensor  # [B_g, i, j]: LayerNorm mean of x_ij
    rstd: Tensor  # its 1/√(var + eps)
    rstd_c: Tensor  # rstd_ij − rstd_ii: row-centred (see _group_grads)
    mean_rstd_c: Tensor  # μ_ij rstd_ij − μ_ii rstd_ii
    pre: Tensor  # [B_g, H, i, j]: u_i·(x_ij − μ_ij), the edge score before rstd
    alpha: Tensor  # [B_g, H, i, j] attention weights (0 for padding keys)
    lse: Tensor  # [B_g, H, i]


def _pairs(at: _Atoms, lay: DenseLayout, gi: int, num_freqs: int, eps: float) -> _Pairs:
    grp = lay.groups[gi]
    bg, w = grp.count, grp.width
    heads = at.q.shape[1]
    dim = 6 * num_freqs + 9
    a_ext, table = _slots(at.a_ext, grp), _slots(at.table, grp)
    prod = torch.bmm(a_ext.view(bg, w * (heads + 1), -1), table.transpose(1, 2))
    prod = prod.view(bg, w, heads + 1, w).transpose(1, 2)  # [B_g, H + 1, i, j]
    # The statistics in float64 (tables of [B_g, w, w]: cheap): Σx²/D − μ² loses digits
    # to cancellation when the lattice block dominates (large cells).
    g64 = at.gram.narrow(0, grp.first, bg).to(torch.float64)
    mean64 = (prod[:, heads].to(torch.float64) + g64.sum(-1).view(bg, 1, 1)) / dim
    sq_mean = ((3 * num_freqs + g64.square().sum(-1)) / dim).view(bg, 1, 1)  # Σx²/D
    rstd64 = torch.rsqrt(sq_mean - mean64.square() + eps)
    mr64 = mean64 * rstd64
    dt = at.q.dtype
    rstd_c = (rstd64 - rstd64.diagonal(dim1=1, dim2=2).unsqueeze(-1)).to(dt)
    mean_rstd_c = (mr64 - mr64.diagonal(dim1=1, dim2=2).unsqueeze(-1)).to(dt)
    rstd, mean = rstd64.to(dt), mean64.to(dt)
    u_sum = _slots(at.u_sum, grp).transpose(1, 2).unsqueeze(-1)  # [B_g, H, i, 1]
    u_g = _slots(at.u_g, grp).transpose(1, 2).unsqueeze(-1)
    pre = prod[:, :heads] - mean.unsqueeze(1) * u_sum + u_g
    qp, kp = (_slots(t, grp).transpose(1, 2) for t in (at.q, at.k))  # [B_g, H, w, d]
    scores = torch.matmul(qp, kp.transpose(-1, -2)) + pre * rstd.unsqueeze(1)
    # Padding keys get the lowest finite score, not -inf: the rows of an empty crystal
    # (all padding) then stay finite, and a NaN there would reach real gradients
    # through the products of the backward (0·NaN), though the rows are never read.
    valid = _slots(lay.valid, grp).view(bg, 1, 1, w)
    scores = scores.masked_fill(~valid, torch.finfo(dt).min)
    lse = torch.logsumexp(scores, dim=-1)  # [B_g, H, i]
    alpha = torch.exp(scores - lse.unsqueeze(-1))
    return _Pairs(mean, rstd, rstd_c, mean_rstd_c, pre, alpha, lse)


def _unpad(parts: list[Tensor], lay: DenseLayout) -> Tensor:
    """Per-group [B_g, width, ...] tensors -> [N, ...] (atom order)."""
    flat = [x.reshape(-1, *x.shape[2:]) for x in parts]
    return (flat[0] if len(flat) == 1 else torch.cat(flat)).index_select(0, lay.pos)


def _forward_all(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps):
    """(o, y, lse) and what the backward reuses (layout, padded atoms, per-group pairs,
    acc = Σ_j w_ij t_j and w_sum = Σ_j w_ij with w = α·rstd)."""
    heads = q.shape[1]
    lay = dense_layout(batch, ptr)
    at = _atoms(q, k, v, u, frac, gram, batch, lay, num_freqs)
    pairs, outs = [], []
    for gi, grp in enumerate(lay.groups):
        pr = _pairs(at, lay, gi, num_freqs, eps)
        pairs.append(pr)
        bg, w = grp.count, grp.width
        wgt = pr.alpha * pr.rstd.unsqueeze(1)  # [B_g, H, i, j]
        wgt_t = wgt.transpose(1, 2)  # [B_g, i, H, j]
        outs.append(
            (
                torch.matmul(pr.alpha, _slots(at.v, grp).transpose(1, 2)).transpose(1, 2),
                torch.bmm(wgt_t.reshape(bg, w * heads, w), _slots(at.table, grp)).view(
                    bg, w, heads, -1
                ),
                wgt_t.sum(-1),
                (wgt * pr.mean.unsqueeze(1)).sum(-1).transpose(1, 2),
                pr.lse.transpose(1, 2),
            )
        )
    o, acc, w_sum, w_mean, lse = (_unpad([x[i] for x in outs], lay) for i in range(5))
    # Σ_j w_ij φ(f_j − f_i) = acc rotated back by atom i's table: acc·e^{−iθ_i}.
    # (Conjugates here and in the backward are conj_physical: a lazy conj() view gave
    # wrong values when the op ran under torch.compile's AOT dispatcher, opcheck.)
    acc = _from_interleaved(acc)  # [N, H, 3K] complex
    y_sin, y_cos = _split(acc * at.phase.conj_physical().unsqueeze(1))
    y = torch.cat([y_sin, y_cos, w_sum.unsqueeze(-1) * at.g_atom.unsqueeze(1)], dim=-1)
    return o, y - w_mean.unsqueeze(-1), lse, (lay, at, pairs, acc, w_sum)


def _float(*ts: Tensor) -> tuple[torch.dtype, list[Tensor]]:
    """(the compute dtype, the tensors in it): float32 for 16-bit inputs."""
    dt = torch.float32 if ts[0].dtype in (torch.float16, torch.bfloat16) else ts[0].dtype
    return dt, [t.to(dt) for t in ts]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the op's lse: float32 for 16-bit inputs (as the Triton kernel)."""
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
    o, y, lse, _ = _forward_all(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)
    return o.to(out_dtype), y.to(out_dtype), lse.to(lse_dtype(out_dtype))


def dense_forward(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps):
    """The op's forward (no autograd recording)."""
    with torch.no_grad():
        return dense_core(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)


def dense_backward(grad_o, grad_y, q, k, v, u, frac, gram, batch, ptr, num_freqs, eps):
    """(dq, dk, dv, du, dfrac, dgram, y): the forward recomputed (nothing of it is
    kept), then the gradients by hand with the same batched products; the chain rule
    step by step is in the comments."""
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
    n, heads, _ = q.shape
    k3 = 3 * num_freqs
    _, y, _, (lay, at, pairs, acc, w_sum) = _forward_all(
        q, k, v, u, frac, gram, batch, ptr, num_freqs, eps
    )
    phase = at.phase.unsqueeze(1)  # [N, 1, 3K]

    # y = [rot⁻¹(acc), w_sum·g] − w_mean: gradients of acc, w_sum, w_mean, and of the
    # phases and g through the rotation and the lattice block. In complex form (ȳ =
    # y_cos + i y_sin): ȳ = acc·e^{−iθ}, so d acc = dȳ·e^{iθ} and dE += conj(dȳ)·acc
    # (dE = d cos + i d sin, E = e^{iθ}).
    d_ybar = _complex(grad_y, k3)  # [N, H, 3K]
    d_acc = _interleaved(d_ybar * phase)
    d_phase = (d_ybar.conj_physical() * acc).sum(1)  # [N, 3K]
    d_w_sum = (grad_y[..., 2 * k3 :] * at.g_atom.unsqueeze(1)).sum(-1)  # [N, H]
    d_w_mean = -grad_y.sum(-1)  # [N, H]
    d_g_atom = (w_sum.unsqueeze(-1) * grad_y[..., 2 * k3 :]).sum(1)  # [N, 9]

    def pad0(x):  # [N, ...] -> [S, ...], padding slots 0
        mask = lay.valid.view(-1, *([1] * (x.dim() - 1)))
        return x.index_select(0, lay.gather) * mask

    slots = (pad0(d_acc), pad0(d_w_sum), pad0(d_w_mean), pad0(grad_o))
    outs = [_group_grads(at, lay, gi, pr, *slots, num_freqs) for gi, pr in enumerate(pairs)]
    dq, dk, dv, d_a_ext, d_table, d_u_sum, d_u_g = (
        _unpad([x[i] for x in outs], lay) for i in range(7)
    )
    d_gram = torch.zeros_like(gram).index_copy(0, lay.crystals, torch.cat([x[7] for x in outs]))
    d_a = _from_interleaved(d_a_ext[:, :heads])  # [N, H, 3K] complex
    d_r = _from_interleaved(d_a_ext[:, heads])  # [N, 3K]

    # a = ū·E: dū = da·conj(E) (+ the Σu and u·g parts), dE += conj(ū)·da;
    # r = (1 + i)·E: dE += (1 − i)·dr; t = E: dE += dt
    d_ubar = d_a * phase.conj_physical()
    du = torch.cat(
        [
            d_ubar.imag + d_u_sum.unsqueeze(-1),
            d_ubar.real + d_u_sum.unsqueeze(-1),
            d_u_sum.unsqueeze(-1) + d_u_g.unsqueeze(-1) * at.g_atom.unsqueeze(1),
        ],
        dim=-1,
    )
    d_phase = (
        d_phase
        + (_complex(u, k3).conj_physical() * d_a).sum(1)
        + d_r * (1 - 1j)
        + _from_interleaved(d_table)
    )
    d_g_atom = d_g_atom + (d_u_g.unsqueeze(-1) * u[..., 2 * k3 :]).sum(1)
    d_gram = d_gram.index_add(0, batch, d_g_atom)
    # E = e^{iθ}, θ = 2πk f: dθ = Im(dE·conj(E)), df = Σ_k 2πk dθ
    k2pi = (2.0 * math.pi) * torch.arange(num_freqs, device=q.device, dtype=q.dtype)
    d_theta = (d_phase * at.phase.conj_physical()).imag.view(n, 3, num_freqs)
    d_frac = (d_theta * k2pi).sum(-1)
    return dq, dk, dv, du, d_frac, d_gram, y


def _group_grads(at, lay, gi, pr, d_acc_s, d_w_sum_s, d_w_mean_s, d_o_s, num_freqs):
    """One group's gradients: (dq, dk, dv [B_g, w, H, d], d a_ext [B_g, w, H + 1, 6K],
    d table [B_g, w, 6K], d u_sum, d u_g [B_g, w, H], d gram [B_g, 9])."""
    grp = lay.groups[gi]
    bg, w = grp.count, grp.width
    heads = at.q.shape[1]
    dim = 6 * num_freqs + 9
    alpha, rstd, mean = pr.alpha, pr.rstd, pr.mean
    table = _slots(at.table, grp)
    qp, kp, vp = (_slots(t, grp).transpose(1, 2) for t in (at.q, at.k, at.v))

    # acc_i = Σ_j W_ij t_j, w_sum_i = Σ_j W_ij, w_mean_i = Σ_j W_ij μ_ij; W = α·rstd.
    # dW_ij = d_acc_i·t_j + d_w_sum_i + d_w_mean_i μ_ij; through W = α·rstd that gives
    # dα_ij = dW_ij rstd_ij. The last two terms are nearly constant over j and large for
    # large cells (the lattice block of x is unnormalised), and the softmax backward
    # cancels anything constant over j: they enter dα row-centred (rstd_ij − rstd_ii,
    # μ_ij rstd_ij − μ_ii rstd_ii, taken in float64), which keeps ds accurate in float32.
    d_acc_p = _slots(d_acc_s, grp)  # [B_g, i, H, 6K]
    d_wt = torch.bmm(d_acc_p.reshape(bg, w * heads, -1), table.transpose(1, 2))
    d_wt = d_wt.view(bg, w, heads, w).transpose(1, 2)  # [B_g, H, i, j]: d_acc_i·t_j
    d_w_sum_p = _slots(d_w_sum_s, grp).transpose(1, 2).unsqueeze(-1)  # [B_g, H, i, 1]
    d_w_mean_p = _slots(d_w_mean_s, grp).transpose(1, 2).unsqueeze(-1)
    wgt = alpha * rstd.unsqueeze(1)
    d_op = _slots(d_o_s, grp).transpose(1, 2)  # [B_g, H, i, d]
    # o = α·v: dα += do·v_j, dv = αᵀ do; then the softmax: ds = α (dα − Σ_j α dα)
    d_alpha = (
        d_wt * rstd.unsqueeze(1)
        + d_w_sum_p * pr.rstd_c.unsqueeze(1)
        + d_w_mean_p * pr.mean_rstd_c.unsqueeze(1)
        + torch.matmul(d_op, vp.transpose(-1, -2))
    )
    d_s = alpha * (d_alpha - (alpha * d_alpha).sum(-1, keepdim=True))
    dv = torch.matmul(alpha.transpose(-1, -2), d_op).transpose(1, 2)
    # s = q·k + pre·rstd
    dq = torch.matmul(d_s, kp).transpose(1, 2)
    dk = torch.matmul(d_s.transpose(-1, -2), qp).transpose(1, 2)
    e = d_s * rstd.unsqueeze(1)  # d pre
    d_w = d_wt + d_w_sum_p + d_w_mean_p * mean.unsqueeze(1)
    d_rstd = (d_w * alpha + d_s * pr.pre).sum(1)  # [B_g, i, j]
    # pre = a·t − μ·u_sum + u_g; rstd = (Σx²/D − μ² + eps)^(−1/2); μ = (r·t + Σg)/D
    rstd3 = rstd * rstd.square()
    u_sum = _slots(at.u_sum, grp).transpose(1, 2).unsqueeze(-1)
    d_mean = (wgt * d_w_mean_p).sum(1) - (e * u_sum).sum(1) + d_rstd * rstd3 * mean
    # Σ_j e_ij μ_ij and Σ_j e_ij, row-centred as above (Σ_j ds_ij = 0)
    d_u_sum = -(d_s * pr.mean_rstd_c.unsqueeze(1)).sum(-1).transpose(1, 2)  # [B_g, w, H]
    d_u_g = (d_s * pr.rstd_c.unsqueeze(1)).sum(-1).transpose(1, 2)
    d_sq = -0.5 * (d_rstd * rstd3).sum((1, 2))  # [B_g]: d(Σx²/D)
    gram = at.gram.narrow(0, grp.first, bg)
    d_gram = (d_mean.sum((1, 2)) / dim).unsqueeze(-1) + d_sq.unsqueeze(-1) * (2.0 / dim) * gram

    # the products with t: [e (H heads) | dμ/D] against a_ext, and W against d_acc
    e_ext = torch.cat([e, (d_mean / dim).unsqueeze(1)], dim=1).transpose(1, 2)  # [B_g, i, H+1, j]
    e_ext = e_ext.reshape(bg, w * (heads + 1), w)
    d_a_ext = torch.bmm(e_ext, table).view(bg, w, heads + 1, -1)
    a_ext = _slots(at.a_ext, grp)
    d_table = torch.baddbmm(
        torch.bmm(e_ext.transpose(1, 2), a_ext.reshape(bg, w * (heads + 1), -1)),
        wgt.transpose(1, 2).reshape(bg, w * heads, w).transpose(1, 2),
        d_acc_p.reshape(bg, w * heads, -1),
    )  # [B_g, j, 6K]
    return dq, dk, dv, d_a_ext, d_table, d_u_sum, d_u_g, d_gram
