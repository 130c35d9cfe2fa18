"""Shared test helpers: the one tolerance table, canonical pair sorting, random systems."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

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


# --- neighbour-list comparisons (appended; used by tests/ops/test_neighbor_list*.py) ---


def ase_neighbor_pairs(positions, cell, pbc, cutoff: float, self_interaction: bool = False):
    """ASE's full list of one system, in float64: canonical rows [P, 5] and distances [P].

    Positions and cell are converted to float64 first, so a float32 system is
    compared with ASE run on exactly the same numbers.
    """
    import ase  # noqa: PLC0415
    import ase.neighborlist  # noqa: PLC0415

    pos = np.asarray(torch.as_tensor(positions).detach().cpu().to(torch.float64))
    lat = np.asarray(torch.as_tensor(cell).detach().cpu().to(torch.float64)).reshape(3, 3)
    pbc = np.broadcast_to(np.asarray(torch.as_tensor(pbc).cpu(), dtype=bool), (3,))
    atoms = ase.Atoms(positions=pos, cell=lat, pbc=pbc)
    i, j, s, d = ase.neighborlist.neighbor_list(
        "ijSd", atoms, float(cutoff), self_interaction=self_interaction
    )
    rows, order = canonical_pairs(i, j, s)
    return rows, np.asarray(d, dtype=np.float64)[order]


def sorted_pairs(nl):
    """A NeighborList in canonical (i, j, shift) order: (rows [P, 5], distances, vectors);
    distances/vectors are float64 numpy arrays, or None where the list has none."""
    rows, order = canonical_pairs(nl.i, nl.j, nl.shifts)

    def take(t):
        return None if t is None else np.asarray(t.detach().cpu().to(torch.float64))[order]

    return rows, take(nl.distances), take(nl.vectors)


def pair_keys(rows: np.ndarray) -> list[tuple[int, ...]]:
    """Rows (i, j, s0, s1, s2) as hashable tuples."""
    return [tuple(int(x) for x in r) for r in np.asarray(rows).reshape(-1, 5)]


def assert_pairs_match(
    rows, dist, ref_rows, ref_dist, cutoff: float, dtype=torch.float64, band=0.0, max_flips=0
):
    """Compare a pair list with a float64 reference list (both canonical, see canonical_pairs).

    With ``band == 0`` the integer rows must be identical and distances close
    (tolerance row of ``dtype``). With ``band > 0`` pairs whose reference
    distance lies within ``band * cutoff`` of the cutoff may be missing, and
    pairs absent from the reference may appear only if their distance lies in
    that band (give ``ref_rows``/``ref_dist`` for a list computed at
    ``cutoff * (1 + band)`` so those are known); at most ``max_flips`` such
    differences are allowed. Pairs away from the band must match exactly.
    """
    rows, ref_rows = np.asarray(rows).reshape(-1, 5), np.asarray(ref_rows).reshape(-1, 5)
    ref_dist = np.asarray(ref_dist, dtype=np.float64)
    if band == 0.0:
        np.testing.assert_array_equal(rows, ref_rows)
        if dist is not None:
            assert_close(torch.as_tensor(dist), torch.as_tensor(ref_dist), dtype)
        return
    lo, hi = cutoff * (1.0 - band), cutoff * (1.0 + band)
    assert ref_dist.size == 0 or ref_dist.max() < hi, "reference list reaches past the band"
    ref_index = {k: n for n, k in enumerate(pair_keys(ref_rows))}
    keys = pair_keys(rows)
    unknown = [k for k in keys if k not in ref_index]
    assert not unknown, f"pairs beyond cutoff * (1 + band): {unknown[:5]}"
    found = np.array([ref_index[k] for k in keys], dtype=np.int64)
    have = np.zeros(len(ref_rows), dtype=bool)
    have[found] = True
    expected = ref_dist < cutoff
    flips = have != expected
    outside_band = flips & ((ref_dist < lo) | (ref_dist >= hi))
    assert not outside_band.any(), (
        f"{int(outside_band.sum())} pairs differ away from the cutoff band, e.g. "
        f"{ref_rows[outside_band][:3].tolist()} at {ref_dist[outside_band][:3].tolist()}"
    )
    assert int(flips.sum()) <= max_flips, f"{int(flips.sum())} pairs flipped in the band"
    if dist is not None:
        assert_close(torch.as_tensor(dist), torch.as_tensor(ref_dist[found]), dtype)


def write_tiny_daog(path, timesteps: int = 5, max_atoms: int = 12):
    """An untrained, tiny DAO-G exported like shipped weights (fast CLI/API tests)."""
    from dao.pretrained import build_diffusion
    from dao.train import export_weights

    cfg = {
        "model": {
            "model": "crysformer",
            "num_layers": 1,
            "hidden": 16,
            "heads": 2,
            "num_freqs": 4,
            "time_dim": 8,
        },
        "diffusion": {"timesteps": timesteps},
        "data": {"max_atoms": max_atoms},
    }
    torch.manual_seed(0)
    export_weights(dict(build_diffusion(cfg).state_dict()), cfg, path)
    return path


def write_tiny_daop(path, timesteps: int = 5, energy_mean: float = 0.1, energy_std: float = 0.2):
    """An untrained, tiny DAO-P exported like shipped weights (fast CLI/API tests)."""
    from dao.pretrained import build_diffusion
    from dao.train import export_weights

    cfg = {
        "model": {
            "model": "crysformer",
            "num_layers": 1,
            "hidden": 16,
            "heads": 2,
            "num_freqs": 4,
            "time_dim": 8,
            "energy_head": True,
        },
        "diffusion": {"timesteps": timesteps},
        "daop": {"energy_mean": energy_mean, "energy_std": energy_std},
    }
    torch.manual_seed(0)
    export_weights(dict(build_diffusion(cfg).state_dict()), cfg, path)
    return path


# ---------------------------------------------------- Triton kernels in tests
# Without a GPU, Triton kernels run in its CPU interpreter, which needs
# TRITON_INTERPRET=1 before triton is first imported (see
# tests/ops/test_neighbor_list_triton.py for the whole story).
TRITON_INTERPRET_MODE = (
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") or not torch.cuda.is_available()
)


def triton_interpreter_usable_here() -> bool:
    """True if triton's own library functions can run in the interpreter in this process."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.sum, InterpretedFunction)


