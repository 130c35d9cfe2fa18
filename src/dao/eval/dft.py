"""A small Quantum ESPRESSO (``pw.x``) driver for DFT comparisons of predicted crystals.

Four pieces, each usable alone:

* :func:`pw_input` writes a ``pw.x`` input for ``scf``, ``relax`` or ``vc-relax``
  from a pymatgen ``Structure`` and a :class:`QESettings`;
* :func:`run_pw` runs it (``mpirun -np N pw.x -nk K -in pw.in``) under a wall-time
  limit, streaming the output to ``pw.out``, and returns a :class:`QERun`;
* :func:`parse_pw_output` is the parser behind :func:`run_pw`; it also reads a
  partial output (a killed run) and returns whatever was reached;
* :func:`perturb_structure` and :func:`random_start` make seeded start structures.

Quantum ESPRESSO is not a dependency of the package: only :func:`run_pw` needs
``pw.x`` (Debian: ``apt-get install quantum-espresso openmpi-bin
libopenblas0-pthread``; without OpenBLAS, Debian's QE links the slow reference BLAS).
Pseudopotentials are ``<El>.*.UPF`` files, shipped gzipped in
``shared/data/pseudo`` (see its README) and decompressed by :func:`prepare_pseudos`.

**Cells.** ``pw.x`` finds symmetry operations only among the rotations of its own
Cartesian frame, so a rotated ``ibrav=0`` cell can hide the symmetry of a crystal
and multiply the irreducible k-points. :func:`bravais_cell` therefore recognises
simple cubic (``ibrav=1``), face-centred cubic (2), body-centred cubic (3) and
hexagonal (4) cells of the structure *as given* (a conventional fcc cell is simple
cubic with 4 atoms; nothing is reduced to a primitive cell) and writes the crystal in
QE's own cell for that lattice. When the given cell is QE's cell rotated, the
crystal (fractional) coordinates are kept, since they do not change under a
rotation; when it is another basis of the same lattice (``M @ L = Q @ R``, ``M`` an
integer matrix with determinant ±1, ``R`` a rotation), the coordinates become
``frac @ inv(M)``. Everything :func:`parse_pw_output` returns is mapped back into
the frame and basis of the structure given (``L' = inv(M) @ Q' @ R``,
``frac' = frac_qe @ M``). Any other cell is written as ``ibrav=0`` with
``CELL_PARAMETERS angstrom``. Cells are row vectors in Å, as everywhere in ``dao``.

**Units.** QE works in Rydberg and bohr; energies are reported in both Ry and eV
(CODATA 2018 constants, the ones QE 6.6+ uses).
"""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

__all__ = [
    "BOHR_TO_ANGSTROM",
    "RY_TO_EV",
    "BravaisCell",
    "IonicStep",
    "QENotFoundError",
    "QERun",
    "QESettings",
    "bravais_cell",
    "kpoint_grid",
    "parse_pw_output",
    "perturb_structure",
    "prepare_pseudos",
    "pw_input",
    "random_start",
    "run_pw",
]

log = logging.getLogger(__name__)

BOHR_TO_ANGSTROM = 0.529177210903  # CODATA 2018
RY_TO_EV = 13.605693122994  # CODATA 2018

CALCULATIONS = ("scf", "relax", "vc-relax")
INSTALL_HINT = (
    "install Quantum ESPRESSO, e.g. on Debian/Ubuntu: "
    "apt-get install quantum-espresso openmpi-bin libopenblas0-pthread"
)

