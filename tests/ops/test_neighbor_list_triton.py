"""Triton backend of ``dao::neighbor_list`` against the reference twin and the C++ core.

Without a GPU the kernels run in Triton's CPU interpreter, which needs
``TRITON_INTERPRET=1`` *before triton is first imported*: ``triton.jit`` picks
interpreter or compiler when a function is decorated, and that includes
triton's own ``tl.sum``/``tl.max``/``tl.cumsum``, decorated when triton is
imported. The first call of any torch custom op imports triton (through
torch._dynamo), so in a full test session triton is usually imported long
before this module runs. Hence two ways to run these tests:

* in this process, when triton is not imported yet or was imported with the
  interpreter on (e.g. ``pytest tests/ops/test_neighbor_list_triton.py``): the
  module-scoped ``_triton_mode`` fixture sets ``TRITON_INTERPRET=1`` for this
  module only, (re)imports ``dao.kernels.neighbor_list`` in interpreter mode and
  restores the environment afterwards, so other modules never see the variable;
* otherwise those tests skip and ``test_interpreter_in_fresh_process`` runs this
  file in a child pytest with ``TRITON_INTERPRET=1`` set from the start.

With a GPU (and no ``TRITON_INTERPRET`` set by the caller) the same tests run
compiled on CUDA tensors, and the ``gpu`` class compares the compiled Triton and
CUDA backends with the C++ core up to 10k atoms.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest
import torch
from helpers import (
    TRITON_INTERPRET_MODE,
    assert_close,
    canonical_pairs,
    random_batch,
    run_in_fresh_interpreter,
    triton_kernel_module,
)

import dao
from dao.ops.neighbor_list import neighbor_list
from dao.reference import neighbor_list as ref

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs the triton package"
)

_INTERPRET = TRITON_INTERPRET_MODE
DEVICE = "cpu" if _INTERPRET else "cuda"
DTYPES = [torch.float64, torch.float32]
# float32 decides |d| < cutoff in float32: pairs this close (relative) to the
# cutoff may flip; they are left out of the exact comparison and counted.
BAND = 1e-5
MAX_FLIPS = 4


@pytest.fixture(scope="module")
def _triton_mode():
    yield from triton_kernel_module("dao.kernels.neighbor_list", "_neighbor_list_pairs_kernel")


def test_interpreter_in_fresh_process():
    run_in_fresh_interpreter(__file__)


def _ptr(num_atoms: torch.Tensor) -> torch.Tensor:
    ptr = torch.zeros(num_atoms.numel() + 1, dtype=torch.int64, device=num_atoms.device)
    torch.cumsum(num_atoms, 0, out=ptr[1:])
    return ptr


def _pbc(pbc, n_systems: int, device) -> torch.Tensor:
    t = torch.as_tensor(pbc, dtype=torch.bool, device=device)
    return t.expand(n_systems, 3).contiguous() if t.dim() < 2 else t.contiguous()


def _forward(kernels, pos, cell, num, pbc, cutoff, self_interaction=False, d=True, v=True):
    """The kernel entry point on DEVICE tensors; outputs back on the CPU."""
    dev = torch.device(DEVICE)
    out = kernels.neighbor_list_forward(
        pos.to(dev),
        cell.to(dev),
        _ptr(num).to(dev),
        _pbc(pbc, cell.shape[0], dev),
        cutoff,
        self_interaction,
        d,
        v,
    )
    return tuple(t.cpu() for t in out)


def _pair_vectors(pos, cell, ptr, rows: torch.Tensor) -> torch.Tensor:
    """Reference r_j - r_i + S . L of [P, 5] rows (i, j, S)."""
    i, j, s = rows[:, 0].contiguous(), rows[:, 1].contiguous(), rows[:, 2:].contiguous()
    return ref.pair_vectors(pos, cell, ptr, i, j, s)


def _check_against(got, pos, cell, num, pbc, cutoff, self_interaction=False):
    """Compare (i, j, shifts, distances, vectors) with the float64 reference twin.

    Integer pairs must match exactly for float64 input; for float32 input, pairs
    whose float64 distance lies within BAND (relative) of the cutoff may differ,
    at most MAX_FLIPS of them. Distances and vectors of the common pairs use the
    tolerance row of the input dtype.
    """
    dtype = pos.dtype
    pos64, cell64 = pos.to(torch.float64), cell.to(torch.float64)
    ptr = _ptr(num)
    pbc_t = _pbc(pbc, cell.shape[0], "cpu")
    ri, rj, rs = ref.neighbor_pairs(pos64, cell64, ptr, pbc_t, cutoff, self_interaction)
    i, j, s, d, v = got
    assert i.dtype == torch.int32 and j.dtype == torch.int32 and s.dtype == torch.int16
    rows, order = canonical_pairs(i, j, s)
    ref_rows, _ = canonical_pairs(ri, rj, rs)
    if dtype == torch.float64:
        np.testing.assert_array_equal(rows, ref_rows)
        keep = np.ones(len(rows), dtype=bool)
    else:
        got_set = {tuple(r) for r in rows.tolist()}
        ref_set = {tuple(r) for r in ref_rows.tolist()}
        flips = sorted(got_set ^ ref_set)
        assert len(flips) <= MAX_FLIPS, f"{len(flips)} pairs differ from the reference"
        if flips:
            f = torch.tensor(flips, dtype=torch.int64)
            dist = _pair_vectors(pos64, cell64, ptr, f).norm(dim=-1)
            assert bool(((dist - cutoff).abs() <= BAND * cutoff).all()), (flips, dist)
        keep = np.array([tuple(r) in ref_set for r in rows.tolist()], dtype=bool)
    rows_t = torch.from_numpy(rows[keep])
    exp_v = _pair_vectors(pos64, cell64, ptr, rows_t)
    sel = torch.from_numpy(order[keep])
    if d.numel() or rows_t.shape[0] == 0:
        assert d.dtype == dtype
        assert_close(d[sel], exp_v.norm(dim=-1), dtype)
    if v.numel() or rows_t.shape[0] == 0:
        assert v.dtype == dtype
        assert_close(v[sel], exp_v, dtype)
    return len(rows)


def _batch(seed, dtype, n_systems=3, **kw):
    return random_batch(np.random.default_rng(seed), n_systems, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "seed, kw, cutoff",
    [
        (0, {}, 5.0),
        (1, {"skew": 1.0}, 4.5),  # strongly sheared cells
        (2, {"outside": 3.0}, 5.0),  # atoms several cells outside
        (3, {"atoms_range": (1, 3), "volume_per_atom": (8.0, 12.0)}, 7.5),  # cutoff > cell
    ],
    ids=["mp20", "skewed", "outside", "cutoff_gt_cell"],
)
def test_matches_reference(_triton_mode, dtype, seed, kw, cutoff):
    pos, cell, num = _batch(seed, dtype, **kw)
    got = _forward(_triton_mode, pos, cell, num, True, cutoff)
    assert _check_against(got, pos, cell, num, True, cutoff) > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "pbc",
    [(True, True, False), (False, True, False), (False, False, False), "per_system"],
    ids=["slab", "wire", "molecule", "per_system"],
)
def test_per_axis_pbc(_triton_mode, dtype, pbc):
    pos, cell, num = _batch(10, dtype, skew=0.6, outside=1.0)
    if pbc == "per_system":
        pbc = [[True, False, True], [False, False, True], [True, True, True]]
    got = _forward(_triton_mode, pos, cell, num, pbc, 5.5)
    _check_against(got, pos, cell, num, pbc, 5.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("self_interaction", [False, True])
@pytest.mark.parametrize("cutoff", [5.1, 4.0])
def test_one_atom_cell_many_images(_triton_mode, dtype, self_interaction, cutoff):
    # Simple cubic, a = 2: every lattice point within cutoff / 2 cells. With
    # cutoff 4 the images at exactly 4 are representable and must be left out.
    pos = torch.tensor([[0.3, -0.2, 0.1]], dtype=dtype)
    cell = 2.0 * torch.eye(3, dtype=dtype).unsqueeze(0)
    num = torch.tensor([1])
    got = _forward(_triton_mode, pos, cell, num, True, cutoff, self_interaction)
    r = np.arange(-3, 4)
    lattice = np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    expected = int((np.linalg.norm(2.0 * lattice, axis=1) < cutoff).sum())
    assert got[0].shape[0] == expected - (not self_interaction)
    _check_against(got, pos, cell, num, True, cutoff, self_interaction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_systems_in_batch(_triton_mode, dtype):
    pos, cell, num = _batch(20, dtype, n_systems=4, atoms_range=(2, 6))
    keep = torch.ones(pos.shape[0], dtype=torch.bool)
    ptr = _ptr(num)
    for s in (0, 2):  # empty the first and an inner system
        keep[ptr[s] : ptr[s + 1]] = False
        num[s] = 0
    pos = pos[keep]
    got = _forward(_triton_mode, pos, cell, num, True, 5.0)
    assert _check_against(got, pos, cell, num, True, 5.0) > 0


def test_zero_atoms(_triton_mode):
    pos = torch.zeros(0, 3, dtype=torch.float32)
    cell = 3.0 * torch.eye(3).unsqueeze(0)
    i, j, s, d, v = _forward(_triton_mode, pos, cell, torch.tensor([0]), True, 4.0)
    assert i.shape == (0,) and j.shape == (0,) and s.shape == (0, 3) and s.dtype == torch.int16
    assert d.shape == (0,) and v.shape == (0, 3) and d.dtype == torch.float32


def test_optional_outputs_and_grouping(_triton_mode):
    pos, cell, num = _batch(30, torch.float64)
    i, j, s, d, v = _forward(_triton_mode, pos, cell, num, True, 5.0, d=False, v=False)
    assert d.shape == (0,) and v.shape == (0, 3)
    full = _forward(_triton_mode, pos, cell, num, True, 5.0)
    np.testing.assert_array_equal(canonical_pairs(i, j, s)[0], canonical_pairs(*full[:3])[0])
    # Pairs come grouped by i (not necessarily sorted).
    runs = int((i[1:] != i[:-1]).sum()) + 1
    assert runs == torch.unique(i).numel()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_tiles_per_system(_triton_mode, dtype):
    # More atoms than one tile: Morton ordering, several i/j tiles, box culling.
    pos, cell, num = _batch(40, dtype, n_systems=1, atoms_range=(90, 90), skew=0.5)
    got = _forward(_triton_mode, pos, cell, num, (True, True, False), 4.0)
    _check_against(got, pos, cell, num, (True, True, False), 4.0)


def test_flat_slab(_triton_mode):
    # All atoms in one plane with that axis open: a degenerate extent along it.
    gen = torch.Generator().manual_seed(0)
    frac = torch.rand(70, 3, generator=gen, dtype=torch.float64)
    frac[:, 2] = 0.5
    cell = torch.tensor([[[14.0, 0.0, 0.0], [3.0, 14.0, 0.0], [0.0, 2.0, 10.0]]])
    cell = cell.to(torch.float64)
    pos, num = frac @ cell[0], torch.tensor([70])
    got = _forward(_triton_mode, pos, cell, num, (True, True, False), 4.0)
    assert _check_against(got, pos, cell, num, (True, True, False), 4.0) > 0


def test_shift_overflow_raises(_triton_mode):
    cell = 2.0 * torch.eye(3, dtype=torch.float64).unsqueeze(0)
    pos = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 2.0 * 40000.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="int16"):
        _forward(_triton_mode, pos, cell, torch.tensor([2]), True, 1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("want", [(True, False), (False, True), (True, True)], ids=str)
def test_public_op(_triton_mode, dtype, want):
    pos, cell, num = _batch(50, dtype, skew=0.7, outside=2.0)
    pbc = torch.tensor([[True, True, True], [True, False, True], [True, True, True]])
    kw = dict(return_distances=want[0], return_vectors=want[1])
    dev = torch.device(DEVICE)
    got = neighbor_list(
        pos.to(dev),
        cell.to(dev),
        5.0,
        num_atoms=num.to(dev),
        pbc=pbc.to(dev),
        **kw,
        backend="triton",
    )
    cpp = neighbor_list(pos, cell, 5.0, num_atoms=num, pbc=pbc, **kw, backend="cpp")
    rows, order = canonical_pairs(got.i, got.j, got.shifts)
    cpp_rows, cpp_order = canonical_pairs(cpp.i, cpp.j, cpp.shifts)
    if dtype == torch.float64:
        np.testing.assert_array_equal(rows, cpp_rows)
        for name in ("distances", "vectors"):
            a, b = getattr(got, name), getattr(cpp, name)
            assert (a is None) == (b is None)
            if a is not None:
                assert_close(a.cpu()[order], b[cpp_order])
    out = (got.i, got.j, got.shifts)
    d = got.distances if got.distances is not None else torch.empty(0, dtype=dtype)
    v = got.vectors if got.vectors is not None else torch.empty(0, 3, dtype=dtype)
    _check_against(tuple(t.cpu() for t in (*out, d, v)), pos, cell, num, pbc, 5.0)


def test_gradcheck_fp64(_triton_mode):
    pos, cell, num = _batch(60, torch.float64, n_systems=1, atoms_range=(2, 2))
    dev = torch.device(DEVICE)
    pos = pos.to(dev).requires_grad_()
    cell = cell.to(dev).requires_grad_()

    def fn(p, c):
        r = neighbor_list(p, c, 3.5, return_vectors=True, backend="triton")
        return r.distances, r.vectors

    assert fn(pos, cell)[0].numel() > 0
    assert torch.autograd.gradcheck(fn, (pos, cell))


@pytest.mark.gpu
class TestAgainstCppOnGpu:
    """Compiled Triton and CUDA backends on CUDA tensors against the C++ core."""

    @staticmethod
    def _compare(backend, pos, cell, num, pbc, cutoff):
        got = neighbor_list(
            pos.cuda(),
            cell.cuda(),
            cutoff,
            num_atoms=num.cuda(),
            pbc=pbc.cuda(),
            return_vectors=True,
            backend=backend,
        )
        cpp = neighbor_list(
            pos.double(),
            cell.double(),
            cutoff,
            num_atoms=num,
            pbc=pbc,
            return_vectors=True,
            backend="cpp",
        )
        rows, order = canonical_pairs(got.i, got.j, got.shifts)
        cpp_rows, cpp_order = canonical_pairs(cpp.i, cpp.j, cpp.shifts)
        if pos.dtype == torch.float64:
            np.testing.assert_array_equal(rows, cpp_rows)
            assert_close(got.distances.cpu()[order], cpp.distances[cpp_order])
            assert_close(got.vectors.cpu()[order], cpp.vectors[cpp_order])
            return
        got_set = {tuple(r) for r in rows.tolist()}
        cpp_set = {tuple(r) for r in cpp_rows.tolist()}
        flips = got_set ^ cpp_set
        # float32 on the GPU: flips only in the band at the cutoff, and few of them.
        assert len(flips) <= max(MAX_FLIPS, len(cpp_rows) // 100_000)
        if flips:
            f = torch.tensor(sorted(flips), dtype=torch.int64)
            ptr = _ptr(num)
            vec = _pair_vectors(pos.double(), cell.double(), ptr, f)
            assert bool(((vec.norm(dim=-1) - cutoff).abs() <= BAND * cutoff).all())

    @pytest.fixture(params=["triton", "cuda"])
    def backend(self, request):
        if request.param == "cuda" and not dao.has_cuda_ext():
            pytest.skip("dao was built without CUDA")
        return request.param

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_mp20_batch(self, backend, dtype):
        pos, cell, num = _batch(70, dtype, n_systems=64, atoms_range=(1, 20), skew=0.6, outside=1)
        pbc = torch.ones(64, 3, dtype=torch.bool)
        pbc[::5, 2] = False
        self._compare(backend, pos, cell, num, pbc, 6.0)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("n_atoms", [1, 100, 1000, 10_000])
    def test_large_system(self, backend, dtype, n_atoms):
        rng = np.random.default_rng(n_atoms)
        pos, cell, num = random_batch(rng, 1, (n_atoms, n_atoms), (10.0, 12.0), 0.4, dtype=dtype)
        self._compare(backend, pos, cell, num, torch.ones(1, 3, dtype=torch.bool), 5.0)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_small_cells_long_cutoff(self, backend, dtype):
        pos, cell, num = _batch(80, dtype, n_systems=16, atoms_range=(1, 4), skew=1.0)
        self._compare(backend, pos, cell, num, torch.ones(16, 3, dtype=torch.bool), 9.0)
