"""CrystalBatch: construction, conversions to/from pymatgen and ASE, validation."""

import numpy as np
import pytest
import torch
from ase.build import bulk
from pymatgen.core import Lattice, Structure

from dao.data import CrystalBatch


def _structures():
    nacl = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]]
    ).get_primitive_structure()
    tri = Structure(
        Lattice.from_parameters(4.1, 5.3, 6.2, 71.0, 83.0, 102.0),
        ["Si", "O", "O"],
        [[0.1, 0.2, 0.3], [0.6, 0.1, 0.9], [1.2, -0.3, 0.5]],  # outside [0, 1) on purpose
    )
    single = Structure(Lattice.hexagonal(2.5, 4.0), ["Cu"], [[0, 0, 0]])
    return [nacl, tri, single]


def test_roundtrip_pymatgen():
    structs = _structures()
    b = CrystalBatch.from_structures(structs)
    assert len(b) == 3 and b.num_nodes == sum(len(s) for s in structs)
    assert b.batch.tolist() == [0] * len(structs[0]) + [1] * 3 + [2]
    assert b.ptr.tolist() == [0, len(structs[0]), len(structs[0]) + 3, b.num_nodes]
    back = b.to_structures()
    for s, t in zip(structs, back, strict=True):
        assert [x.specie.Z for x in s] == [x.specie.Z for x in t]
        np.testing.assert_allclose(s.lattice.matrix, t.lattice.matrix, atol=1e-12)
        np.testing.assert_allclose(s.frac_coords, t.frac_coords, atol=1e-12)
    # cartesian coordinates use the row-vector convention x = f . L
    np.testing.assert_allclose(
        b.cart_coords.numpy(), np.concatenate([s.cart_coords for s in structs]), atol=1e-10
    )
    np.testing.assert_allclose(b.volumes.numpy(), [s.volume for s in structs], rtol=1e-12)


def test_roundtrip_ase():
    atoms = [bulk("Cu", "fcc", a=3.61), bulk("NaCl", "rocksalt", a=5.64, cubic=True)]
    b = CrystalBatch.from_atoms(atoms, dtype=torch.float32)
    assert b.frac_coords.dtype == torch.float32
    back = b.to_atoms()
    for a, c in zip(atoms, back, strict=True):
        assert list(a.numbers) == list(c.numbers)
        np.testing.assert_allclose(a.positions, c.positions, atol=1e-5)
        assert c.pbc.all()


def test_select_concat_getitem():
    b = CrystalBatch.from_structures(_structures())
    sub = b.select([2, 0])
    assert sub.num_atoms.tolist() == [1, b.num_atoms[0].item()]
    assert torch.equal(sub[1].atom_types, b[0].atom_types)
    assert torch.equal(CrystalBatch.concat([b[0], b[1], b[2]]).frac_coords, b.frac_coords)
    with pytest.raises(IndexError):
        b[3]
    assert len(b.select([])) == 0


def test_neighbor_list_method_matches_per_structure():
    structs = _structures()
    b = CrystalBatch.from_structures(structs)
    nl = b.neighbor_list(3.9)
    counts = torch.bincount(b.batch[nl.i.long()], minlength=3).tolist()
    for k, s in enumerate(structs):
        # 3.9, not 4.0: pymatgen counts r == cutoff (c = 4.0 here), we use r < cutoff
        centers, *_ = s.get_neighbor_list(3.9)
        assert counts[k] == len(centers)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(atom_types=[1, 2], frac_coords=torch.zeros(3, 3)), "frac_coords"),
        (dict(num_atoms=[3]), "sums to"),
        (dict(atom_types=[0, 1]), "atomic numbers"),
        (dict(lattice=torch.zeros(1, 3, 3, dtype=torch.float32)), "dtype"),
        (dict(atom_types=[1.0, 2.0]), "integers"),
    ],
)
def test_bad_input(kwargs, msg):
    good = dict(
        atom_types=[1, 2],
        frac_coords=torch.zeros(2, 3, dtype=torch.float64),
        lattice=torch.eye(3, dtype=torch.float64)[None],
        num_atoms=[2],
    )
    good.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        CrystalBatch(**good)


def test_disordered_structure_rejected():
    s = Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    with pytest.raises(ValueError, match="disordered"):
        CrystalBatch.from_structures([s])


def test_to_converts_and_is_a_no_op_when_nothing_changes():
    b = CrystalBatch.from_structures(_structures())
    assert b.to(torch.float64) is b  # same dtype and device: the batch itself
    assert b.to("cpu", dtype=torch.float64) is b
    c = b.to(torch.float32)
    assert c is not b and c.frac_coords.dtype == c.lattice.dtype == torch.float32
    assert torch.equal(c.batch, b.batch) and c.atom_types.dtype == torch.int64
    torch.testing.assert_close(c.frac_coords.double(), b.frac_coords, atol=1e-6, rtol=0)