# A cell counts as a QE Bravais cell when its lengths agree to this relative
# tolerance and its angles to this many degrees (CIF files give 4-6 digits).
_BRAVAIS_LTOL = 1e-4
_BRAVAIS_ATOL_DEG = 1e-2
# spglib tolerance (Å) for the symmetry check that allows cell_dofree='ibrav'; QE's own
# symmetry tolerance is 1e-5 in crystal coordinates, so this stays tight too.
_SYMPREC = 1e-4


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class QESettings:
    """Settings of one ``pw.x`` run, with explicit defaults.

    The plane-wave defaults are the ones the shared data README measured for the
    pslibrary ultrasoft pseudopotentials; the convergence thresholds are QE's own
    defaults unless noted.

    Attributes:
        ecutwfc: wavefunction cutoff (Ry).
        ecutrho: charge-density cutoff (Ry); 8x ``ecutwfc`` for ultrasoft PPs.
        kspacing: Monkhorst-Pack density: ``n_i = ceil(|b_i| / kspacing)`` with the
            reciprocal vectors ``b_i`` *including* 2π (VASP's KSPACING convention),
            in 1/Å. Ignored when ``kpoints`` is given.
        kpoints: explicit grid ``(n1, n2, n3)`` of QE's cell, overriding ``kspacing``.
        kshift: Monkhorst-Pack offsets (0 or 1 per axis); ``(0, 0, 0)`` is
            Γ-centred, which hexagonal cells need.
        smearing: QE smearing name; ``'mv'`` is Marzari-Vanderbilt cold smearing.
        degauss: smearing width (Ry).
        conv_thr_per_atom: SCF threshold per atom (Ry); ``conv_thr`` is this times
            the number of atoms, so large cells are not held to a tighter criterion.
        electron_maxstep: SCF iterations before QE gives up (QE default).
        mixing_beta: charge mixing factor; 0.4 rather than QE's 0.7, safer for the
            metallic d-electron compounds of the case studies.
        etot_conv_thr: ionic energy-change criterion (Ry, total; QE default).
        forc_conv_thr: force criterion (Ry/bohr; QE default, about 0.026 eV/Å).
        press_conv_thr: pressure criterion for vc-relax (kbar; QE default).
        press: target pressure for vc-relax (kbar).
        ion_dynamics: ionic algorithm (``'bfgs'``).
        cell_dynamics: cell algorithm for vc-relax (``'bfgs'``).
        cell_dofree: which cell degrees of freedom vc-relax moves. ``None`` picks
            ``'ibrav'`` (keep QE's Bravais lattice, only its parameters change) when
            the cell is written with ``ibrav != 0`` *and* the crystal's own symmetry
            keeps that lattice, else ``'all'``: a tetragonal crystal in a cubic box
            must be free to become tetragonal.
        nstep: most ionic steps for relax/vc-relax.
        use_ibrav: ``False`` writes every cell as ``ibrav=0``.
        mpi_ranks: MPI processes; 1 runs ``pw.x`` without ``mpirun``.
        pools: k-point pools (``-nk``); ``None`` gives one pool per rank, the fastest
            for small cells with several k-points (what the data README measured).
            :func:`run_pw` uses fewer when the grid has fewer k-points than pools
            (QE stops with "some nodes have no k-points" otherwise).
        omp_num_threads: OpenMP (and OpenBLAS) threads per rank.
        pw_command: the ``pw.x`` executable.
        mpirun: the MPI launcher.
    """

    ecutwfc: float = 45.0
    ecutrho: float = 360.0
    kspacing: float = 0.25
    kpoints: tuple[int, int, int] | None = None
    kshift: tuple[int, int, int] = (0, 0, 0)
    smearing: str = "mv"
    degauss: float = 0.02
    conv_thr_per_atom: float = 1e-9
    electron_maxstep: int = 100
    mixing_beta: float = 0.4
    etot_conv_thr: float = 1e-4
    forc_conv_thr: float = 1e-3
    press_conv_thr: float = 0.5
    press: float = 0.0
    ion_dynamics: str = "bfgs"
    cell_dynamics: str = "bfgs"
    cell_dofree: str | None = None
    nstep: int = 50
    use_ibrav: bool = True
    mpi_ranks: int = 2
    pools: int | None = None
    omp_num_threads: int = 1
    pw_command: str = "pw.x"
    mpirun: str = "mpirun"

    def __post_init__(self):
        positive = ("ecutwfc", "ecutrho", "kspacing", "degauss", "conv_thr_per_atom")
        for name in (*positive, "etot_conv_thr", "forc_conv_thr", "press_conv_thr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"QESettings.{name} must be > 0, got {getattr(self, name)}")
        if self.ecutrho < 4 * self.ecutwfc:
            raise ValueError(f"ecutrho ({self.ecutrho}) must be at least 4 x ecutwfc")
        if not 0 < self.mixing_beta <= 1:
            raise ValueError(f"mixing_beta must be in (0, 1], got {self.mixing_beta}")
        if self.kpoints is not None and (
            len(self.kpoints) != 3 or any(int(n) != n or n < 1 for n in self.kpoints)
        ):
            raise ValueError(f"kpoints must be three positive integers, got {self.kpoints}")
        if len(self.kshift) != 3 or any(s not in (0, 1) for s in self.kshift):
            raise ValueError(f"kshift must be three 0/1 flags, got {self.kshift}")
        for name in ("electron_maxstep", "nstep", "mpi_ranks", "omp_num_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"QESettings.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_pools < 1 or self.mpi_ranks % self.n_pools:
            raise ValueError(f"pools ({self.pools}) must divide mpi_ranks ({self.mpi_ranks})")
        if self.cell_dofree is not None and not isinstance(self.cell_dofree, str):
            raise ValueError(f"cell_dofree must be a string or None, got {self.cell_dofree!r}")

    @property
    def n_pools(self) -> int:
        """The ``-nk`` value: ``pools``, or one pool per MPI rank."""
        return self.mpi_ranks if self.pools is None else int(self.pools)


# ---------------------------------------------------------------- cells


def _qe_lattice(ibrav: int, a: float, c_over_a: float = 1.0) -> np.ndarray:
    """QE's cell vectors (rows, Å) for ``ibrav`` and lattice parameter ``a`` (Å)."""
    if ibrav == 1:
        m = np.eye(3)
    elif ibrav == 2:
        m = 0.5 * np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [-1.0, 1.0, 0.0]])
    elif ibrav == 3:
        m = 0.5 * np.array([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]])
    elif ibrav == 4:
        m = np.array([[1.0, 0.0, 0.0], [-0.5, math.sqrt(3.0) / 2.0, 0.0], [0.0, 0.0, c_over_a]])
    else:
        raise ValueError(f"no QE cell for ibrav={ibrav}")
    return a * m


