"""Physics contracts of ``dao.ops.neighbor_list``, as Hypothesis property tests.

Systems are drawn from a seed (so Hypothesis never builds pairs sitting exactly
on the cutoff); the structural choices (atom count, skew, cutoff, periodicity,
transform) are drawn by Hypothesis itself. Two lists of the same physical
system are compared by ``_assert_same_list``: identical (i, j, shift) sets and
distances, except for pairs within a relative 1e-9 of the cutoff, which
rounding may move across it.
"""

from __future__ import annotations

import numpy as np
import torch
from helpers import assert_close, canonical_pairs, pair_keys, random_cell, sorted_pairs
from hypothesis import given, settings
from hypothesis import strategies as st

from dao.ops import neighbor_list

SETTINGS = settings(max_examples=25, deadline=None, database=None)
EDGE = 1e-9  # relative band around the cutoff where a pair may appear in one list only


def _system(seed: int, n: int, skew: float, outside: int):
    rng = np.random.default_rng(seed)
    cell = random_cell(rng, float(n * rng.uniform(8.0, 20.0)), skew)
    frac = rng.random((n, 3)) + rng.integers(-outside, outside + 1, (n, 3))
    return torch.tensor(frac @ cell), torch.tensor(cell), rng


systems = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "n": st.integers(1, 12),
        "skew": st.sampled_from([0.0, 0.3, 1.0]),
        "outside": st.integers(0, 2),
    }
)
cutoffs = st.floats(1.5, 6.0)
pbcs = st.tuples(st.booleans(), st.booleans(), st.booleans())


def _list(pos, cell, cutoff, pbc=True, **kw):
    pbc = pbc if isinstance(pbc, bool) else torch.tensor(pbc)
    return neighbor_list(pos, cell, cutoff, pbc=pbc, return_vectors=True, **kw)


def _assert_same_list(rows_a, d_a, rows_b, d_b, cutoff):
    """Same (i, j, S) rows and distances, up to pairs at the cutoff (relative EDGE)."""
    index_b = {k: n for n, k in enumerate(pair_keys(rows_b))}
    keys_a = pair_keys(rows_a)
    in_b = np.array([k in index_b for k in keys_a], dtype=bool)
    only_a = d_a[~in_b]
    common_b = np.array(
        [index_b[k] for k, hit in zip(keys_a, in_b, strict=True) if hit], dtype=np.int64
    )
    only_b = np.delete(d_b, common_b)
    for extra in (only_a, only_b):
        assert np.all(np.abs(extra - cutoff) <= EDGE * cutoff), (
            f"{extra.size} pairs in one list only, at distances {extra[:5]}"
        )
    assert_close(torch.as_tensor(d_a[in_b]), torch.as_tensor(d_b[common_b]))


@SETTINGS
@given(systems, cutoffs, pbcs, st.data())
def test_permuting_atoms_permutes_pairs(sys, cutoff, pbc, data):
    pos, cell, _ = _system(**sys)
    perm = torch.tensor(data.draw(st.permutations(range(pos.shape[0]))))
    rows, d, _ = sorted_pairs(_list(pos, cell, cutoff, pbc))
    nl = _list(pos[perm], cell, cutoff, pbc)
    # New atom k is old atom perm[k]; shifts refer to positions, so they stay.
    i, j = perm[nl.i.long()], perm[nl.j.long()]
    back, order = canonical_pairs(i, j, nl.shifts)
    _assert_same_list(back, nl.distances.numpy()[order], rows, d, cutoff)


@SETTINGS
@given(systems, cutoffs, pbcs, st.tuples(*[st.floats(-20.0, 20.0)] * 3))
def test_rigid_translation_changes_nothing(sys, cutoff, pbc, t):
    """r_j - r_i is unchanged, so are S (relative to the positions) and distances."""
    pos, cell, _ = _system(**sys)
    rows, d, v = sorted_pairs(_list(pos, cell, cutoff, pbc))
    moved = sorted_pairs(_list(pos + torch.tensor(t, dtype=pos.dtype), cell, cutoff, pbc))
    _assert_same_list(moved[0], moved[1], rows, d, cutoff)


@SETTINGS
@given(systems, cutoffs, pbcs, st.integers(0, 2**32 - 1))
def test_lattice_translation_of_atoms_moves_shifts(sys, cutoff, pbc, seed):
    """Moving atom k by n_k . L (periodic axes) turns (i, j, S) into (i, j, S + n_i - n_j)
    and leaves the (i, j, distance) multiset unchanged."""
    pos, cell, _ = _system(**sys)
    rng = np.random.default_rng(seed)
    n = torch.tensor(rng.integers(-3, 4, (pos.shape[0], 3)) * np.array(pbc, dtype=np.int64))
    nl = _list(pos, cell, cutoff, pbc)
    moved = sorted_pairs(_list(pos + n.double() @ cell, cell, cutoff, pbc))
    i, j = nl.i.long(), nl.j.long()
    expect, order = canonical_pairs(i, j, nl.shifts.long() + n[i] - n[j])
    # Row by row, so the (i, j, distance) multiset is unchanged too.
    _assert_same_list(moved[0], moved[1], expect, nl.distances.numpy()[order], cutoff)


