"""The Quantum ESPRESSO driver: input writer, parser on captured pw.x outputs, start
structures, the runner with a stand-in pw.x, and (slow, when pw.x is installed) real
Si runs."""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Composition, Lattice, Structure

from dao.eval.dft import (
    BOHR_TO_ANGSTROM,
    RY_TO_EV,
    QENotFoundError,
    QESettings,
    bravais_cell,
    default_pseudo_dir,
    kpoint_grid,
    parse_pw_output,
    perturb_structure,
    prepare_pseudos,
    pw_input,
    random_start,
    run_pw,
)

QE_DATA = Path(__file__).resolve().parents[1] / "data" / "qe"
SI_SETTINGS = QESettings(ecutwfc=20.0, ecutrho=160.0, kpoints=(2, 2, 2))

requires_pw = pytest.mark.skipif(
    shutil.which("pw.x") is None or shutil.which("mpirun") is None,
    reason="pw.x/mpirun not on PATH (apt-get install quantum-espresso openmpi-bin "
    "libopenblas0-pthread)",
)


def silicon(a: float = 5.43) -> Structure:
    """Diamond Si in pymatgen's primitive fcc cell (as in data/qe/make_si_outputs.py)."""
    conventional = Structure.from_spacegroup("Fd-3m", Lattice.cubic(a), ["Si"], [[0, 0, 0]])
    return conventional.get_primitive_structure()


def namelists(text: str) -> dict[str, dict[str, str]]:
    """``{'SYSTEM': {'ibrav': '2', ...}, ...}`` from a pw.x input."""
    out, current = {}, None
    for line in text.splitlines():
        if line.startswith("&"):
            current = out.setdefault(line[1:].strip().upper(), {})
        elif line.strip() == "/":
            current = None
        elif current is not None and "=" in line:
            key, value = (x.strip() for x in line.split("=", 1))
            current[key] = value.strip("'")
    return out


def card(text: str, name: str, rows: int) -> tuple[str, list[list[str]]]:
    """The option and the first ``rows`` rows of a card (e.g. ATOMIC_POSITIONS)."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(name))
    return lines[i][len(name) :].strip(), [lines[i + 1 + k].split() for k in range(rows)]


def structure_from_input(text: str) -> Structure:
    """The structure of an ``ibrav=0`` input (CELL_PARAMETERS angstrom, crystal)."""
    nat = int(namelists(text)["SYSTEM"]["nat"])
    _, cell = card(text, "CELL_PARAMETERS", 3)
    _, pos = card(text, "ATOMIC_POSITIONS", nat)
    lattice = np.array(cell, dtype=float)
    return Structure(lattice, [p[0] for p in pos], np.array([p[1:4] for p in pos], dtype=float))


def qe_frame_structure(structure: Structure, settings: QESettings | None = None) -> Structure:
    """The crystal exactly as the written input describes it, in QE's frame."""
    text = pw_input(structure, settings, pseudos={el.symbol: "x.UPF" for el in structure.elements})
    cell = bravais_cell(structure)
    _, pos = card(text, "ATOMIC_POSITIONS", len(structure))
    frac = np.array([p[1:4] for p in pos], dtype=float)
    return Structure(cell.lattice, [p[0] for p in pos], frac)


def rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def assert_same_crystal(a: Structure, b: Structure):
    """Same volume and the same interatomic distances: equal up to a rotation."""
    assert a.volume == pytest.approx(b.volume, rel=1e-9)
    np.testing.assert_allclose(
        np.sort(a.distance_matrix.ravel()), np.sort(b.distance_matrix.ravel()), atol=1e-8
    )
    np.testing.assert_allclose(
        sorted(a.lattice.get_niggli_reduced_lattice().abc),
        sorted(b.lattice.get_niggli_reduced_lattice().abc),
        rtol=1e-9,
    )


# ---------------------------------------------------------------- cells and inputs