@dataclass(frozen=True)
class BravaisCell:
    """How a structure's cell is written for ``pw.x`` (see the module docstring).

    Attributes:
        ibrav: QE's Bravais-lattice index (0, 1, 2, 3 or 4).
        celldm: ``celldm(1)`` (bohr) and, for ``ibrav=4``, ``celldm(3) = c/a``;
            empty for ``ibrav=0``.
        lattice: ``[3, 3]`` QE's cell vectors as rows (Å).
        basis: ``[3, 3]`` integer ``M`` with ``M @ L_given = lattice @ rotation``.
        rotation: ``[3, 3]`` proper rotation ``R`` from QE's frame to the given one.
    """

    ibrav: int
    celldm: tuple[float, ...]
    lattice: np.ndarray
    basis: np.ndarray
    rotation: np.ndarray

    @property
    def alat_bohr(self) -> float:
        """QE's ``alat``: ``celldm(1)``, or the first cell vector's length for ibrav=0."""
        if self.celldm:
            return self.celldm[0]
        return float(np.linalg.norm(self.lattice[0])) / BOHR_TO_ANGSTROM

    def to_qe_frac(self, frac: np.ndarray) -> np.ndarray:
        """``[N, 3]`` fractional coordinates of the given cell → of QE's cell."""
        return np.asarray(frac, dtype=np.float64) @ np.linalg.inv(self.basis)

    def to_given(
        self, qe_lattice: np.ndarray, qe_frac: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """A QE-frame cell ``[3, 3]`` (Å) and ``[N, 3]`` fractional coordinates →
        the cell and coordinates in the frame and basis of the structure given."""
        inv_m = np.linalg.inv(self.basis)
        lattice = inv_m @ np.asarray(qe_lattice, dtype=np.float64) @ self.rotation
        return lattice, np.asarray(qe_frac, dtype=np.float64) @ self.basis


def _ibrav0_cell(lattice: np.ndarray) -> BravaisCell:
    """``ibrav=0`` with the given cell, or its negative when that is left-handed."""
    lattice = np.array(lattice, dtype=np.float64)
    basis = -np.eye(3) if np.linalg.det(lattice) < 0 else np.eye(3)
    return BravaisCell(0, (), basis @ lattice, basis, np.eye(3))


def _same_metric(a: np.ndarray, b: np.ndarray) -> bool:
    la, lb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    if not np.allclose(la, lb, rtol=_BRAVAIS_LTOL, atol=0.0):
        return False
    cos_a = (a @ a.T) / np.outer(la, la)
    cos_b = (b @ b.T) / np.outer(lb, lb)
    ang_a = np.degrees(np.arccos(np.clip(cos_a, -1.0, 1.0)))
    ang_b = np.degrees(np.arccos(np.clip(cos_b, -1.0, 1.0)))
    return bool(np.allclose(ang_a, ang_b, atol=_BRAVAIS_ATOL_DEG, rtol=0.0))


def _hexagonal_parameters(lattice: Lattice) -> tuple[float, float] | None:
    """(a, c) when the Niggli-reduced cell has two equal vectors at 60/120° and a
    third perpendicular to both; else None."""
    red = lattice.get_niggli_reduced_lattice()
    lengths, angles = red.abc, red.angles  # angles[i] is opposite vector i
    for k in range(3):
        i, j = (k + 1) % 3, (k + 2) % 3
        if not math.isclose(lengths[i], lengths[j], rel_tol=_BRAVAIS_LTOL):
            continue
        if min(abs(angles[k] - 60.0), abs(angles[k] - 120.0)) > _BRAVAIS_ATOL_DEG:
            continue
        if max(abs(angles[i] - 90.0), abs(angles[j] - 90.0)) > _BRAVAIS_ATOL_DEG:
            continue
        return 0.5 * (lengths[i] + lengths[j]), lengths[k]
    return None


def _candidates(lattice: Lattice) -> Iterable[tuple[int, float, float]]:
    volume = lattice.volume
    yield 1, volume ** (1.0 / 3.0), 1.0
    yield 2, (4.0 * volume) ** (1.0 / 3.0), 1.0
    yield 3, (2.0 * volume) ** (1.0 / 3.0), 1.0
    hexagonal = _hexagonal_parameters(lattice)
    if hexagonal is not None:
        a, c = hexagonal
        a = math.sqrt(volume / (c * math.sqrt(3.0) / 2.0))  # keep the volume exact
        yield 4, a, c / a


def bravais_cell(structure: Structure, use_ibrav: bool = True) -> BravaisCell:
    """QE's Bravais cell for the cell of ``structure`` as given, or ``ibrav=0``.

    Args:
        structure: the crystal; only its lattice is looked at.
        use_ibrav: ``False`` always gives ``ibrav=0`` with the given cell.

    Returns:
        The :class:`BravaisCell`; for ``ibrav=0`` the given cell (negated, with the
        coordinates, when it is left-handed).
    """
    given = np.array(structure.lattice.matrix, dtype=np.float64)
    if not use_ibrav:
        return _ibrav0_cell(given)
    for ibrav, a, c_over_a in _candidates(structure.lattice):
        qe = _qe_lattice(ibrav, a, c_over_a)
        if _same_metric(given, qe):
            basis = np.eye(3)  # QE's cell, perhaps rotated: coordinates carry over
        else:
            found = structure.lattice.find_mapping(
                Lattice(qe), ltol=_BRAVAIS_LTOL, atol=_BRAVAIS_ATOL_DEG, skip_rotation_matrix=True
            )
            if found is None:
                continue
            basis = np.asarray(found[2], dtype=np.float64)
        rotation = np.linalg.solve(qe, basis @ given)
        if np.linalg.det(rotation) < 0:
            # The lattice has inversion, so -M is as good a basis and makes R proper.
            basis, rotation = -basis, -rotation
        if abs(abs(np.linalg.det(basis)) - 1.0) > 1e-6:
            continue
        if not np.allclose(rotation @ rotation.T, np.eye(3), atol=10 * _BRAVAIS_LTOL):
            continue
        celldm = (a / BOHR_TO_ANGSTROM,) + ((c_over_a,) if ibrav == 4 else ())
        return BravaisCell(ibrav, celldm, qe, np.rint(basis), rotation)
    return _ibrav0_cell(given)


def _keeps_lattice(structure: Structure, ibrav: int) -> bool:
    """Whether the crystal's symmetry keeps the Bravais lattice of ``ibrav`` (so a
    vc-relax may move only QE's lattice parameters)."""
    with warnings.catch_warnings():
        # spglib 2.x asks every caller to opt in to its new error handling.
        warnings.filterwarnings("ignore", "Set OLD_ERROR_HANDLING", DeprecationWarning)
        system = SpacegroupAnalyzer(structure, symprec=_SYMPREC).get_crystal_system()
    if ibrav in (1, 2, 3):
        return system == "cubic"
    if ibrav == 4:
        return system in ("hexagonal", "trigonal")
    return False


def kpoint_grid(lattice: Lattice | np.ndarray, kspacing: float) -> tuple[int, int, int]:
    """Monkhorst-Pack grid with ``n_i = max(1, ceil(|b_i| / kspacing))``.

    Args:
        lattice: the cell (``[3, 3]`` rows in Å, or a ``Lattice``).
        kspacing: largest spacing between k-points (1/Å, reciprocal vectors with 2π).

    Returns:
        ``(n1, n2, n3)``.
    """
    matrix = lattice.matrix if isinstance(lattice, Lattice) else np.asarray(lattice, dtype=float)
    recip = 2.0 * math.pi * np.linalg.inv(matrix).T  # rows are b_i
    # The small slack keeps a ratio of 8.0000000001 from becoming 9.
    return tuple(
        max(1, math.ceil(float(n) / kspacing - 1e-6)) for n in np.linalg.norm(recip, axis=1)
    )


# ---------------------------------------------------------------- pseudopotentials


def _find_pseudo(directory: Path, element: str, suffixes: Sequence[str]) -> Path | None:
    """The one ``<element>.*<suffix>`` file, trying the suffixes in order."""
    for suffix in suffixes:
        hits = sorted(directory.glob(f"{element}.*{suffix}"))
        if len(hits) > 1:
            raise ValueError(
                f"several pseudopotentials for {element} in {directory}: "
                + ", ".join(p.name for p in hits)
            )
        if hits:
            return hits[0]
    return None


def _elements(structure_or_elements) -> list[str]:
    if isinstance(structure_or_elements, Structure):
        return [el.symbol for el in structure_or_elements.composition.elements]
    return [str(el) for el in structure_or_elements]


def prepare_pseudos(
    elements: Iterable[str], src_dir: str | os.PathLike, work_dir: str | os.PathLike
) -> dict[str, str]:
    """Decompress ``<El>.*.UPF.gz`` (or copy ``<El>.*.UPF``) from ``src_dir`` into
    ``work_dir``.

    Args:
        elements: element symbols.
        src_dir: folder of gzipped UPF files (e.g. ``shared/data/pseudo``).
        work_dir: where the UPF files go (created); never the shared folder itself.

    Returns:
        Element symbol → UPF file name inside ``work_dir``.

    Raises:
        FileNotFoundError: naming every element without a pseudopotential.
    """
    src, dst = Path(src_dir), Path(work_dir)
    elements = list(dict.fromkeys(str(e) for e in elements))
    found, missing = {}, []
    for el in elements:
        path = _find_pseudo(src, el, (".UPF.gz", ".upf.gz", ".UPF", ".upf"))
        if path is None:
            missing.append(el)
        else:
            found[el] = path
    if missing:
        raise FileNotFoundError(
            f"no pseudopotential <El>.*.UPF[.gz] for {', '.join(missing)} in {src}"
        )
    dst.mkdir(parents=True, exist_ok=True)
    names = {}
    for el, path in found.items():
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        # Always rewritten (via a temporary file): a stale copy must not survive.
        tmp = dst / f".{name}.tmp{os.getpid()}"
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(tmp, dst / name)
        names[el] = name
    return names


# ---------------------------------------------------------------- input


def _fortran(value) -> str:
    if isinstance(value, bool):
        return ".true." if value else ".false."
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, float):
        return repr(value).replace("e", "d")
    return str(value)


