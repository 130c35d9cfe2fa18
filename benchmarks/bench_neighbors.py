"""Benchmarks of ``dao.ops.neighbor_list`` against other periodic neighbour lists.

Run (about 10 minutes on 2 cores)::

    pytest benchmarks/bench_neighbors.py --benchmark-json=benchmarks/results/neighbors.json
    python benchmarks/report.py

Workloads:

* ``mp20-6A`` / ``mp20-8A``: 1,000 MP-20-like random crystals (fixed seed), 4-20
  atoms, 15-25 A^3 per atom; a third of the cells carry a large unimodular
  shear (same lattice, far from reduced: small angles, thin slabs), the case a
  generative model emits and the one that needs many periodic images.
* ``cu-1k`` / ``cu-10k`` / ``cu-100k``: fcc Cu supercells (a = 3.61 A),
  cutoff 5 A (42 neighbours per atom; no shell within 0.1 A of the cutoff).

dao runs one batched call per workload; every peer runs per structure in a
Python loop, on inputs prepared beforehand (numpy arrays, ase.Atoms, pymatgen
Structures, tensors), so the timings cover the neighbour search only. All
providers return full lists (both i->j and j->i) with shifts and distances
unless a note says otherwise. Before timing, every provider's pair count is
compared, structure by structure, with dao's float64 list; a difference is
recorded in the row (and fails the run for dao's own float64 providers).
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import _harness
import numpy as np
import pytest
import torch

# Peers' own deprecation notices (e.g. torch.jit.script in torch-nl) are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SEED = 20240611
CU_A = 3.61
CU_CUTOFF = 5.0
# Aim for about this many seconds of timed rounds per row, within [MIN, MAX] rounds.
TARGET_S = 2.0
MIN_ROUNDS, MAX_ROUNDS = 3, 50


# --------------------------------------------------------------------------- systems


@dataclass
class Systems:
    """Structures of one workload: per-structure positions [n, 3] and cells [3, 3] (rows)."""

    positions: list[np.ndarray]
    cells: list[np.ndarray]
    n_sheared: int = 0

    @property
    def n_structures(self) -> int:
        return len(self.positions)

    @property
    def num_atoms(self) -> np.ndarray:
        return np.array([len(p) for p in self.positions], dtype=np.int64)

    @property
    def n_atoms(self) -> int:
        return int(self.num_atoms.sum())

    def head(self, k: int) -> Systems:
        return Systems(self.positions[:k], self.cells[:k])


def _random_cell(rng: np.random.Generator, volume: float, skew: float) -> np.ndarray:
    # Same recipe as the tests' random cells: identity plus Gaussian noise, scaled to volume.
    while True:
        m = np.eye(3) + skew * rng.normal(size=(3, 3))
        det = np.linalg.det(m)
        if abs(det) > 0.05:
            break
    if det < 0:
        m[2] *= -1
        det = -det
    return m * (volume / det) ** (1.0 / 3.0)


def _large_shear(rng: np.random.Generator) -> np.ndarray:
    """Unimodular [3, 3]: b += s0 a, c += s1 a + s2 b with |s| in {1, 2} (same lattice)."""
    s = rng.choice([-2, -1, 1, 2], size=3).astype(np.float64)
    return np.array([[1.0, 0.0, 0.0], [s[0], 1.0, 0.0], [s[1], s[2], 1.0]])


@functools.cache
def mp20_like(n_structures: int, seed: int = SEED) -> Systems:
    """MP-20-like random crystals; a third of them strongly sheared."""
    rng = np.random.default_rng(seed)
    nums = rng.integers(4, 21, size=n_structures)
    sheared = np.zeros(n_structures, dtype=bool)
    sheared[rng.permutation(n_structures)[: round(n_structures / 3)]] = True
    positions, cells = [], []
    for n, shear in zip(nums, sheared, strict=True):
        cell = _random_cell(rng, n * rng.uniform(15.0, 25.0), 0.3)
        if shear:
            cell = _large_shear(rng) @ cell
        positions.append(np.ascontiguousarray(rng.random((n, 3)) @ cell))
        cells.append(np.ascontiguousarray(cell))
    return Systems(positions, cells, int(sheared.sum()))


@functools.cache
def fcc_cu(reps: tuple[int, int, int], a: float = CU_A) -> Systems:
    """One fcc Cu supercell of 4 * prod(reps) atoms, positions inside the box."""
    basis = np.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0]])
    grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1)
    frac = (grid.reshape(-1, 1, 3) + basis[None]).reshape(-1, 3)
    return Systems([np.ascontiguousarray(frac * a)], [np.diag(np.asarray(reps, float) * a)])


@dataclass(frozen=True)
class Workload:
    id: str
    family: str  # "mp20" or "cu"
    cutoff: float
    size: Any  # number of structures (mp20) or supercell repetitions (cu)

    def systems(self) -> Systems:
        return mp20_like(self.size) if self.family == "mp20" else fcc_cu(self.size)

    def warmup_systems(self) -> Systems:
        """A small piece of the same kind, to take first-call costs out of single rounds."""
        return self.systems().head(20) if self.family == "mp20" else fcc_cu((3, 3, 3))


def _workloads(quick: bool) -> list[Workload]:
    if quick:
        return [
            Workload("mp20-6A", "mp20", 6.0, 60),
            Workload("mp20-8A", "mp20", 8.0, 60),
            Workload("cu-1k", "cu", CU_CUTOFF, (3, 3, 3)),
            Workload("cu-10k", "cu", CU_CUTOFF, (4, 4, 4)),
            Workload("cu-100k", "cu", CU_CUTOFF, (5, 5, 5)),
        ]
    return [
        Workload("mp20-6A", "mp20", 6.0, 1000),
        Workload("mp20-8A", "mp20", 8.0, 1000),
        Workload("cu-1k", "cu", CU_CUTOFF, (5, 5, 10)),
        Workload("cu-10k", "cu", CU_CUTOFF, (10, 10, 25)),
        Workload("cu-100k", "cu", CU_CUTOFF, (25, 25, 40)),
    ]


# --------------------------------------------------------------------------- providers


def _nbytes(x: Any) -> int:
    if x is None:
        return 0
    if isinstance(x, torch.Tensor):
        return x.element_size() * x.numel()
    return int(np.asarray(x).nbytes)


def _import(module: str) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(module)


class Provider:
    """One neighbour-list implementation. ``run`` is the only timed part."""

    name = ""
    module: str | None = None  # imported first; failure = "not run" with the reason
    dist: str | None = None  # distribution whose version the row records
    is_dao = False
    dtype = torch.float64

    def threads(self, harness: int) -> int:
        return 1

    def not_run_reason(self, wl: Workload) -> str | None:
        return None

    def single_round(self, wl: Workload) -> bool:
        """True where one call takes long enough that the timed call is also the checked one."""
        return False

    def note(self, wl: Workload) -> str:
        return ""

    def prepare(self, systems: Systems, wl: Workload) -> Any:
        raise NotImplementedError

    def run(self, state: Any) -> Any:
        raise NotImplementedError

    # Per-structure outputs of the loop providers: a list of tuples of arrays.
    def counts(self, out: Any, state: Any) -> np.ndarray:
        return np.array([len(o[0]) for o in out], dtype=np.int64)

    def nbytes(self, out: Any) -> int:
        return sum(_nbytes(a) for o in out for a in o)


class Dao(Provider):
    module = "dao.ops"
    dist = "dao-csp"
    is_dao = True

    def __init__(self, name: str, n_threads: int | None = None, dtype=torch.float64):
        self.name, self.n_threads, self.dtype = name, n_threads, dtype

    def threads(self, harness: int) -> int:
        return self.n_threads or harness

    def note(self, wl: Workload) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (
            f"one batched call, {dt} input; returns i, j int32, shifts int16 [P,3], distances {dt}"
        )

    def prepare(self, systems: Systems, wl: Workload) -> Any:
        from dao.ops import neighbor_list  # noqa: PLC0415

        pos = torch.tensor(np.concatenate(systems.positions), dtype=self.dtype)
        cell = torch.tensor(np.stack(systems.cells), dtype=self.dtype)
        nat = torch.tensor(systems.num_atoms)
        ptr = np.concatenate([[0], np.cumsum(systems.num_atoms)])
        return neighbor_list, pos, cell, nat, wl.cutoff, ptr

    def run(self, state: Any) -> Any:
        neighbor_list, pos, cell, nat, cutoff, _ = state
        return neighbor_list(pos, cell, cutoff, num_atoms=nat)

    def counts(self, out: Any, state: Any) -> np.ndarray:
        ptr = state[-1]
        system = np.searchsorted(ptr, out.i.numpy(), side="right") - 1
        return np.bincount(system, minlength=len(ptr) - 1).astype(np.int64)

    def nbytes(self, out: Any) -> int:
        return sum(_nbytes(t) for t in (out.i, out.j, out.shifts, out.distances, out.vectors))


class Vesin(Provider):
    module = "vesin"
    dist = "vesin"

    def __init__(self, name: str, n_threads: int = 0):
        self.name, self.n_threads = name, n_threads

    def threads(self, harness: int) -> int:
        if self.n_threads:
            return self.n_threads
        # vesin's n_threads=0: OMP_NUM_THREADS when set to a positive integer, else all cores.
        omp = os.environ.get("OMP_NUM_THREADS", "")
        return int(omp) if omp.isdigit() and int(omp) > 0 else (os.cpu_count() or 1)

    def note(self, wl: Workload) -> str:
        how = "vesin's default n_threads=0 (all cores)" if not self.n_threads else "n_threads=1"
        return f"per-structure loop, {how}; quantities ijSd"

    def prepare(self, systems: Systems, wl: Workload) -> Any:
        vesin = _import("vesin")
        nl = vesin.NeighborList(cutoff=wl.cutoff, full_list=True, n_threads=self.n_threads)
        return nl, list(zip(systems.positions, systems.cells, strict=True))

    def run(self, state: Any) -> Any:
        nl, items = state
        return [nl.compute(p, c, True, "ijSd") for p, c in items]


class Matscipy(Provider):
    name = "matscipy"
    module = "matscipy.neighbours"
    dist = "matscipy"

    def note(self, wl: Workload) -> str:
        return "per-structure loop, single-threaded C; quantities ijSd"

    def prepare(self, systems: Systems, wl: Workload) -> Any:
        fn = _import("matscipy.neighbours").neighbour_list
        return fn, wl.cutoff, list(zip(systems.positions, systems.cells, strict=True))

    def run(self, state: Any) -> Any:
        fn, cutoff, items = state
        pbc = [True, True, True]
        return [fn("ijSd", positions=p, cell=c, pbc=pbc, cutoff=cutoff) for p, c in items]


class Ase(Provider):
    name = "ase"
    module = "ase.neighborlist"
    dist = "ase"

    def single_round(self, wl: Workload) -> bool:
        return wl.family == "mp20" or wl.id == "cu-100k"

    def note(self, wl: Workload) -> str:
        return "ase.neighborlist.neighbor_list per structure (numpy); quantities ijSd"

    def prepare(self, systems: Systems, wl: Workload) -> Any:
        from ase import Atoms  # noqa: PLC0415

        fn = _import("ase.neighborlist").neighbor_list
        atoms = [
            Atoms(positions=p, cell=c, pbc=True)
            for p, c in zip(systems.positions, systems.cells, strict=True)
        ]
        return fn, wl.cutoff, atoms

    def run(self, state: Any) -> Any:
        fn, cutoff, atoms = state
        return [fn("ijSd", a, cutoff) for a in atoms]


class Pymatgen(Provider):
    name = "pymatgen"
    module = "pymatgen.core"
    dist = "pymatgen"

    def note(self, wl: Workload) -> str:
        # find_points_in_spheres keeps d <= r + 1e-8 and get_neighbor_list drops i == j
        # pairs with d <= 1e-8; ours keeps d < r and drops only (i, i, S = 0). No pair of
        # these workloads lies within 1e-8 of the cutoff or of zero, so counts agree.
        return (
            "Structure.get_neighbor_list per structure (Cython); keeps d <= r + 1e-8 "
            "vs ours d < r, drops self pairs within 1e-8"
        )

    def prepare(self, systems: Systems, wl: Workload) -> Any:
        core = _import("pymatgen.core")
        structures = [
            core.Structure(core.Lattice(c), ["Cu"] * len(p), p, coords_are_cartesian=True)
            for p, c in zip(systems.positions, systems.cells, strict=True)
        ]
        return wl.cutoff, structures

    def run(self, state: Any) -> Any:
        cutoff, structures = state
        return [s.get_neighbor_list(cutoff) for s in structures]


class TorchNL(Provider):
    name = "torch-nl"
    module = "torch_nl"
    dist = "torch-nl"

    def threads(self, harness: int) -> int:
        return harness  # plain torch ops: the harness intra-op thread count

    def single_round(self, wl: Workload) -> bool:
        return wl.family == "mp20" or wl.id == "cu-100k"

    def note(self, wl: Workload) -> str:
        if wl.family == "mp20":
            return (
                "compute_neighborlist_n2 (brute force) per structure: the linked-cell "
                "compute_neighborlist asks for 14 GB (6 A) to 26 GB (8 A) for single "
                "sheared cells; "
                "returns mapping, batch index, shifts (no distances)"
            )
        return "compute_neighborlist (linked cell); returns mapping, batch index, shifts"

    def prepare(self, systems: Systems, wl: Workload) -> Any:
        tnl = _import("torch_nl")
        fn = tnl.compute_neighborlist_n2 if wl.family == "mp20" else tnl.compute_neighborlist
        items = [
            (
                torch.tensor(p),
                torch.tensor(c),
                torch.ones(1, 3, dtype=torch.bool),
                torch.zeros(len(p), dtype=torch.long),
            )
            for p, c in zip(systems.positions, systems.cells, strict=True)
        ]
        return fn, wl.cutoff, items

    def run(self, state: Any) -> Any:
        fn, cutoff, items = state
        return [fn(cutoff, p, c, pbc, b, False) for p, c, pbc, b in items]

    def counts(self, out: Any, state: Any) -> np.ndarray:
        return np.array([o[0].shape[1] for o in out], dtype=np.int64)


class Reference(Provider):
    name = "reference"
    module = "dao.reference.neighbor_list"
    dist = "dao-csp"

    def threads(self, harness: int) -> int:
        return harness

    def not_run_reason(self, wl: Workload) -> str | None:
        if wl.id in ("cu-10k", "cu-100k"):
            return (
                "O(N^2) brute force over atom pairs and images: cost grows 100x per 10x "
                "atoms from the cu-1k row, far past the ~60 s per call limit"
            )
        return None

    def single_round(self, wl: Workload) -> bool:
        return True

    def note(self, wl: Workload) -> str:
        return "dao.reference.neighbor_list (pure PyTorch, float64, O(N^2)) per structure"

    def prepare(self, systems: Systems, wl: Workload) -> Any:
        fn = _import("dao.reference.neighbor_list").neighbor_list
        items = [
            (torch.tensor(p), torch.tensor(c))
            for p, c in zip(systems.positions, systems.cells, strict=True)
        ]
        return fn, wl.cutoff, items

    def run(self, state: Any) -> Any:
        fn, cutoff, items = state
        return [tuple(fn(p, c, cutoff))[:4] for p, c in items]


PROVIDERS: list[Provider] = [
    Dao("dao"),
    Dao("dao-1thread", n_threads=1),
    Dao("dao-fp32", dtype=torch.float32),
    Vesin("vesin"),
    Vesin("vesin-1thread", n_threads=1),
    Matscipy(),
    Pymatgen(),
    Ase(),
    TorchNL(),
    Reference(),
]

# --------------------------------------------------------------------------- checks


@functools.cache
def _expected_counts(wl: Workload) -> tuple[int, ...]:
    """Per-structure pair counts of dao in float64 at the current thread count: the yardstick."""
    dao = PROVIDERS[0]
    state = dao.prepare(wl.systems(), wl)
    return tuple(int(c) for c in dao.counts(dao.run(state), state))


def _check(provider: Provider, out: Any, state: Any, expected: np.ndarray) -> dict[str, Any]:
    counts = provider.counts(out, state)
    total = int(counts.sum())
    bad = int((counts != expected).sum())
    info: dict[str, Any] = {
        "n_pairs": total,
        "expected_pairs": int(expected.sum()),
        "count_ok": bad == 0,
        "structures_differing": bad,
        "bytes_per_pair": round(provider.nbytes(out) / total, 2) if total else None,
    }
    return info


def _params(quick: bool):
    return [
        pytest.param(wl, p, id=f"{wl.id}-{p.name}") for wl in _workloads(quick) for p in PROVIDERS
    ]


def pytest_generate_tests(metafunc):
    if {"workload", "provider"} <= set(metafunc.fixturenames):
        quick = bool(metafunc.config.getoption("--bench-quick"))
        metafunc.parametrize(("workload", "provider"), _params(quick))


def test_neighbor_list(benchmark, request, bench_threads, workload: Workload, provider: Provider):
    config = request.config
    systems = workload.systems()
    n_threads = provider.threads(bench_threads)
    base = {
        "workload": workload.id,
        "family": workload.family,
        "cutoff": workload.cutoff,
        "provider": provider.name,
        "n_structures": systems.n_structures,
        "n_atoms": systems.n_atoms,
        "n_sheared": systems.n_sheared,
        "threads": n_threads,
        "peer_version": _harness.dist_version(provider.dist) if provider.dist else None,
    }
    benchmark.group = workload.id

    def not_run(reason: str):
        _harness.record_not_run(config, reason, **base, notes=provider.note(workload))
        pytest.skip(reason)

    reason = provider.not_run_reason(workload)
    if reason:
        not_run(reason)
    try:
        _import(provider.module)
    except Exception as exc:  # noqa: BLE001 - any import failure means "not run"
        not_run(f"not importable: {type(exc).__name__}: {exc}")

    expected = np.array(_expected_counts(workload), dtype=np.int64)
    load = _harness.load_avg()
    notes = [provider.note(workload)]
    with _harness.threads(n_threads if provider.is_dao else bench_threads):
        state = provider.prepare(systems, workload)
        try:
            if provider.single_round(workload):
                # One call is slow: warm up on a small piece, time one call, check that call.
                provider.run(provider.prepare(workload.warmup_systems(), workload))
                rounds = 1
                out = benchmark.pedantic(provider.run, args=(state,), rounds=1)
                check = _check(provider, out, state, expected)
                notes.append("1 timed round, whose output is the one checked")
            else:
                # Check (and warm up) untimed, then time a few rounds.
                out, seconds = _harness.time_call(lambda: provider.run(state))
                check = _check(provider, out, state, expected)
                del out
                rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_S / max(seconds, 1e-9))))
                benchmark.pedantic(provider.run, args=(state,), rounds=rounds)
        except (MemoryError, RuntimeError) as exc:
            not_run(f"failed: {type(exc).__name__}: {str(exc)[:200]}")
    if not check["count_ok"]:
        notes.append(
            f"PAIR COUNT DIFFERS: {check['n_pairs']} vs dao float64 {check['expected_pairs']} "
            f"({check['structures_differing']} structures)"
        )
    dtype = str(provider.dtype).removeprefix("torch.")
    benchmark.extra_info.update(base, **check, rounds=rounds, load_avg=load, dtype=dtype)
    benchmark.extra_info["notes"] = "; ".join(n for n in notes if n)
    if provider.is_dao and provider.dtype == torch.float64:
        assert check["count_ok"], benchmark.extra_info["notes"]
