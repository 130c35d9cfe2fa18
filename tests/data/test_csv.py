"""Reading CDVAE/DiffCSP CSVs: parsing, canonical lattices, failures, the processed cache."""

import csv
import gzip
import io
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import spglib
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from dao.data import csv as dcsv
from dao.data.csv import (
    PROCESSING_VERSION,
    canonicalize,
    load_csv,
    load_processed,
    parse_cif,
    process_csv,
    read_csv_rows,
    read_material_ids,
    save_processed,
)

FIXTURES = Path(__file__).parent / "fixtures"
PILOT_TEST = FIXTURES / "mp_20_pilot" / "test.csv.gz"
MPTS = FIXTURES / "mpts_52" / "val.csv.gz"
PEROV = FIXTURES / "perov_5" / "val.csv.gz"


def _write_csv(path: Path, header, rows, gz: bool = False) -> Path:
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def _fixture_rows(path: Path):
    with gzip.open(path, "rt", newline="") as fh:
        r = csv.reader(fh)
        return next(r), list(r)


def _sorted_distances(s: Structure) -> np.ndarray:
    # all periodic distances up to 6 A from every site: invariant under any isometry
    return np.sort(np.concatenate([[n.nn_distance for n in s.get_neighbors(x, 6.0)] for x in s]))


# --------------------------------------------------------------------- reading
def test_read_rows_drops_index_column_and_reads_gzip():
    cols, rows = read_csv_rows(PILOT_TEST)
    assert cols[0] == "material_id" and "Unnamed: 0" not in cols and "cif" in cols
    rows = list(rows)
    assert len(rows) == 14 and rows[0]["material_id"] == "mp-10009"
    cols, rows = read_csv_rows(MPTS)  # unnamed index column
    assert "" not in cols and len(list(rows)) == 11
    assert read_material_ids(PEROV) == ["18517", "15400", "3409", "8226"]


def test_read_plain_csv_and_huge_fields(tmp_path):
    header, rows = _fixture_rows(PEROV)
    big = rows[0].copy()
    big[header.index("cif")] += "#" + "x" * 300_000 + "\n"  # beyond csv's default field limit
    p = _write_csv(tmp_path / "plain.csv", header, [big, rows[1]])
    out = process_csv(p, workers=0, progress=False)
    assert len(out) == 2 and not out.failures
    assert list(out.material_ids) == ["18517", "15400"]


def test_missing_columns_is_a_clear_error(tmp_path):
    p = _write_csv(tmp_path / "bad.csv", ["id", "structure"], [["a", "b"]])
    with pytest.raises(ValueError, match="material_id"):
        read_csv_rows(p)


# ------------------------------------------------------------------ structures
def test_canonical_lattice_same_crystal():
    header, rows = _fixture_rows(FIXTURES / "carbon_24" / "test.csv.gz")
    cif_col = header.index("cif")
    sm = StructureMatcher(ltol=1e-3, stol=1e-3, angle_tol=1e-2, primitive_cell=False, scale=False)
    for row in rows:
        original = Structure.from_str(row[cif_col], fmt="cif")
        z, f, lat = parse_cif(row[cif_col])
        rebuilt = Structure(Lattice(lat), z.tolist(), f)
        # canonical: the lattice is Lattice.from_parameters of its own parameters
        np.testing.assert_allclose(
            lat, Lattice.from_parameters(*rebuilt.lattice.parameters).matrix, atol=1e-10
        )
        assert np.all((f >= 0) & (f < 1))
        assert abs(rebuilt.volume - original.volume) < 1e-6 * original.volume
        assert sm.fit(original, rebuilt)
        np.testing.assert_allclose(
            _sorted_distances(rebuilt), _sorted_distances(original), atol=1e-6
        )


@pytest.fixture(autouse=True)
def _spglib_new_errors(monkeypatch):
    # spglib 2.x warns (DeprecationWarning) unless its new error handling is chosen
    monkeypatch.setenv("SPGLIB_OLD_ERROR_HANDLING", "false")


def _spacegroup(z, frac, lat) -> int:
    return spglib.get_symmetry_dataset((lat, frac, z), symprec=1e-3).number