def _namelist(name: str, entries: Sequence[tuple[str, object]]) -> str:
    lines = [f"&{name}"] + [f"  {key} = {_fortran(value)}" for key, value in entries]
    return "\n".join(lines + ["/"])


def pw_input(
    structure: Structure,
    settings: QESettings | None = None,
    calculation: str = "vc-relax",
    pseudo_dir: str | os.PathLike = ".",
    prefix: str = "pwscf",
    *,
    pseudos: Mapping[str, str] | None = None,
    outdir: str | os.PathLike = "./tmp",
) -> str:
    """The ``pw.x`` input for ``structure`` (see the module docstring for the cell).

    Args:
        structure: the crystal (ordered, one element per site).
        settings: :class:`QESettings` (defaults when ``None``).
        calculation: ``'scf'``, ``'relax'`` or ``'vc-relax'``.
        pseudo_dir: the folder of (uncompressed) UPF files, as QE will see it.
        prefix: QE's run prefix.
        pseudos: element → UPF file name; by default the one ``<El>.*.UPF`` file in
            ``pseudo_dir`` per element.
        outdir: QE's scratch folder.

    Returns:
        The input file text.
    """
    settings = settings or QESettings()
    if calculation not in CALCULATIONS:
        raise ValueError(f"calculation must be one of {CALCULATIONS}, got {calculation!r}")
    if not structure.is_ordered:
        raise ValueError("pw_input needs an ordered structure (one element per site)")
    elements = _elements(structure)
    if pseudos is None:
        pseudos = {}
        for el in elements:
            path = _find_pseudo(Path(pseudo_dir), el, (".UPF", ".upf"))
            if path is not None:
                pseudos[el] = path.name
    missing = [el for el in elements if el not in pseudos]
    if missing:
        raise FileNotFoundError(
            f"no pseudopotential <El>.*.UPF for {', '.join(missing)} in {pseudo_dir} "
            "(prepare_pseudos decompresses them)"
        )

    cell = bravais_cell(structure, settings.use_ibrav)
    nat = len(structure)
    kpoints = settings.kpoints or kpoint_grid(cell.lattice, settings.kspacing)

    control = [
        ("calculation", calculation),
        ("prefix", prefix),
        ("pseudo_dir", str(pseudo_dir)),
        ("outdir", str(outdir)),
        ("tprnfor", True),
        ("tstress", True),
        ("disk_io", "low"),
    ]
    if calculation != "scf":
        control += [
            ("nstep", int(settings.nstep)),
            ("etot_conv_thr", float(settings.etot_conv_thr)),
            ("forc_conv_thr", float(settings.forc_conv_thr)),
        ]
    system: list[tuple[str, object]] = [("ibrav", cell.ibrav)]
    system += [(f"celldm({i})", float(v)) for i, v in zip((1, 3), cell.celldm, strict=False)]
    system += [
        ("nat", nat),
        ("ntyp", len(elements)),
        ("ecutwfc", float(settings.ecutwfc)),
        ("ecutrho", float(settings.ecutrho)),
        ("occupations", "smearing"),
        ("smearing", settings.smearing),
        ("degauss", float(settings.degauss)),
    ]
    electrons = [
        ("conv_thr", float(settings.conv_thr_per_atom * nat)),
        ("electron_maxstep", int(settings.electron_maxstep)),
        ("mixing_beta", float(settings.mixing_beta)),
    ]
    blocks = [
        _namelist("CONTROL", control),
        _namelist("SYSTEM", system),
        _namelist("ELECTRONS", electrons),
    ]
    if calculation != "scf":
        blocks.append(_namelist("IONS", [("ion_dynamics", settings.ion_dynamics)]))
    if calculation == "vc-relax":
        dofree = settings.cell_dofree
        if dofree is None:
            keep = cell.ibrav != 0 and _keeps_lattice(structure, cell.ibrav)
            dofree = "ibrav" if keep else "all"
        elif dofree == "ibrav" and cell.ibrav == 0:
            raise ValueError("cell_dofree='ibrav' needs a cell written with ibrav != 0")
        cell_entries = [
            ("cell_dynamics", settings.cell_dynamics),
            ("cell_dofree", dofree),
            ("press", float(settings.press)),
            ("press_conv_thr", float(settings.press_conv_thr)),
        ]
        blocks.append(_namelist("CELL", cell_entries))

    lines = ["ATOMIC_SPECIES"]
    lines += [f"{el} {Element(el).atomic_mass:.6f} {pseudos[el]}" for el in elements]
    if cell.ibrav == 0:
        lines.append("CELL_PARAMETERS angstrom")
        lines += ["  " + " ".join(f"{x:16.10f}" for x in row) for row in cell.lattice]
    lines.append("ATOMIC_POSITIONS crystal")
    frac = cell.to_qe_frac(structure.frac_coords)
    for site, row in zip(structure, frac, strict=True):
        lines.append(f"{site.specie.symbol} " + " ".join(f"{x:16.10f}" for x in row))
    lines.append("K_POINTS automatic")
    lines.append(" ".join(str(int(n)) for n in (*kpoints, *settings.kshift)))
    return "\n".join(blocks + lines) + "\n"


