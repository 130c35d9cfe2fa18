"""DAO-P: labels, energies, guidance gradients and the guarded L-BFGS relaxation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import random_batch

from dao.daop import DAOP, energy_labels, relax
from dao.data.crystal import CrystalBatch
from dao.pretrained import build_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")


def _daop(energy_head: bool = True, seed: int = 0, **kw) -> DAOP:
    cfg = {
        "model": {
            "model": "crysformer",
            "num_layers": 2,
            "hidden": 16,
            "heads": 2,
            "num_freqs": 4,
            "time_dim": 8,
            "energy_head": energy_head,
        },
        "diffusion": {"timesteps": 10},
    }
    torch.manual_seed(seed)
    return DAOP(build_diffusion(cfg).double(), **kw).eval()


def _crystals(n=4, seed=0) -> CrystalBatch:
    rng = np.random.default_rng(seed)
    pos, cell, nums = random_batch(rng, n, atoms_range=(2, 6))
    types = torch.as_tensor(rng.integers(3, 40, size=int(nums.sum())))
    frac = torch.linalg.solve(
        cell.repeat_interleave(torch.as_tensor(nums), 0).transpose(1, 2), pos.unsqueeze(-1)
    ).squeeze(-1)
    return CrystalBatch(types, frac % 1.0, cell, torch.as_tensor(nums))


def test_energy_labels_prefer_first_column_and_fill_gaps():
    props = {
        "e_above_hull": torch.tensor([0.1, math.nan, math.nan]),
        "energy_above_hull": torch.tensor([0.9, 0.2, math.nan]),
    }
    got = energy_labels(props, 3)
    assert got[0] == pytest.approx(0.1) and got[1] == pytest.approx(0.2) and math.isnan(got[2])
    assert torch.isnan(energy_labels({"band_gap": torch.zeros(2)}, 2)).all()


def test_needs_an_energy_head():
    with pytest.raises(ValueError, match="energy_head"):
        _daop(energy_head=False)
    with pytest.raises(ValueError, match="energy_std"):
        _daop(energy_std=0.0)


def test_energy_is_destandardized_and_per_crystal():
    daop = _daop(energy_mean=0.5, energy_std=2.0)
    xs = _crystals()
    e = daop.energy(xs)
    raw = daop.standardized_energy(
        xs.atom_types, xs.frac_coords, xs.lattice, torch.zeros(len(xs), dtype=torch.long), xs.batch
    )
    torch.testing.assert_close(e, raw.double() * 2.0 + 0.5)
    # one crystal alone gives the same energy as inside the batch
    one = CrystalBatch(
        xs.atom_types[: xs.num_atoms[0]],
        xs.frac_coords[: xs.num_atoms[0]],
        xs.lattice[:1],
        xs.num_atoms[:1],
    )
    torch.testing.assert_close(daop.energy(one), e[:1])


def test_guidance_gradients_match_finite_differences():
    daop = _daop()
    xs = _crystals(3)
    t = torch.full((3,), 4, dtype=torch.long)
    fn = daop.guidance(xs.atom_types)
    gf, gl = fn(xs.frac_coords, xs.lattice, t, xs.batch)
    assert gf.shape == xs.frac_coords.shape and gl.shape == xs.lattice.shape

    def total(f, lat):
        with torch.no_grad():
            return daop.standardized_energy(xs.atom_types, f, lat, t, xs.batch).sum()

    h = 1e-6
    for idx in [(0, 0), (4, 2)]:
        d = torch.zeros_like(xs.frac_coords)
        d[idx] = h
        fd = (total(xs.frac_coords + d, xs.lattice) - total(xs.frac_coords - d, xs.lattice)) / (
            2 * h
        )
        assert float(gf[idx]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)
    d = torch.zeros_like(xs.lattice)
    d[1, 2, 0] = h
    fd = (total(xs.frac_coords, xs.lattice + d) - total(xs.frac_coords, xs.lattice - d)) / (2 * h)
    assert float(gl[1, 2, 0]) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)


def test_relax_never_increases_energy_and_keeps_shapes():
    daop = _daop(energy_mean=0.1, energy_std=0.3)
    xs = _crystals(5, seed=1)
    res = relax(daop, xs, steps=5, lr=0.05, keep_trajectory=True)
    assert res.crystals.frac_coords.shape == xs.frac_coords.shape
    assert (
        torch.isfinite(res.crystals.frac_coords).all()
        and torch.isfinite(res.crystals.lattice).all()
    )
    assert ((res.crystals.frac_coords >= 0) & (res.crystals.frac_coords < 1)).all()
    assert (res.energy_final <= res.energy_initial + 1e-12).all()
    assert (res.energy_final < res.energy_initial).any()  # it does move
    torch.testing.assert_close(res.energy_initial, daop.energy(xs))
    torch.testing.assert_close(res.energy_final, daop.energy(res.crystals))
    assert len(res.trajectory) == 6 and res.status == ["ok"] * 5
    assert res.iterations.tolist() == [5] * 5


def test_relax_stops_a_collapsing_cell_and_keeps_the_best_iterate():
    """An energy that rewards shrinking the cell drives the volume to zero: the
    guard freezes that crystal at its best valid iterate, the others go on."""
    daop = _daop()
    xs = _crystals(3, seed=2)
    inner = daop.standardized_energy

    def shrinking(types, frac, lattice, t, batch):
        e = inner(types, frac, lattice, t, batch)
        # crystal 0 gains energy with volume; the others keep the model's energy
        vol = torch.linalg.det(lattice)
        return e + torch.where(torch.arange(len(e)) == 0, 10.0 * vol.abs(), 0.0 * vol)

    daop.standardized_energy = shrinking
    res = relax(daop, xs, steps=20, lr=1.0)
    assert res.status[0].startswith("stopped: cell collapsed")
    vol = torch.linalg.det(res.crystals.lattice).abs()
    assert (
        vol[0] / xs.num_atoms[0] >= 1.0 and vol[0] >= 0.25 * torch.linalg.det(xs.lattice[0]).abs()
    )
    assert torch.isfinite(res.crystals.lattice).all()
    assert res.iterations[0] < res.iterations[1:].max()


def test_relax_stops_on_nan():
    daop = _daop()
    xs = _crystals(2, seed=3)
    inner = daop.standardized_energy
    calls = {"n": 0}

    def poisoned(types, frac, lattice, t, batch):
        calls["n"] += 1
        e = inner(types, frac, lattice, t, batch)
        if calls["n"] > 3:  # after a couple of iterations crystal 1 turns NaN
            e = torch.where(torch.arange(len(e)) == 1, e * math.nan, e)
        return e

    daop.standardized_energy = poisoned
    res = relax(daop, xs, steps=6, lr=0.05)
    assert res.status[1].startswith("stopped: energy or coordinates not finite")
    assert torch.isfinite(res.energy_final).all()
    assert torch.isfinite(res.crystals.frac_coords).all()


def test_relax_arguments():
    daop = _daop()
    with pytest.raises(ValueError, match="steps"):
        relax(daop, _crystals(1), steps=-1)
    with pytest.raises(ValueError, match="lr"):
        relax(daop, _crystals(1), lr=0.0)
    empty = relax(daop, CrystalBatch.empty(torch.float64))
    assert len(empty.status) == 0
