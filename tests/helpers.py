"""Shared test helpers: the one tolerance table, canonical pair sorting, random systems."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dao

requires_triton = pytest.mark.skipif(
    not dao.has_triton(), reason="needs triton with a GPU or TRITON_INTERPRET=1"
)

# One tolerance table for every op, keyed by dtype; references run in float64.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None):
    """allclose with the tolerance row of ``dtype`` (default: actual's dtype)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.to(torch.float64), expected.to(torch.float64), atol=tol["atol"], rtol=tol["rtol"]
    )


def canonical_pairs(i, j, shifts) -> tuple[np.ndarray, np.ndarray]:
    """Rows (i, j, s0, s1, s2) as int64 sorted lexicographically, and the sort order."""
    i = np.asarray(torch.as_tensor(i).cpu(), dtype=np.int64)
    j = np.asarray(torch.as_tensor(j).cpu(), dtype=np.int64)
    s = np.asarray(torch.as_tensor(shifts).cpu(), dtype=np.int64).reshape(-1, 3)
    rows = np.concatenate([i[:, None], j[:, None], s], axis=1)
    order = np.lexsort(rows.T[::-1])
    return rows[order], order


def random_cell(rng: np.random.Generator, volume: float, skew: float = 0.3) -> np.ndarray:
    """A random [3, 3] cell (row vectors) of the given volume; ``skew`` up to ~1 gives
    strongly sheared cells (small angles)."""
    while True:
        m = np.eye(3) + skew * rng.normal(size=(3, 3))
        det = np.linalg.det(m)
        if abs(det) > 0.05:
            break
    if det < 0:
        m[2] *= -1
        det = -det
    return m * (volume / det) ** (1.0 / 3.0)


def random_batch(
    rng: np.random.Generator,
    n_systems: int,
    atoms_range: tuple[int, int] = (4, 20),
    volume_per_atom: tuple[float, float] = (15.0, 25.0),
    skew: float = 0.3,
    outside: float = 0.0,
    dtype: torch.dtype = torch.float64,
):
    """MP-20-like random cells: positions [N, 3], cell [B, 3, 3], num_atoms [B].

    ``outside`` > 0 displaces fractional coordinates by up to that many cells so
    atoms lie outside [0, 1).
    """
    nums = rng.integers(atoms_range[0], atoms_range[1] + 1, size=n_systems)
    cells, pos = [], []
    for n in nums:
        cell = random_cell(rng, n * rng.uniform(*volume_per_atom), skew)
        frac = rng.random((n, 3))
        if outside:
            frac = frac + rng.integers(-int(outside), int(outside) + 1, size=(n, 3))
        cells.append(cell)
        pos.append(frac @ cell)
    return (
        torch.tensor(np.concatenate(pos) if pos else np.zeros((0, 3)), dtype=dtype),
        torch.tensor(np.stack(cells) if cells else np.zeros((0, 3, 3)), dtype=dtype),
        torch.tensor(nums, dtype=torch.int64),
    )