# ---------------------------------------------------------------- output


@dataclass(frozen=True)
class IonicStep:
    """One SCF cycle of ``pw.x``: one configuration and what QE computed for it.

    Attributes:
        structure: the configuration (frame and basis of the structure given).
        energy_ry: QE's ``!`` total energy (Ry; the free energy F = E - TS with
            smearing), or ``None`` when the SCF did not finish.
        scf_iterations: SCF iterations run on this configuration.
        scf_converged: whether QE reported SCF convergence.
        total_force: QE's "Total force" (Ry/bohr), when printed.
        pressure_kbar: QE's pressure P (kbar), when printed.
        final_scf: vc-relax's closing SCF at the relaxed cell with new G-vectors.
    """

    structure: Structure
    energy_ry: float | None
    scf_iterations: int
    scf_converged: bool
    total_force: float | None = None
    pressure_kbar: float | None = None
    final_scf: bool = False

    @property
    def energy_ev(self) -> float | None:
        """``energy_ry`` in eV."""
        return None if self.energy_ry is None else self.energy_ry * RY_TO_EV


@dataclass
class QERun:
    """What a ``pw.x`` run reached (complete or not).

    Attributes:
        calculation: ``'scf'``, ``'relax'`` or ``'vc-relax'``.
        completed: QE printed ``JOB DONE``.
        converged: scf: the SCF converged; relax/vc-relax: BFGS converged.
        stop_reason: ``'converged'``, ``'time limit'``, ``'nstep reached'``,
            ``'error: <QE message>'``, or (parser alone, output cut short)
            ``'incomplete'``.
        wall_s: wall time (s): measured by :func:`run_pw`, else QE's own, else None.
        steps: one :class:`IonicStep` per SCF cycle started, the last maybe unfinished.
        structures: the structure after each ionic step, i.e. each geometry QE moved
            to (QE's closing "final coordinates" block is not a new step).
        final_structure: the last geometry QE reached (the relaxed one when
            converged; the initial one when QE never moved).
        work_dir: the run's folder (``run_pw`` only).
    """

    calculation: str
    completed: bool
    converged: bool
    stop_reason: str
    wall_s: float | None
    steps: list[IonicStep]
    structures: list[Structure]
    final_structure: Structure
    work_dir: Path | None = None

    @property
    def n_ionic_steps(self) -> int:
        """Geometry updates QE made (BFGS steps)."""
        return len(self.structures)

    @property
    def scf_iterations(self) -> list[int]:
        """SCF iterations of each SCF cycle, the unfinished last one included."""
        return [s.scf_iterations for s in self.steps]

    @property
    def scf_iterations_total(self) -> int:
        """All SCF iterations of the run."""
        return sum(self.scf_iterations)

    @property
    def energies_ry(self) -> list[float]:
        """Total energy (Ry) of every finished SCF cycle, in order."""
        return [s.energy_ry for s in self.steps if s.energy_ry is not None]

    @property
    def energies_ev(self) -> list[float]:
        """``energies_ry`` in eV."""
        return [e * RY_TO_EV for e in self.energies_ry]

    @property
    def final_energy_ry(self) -> float | None:
        """The last finished SCF energy (Ry), or None."""
        energies = self.energies_ry
        return energies[-1] if energies else None


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eEdD][-+]?\d+)?"
_RE_CELL = re.compile(
    r"^\s*CELL_PARAMETERS\s*\(?\s*(alat|bohr|angstrom)\s*(?:=\s*(" + _NUM + r"))?"
)
_RE_POS = re.compile(r"^\s*ATOMIC_POSITIONS\s*\(?\s*(alat|bohr|angstrom|crystal)\b")
_RE_ITER = re.compile(r"^\s*iteration #\s*(\d+)")
_RE_ENERGY = re.compile(r"^!\s+total energy\s+=\s+(" + _NUM + r")\s+Ry")
_RE_SCF_DONE = re.compile(r"convergence has been achieved in\s+(\d+)\s+iterations")
_RE_SCF_FAIL = re.compile(r"convergence NOT achieved after\s+(\d+)\s+iterations")
_RE_FORCE = re.compile(r"^\s*Total force\s+=\s+(" + _NUM + r")")
_RE_PRESS = re.compile(r"total\s+stress.*P=\s*(" + _NUM + r")")
# Lines that set a flag of the parser (to True; "End final coordinates" to False).
_MARKERS = {
    "bfgs converged": "bfgs_converged",
    "maximum number of steps has been reached": "nstep_reached",
    "End of BFGS Geometry Optimization": "bfgs_ended",
    "Begin final coordinates": "in_final_block",
    "End final coordinates": "in_final_block",
    "Final scf calculation at the relaxed structure": "final_scf",
    "JOB DONE": "completed",
}


def _float(text: str) -> float:
    return float(text.replace("d", "e").replace("D", "e"))


def _wall_seconds(line: str) -> float | None:
    # QE writes "16.07s CPU     31.59s WALL", or "1m 2.3s WALL", or "1h 2m WALL".
    wall = line.split("CPU")[-1]
    total, found = 0.0, False
    for value, unit in re.findall(r"([\d.]+)\s*([hms])", wall):
        total += float(value) * {"h": 3600.0, "m": 60.0, "s": 1.0}[unit]
        found = True
    return total if found else None


