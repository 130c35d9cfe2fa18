"""Pure-PyTorch twin of :func:`dao.ops.neighbor_list`: brute force over images.

Every atom pair of a system is tested against every image shift that can hold
a neighbour, in float64. It is O(N^2) per system, deliberately simple: the test
oracle, the fallback where no kernel applies, and the benchmark baseline.
"""

from __future__ import annotations

import torch

from dao._checks import check_cutoff, check_systems
from dao._types import NeighborList

__all__ = ["neighbor_list", "neighbor_pairs", "pair_vectors", "wrap_into_cells"]

# Candidate (i, j, image) triples tested at once; bounds memory to ~100 MB.
_CHUNK = 4_000_000


def wrap_into_cells(
    positions: torch.Tensor, cell: torch.Tensor, system: torch.Tensor, pbc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Wrap atoms into their cells along periodic axes, in float64 (the GPU backends' pre-pass).

    Args:
        positions: [N, 3]; cell: [B, 3, 3]; system: [N] crystal of each atom; pbc: [B, 3].

    Returns:
        (L [B, 3, 3] float64, frac [N, 3] wrapped fractional coordinates, off [N, 3]
        integer offsets (float64) with frac + off = the given fractional coordinates,
        xw [N, 3] wrapped cartesian positions).

    Raises:
        ValueError: if an atom lies more than 32767 cells away (shifts are int16).
    """
    L = cell.detach().to(torch.float64)
    frac = torch.bmm(
        positions.detach().to(torch.float64).unsqueeze(1), torch.linalg.inv(L)[system]
    ).squeeze(1)
    periodic = pbc[system]
    off = torch.where(periodic, torch.floor(frac), torch.zeros_like(frac))
    frac = frac - off
    wrap = periodic & (frac >= 1.0)  # f - floor(f) rounds to 1 for tiny negative f
    frac = torch.where(wrap, frac - 1.0, frac)
    off = off + wrap.to(off.dtype)
    if bool((off.abs() > torch.iinfo(torch.int16).max).any()):
        raise ValueError(
            "an atom lies more than 32767 cells outside its cell; image shifts are stored as "
            "int16, wrap positions into the cell first"
        )
    xw = torch.bmm(frac.unsqueeze(1), L[system]).squeeze(1)
    return L, frac, off, xw


def _pairs_one_system(
    pos: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float, self_interaction: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local (i, j, shift) of one system, all int64; decided in float64."""
    n = pos.shape[0]
    dev = pos.device
    L = cell.detach().to(torch.float64)
    frac = pos.detach().to(torch.float64) @ torch.linalg.inv(L)
    off = torch.where(pbc, torch.floor(frac), torch.zeros_like(frac))
    fw = frac - off
    # Distance between lattice planes; |df + S| <= cutoff / height, |df| < 1.
    a, b, c = L
    vol = torch.linalg.det(L).abs()
    heights = vol / torch.stack(
        [torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)]
    ).norm(dim=1)
    reach = torch.where(pbc, torch.ceil(cutoff / heights) + 1, torch.zeros_like(heights))
    ranges = [torch.arange(-int(r), int(r) + 1, device=dev) for r in reach.tolist()]
    shifts = torch.cartesian_prod(*ranges).reshape(-1, 3)  # [K, 3]
    k = shifts.shape[0]
    shift_cart = shifts.to(torch.float64) @ L  # [K, 3]
    xw = fw @ L
    zero_shift = (shifts == 0).all(dim=1)

    out_i, out_j, out_s = [], [], []
    rows = max(1, _CHUNK // max(1, n * k))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        d = xw[None, :, None, :] - xw[start:stop, None, None, :] + shift_cart[None, None]
        hit = (d * d).sum(-1) < cutoff * cutoff  # [rows, n, K]
        if not self_interaction:
            ii = torch.arange(start, stop, device=dev)
            same = ii[:, None] == torch.arange(n, device=dev)[None, :]
            hit &= ~(same[:, :, None] & zero_shift[None, None, :])
        li, lj, lk = torch.nonzero(hit, as_tuple=True)
        li = li + start
        out_i.append(li)
        out_j.append(lj)
        # Shift relative to the positions as given (not the wrapped ones).
        out_s.append(shifts[lk] - off[lj].to(torch.int64) + off[li].to(torch.int64))
    if not out_i:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty, torch.zeros(0, 3, dtype=torch.int64, device=dev)
    return torch.cat(out_i), torch.cat(out_j), torch.cat(out_s)


def neighbor_pairs(
    positions: torch.Tensor,
    cell: torch.Tensor,
    ptr: torch.Tensor,
    pbc: torch.Tensor,
    cutoff: float,
    self_interaction: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer part of the list for already-checked input: (i int64 [P], j, shifts int64 [P, 3]).

    Raises:
        ValueError: if a shift does not fit the int16 output layout.
    """
    all_i, all_j, all_s = [], [], []
    bounds = ptr.tolist()
    for s in range(cell.shape[0]):
        lo, hi = bounds[s], bounds[s + 1]
        if hi == lo:
            continue
        i, j, sh = _pairs_one_system(positions[lo:hi], cell[s], pbc[s], cutoff, self_interaction)
        all_i.append(i + lo)
        all_j.append(j + lo)
        all_s.append(sh)
    if not all_i:
        empty = torch.zeros(0, dtype=torch.int64, device=positions.device)
        return empty, empty, torch.zeros(0, 3, dtype=torch.int64, device=positions.device)
    shifts = torch.cat(all_s)
    if shifts.numel() and int(shifts.abs().max()) > torch.iinfo(torch.int16).max:
        raise ValueError(
            "an image shift does not fit in int16 (atoms lie more than 32767 cells outside "
            "their cell); wrap positions into the cell first"
        )
    return torch.cat(all_i), torch.cat(all_j), shifts


def pair_vectors(
    positions: torch.Tensor,
    cell: torch.Tensor,
    ptr: torch.Tensor,
    i: torch.Tensor,
    j: torch.Tensor,
    shifts: torch.Tensor,
) -> torch.Tensor:
    """r_j - r_i + S . L for every pair, differentiable w.r.t. positions and cell. [P, 3]."""
    i, j = i.to(torch.int64).contiguous(), j.to(torch.int64)
    system = torch.searchsorted(ptr, i, right=True) - 1
    return (
        positions[j]
        - positions[i]
        + torch.einsum("pa,pab->pb", shifts.to(positions.dtype), cell[system])
    )


def neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    cutoff: float,
    *,
    num_atoms: torch.Tensor | None = None,
    batch: torch.Tensor | None = None,
    pbc: bool | torch.Tensor = True,
    self_interaction: bool = False,
    return_distances: bool = True,
    return_vectors: bool = False,
):
    """Reference periodic neighbour list; same contract as :func:`dao.ops.neighbor_list`."""
    cutoff = check_cutoff(cutoff)
    x = check_systems(positions, cell, num_atoms=num_atoms, batch=batch, pbc=pbc)
    i, j, s = neighbor_pairs(x.positions, x.cell, x.ptr, x.pbc, cutoff, self_interaction)
    vec = pair_vectors(x.positions, x.cell, x.ptr, i, j, s)
    return NeighborList(
        i.to(torch.int32),
        j.to(torch.int32),
        s.to(torch.int16),
        vec.norm(dim=-1) if return_distances else None,
        vec if return_vectors else None,
    )
