"""Validity of predicted crystals, as the CSP evaluation protocol defines it (spec §6).

A crystal is valid when both checks pass:

* **composition** (:func:`smact_validity`): charge neutrality with the Pauling
  electronegativity test, all-metal alloys and single elements pass. This
  reproduces SMACT **2.2.1**, the version pinned by the CDVAE/DiffCSP evaluation
  environments behind the published numbers. Later releases flip results:
  2.5 changed Ir's oxidation states and Zr's electronegativity (0.33 -> 1.33),
  2.6+ reject a pair with a missing electronegativity instead of accepting it
  (Pm compounds), 3.x switched the default oxidation states to the ICSD-24 table
  (about 5 % of MP-20 compositions flip), and in 4.x ``neutral_ratios`` returns a
  list, which the original evaluation code cannot unpack. So the check is written
  here, on a frozen copy of the 2.2.1 data, and does not need smact installed.
* **structure** (:func:`structure_validity`): volume >= 0.1 Å^3 and no two
  distinct atoms closer than 0.5 Å under periodic boundary conditions. As in the
  reference evaluation, an atom's distance to its own periodic images is not
  counted (a 1-atom cell with a short lattice vector is structurally valid).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SMACT_REFERENCE_VERSION",
    "Validity",
    "composition_counts",
    "smact_validity",
    "structure_validity",
    "validity",
    "validity_many",
]

SMACT_REFERENCE_VERSION = "2.2.1"

# Per element: Pauling electronegativity ("-" where SMACT 2.2.1 has none) and the
# default oxidation states of SMACT 2.2.1 (its data/oxidation_states.txt and
# data/element_data.txt; SMACT is MIT-licensed, Davies et al., JOSS 2019). Kept
# verbatim, including 2.2.1's Zr electronegativity of 0.33, because the published
# numbers were computed with it.
_SMACT_2_2_1 = """
H 2.2 -1 +1|He -|Li 0.98 +1|Be 1.57 +1 +2|B 2.04 +1 +2 +3|C 2.55 -4 -3 -2 -1 +1 +2 +3 +4
N 3.04 -3 -2 -1 +1 +2 +3 +4 +5|O 3.44 -2 -1 +1 +2|F 3.98 -1|Ne -|Na 0.93 -1 +1|Mg 1.31 +1 +2
Al 1.61 +1 +2 +3|Si 1.9 -4 -3 -2 -1 +1 +2 +3 +4|P 2.19 -3 -2 -1 +1 +2 +3 +4 +5
S 2.58 -2 -1 +1 +2 +3 +4 +5 +6|Cl 3.16 -1 +1 +2 +3 +4 +5 +6 +7|Ar -|K 0.82 -1 +1|Ca 1.0 +1 +2
Sc 1.36 +1 +2 +3|Ti 1.54 -1 +1 +2 +3 +4|V 1.63 -1 +1 +2 +3 +4 +5|Cr 1.66 -2 -1 +1 +2 +3 +4 +5 +6
Mn 1.55 -3 -2 -1 +1 +2 +3 +4 +5 +6 +7|Fe 1.83 -2 -1 +1 +2 +3 +4 +5 +6|Co 1.88 -1 +1 +2 +3 +4 +5
Ni 1.91 -1 +1 +2 +3 +4|Cu 1.9 +1 +2 +3 +4|Zn 1.65 +1 +2|Ga 1.81 +1 +2 +3
Ge 2.01 -4 -3 -2 -1 +1 +2 +3 +4|As 2.18 -3 +1 +2 +3 +5|Se 2.55 -2 +1 +2 +4 +6
Br 2.96 -1 +1 +2 +3 +4 +5 +7|Kr 3.0 +2|Rb 0.82 -1 +1|Sr 0.95 +1 +2|Y 1.22 +1 +2 +3
Zr 0.33 +1 +2 +3 +4|Nb 1.6 -1 +1 +2 +3 +4 +5|Mo 2.16 -2 -1 +1 +2 +3 +4 +5 +6
Tc 2.1 -3 -1 +1 +2 +3 +4 +5 +6 +7|Ru 2.2 -2 +1 +2 +3 +4 +5 +6 +7 +8|Rh 2.28 -1 +1 +2 +3 +4 +5 +6
Pd 2.2 +1 +2 +4 +6|Ag 1.93 +1 +2 +3 +4|Cd 1.69 +1 +2|In 1.78 +1 +2 +3|Sn 1.96 -4 +2 +4
Sb 2.05 -3 +3 +5|Te 2.1 -2 +2 +4 +5 +6|I 2.66 -1 +1 +3 +4 +5 +7|Xe 2.6 +1 +2 +4 +6 +8
Cs 0.79 -1 +1|Ba 0.89 +2|La 1.1 +2 +3|Ce 1.12 +2 +3 +4|Pr 1.13 +2 +3 +4|Nd 1.14 +2 +3 +4
Pm - +2 +3|Sm 1.17 +2 +3|Eu 1.2 +2 +3|Gd 1.2 +1 +2 +3|Tb 1.2 +1 +2 +3 +4|Dy 1.22 +2 +3 +4
Ho 1.23 +2 +3|Er 1.24 +2 +3|Tm 1.25 +2 +3|Yb 1.1 +2 +3|Lu 1.0 +3|Hf 1.3 +2 +3 +4
Ta 1.5 -1 +2 +3 +4 +5|W 1.7 -2 -1 +1 +2 +3 +4 +5 +6|Re 1.9 -3 -1 +1 +2 +3 +4 +5 +6 +7
Os 2.2 -2 -1 +1 +2 +3 +4 +5 +6 +7 +8|Ir 2.2 -2 -1 +1 +2 +3 +4 +5 +6 +7 +8
Pt 2.2 -2 -1 +1 +2 +3 +4 +5 +6|Au 2.4 -1 +1 +2 +3 +5|Hg 1.9 +1 +2 +4|Tl 1.8 -1 +1 +3
Pb 1.8 -4 +2 +4|Bi 1.9 -3 +1 +3 +5 +7|Po 2.0 -2 +2 +4 +5 +6|At 2.2 -1 +1 +3 +5 +7|Rn - +2 +6
Fr 0.7 +1|Ra 0.9 +2|Ac 1.1 +2 +3|Th 1.3 +2 +3 +4|Pa 1.5 +2 +3 +4 +5|U 1.7 +2 +3 +4 +5 +6
Np 1.3 +3 +4 +5 +6 +7|Pu 1.3 +2 +3 +4 +5 +6 +7 +8|Am 1.3 +2 +3 +4 +5 +6 +7
Cm 1.3 +2 +3 +4 +6 +8|Bk 1.3 +2 +3 +4|Cf 1.3 +2 +3 +4|Es 1.3 +2 +3 +4|Fm 1.3 +2 +3
Md 1.3 +2 +3|No 1.3 +2 +3|Lr - +3
"""

# SMACT's list of metals (unchanged from 2.2.1 to 4.x); note that Pm is not in it.
_METALS = frozenset(
    """Li Be Na Mg Al K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge Rb Sr Y Zr Nb Mo Tc Ru Rh Pd
    Ag Cd In Sn Sb Cs Ba La Ce Pr Nd Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg
    Tl Pb Bi Po Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No""".split()
)


def _parse_table() -> tuple[tuple[str, ...], dict[str, float | None], dict[str, tuple[int, ...]]]:
    symbols: list[str] = []
    eneg: dict[str, float | None] = {}
    ox: dict[str, tuple[int, ...]] = {}
    for entry in _SMACT_2_2_1.replace("\n", "|").split("|"):
        fields = entry.split()
        if not fields:
            continue
        sym, en, *states = fields
        symbols.append(sym)
        eneg[sym] = None if en == "-" else float(en)
        ox[sym] = tuple(int(s) for s in states)
    return tuple(symbols), eneg, ox


_SYMBOLS, _ENEG, _OX_STATES = _parse_table()  # _SYMBOLS[Z - 1] for Z = 1..103
assert len(_SYMBOLS) == 103 and _SYMBOLS[-1] == "Lr"
_Z = {s: z for z, s in enumerate(_SYMBOLS, start=1)}
# The reference gives up (invalid) when the oxidation-state product exceeds this.
_MAX_OX_COMBINATIONS = 10**7


# ----------------------------------------------------------------------------- composition
def composition_counts(obj) -> dict[str, int]:
    """Integer element counts {symbol: n} of a crystal or composition.

    Accepts a pymatgen ``Structure``/``Composition``, a mapping {symbol or Z: count},
    or a sequence of atomic numbers / symbols (one per atom).
    """
    if hasattr(obj, "composition") and not isinstance(obj, Mapping):
        obj = obj.composition
    if hasattr(obj, "get_el_amt_dict"):  # pymatgen Composition
        items: Iterable = obj.get_el_amt_dict().items()
    elif isinstance(obj, Mapping):
        items = obj.items()
    else:
        items = ((x, 1) for x in obj)
    out: dict[str, int] = {}
    for el, amt in items:
        sym = _symbol(el)
        n = float(amt)
        if not n.is_integer() or n < 0:
            raise ValueError(f"element {sym} has a non-integer amount {amt}: disordered input")
        if n:
            out[sym] = out.get(sym, 0) + int(n)
    return out


def _symbol(el) -> str:
    if isinstance(el, str):
        return el
    if hasattr(el, "symbol"):
        return str(el.symbol)
    z = int(el)
    if 1 <= z <= len(_SYMBOLS):
        return _SYMBOLS[z - 1]
    from pymatgen.core import Element  # noqa: PLC0415

    return Element.from_Z(z).symbol


def _pauling_ok(ox: Sequence[int], eneg: Sequence[float | None]) -> bool:
    """SMACT 2.2.1's electronegativity test as the reference evaluation experienced it.

    Pairs are visited in order. A cation/anion pair with a missing electronegativity
    made 2.2.1 raise TypeError, which the reference caught and took as a pass; a
    same-sign pair with a missing value fails.
    """
    for (o1, e1), (o2, e2) in itertools.combinations(zip(ox, eneg, strict=True), 2):
        if o1 > 0 and o2 < 0:
            if e1 is None or e2 is None:
                return True
            if e1 >= e2:
                return False
        elif o1 < 0 and o2 > 0:
            if e1 is None or e2 is None:
                return True
            if e1 <= e2:
                return False
        elif e1 is None or e2 is None:
            return False
    return True


@functools.lru_cache(maxsize=65536)
def _smact_valid_key(symbols: tuple[str, ...], counts: tuple[int, ...]) -> bool:
    if len(symbols) == 1:
        return True
    if any(s not in _OX_STATES for s in symbols):
        return False  # beyond SMACT 2.2.1's table (Z > 103): no data, not valid
    if all(s in _METALS for s in symbols):
        return True
    states = [_OX_STATES[s] for s in symbols]
    if math.prod(len(s) for s in states) > _MAX_OX_COMBINATIONS:
        return False
    eneg = [_ENEG[s] for s in symbols]
    # Whether *some* oxidation-state combination passes does not depend on the order
    # of the search, so prune with charge bounds instead of enumerating the product.
    lo = [c * min(s, default=0) for s, c in zip(states, counts, strict=True)]
    hi = [c * max(s, default=0) for s, c in zip(states, counts, strict=True)]
    rest_lo = list(itertools.accumulate(reversed(lo)))[::-1] + [0]
    rest_hi = list(itertools.accumulate(reversed(hi)))[::-1] + [0]
    n = len(symbols)
    chosen: list[int] = []

    def search(k: int, charge: int) -> bool:
        if k == n:
            return charge == 0 and _pauling_ok(chosen, eneg)
        for o in states[k]:
            q = charge + o * counts[k]
            if rest_lo[k + 1] <= -q <= rest_hi[k + 1]:
                chosen.append(o)
                ok = search(k + 1, q)
                chosen.pop()
                if ok:
                    return True
        return False

    return search(0, 0)


def smact_validity(composition) -> bool:
    """SMACT composition validity (charge neutrality + Pauling test), as SMACT 2.2.1.

    Args:
        composition: anything :func:`composition_counts` accepts; counts are reduced
            by their gcd first, as the reference does.

    Returns:
        True for single elements, all-metal alloys, and compositions with a
        charge-neutral assignment of SMACT oxidation states whose cations are less
        electronegative than its anions.
    """
    counts = composition_counts(composition)
    if not counts:
        return False
    items = sorted(counts.items(), key=lambda kv: (_Z.get(kv[0], 1000), kv[0]))
    g = math.gcd(*(c for _, c in items))
    return _smact_valid_key(tuple(s for s, _ in items), tuple(c // g for _, c in items))


# ------------------------------------------------------------------------------- structure
def _arrays(structure) -> tuple[np.ndarray, np.ndarray]:
    """(lattice [3, 3] rows, cartesian positions [N, 3]) of a pymatgen Structure."""
    lat = np.asarray(structure.lattice.matrix, dtype=np.float64)
    frac = np.asarray(structure.frac_coords, dtype=np.float64).reshape(-1, 3)
    return lat, frac @ lat


def _structure_valid_many(
    structures: Sequence, cutoff: float, min_volume: float, chunk: int = 256
) -> list[bool]:
    out = [False] * len(structures)
    todo: list[tuple[int, np.ndarray, np.ndarray]] = []
    for k, s in enumerate(structures):
        if s is None or len(s) == 0:
            continue
        lat, pos = _arrays(s)
        if not (np.isfinite(lat).all() and np.isfinite(pos).all()):
            continue
        if abs(np.linalg.det(lat)) < min_volume:
            continue
        if len(s) == 1:
            out[k] = True  # self-images do not count
            continue
        todo.append((k, lat, pos))
    if not todo:
        return out

    import torch  # noqa: PLC0415

    from dao.ops import neighbor_list  # noqa: PLC0415

    def run(group: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        pos = torch.from_numpy(np.concatenate([p for _, _, p in group]))
        cell = torch.from_numpy(np.stack([c for _, c, _ in group]))
        num = torch.tensor([len(p) for _, _, p in group], dtype=torch.int64)
        nl = neighbor_list(pos, cell, cutoff, num_atoms=num, pbc=True)
        system = torch.repeat_interleave(torch.arange(len(group)), num)
        close = nl.i != nl.j  # pairs closer than cutoff (strict), self-images excluded
        bad = torch.zeros(len(group), dtype=torch.bool)
        bad[system[nl.i[close].long()]] = True
        for (k, _, _), b in zip(group, bad.tolist(), strict=True):
            out[k] = not b

    for start in range(0, len(todo), chunk):
        group = todo[start : start + chunk]
        try:
            run(group)
        except (ValueError, RuntimeError):
            # A pathological cell in the chunk: one by one, and a crystal whose
            # neighbour list cannot be built is not valid.
            for item in group:
                try:
                    run([item])
                except (ValueError, RuntimeError):
                    out[item[0]] = False
    return out


def structure_validity(structure, cutoff: float = 0.5, min_volume: float = 0.1) -> bool:
    """Volume >= ``min_volume`` Å^3 and all distinct-atom periodic distances >= ``cutoff`` Å."""
    return _structure_valid_many([structure], cutoff, min_volume)[0]


# --------------------------------------------------------------------------------- both
@dataclass(frozen=True)
class Validity:
    """Validity of one crystal: ``valid`` = composition and structure both valid."""

    comp_valid: bool
    struct_valid: bool

    @property
    def valid(self) -> bool:
        return self.comp_valid and self.struct_valid


def validity_many(
    structures: Sequence, cutoff: float = 0.5, min_volume: float = 0.1
) -> list[Validity]:
    """:class:`Validity` of many pymatgen structures (``None`` = missing: invalid).

    The distance check runs batched through :func:`dao.ops.neighbor_list`.
    """
    struct_ok = _structure_valid_many(structures, cutoff, min_volume)
    out = []
    for s, ok in zip(structures, struct_ok, strict=True):
        if s is None:
            out.append(Validity(False, False))
            continue
        try:
            comp_ok = smact_validity(s)
        except ValueError:  # disordered
            comp_ok = False
        out.append(Validity(comp_ok, ok))
    return out


def validity(structure, cutoff: float = 0.5, min_volume: float = 0.1) -> Validity:
    """:class:`Validity` of one pymatgen structure."""
    return validity_many([structure], cutoff, min_volume)[0]