def _block(lines: list[str], start: int, count: int) -> np.ndarray | None:
    """``count`` rows of three numbers after line ``start`` (None if cut short)."""
    rows = []
    for line in lines[start + 1 : start + 1 + count]:
        parts = line.split()
        if len(parts) != 3:
            return None
        try:
            rows.append([_float(x) for x in parts])
        except ValueError:
            return None
    return np.array(rows, dtype=np.float64) if len(rows) == count else None


def _positions(lines: list[str], start: int, nat: int) -> tuple[list[str], np.ndarray] | None:
    species, rows = [], []
    for line in lines[start + 1 : start + 1 + nat]:
        parts = line.split()
        if len(parts) < 4:
            return None
        try:
            rows.append([_float(x) for x in parts[1:4]])
        except ValueError:
            return None
        species.append(parts[0])
    return (species, np.array(rows, dtype=np.float64)) if len(rows) == nat else None


def _qe_error(lines: list[str]) -> str | None:
    for i, line in enumerate(lines):
        if "Error in routine" in line:
            # "Error in routine  set_occupations (1):" and the message on the next line.
            where = " ".join(line.split()).rstrip(":")
            message = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{where}: {message}" if message else where
    return None


def parse_pw_output(
    text: str,
    initial_structure: Structure,
    calculation: str | None = None,
    *,
    use_ibrav: bool = True,
) -> QERun:
    """Parse ``pw.x`` output, complete or cut short.

    Args:
        text: the output (``pw.out``).
        initial_structure: the structure the input was written from (its
            :func:`bravais_cell` maps QE's frame back to the given one).
        calculation: the calculation; by default guessed from the output (a run cut
            short before its first ionic step then reads as ``'scf'``).
        use_ibrav: as passed to :func:`pw_input` (``QESettings.use_ibrav``).

    Returns:
        A :class:`QERun`; ``stop_reason`` is ``'incomplete'`` when the output ends
        before QE said how it ended, and ``wall_s`` is QE's own wall time, if printed.
    """
    lines = text.splitlines()
    if calculation is None:
        if "new unit-cell volume" in text or "CELL_PARAMETERS" in text:
            calculation = "vc-relax"
        elif "BFGS Geometry Optimization" in text or "ATOMIC_POSITIONS" in text:
            calculation = "relax"
        else:
            calculation = "scf"
    ibrav_match = re.search(r"bravais-lattice index\s*=\s*(-?\d+)", text)
    qe_ibrav = int(ibrav_match.group(1)) if ibrav_match else None
    cell = bravais_cell(initial_structure, use_ibrav and qe_ibrav != 0)
    if qe_ibrav is not None and qe_ibrav != cell.ibrav:
        raise ValueError(
            f"the output is for ibrav={qe_ibrav}, but initial_structure gives ibrav={cell.ibrav}"
        )
    nat = len(initial_structure)
    qe_lattice = cell.lattice.copy()
    qe_frac = cell.to_qe_frac(initial_structure.frac_coords)
    alat = cell.alat_bohr * BOHR_TO_ANGSTROM

    species = [site.specie.symbol for site in initial_structure]

    def current() -> Structure:
        lattice, frac = cell.to_given(qe_lattice, qe_frac)
        return Structure(Lattice(lattice), species, frac)

    # One dict per SCF cycle: opened by its first iteration, closed by its
    # convergence line; forces and stress are printed after that line.
    drafts: list[dict] = []
    structures: list[Structure] = []
    final_structure: Structure | None = None
    step_structure = initial_structure.copy()
    flags = dict.fromkeys(_MARKERS.values(), False)
    scf_failed, wall_s = False, None

    def draft(new: bool = False) -> dict:
        if new or not drafts or drafts[-1]["done"]:
            drafts.append(
                dict(
                    structure=step_structure,
                    energy_ry=None,
                    scf_iterations=0,
                    scf_converged=False,
                    final_scf=flags["final_scf"],
                    done=False,
                )
            )
        return drafts[-1]

    pending_cell: np.ndarray | None = None
    for i, line in enumerate(lines):
        if m := _RE_ITER.match(line):
            draft()["scf_iterations"] = int(m.group(1))
        elif m := _RE_ENERGY.match(line):
            # QE prints the "!" energy only for a converged SCF.
            draft().update(energy_ry=_float(m.group(1)), scf_converged=True)
        elif m := _RE_SCF_DONE.search(line):
            d = draft() if drafts and not drafts[-1]["done"] else draft(new=True)
            d.update(scf_iterations=int(m.group(1)), scf_converged=True, done=True)
        elif m := _RE_SCF_FAIL.search(line):
            scf_failed = True
            d = draft() if drafts and not drafts[-1]["done"] else draft(new=True)
            d.update(scf_iterations=int(m.group(1)), scf_converged=False, done=True)
        elif (m := _RE_FORCE.match(line)) and drafts:
            drafts[-1]["total_force"] = _float(m.group(1))
        elif (m := _RE_PRESS.search(line)) and drafts:
            drafts[-1]["pressure_kbar"] = _float(m.group(1))
        elif marker := next((k for k in _MARKERS if k in line), None):
            flags[_MARKERS[marker]] = marker != "End final coordinates"
        elif "PWSCF" in line and "WALL" in line:
            wall_s = _wall_seconds(line)
        elif m := _RE_CELL.match(line):
            rows = _block(lines, i, 3)
            if rows is not None:
                unit = m.group(1)
                if unit == "alat":
                    scale = _float(m.group(2)) * BOHR_TO_ANGSTROM if m.group(2) else alat
                else:
                    scale = BOHR_TO_ANGSTROM if unit == "bohr" else 1.0
                pending_cell = rows * scale
        elif m := _RE_POS.match(line):
            block = _positions(lines, i, nat)
            if block is None:
                continue
            if pending_cell is not None:
                qe_lattice, pending_cell = pending_cell, None
            names, rows = block
            unit = m.group(1)
            if unit == "crystal":
                qe_frac = rows
            else:
                scale = {"alat": alat, "bohr": BOHR_TO_ANGSTROM, "angstrom": 1.0}[unit]
                qe_frac = np.linalg.solve(qe_lattice.T, (rows * scale).T).T
            species = names
            final_structure = current()
            if not flags["in_final_block"]:
                structures.append(final_structure)
            step_structure = final_structure

    steps = [IonicStep(**{k: v for k, v in d.items() if k != "done"}) for d in drafts]
    error = _qe_error(lines)
    if error is not None:
        stop_reason = f"error: {error}"
    elif scf_failed:
        failed = next(ln for ln in lines if _RE_SCF_FAIL.search(ln))
        stop_reason = f"error: {failed.strip()}"
    elif flags["nstep_reached"]:
        stop_reason = "nstep reached"
    elif calculation == "scf" and flags["completed"] and steps and steps[-1].scf_converged:
        stop_reason = "converged"
    elif calculation != "scf" and flags["bfgs_converged"]:
        stop_reason = "converged"
    elif flags["bfgs_ended"]:
        stop_reason = "error: BFGS stopped without converging"
    else:
        stop_reason = "incomplete"
    return QERun(
        calculation=calculation,
        completed=flags["completed"],
        converged=stop_reason == "converged",
        stop_reason=stop_reason,
        wall_s=wall_s,
        steps=steps,
        structures=structures,
        final_structure=final_structure if final_structure is not None else initial_structure,
    )


