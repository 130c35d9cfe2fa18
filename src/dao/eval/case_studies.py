"""Reference structures of the paper's superconductor case studies (spec §8).

The DAO paper (Wu et al., "Siamese Foundation Models for Crystal Structure
Prediction", arXiv:2503.10471) compares DAO-G structures with reference crystals
of four superconductors and DAO-P's Tc with measurement. For each system this
module records the structure type (space group, Wyckoff sites), the cell to
compare against and where its numbers come from, the measured Tc, the paper's
own numbers, and the Materials Project ids of the same material in our offline
data (``../shared/data``) so that training can leave them out
(:func:`case_study_exclude_ids`). Nothing here touches the network.

Provenance, stated plainly because it limits what the numbers mean:

* No *experimental* lattice constant or atomic coordinate of any of the four
  systems could be read from a citable publication while this module was
  written (the publications are named below; their structure tables were not
  reachable). None is typed in from memory.
* Cr3Os and Zr4Pd2O therefore use the Materials Project entries that are in our
  offline data, mp-416 and mp-22479: DFT (GGA) relaxed cells, ``kind="computed"``,
  not measured. An RMSE against them is an RMSE against DFT, not against
  experiment as in the paper.
* CsV3Sb5 and Zr4Rh2O have no cell recorded (no Materials Project entry in our
  data either): :meth:`CaseStudy.structure` raises :class:`ReferenceDataMissing`
  naming the numbers needed and the publication to take them from. A cell can
  be passed explicitly (``structure(cell=...)``) meanwhile.

Cells are built with pymatgen's ``Structure.from_spacegroup`` from the space-group
setting, the lattice parameters and one representative position per Wyckoff
orbit; the atom count is checked against the sum of the orbit multiplicities, so
a coordinate that falls on a special position is an error, not a silently smaller
cell.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

from pymatgen.core import Lattice, Structure
from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

__all__ = [
    "CASE_STUDIES",
    "CaseStudy",
    "ReferenceCell",
    "ReferenceDataMissing",
    "WyckoffSite",
    "case_study_exclude_ids",
    "get_case_study",
]

ReferenceKind = Literal["experimental", "computed"]

# symprec of the primitive-cell reduction; the cells here are exact, so any
# small value works. 0.01 Å is the tolerance the tests check symmetry with.
_SYMPREC = 0.01

# ---------------------------------------------------------------------------
# Sources (one string each, reused below)
# ---------------------------------------------------------------------------

_DAO_PAPER = (
    "L. Wu, W. Huang, R. Jiao, J. Huang, L. Liu, Y. Zhou, H. Sun, Y. Liu, F. Sun, Y. Ren, "
    "J.-R. Wen, 'Siamese Foundation Models for Crystal Structure Prediction', "
    "arXiv:2503.10471 (2025); DAO numbers as summarised in DAO_SPEC.md section 8"
)
_ORTIZ_2019 = (
    "B. R. Ortiz et al., 'New kagome prototype materials: discovery of KV3Sb5, RbV3Sb5, and "
    "CsV3Sb5', Phys. Rev. Materials 3, 094407 (2019), doi:10.1103/PhysRevMaterials.3.094407 "
    "(P6/mmm structure type; its refined a, c and z(Sb2) are the numbers still to be recorded)"
)
_ORTIZ_2020 = (
    "B. R. Ortiz et al., 'CsV3Sb5: a Z2 topological kagome metal with a superconducting ground "
    "state', arXiv:2011.06745 (2020), published as Phys. Rev. Lett. 125, 247002 (2020): first "
    "report of bulk superconductivity, Tc = 2.5 K (single crystals). The journal reference was "
    "not checked against the journal page here; the arXiv abstract was."
)
_GE_2022 = (
    "J. Ge, P. Wang, Y. Xing, Q. Yin, H. Lei, Z. Wang, J. Wang, 'Discovery of charge-4e and "
    "charge-6e superconductivity in kagome superconductor CsV3Sb5', arXiv:2201.10352 (2022): "
    "the 2.3 K value, as cited by SuperCon3D"
)
_SUPERCON3D = (
    "P. Chen, L. Peng, R. Jiao, Q. Mo, Z. Wang, W. Huang, Y. Liu, Y. Lu, 'Learning "
    "Superconductivity from Ordered and Disordered Material Structures' (the SuperCon3D "
    "dataset paper), Table 8: experimental Tc of CsV3Sb5 2.3 K [Ge et al.], Zr4Rh2O 3.73 K and "
    "Zr4Pd2O 2.73 K [Watanabe et al.]"
)
_WATANABE_2023 = (
    "Y. Watanabe, A. Miura, C. Moriyoshi, A. Yamashita, Y. Mizuguchi, 'Observation of "
    "superconductivity and enhanced upper critical field of eta-carbide-type oxide Zr4Pd2O', "
    "Sci. Rep. 13, 22458 (2023), arXiv:2311.10338: Zr4Pd2O Tc = 2.73 K (synchrotron XRD, "
    "magnetisation, resistivity, specific heat); also measures the Rh analogue Zr4Rh2O"
)
_MA_2019 = (
    "K. Ma, J. Lago, F. O. von Rohr, 'Superconductivity in the eta-carbide-type oxides "
    "Zr4Rh2Ox' (2019; arXiv preprint, journal reference not checked here): eta-carbide "
    "structure, metals on 16d, 32e and 48f, the light atom on 16c; bulk superconductivity "
    "with resistive Tc of 2.8 K and 4.7 K, for x = 0.7 and x = 1 as far as the (garbled) copy "
    "of the abstract that was read shows"
)
_AFLOW_A15 = (
    "M. J. Mehl et al., 'The AFLOW Library of Crystallographic Prototypes: Part 1', "
    "Comp. Mat. Sci. 136, S1 (2017), prototype A3B_cP8_223_c_a (Cr3Si, A15): Cr 6c, Si 2a; "
    "lists Cr3Os among the compounds of this type"
)
_MP = (
    "A. Jain et al., 'The Materials Project', APL Materials 1, 011002 (2013); entry structures "
    "are DFT (GGA) relaxed, i.e. computed"
)
_MP416 = (
    "Materials Project mp-416 (Cr3Os, Pm-3n), computed: a = 4.64823 Å, as stored in "
    "../shared/data/mp_20_biternary_subset/test.csv.gz (WyckoffTransformer's MP-20 subset)"
)
_MP22479 = (
    "Materials Project mp-22479 (Zr4Pd2O, Fd-3m), computed: primitive rhombohedral cell "
    "a = 8.89205162 Å, alpha = 60°, i.e. conventional a = 8.89205162 * sqrt(2) = 12.57526 Å; "
    "x(Zr 48f) = 0.306186 and x(Pd 32e) = 0.285046 in origin choice 2, read off the 6-decimal "
    "coordinates stored in ../shared/data/mpts_52/val.csv.gz"
)


class ReferenceDataMissing(LookupError):
    """No reference cell is recorded for a case study (see its ``missing_reference``)."""


@dataclass(frozen=True)
class WyckoffSite:
    """One occupied Wyckoff orbit.

    Attributes:
        species: element symbol.
        wyckoff: multiplicity and letter in the conventional cell, e.g. ``"48f"``.
        coords: one representative fractional position of the orbit, in the
            setting of the :class:`ReferenceCell` that holds it.
    """

    species: str
    wyckoff: str
    coords: tuple[float, float, float]

    @property
    def multiplicity(self) -> int:
        """Number of atoms of this orbit in the conventional cell."""
        return int(self.wyckoff.rstrip("abcdefghijklmnopqrstuvwxyz"))


@dataclass(frozen=True)
class ReferenceCell:
    """A conventional cell given by lattice parameters and Wyckoff positions.

    Attributes:
        a, b, c: lattice lengths in Å, as in the source.
        alpha, beta, gamma: lattice angles in degrees.
        setting: space-group symbol handed to ``Structure.from_spacegroup``; it fixes
            the origin choice the coordinates refer to (``"Fd-3m:2"`` is origin
            choice 2, inversion centre at the origin; pymatgen's plain ``"Fd-3m"``
            is origin choice 1).
        sites: one :class:`WyckoffSite` per occupied orbit.
        kind: ``"experimental"`` (a measured refinement) or ``"computed"`` (e.g. a
            DFT-relaxed database entry).
        source: where the numbers come from.
    """

    a: float
    b: float
    c: float
    alpha: float
    beta: float
    gamma: float
    setting: str
    sites: tuple[WyckoffSite, ...]
    kind: ReferenceKind
    source: str

    @property
    def lattice_parameters(self) -> tuple[float, float, float, float, float, float]:
        """``(a, b, c, alpha, beta, gamma)`` in Å and degrees."""
        return (self.a, self.b, self.c, self.alpha, self.beta, self.gamma)


@dataclass(frozen=True)
class CaseStudy:
    """One superconductor of the paper's case studies.

    Attributes:
        name: short name, the key in :data:`CASE_STUDIES` (reduced formula).
        paper_name: the name the paper uses (formula of the cell it compares).
        formula: reduced formula.
        spacegroup_symbol: Hermann-Mauguin symbol as spglib/pymatgen prints it.
        spacegroup_number: international number.
        wyckoff_sites: the structure type, ``(species, wyckoff)`` per orbit.
        primitive_in_paper: the paper's cell is the primitive one (True for the
            face-centred eta-carbides: 28 of the 112 conventional atoms).
        reference: the cell compared against, or None if no citable numbers were found.
        missing_reference: what is still missing: with no ``reference``, the numbers to
            record and where to take them from; with a computed one, the experimental
            numbers it stands in for.
        measured_tc_k: measured Tc in K (None if not found for this composition).
        tc_source: where ``measured_tc_k`` comes from.
        paper_rmse: the paper's best DAO-G RMSE against its reference structure.
        paper_tc_k: DAO-P's Tc in K where the paper gives the value.
        paper_tc_error_k: DAO-P's |Tc error| in K where the paper gives only that.
        mp_ids_in_data: Materials Project ids of this material in ``../shared/data``.
        citations: every source used for this entry.
    """

    name: str
    paper_name: str
    formula: str
    spacegroup_symbol: str
    spacegroup_number: int
    wyckoff_sites: tuple[tuple[str, str], ...]
    primitive_in_paper: bool
    reference: ReferenceCell | None
    missing_reference: str
    measured_tc_k: float | None
    tc_source: str
    paper_rmse: float
    paper_tc_k: float | None
    paper_tc_error_k: float | None
    mp_ids_in_data: frozenset[str]
    citations: tuple[str, ...]

    @property
    def lattice_parameters(self) -> tuple[float, float, float, float, float, float]:
        """Conventional ``(a, b, c, alpha, beta, gamma)`` of the recorded reference cell.

        Raises:
            ReferenceDataMissing: no reference cell is recorded.
        """
        return self._cell(None).lattice_parameters

    def conventional(self, cell: ReferenceCell | None = None) -> Structure:
        """The conventional cell (112 atoms for the eta-carbides).

        Args:
            cell: build from this cell instead of :attr:`reference`; its sites must
                follow :attr:`wyckoff_sites`.

        Raises:
            ReferenceDataMissing: ``cell`` is None and no reference cell is recorded.
            ValueError: the cell does not follow this structure type, or a position
                lies on a special position of higher symmetry than its orbit.
        """
        cell = self._cell(cell)
        got = tuple((s.species, s.wyckoff) for s in cell.sites)
        if got != self.wyckoff_sites:
            raise ValueError(f"{self.name}: cell sites {got} differ from {self.wyckoff_sites}")
        lattice = Lattice.from_parameters(*cell.lattice_parameters)
        structure = Structure.from_spacegroup(
            cell.setting,
            lattice,
            [s.species for s in cell.sites],
            [list(s.coords) for s in cell.sites],
        )
        expected = sum(s.multiplicity for s in cell.sites)
        if len(structure) != expected:
            raise ValueError(
                f"{self.name}: {len(structure)} atoms from the Wyckoff positions, "
                f"expected {expected} (a coordinate on a special position?)"
            )
        return structure

    def structure(self, cell: ReferenceCell | None = None) -> Structure:
        """The cell the paper uses: primitive for the eta-carbides, else conventional.

        Args:
            cell: as in :meth:`conventional`.

        Raises:
            ReferenceDataMissing: ``cell`` is None and no reference cell is recorded.
        """
        conventional = self.conventional(cell)
        if not self.primitive_in_paper:
            return conventional
        with warnings.catch_warnings():
            # spglib 2.x asks every caller to opt in to its new error handling
            warnings.filterwarnings("ignore", "Set OLD_ERROR_HANDLING", DeprecationWarning)
            analyzer = SpacegroupAnalyzer(conventional, symprec=_SYMPREC)
            return analyzer.get_primitive_standard_structure()

    def _cell(self, cell: ReferenceCell | None) -> ReferenceCell:
        if cell is not None:
            return cell
        if self.reference is None:
            raise ReferenceDataMissing(
                f"{self.name}: no reference cell recorded. {self.missing_reference}"
            )
        return self.reference


# ---------------------------------------------------------------------------
# The four systems
# ---------------------------------------------------------------------------

_CSV3SB5 = CaseStudy(
    name="CsV3Sb5",
    paper_name="CsV3Sb5",
    formula="CsV3Sb5",
    spacegroup_symbol="P6/mmm",
    spacegroup_number=191,
    # Cs 1a (0,0,0); V 3g (1/2,0,1/2), the kagome net; Sb1 1b (0,0,1/2) in the kagome
    # plane; Sb2 4h (1/3,2/3,z), the honeycomb nets above and below it. 9 atoms.
    wyckoff_sites=(("Cs", "1a"), ("V", "3g"), ("Sb", "1b"), ("Sb", "4h")),
    primitive_in_paper=False,
    reference=None,
    missing_reference=(
        "Record a, c (Å) and z of Sb2 at 4h (1/3, 2/3, z), with the measurement temperature, "
        "from the structure refinement of Ortiz et al., Phys. Rev. Materials 3, 094407 (2019), "
        "in setting 'P6/mmm': Cs 1a (0,0,0), V 3g (1/2,0,1/2), Sb 1b (0,0,1/2), Sb 4h. "
        "No citable source of these numbers could be read when this module was written."
    ),
    measured_tc_k=2.30,
    tc_source=(
        "2.30 K is the paper's ground truth (spec section 8); SuperCon3D lists 2.3 K citing Ge "
        "et al. (2022). The original measurement, Ortiz et al. (2020), reports bulk Tc = 2.5 K."
    ),
    paper_rmse=0.0085,
    paper_tc_k=2.26,
    paper_tc_error_k=None,
    mp_ids_in_data=frozenset(),
    citations=(_DAO_PAPER, _ORTIZ_2019, _ORTIZ_2020, _GE_2022, _SUPERCON3D),
)

_CR3OS = CaseStudy(
    name="Cr3Os",
    paper_name="Cr6Os2",
    formula="Cr3Os",
    spacegroup_symbol="Pm-3n",
    spacegroup_number=223,
    # A15 (Cr3Si type): Cr 6c (1/4,0,1/2), chains along the cube axes; Os 2a (0,0,0). 8 atoms.
    wyckoff_sites=(("Cr", "6c"), ("Os", "2a")),
    primitive_in_paper=False,
    reference=ReferenceCell(
        a=4.64823,
        b=4.64823,
        c=4.64823,
        alpha=90.0,
        beta=90.0,
        gamma=90.0,
        setting="Pm-3n",
        sites=(
            WyckoffSite("Cr", "6c", (0.25, 0.0, 0.5)),
            WyckoffSite("Os", "2a", (0.0, 0.0, 0.0)),
        ),
        kind="computed",
        source=_MP416,
    ),
    missing_reference=(
        "An experimental lattice constant of A15 Cr3Os (with its source) was not found; "
        "the recorded cell is the computed mp-416 one."
    ),
    measured_tc_k=None,
    tc_source=(
        "No measured Tc of stoichiometric Cr3Os was found, and the paper (spec section 8) "
        "reports no Tc for Cr6Os2. For reference, 3DSC (../shared/data/3dsc_mp, "
        "derived_pool_labels.csv.gz) matches Cr0.72Os0.28 (Tc 3.906 K) and Cr0.8Os0.2 "
        "(Tc 2.5 K) to mp-416."
    ),
    paper_rmse=0.0012,
    paper_tc_k=None,
    paper_tc_error_k=None,
    # mp-416 is in mp_20_biternary_subset/test.csv.gz; 3dsc_mp also holds two doped
    # (synth_doped) CIFs built on it.
    mp_ids_in_data=frozenset({"mp-416"}),
    citations=(_DAO_PAPER, _AFLOW_A15, _MP, _MP416),
)


# eta-carbide (Fe3W3C / filled Ti2Ni type), Fd-3m in origin choice 2: Zr 48f
# (x,1/8,1/8), Zr 16d (1/2,1/2,1/2), Rh/Pd 32e (x,x,x), O 16c (0,0,0); 112 atoms in
# the conventional cell, 28 in the primitive one the paper uses (Zr16M8O4). This
# site assignment (metals 16d/32e/48f, light atom 16c) is the one Ma et al. describe
# and the one spglib gives for mp-22479.
def _eta_sites(metal: str) -> tuple[tuple[str, str], ...]:
    return (("Zr", "48f"), ("Zr", "16d"), (metal, "32e"), ("O", "16c"))


_ZR4RH2O = CaseStudy(
    name="Zr4Rh2O",
    paper_name="Zr16Rh8O4",
    formula="Zr4Rh2O",
    spacegroup_symbol="Fd-3m",
    spacegroup_number=227,
    wyckoff_sites=_eta_sites("Rh"),
    primitive_in_paper=True,
    reference=None,
    missing_reference=(
        "Record the cubic a (Å), x of Zr 48f and x of Rh 32e, with the measurement "
        "temperature, from Watanabe et al., Sci. Rep. 13, 22458 (2023) (Rh analogue) or "
        "Ma et al. (2019), in setting 'Fd-3m:2' (origin choice 2): Zr 48f (x,1/8,1/8), "
        "Zr 16d (1/2,1/2,1/2), Rh 32e (x,x,x), O 16c (0,0,0). No citable source of these "
        "numbers could be read, and no Materials Project entry of Zr4Rh2O is in our data."
    ),
    measured_tc_k=3.73,
    tc_source=(
        "3.73 K as listed by SuperCon3D (Table 8) citing Watanabe et al. (2023). Ma et al. "
        "(2019) give a resistive Tc of 4.7 K, apparently for Zr4Rh2O (x = 1); the two samples "
        "differ."
    ),
    paper_rmse=0.0212,
    paper_tc_k=None,
    paper_tc_error_k=0.26,
    mp_ids_in_data=frozenset(),
    citations=(_DAO_PAPER, _MA_2019, _WATANABE_2023, _SUPERCON3D),
)

# mp-22479 stores the primitive cell; its conventional a is sqrt(2) times the primitive a.
_ZR4PD2O_A = 8.89205162 * math.sqrt(2.0)  # 12.57526 Å, see _MP22479

_ZR4PD2O = CaseStudy(
    name="Zr4Pd2O",
    paper_name="Zr16Pd8O4",
    formula="Zr4Pd2O",
    spacegroup_symbol="Fd-3m",
    spacegroup_number=227,
    wyckoff_sites=_eta_sites("Pd"),
    primitive_in_paper=True,
    reference=ReferenceCell(
        a=_ZR4PD2O_A,
        b=_ZR4PD2O_A,
        c=_ZR4PD2O_A,
        alpha=90.0,
        beta=90.0,
        gamma=90.0,
        setting="Fd-3m:2",
        sites=(
            WyckoffSite("Zr", "48f", (0.306186, 0.125, 0.125)),
            WyckoffSite("Zr", "16d", (0.5, 0.5, 0.5)),
            WyckoffSite("Pd", "32e", (0.285046, 0.285046, 0.285046)),
            WyckoffSite("O", "16c", (0.0, 0.0, 0.0)),
        ),
        kind="computed",
        source=_MP22479,
    ),
    missing_reference=(
        "The experimental cell of Watanabe et al., Sci. Rep. 13, 22458 (2023) (synchrotron "
        "XRD) could not be read; the recorded cell is the computed mp-22479 one."
    ),
    measured_tc_k=2.73,
    tc_source="Watanabe et al., Sci. Rep. 13, 22458 (2023): Tc = 2.73 K.",
    paper_rmse=0.0172,
    paper_tc_k=None,
    paper_tc_error_k=0.04,
    mp_ids_in_data=frozenset({"mp-22479"}),  # in mpts_52/val.csv.gz
    citations=(_DAO_PAPER, _WATANABE_2023, _MA_2019, _SUPERCON3D, _MP, _MP22479),
)

CASE_STUDIES: dict[str, CaseStudy] = {c.name: c for c in (_CSV3SB5, _CR3OS, _ZR4RH2O, _ZR4PD2O)}
"""The four case studies keyed by short name: CsV3Sb5, Cr3Os, Zr4Rh2O, Zr4Pd2O."""


def get_case_study(name: str) -> CaseStudy:
    """Look a case study up by short name (``"Cr3Os"``) or the paper's name (``"Cr6Os2"``).

    Raises:
        ValueError: unknown name; the message lists the valid ones.
    """
    if name in CASE_STUDIES:
        return CASE_STUDIES[name]
    for case in CASE_STUDIES.values():
        if name == case.paper_name:
            return case
    valid = ", ".join(CASE_STUDIES)
    paper = ", ".join(c.paper_name for c in CASE_STUDIES.values() if c.paper_name != c.name)
    raise ValueError(f"unknown case study {name!r}; valid names: {valid} (or the paper's {paper})")


def case_study_exclude_ids() -> frozenset[str]:
    """Materials Project ids of case-study materials in our offline data (keep out of training)."""
    return frozenset().union(*(c.mp_ids_in_data for c in CASE_STUDIES.values()))