def test_canonicalize_keeps_handedness():
    # alpha-quartz, P3_121 (152); its mirror image is P3_221 (154). StructureMatcher
    # cannot tell them apart, the space group can.
    quartz = Structure.from_spacegroup(
        152,
        Lattice.hexagonal(4.913, 5.405),
        ["Si", "O"],
        [[0.4697, 0, 0], [0.4135, 0.2669, 0.1191]],
    )
    z0 = np.array(quartz.atomic_numbers)
    assert _spacegroup(z0, quartz.frac_coords, quartz.lattice.matrix) == 152
    # the same crystal described with a left-handed cell (a and b swapped) ...
    left = Structure(
        Lattice(quartz.lattice.matrix[[1, 0, 2]]), quartz.species, quartz.frac_coords[:, [1, 0, 2]]
    )
    assert np.linalg.det(left.lattice.matrix) < 0
    for s in (quartz, left, left.make_supercell([[1, 1, 0], [0, 1, 0], [0, 0, 1]], in_place=False)):
        z, f, lat = canonicalize(s)
        assert np.linalg.det(lat) > 0
        assert _spacegroup(z, f, lat) == 152


def test_canonicalize_left_handed_niggli_cell(monkeypatch):
    # Force the branch where the Niggli cell itself is left-handed.
    quartz = Structure.from_spacegroup(
        152,
        Lattice.hexagonal(4.913, 5.405),
        ["Si", "O"],
        [[0.4697, 0, 0], [0.4135, 0.2669, 0.1191]],
    )
    left = Structure(
        Lattice(quartz.lattice.matrix[[1, 0, 2]]), quartz.species, quartz.frac_coords[:, [1, 0, 2]]
    )
    monkeypatch.setattr(Structure, "get_reduced_structure", lambda self, reduction_algo: self)
    z, f, lat = canonicalize(left)
    assert np.linalg.det(lat) > 0 and _spacegroup(z, f, lat) == 152


