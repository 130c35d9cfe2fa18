"""Template baseline (copy / substitute / rescale) and the ``dao evaluate`` command."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from dao.eval.baseline import (
    PoolEntry,
    TemplateBaseline,
    fit_element_volumes,
    parse_cif,
    read_csv_rows,
    read_pool,
)
from dao.eval.cli import add_evaluate_parser, load_predictions
from dao.eval.match import rms_dist
from dao.eval.validity import composition_counts, validity_many

FIXTURES = Path(__file__).parent / "fixtures"
POOL_CSV = FIXTURES / "mp_20_pilot_train_first300.csv.gz"
TEST_CSV = FIXTURES / "mp_20_pilot_test_slice30.csv.gz"


def _entry(mid: str, s: Structure, e_hull: float = 0.0) -> PoolEntry:
    counts = tuple(sorted(composition_counts(s).items()))
    return PoolEntry(mid, counts, float(s.volume), e_hull, s.to(fmt="cif"))


def _test_items():
    return [(r["material_id"], parse_cif(r["cif"])) for r in read_csv_rows(TEST_CSV)]


def test_fit_element_volumes_recovers_exact_volumes():
    true = {"Na": 20.0, "Cl": 25.0, "K": 30.0}
    rows = [{"Na": 1, "Cl": 1}, {"K": 2, "Cl": 2}, {"Na": 2, "K": 1}, {"Na": 4, "Cl": 4}]
    pool = [
        PoolEntry(f"x{k}", tuple(sorted(c.items())), sum(true[e] * n for e, n in c.items()), 0, "")
        for k, c in enumerate(rows)
    ]
    fit = fit_element_volumes(pool)
    assert fit == pytest.approx(true)


def test_read_pool_dedups_and_excludes():
    ids = [r["material_id"] for r in read_csv_rows(POOL_CSV)]
    pool = read_pool([POOL_CSV, POOL_CSV], exclude_ids=ids[:10])
    got = [p.material_id for p in pool]
    assert got == ids[10:]  # second copy of the file adds nothing
    # the header-only index agrees with a full parse
    for p in pool[:5]:
        s = parse_cif(p.cif)
        assert dict(p.counts) == composition_counts(s)
        assert p.volume == pytest.approx(s.volume, rel=1e-6)
        assert np.isfinite(p.e_above_hull)


def test_substitution_maps_by_amount_then_electronegativity():
    srtio3 = Structure.from_spacegroup(
        "Pm-3m", Lattice.cubic(3.9), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5] * 3, [0.5, 0.5, 0]]
    )
    li2o = Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(4.6), ["Li", "O"], [[0.25] * 3, [0, 0, 0]]
    ).get_primitive_structure()
    vols = {"Ba": 40.0, "Zr": 20.0, "O": 12.0, "Na": 25.0, "S": 30.0}
    model = TemplateBaseline([_entry("p1", srtio3), _entry("p2", li2o)], element_volumes=vols)
    (pred,) = model.predict({"Ba": 1, "Zr": 1, "O": 3})
    # equal amounts (Sr, Ti): electronegativity orders them, Sr < Ti and Ba < Zr
    assert pred.method == "substitute" and pred.source_id == "p1"
    assert pred.mapping == {"Sr": "Ba", "Ti": "Zr", "O": "O"}
    assert composition_counts(pred.structure) == {"Ba": 1, "Zr": 1, "O": 3}
    assert pred.structure.volume == pytest.approx(40 + 20 + 3 * 12)
    (pred,) = model.predict({"Na": 2, "S": 1})
    assert pred.mapping == {"Li": "Na", "O": "S"}  # by amount
    assert pred.structure.volume == pytest.approx(2 * 25 + 30)
    # a supercell is built when the requested cell holds several primitive cells
    (pred,) = model.predict({"Na": 8, "S": 4})
    assert composition_counts(pred.structure) == {"Na": 8, "S": 4}
    assert model.predict({"Na": 1, "Cl": 1}) == []  # no AB template


def test_copy_wins_and_matches_exactly():
    (mid, s), *_ = _test_items()
    pool = read_pool([POOL_CSV]) + [_entry("copy-of-" + mid, s, e_hull=0.05)]
    model = TemplateBaseline(pool)
    preds = model.predict(s, k=3)
    assert preds[0].method == "copy" and preds[0].source_id == "copy-of-" + mid
    assert rms_dist(preds[0].structure, s) == pytest.approx(0.0, abs=1e-6)
    assert preds[0].structure.volume == pytest.approx(s.volume)  # copies keep their cell


def test_baseline_on_a_small_slice_gives_valid_structures_of_the_right_composition():
    items = _test_items()
    pool = read_pool([POOL_CSV], exclude_ids=[m for m, _ in items])
    model = TemplateBaseline(pool)
    preds = {m: model.predict(s) for m, s in items}
    made = {m: p[0] for m, p in preds.items() if p}
    assert len(made) >= 25
    gt = dict(items)
    for m, p in made.items():
        assert composition_counts(p.structure) == composition_counts(gt[m])
        if p.method == "substitute":
            want = model.predicted_volume(composition_counts(gt[m]))
            assert p.structure.volume == pytest.approx(want)
    val = validity_many([p.structure for p in made.values()])
    assert all(v.struct_valid for v in val)
    gt_val = validity_many([gt[m] for m in made])
    assert [v.comp_valid for v in val] == [v.comp_valid for v in gt_val]


def test_load_predictions_from_cif_folder_and_jsonl(tmp_path):
    (m0, s0), (m1, s1), (m2, s2) = _test_items()[:3]
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / f"{m0}__0.cif").write_text(s0.to(fmt="cif"))
    (folder / f"{m0}__2.cif").write_text(s0.to(fmt="cif"))
    (folder / f"{m1}__0.cif").write_text("not a cif")
    jl = tmp_path / "preds.jsonl"
    rows = [
        {"material_id": m2, "cif": s2.to(fmt="cif")},
        {
            "material_id": m2,
            "lattice": s2.lattice.matrix.tolist(),
            "frac_coords": s2.frac_coords.tolist(),
            "atom_types": [site.specie.Z for site in s2],
        },
    ]
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preds = load_predictions([folder, jl])
    assert [p is None for p in preds[m0]] == [False, True, False]  # sample 1 missing
    assert preds[m1] == [None]  # unreadable: a missing sample
    assert len(preds[m2]) == 2 and all(
        rms_dist(p, s2) == pytest.approx(0, abs=1e-6) for p in preds[m2]
    )


def test_cli_evaluate_predictions_beside_the_baseline(tmp_path, capsys):
    items = _test_items()
    folder = tmp_path / "cifs"
    folder.mkdir()
    for m, s in items:
        (folder / f"{m}__0.cif").write_text(s.to(fmt="cif"))  # perfect predictions
    parser = argparse.ArgumentParser(prog="dao")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "res.jsonl"
    args = parser.parse_args(
        ["evaluate", str(TEST_CSV), "--predictions", str(folder), "--pool", str(POOL_CSV)]
        + ["--subset", "6", "--seed", "1", "--workers", "2", "--timeout", "30"]
        + ["--out", str(out), "--no-progress"]
    )
    assert args.func(args) == 0
    summary = json.loads((tmp_path / "res.summary.json").read_text())
    assert summary["num_test"] == 6 and summary["subset"] == {"n": 6, "seed": 1}
    assert summary["match_rate_unfiltered"] == 1.0
    assert summary["baseline"]["num_test"] == 6
    assert summary["below_baseline"] is False
    assert len(out.read_text().splitlines()) == 6
    assert len((tmp_path / "res.baseline.jsonl").read_text().splitlines()) == 6
    text = capsys.readouterr().out
    assert "valid-filtered" in text and "unfiltered" in text and "floor to beat" in text
