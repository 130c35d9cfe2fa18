"""Glue between ``dao::neighbor_list`` (backend="cuda") and the CUDA kernels.

The compiled kernels (``csrc/cuda/neighbor_list.cu``) are torch-free: this
module validates nothing (the op did), allocates every buffer with torch (so
the caching allocator and the current stream are used), runs a small float64
pre-pass and hands the kernels device pointers as integers.

Pre-pass, per batch: fractional coordinates, wrapping into [0, 1) along
periodic axes (the integer offsets are kept so shifts refer to the positions
as given), the triangular frame of every cell, and the strategy of every
system: systems of at least 64 atoms whose cell-list grid has 27 bins or more
get a cell list (bins at least one cutoff high, same rule as the CPU core),
the others per-pair image enumeration. Atoms are then sorted by (system, bin)
so that every bin is a contiguous range.

Passes: count (pairs per atom) -> torch.cumsum row offsets -> fill. The fill
pass never writes past a row's end and reports how many pairs it found; if
that disagrees with the count (a pair at the cutoff rounded differently by the
two compiled kernels) the rows are re-sized from the fill pass and filled
again, so nothing is silently dropped.
"""

from __future__ import annotations

import torch

from dao._ext import load_core
from dao._types import empty_neighbor_outputs
from dao.reference.neighbor_list import wrap_into_cells

__all__ = ["neighbor_list_cuda"]

_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}
# Same strategy thresholds as the CPU core (csrc/neighbor_list.cpp).
_CELL_LIST_MIN_ATOMS = 64
_CELL_LIST_MIN_BINS = 27
_PAD = 1e-9


def _segment_minmax(values: torch.Tensor, system: torch.Tensor, n_systems: int):
    """Per-system min and max of [N, 3] values; 0 for empty systems. Both [B, 3]."""
    idx = system[:, None].expand_as(values)
    zeros = torch.zeros(n_systems, 3, dtype=values.dtype, device=values.device)
    lo = zeros.scatter_reduce(0, idx, values, "amin", include_self=False)
    hi = zeros.scatter_reduce(0, idx, values, "amax", include_self=False)
    return lo, hi


def _prepare(positions, cell, ptr, pbc, cutoff):
    """Sorted per-atom buffers and per-system parameters (layout in neighbor_list.cu)."""
    dev, dtype = positions.device, positions.dtype
    n_atoms, n_systems = positions.shape[0], cell.shape[0]
    num = ptr[1:] - ptr[:-1]
    system = torch.repeat_interleave(torch.arange(n_systems, device=dev), num, output_size=n_atoms)

    L, frac, off, xw = wrap_into_cells(positions, cell, system, pbc)

    # Plane spacings and the triangular frame (a along x, b in the xy plane).
    a, b, c = L[:, 0], L[:, 1], L[:, 2]
    bxc, cxa, axb = torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)
    vol = (a * bxc).sum(dim=1).abs()
    heights = vol[:, None] / torch.stack([bxc, cxa, axb], 1).norm(dim=2)  # [B, 3]
    e1 = a / a.norm(dim=1, keepdim=True)
    n = axb / axb.norm(dim=1, keepdim=True)
    e2 = torch.linalg.cross(n, e1)
    frame = torch.stack(
        [
            a.norm(dim=1),
            (b * e1).sum(1),
            (c * e1).sum(1),
            (b * e2).sum(1),
            (c * e2).sum(1),
            (c * n).sum(1),
        ],
        1,
    )

    # Cell-list grid, as in the CPU core: bins at least one cutoff high along
    # every plane normal, at most ~4 bins per atom, open axes span the atoms.
    fmin, fmax = _segment_minmax(frac, system, n_systems)
    fspan = torch.where(pbc, torch.ones_like(fmin), torch.clamp(fmax - fmin, min=1e-12))
    fmin = torch.where(pbc, torch.zeros_like(fmin), fmin)
    nbin = torch.clamp(torch.floor(fspan * heights / cutoff), min=1.0)
    max_bins = 4.0 * num.to(torch.float64) + 27.0
    total = nbin.prod(dim=1)
    shrink = torch.pow(max_bins / total, 1.0 / 3.0)
    nbin = torch.where(
        (total > max_bins)[:, None], torch.clamp(torch.floor(nbin * shrink[:, None]), min=1.0), nbin
    )
    use_cells = (num >= _CELL_LIST_MIN_ATOMS) & (nbin.prod(dim=1) >= _CELL_LIST_MIN_BINS)
    nbin = torch.where(use_cells[:, None], nbin, torch.ones_like(nbin))
    fwidth = fspan / nbin
    reach = torch.where(
        use_cells[:, None],
        torch.ceil(cutoff / (fwidth * heights) * (1.0 + _PAD)),
        torch.zeros_like(nbin),
    )
    # Open axes: nothing lies beyond the grid. Atoms in one plane give a
    # near-zero bin width there and would otherwise give an enormous reach.
    reach = torch.where(pbc, reach, torch.minimum(reach, nbin - 1.0))
    nbin_i = nbin.to(torch.int64)
    q = torch.floor((frac - fmin[system]) / fwidth[system])
    q = torch.minimum(torch.clamp(q, min=0.0), nbin[system] - 1.0).to(torch.int64)
    nb_sys = nbin_i[system]
    local_bin = (q[:, 0] * nb_sys[:, 1] + q[:, 1]) * nb_sys[:, 2] + q[:, 2]
    bins_per_sys = nbin_i.prod(dim=1)
    first_bin = torch.cumsum(bins_per_sys, 0) - bins_per_sys
    total_bins = int(bins_per_sys.sum())
    global_bin = first_bin[system] + local_bin
    order = torch.argsort(global_bin, stable=True)
    bin_start = torch.zeros(total_bins + 1, dtype=torch.int64, device=dev)
    torch.cumsum(torch.bincount(global_bin, minlength=total_bins), 0, out=bin_start[1:])

    sys_real = torch.zeros(n_systems, 16, dtype=torch.float64, device=dev)
    sys_real[:, :9] = L.reshape(n_systems, 9)
    sys_real[:, 9:15] = frame
    sys_int = torch.zeros(n_systems, 12, dtype=torch.int64, device=dev)
    sys_int[:, 0:3] = pbc.to(torch.int64)
    sys_int[:, 3] = use_cells.to(torch.int64)
    sys_int[:, 4:7] = nbin_i
    sys_int[:, 7:10] = reach.to(torch.int64)
    sys_int[:, 10] = first_bin

    # Sorting by global bin keeps systems contiguous, so ptr and system stay valid.
    return {
        "xw": xw[order].to(dtype).contiguous(),
        "frac": frac[order].contiguous(),
        "off": off[order].to(torch.int32).contiguous(),
        "orig": order.to(torch.int32),
        "sys": system.to(torch.int32),
        "bin": local_bin[order].to(torch.int32),
        "ptr": ptr.contiguous(),
        "sys_real": sys_real,
        "sys_int": sys_int,
        "bin_start": bin_start,
    }