def triton_kernel_module(module_name: str, kernel_attr: str):
    """Body of a module-scoped fixture: yields the kernel module in the right mode
    (interpreter without a GPU), reloading it if it was imported in the other mode,
    and restores TRITON_INTERPRET afterwards. Skips when triton was imported before
    the interpreter could be switched on (then the fresh-process test runs the file)."""
    if TRITON_INTERPRET_MODE and not triton_interpreter_usable_here():
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set; "
            "test_interpreter_in_fresh_process runs these tests in a child process"
        )
    old = os.environ.get("TRITON_INTERPRET")
    if TRITON_INTERPRET_MODE:
        os.environ["TRITON_INTERPRET"] = "1"
    kernels = importlib.import_module(module_name)
    from triton.runtime.interpreter import InterpretedFunction

    if TRITON_INTERPRET_MODE != isinstance(getattr(kernels, kernel_attr), InterpretedFunction):
        kernels = importlib.reload(kernels)
    yield kernels
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def run_in_fresh_interpreter(test_file: str) -> None:
    """Run ``test_file`` in a child pytest with TRITON_INTERPRET=1 set from the start
    (when this process cannot use the interpreter); skips when it can."""
    if not TRITON_INTERPRET_MODE or triton_interpreter_usable_here():
        pytest.skip("the interpreter tests run in this process")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-p", "no:cacheprovider"]
    cmd += ["-m", "not gpu"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
