"""`dao predict` and `dao relax` on files and CSVs, with a tiny untrained DAO-P."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import write_tiny_daog, write_tiny_daop
from pymatgen.core import Lattice, Structure
from pymatgen.core.operations import SymmOp

from dao.cli import main
from dao.pretrained import load_daop

FIXTURES = Path(__file__).parents[1] / "eval" / "fixtures"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_tiny_daop(tmp_path_factory.mktemp("w") / "daop.safetensors")


@pytest.fixture
def files(tmp_path):
    nacl = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    si = Structure(Lattice.cubic(5.43), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    a, b = tmp_path / "nacl.cif", tmp_path / "POSCAR"
    nacl.to(filename=str(a))
    si.to(filename=str(b), fmt="poscar")
    bad = tmp_path / "broken.cif"
    bad.write_text("data_x\n_cell_length_a 1\n")
    return a, b, bad


def test_predict_files_and_csv(weights, files, tmp_path, capsys):
    out = tmp_path / "pred.csv"
    gt = next(FIXTURES.glob("*test*.csv*"))
    rc = main(["predict", *map(str, files), str(gt), "--weights", str(weights), "-o", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert rows[0]["formula"] == "NaCl" and rows[1]["formula"] == "Si"
    assert len(rows) > 2  # the CSV's crystals follow
    assert "skipped" in capsys.readouterr().err  # the broken file, reported
    # the energies are the model's, de-standardised, and independent of the batch
    daop, _ = load_daop(weights)
    from dao.daop.cli import read_structures
    from dao.data.crystal import canonical_batch

    _, structures, _ = read_structures([files[0]])
    batch, _, _ = canonical_batch(structures)
    with torch.no_grad():
        e = float(daop.energy(batch)[0])
    assert float(rows[0]["e_above_hull_pred_eV_per_atom"]) == pytest.approx(e, abs=1e-5)
    js = tmp_path / "pred.json"
    main(["predict", str(files[0]), "--weights", str(weights), "-o", str(js)])
    assert json.loads(js.read_text())[0]["formula"] == "NaCl"


def test_predict_is_invariant_to_the_cell_setting(weights, tmp_path):
    """A rotated copy gives the same energy
    (canonicalisation + an O(3)-invariant model)."""
    s = Structure(
        Lattice.hexagonal(3.2, 5.1), ["Zn", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.38]]
    )
    t = s.copy()
    t.apply_operation(SymmOp.from_axis_angle_and_translation([1, 2, 3], 40))
    out = []
    for k, x in enumerate((s, t)):
        f = tmp_path / f"{k}.cif"
        x.to(filename=str(f))
        main(["predict", str(f), "--weights", str(weights), "-o", str(tmp_path / f"{k}.json")])
        out.append(
            json.loads((tmp_path / f"{k}.json").read_text())[0]["e_above_hull_pred_eV_per_atom"]
        )
    assert out[0] == pytest.approx(out[1], abs=1e-4)


def test_relax_writes_structures_and_a_table(weights, files, tmp_path):
    out = tmp_path / "relaxed"
    rc = main(
        ["relax", str(files[0]), str(files[1]), "--weights", str(weights), "-o", str(out),
         "--steps", "3", "--lr", "0.05", "--trajectory"]
    )  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader((out / "relax.csv").read_text().splitlines()))
    assert len(rows) == 2
    for r in rows:
        assert float(r["e_final"]) <= float(r["e_initial"]) + 1e-9
        s = Structure.from_file(out / r["file"])
        assert s.volume > 1.0
        assert (out / r["file"].replace("_relaxed.cif", "_trajectory.xyz")).exists()


def test_daog_weights_are_not_daop(tmp_path):
    w = write_tiny_daog(tmp_path / "g.safetensors")
    with pytest.raises(ValueError, match="no DAO-P label statistics"):
        load_daop(w)


def test_relax_dataset_rewrites_only_the_unstable_rows(weights, tmp_path):
    import gzip

    from dao.data.csv import load_csv, read_csv_rows

    # a small CSV with labels on both sides of the window
    src = next(FIXTURES.glob("*train*.csv*"))
    cols, rows = read_csv_rows(src)
    rows = list(rows)[:12]
    for k, r in enumerate(rows):
        r["e_above_hull"] = str([0.01, 0.1, 0.3, 0.6][k % 4])
    inp = tmp_path / "in.csv.gz"
    with gzip.open(inp, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out.csv.gz"
    rc = main(["relax-dataset", str(inp), str(out), "--weights", str(weights), "-q",
               "--lr", "0.05"])  # fmt: skip
    assert rc == 0
    _, new = read_csv_rows(out)
    new = list(new)
    assert len(new) == len(rows)
    for old, r in zip(rows, new, strict=True):
        e = float(old["e_above_hull"])
        relaxed = 0.08 < e <= 0.5
        assert r["dao_relaxed"] == ("1" if relaxed else "0")
        assert r["material_id"] == old["material_id"]
        if relaxed:
            assert float(r["dao_e_after"]) <= float(r["dao_e_before"]) + 1e-9
        else:
            assert r["cif"] == old["cif"]
    # the output reads back with the training data code
    data = load_csv(out, cache_dir=tmp_path / "cache", workers=0, progress=False)
    assert len(data.num_atoms) == len(rows)


def test_energy_mae_command(weights, capsys):
    gt = next(FIXTURES.glob("*test*.csv*"))
    assert main(["energy-mae", str(gt), "--weights", str(weights)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["n"] > 10 and rep["mae_eV_per_atom"] >= 0
    assert rep["mae_predict_training_mean"] >= 0
