"""Case-study reference structures (spec §8): cells, symmetry, provenance, exclusions."""

import csv
import dataclasses
import gzip
import math
import re
import warnings
from pathlib import Path

import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Composition, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

from dao.data.paths import data_root
from dao.eval.case_studies import (
    CASE_STUDIES,
    CaseStudy,
    ReferenceCell,
    ReferenceDataMissing,
    WyckoffSite,
    case_study_exclude_ids,
    get_case_study,
)

DATA_ROOT = data_root()

# The cited numbers, typed here a second time so that an edit of the module shows up.
# Cr3Os: mp-416, a = 4.64823 Å. Zr4Pd2O: mp-22479, primitive a = 8.89205162 Å, 60°.
CITED = {
    "Cr3Os": dict(conv_abc=4.64823, cell_abc=4.64823, cell_angle=90.0, n_cell=8, n_conv=8),
    "Zr4Pd2O": dict(
        conv_abc=8.89205162 * math.sqrt(2.0),
        cell_abc=8.89205162,
        cell_angle=60.0,
        n_cell=28,
        n_conv=112,
    ),
}
RECORDED = sorted(CITED)
MISSING = ["CsV3Sb5", "Zr4Rh2O"]
MP_FILES = {
    "Cr3Os": ("mp-416", "mp_20_biternary_subset/test.csv.gz"),
    "Zr4Pd2O": ("mp-22479", "mpts_52/val.csv.gz"),
}


@pytest.fixture(autouse=True)
def _spglib_new_errors(monkeypatch):
    # spglib 2.x warns (DeprecationWarning) unless its new error handling is chosen
    monkeypatch.setenv("SPGLIB_OLD_ERROR_HANDLING", "false")


def _spacegroup(structure: Structure) -> tuple[str, int]:
    sga = SpacegroupAnalyzer(structure, symprec=0.01)
    return sga.get_space_group_symbol(), sga.get_space_group_number()


def _min_distance(structure: Structure) -> float:
    neighbours = structure.get_all_neighbors(4.0)
    return min(n.nn_distance for site in neighbours for n in site)


