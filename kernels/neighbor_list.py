"""Triton kernels of ``dao::neighbor_list`` (the ``backend="triton"`` path).

Same contract as the C++ core (``csrc/neighbor_list.hpp``) and the reference
twin (``dao.reference.neighbor_list``): every ordered pair (i, j) of a system
and integer image shift S with ``|r_j - r_i + S . L| < cutoff``.

Design:

1. A small torch pre-pass per batch (float64, any device): fractional
   coordinates, wrapping into [0, 1) along periodic axes with the integer
   offsets kept, and, per system, the list of image shifts S that can hold a
   neighbour. A shift is kept when a lower bound of ``|(t + S) . L|`` over all
   fractional differences t of two wrapped atoms is below the cutoff; the bound
   uses the triangular frame of the cell (a along x, b in the xy plane), so it
   stays tight for strongly skewed cells and for cutoffs spanning many cells.
   Large systems are also sorted along a Morton curve of small fractional bins
   so that a tile of consecutive atoms is compact in space.
2. ``_neighbor_list_pairs_kernel`` runs over (i-tile, j-tile) blocks of one
   system and loops over the system's shifts; a block/shift combination whose
   tile bounding boxes lie farther apart than the cutoff is skipped, which
   makes big systems close to linear in cost. With ``FILL=False`` it counts the
   hits of every row i; torch.cumsum turns the counts into row offsets; with
   ``FILL=True`` the same code writes the pairs, each row's write position
   taken from an atomic cursor. Output rows are therefore grouped by i, the
   order inside a row is unspecified.
3. The fill pass never writes past a row's end, and its cursors must match the
   counts; otherwise (the two compiled kernels disagreeing on a pair at the
   cutoff) the rows are re-sized from the fill pass's own counts and filled
   again, so nothing is silently dropped.

The decision ``d^2 < cutoff^2`` is taken in the input dtype (float64 for
float64 input; float32 for float32 input, where pairs within ~1e-6 relative of
the cutoff may differ from the float64 reference).

Launch choice: plain ``kernel[grid](...)`` launches inside the existing
``dao::neighbor_list`` custom op (which already has a fake impl with a dynamic
output size). ``torch.library.triton_op`` + ``wrap_triton`` would only help
torch.compile trace *into* the op, but the output size here is data dependent
(count, host sync, allocate, fill), which a traced triton_op cannot express
without unbacked sizes; the op stays opaque to torch.compile instead, and the
launches also work unchanged under ``TRITON_INTERPRET=1``.

Note: ``triton.jit`` decides at decoration time (import of this module) whether
kernels run in the CPU interpreter: set ``TRITON_INTERPRET=1`` before the first
import when using CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dao._types import empty_neighbor_outputs
from dao.reference.neighbor_list import wrap_into_cells

__all__ = ["neighbor_list_forward"]

_BLOCK_I = 32
_BLOCK_J = 32
# Columns per block on a GPU: [32, 32] tiles with 8 warps keep the fill kernel
# at ~164 registers without spills for float64 (sm_90, ptxas); [32, 64] spills.
# Not tuned on hardware yet.
_BLOCK_C = 32
_NUM_WARPS = 8
_INT16_MAX = 32767
# Relative slack of the conservative shift/box pruning: candidates within it
# are decided by the exact per-pair test, so rounding never drops a pair.
_PRUNE_PAD = 1e-4
# Candidate (system, shift) combinations tested at once in the pre-pass.
_PRUNE_CHUNK = 4_000_000
# Cell-list-like binning used only to order atoms (Morton curve): bin side in
# units of the cutoff, and the most bins per axis (10 bits per axis).
_BIN_SIDE = 0.5
_MAX_BINS = 1023


@triton.jit
def _neighbor_list_pairs_kernel(
    xw_ptr,  # [3, N] wrapped cartesian positions (sorted order), compute dtype
    off_ptr,  # [3, N] int32 integer offsets of the wrapping (sorted order)
    orig_ptr,  # [N] int32 index in the caller's positions of sorted atom k
    atom_ptr_ptr,  # [B + 1] int64 first atom of each system
    tile_sys_ptr,  # [T] int64 system of each i-tile
    tile_start_ptr,  # [T] int64 first atom of each i-tile
    shift_ptr_ptr,  # [B + 1] int64 first candidate shift of each system
    shift_int_ptr,  # [K, 3] int32 candidate shifts S
    shift_cart_ptr,  # [K, 3] S . L in the compute dtype
    cut2_ptr,  # [1] cutoff^2 in the compute dtype
    count_ptr,  # [N] int32 hits per row (count pass) or write cursor (fill pass)
    row_off_ptr,  # [N + 1] int64 output offset of each row (fill pass only)
    out_i_ptr,  # [P] int32
    out_j_ptr,  # [P] int32
    out_s_ptr,  # [P, 3] int16
    out_d_ptr,  # [P] compute dtype (WANT_D)
    out_v_ptr,  # [P, 3] compute dtype (WANT_V)
    n_atoms,
    FILL: tl.constexpr,
    SELF_INTERACTION: tl.constexpr,
    WANT_D: tl.constexpr,
    WANT_V: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Program (i-tile, j-tile): rows are BLOCK_I atoms of one system; columns
    # enumerate (shift k, atom j) for the BLOCK_J atoms of the j-tile and every
    # candidate shift of the system, shift-major, BLOCK_C at a time.
    tile = tl.program_id(0)
    sys = tl.load(tile_sys_ptr + tile)
    i0 = tl.load(tile_start_ptr + tile)
    begin = tl.load(atom_ptr_ptr + sys)
    end = tl.load(atom_ptr_ptr + sys + 1)
    j0 = begin + tl.program_id(1).to(tl.int64) * BLOCK_J
    if j0 < end:
        nj = tl.minimum(end - j0, BLOCK_J)
        k_lo = tl.load(shift_ptr_ptr + sys)
        n_cols = nj * (tl.load(shift_ptr_ptr + sys + 1) - k_lo)
        ri = i0 + tl.arange(0, BLOCK_I).to(tl.int64)
        mi = ri < end
        xi0 = tl.load(xw_ptr + ri, mask=mi, other=0.0)
        xi1 = tl.load(xw_ptr + n_atoms + ri, mask=mi, other=0.0)
        xi2 = tl.load(xw_ptr + 2 * n_atoms + ri, mask=mi, other=0.0)
        cut2 = tl.load(cut2_ptr)
        # Bounding box of the i-tile: column blocks with no image point near it
        # are skipped (most of them in big, Morton-sorted systems).
        inf = float("inf")
        lo0 = tl.min(tl.where(mi, xi0, inf), axis=0)
        lo1 = tl.min(tl.where(mi, xi1, inf), axis=0)
        lo2 = tl.min(tl.where(mi, xi2, inf), axis=0)
        hi0 = tl.max(tl.where(mi, xi0, -inf), axis=0)
        hi1 = tl.max(tl.where(mi, xi1, -inf), axis=0)
        hi2 = tl.max(tl.where(mi, xi2, -inf), axis=0)
        if FILL:
            oi = tl.load(orig_ptr + ri, mask=mi, other=0)
            fi0 = tl.load(off_ptr + ri, mask=mi, other=0)
            fi1 = tl.load(off_ptr + n_atoms + ri, mask=mi, other=0)
            fi2 = tl.load(off_ptr + 2 * n_atoms + ri, mask=mi, other=0)
            row_begin = tl.load(row_off_ptr + ri, mask=mi, other=0)
            row_end = tl.load(row_off_ptr + ri + 1, mask=mi, other=0)
        acc = tl.zeros([BLOCK_I], dtype=tl.int32)
        for c0 in range(0, n_cols, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mc = cc < n_cols
            kk = k_lo + cc // nj
            rj = j0 + cc % nj
            xj0 = tl.load(xw_ptr + rj, mask=mc, other=0.0)
            xj1 = tl.load(xw_ptr + n_atoms + rj, mask=mc, other=0.0)
            xj2 = tl.load(xw_ptr + 2 * n_atoms + rj, mask=mc, other=0.0)
            sc0 = tl.load(shift_cart_ptr + 3 * kk, mask=mc, other=0.0)
            sc1 = tl.load(shift_cart_ptr + 3 * kk + 1, mask=mc, other=0.0)
            sc2 = tl.load(shift_cart_ptr + 3 * kk + 2, mask=mc, other=0.0)
            p0 = xj0 + sc0
            p1 = xj1 + sc1
            p2 = xj2 + sc2
            g0 = tl.maximum(tl.maximum(p0 - hi0, lo0 - p0), 0.0)
            g1 = tl.maximum(tl.maximum(p1 - hi1, lo1 - p1), 0.0)
            g2 = tl.maximum(tl.maximum(p2 - hi2, lo2 - p2), 0.0)
            # The slack keeps a column whose rounded gap exceeds a rounded distance.
            near = mc & (g0 * g0 + g1 * g1 + g2 * g2 < cut2 * 1.0001)
            if tl.max(near.to(tl.int32), axis=0) > 0:
                # Same operation order as the C++ core: (x_j - x_i) + S . L.
                d0 = (xj0[None, :] - xi0[:, None]) + sc0[None, :]
                d1 = (xj1[None, :] - xi1[:, None]) + sc1[None, :]
                d2 = (xj2[None, :] - xi2[:, None]) + sc2[None, :]
                dd = d0 * d0 + d1 * d1 + d2 * d2
                hit = mi[:, None] & mc[None, :] & (dd < cut2)
                if FILL or not SELF_INTERACTION:
                    s0 = tl.load(shift_int_ptr + 3 * kk, mask=mc, other=0)
                    s1 = tl.load(shift_int_ptr + 3 * kk + 1, mask=mc, other=0)
                    s2 = tl.load(shift_int_ptr + 3 * kk + 2, mask=mc, other=0)
                if not SELF_INTERACTION:
                    # i == j with S = 0 is not a pair. Integer test: combining a
                    # scalar bool with a block bool mis-types masks in the
                    # Triton 3.9 interpreter.
                    shift_norm = tl.abs(s0) + tl.abs(s1) + tl.abs(s2)
                    hit = hit & ((tl.abs(ri[:, None] - rj[None, :]) + shift_norm[None, :]) != 0)
                hits = hit.to(tl.int32)
                row_hits = tl.sum(hits, axis=1)
                if FILL:
                    base = tl.atomic_add(count_ptr + ri, row_hits, mask=mi & (row_hits > 0))
                    rank = tl.cumsum(hits, axis=1) - 1
                    pos = row_begin[:, None] + (base[:, None] + rank).to(tl.int64)
                    ok = hit & (pos < row_end[:, None])
                    oj = tl.load(orig_ptr + rj, mask=mc, other=0)
                    fj0 = tl.load(off_ptr + rj, mask=mc, other=0)
                    fj1 = tl.load(off_ptr + n_atoms + rj, mask=mc, other=0)
                    fj2 = tl.load(off_ptr + 2 * n_atoms + rj, mask=mc, other=0)
                    tl.store(out_i_ptr + pos, oi[:, None] + 0 * rank, mask=ok)
                    tl.store(out_j_ptr + pos, oj[None, :] + 0 * rank, mask=ok)
                    # Shift relative to the positions as given.
                    t0 = (s0[None, :] - fj0[None, :] + fi0[:, None]).to(tl.int16)
                    t1 = (s1[None, :] - fj1[None, :] + fi1[:, None]).to(tl.int16)
                    t2 = (s2[None, :] - fj2[None, :] + fi2[:, None]).to(tl.int16)
                    tl.store(out_s_ptr + 3 * pos, t0, mask=ok)
                    tl.store(out_s_ptr + 3 * pos + 1, t1, mask=ok)
                    tl.store(out_s_ptr + 3 * pos + 2, t2, mask=ok)
                    if WANT_D:
                        # tl.sqrt is approximate for float32; sqrt_rn is float32 only.
                        if dd.dtype == tl.float32:
                            tl.store(out_d_ptr + pos, tl.sqrt_rn(dd), mask=ok)
                        else:
                            tl.store(out_d_ptr + pos, tl.sqrt(dd), mask=ok)
                    if WANT_V:
                        tl.store(out_v_ptr + 3 * pos, d0, mask=ok)
                        tl.store(out_v_ptr + 3 * pos + 1, d1, mask=ok)
                        tl.store(out_v_ptr + 3 * pos + 2, d2, mask=ok)
                else:
                    acc += row_hits
        if not FILL:
            tl.atomic_add(count_ptr + ri, acc, mask=mi & (acc > 0))


def _segment_minmax(values: torch.Tensor, system: torch.Tensor, n_systems: int):
    """Per-system min and max of [N, 3] values; 0 for empty systems. Both [B, 3]."""
    idx = system[:, None].expand_as(values)
    lo = torch.zeros(n_systems, 3, dtype=values.dtype, device=values.device)
    hi = torch.zeros_like(lo)
    lo = lo.scatter_reduce(0, idx, values, "amin", include_self=False)
    hi = hi.scatter_reduce(0, idx, values, "amax", include_self=False)
    return lo, hi


def _triangular_frame(L: torch.Tensor) -> torch.Tensor:
    """[B, 6] (ax, bx, cx, by, cy, cz): the cell rows in a frame with a along x, b in xy."""
    a, b, c = L[:, 0], L[:, 1], L[:, 2]
    e1 = a / a.norm(dim=1, keepdim=True)
    axb = torch.linalg.cross(a, b)
    n = axb / axb.norm(dim=1, keepdim=True)
    e2 = torch.linalg.cross(n, e1)

    def dot(u, v):
        return (u * v).sum(dim=1)

    return torch.stack(
        [a.norm(dim=1), dot(b, e1), dot(c, e1), dot(b, e2), dot(c, e2), dot(c, n)], 1
    )


def _candidate_shifts(L, frame, span, reach, active, cutoff):
    """Image shifts that can hold a neighbour, per system.

    Args:
        L: [B, 3, 3] float64 cells.
        frame: [B, 6] triangular frame of the cells.
        span: [B, 3] bound on |t_a| for the fractional difference t of two atoms.
        reach: [B, 3] int64 largest |S_a| worth looking at (0 on open axes).
        active: [B] bool, systems with atoms.
        cutoff: the cutoff radius.

    Returns:
        (shift_ptr [B + 1] int64, shifts [K, 3] int64, shift_cart [K, 3] float64,
        system of each shift [K] int64).
    """
    dev = L.device
    n_systems = L.shape[0]
    rmax = [int(r) for r in reach.amax(dim=0).tolist()] if n_systems else [0, 0, 0]
    box = torch.cartesian_prod(*[torch.arange(-r, r + 1, device=dev) for r in rmax]).reshape(-1, 3)
    sf = box.to(torch.float64)
    ax, bx, cx, by, cy, cz = frame.unbind(1)
    r2 = (cutoff * (1.0 + _PRUNE_PAD)) ** 2
    rows = max(1, _PRUNE_CHUNK // box.shape[0])
    systems, picks = [], []
    for start in range(0, n_systems, rows):
        sl = slice(start, min(n_systems, start + rows))
        t = span[sl]

        def gap(center, half):
            return torch.clamp(center.abs() - half * (1.0 + 1e-9), min=0.0)

        gz = gap(sf[None, :, 2] * cz[sl, None], (t[:, 2] * cz[sl].abs())[:, None])
        gy = gap(
            sf[None, :, 1] * by[sl, None] + sf[None, :, 2] * cy[sl, None],
            (t[:, 1] * by[sl].abs() + t[:, 2] * cy[sl].abs())[:, None],
        )
        gx = gap(
            sf[None, :, 0] * ax[sl, None]
            + sf[None, :, 1] * bx[sl, None]
            + sf[None, :, 2] * cx[sl, None],
            (t[:, 0] * ax[sl].abs() + t[:, 1] * bx[sl].abs() + t[:, 2] * cx[sl].abs())[:, None],
        )
        keep = (gx * gx + gy * gy + gz * gz) < r2
        keep &= (box.abs()[None, :, :] <= reach[sl, None, :]).all(dim=2)
        keep &= active[sl, None]
        s, k = torch.nonzero(keep, as_tuple=True)
        systems.append(s + start)
        picks.append(k)
    if systems:
        sys_k = torch.cat(systems)
        shifts = box[torch.cat(picks)]
    else:
        sys_k = torch.zeros(0, dtype=torch.int64, device=dev)
        shifts = torch.zeros(0, 3, dtype=torch.int64, device=dev)
    shift_ptr = torch.zeros(n_systems + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(sys_k, minlength=n_systems), 0, out=shift_ptr[1:])
    cart = torch.bmm(shifts.to(torch.float64).unsqueeze(1), L[sys_k]).squeeze(1)
    return shift_ptr, shifts, cart, sys_k


def _spread_bits(v: torch.Tensor) -> torch.Tensor:
    """Interleave two zero bits after each of the 10 low bits (3D Morton code)."""
    v = (v | (v << 16)) & 0x030000FF
    v = (v | (v << 8)) & 0x0300F00F
    v = (v | (v << 4)) & 0x030C30C3
    return (v | (v << 2)) & 0x09249249


def _morton_order(frac, fmin, fspan, heights, system, cutoff):
    """Permutation sorting atoms by system, then along a Morton curve of fractional bins."""
    extent = fspan * heights  # [B, 3]
    nbin = torch.clamp(torch.floor(extent / (_BIN_SIDE * cutoff)), 1, _MAX_BINS)
    nb = nbin[system]
    width = fspan[system] / nb
    q = torch.floor((frac - fmin[system]) / torch.clamp(width, min=1e-300))
    q = torch.minimum(torch.clamp(q, min=0), nb - 1).to(torch.int64)
    code = (_spread_bits(q[:, 0]) << 2) | (_spread_bits(q[:, 1]) << 1) | _spread_bits(q[:, 2])
    return torch.argsort((system << 32) | code)


def neighbor_list_forward(
    positions: torch.Tensor,
    cell: torch.Tensor,
    ptr: torch.Tensor,
    pbc: torch.Tensor,
    cutoff: float,
    self_interaction: bool,
    want_distances: bool,
    want_vectors: bool,
):
    """Periodic neighbour list of a batch of systems with the Triton kernels.

    Args:
        positions: [N, 3] float32/float64 contiguous cartesian positions.
        cell: [B, 3, 3] same dtype, row vectors.
        ptr: [B + 1] int64, system s owns atoms ptr[s]..ptr[s + 1].
        pbc: [B, 3] bool per-axis periodicity.
        cutoff: radius (> 0).
        self_interaction: include (i, i, S = 0) pairs.
        want_distances: compute distances.
        want_vectors: compute vectors.

    Returns:
        (i int32 [P], j int32 [P], shifts int16 [P, 3], distances [P] or [0],
        vectors [P, 3] or [0, 3]); pairs grouped by i.

    Raises:
        ValueError: when an image shift would not fit in int16.
    """
    dev, dtype = positions.device, positions.dtype
    n_atoms, n_systems = positions.shape[0], cell.shape[0]
    if n_atoms == 0 or n_systems == 0:
        return empty_neighbor_outputs(positions, 0, want_distances, want_vectors)
    cutoff = float(cutoff)
    ptr = ptr.to(device=dev, dtype=torch.int64).contiguous()
    pbc = pbc.to(device=dev, dtype=torch.bool)
    num = ptr[1:] - ptr[:-1]
    system = torch.repeat_interleave(torch.arange(n_systems, device=dev), num, output_size=n_atoms)

    # Pre-pass in float64 whatever the input dtype.
    L, frac, off, xw = wrap_into_cells(positions, cell, system, pbc)

    vol = torch.linalg.det(L).abs()
    a, b, c = L[:, 0], L[:, 1], L[:, 2]
    cross = torch.stack(
        [torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)], 1
    )
    heights = vol[:, None] / cross.norm(dim=2)  # [B, 3]
    fmin, fmax = _segment_minmax(frac, system, n_systems)
    fspan = torch.where(pbc, torch.ones_like(fmin), fmax - fmin)
    fmin = torch.where(pbc, torch.zeros_like(fmin), fmin)
    reach = torch.where(pbc, torch.ceil(cutoff / heights) + 1, torch.zeros_like(heights))
    reach = reach.to(torch.int64)
    active = num > 0
    shift_ptr, shifts, shift_cart, shift_sys = _candidate_shifts(
        L, _triangular_frame(L), fspan, reach, active, cutoff
    )
    # Reported shift = S - off_j + off_i must fit in int16.
    olo, ohi = _segment_minmax(off, system, n_systems)
    smax = torch.zeros(n_systems, 3, dtype=torch.int64, device=dev)
    if shifts.shape[0]:
        smax = smax.scatter_reduce(
            0, shift_sys[:, None].expand(-1, 3), shifts.abs(), "amax", include_self=True
        )
    if bool(((ohi - olo).to(torch.int64) + smax > _INT16_MAX).any()):
        raise ValueError(
            "an image shift does not fit in int16: atoms lie too many cells apart; wrap "
            "positions into the cell first"
        )

    if int(num.max()) > _BLOCK_J:
        order = _morton_order(frac, fmin, fspan, heights, system, cutoff)
    else:
        order = torch.arange(n_atoms, device=dev)
    xw_s = xw[order].to(dtype).t().contiguous()  # [3, N]
    off_s = off[order].to(torch.int32).t().contiguous()  # [3, N]
    orig = order.to(torch.int32)

    tiles_per_sys = (num + _BLOCK_I - 1) // _BLOCK_I
    n_tiles = int(tiles_per_sys.sum())
    tile_sys = torch.repeat_interleave(
        torch.arange(n_systems, device=dev), tiles_per_sys, output_size=n_tiles
    )
    tile_first = torch.cumsum(tiles_per_sys, 0) - tiles_per_sys
    tile_start = ptr[tile_sys] + _BLOCK_I * (
        torch.arange(n_tiles, device=dev) - tile_first[tile_sys]
    )
    max_j_tiles = int(((num + _BLOCK_J - 1) // _BLOCK_J).max())
    if max_j_tiles > 65535:
        raise ValueError(
            f"a system has more than {65535 * _BLOCK_J} atoms, beyond the Triton launch grid"
        )
    grid = (n_tiles, max_j_tiles)
    cut2 = torch.tensor([cutoff * cutoff], dtype=dtype, device=dev)
    shift_int = shifts.to(torch.int32).contiguous()
    shift_cart = shift_cart.to(dtype).contiguous()

    # The CPU interpreter's cost is per block operation: wide column blocks.
    block_c, num_warps = (512, 4) if dev.type == "cpu" else (_BLOCK_C, _NUM_WARPS)

    def launch(fill, count, row_off, out):
        i, j, s, d, v = out
        _neighbor_list_pairs_kernel[grid](
            xw_s,
            off_s,
            orig,
            ptr,
            tile_sys,
            tile_start,
            shift_ptr,
            shift_int,
            shift_cart,
            cut2,
            count,
            row_off,
            i,
            j,
            s,
            d,
            v,
            n_atoms,
            FILL=fill,
            SELF_INTERACTION=bool(self_interaction),
            WANT_D=bool(want_distances) and fill,
            WANT_V=bool(want_vectors) and fill,
            BLOCK_I=_BLOCK_I,
            BLOCK_J=_BLOCK_J,
            BLOCK_C=block_c,
            num_warps=num_warps,
            # No FMA contraction: the count and fill kernels then round every
            # distance identically (and like the C++ core), and passing the
            # option explicitly keeps Triton 3.9's default-change warning away.
            enable_fp_fusion=False,
        )

    counts = torch.zeros(n_atoms, dtype=torch.int32, device=dev)
    row_off = torch.zeros(n_atoms + 1, dtype=torch.int64, device=dev)
    launch(False, counts, row_off, empty_neighbor_outputs(positions, 0, False, False))
    for _attempt in range(3):
        torch.cumsum(counts, 0, out=row_off[1:])
        n_pairs = int(row_off[-1])
        out = empty_neighbor_outputs(positions, n_pairs, want_distances, want_vectors)
        cursor = torch.zeros(n_atoms, dtype=torch.int32, device=dev)
        if n_pairs:
            launch(True, cursor, row_off, out)
        if torch.equal(cursor, counts):
            return out
        # The fill pass disagreed with the count pass on some pair (a rounding
        # difference at the cutoff between the two compiled kernels): size the
        # rows by the fill pass's own decisions, which are deterministic.
        counts = cursor
    raise RuntimeError("dao.kernels.neighbor_list: count and fill passes do not agree")
