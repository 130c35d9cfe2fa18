"""The stability-proxy plumbing with a stand-in optimiser (CHGNet itself is an
optional third-party model and is not needed by the test suite)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from dao.eval.stability import relaxed_energy_per_atom, stability_proxy

FIXTURES = Path(__file__).parent / "fixtures"


class FakeOptimizer:
    """Energy per atom = -volume per atom / 10; raises on one formula."""

    def relax(self, structure, fmax, steps, verbose):
        if structure.composition.reduced_formula == "Boom":
            raise RuntimeError("boom")
        e = -structure.volume / 10.0
        traj = SimpleNamespace(energies=[0.0, e])
        return {"final_structure": structure, "trajectory": traj}


def test_relaxed_energy_and_failures():
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(2.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    assert relaxed_energy_per_atom(FakeOptimizer(), s) == -8.0 / 10.0 / 2
    bad = SimpleNamespace(composition=SimpleNamespace(reduced_formula="Boom"))
    assert math.isnan(relaxed_energy_per_atom(FakeOptimizer(), bad))


def test_stability_proxy_compares_runs_against_ground_truth(tmp_path):
    gt = next(FIXTURES.glob("*test*.csv*"))
    from dao.data.csv import read_csv_rows
    from dao.eval.baseline import parse_cif

    rows = list(read_csv_rows(gt)[1])[:3]
    # run "same": the ground truth itself (dE = 0); run "big": cells scaled up 10 %
    same, big = tmp_path / "same.jsonl", tmp_path / "big.jsonl"
    with same.open("w") as f1, big.open("w") as f2:
        for r in rows:
            s = parse_cif(r["cif"])
            f1.write(json.dumps({"material_id": r["material_id"], "cif": s.to(fmt="cif")}) + "\n")
            s2 = s.copy()
            s2.scale_lattice(s.volume * 1.1)
            f2.write(json.dumps({"material_id": r["material_id"], "cif": s2.to(fmt="cif")}) + "\n")
    out = tmp_path / "stab.json"
    rep = stability_proxy(gt, {"same": [same], "big": [big]}, out, optimizer=FakeOptimizer())
    n_gt = len(list(read_csv_rows(gt)[1]))
    assert rep["same"]["n"] == 3 and rep["same"]["failed_or_missing"] == n_gt - 3
    assert abs(rep["same"]["mean_dE_eV_per_atom"]) < 1e-9
    assert rep["big"]["mean_dE_eV_per_atom"] < 0  # bigger cells: lower fake energy
    assert json.loads(out.read_text())["big"]["n"] == 3
