"""Input checks shared by the public ops and their reference twins.

Bad input is reported here, as a ValueError saying what was wrong and how to
fix it, before any kernel sees it.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

__all__ = ["SystemsInput", "check_cutoff", "check_systems"]

_FLOATS = (torch.float32, torch.float64)


class SystemsInput(NamedTuple):
    """Normalised batch description: contiguous tensors on one device."""

    positions: torch.Tensor  # [N, 3] float
    cell: torch.Tensor  # [B, 3, 3] same dtype
    ptr: torch.Tensor  # [B + 1] int64, on the device of positions
    pbc: torch.Tensor  # [B, 3] bool
    batch: torch.Tensor | None  # [N] int64 if the caller gave it


def _as_ptr(num_atoms: torch.Tensor, n_atoms: int, device: torch.device) -> torch.Tensor:
    if num_atoms.dim() != 1:
        raise ValueError(f"num_atoms must be 1-D [B], got shape {tuple(num_atoms.shape)}")
    if num_atoms.dtype.is_floating_point or num_atoms.dtype == torch.bool:
        raise ValueError(f"num_atoms must be an integer tensor, got {num_atoms.dtype}")
    num_atoms = num_atoms.to(device=device, dtype=torch.int64)
    if num_atoms.numel() and bool((num_atoms < 0).any()):
        raise ValueError("num_atoms must be non-negative")
    total = int(num_atoms.sum()) if num_atoms.numel() else 0
    if total != n_atoms:
        raise ValueError(
            f"num_atoms sums to {total} but positions has {n_atoms} rows: each system's "
            "atoms must be listed once, system after system"
        )
    ptr = torch.zeros(num_atoms.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(num_atoms, 0, out=ptr[1:])
    return ptr


def check_cutoff(cutoff) -> float:
    """The cutoff as a float; ValueError unless it is a positive finite real number."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, numbers.Real):
        raise ValueError(f"cutoff must be a number (positive and finite), got {cutoff!r}")
    value = float(cutoff)
    if not (value > 0.0) or value == float("inf"):
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    return value


def check_systems(
    positions: torch.Tensor,
    cell: torch.Tensor,
    *,
    num_atoms: torch.Tensor | None = None,
    batch: torch.Tensor | None = None,
    pbc: bool | torch.Tensor | tuple = True,
    cutoff: float | None = None,
    check_finite: bool = True,
) -> SystemsInput:
    """Validate and normalise a batch of periodic systems.

    Args:
        positions: [N, 3] cartesian positions (float32 or float64).
        cell: [3, 3] (one system) or [B, 3, 3] lattices, row vectors.
        num_atoms: [B] atoms per system (systems stored one after another).
        batch: [N] system index of every atom, sorted; alternative to num_atoms.
        pbc: a bool, [3] or [B, 3] per-axis periodicity.
        cutoff: if given, must be a positive finite number.
        check_finite: reject NaN/inf in positions and cell.

    Returns:
        SystemsInput with contiguous tensors.

    Raises:
        ValueError: with a message naming the offending argument.
    """
    if not isinstance(positions, torch.Tensor) or not isinstance(cell, torch.Tensor):
        raise ValueError("positions and cell must be torch tensors")
    if positions.dim() != 2 or positions.shape[-1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {tuple(positions.shape)}")
    if positions.dtype not in _FLOATS:
        raise ValueError(f"positions must be float32 or float64, got {positions.dtype}")
    if cell.dtype != positions.dtype:
        raise ValueError(
            f"cell dtype {cell.dtype} differs from positions dtype {positions.dtype}; "
            "convert one of them"
        )
    if cell.device != positions.device:
        raise ValueError(f"cell is on {cell.device} but positions on {positions.device}")
    if cell.dim() == 2:
        cell = cell.unsqueeze(0)
    if cell.dim() != 3 or cell.shape[-2:] != (3, 3):
        raise ValueError(f"cell must have shape [3, 3] or [B, 3, 3], got {tuple(cell.shape)}")
    n_atoms, n_systems = positions.shape[0], cell.shape[0]
    device = positions.device

    if num_atoms is not None and batch is not None:
        raise ValueError("give either num_atoms or batch, not both")
    if num_atoms is not None:
        if not isinstance(num_atoms, torch.Tensor):
            num_atoms = torch.as_tensor(num_atoms)
        ptr = _as_ptr(num_atoms, n_atoms, device)
    elif batch is not None:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 1 or batch.shape[0] != n_atoms:
            raise ValueError(f"batch must be a [N] = [{n_atoms}] integer tensor")
        if batch.dtype.is_floating_point or batch.dtype == torch.bool:
            raise ValueError(f"batch must be an integer tensor, got {batch.dtype}")
        batch = batch.to(device=device, dtype=torch.int64)
        if n_atoms:
            if bool((batch[1:] < batch[:-1]).any()):
                raise ValueError("batch must be sorted: list each system's atoms together")
            if int(batch[0]) < 0 or int(batch[-1]) >= n_systems:
                raise ValueError(
                    f"batch holds system indices outside [0, {n_systems}) for {n_systems} cells"
                )
        ptr = _as_ptr(torch.bincount(batch, minlength=n_systems), n_atoms, device)
    else:
        if n_systems != 1:
            raise ValueError(
                f"{n_systems} cells given: pass num_atoms or batch to say which atoms belong "
                "to which cell"
            )
        ptr = torch.tensor([0, n_atoms], dtype=torch.int64, device=device)
    if ptr.shape[0] != n_systems + 1:
        raise ValueError(f"num_atoms has {ptr.shape[0] - 1} entries but cell has {n_systems}")

    if isinstance(pbc, bool):
        pbc_t = torch.full((n_systems, 3), pbc, dtype=torch.bool, device=device)
    else:
        pbc_t = torch.as_tensor(pbc, device=device)
        if pbc_t.dtype != torch.bool:
            raise ValueError(f"pbc must be bool, got {pbc_t.dtype}")
        if pbc_t.shape == (3,):
            pbc_t = pbc_t.expand(n_systems, 3)
        if pbc_t.shape != (n_systems, 3):
            raise ValueError(f"pbc must be a bool, [3] or [B, 3] = [{n_systems}, 3]")
    if cutoff is not None:
        check_cutoff(cutoff)

    if check_finite:
        if not bool(torch.isfinite(positions).all()):
            bad = int(torch.nonzero(~torch.isfinite(positions).all(dim=1))[0, 0])
            raise ValueError(f"positions contain NaN or inf (first at atom {bad})")
        if not bool(torch.isfinite(cell).all()):
            raise ValueError("cell contains NaN or inf")
    if n_systems:
        with torch.no_grad():
            c64 = cell.detach().to(torch.float64)
            det = torch.linalg.det(c64)
            scale = c64.norm(dim=-1).prod(dim=-1)
            singular = ~(det.abs() > 1e-12 * scale) | (scale == 0)
        if bool(singular.any()):
            bad = int(torch.nonzero(singular)[0, 0])
            raise ValueError(
                f"cell of system {bad} is singular (det = {float(det[bad]):.3g}): give three "
                "linearly independent lattice vectors (also for non-periodic axes, which "
                "only set the frame)"
            )
    return SystemsInput(positions.contiguous(), cell.contiguous(), ptr, pbc_t.contiguous(), batch)