def _read_cif_rows(path: Path):
    csv.field_size_limit(1 << 30)
    with gzip.open(path, "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        if "cif" not in (reader.fieldnames or []):
            return
        yield from reader


def _eta_cell(metal: str) -> ReferenceCell:
    """Zr4Pd2O's recorded geometry with another metal: a template check only."""
    ref = CASE_STUDIES["Zr4Pd2O"].reference
    assert ref is not None
    sites = tuple(
        WyckoffSite(metal if s.species == "Pd" else s.species, s.wyckoff, s.coords)
        for s in ref.sites
    )
    return dataclasses.replace(ref, sites=sites, source="test template")


def _kagome_cell(z_sb2: float) -> ReferenceCell:
    """A P6/mmm AV3Sb5-type cell of arbitrary size: a template check only, not CsV3Sb5's."""
    return ReferenceCell(
        a=6.0,
        b=6.0,
        c=10.0,
        alpha=90.0,
        beta=90.0,
        gamma=120.0,
        setting="P6/mmm",
        sites=(
            WyckoffSite("Cs", "1a", (0.0, 0.0, 0.0)),
            WyckoffSite("V", "3g", (0.5, 0.0, 0.5)),
            WyckoffSite("Sb", "1b", (0.0, 0.0, 0.5)),
            WyckoffSite("Sb", "4h", (1 / 3, 2 / 3, z_sb2)),
        ),
        kind="computed",
        source="test template",
    )


def test_names_and_paper_names():
    assert list(CASE_STUDIES) == ["CsV3Sb5", "Cr3Os", "Zr4Rh2O", "Zr4Pd2O"]
    assert {c.paper_name for c in CASE_STUDIES.values()} == {
        "CsV3Sb5",
        "Cr6Os2",
        "Zr16Rh8O4",
        "Zr16Pd8O4",
    }
    for name, case in CASE_STUDIES.items():
        assert case.name == name
        assert Composition(case.formula).reduced_formula == name
        assert Composition(case.paper_name).reduced_formula == name


def test_case_study_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CASE_STUDIES["Cr3Os"].paper_rmse = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("name", RECORDED)
def test_lattice_parameters_as_cited(name):
    case, cited = CASE_STUDIES[name], CITED[name]
    a, b, c, alpha, beta, gamma = case.lattice_parameters
    for length in (a, b, c):
        assert abs(length - cited["conv_abc"]) < 1e-4
    assert (alpha, beta, gamma) == (90.0, 90.0, 90.0)
    conv = case.conventional()
    for length in conv.lattice.abc:
        assert abs(length - cited["conv_abc"]) < 1e-4
    for angle in conv.lattice.angles:
        assert abs(angle - 90.0) < 1e-4
    cell = case.structure()
    for length in cell.lattice.abc:
        assert abs(length - cited["cell_abc"]) < 1e-4
    for angle in cell.lattice.angles:
        assert abs(angle - cited["cell_angle"]) < 1e-4


@pytest.mark.parametrize("name", RECORDED)
def test_cells_counts_symmetry_formula(name):
    case, cited = CASE_STUDIES[name], CITED[name]
    cell, conv = case.structure(), case.conventional()
    assert len(cell) == cited["n_cell"]
    assert len(conv) == cited["n_conv"]
    assert cell.composition.reduced_formula == case.formula
    assert cell.composition == Composition(case.paper_name)
    for s in (cell, conv):
        assert _spacegroup(s) == (case.spacegroup_symbol, case.spacegroup_number)
    assert (case.spacegroup_symbol, case.spacegroup_number) == {
        "Cr3Os": ("Pm-3n", 223),
        "Zr4Pd2O": ("Fd-3m", 227),
    }[name]
    # the primitive cell is the same crystal as the conventional one
    assert StructureMatcher().fit(cell, conv)


@pytest.mark.parametrize("name", RECORDED)
def test_min_distance_sensible(name):
    case = CASE_STUDIES[name]
    assert _min_distance(case.structure()) > 2.0
    assert _min_distance(case.conventional()) > 2.0


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_cells_are_marked_computed(name):
    # No experimental cell could be cited; the Materials Project cell must say so.
    ref = CASE_STUDIES[name].reference
    assert ref is not None and ref.kind == "computed"
    assert MP_FILES[name][0] in ref.source


@pytest.mark.parametrize("name", RECORDED)
def test_cell_is_the_materials_project_entry(name):
    mp_id, rel = MP_FILES[name]
    path = DATA_ROOT / rel
    if not path.exists():
        pytest.skip(f"offline data not found: {path}")
    cifs = [row["cif"] for row in _read_cif_rows(path) if row["material_id"] == mp_id]
    assert len(cifs) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's CIF parser warns on rounded coordinates
        entry = Structure.from_str(cifs[0], fmt="cif")
    built = CASE_STUDIES[name].structure()
    matcher = StructureMatcher(scale=False)
    assert matcher.fit(built, entry)
    rms, _ = matcher.get_rms_dist(built, entry)
    assert rms < 1e-4


@pytest.mark.parametrize("name", MISSING)
def test_missing_reference_raises_with_what_to_record(name):
    case = CASE_STUDIES[name]
    assert case.reference is None
    source = {"CsV3Sb5": "Ortiz et al., Phys. Rev. Materials 3, 094407", "Zr4Rh2O": "Watanabe"}
    for call in (case.structure, case.conventional, lambda: case.lattice_parameters):
        with pytest.raises(ReferenceDataMissing, match=re.escape(source[name])):
            call()


def test_kagome_template_gives_the_9_atom_cell():
    case = CASE_STUDIES["CsV3Sb5"]
    cell = case.structure(cell=_kagome_cell(0.25))
    assert len(cell) == 9
    assert cell.composition.reduced_formula == "CsV3Sb5"
    assert _spacegroup(cell) == ("P6/mmm", 191)


def test_eta_template_gives_28_and_112_atom_cells():
    case = CASE_STUDIES["Zr4Rh2O"]
    cell, conv = case.structure(cell=_eta_cell("Rh")), case.conventional(cell=_eta_cell("Rh"))
    assert (len(cell), len(conv)) == (28, 112)
    assert cell.composition == Composition("Zr16Rh8O4")
    assert _spacegroup(cell) == _spacegroup(conv) == ("Fd-3m", 227)


def test_special_position_is_an_error():
    # z = 1/2 puts the 4h orbit on 2d: two atoms, not four
    with pytest.raises(ValueError, match="special position"):
        CASE_STUDIES["CsV3Sb5"].conventional(cell=_kagome_cell(0.5))


def test_cell_of_another_structure_type_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        CASE_STUDIES["Zr4Rh2O"].conventional(cell=_eta_cell("Pd"))


def test_paper_and_measured_numbers():
    rmse = {c.name: c.paper_rmse for c in CASE_STUDIES.values()}
    assert rmse == {"CsV3Sb5": 0.0085, "Cr3Os": 0.0012, "Zr4Pd2O": 0.0172, "Zr4Rh2O": 0.0212}
    cs = CASE_STUDIES["CsV3Sb5"]
    assert (cs.measured_tc_k, cs.paper_tc_k) == (2.30, 2.26)
    assert CASE_STUDIES["Zr4Pd2O"].paper_tc_error_k == 0.04
    assert CASE_STUDIES["Zr4Rh2O"].paper_tc_error_k == 0.26
    assert CASE_STUDIES["Zr4Pd2O"].measured_tc_k == 2.73
    for case in CASE_STUDIES.values():
        assert case.tc_source and case.citations
        assert any("2503.10471" in c for c in case.citations)


def test_get_case_study():
    assert get_case_study("Cr3Os") is CASE_STUDIES["Cr3Os"]
    assert get_case_study("Zr16Pd8O4") is CASE_STUDIES["Zr4Pd2O"]
    assert isinstance(get_case_study("CsV3Sb5"), CaseStudy)
    with pytest.raises(ValueError, match="unknown case study 'MgB2'") as err:
        get_case_study("MgB2")
    for valid in CASE_STUDIES:
        assert valid in str(err.value)


def test_exclude_ids():
    ids = case_study_exclude_ids()
    assert {"mp-416", "mp-22479"} <= ids
    assert ids == {"mp-416", "mp-22479"}


def test_exclude_ids_cover_every_case_study_in_the_data():
    """Every CIF row of the offline data whose composition is a case study is excluded."""
    if not DATA_ROOT.exists():
        pytest.skip(f"offline data not found: {DATA_ROOT}")
    formula_sum = re.compile(r"_chemical_formula_sum\s+'?([^'\n]+)'?")
    found: dict[str, set[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns on noble-gas electronegativities
        for path in sorted(DATA_ROOT.rglob("*.csv.gz")):
            for row in _read_cif_rows(path):
                m = formula_sum.search(row["cif"])
                if m is None:  # e.g. 3DSC's label table, whose "cif" column is a file name
                    continue
                formula = Composition(m.group(1)).reduced_formula
                if formula in CASE_STUDIES:
                    found.setdefault(formula, set()).add(row["material_id"])
    assert found == {"Cr3Os": {"mp-416"}, "Zr4Pd2O": {"mp-22479"}}
    for name, ids in found.items():
        assert ids <= CASE_STUDIES[name].mp_ids_in_data <= case_study_exclude_ids()