def cubic_cscl() -> Structure:
    return Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def bcc_primitive() -> Structure:
    conventional = Structure(Lattice.cubic(2.87), ["Fe", "Fe"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    return conventional.get_primitive_structure()


def hcp_mg() -> Structure:
    return Structure(
        Lattice.hexagonal(3.21, 5.21), ["Mg", "Mg"], [[1 / 3, 2 / 3, 0.25], [2 / 3, 1 / 3, 0.75]]
    )


def triclinic() -> Structure:
    lattice = Lattice.from_parameters(3.1, 4.2, 5.3, 81.0, 86.0, 97.0)
    return Structure(lattice, ["Si", "O"], [[0.1, 0.2, 0.3], [0.6, 0.55, 0.8]])


def left_handed() -> Structure:
    s = triclinic()
    lattice = s.lattice.matrix[[1, 0, 2]]  # two vectors swapped
    return Structure(lattice, s.species, s.frac_coords[:, [1, 0, 2]])


CELLS = {
    "simple cubic": (cubic_cscl, 1),
    "fcc primitive (pymatgen orientation)": (silicon, 2),
    "bcc primitive (pymatgen orientation)": (bcc_primitive, 3),
    "hexagonal": (hcp_mg, 4),
    "triclinic": (triclinic, 0),
    "triclinic, left-handed (written negated)": (left_handed, 0),
}


@pytest.mark.parametrize("name", list(CELLS))
def test_ibrav_detection_and_positions_for_qe_cell(name):
    make, ibrav = CELLS[name]
    s = make()
    text = pw_input(s, SI_SETTINGS, pseudos={el.symbol: f"{el}.UPF" for el in s.elements})
    system = namelists(text)["SYSTEM"]
    assert int(system["ibrav"]) == ibrav
    assert ("CELL_PARAMETERS" in text) == (ibrav == 0)
    cell = bravais_cell(s)
    if ibrav:
        # |v1| of QE's cell is a (sc, hex), a/√2 (fcc) or a√3/2 (bcc).
        a_over_v1 = {1: 1.0, 2: 2**0.5, 3: 2 / 3**0.5, 4: 1.0}[ibrav]
        a = float(system["celldm(1)"]) * BOHR_TO_ANGSTROM
        assert a == pytest.approx(np.linalg.norm(cell.lattice[0]) * a_over_v1, rel=1e-12)
    if ibrav == 4:
        assert float(system["celldm(3)"]) == pytest.approx(5.21 / 3.21)
    else:
        assert "celldm(3)" not in system
    # The input describes the same crystal, only rotated into QE's frame ...
    assert_same_crystal(qe_frame_structure(s), s)
    # ... and mapping QE's frame back gives the structure as given.
    qe_frac = cell.to_qe_frac(s.frac_coords)
    lattice, frac = cell.to_given(cell.lattice, qe_frac)
    np.testing.assert_allclose(lattice, s.lattice.matrix, atol=1e-9)
    np.testing.assert_allclose(frac, s.frac_coords, atol=1e-9)


def test_ibrav0_cell_is_written_as_given():
    s = triclinic()
    text = pw_input(s, SI_SETTINGS, pseudos={"Si": "Si.UPF", "O": "O.UPF"})
    unit, rows = card(text, "CELL_PARAMETERS", 3)
    assert unit == "angstrom"
    np.testing.assert_allclose(np.array(rows, dtype=float), s.lattice.matrix, atol=1e-9)
    _, pos = card(text, "ATOMIC_POSITIONS", 2)
    np.testing.assert_allclose(
        np.array([p[1:] for p in pos], dtype=float), s.frac_coords, atol=1e-9
    )


def test_rotated_qe_cell_keeps_crystal_coordinates():
    """QE's own fcc cell, rotated: same ibrav, fractional coordinates unchanged."""
    qe = 0.5 * 5.43 * np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [-1.0, 1.0, 0.0]])
    frac = np.array([[0.01, 0.02, 0.03], [0.27, 0.24, 0.26]])
    s = Structure(qe @ rotation(3).T, ["Si", "Si"], frac)
    cell = bravais_cell(s)
    assert cell.ibrav == 2
    np.testing.assert_array_equal(cell.basis, np.eye(3))
    np.testing.assert_allclose(cell.lattice, qe, atol=1e-12)
    _, pos = card(pw_input(s, pseudos={"Si": "Si.UPF"}), "ATOMIC_POSITIONS", 2)
    np.testing.assert_allclose(np.array([p[1:] for p in pos], dtype=float), frac, atol=1e-10)


def test_other_basis_of_a_bravais_lattice_is_reindexed():
    """A hexagonal cell with γ = 60° and a permuted axis order is still ibrav=4."""
    a, c = 3.0, 4.7
    hexagonal = Lattice.hexagonal(a, c).matrix
    lattice = np.array([hexagonal[2], hexagonal[0], hexagonal[0] + hexagonal[1]])  # c, a1, a1+a2
    s = Structure(lattice @ rotation(5).T, ["Zn", "O"], [[0.1, 0.2, 0.3], [0.4, 0.7, 0.9]])
    cell = bravais_cell(s)
    assert cell.ibrav == 4
    assert cell.celldm[1] == pytest.approx(c / a)
    assert not np.array_equal(cell.basis, np.eye(3))
    assert np.linalg.det(cell.rotation) == pytest.approx(1.0)
    assert_same_crystal(qe_frame_structure(s), s)


def test_conventional_fcc_cell_is_simple_cubic_as_given():
    conventional = Structure.from_spacegroup("Fd-3m", Lattice.cubic(5.43), ["Si"], [[0, 0, 0]])
    assert len(conventional) == 8
    assert bravais_cell(conventional).ibrav == 1


