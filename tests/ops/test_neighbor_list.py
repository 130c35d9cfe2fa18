"""``dao.ops.neighbor_list`` (C++ core): against ASE, the reference twin and itself.

Integer outputs (i, j, shifts) are compared exactly after the canonical sort of
``helpers.canonical_pairs``; floats with the one tolerance table. float32
inputs are compared with ASE run on the float64 values of the same numbers:
pairs within a relative band of the cutoff may flip (STYLE habit 9), the rest
must match exactly. Property tests live in ``test_neighbor_list_properties.py``,
autograd / opcheck / torch.compile in ``test_neighbor_list_autograd.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    TOLERANCES,
    ase_neighbor_pairs,
    assert_close,
    assert_pairs_match,
    canonical_pairs,
    random_batch,
    random_cell,
    sorted_pairs,
)

import dao
from dao.ops import neighbor_list
from dao.ops.neighbor_list import BACKENDS
from dao.reference import neighbor_list as ref

DTYPES = [torch.float64, torch.float32]
# float32 inputs: relative band around the cutoff where the decision may differ
# from float64 ASE, and how many pairs may flip there per system.
BAND32 = 1e-6
MAX_FLIPS32 = 2
# Atom count at which the C++ core switches from per-pair image enumeration to a
# cell list (csrc/neighbor_list.cpp, automatic threshold); tests sit on both sides.
SWITCH = 64


def _ptr(num_atoms: torch.Tensor) -> list[int]:
    return [0, *np.cumsum(num_atoms.tolist()).tolist()]


def _pbc_rows(rng: np.random.Generator, n_systems: int) -> torch.Tensor:
    """[B, 3] per-axis flags, mostly periodic, every pattern possible."""
    pbc = rng.random((n_systems, 3)) < 0.7
    if n_systems:
        pbc[0] = True  # at least one fully periodic system
    return torch.tensor(pbc)


def _check_against_ase(nl, positions, cell, num_atoms, pbc, cutoff, self_interaction=False):
    """Split a batched result by system and compare each with ASE."""
    dtype = positions.dtype
    ptr = _ptr(num_atoms)
    i = nl.i.to(torch.int64)
    j = nl.j.to(torch.int64)
    for s in range(cell.shape[0]):
        lo, hi = ptr[s], ptr[s + 1]
        mine = (i >= lo) & (i < hi)
        # Neighbours belong to the same system as their centre.
        assert bool(((j[mine] >= lo) & (j[mine] < hi)).all())
        rows, order = canonical_pairs(i[mine] - lo, j[mine] - lo, nl.shifts[mine])
        dist = None
        if nl.distances is not None:
            dist = nl.distances[mine].to(torch.float64).numpy()[order]
        pos_s, cell_s, pbc_s = positions[lo:hi], cell[s], pbc[s]
        if dtype == torch.float64:
            ref_rows, ref_dist = ase_neighbor_pairs(pos_s, cell_s, pbc_s, cutoff, self_interaction)
            assert_pairs_match(rows, dist, ref_rows, ref_dist, cutoff, dtype)
        else:
            ref_rows, ref_dist = ase_neighbor_pairs(
                pos_s, cell_s, pbc_s, cutoff * (1 + BAND32), self_interaction
            )
            assert_pairs_match(
                rows, dist, ref_rows, ref_dist, cutoff, dtype, band=BAND32, max_flips=MAX_FLIPS32
            )


# --------------------------------------------------------------------------- ASE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("skew", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("outside", [0, 3])
def test_matches_ase_random_batches(dtype, skew, outside):
    """Random MP-20-like batches, per-axis pbc per system, one call for the batch."""
    seed = int(1000 * skew) + 10 * outside + (dtype == torch.float32)
    rng = np.random.default_rng(seed)
    pos, cell, num = random_batch(rng, 6, (1, 24), skew=skew, outside=outside, dtype=dtype)
    pbc = _pbc_rows(rng, 6)
    cutoff = float(rng.uniform(2.0, 7.0))
    nl = neighbor_list(pos, cell, cutoff, num_atoms=num, pbc=pbc)
    assert nl.i.numel() > 0
    _check_against_ase(nl, pos, cell, num, pbc, cutoff)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_ase_self_interaction(dtype):
    rng = np.random.default_rng(7)
    pos, cell, num = random_batch(rng, 4, (1, 12), skew=0.6, outside=2, dtype=dtype)
    pbc = _pbc_rows(rng, 4)
    nl = neighbor_list(pos, cell, 4.5, num_atoms=num, pbc=pbc, self_interaction=True)
    _check_against_ase(nl, pos, cell, num, pbc, 4.5, self_interaction=True)


def test_float32_decided_in_float64():
    """The header's contract: |d| < cutoff is decided in double for every dtype, so a
    float32 call lists exactly the pairs of a float64 call on the same numbers."""
    rng = np.random.default_rng(11)
    pos, cell, num = random_batch(rng, 8, (1, 90), skew=0.7, outside=2, dtype=torch.float32)
    pbc = _pbc_rows(rng, 8)
    nl32 = neighbor_list(pos, cell, 5.0, num_atoms=num, pbc=pbc)
    nl64 = neighbor_list(pos.double(), cell.double(), 5.0, num_atoms=num, pbc=pbc)
    r32, d32, _ = sorted_pairs(nl32)
    r64, d64, _ = sorted_pairs(nl64)
    np.testing.assert_array_equal(r32, r64)
    assert_close(torch.as_tensor(d32), torch.as_tensor(d64), torch.float32)


# --------------------------------------------------------------- reference twin


def _mixed_batch(rng, dtype, n_systems=10, large=(SWITCH - 1, 150)):
    """Random systems with empty ones and systems on both sides of the strategy switch."""
    pos, cell, num = random_batch(rng, n_systems, (1, 20), skew=0.8, outside=2, dtype=dtype)
    nums = num.tolist()
    chunks = list(torch.split(pos, nums))
    cells = list(cell)
    for n in (0, *large, 0):  # two empty systems and the large ones at random places
        c = torch.tensor(random_cell(rng, 14.0 * max(n, 1), 0.5), dtype=dtype)
        f = torch.tensor(rng.random((n, 3)) + rng.integers(-2, 3, (n, 3)), dtype=dtype)
        at = int(rng.integers(0, len(cells) + 1))
        chunks.insert(at, f @ c)
        cells.insert(at, c)
        nums.insert(at, n)
    nums = [0, *nums]  # and one at the start
    chunks.insert(0, torch.zeros(0, 3, dtype=dtype))
    cells.insert(0, torch.tensor(random_cell(rng, 10.0), dtype=dtype))
    return torch.cat(chunks), torch.stack(cells), torch.tensor(nums)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("self_interaction", [False, True])
def test_matches_reference_twin_whole_batch(dtype, self_interaction):
    rng = np.random.default_rng(21 + self_interaction)
    pos, cell, num = _mixed_batch(rng, dtype)
    pbc = _pbc_rows(rng, cell.shape[0])
    kw = dict(num_atoms=num, pbc=pbc, self_interaction=self_interaction, return_vectors=True)
    got = sorted_pairs(neighbor_list(pos, cell, 4.0, **kw))
    want = sorted_pairs(ref.neighbor_list(pos, cell, 4.0, **kw))
    # Both decide in float64 on the same numbers: the pair sets are identical.
    np.testing.assert_array_equal(got[0], want[0])
    assert_close(torch.as_tensor(got[1]), torch.as_tensor(want[1]), dtype)
    assert_close(torch.as_tensor(got[2]), torch.as_tensor(want[2]), dtype)


def test_torch_backend_matches_cpp():
    rng = np.random.default_rng(5)
    pos, cell, num = _mixed_batch(rng, torch.float64, n_systems=4, large=(80,))
    pbc = _pbc_rows(rng, cell.shape[0])
    kw = dict(num_atoms=num, pbc=pbc, return_vectors=True)
    a = sorted_pairs(neighbor_list(pos, cell, 3.5, backend="cpp", **kw))
    b = sorted_pairs(neighbor_list(pos, cell, 3.5, backend="torch", **kw))
    np.testing.assert_array_equal(a[0], b[0])
    assert_close(torch.as_tensor(a[1]), torch.as_tensor(b[1]))
    assert_close(torch.as_tensor(a[2]), torch.as_tensor(b[2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batched_equals_one_call_per_system(dtype):
    rng = np.random.default_rng(31)
    pos, cell, num = _mixed_batch(rng, dtype, n_systems=12)
    pbc = _pbc_rows(rng, cell.shape[0])
    kw = dict(return_vectors=True)
    batched = neighbor_list(pos, cell, 4.2, num_atoms=num, pbc=pbc, **kw)
    ptr = _ptr(num)
    parts = []
    for s in range(cell.shape[0]):
        lo, hi = ptr[s], ptr[s + 1]
        one = neighbor_list(pos[lo:hi], cell[s], 4.2, pbc=pbc[s], **kw)
        parts.append((one.i + lo, one.j + lo, one.shifts, one.distances, one.vectors))
    cat = [torch.cat(t) for t in zip(*parts, strict=True)]
    a = sorted_pairs(batched)
    b = sorted_pairs(dao.ops.NeighborList(*cat))
    np.testing.assert_array_equal(a[0], b[0])
    assert_close(torch.as_tensor(a[1]), torch.as_tensor(b[1]), dtype)
    assert_close(torch.as_tensor(a[2]), torch.as_tensor(b[2]), dtype)
    # The sorted batch vector describes the same batch as num_atoms.
    batch = torch.repeat_interleave(torch.arange(cell.shape[0]), num)
    c = sorted_pairs(neighbor_list(pos, cell, 4.2, batch=batch, pbc=pbc, **kw))
    np.testing.assert_array_equal(a[0], c[0])


def test_many_tiny_systems_across_chunks():
    """Hundreds of 1–3 atom systems: work chunks of the core span many systems."""
    rng = np.random.default_rng(41)
    pos, cell, num = random_batch(rng, 300, (0, 3), skew=0.5, outside=1)
    cell[num == 0] = 3.0 * torch.eye(3, dtype=cell.dtype)  # random_cell of volume 0 is singular
    got = sorted_pairs(neighbor_list(pos, cell, 3.0, num_atoms=num))
    want = sorted_pairs(ref.neighbor_list(pos, cell, 3.0, num_atoms=num))
    np.testing.assert_array_equal(got[0], want[0])
    assert_close(torch.as_tensor(got[1]), torch.as_tensor(want[1]))


@pytest.mark.parametrize("threads", ["1", "2", "5"])
def test_thread_count_does_not_change_the_result(threads, monkeypatch):
    rng = np.random.default_rng(43)
    pos, cell, num = _mixed_batch(rng, torch.float64, n_systems=6, large=(200,))
    monkeypatch.setenv("DAO_NUM_THREADS", "1")
    base = neighbor_list(pos, cell, 4.0, num_atoms=num, return_vectors=True)
    monkeypatch.setenv("DAO_NUM_THREADS", threads)
    nl = neighbor_list(pos, cell, 4.0, num_atoms=num, return_vectors=True)
    for a, b in zip(base, nl, strict=True):
        assert torch.equal(a, b)  # deterministic, including the order


def test_order_is_deterministic():
    """The documented order: deterministic for a given input and backend (any thread
    count, see above) but otherwise free, so every comparison here sorts first."""
    rng = np.random.default_rng(45)
    pos, cell, num = _mixed_batch(rng, torch.float64, n_systems=5, large=(120,))
    for backend in ("cpp", "torch"):
        a = neighbor_list(pos, cell, 4.0, num_atoms=num, backend=backend)
        b = neighbor_list(pos.clone(), cell.clone(), 4.0, num_atoms=num, backend=backend)
        for x, y in zip(a, b, strict=True):
            assert x is None or torch.equal(x, y)


# ---------------------------------------------------------------- special cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cutoff_larger_than_cell(dtype):
    """A 1 x 1 x 30 A cell with cutoff 7: about 150 images in the ab plane."""
    cell = torch.diag(torch.tensor([1.0, 1.0, 30.0], dtype=dtype))
    one = torch.zeros(1, 3, dtype=dtype)
    nl = neighbor_list(one, cell, 7.0)
    # Lattice points (a, b) with a^2 + b^2 < 49 strictly (149 with <=, less (+-7, 0) and
    # (0, +-7)), minus the atom itself.
    assert nl.i.numel() == 144
    assert int(nl.shifts[:, 0].abs().max()) == 6 and int(nl.shifts[:, 2].abs().max()) == 0
    assert_close(nl.distances, nl.shifts.to(dtype).norm(dim=1))
    pos = torch.tensor([[0.1, 0.2, 3.0], [0.5, 0.5, 20.0], [0.3, 0.9, 8.5]], dtype=dtype)
    nl = neighbor_list(pos, cell, 7.0)
    _check_against_ase(nl, pos, cell[None], torch.tensor([3]), torch.ones(1, 3, dtype=bool), 7.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cutoff_spans_many_cells_of_skewed_cells(dtype):
    rng = np.random.default_rng(51)
    pos, cell, num = random_batch(
        rng, 5, (1, 4), volume_per_atom=(2.0, 4.0), skew=1.0, outside=2, dtype=dtype
    )
    pbc = _pbc_rows(rng, 5)
    nl = neighbor_list(pos, cell, 6.0, num_atoms=num, pbc=pbc)
    assert int(nl.shifts.abs().max()) >= 3
    _check_against_ase(nl, pos, cell, num, pbc, 6.0)


def test_one_atom_cells_analytic():
    """Simple cubic, fcc and bcc one-atom cells: shell counts known by hand."""
    a = 2.0
    cells = torch.stack(
        [
            a * torch.eye(3, dtype=torch.float64),
            a / 2 * torch.tensor([[0.0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=torch.float64),
            a / 2 * torch.tensor([[-1.0, 1, 1], [1, -1, 1], [1, 1, -1]], dtype=torch.float64),
        ]
    )
    pos = torch.tensor([[0.3, -0.2, 0.1]] * 3, dtype=torch.float64)
    num = torch.tensor([1, 1, 1])
    # sc: 6 at a, 12 at a*sqrt2; fcc: 12 at a/sqrt2, 6 at a; bcc: 8 at a*sqrt3/2, 6 at a.
    cut = 1.01 * a
    nl = neighbor_list(pos, cells, cut, num_atoms=num, self_interaction=True)
    counts = torch.bincount(nl.i.long(), minlength=3).tolist()
    assert counts == [6 + 1, 12 + 6 + 1, 8 + 6 + 1]
    zero = nl.distances == 0
    assert int(zero.sum()) == 3 and bool((nl.shifts[zero] == 0).all())
    assert bool((nl.i[zero] == nl.j[zero]).all())
    nl = neighbor_list(pos, cells, cut, num_atoms=num)
    assert torch.bincount(nl.i.long(), minlength=3).tolist() == [6, 18, 14]
    assert bool((nl.i == nl.j).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cutoff_is_strict(dtype):
    """|d| < cutoff, strictly: distances exactly at the cutoff are excluded."""
    cell = 2.0 * torch.eye(3, dtype=dtype)
    one = torch.zeros(1, 3, dtype=dtype)
    assert neighbor_list(one, cell, 2.0).i.numel() == 0
    assert neighbor_list(one, cell, float(np.nextafter(2.0, 3.0))).i.numel() == 6
    # The same in the cell-list path: a 6 x 6 x 6 simple cubic grid.
    grid = torch.stack(torch.meshgrid(*[torch.arange(6)] * 3, indexing="ij"), -1)
    grid = 2.0 * grid.reshape(-1, 3).to(dtype)
    assert neighbor_list(grid, 6 * cell, 2.0).i.numel() == 0
    assert neighbor_list(grid, 6 * cell, float(np.nextafter(2.0, 3.0))).i.numel() == 6 * 216


def test_empty_systems_and_no_atoms():
    rng = np.random.default_rng(61)
    pos, cell, _ = random_batch(rng, 2, (5, 5))
    cells = torch.stack([cell[0], cell[0], cell[1], cell[1], cell[0]])
    num = torch.tensor([0, 5, 0, 5, 0])
    nl = neighbor_list(pos, cells, 4.0, num_atoms=num, return_vectors=True)
    _check_against_ase(nl, pos, cells, num, torch.ones(5, 3, dtype=bool), 4.0)
    # N = 0: one cell, several cells, no cell at all.
    for cells, num in [
        (cell[0], None),
        (cell, torch.tensor([0, 0])),
        (torch.zeros(0, 3, 3, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)),
    ]:
        for dtype in DTYPES:
            nl = neighbor_list(
                torch.zeros(0, 3, dtype=dtype),
                cells.to(dtype),
                3.0,
                num_atoms=num,
                return_vectors=True,
            )
            assert nl.i.shape == (0,) and nl.i.dtype == torch.int32
            assert nl.j.shape == (0,) and nl.j.dtype == torch.int32
            assert nl.shifts.shape == (0, 3) and nl.shifts.dtype == torch.int16
            assert nl.distances.shape == (0,) and nl.distances.dtype == dtype
            assert nl.vectors.shape == (0, 3) and nl.vectors.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_atoms_outside_the_cell(dtype):
    """Atoms several cells away (negative too): shifts are relative to the positions as
    given, so wrapping atom k by n_k cells changes S by n_i - n_j and nothing else."""
    rng = np.random.default_rng(71)
    cell = torch.tensor(random_cell(rng, 200.0, 0.8), dtype=dtype)
    frac = torch.tensor(rng.random((12, 3)), dtype=torch.float64)
    n = torch.tensor(rng.integers(-5, 6, (12, 3)))
    far = ((frac + n) @ cell.double()).to(dtype)
    inside = (frac @ cell.double()).to(dtype)
    nl_far = neighbor_list(far, cell, 5.0, return_vectors=True)
    _check_against_ase(
        nl_far, far, cell[None], torch.tensor([12]), torch.ones(1, 3, dtype=torch.bool), 5.0
    )
    if dtype == torch.float64:
        nl_in = neighbor_list(inside, cell, 5.0, return_vectors=True)
        i, j = nl_in.i.long(), nl_in.j.long()
        moved = canonical_pairs(i, j, nl_in.shifts.long() + n[i] - n[j])[0]
        np.testing.assert_array_equal(sorted_pairs(nl_far)[0], moved)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_axis_pbc(dtype):
    """Every periodicity pattern in one [B, 3] call; [3] and bool forms broadcast."""
    rng = np.random.default_rng(81)
    patterns = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]).bool()
    pos, cell, num = random_batch(rng, 8, (3, 15), skew=0.6, outside=2, dtype=dtype)
    nl = neighbor_list(pos, cell, 5.5, num_atoms=num, pbc=patterns)
    _check_against_ase(nl, pos, cell, num, patterns, 5.5)
    # No shift along a non-periodic axis.
    system = torch.repeat_interleave(torch.arange(8), num)[nl.i.long()]
    assert not bool((nl.shifts.bool() & ~patterns[system]).any())
    # [3] tensor == the same row for every system; False == molecules.
    row = torch.tensor([True, False, True])
    a = sorted_pairs(neighbor_list(pos, cell, 5.5, num_atoms=num, pbc=row))[0]
    b = sorted_pairs(neighbor_list(pos, cell, 5.5, num_atoms=num, pbc=row.expand(8, 3)))[0]
    np.testing.assert_array_equal(a, b)
    mol = neighbor_list(pos, cell, 5.5, num_atoms=num, pbc=False)
    assert not bool(mol.shifts.any())
    _check_against_ase(mol, pos, cell, num, torch.zeros(8, 3, dtype=bool), 5.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_left_handed_cells(dtype):
    rng = np.random.default_rng(91)
    pos, cell, num = random_batch(rng, 3, (4, 12), skew=0.7, outside=1, dtype=dtype)
    flip = cell.clone()
    flip[:, 2] *= -1  # det < 0; positions stay where they are
    pbc = _pbc_rows(rng, 3)
    nl = neighbor_list(pos, flip, 4.5, num_atoms=num, pbc=pbc)
    _check_against_ase(nl, pos, flip, num, pbc, 4.5)


def test_self_interaction_adds_exactly_the_self_pairs():
    rng = np.random.default_rng(95)
    pos, cell, num = _mixed_batch(rng, torch.float64, n_systems=4, large=(70,))
    off = sorted_pairs(neighbor_list(pos, cell, 3.0, num_atoms=num))
    on = neighbor_list(pos, cell, 3.0, num_atoms=num, self_interaction=True)
    self_pair = (on.i == on.j) & (on.shifts == 0).all(dim=1)
    assert int(self_pair.sum()) == pos.shape[0]
    assert bool((on.distances[self_pair] == 0).all())
    assert torch.equal(on.i[self_pair].sort().values, torch.arange(pos.shape[0]).int())
    rest = dao.ops.NeighborList(*(t[~self_pair] for t in on[:4]), None)
    rows, dist, _ = sorted_pairs(rest)
    np.testing.assert_array_equal(rows, off[0])
    assert_close(torch.as_tensor(dist), torch.as_tensor(off[1]))


# ------------------------------------------------------------ cell-list strategy


def _slab(rng, n, dims, dtype=torch.float64):
    cell = torch.diag(torch.tensor(dims, dtype=dtype))
    return torch.tensor(rng.random((n, 3)), dtype=dtype) @ cell, cell


@pytest.mark.parametrize("n", [SWITCH - 1, SWITCH, 200])
@pytest.mark.parametrize(
    "geometry", ["cubic", "skewed", "thin_slab", "needle", "skewed_thin", "nonperiodic_z"]
)
def test_both_strategies_match_ase(n, geometry):
    """Both sides of the image-enumeration / cell-list switch, including cells much
    thinner than the cutoff (bins wrap with an image shift)."""
    rng = np.random.default_rng(n + 7 * len(geometry))
    pbc = torch.ones(1, 3, dtype=torch.bool)
    cutoff = 3.0
    if geometry == "cubic":
        cell = torch.tensor(random_cell(rng, 12.0 * n, 0.1))
    elif geometry == "skewed":
        cell = torch.tensor(random_cell(rng, 12.0 * n, 1.0))
    elif geometry == "thin_slab":  # 0.6 A thick: five bins of images along c
        pos, cell = _slab(rng, n, [np.sqrt(20.0 * n / 0.6)] * 2 + [0.6])
    elif geometry == "needle":
        pos, cell = _slab(rng, n, [0.7, 0.7, 12.0 * n / 0.49])
    elif geometry == "skewed_thin":
        base = float(np.sqrt(20.0 * n / 0.6))
        cell = torch.tensor(
            [[base, 0, 0], [0.8 * base, 0.9 * base, 0], [1.1, -0.7, 0.6]], dtype=torch.float64
        )
    else:  # slab with vacuum along a non-periodic c
        pbc = torch.tensor([[True, True, False]])
        cell = torch.tensor(random_cell(rng, 12.0 * n, 0.3))
    if geometry not in ("thin_slab", "needle"):
        pos = torch.tensor(rng.random((n, 3)) + rng.integers(-1, 2, (n, 3))) @ cell
    if geometry == "nonperiodic_z":
        pos[:, 2] += torch.tensor(rng.normal(0.0, 8.0, n))
    nl = neighbor_list(pos, cell, cutoff, pbc=pbc, return_vectors=True)
    assert nl.i.numel() > 0
    _check_against_ase(nl, pos, cell[None], torch.tensor([n]), pbc, cutoff)
    if geometry in ("thin_slab", "needle", "skewed_thin"):
        assert int(nl.shifts.abs().max()) >= 4  # many images through the thin direction


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cell_list_float32_and_self_interaction(dtype):
    rng = np.random.default_rng(123)
    pos, cell = _slab(rng, 180, [30.0, 30.0, 0.9], dtype)  # 10 x 10 x 1 bins
    for si in (False, True):
        nl = neighbor_list(pos, cell, 3.2, self_interaction=si)
        _check_against_ase(
            nl, pos, cell[None], torch.tensor([180]), torch.ones(1, 3, dtype=torch.bool), 3.2, si
        )


# ------------------------------------------------------------- output contract


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("want_d", [True, False])
@pytest.mark.parametrize("want_v", [True, False])
def test_return_flags_dtypes_and_values(dtype, want_d, want_v):
    rng = np.random.default_rng(131)
    pos, cell, num = _mixed_batch(rng, dtype, n_systems=3, large=(70,))
    nl = neighbor_list(
        pos, cell, 4.0, num_atoms=num, return_distances=want_d, return_vectors=want_v
    )
    assert (nl.distances is None) == (not want_d)
    assert (nl.vectors is None) == (not want_v)
    p = nl.i.shape[0]
    assert nl.i.dtype == torch.int32 and nl.j.dtype == torch.int32
    assert nl.shifts.dtype == torch.int16 and nl.shifts.shape == (p, 3)
    assert nl.j.shape == (p,)
    for t in nl:
        assert t is None or (t.is_contiguous() and t.device == pos.device)
    # The integer part does not depend on the flags (same order too).
    base = neighbor_list(pos, cell, 4.0, num_atoms=num)
    assert torch.equal(nl.i, base.i) and torch.equal(nl.j, base.j)
    assert torch.equal(nl.shifts, base.shifts)
    # vector = r_j - r_i + S . L (computed here in float64), distance = |vector|.
    system = torch.repeat_interleave(torch.arange(cell.shape[0]), num)[nl.i.long()]
    p64, c64 = pos.double(), cell.double()
    vec = p64[nl.j.long()] - p64[nl.i.long()]
    vec = vec + torch.einsum("pa,pab->pb", nl.shifts.double(), c64[system])
    if want_d:
        assert nl.distances.dtype == dtype and nl.distances.shape == (p,)
        assert_close(nl.distances, vec.norm(dim=1))
        assert bool((nl.distances < 4.0).all())
    if want_v:
        assert nl.vectors.dtype == dtype and nl.vectors.shape == (p, 3)
        # float32 positions far from the origin round differently: absolute slack.
        tol = TOLERANCES[dtype]
        scale = float(p64.abs().max())
        torch.testing.assert_close(
            nl.vectors.double(), vec, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, scale)
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bytes_per_pair(dtype):
    """int32 i + int32 j + 3 x int16 shifts = 14 bytes, plus one float per distance:
    18 bytes per pair in float32 (within the 20-byte budget), 22 in float64."""
    rng = np.random.default_rng(141)
    pos, cell, num = random_batch(rng, 3, (8, 16), dtype=dtype)
    nl = neighbor_list(pos, cell, 4.0, num_atoms=num)
    p = nl.i.numel()
    assert p > 0
    ints = sum(t.numel() * t.element_size() for t in nl[:3])
    assert ints == 14 * p
    total = ints + nl.distances.numel() * nl.distances.element_size()
    assert total == (14 + dtype.itemsize) * p
    if dtype == torch.float32:
        assert total <= 20 * p


@pytest.mark.parametrize("layout", ["strided_positions", "transposed_cell", "broadcast_cell"])
def test_non_contiguous_inputs(layout):
    rng = np.random.default_rng(151)
    pos, cell, num = random_batch(rng, 2, (6, 10), skew=0.5)
    base = sorted_pairs(neighbor_list(pos, cell, 4.0, num_atoms=num))
    if layout == "strided_positions":
        wide = torch.zeros(pos.shape[0], 7, dtype=pos.dtype)
        wide[:, 2:5] = pos
        got = neighbor_list(wide[:, 2:5], cell, 4.0, num_atoms=num)
    elif layout == "transposed_cell":
        got = neighbor_list(
            pos, cell.transpose(1, 2).contiguous().transpose(1, 2), 4.0, num_atoms=num
        )
    else:
        pos2 = pos[: num[0]]
        cell2 = cell[0].expand(3, 3, 3)  # stride-0 batch of three equal cells
        base = sorted_pairs(
            neighbor_list(
                pos2.repeat(3, 1), cell[0].repeat(3, 1, 1), 4.0, num_atoms=num[:1].repeat(3)
            )
        )
        got = neighbor_list(pos2.repeat(3, 1), cell2, 4.0, num_atoms=num[:1].repeat(3))
    got = sorted_pairs(got)
    np.testing.assert_array_equal(got[0], base[0])
    assert_close(torch.as_tensor(got[1]), torch.as_tensor(base[1]))


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(161)
    pos, cell, num = _mixed_batch(rng, torch.float64, n_systems=3, large=(80,))
    pbc = _pbc_rows(rng, cell.shape[0])
    batch = torch.repeat_interleave(torch.arange(cell.shape[0]), num)
    pos.requires_grad_(True)
    cell.requires_grad_(True)
    keep = [t.detach().clone() for t in (pos, cell, num, pbc, batch)]
    for backend in ("cpp", "torch"):
        for kw in (dict(num_atoms=num), dict(batch=batch)):
            nl = neighbor_list(
                pos,
                cell,
                4.0,
                pbc=pbc,
                self_interaction=True,
                return_vectors=True,
                backend=backend,
                **kw,
            )
            (nl.distances.sum() + nl.vectors.sum()).backward()
    for before, after in zip(keep, (pos, cell, num, pbc, batch), strict=True):
        assert torch.equal(before, after.detach())
        assert before.dtype == after.dtype


# ----------------------------------------------------------------- bad input


def _good():
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 0.5, 0.1]], dtype=torch.float64)
    cell = 4.0 * torch.eye(3, dtype=torch.float64)
    return pos, cell


def _nan_at(t, idx, value=float("nan")):
    t = t.clone()
    t[idx] = value
    return t


def _bad_cases():
    pos, cell = _good()
    cells2 = torch.stack([cell, cell])
    sing = cell.clone()
    sing[2] = sing[0] + sing[1]
    f32 = pos.float()
    return {
        # shapes
        "positions_2_columns": ((pos[:, :2], cell, 3.0), {}, r"positions must have shape"),
        "positions_3d": ((pos[None], cell, 3.0), {}, r"positions must have shape"),
        "positions_1d": ((pos.reshape(-1), cell, 3.0), {}, r"positions must have shape"),
        "cell_3x2": ((pos, cell[:, :2], 3.0), {}, r"cell must have shape"),
        "cell_4d": ((pos, cells2[None], 3.0), {}, r"cell must have shape"),
        "several_cells_no_split": ((pos, cells2, 3.0), {}, r"pass num_atoms or batch"),
        # non-finite
        "nan_position": ((_nan_at(pos, (1, 2)), cell, 3.0), {}, r"positions contain NaN.*atom 1"),
        "inf_position": ((_nan_at(pos, (2, 0), float("inf")), cell, 3.0), {}, r"NaN or inf"),
        "neg_inf_position": ((_nan_at(pos, (0, 1), -float("inf")), cell, 3.0), {}, r"NaN or inf"),
        "nan_cell": ((pos, _nan_at(cell, (0, 1)), 3.0), {}, r"cell contains NaN or inf"),
        "inf_cell": ((pos, _nan_at(cell, (2, 2), float("inf")), 3.0), {}, r"cell contains NaN"),
        # cutoff
        "cutoff_zero": ((pos, cell, 0.0), {}, r"cutoff must be a positive finite number"),
        "cutoff_negative": ((pos, cell, -1.0), {}, r"cutoff must be a positive finite number"),
        "cutoff_inf": ((pos, cell, float("inf")), {}, r"cutoff must be a positive finite"),
        "cutoff_nan": ((pos, cell, float("nan")), {}, r"cutoff must be a positive finite"),
        "cutoff_string": ((pos, cell, "3"), {}, r"cutoff must be a number"),
        "cutoff_none": ((pos, cell, None), {}, r"cutoff must be a number"),
        "cutoff_bool": ((pos, cell, True), {}, r"cutoff must be a number"),
        # cells
        "singular_cell": ((pos, sing, 3.0), {}, r"cell of system 0 is singular"),
        "zero_cell": ((pos, torch.zeros_like(cell), 3.0), {}, r"singular"),
        "flat_cell_in_batch": (
            (pos, torch.stack([cell, sing]), 3.0),
            dict(num_atoms=torch.tensor([2, 1])),
            r"cell of system 1 is singular",
        ),
        # batch description
        "num_atoms_sum": (
            (pos, cells2, 3.0),
            dict(num_atoms=torch.tensor([1, 1])),
            r"num_atoms sums to 2",
        ),
        "num_atoms_length": (
            (pos, cells2, 3.0),
            dict(num_atoms=torch.tensor([1, 1, 1])),
            r"num_atoms has 3 entries but cell has 2",
        ),
        "num_atoms_negative": (
            (pos, cells2, 3.0),
            dict(num_atoms=torch.tensor([4, -1])),
            r"non-negative",
        ),
        "num_atoms_float": (
            (pos, cells2, 3.0),
            dict(num_atoms=torch.tensor([1.0, 2.0])),
            r"integer",
        ),
        "num_atoms_2d": ((pos, cells2, 3.0), dict(num_atoms=torch.tensor([[1, 2]])), r"1-D"),
        "batch_unsorted": (
            (pos, cells2, 3.0),
            dict(batch=torch.tensor([0, 1, 0])),
            r"batch must be sorted",
        ),
        "batch_out_of_range": (
            (pos, cells2, 3.0),
            dict(batch=torch.tensor([0, 1, 2])),
            r"outside \[0, 2\)",
        ),
        "batch_negative": (
            (pos, cells2, 3.0),
            dict(batch=torch.tensor([-1, 0, 1])),
            r"outside \[0, 2\)",
        ),
        "batch_length": ((pos, cells2, 3.0), dict(batch=torch.tensor([0, 1])), r"batch must be"),
        "batch_float": ((pos, cells2, 3.0), dict(batch=torch.tensor([0.0, 0.0, 1.0])), r"integer"),
        "batch_and_num_atoms": (
            (pos, cells2, 3.0),
            dict(batch=torch.tensor([0, 0, 1]), num_atoms=torch.tensor([2, 1])),
            r"either num_atoms or batch, not both",
        ),
        # dtypes
        "dtype_mismatch": ((pos, cell.float(), 3.0), {}, r"cell dtype .* differs"),
        "dtype_mismatch_f32": ((f32, cell, 3.0), {}, r"cell dtype .* differs"),
        "integer_positions": ((pos.long(), cell.long(), 3.0), {}, r"float32 or float64"),
        "half_positions": ((pos.half(), cell.half(), 3.0), {}, r"float32 or float64"),
        "not_a_tensor": ((pos.tolist(), cell, 3.0), {}, r"torch tensors"),
        # pbc
        "pbc_length_2": ((pos, cell, 3.0), dict(pbc=torch.tensor([True, False])), r"pbc must"),
        "pbc_length_4": ((pos, cell, 3.0), dict(pbc=torch.ones(4, dtype=torch.bool)), r"pbc"),
        "pbc_rows": (
            (pos, cells2, 3.0),
            dict(num_atoms=torch.tensor([2, 1]), pbc=torch.ones(3, 3, dtype=torch.bool)),
            r"pbc must be a bool, \[3\] or \[B, 3\] = \[2, 3\]",
        ),
        "pbc_int": ((pos, cell, 3.0), dict(pbc=torch.tensor([1, 1, 0])), r"pbc must be bool"),
        # backends
        "unknown_backend": ((pos, cell, 3.0), dict(backend="gpu"), r"backend must be one of"),
        "cuda_backend_on_cpu": ((pos, cell, 3.0), dict(backend="cuda"), r"needs CUDA tensors"),
        # shifts stored as int16
        "int16_overflow": ((_nan_at(pos, (1, 0), 4.0 * 40000), cell, 3.0), {}, r"int16"),
    }


_BAD = _bad_cases()


def _cases(names):
    return sorted(names)


@pytest.mark.parametrize("case", _cases(_BAD))
def test_bad_input_raises_value_error(case):
    args, kwargs, match = _BAD[case]
    with pytest.raises(ValueError, match=match):
        neighbor_list(*args, **kwargs)


@pytest.mark.parametrize(
    "case", _cases(c for c in _BAD if "backend" not in c and c != "int16_overflow")
)
def test_reference_twin_rejects_the_same_input(case):
    args, kwargs, match = _BAD[case]
    with pytest.raises(ValueError, match=match):
        ref.neighbor_list(*args, **kwargs)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_int16_shift_range(backend):
    """Shifts up to the int16 limit are exact; beyond it the op refuses clearly."""
    cell = torch.eye(3, dtype=torch.float64)
    pos = torch.tensor([[0.3, 0.0, 0.0], [32000.5, 0.0, 0.0]], dtype=torch.float64)
    pbc = torch.tensor([True, False, False])
    nl = neighbor_list(pos, cell, 0.9, pbc=pbc, backend=backend)
    rows, dist, _ = sorted_pairs(nl)
    want = [[0, 1, -32001, 0, 0], [0, 1, -32000, 0, 0], [1, 0, 32000, 0, 0], [1, 0, 32001, 0, 0]]
    np.testing.assert_array_equal(rows, want)
    assert_close(torch.as_tensor(dist), torch.tensor([0.8, 0.2, 0.2, 0.8], dtype=torch.float64))
    far = pos.clone()
    far[1, 0] = 40000.5
    with pytest.raises(ValueError, match="int16"):
        neighbor_list(far, cell, 0.9, pbc=pbc, backend=backend)


def test_reference_twin_refuses_int16_overflow():
    cell = torch.eye(3, dtype=torch.float64)
    pos = torch.tensor([[0.3, 0.0, 0.0], [40000.5, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="int16"):
        ref.neighbor_list(pos, cell, 0.9)


def test_accepted_input_forms():
    """Plain Python forms of the arguments give the same list as tensors."""
    rng = np.random.default_rng(181)
    pos, cell, num = random_batch(rng, 2, (4, 9))
    base = sorted_pairs(
        neighbor_list(pos, cell, 4.0, num_atoms=num, pbc=torch.tensor([True, False, True]))
    )
    for cutoff, nums, pbc in [
        (4, num.tolist(), [True, False, True]),
        (np.float64(4.0), tuple(num.tolist()), (True, False, True)),
        (4.0, num.int(), torch.tensor([[True, False, True]] * 2)),
    ]:
        got = sorted_pairs(neighbor_list(pos, cell, cutoff, num_atoms=nums, pbc=pbc))
        np.testing.assert_array_equal(got[0], base[0])


def test_backends_listed():
    assert set(BACKENDS) == {"auto", "cpp", "cuda", "triton", "torch"}


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch", "cuda"])
def test_gpu_backends_match_cpu(backend):
    if backend == "cuda" and not dao.has_cuda_ext():
        pytest.skip("dao built without CUDA")
    rng = np.random.default_rng(171)
    pos, cell, num = _mixed_batch(rng, torch.float64, n_systems=6, large=(100,))
    pbc = _pbc_rows(rng, cell.shape[0])
    kw = dict(num_atoms=num, pbc=pbc, return_vectors=True)
    want = sorted_pairs(neighbor_list(pos, cell, 4.0, **kw))
    if backend == "auto" and not (dao.has_cuda_ext() or dao.has_triton()):
        with pytest.warns(RuntimeWarning, match="O\\(N\\^2\\)"):
            got = neighbor_list(pos.cuda(), cell.cuda(), 4.0, backend=backend, **kw)
    else:
        got = neighbor_list(pos.cuda(), cell.cuda(), 4.0, backend=backend, **kw)
    assert got.i.is_cuda
    got = sorted_pairs(got)
    np.testing.assert_array_equal(got[0], want[0])
    assert_close(torch.as_tensor(got[1]), torch.as_tensor(want[1]))
    assert_close(torch.as_tensor(got[2]), torch.as_tensor(want[2]))


def test_flat_layer_on_open_axis_cell_list():
    """200 atoms in one plane with that axis open take the cell-list path; the
    bin reach along the flat axis must stay bounded (it once grew to ~1e12)."""
    g = torch.Generator().manual_seed(5)
    pos = torch.rand(200, 3, generator=g, dtype=torch.float64) * 30
    pos[:, 2] = 0.5
    cell = 30 * torch.eye(3, dtype=torch.float64)
    pbc = torch.tensor([True, True, False])
    got = sorted_pairs(neighbor_list(pos, cell, 4.0, pbc=pbc))[0]
    want = sorted_pairs(ref.neighbor_list(pos, cell, 4.0, pbc=pbc))[0]
    np.testing.assert_array_equal(got, want)