def test_disordered_and_bad_cifs_rejected():
    s = Structure(Lattice.cubic(4.0), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    with pytest.raises(ValueError, match="disordered"):
        canonicalize(s)
    with pytest.raises(ValueError, match="CIF"):
        parse_cif("data_broken\n_cell_length_a 3\n")


def test_failed_rows_are_logged_and_skipped(tmp_path, caplog):
    header, rows = _fixture_rows(PEROV)
    cif_col, id_col = header.index("cif"), header.index("material_id")
    broken = rows[1].copy()
    broken[cif_col] = "data_nothing\nloop_\n_atom_site_label\nX\n"
    no_id = rows[2].copy()
    no_id[id_col] = ""
    p = _write_csv(tmp_path / "mixed.csv.gz", header, [rows[0], broken, no_id, rows[3]], gz=True)
    with caplog.at_level(logging.WARNING, logger="dao.data.csv"):
        out = process_csv(p, workers=0, progress=False)
    assert list(out.material_ids) == ["18517", "8226"]
    assert out.row_index.tolist() == [0, 3]
    assert [f[:2] for f in out.failures] == [(1, "15400"), (2, "")]
    assert "15400" in caplog.text and "2 of 4 rows failed" in caplog.text


def test_properties_numeric_columns_with_nan(tmp_path):
    header, rows = _fixture_rows(PILOT_TEST)
    e_col = header.index("e_above_hull")
    rows = [r.copy() for r in rows[:3]]
    rows[1][e_col] = ""
    p = _write_csv(tmp_path / "props.csv", header, rows)
    out = process_csv(p, workers=0, progress=False)
    # numeric columns only: pretty_formula / elements (strings) are not properties
    assert sorted(out.props) == [
        "band_gap",
        "e_above_hull",
        "formation_energy_per_atom",
        "spacegroup.number",
    ]
    e = out.props["e_above_hull"]
    assert e.dtype == np.float64 and np.isnan(e[1]) and e[0] == 0.0
    np.testing.assert_allclose(out.props["formation_energy_per_atom"][0], -0.5750923537499997)
    mpts = process_csv(MPTS, workers=0, progress=False, max_rows=2)
    assert {"energy_above_hull", "formation_energy_per_atom", "year"} <= set(mpts.props)


def test_process_arrays_layout():
    out = process_csv(PILOT_TEST, workers=0, progress=False)
    assert len(out) == 14 and out.num_rows == 14
    assert out.atom_types.dtype == np.int8 and out.atom_types.shape == (out.num_atoms.sum(),)
    assert out.frac_coords.shape == (out.num_atoms.sum(), 3)
    assert out.lattice.shape == (14, 3, 3)
    assert out.num_atoms.tolist()[:3] == [8, 4, 2]
    assert out.material_ids[0] == "mp-10009"


def test_worker_processes_match_serial():
    serial = process_csv(PILOT_TEST, workers=0, progress=False)
    parallel = process_csv(PILOT_TEST, workers=2, progress=False, chunk_size=4)
    for name in ("atom_types", "frac_coords", "lattice", "num_atoms", "material_ids"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(parallel, name))


# ----------------------------------------------------------------------- cache
def test_cache_roundtrip_and_reuse(tmp_path, monkeypatch):
    first = load_csv(PILOT_TEST, cache_dir=tmp_path, workers=0, progress=False)
    files = list((tmp_path / "processed").iterdir())
    assert [f.name for f in files] == [f"{first.sha256}.v{PROCESSING_VERSION}.npz"]

    def boom(*a, **k):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(dcsv, "process_csv", boom)
    again = load_csv(PILOT_TEST, cache_dir=tmp_path, workers=0, progress=False)
    for name in ("atom_types", "frac_coords", "lattice", "num_atoms", "material_ids", "row_index"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert first.props.keys() == again.props.keys()
    for k in first.props:
        np.testing.assert_array_equal(first.props[k], again.props[k])


def test_cache_env_var_and_content_key(tmp_path, monkeypatch):
    monkeypatch.setenv("DAO_CACHE_DIR", str(tmp_path / "env"))
    header, rows = _fixture_rows(PEROV)
    p = _write_csv(tmp_path / "a.csv", header, rows[:2])
    a = load_csv(p, workers=0, progress=False)
    assert (tmp_path / "env" / "processed" / f"{a.sha256}.v{PROCESSING_VERSION}.npz").exists()
    _write_csv(p, header, rows[:3])  # same name, new content -> new key, reprocessed
    b = load_csv(p, workers=0, progress=False)
    assert len(b) == 3 and b.sha256 != a.sha256
    assert len(list((tmp_path / "env" / "processed").glob("*.npz"))) == 2


def test_cache_write_is_atomic_and_corrupt_file_is_replaced(tmp_path, monkeypatch, caplog):
    data = process_csv(PEROV, workers=0, progress=False)
    target = tmp_path / "processed" / "x.npz"

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        save_processed(data, target)
    monkeypatch.undo()
    assert os.listdir(target.parent) == []  # no partial file, no temp file left behind
    save_processed(data, target)
    assert os.listdir(target.parent) == ["x.npz"]
    np.testing.assert_array_equal(load_processed(target).lattice, data.lattice)

    cached = tmp_path / "processed" / f"{data.sha256}.v{PROCESSING_VERSION}.npz"
    cached.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="dao.data.csv"):
        out = load_csv(PEROV, cache_dir=tmp_path, workers=0, progress=False)
    assert len(out) == 4 and "unreadable cache" in caplog.text
    assert load_processed(cached).sha256 == data.sha256


def test_broken_worker_pool_falls_back_to_this_process(tmp_path, monkeypatch, caplog):
    # Workers re-import the __main__ module; make that impossible (as for code piped to
    # stdin) so the pool breaks, and check the rows are still all parsed, with a warning.
    main = sys.modules["__main__"]
    monkeypatch.setattr(main, "__spec__", None, raising=False)
    monkeypatch.setattr(main, "__file__", str(tmp_path / "gone.py"), raising=False)
    with caplog.at_level(logging.WARNING, logger="dao.data.csv"):
        out = process_csv(PEROV, workers=2, progress=False, chunk_size=1)
    assert list(out.material_ids) == ["18517", "15400", "3409", "8226"] and not out.failures
    assert "worker processes failed" in caplog.text