def _run_passes(core, stream, positions, cell, ptr, pbc, cutoff, self_interaction, want_d, want_v):
    """Count and fill with ``core``'s two entry points, enqueued on ``stream`` (an int)."""
    dev = positions.device
    n_atoms, n_systems = positions.shape[0], cell.shape[0]
    if n_atoms == 0 or n_systems == 0:
        return empty_neighbor_outputs(positions, 0, want_d, want_v)
    ptr = ptr.to(device=dev, dtype=torch.int64)
    pbc = pbc.to(device=dev, dtype=torch.bool)
    buffers = _prepare(positions, cell, ptr, pbc, float(cutoff))
    args = (n_atoms, n_systems, _DTYPE_CODE[positions.dtype], float(cutoff), bool(self_interaction))

    def ptrs(tensors):
        return {k: (t.data_ptr() if t.numel() else 0) for k, t in tensors.items()}

    error = torch.zeros(1, dtype=torch.int32, device=dev)
    counts = torch.zeros(n_atoms, dtype=torch.int64, device=dev)
    core.neighbor_list_cuda_count(
        ptrs({**buffers, "counts": counts, "error": error}), *args, stream
    )
    row_off = torch.zeros(n_atoms + 1, dtype=torch.int64, device=dev)
    for _attempt in range(3):
        torch.cumsum(counts, 0, out=row_off[1:])
        # One host sync for the error flag and the size.
        flag, n_pairs = torch.stack([error[0].to(torch.int64), row_off[-1]]).tolist()
        if flag:
            raise ValueError(
                "an image shift does not fit in int16: atoms lie too many cells apart; wrap "
                "positions into the cell first"
            )
        out = empty_neighbor_outputs(positions, n_pairs, want_d, want_v)
        found = torch.zeros(n_atoms, dtype=torch.int64, device=dev)
        if n_pairs:
            i, j, s, d, v = out
            fill = {
                **buffers,
                "counts": found,
                "error": error,
                "row_off": row_off,
                "out_i": i,
                "out_j": j,
                "out_s": s,
                "out_d": d,
                "out_v": v,
            }
            core.neighbor_list_cuda_fill(ptrs(fill), *args, stream)
        if torch.equal(found, counts):
            return out
        # The fill pass decided some pair at the cutoff differently from the
        # count pass; its own decisions are deterministic, so size by them.
        counts = found
    raise RuntimeError("dao neighbor_list (cuda): count and fill passes do not agree")


def neighbor_list_cuda(
    positions: torch.Tensor,
    cell: torch.Tensor,
    ptr: torch.Tensor,
    pbc: torch.Tensor,
    cutoff: float,
    self_interaction: bool,
    want_distances: bool,
    want_vectors: bool,
):
    """Periodic neighbour list of a batch of systems with the CUDA kernels.

    Args:
        positions: [N, 3] float32/float64 contiguous CUDA tensor, cartesian.
        cell: [B, 3, 3] same dtype and device, row vectors.
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
        RuntimeError: when dao was built without CUDA.
    """
    core = load_core()
    if not getattr(core, "WITH_CUDA", False):
        raise RuntimeError(
            "dao was not built with CUDA: reinstall with DAO_ENABLE_CUDA=ON, or use "
            "backend='triton' or 'torch'"
        )
    with torch.cuda.device(positions.device):
        stream = torch.cuda.current_stream(positions.device).cuda_stream
        return _run_passes(
            core,
            stream,
            positions,
            cell,
            ptr,
            pbc,
            cutoff,
            self_interaction,
            want_distances,
            want_vectors,
        )
