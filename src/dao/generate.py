"""Generate crystal structures for a composition with DAO-G (the main job).

``generate("CsV3Sb5", num_samples=5)`` returns structures ranked best first;
``dao generate`` wraps it and writes CIFs, a summary table and, on request,
PNG pictures.

Formula units: with ``formula_units=Z`` every sample has Z formula units. With
``"auto"`` (default) every Z whose cell fits the model (Z * atoms per formula
unit <= ``max_atoms``, at most ``max_z_candidates`` values, smallest first) is
sampled ``num_samples`` times, and the ``num_samples`` best samples overall are
kept. "Best" is, in order: structurally valid (minimum interatomic distance >=
0.5 Å and volume >= 0.1 Å^3, the CSP evaluation's rule), then the smallest
denoising residual — the mean squared score the model still predicts at the
lowest noise level (t = 1). A converged sample sits where the model predicts
almost no further move, so the residual is a model-internal measure of how well
the sample fits what the model learned; it is not an energy. With DAO-P
(``rank_by_energy``) the predicted energy above hull replaces it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["GeneratedStructure", "parse_formula", "generate", "write_outputs"]

MIN_DISTANCE = 0.5  # Å, CSP validity rule (spec §6)
MIN_VOLUME = 0.1  # Å^3


@dataclass
class GeneratedStructure:
    """One generated crystal and what was measured on it."""

    structure: Any  # pymatgen Structure
    formula: str
    formula_units: int
    sample: int
    valid: bool
    min_distance: float
    residual: float
    spacegroup: str = ""
    spacegroup_number: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_ase(self):
        """The structure as ASE ``Atoms``."""
        from pymatgen.io.ase import AseAtomsAdaptor  # noqa: PLC0415

        return AseAtomsAdaptor.get_atoms(self.structure)

    def summary(self) -> dict[str, Any]:
        lat = self.structure.lattice
        return {
            "formula": self.structure.composition.formula.replace(" ", ""),
            "reduced_formula": self.formula,
            "Z": self.formula_units,
            "sample": self.sample,
            "spacegroup": self.spacegroup,
            "number": self.spacegroup_number,
            "a": round(lat.a, 4),
            "b": round(lat.b, 4),
            "c": round(lat.c, 4),
            "alpha": round(lat.alpha, 2),
            "beta": round(lat.beta, 2),
            "gamma": round(lat.gamma, 2),
            "volume": round(lat.volume, 3),
            "valid": self.valid,
            "min_distance": round(self.min_distance, 4),
            "residual": float(f"{self.residual:.4g}"),
            **({"energy": round(self.extra["energy"], 5)} if "energy" in self.extra else {}),
        }


def parse_formula(formula: str) -> dict[int, int]:
    """Reduced composition {atomic number: count} of a formula, with clear errors.

    Raises:
        ValueError: malformed formula, unknown element, fractional amounts.
    """
    from pymatgen.core import Composition, Element  # noqa: PLC0415

    if not isinstance(formula, str) or not formula.strip():
        raise ValueError("give a chemical formula such as 'CsV3Sb5' or 'SrTiO3'")
    text = formula.strip()
    for tok in __import__("re").findall(r"[A-Z][a-z]*", text):
        if not Element.is_valid_symbol(tok):
            raise ValueError(f"unknown element {tok!r} in formula {formula!r}")
    try:
        comp = Composition(text)
    except Exception as exc:  # pymatgen raises several types for bad strings
        raise ValueError(f"malformed formula {formula!r}: {exc}") from None
    if len(comp) == 0:
        raise ValueError(f"formula {formula!r} has no elements")
    reduced, _ = comp.get_reduced_composition_and_factor()
    counts = {}
    for el, amt in reduced.items():
        if abs(amt - round(amt)) > 1e-6:
            raise ValueError(f"formula {formula!r} has a fractional amount of {el}: {amt}")
        if el.Z > 100:
            raise ValueError(f"element {el} (Z = {el.Z}) is beyond the model's table (Z <= 100)")
        counts[el.Z] = int(round(amt))
    return counts


def _min_distances(frac: torch.Tensor, lattice: torch.Tensor, num_atoms: torch.Tensor):
    """[B] smallest periodic interatomic distance of each crystal (inf for 1 atom far apart)."""
    from dao.ops import neighbor_list  # noqa: PLC0415

    lat = lattice.double()
    pos = torch.einsum("ni,nij->nj", frac.double(), lat.repeat_interleave(num_atoms, 0))
    out = torch.full((len(num_atoms),), math.inf, dtype=torch.float64)
    vol = torch.linalg.det(lat).abs()
    ok = vol >= MIN_VOLUME  # a collapsed cell is invalid anyway; skip its pair search
    if not bool(ok.any()):
        return out, vol
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), num_atoms.cumsum(0)])
    idx = torch.cat([torch.arange(ptr[b], ptr[b + 1]) for b in range(len(num_atoms)) if ok[b]])
    nl = neighbor_list(pos[idx], lat[ok], MIN_DISTANCE * 4, num_atoms=num_atoms[ok])
    if len(nl.i):
        batch = torch.repeat_interleave(torch.arange(int(ok.sum())), num_atoms[ok])
        mins = torch.full((int(ok.sum()),), math.inf, dtype=torch.float64)
        mins.scatter_reduce_(0, batch[nl.i.long()], nl.distances, "amin")
        out[ok] = mins
    return out, vol


def _spacegroup(structure) -> tuple[str, int]:
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer  # noqa: PLC0415

    try:
        sga = SpacegroupAnalyzer(structure, symprec=0.1)
        return sga.get_space_group_symbol(), int(sga.get_space_group_number())
    except Exception:  # spglib fails on degenerate cells: report no symmetry
        return "", 0


def generate(
    formula: str,
    num_samples: int = 5,
    *,
    formula_units: int | str = "auto",
    seed: int = 0,
    weights: str | os.PathLike | None = None,
    step_lr: float | None = None,
    device: str = "cpu",
    max_atoms: int | None = None,
    max_z_candidates: int = 4,
    progress: bool = True,
    daop: Any = None,
    guidance_scale: float = 0.0,
    rank_by_energy: bool = False,
) -> list[GeneratedStructure]:
    """Generate ``num_samples`` structures of ``formula``, best first (see module doc).

    DAO-P (``daop``: a :class:`dao.daop.DAOP`, a weights path, or True for the shipped
    model) adds the predicted energy above hull of every sample (``extra["energy"]``,
    eV/atom), energy guidance during sampling when ``guidance_scale`` w != 0 (the paper
    uses w = 20) and, with ``rank_by_energy``, ranking by that energy instead of the
    residual (valid structures first either way).
    """
    from pymatgen.core import Lattice, Structure  # noqa: PLC0415

    from dao.pretrained import load_daog  # noqa: PLC0415

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    counts = parse_formula(formula)
    per_fu = sum(counts.values())
    if (guidance_scale != 0.0 or rank_by_energy) and daop is None:
        raise ValueError("energy guidance and ranking by energy need DAO-P: pass daop=")
    diffusion, cfg = load_daog(weights, device)
    daop = _load_daop(daop, device)
    limit = int(max_atoms or cfg.get("data", {}).get("max_atoms", 20))
    if formula_units == "auto":
        zs = [z for z in range(1, limit // per_fu + 1)][:max_z_candidates]
        if not zs:
            raise ValueError(
                f"{formula} has {per_fu} atoms per formula unit, more than the model's limit of "
                f"{limit} atoms per cell (the size of its training crystals)"
            )
    else:
        z = int(formula_units)
        if z < 1:
            raise ValueError(f"formula_units must be >= 1 or 'auto', got {formula_units}")
        if z * per_fu > limit:
            raise ValueError(
                f"{z} formula units of {formula} are {z * per_fu} atoms, more than the model's "
                f"limit of {limit}; pass max_atoms to override at your own risk"
            )
        zs = [z]

    # One batched sampling run over every (Z, sample).
    types, nums, zlist = [], [], []
    for z in zs:
        unit = [zn for zn, c in sorted(counts.items()) for _ in range(c)]
        for _ in range(num_samples):
            types.extend(unit * z)
            nums.append(per_fu * z)
            zlist.append(z)
    atom_types = torch.tensor(types, dtype=torch.int64, device=device)
    num_atoms = torch.tensor(nums, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    kwargs = {} if step_lr is None else {"step_lr": step_lr}
    if guidance_scale != 0.0:
        kwargs["energy_guidance"] = daop.guidance(atom_types)
        kwargs["guidance_scale"] = float(guidance_scale)
    with torch.no_grad():
        out = diffusion.sample(
            atom_types, num_atoms, generator=gen, progress=progress, cuda_graph="auto", **kwargs
        )
        residual = _residual(diffusion, out)
    frac, lat = out.frac_coords.cpu(), out.lattice.cpu()
    dmin, vol = _min_distances(frac, lat, num_atoms.cpu())

    results = []
    ptr = [0, *torch.cumsum(num_atoms.cpu(), 0).tolist()]
    reduced = _reduced_formula(counts)
    for b in range(len(nums)):
        f = frac[ptr[b] : ptr[b + 1]].double().numpy() % 1.0
        s = Structure(Lattice(lat[b].double().numpy()), types[ptr[b] : ptr[b + 1]], f)
        valid = bool(vol[b] >= MIN_VOLUME and dmin[b] >= MIN_DISTANCE)
        results.append(
            GeneratedStructure(
                s, reduced, zlist[b], b % num_samples, valid, float(dmin[b]), float(residual[b])
            )
        )
    if daop is not None:
        energies = _energies(daop, [r.structure for r in results])
        for r, e in zip(results, energies, strict=True):
            r.extra["energy"] = e
    if rank_by_energy:
        results.sort(key=lambda r: (not r.valid, _nan_last(r.extra["energy"])))
    else:
        results.sort(key=lambda r: (not r.valid, r.residual))
    results = results[:num_samples]
    for r in results:
        r.spacegroup, r.spacegroup_number = _spacegroup(r.structure)
    return results


def _load_daop(daop, device):
    if daop is None or daop is False:
        return None
    if daop is True:
        daop = None  # the shipped weights
    if isinstance(daop, (str, os.PathLike)) or daop is None:
        from dao.pretrained import load_daop  # noqa: PLC0415

        return load_daop(daop, device)[0]
    return daop


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _energies(daop, structures) -> list[float]:
    """DAO-P energy above hull (eV/atom) of each structure, canonicalised like its
    training data; NaN for a structure that cannot be canonicalised."""
    from dao.data.crystal import predict_structures  # noqa: PLC0415

    return predict_structures(daop.energy, structures)


def _residual(diffusion, out) -> torch.Tensor:
    """[B] mean squared model output at t = 1 (coordinates per atom + lattice per entry)."""
    model = diffusion.model
    batch = torch.repeat_interleave(
        torch.arange(len(out.num_atoms), device=out.num_atoms.device), out.num_atoms
    )
    t = torch.ones(len(out.num_atoms), dtype=torch.int64, device=out.num_atoms.device)
    pred = model(out.atom_types, out.frac_coords, out.lattice, t, batch)
    coord = torch.zeros(len(out.num_atoms), device=batch.device, dtype=pred.coord.dtype)
    coord.index_add_(0, batch, pred.coord.pow(2).sum(-1))
    coord = coord / (3 * out.num_atoms)
    lat = pred.lattice.pow(2).mean(dim=(1, 2))
    return (coord + lat).double().cpu()


def _reduced_formula(counts: dict[int, int]) -> str:
    from pymatgen.core import Composition, Element  # noqa: PLC0415

    return Composition({Element.from_Z(z): c for z, c in counts.items()}).reduced_formula


def write_outputs(
    results: list[GeneratedStructure], out_dir: str | os.PathLike, pictures: bool = False
) -> Path:
    """CIF per structure, ``summary.csv``; PNG pictures on request. Returns the CSV path."""
    import csv  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rank, r in enumerate(results, 1):
        stem = f"{r.formula}_rank{rank:02d}"
        r.structure.to(filename=str(out / f"{stem}.cif"))
        row = {"rank": rank, "file": f"{stem}.cif", **r.summary()}
        if pictures:
            _picture(r, out / f"{stem}.png")
            row["picture"] = f"{stem}.png"
        rows.append(row)
    path = out / "summary.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _picture(r: GeneratedStructure, path: Path) -> None:
    """Two projections of the cell (atoms in Jmol colours, cell edges as lines)."""
    import itertools  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from ase.data import covalent_radii  # noqa: PLC0415
    from ase.data.colors import jmol_colors  # noqa: PLC0415

    s = r.structure
    lat = s.lattice.matrix
    xyz = s.cart_coords
    z = np.array([site.specie.Z for site in s])
    corners = np.array(list(itertools.product((0, 1), repeat=3))) @ lat
    edges = [(a, b) for a in range(8) for b in range(a + 1, 8) if bin(a ^ b).count("1") == 1]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (u, v), name in zip(axes, ((0, 1), (0, 2)), ("x-y", "x-z"), strict=True):
        for a, b in edges:
            ax.plot(corners[[a, b], u], corners[[a, b], v], color="0.6", lw=0.8, zorder=0)
        order = np.argsort(xyz[:, 3 - u - v])  # far atoms first
        size = (covalent_radii[z[order]] * 120.0 / max(1.0, s.lattice.abc[0] / 5.0)) ** 2 / 40
        ax.scatter(
            xyz[order, u],
            xyz[order, v],
            s=size,
            c=jmol_colors[z[order]],
            edgecolors="k",
            linewidths=0.5,
            zorder=1,
        )
        ax.set_aspect("equal")
        ax.set_title(f"{name} projection", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{r.formula} (Z={r.formula_units}), {r.spacegroup or 'no symmetry found'}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