def test_cell_dofree_follows_the_crystal_symmetry():
    pseudos = {"Cs": "Cs.UPF", "Cl": "Cl.UPF"}
    cubic = cubic_cscl()
    assert namelists(pw_input(cubic, pseudos=pseudos))["CELL"]["cell_dofree"] == "ibrav"
    # A cubic box with a tetragonal crystal inside must be free to become tetragonal.
    tetragonal = Structure(Lattice.cubic(4.1), ["Cs", "Cl"], [[0, 0, 0], [0, 0, 0.4]])
    lists = namelists(pw_input(tetragonal, pseudos=pseudos))
    assert lists["SYSTEM"]["ibrav"] == "1" and lists["CELL"]["cell_dofree"] == "all"
    assert (
        namelists(pw_input(triclinic(), pseudos={"Si": "a", "O": "b"}))["CELL"]["cell_dofree"]
        == "all"
    )
    explicit = QESettings(cell_dofree="shape")
    assert namelists(pw_input(cubic, explicit, pseudos=pseudos))["CELL"]["cell_dofree"] == "shape"
    with pytest.raises(ValueError, match="ibrav"):
        pw_input(triclinic(), QESettings(cell_dofree="ibrav"), pseudos={"Si": "a", "O": "b"})
    no_ibrav = pw_input(cubic, QESettings(use_ibrav=False), pseudos=pseudos)
    assert namelists(no_ibrav)["SYSTEM"]["ibrav"] == "0" and "CELL_PARAMETERS angstrom" in no_ibrav


def test_kpoint_grid_from_spacing():
    # |b| = 2π/4 Å⁻¹ = 1.571: 6.28 spacings of 0.25, 3.14 of 0.5.
    assert kpoint_grid(Lattice.cubic(4.0), 0.25) == (7, 7, 7)
    assert kpoint_grid(Lattice.cubic(4.0), 0.5) == (4, 4, 4)
    assert kpoint_grid(Lattice.tetragonal(4.0, 40.0), 0.25) == (7, 7, 1)
    # Exactly 8 spacings stays 8 despite rounding.
    assert kpoint_grid(Lattice.cubic(2 * math.pi / (8 * 0.25)), 0.25) == (8, 8, 8)
    # Hexagonal a = 3.21: |b1| = 2π / (a sin 60°) = 2.26 Å⁻¹; c = 5.21: 1.206 Å⁻¹.
    assert kpoint_grid(Lattice.hexagonal(3.21, 5.21), 0.25) == (10, 10, 5)
    # The written grid is that of QE's cell, or the explicit override.
    s = silicon()
    _, rows = card(pw_input(s, QESettings(kspacing=0.3), pseudos={"Si": "x"}), "K_POINTS", 1)
    assert tuple(int(n) for n in rows[0][:3]) == kpoint_grid(bravais_cell(s).lattice, 0.3)
    _, rows = card(
        pw_input(s, QESettings(kpoints=(3, 4, 5), kshift=(1, 1, 0)), pseudos={"Si": "x"}),
        "K_POINTS",
        1,
    )
    assert rows[0] == ["3", "4", "5", "1", "1", "0"]


def test_every_setting_appears_in_the_namelists():
    settings = QESettings(
        ecutwfc=31.0,
        ecutrho=250.0,
        smearing="gaussian",
        degauss=0.015,
        conv_thr_per_atom=3e-10,
        electron_maxstep=77,
        mixing_beta=0.35,
        etot_conv_thr=2e-5,
        forc_conv_thr=4e-4,
        press_conv_thr=0.25,
        press=1.5,
        ion_dynamics="damp",
        cell_dynamics="damp-w",
        cell_dofree="shape",
        nstep=17,
    )
    s = silicon()
    text = pw_input(s, settings, "vc-relax", "/some/pseudo", "myprefix", pseudos={"Si": "Si.UPF"})
    lists = namelists(text)
    expected = {
        "CONTROL": dict(
            calculation="vc-relax",
            prefix="myprefix",
            pseudo_dir="/some/pseudo",
            nstep=17,
            etot_conv_thr=2e-5,
            forc_conv_thr=4e-4,
            tprnfor=".true.",
            tstress=".true.",
        ),
        "SYSTEM": dict(
            ecutwfc=31.0,
            ecutrho=250.0,
            occupations="smearing",
            smearing="gaussian",
            degauss=0.015,
            nat=2,
            ntyp=1,
        ),
        "ELECTRONS": dict(conv_thr=6e-10, electron_maxstep=77, mixing_beta=0.35),
        "IONS": dict(ion_dynamics="damp"),
        "CELL": dict(cell_dynamics="damp-w", cell_dofree="shape", press=1.5, press_conv_thr=0.25),
    }
    for name, entries in expected.items():
        for key, value in entries.items():
            got = lists[name][key]
            if isinstance(value, float):
                assert float(got.replace("d", "e")) == pytest.approx(value, rel=1e-12), key
            else:
                assert got == str(value), key
    scf = namelists(pw_input(s, settings, "scf", pseudos={"Si": "Si.UPF"}))
    assert set(scf) == {"CONTROL", "SYSTEM", "ELECTRONS"} and "nstep" not in scf["CONTROL"]
    relax = namelists(pw_input(s, settings, "relax", pseudos={"Si": "Si.UPF"}))
    assert set(relax) == {"CONTROL", "SYSTEM", "ELECTRONS", "IONS"}
    with pytest.raises(ValueError, match="calculation"):
        pw_input(s, settings, "md", pseudos={"Si": "Si.UPF"})