@st.composite
def unimodular(draw):
    """An integer 3 x 3 matrix of determinant +-1: a product of elementary shears
    (row r += k row q) and possibly an axis swap."""
    m = np.eye(3, dtype=np.int64)
    for _ in range(draw(st.integers(1, 3))):
        r, q = draw(st.permutations(range(3)))[:2]
        k = draw(st.integers(-2, 2))
        m[r] += k * m[q]
    if draw(st.booleans()):
        m = m[[1, 0, 2]]
    return m


@SETTINGS
@given(systems, cutoffs, unimodular())
def test_equivalent_sheared_cell(sys, cutoff, m):
    """L' = M L spans the same lattice: S . L = S' . L' with S' = S M^-1."""
    pos, cell, _ = _system(**sys)
    rows, d, _ = sorted_pairs(_list(pos, cell, cutoff))
    sheared = torch.tensor(m, dtype=cell.dtype) @ cell
    nl = _list(pos, sheared, cutoff)
    m_inv = np.rint(np.linalg.inv(m)).astype(np.int64)
    assert (m_inv @ m == np.eye(3)).all()
    # vector = r_j - r_i + S' . L' = r_j - r_i + (S' M) . L, so S = S' M.
    back, order = canonical_pairs(nl.i, nl.j, nl.shifts.numpy().astype(np.int64) @ m)
    _assert_same_list(back, nl.distances.numpy()[order], rows, d, cutoff)


@SETTINGS
@given(systems, st.floats(1.5, 4.5), pbcs, st.sampled_from([(2, 1, 1), (1, 2, 1), (2, 2, 2)]))
def test_supercell_consistency(sys, cutoff, pbc, reps):
    """Every copy of atom k in a supercell has the neighbour count and the sorted
    distances of atom k in the primitive cell (replicated along periodic axes)."""
    pos, cell, _ = _system(**sys)
    reps = tuple(r if p else 1 for r, p in zip(reps, pbc, strict=True))
    n = pos.shape[0]
    grid = torch.stack(
        torch.meshgrid(*[torch.arange(r, dtype=pos.dtype) for r in reps], indexing="ij"), -1
    ).reshape(-1, 3)
    big_pos = (pos[None] + (grid @ cell)[:, None]).reshape(-1, 3)  # copy c of atom k: c * n + k
    big_cell = torch.tensor(reps, dtype=cell.dtype)[:, None] * cell
    small = neighbor_list(pos, cell, cutoff, pbc=torch.tensor(pbc))
    big = neighbor_list(big_pos, big_cell, cutoff, pbc=torch.tensor(pbc))
    copies = grid.shape[0]
    count_small = torch.bincount(small.i.long(), minlength=n)
    count_big = torch.bincount(big.i.long(), minlength=n * copies)
    assert torch.equal(count_big, count_small.repeat(copies))

    def per_atom(nl, n_atoms):
        order = np.lexsort((nl.distances.numpy(), nl.i.numpy()))
        return nl.distances[order], nl.i[order]

    d_small, _ = per_atom(small, n)
    d_big, i_big = per_atom(big, n * copies)
    for c in range(copies):
        mine = (i_big >= c * n) & (i_big < (c + 1) * n)
        assert_close(d_big[mine], d_small)


@SETTINGS
@given(systems, cutoffs, pbcs, st.integers(0, 2**32 - 1))
def test_rotation_invariance(sys, cutoff, pbc, seed):
    """Rotating positions and cell together keeps (i, j, S) and distances; vectors rotate."""
    pos, cell, _ = _system(**sys)
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    rot = torch.tensor(q * np.sign(np.diag(r)))  # row vectors: x' = x R^T
    rows, d, v = sorted_pairs(_list(pos, cell, cutoff, pbc))
    rr, rd, rv = sorted_pairs(_list(pos @ rot.T, cell @ rot.T, cutoff, pbc))
    _assert_same_list(rr, rd, rows, d, cutoff)
    if rr.shape == rows.shape and (rr == rows).all():
        assert_close(torch.as_tensor(rv), torch.as_tensor(v) @ rot.T)


@SETTINGS
@given(st.lists(systems, min_size=1, max_size=5), cutoffs, st.integers(0, 2**32 - 1))
def test_batched_equals_one_by_one(many, cutoff, seed):
    rng = np.random.default_rng(seed)
    parts = [_system(**s)[:2] for s in many]
    pbc = torch.tensor(rng.random((len(parts), 3)) < 0.7)
    pos = torch.cat([p for p, _ in parts])
    cell = torch.stack([c for _, c in parts])
    num = torch.tensor([p.shape[0] for p, _ in parts])
    batched = sorted_pairs(neighbor_list(pos, cell, cutoff, num_atoms=num, pbc=pbc))
    rows, dist, start = [], [], 0
    for s, (p, c) in enumerate(parts):
        one = neighbor_list(p, c, cutoff, pbc=pbc[s])
        r, o = canonical_pairs(one.i, one.j, one.shifts)
        r[:, :2] += start
        rows.append(r)
        dist.append(one.distances.numpy()[o])
        start += p.shape[0]
    np.testing.assert_array_equal(batched[0], np.concatenate(rows))
    assert_close(torch.as_tensor(batched[1]), torch.as_tensor(np.concatenate(dist)))