# ---------------------------------------------------------------- running


class QENotFoundError(FileNotFoundError):
    """``pw.x`` (or ``mpirun``) is not installed."""


def _command(settings: QESettings, pools: int) -> list[str]:
    """``mpirun [flags] -np N pw.x -nk K -in pw.in``, or ``pw.x -in pw.in`` for one rank."""
    pw = shutil.which(settings.pw_command)
    if pw is None:
        raise QENotFoundError(f"{settings.pw_command} not found on PATH: {INSTALL_HINT}")
    if settings.mpi_ranks == 1:
        return [pw, "-in", "pw.in"]
    mpirun = shutil.which(settings.mpirun)
    if mpirun is None:
        raise QENotFoundError(
            f"{settings.mpirun} not found on PATH (needed for mpi_ranks="
            f"{settings.mpi_ranks}; mpi_ranks=1 runs without it): {INSTALL_HINT}"
        )
    flags = []
    if _is_open_mpi(mpirun):
        # Container CPU limits can leave OpenMPI fewer "slots" than ranks; OpenMPI
        # also refuses to run as root unless told to.
        flags.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--allow-run-as-root")
    return [mpirun, *flags, "-np", str(settings.mpi_ranks), pw, "-nk", str(pools), "-in", "pw.in"]


def default_pseudo_dir() -> Path:
    """``$DAO_PSEUDO_DIR``; else ``pseudo`` in the data folder
    (:func:`dao.data.paths.data_root`: ``$DAO_DATA_ROOT``, ``../shared/data`` or
    ``shared/data`` beside a source checkout)."""
    from dao.data.paths import data_root  # noqa: PLC0415

    if os.environ.get("DAO_PSEUDO_DIR"):
        return Path(os.environ["DAO_PSEUDO_DIR"])
    return data_root() / "pseudo"