def test_default_settings_are_the_documented_ones():
    s = QESettings()
    assert (s.ecutwfc, s.ecutrho, s.kspacing, s.smearing, s.degauss) == (
        45.0,
        360.0,
        0.25,
        "mv",
        0.02,
    )
    assert (s.mpi_ranks, s.n_pools, s.omp_num_threads, s.cell_dofree) == (2, 2, 1, None)
    with pytest.raises(ValueError, match="pools"):
        QESettings(mpi_ranks=2, pools=3)
    with pytest.raises(ValueError, match="ecutrho"):
        QESettings(ecutwfc=50.0, ecutrho=100.0)
    with pytest.raises(ValueError, match="kpoints"):
        QESettings(kpoints=(2, 0, 2))


def fake_pseudo_dir(tmp_path: Path, names: list[str]) -> Path:
    src = tmp_path / "pseudo_src"
    src.mkdir()
    for name in names:
        with gzip.open(src / f"{name}.UPF.gz", "wt") as f:
            f.write(f"<UPF> {name} </UPF>\n")
    return src


def test_prepare_pseudos_and_file_names_in_the_input(tmp_path):
    src = fake_pseudo_dir(tmp_path, ["Si.pbe-n-rrkjus", "Sb.pbe-n-rrkjus", "S.pbe-n-kjpaw"])
    work = tmp_path / "work"
    names = prepare_pseudos(["S", "Si", "Sb"], src, work)
    assert names == {
        "S": "S.pbe-n-kjpaw.UPF",
        "Si": "Si.pbe-n-rrkjus.UPF",
        "Sb": "Sb.pbe-n-rrkjus.UPF",
    }
    assert (work / "Sb.pbe-n-rrkjus.UPF").read_text() == "<UPF> Sb.pbe-n-rrkjus </UPF>\n"
    # Found in the work folder by element when no mapping is given.
    s = Structure(Lattice.cubic(5.0), ["Sb", "S"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    _, species = card(pw_input(s, pseudo_dir=work), "ATOMIC_SPECIES", 2)
    assert {row[0]: row[2] for row in species} == {
        "Sb": "Sb.pbe-n-rrkjus.UPF",
        "S": "S.pbe-n-kjpaw.UPF",
    }
    assert float(species[0][1]) == pytest.approx(121.76)
    with pytest.raises(FileNotFoundError, match="Cs, O"):
        prepare_pseudos(["Si", "Cs", "O"], src, work)
    with pytest.raises(FileNotFoundError, match="Cl"):
        pw_input(cubic_cscl(), pseudo_dir=work)
    (src / "Si.other.UPF.gz").write_bytes((src / "Si.pbe-n-rrkjus.UPF.gz").read_bytes())
    with pytest.raises(ValueError, match="several"):
        prepare_pseudos(["Si"], src, tmp_path / "work2")


def test_shared_pseudopotentials_decompress(tmp_path):
    src = default_pseudo_dir()
    if not (src / "Si.pbe-n-rrkjus_psl.1.0.0.UPF.gz").exists():
        pytest.skip(f"shared pseudopotentials not found in {src}")
    names = prepare_pseudos(["Si"], src, tmp_path)
    assert names == {"Si": "Si.pbe-n-rrkjus_psl.1.0.0.UPF"}
    assert "<UPF" in (tmp_path / names["Si"]).read_text()[:2000]


# ---------------------------------------------------------------- parser on real outputs


def captured(name: str) -> tuple[str, str]:
    """(input, output) text of a run in tests/data/qe."""
    inp = (QE_DATA / f"{name}.in").read_text()
    with gzip.open(QE_DATA / f"{name}.out.gz", "rt") as f:
        return inp, f.read()


def test_parse_converged_vc_relax():
    inp, out = captured("si_vc_relax")
    start = silicon(5.61 * 1.03)  # 3 % above the equilibrium at these settings
    # The captured input is what pw_input writes today.
    pseudos = {"Si": "Si.pbe-n-rrkjus_psl.1.0.0.UPF"}
    assert inp == pw_input(start, SI_SETTINGS, "vc-relax", "./pseudo", "si", pseudos=pseudos)
    run = parse_pw_output(out, start, "vc-relax")
    assert (run.completed, run.converged, run.stop_reason) == (True, True, "converged")
    assert run.wall_s == pytest.approx(25.45)
    # Five BFGS SCF cycles and the closing SCF with new G-vectors.
    assert run.scf_iterations == [7, 9, 12, 9, 7, 9] and run.scf_iterations_total == 53
    assert [s.final_scf for s in run.steps] == [False] * 5 + [True]
    assert all(s.scf_converged for s in run.steps)
    assert run.n_ionic_steps == 4 and len(run.structures) == 4
    assert run.energies_ry == [
        -22.65210962,
        -22.65538734,
        -22.65790211,
        -22.65803172,
        -22.65803318,
        -22.65776662,
    ]
    np.testing.assert_allclose(run.energies_ev, np.array(run.energies_ry) * RY_TO_EV)
    final_enthalpy = float(re.search(r"Final enthalpy =\s*(\S+)", out).group(1))
    assert final_enthalpy == pytest.approx(run.energies_ry[4], abs=1e-8)
    assert np.all(np.diff(run.energies_ry[:5]) < 0)
    assert [s.pressure_kbar for s in run.steps] == [-58.51, -41.3, -9.98, 1.08, -0.02, -0.02]
    assert run.steps[0].structure == start
    for step, after in zip(run.steps[1:5], run.structures, strict=True):
        assert step.structure is after
    final = run.final_structure
    assert final == run.structures[-1] and run.steps[-1].structure == final
    # cell_dofree='ibrav': the relaxed cell is the start cell scaled, in the frame given.
    scale = final.lattice.abc[0] / start.lattice.abc[0]
    np.testing.assert_allclose(final.lattice.matrix, scale * start.lattice.matrix, atol=1e-8)
    np.testing.assert_allclose(final.frac_coords, start.frac_coords, atol=1e-8)
    assert final.volume == pytest.approx(scale**3 * start.volume, rel=1e-12)
    assert scale == pytest.approx(1 / 1.03, abs=2e-3)
    # QE's last cell: 0.485508529 alat (ibrav=2 vectors are a/2) with alat = 10.91940447 bohr;
    # "new unit-cell volume = 44.15916 Ang^3".
    a = 2 * 0.485508529 * 10.91940447 * BOHR_TO_ANGSTROM
    assert final.lattice.abc[0] == pytest.approx(a / 2**0.5, rel=1e-9)
    assert final.volume == pytest.approx(44.15916, abs=1e-5)


def test_parse_killed_run_returns_what_was_reached():
    inp, out = captured("si_vc_relax_killed")
    start = structure_from_input(inp)
    assert bravais_cell(start).ibrav == 0
    run = parse_pw_output(out, start, "vc-relax")
    assert (run.completed, run.converged, run.stop_reason) == (False, False, "incomplete")
    assert run.wall_s is None
    assert run.scf_iterations == [10, 8]
    assert run.energies_ry == [-22.64681638, -22.65468435]
    assert run.steps[0].pressure_kbar == 61.96 and run.steps[1].pressure_kbar is None
    assert run.n_ionic_steps == 1
    # ibrav=0: QE's CELL_PARAMETERS (angstrom) are the structure's own.
    np.testing.assert_allclose(
        run.final_structure.lattice.matrix[0], [-2.749375822, -2.777089433, 0.016718701]
    )
    assert run.steps[1].structure is run.final_structure


def test_parse_every_prefix_of_an_output():
    """A run killed anywhere parses: no errors, and nothing reached is lost later."""
    _, out = captured("si_vc_relax")
    lines = out.splitlines(keepends=True)
    start = silicon(5.61 * 1.03)
    last_energies, last_structures = 0, 0
    for n in range(0, len(lines) + 1, 37):
        run = parse_pw_output("".join(lines[:n]), start, "vc-relax")
        assert run.stop_reason in ("incomplete", "converged")
        assert len(run.energies_ry) >= last_energies and run.n_ionic_steps >= last_structures
        last_energies, last_structures = len(run.energies_ry), run.n_ionic_steps
    assert last_energies == 6


def test_parse_nstep_reached_relax():
    inp, out = captured("si_relax_nstep")
    start = structure_from_input(inp)
    run = parse_pw_output(out, start)  # calculation guessed: relax
    assert run.calculation == "relax"
    assert (run.completed, run.converged, run.stop_reason) == (True, False, "nstep reached")
    assert run.n_ionic_steps == 2 and run.scf_iterations == [9, 7]
    # Fixed cell: only the positions moved.
    np.testing.assert_allclose(run.final_structure.lattice.matrix, start.lattice.matrix, atol=1e-9)
    assert np.abs(run.final_structure.frac_coords - start.frac_coords).max() > 1e-3


def test_parse_qe_error():
    _, out = captured("si_scf_error")
    run = parse_pw_output(out, silicon(), "scf")
    assert run.stop_reason == "error: Error in routine set_occupations (1): smearing bogus unknown"
    assert not run.completed and not run.converged and run.steps == []
    assert run.final_structure == silicon()


def test_parse_positions_in_alat_bohr_and_angstrom():
    s = Structure(Lattice.cubic(4.0), ["Si", "Si"], [[0, 0, 0], [0.25, 0.25, 0.25]])
    alat = 4.0 / BOHR_TO_ANGSTROM
    blocks = {
        "alat": "0.0 0.0 0.0\nSi 0.3 0.25 0.25",
        "bohr": f"0.0 0.0 0.0\nSi {1.2 / BOHR_TO_ANGSTROM} {alat / 4} {alat / 4}",
        "angstrom": "0.0 0.0 0.0\nSi 1.2 1.0 1.0",
    }
    for unit, rows in blocks.items():
        text = (
            f"     bravais-lattice index     =            1\nATOMIC_POSITIONS ({unit})\nSi {rows}\n"
        )
        run = parse_pw_output(text, s, "relax")
        np.testing.assert_allclose(run.final_structure.frac_coords[1], [0.3, 0.25, 0.25], atol=1e-9)
    text = (
        "CELL_PARAMETERS (bohr)\n8 0 0\n0 8 0\n0 0 8\n"
        "ATOMIC_POSITIONS (crystal)\nSi 0 0 0\nSi 0.5 0.5 0.5\n"
    )
    run = parse_pw_output(text, s.copy(), "vc-relax")
    assert run.final_structure.lattice.abc[0] == pytest.approx(8 * BOHR_TO_ANGSTROM)


# ---------------------------------------------------------------- start structures


def test_perturb_structure_is_seeded_and_bounded():
    s = silicon()
    before = s.copy()
    a, b, c = (perturb_structure(s, seed) for seed in (7, 7, 8))
    assert s == before  # not modified
    np.testing.assert_array_equal(a.lattice.matrix, b.lattice.matrix)
    np.testing.assert_array_equal(a.cart_coords, b.cart_coords)
    assert not np.allclose(a.lattice.matrix, c.lattice.matrix)
    assert [x.specie for x in a] == [x.specie for x in s]
    strain = np.linalg.solve(s.lattice.matrix, a.lattice.matrix) - np.eye(3)
    np.testing.assert_allclose(strain, strain.T, atol=1e-12)
    assert 0 < np.abs(strain).max() <= 0.03
    moved = a.cart_coords - s.frac_coords @ a.lattice.matrix
    np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 0.1, rtol=1e-12)
    d = perturb_structure(s, 1, lattice_strain=0.0, displacement=0.0)
    np.testing.assert_allclose(d.cart_coords, s.cart_coords, atol=1e-12)


@pytest.mark.parametrize("species", ["SiO2", ["Zr", "Zr", "Rh", "O"], "Cs"])
def test_random_start_is_seeded_with_right_volume_and_distances(species):
    a = random_start(species, seed=3, volume_per_atom=15.0)
    b = random_start(species, seed=3, volume_per_atom=15.0)
    c = random_start(species, seed=4, volume_per_atom=15.0)
    assert a == b and a.lattice == b.lattice and a != c
    n = 1 if species == "Cs" else (3 if species == "SiO2" else 4)
    assert len(a) == n and a.volume == pytest.approx(15.0 * n)
    if isinstance(species, list):
        assert [x.specie.symbol for x in a] == species
    else:
        assert a.composition == Composition(species)
    min_distance = 0.7 * 15.0 ** (1 / 3)
    dist = a.distance_matrix + np.eye(n) * 1e9
    assert dist.min() >= min_distance - 1e-9
    assert min(a.lattice.get_niggli_reduced_lattice().abc) >= min_distance
    assert all(70.0 <= x <= 110.0 for x in a.lattice.angles)


def test_random_start_gives_up_clearly():
    with pytest.raises(RuntimeError, match="no placement"):
        random_start("Si8", seed=0, volume_per_atom=10.0, min_distance=4.0, max_attempts=5)


# ---------------------------------------------------------------- runner


def write_fake_pw(folder: Path, body: str) -> Path:
    """An executable ``pw.x`` stand-in running ``body`` (Python) in the run folder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pw.x"
    path.write_text(f"#!{sys.executable}\nimport sys, time, gzip\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_pw_x_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(QENotFoundError, match="apt-get install quantum-espresso openmpi-bin"):
        run_pw(silicon(), SI_SETTINGS, tmp_path / "run", "scf")
    fake = write_fake_pw(tmp_path / "bin", "pass")
    settings = QESettings(pw_command=str(fake), mpirun="no-such-mpirun")
    with pytest.raises(QENotFoundError, match="no-such-mpirun"):
        run_pw(silicon(), settings, tmp_path / "run", "scf")


def test_run_pw_streams_parses_and_reports_progress(tmp_path):
    """A stand-in pw.x replays the captured vc-relax, one SCF cycle at a time."""
    src = fake_pseudo_dir(tmp_path, ["Si.pbe-n-rrkjus_psl.1.0.0"])
    body = f"""
assert sys.argv[1:] == ["-in", "pw.in"], sys.argv
assert open("pw.in").read().startswith("&CONTROL")
for line in gzip.open({str(QE_DATA / "si_vc_relax.out.gz")!r}, "rt"):
    sys.stdout.write(line)
    if line.startswith("!"):
        sys.stdout.flush()
        time.sleep(0.3)
"""
    fake = write_fake_pw(tmp_path / "bin", body)
    settings = QESettings(
        ecutwfc=20.0, ecutrho=160.0, kpoints=(2, 2, 2), mpi_ranks=1, pw_command=str(fake)
    )
    seen = []
    start = silicon(5.61 * 1.03)
    run = run_pw(
        start,
        settings,
        tmp_path / "run",
        "vc-relax",
        progress=lambda r: seen.append(r),
        pseudo_src=src,
        poll_s=0.05,
    )
    assert run.stop_reason == "converged" and run.completed and run.converged
    assert run.energies_ry[-1] == -22.65776662 and run.work_dir == tmp_path / "run"
    assert (tmp_path / "run" / "pw.out").read_text() == captured("si_vc_relax")[1]
    assert (tmp_path / "run" / "pseudo" / "Si.pbe-n-rrkjus_psl.1.0.0.UPF").exists()
    assert 3 <= len(seen) <= 6  # one per SCF cycle, fewer if two land in one poll
    counts = [len(r.energies_ry) for r in seen]
    assert counts == sorted(counts) and all(not r.completed for r in seen[:-1])


def test_run_pw_kills_at_the_time_limit(tmp_path):
    src = fake_pseudo_dir(tmp_path, ["Si.pbe"])
    body = f"""
text = gzip.open({str(QE_DATA / "si_vc_relax.out.gz")!r}, "rt").read()
sys.stdout.write(text[: len(text) // 2])
sys.stdout.flush()
time.sleep(600)
"""
    fake = write_fake_pw(tmp_path / "bin", body)
    settings = QESettings(mpi_ranks=1, pw_command=str(fake), kpoints=(2, 2, 2))
    t0 = time.monotonic()
    run = run_pw(
        silicon(5.61 * 1.03),
        settings,
        tmp_path / "run",
        "vc-relax",
        max_wall_s=1.0,
        pseudo_src=src,
        poll_s=0.05,
    )
    assert time.monotonic() - t0 < 8.0
    assert (run.stop_reason, run.completed, run.converged) == ("time limit", False, False)
    assert 1.0 <= run.wall_s < 8.0
    assert len(run.energies_ry) >= 2 and run.n_ionic_steps >= 1


def test_mpirun_command_line(tmp_path):
    """``mpirun --oversubscribe [--allow-run-as-root] -np N pw.x -nk K -in pw.in``, with no
    more pools than k-points, through stand-ins for OpenMPI's mpirun and pw.x."""
    src = fake_pseudo_dir(tmp_path, ["Si.pbe"])
    pw = write_fake_pw(tmp_path / "bin", 'print(" ".join(sys.argv[1:])); print("   JOB DONE.")')
    mpirun = tmp_path / "bin" / "mpirun"
    mpirun.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        'if sys.argv[1:] == ["--version"]:\n'
        '    print("mpirun (Open MPI) 4.1.4")\n'
        "    sys.exit(0)\n"
        'print(" ".join(sys.argv[1:]), flush=True)\n'
        'args = sys.argv[sys.argv.index("-np") + 2 :]\n'
        "os.execv(args[0], args)\n"
    )
    mpirun.chmod(mpirun.stat().st_mode | stat.S_IXUSR)
    as_root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    for kpoints, pools in (((2, 2, 2), 2), ((1, 1, 1), 1)):
        settings = QESettings(kpoints=kpoints, pw_command=str(pw), mpirun=str(mpirun))
        run_pw(silicon(), settings, tmp_path / "run", "scf", pseudo_src=src)
        first, second = (tmp_path / "run" / "pw.out").read_text().splitlines()[:2]
        assert first.split() == [
            "--oversubscribe",
            *as_root,
            "-np",
            "2",
            str(pw),
            "-nk",
            str(pools),
            "-in",
            "pw.in",
        ]
        assert second.split() == ["-nk", str(pools), "-in", "pw.in"]


def test_run_pw_reports_a_crash(tmp_path):
    src = fake_pseudo_dir(tmp_path, ["Si.pbe"])
    fake = write_fake_pw(
        tmp_path / "bin", 'print("Program PWSCF starts"); sys.stderr.write("boom\\n"); sys.exit(3)'
    )
    settings = QESettings(mpi_ranks=1, pw_command=str(fake), kpoints=(2, 2, 2))
    run = run_pw(silicon(), settings, tmp_path / "run", "scf", pseudo_src=src)
    assert run.stop_reason == "error: pw.x exited with code 3: boom"


# ---------------------------------------------------------------- real pw.x (slow)


def shared_si_pseudo() -> Path:
    src = default_pseudo_dir()
    if not (src / "Si.pbe-n-rrkjus_psl.1.0.0.UPF.gz").exists():
        pytest.skip(f"Si pseudopotential not found in {src}")
    return src


@pytest.mark.slow
@requires_pw
def test_pw_scf_si(tmp_path):
    start = silicon(5.61 * 1.03)
    t0 = time.monotonic()
    seen = []
    run = run_pw(
        start,
        SI_SETTINGS,
        tmp_path,
        "scf",
        max_wall_s=300,
        progress=seen.append,
        pseudo_src=shared_si_pseudo(),
        prefix="si",
    )
    print(f"pw.x scf Si: {run.wall_s:.1f} s wall, {run.scf_iterations_total} SCF iterations")
    assert (run.completed, run.converged, run.stop_reason) == (True, True, "converged")
    assert len(run.steps) == 1 and run.n_ionic_steps == 0 and len(seen) == 1
    assert run.final_structure == start and run.steps[0].scf_iterations > 3
    # The same input as the first SCF of the captured vc-relax: the same energy.
    first = parse_pw_output(captured("si_vc_relax")[1], start, "vc-relax").energies_ry[0]
    assert run.energies_ry[0] == pytest.approx(first, abs=1e-6)
    assert run.wall_s <= time.monotonic() - t0
    assert re.search(r"npool\s*=\s*2", (tmp_path / "pw.out").read_text())  # -nk 2 reached QE


@pytest.mark.slow
@requires_pw
def test_pw_vc_relax_si_from_strained_cell(tmp_path):
    start = silicon(5.61 * 1.03)
    settings = QESettings(ecutwfc=20.0, ecutrho=160.0, kpoints=(2, 2, 2), nstep=10)
    run = run_pw(
        start,
        settings,
        tmp_path,
        "vc-relax",
        max_wall_s=500,
        pseudo_src=shared_si_pseudo(),
        prefix="si",
    )
    print(
        f"pw.x vc-relax Si: {run.wall_s:.1f} s wall, {run.n_ionic_steps} ionic steps, "
        f"{run.scf_iterations_total} SCF iterations"
    )
    assert (run.completed, run.converged, run.stop_reason) == (True, True, "converged")
    assert 1 <= run.n_ionic_steps <= 10
    assert run.energies_ry[-2] < run.energies_ry[0]
    final = run.final_structure
    assert final.volume < 0.93 * start.volume  # 3 % in a, 9 % in volume
    scale = final.lattice.abc[0] / start.lattice.abc[0]
    np.testing.assert_allclose(final.lattice.matrix, scale * start.lattice.matrix, atol=1e-8)
    reference = parse_pw_output(captured("si_vc_relax")[1], start, "vc-relax").final_structure
    assert final.volume == pytest.approx(reference.volume, rel=1e-4)


@pytest.mark.slow
@requires_pw
def test_pw_time_limit_kills_the_run(tmp_path):
    start = perturb_structure(silicon(), seed=0)
    t0 = time.monotonic()
    run = run_pw(
        start, SI_SETTINGS, tmp_path, "vc-relax", max_wall_s=3.0, pseudo_src=shared_si_pseudo()
    )
    assert (run.stop_reason, run.completed) == ("time limit", False)
    assert time.monotonic() - t0 < 20.0
    # mpirun and its ranks are gone: nothing keeps pw.out open or growing.
    size = os.path.getsize(tmp_path / "pw.out")
    time.sleep(1.0)
    assert os.path.getsize(tmp_path / "pw.out") == size


def test_default_pseudo_dir_resolution(tmp_path, monkeypatch):
    for var in ("DAO_PSEUDO_DIR", "DAO_DATA_ROOT", "DAO_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    (tmp_path / "a" / "shared" / "data" / "pseudo").mkdir(parents=True)
    assert default_pseudo_dir().resolve() == (tmp_path / "a/shared/data/pseudo").resolve()
    monkeypatch.setenv("DAO_DATA_DIR", str(tmp_path / "d"))
    assert default_pseudo_dir() == tmp_path / "d" / "pseudo"
    monkeypatch.setenv("DAO_DATA_ROOT", str(tmp_path / "r"))
    assert default_pseudo_dir() == tmp_path / "r" / "pseudo"
    monkeypatch.setenv("DAO_PSEUDO_DIR", str(tmp_path / "p"))
    assert default_pseudo_dir() == tmp_path / "p"