@functools.lru_cache(maxsize=8)
def _is_open_mpi(mpirun: str) -> bool:
    try:
        out = subprocess.run(
            [mpirun, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def _stop(proc: subprocess.Popen) -> None:
    """End the whole process group (mpirun and its ranks), politely first."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_pw(
    structure: Structure,
    settings: QESettings | None = None,
    work_dir: str | os.PathLike = "qe_run",
    calculation: str = "vc-relax",
    max_wall_s: float | None = None,
    progress: Callable[[QERun], None] | None = None,
    *,
    pseudo_src: str | os.PathLike | None = None,
    prefix: str = "pwscf",
    poll_s: float = 0.2,
) -> QERun:
    """Run ``pw.x`` on ``structure`` in ``work_dir`` and return what it reached.

    Writes ``pw.in``, decompresses the pseudopotentials into ``work_dir/pseudo``,
    runs ``mpirun -np N pw.x -nk K -in pw.in`` (plain ``pw.x -in pw.in`` for one
    rank) with ``OMP_NUM_THREADS`` and ``OPENBLAS_NUM_THREADS`` set, and streams its
    output to ``work_dir/pw.out`` (stderr to ``pw.err``). Past ``max_wall_s`` the
    process group is killed and the partial output parsed.

    Args:
        structure: the start structure.
        settings: :class:`QESettings` (defaults when ``None``).
        work_dir: the run folder (created; QE's scratch is ``work_dir/tmp``).
        calculation: ``'scf'``, ``'relax'`` or ``'vc-relax'``.
        max_wall_s: wall-time limit (s); ``None`` for none.
        progress: called with the partial :class:`QERun` after each SCF cycle; an
            exception raised in it stops the run and propagates.
        pseudo_src: folder of ``<El>.*.UPF.gz`` files; default
            :func:`default_pseudo_dir`.
        prefix: QE's run prefix.
        poll_s: how often the output is polled (s).

    Returns:
        The :class:`QERun`; ``stop_reason`` is ``'time limit'`` when killed.

    Raises:
        QENotFoundError: ``pw.x`` (or ``mpirun`` for several ranks) is missing.
    """
    settings = settings or QESettings()
    grid = settings.kpoints or kpoint_grid(
        bravais_cell(structure, settings.use_ibrav).lattice, settings.kspacing
    )
    # No more pools than k-points in the full grid (a divisor of the ranks).
    pools = max(
        p
        for p in range(1, settings.n_pools + 1)
        if settings.mpi_ranks % p == 0 and p <= max(1, math.prod(grid))
    )
    cmd = _command(settings, pools)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    pseudos = prepare_pseudos(
        _elements(structure), pseudo_src or default_pseudo_dir(), work / "pseudo"
    )
    text = pw_input(structure, settings, calculation, "./pseudo", prefix, pseudos=pseudos)
    (work / "pw.in").write_text(text, encoding="utf-8")
    (work / "CRASH").unlink(missing_ok=True)  # QE appends to an old one
    env = dict(os.environ)
    threads = str(settings.omp_num_threads)
    # OpenBLAS (pthreads build) would otherwise start a thread per core in every rank.
    env.update(OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    log.info("running %s in %s", " ".join(cmd), work)

    def parse(out: str) -> QERun:
        return parse_pw_output(out, structure, calculation, use_ibrav=settings.use_ibrav)

    start = time.monotonic()
    timed_out = False
    output = bytearray()
    seen_energies = 0
    with (
        open(work / "pw.out", "wb") as out_w,
        open(work / "pw.out", "rb") as out_r,
        open(work / "pw.err", "wb") as err_w,
    ):
        proc = subprocess.Popen(
            cmd, cwd=work, stdout=out_w, stderr=err_w, env=env, start_new_session=True
        )
        try:
            while True:
                returncode = proc.poll()
                output += out_r.read()
                if progress is not None:
                    so_far = output.decode("utf-8", "replace")
                    n = so_far.count("\n!")
                    if n > seen_energies:
                        seen_energies = n
                        partial = parse(so_far)
                        partial.wall_s, partial.work_dir = time.monotonic() - start, work
                        progress(partial)
                if returncode is not None:
                    break
                if max_wall_s is not None and time.monotonic() - start > max_wall_s:
                    timed_out = True
                    _stop(proc)
                    output += out_r.read()
                    break
                time.sleep(poll_s)
        finally:
            _stop(proc)
    wall_s = time.monotonic() - start

    result = parse(output.decode("utf-8", "replace"))
    result.wall_s, result.work_dir = wall_s, work
    if timed_out and not result.completed:
        result.stop_reason, result.converged = "time limit", False
    elif result.stop_reason == "incomplete" and proc.returncode not in (0, None):
        # The message may be only in CRASH (written by whichever rank failed) or stderr.
        crash = work / "CRASH"
        error = (
            _qe_error(crash.read_text(errors="replace").splitlines()) if crash.exists() else None
        )
        if error is None:
            err = (work / "pw.err").read_text(errors="replace").strip().splitlines()
            error = f"pw.x exited with code {proc.returncode}" + (f": {err[-1]}" if err else "")
        result.stop_reason = f"error: {error}"
    log.info("pw.x %s: %s after %.1f s", calculation, result.stop_reason, wall_s)
    return result


# ---------------------------------------------------------------- start structures


def perturb_structure(
    structure: Structure, seed: int, lattice_strain: float = 0.03, displacement: float = 0.1
) -> Structure:
    """A perturbed copy of ``structure``, deterministic by ``seed``.

    The cell is strained by ``I + ε`` with ``ε`` symmetric, its six independent
    components uniform in ``[-lattice_strain, lattice_strain]``; then every atom is
    moved by exactly ``displacement`` Å in a uniformly random direction.

    Args:
        structure: the crystal (not modified).
        seed: random seed.
        lattice_strain: largest strain component.
        displacement: displacement of each atom (Å).

    Returns:
        A new ``Structure`` with the same species in the same order.
    """
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.uniform(-lattice_strain, lattice_strain, size=(3, 3)))
    strain = upper + np.triu(upper, 1).T
    lattice = structure.lattice.matrix @ (np.eye(3) + strain)
    directions = rng.normal(size=(len(structure), 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    cart = structure.frac_coords @ lattice + displacement * directions
    return Structure(
        Lattice(lattice),
        [site.species for site in structure],
        cart,
        coords_are_cartesian=True,
    )


def _species_list(species) -> list[str]:
    if isinstance(species, str | Composition):
        comp = Composition(species)
        if any(int(n) != n for n in comp.values()):
            raise ValueError(f"random_start needs integer amounts, got {comp}")
        return [el.symbol for el, n in sorted(comp.items()) for _ in range(int(n))]
    return [str(s) for s in species]


def random_start(
    species: str | Composition | Sequence[str],
    seed: int,
    volume_per_atom: float,
    *,
    min_distance: float | None = None,
    max_attempts: int = 1000,
) -> Structure:
    """Atoms at random positions in a random cell of the right volume (seeded).

    The cell has lengths in ratio up to 1:1.5 and angles in [70°, 110°], scaled to
    ``len(species) * volume_per_atom``; atoms are placed one by one, uniformly in the
    cell, rejecting any closer than ``min_distance`` to an atom already placed or to
    a periodic image.

    Args:
        species: a composition (``"Si2"``, a ``Composition``; sorted by element) or
            the list of element symbols, one per atom.
        seed: random seed.
        volume_per_atom: Å^3 per atom.
        min_distance: smallest allowed distance (Å); default 0.7 x
            ``volume_per_atom ** (1/3)``.
        max_attempts: random cells tried before giving up.

    Returns:
        A ``Structure`` with the atoms in the order of ``species``.

    Raises:
        RuntimeError: no placement found in ``max_attempts`` cells.
    """
    symbols = _species_list(species)
    if not symbols or volume_per_atom <= 0:
        raise ValueError("random_start needs at least one atom and volume_per_atom > 0")
    if min_distance is None:
        min_distance = 0.7 * volume_per_atom ** (1.0 / 3.0)
    rng = np.random.default_rng(seed)
    volume = len(symbols) * volume_per_atom
    for _ in range(max_attempts):
        lengths = rng.uniform(1.0, 1.5, size=3)
        angles = rng.uniform(70.0, 110.0, size=3)
        try:
            shape = Lattice.from_parameters(*lengths, *angles)
        except ValueError:
            continue
        if not shape.volume > 0.2 * np.prod(lengths):  # nearly flat (or impossible) cells
            continue
        lattice = Lattice(shape.matrix * (volume / shape.volume) ** (1.0 / 3.0))
        # An atom must also keep min_distance from its own images.
        if min(lattice.get_niggli_reduced_lattice().abc) < min_distance:
            continue
        frac = np.empty((0, 3))
        for _ in range(len(symbols)):
            for _ in range(200):
                trial = rng.random((1, 3))
                if len(frac) == 0 or lattice.get_all_distances(trial, frac).min() >= min_distance:
                    frac = np.vstack([frac, trial])
                    break
            else:
                break
        if len(frac) == len(symbols):
            return Structure(lattice, symbols, frac)
    raise RuntimeError(
        f"random_start: no placement of {len(symbols)} atoms {min_distance:.2f} Å apart "
        f"in {max_attempts} cells of {volume:.1f} Å^3"
    )
