"""``CrystalBatch``: the one batched container of crystals used by every module.

Crystals of different sizes are stored one after another (no padding):

* ``atom_types``  [N] int64 atomic numbers
* ``frac_coords`` [N, 3] fractional coordinates (any real values; wrapped by the
  consumers that need [0, 1))
* ``lattice``     [B, 3, 3] lattice matrices, **rows are the lattice vectors**
  (cartesian x = f . L), the convention of pymatgen and ASE
* ``num_atoms``   [B] int64 atoms per crystal
* ``batch``       [N] int64 crystal index of every atom (derived)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["CrystalBatch", "canonical_batch", "predict_structures"]


def _as_long(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t.to(torch.int64)


@dataclass
class CrystalBatch:
    """A batch of B crystals with N atoms in total (see module docstring)."""

    atom_types: torch.Tensor
    frac_coords: torch.Tensor
    lattice: torch.Tensor
    num_atoms: torch.Tensor
    batch: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.atom_types = _as_long(self.atom_types, "atom_types")
        self.num_atoms = _as_long(self.num_atoms, "num_atoms")
        if not isinstance(self.frac_coords, torch.Tensor):
            self.frac_coords = torch.as_tensor(self.frac_coords, dtype=torch.float64)
        if not isinstance(self.lattice, torch.Tensor):
            self.lattice = torch.as_tensor(self.lattice, dtype=self.frac_coords.dtype)
        self.validate()
        self.batch = torch.repeat_interleave(
            torch.arange(len(self.num_atoms), device=self.num_atoms.device), self.num_atoms
        )

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ValueError if shapes, dtypes or values are inconsistent."""
        n = self.atom_types.shape[0] if self.atom_types.dim() == 1 else -1
        if self.atom_types.dim() != 1:
            raise ValueError(f"atom_types must be [N], got {tuple(self.atom_types.shape)}")
        if self.frac_coords.shape != (n, 3):
            raise ValueError(
                f"frac_coords must be [N, 3] = [{n}, 3], got {tuple(self.frac_coords.shape)}"
            )
        if not self.frac_coords.dtype.is_floating_point:
            raise ValueError(f"frac_coords must be floating point, got {self.frac_coords.dtype}")
        if self.lattice.dim() != 3 or self.lattice.shape[1:] != (3, 3):
            raise ValueError(f"lattice must be [B, 3, 3], got {tuple(self.lattice.shape)}")
        if self.lattice.dtype != self.frac_coords.dtype:
            raise ValueError(
                f"lattice dtype {self.lattice.dtype} differs from frac_coords dtype "
                f"{self.frac_coords.dtype}"
            )
        if self.num_atoms.shape != (self.lattice.shape[0],):
            raise ValueError(
                f"num_atoms must be [B] = [{self.lattice.shape[0]}], got "
                f"{tuple(self.num_atoms.shape)}"
            )
        if self.num_atoms.numel() and bool((self.num_atoms < 0).any()):
            raise ValueError("num_atoms must be non-negative")
        if int(self.num_atoms.sum()) != n:
            raise ValueError(f"num_atoms sums to {int(self.num_atoms.sum())}, but N = {n}")
        if n and (bool((self.atom_types < 1).any()) or bool((self.atom_types > 118).any())):
            raise ValueError("atom_types must be atomic numbers in 1..118")

    # ------------------------------------------------------------- properties
    def __len__(self) -> int:
        return int(self.num_atoms.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.atom_types.shape[0])

    @property
    def ptr(self) -> torch.Tensor:
        """[B + 1] offsets of each crystal's atoms."""
        ptr = torch.zeros(len(self) + 1, dtype=torch.int64, device=self.num_atoms.device)
        torch.cumsum(self.num_atoms, 0, out=ptr[1:])
        return ptr

    @property
    def cart_coords(self) -> torch.Tensor:
        """[N, 3] cartesian positions f . L of every atom."""
        return torch.einsum("ni,nij->nj", self.frac_coords, self.lattice[self.batch])

    @property
    def volumes(self) -> torch.Tensor:
        """[B] unit-cell volumes |det L|."""
        return torch.linalg.det(self.lattice).abs()

    def neighbor_list(self, cutoff: float, **kwargs):
        """Periodic neighbour list of every crystal (:func:`dao.ops.neighbor_list`)."""
        from dao.ops import neighbor_list  # noqa: PLC0415

        return neighbor_list(
            self.cart_coords, self.lattice, cutoff, num_atoms=self.num_atoms, **kwargs
        )

    def to(self, *args, **kwargs) -> CrystalBatch:
        """Move/convert like ``Tensor.to``; dtype changes apply to the float tensors only."""
        lat = self.lattice.to(*args, **kwargs)
        frac = self.frac_coords.to(*args, **kwargs)
        dev = lat.device
        same = lat is self.lattice and frac is self.frac_coords
        if same and self.num_atoms.device == dev and self.atom_types.device == dev:
            # nothing to convert: no copy, no second validation (whose value checks read
            # the device, which a training step captured in a CUDA graph cannot do)
            return self
        return CrystalBatch(self.atom_types.to(dev), frac, lat, self.num_atoms.to(dev))

    def __getitem__(self, idx: int) -> CrystalBatch:
        """The idx-th crystal as a batch of one."""
        if not -len(self) <= idx < len(self):
            raise IndexError(f"crystal {idx} out of range for a batch of {len(self)}")
        idx %= len(self)
        ptr = self.ptr.tolist()
        sl = slice(ptr[idx], ptr[idx + 1])
        return CrystalBatch(
            self.atom_types[sl],
            self.frac_coords[sl],
            self.lattice[idx : idx + 1],
            self.num_atoms[idx : idx + 1],
        )

    def select(self, indices: Sequence[int] | torch.Tensor) -> CrystalBatch:
        """A new batch holding the given crystals, in the given order."""
        return (
            CrystalBatch.concat([self[int(i)] for i in indices])
            if len(indices)
            else (CrystalBatch.empty(self.frac_coords.dtype))
        )

    # ------------------------------------------------------------ construction
    @classmethod
    def empty(cls, dtype: torch.dtype = torch.float64) -> CrystalBatch:
        return cls(
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, 3, dtype=dtype),
            torch.zeros(0, 3, 3, dtype=dtype),
            torch.zeros(0, dtype=torch.int64),
        )

    @classmethod
    def concat(cls, batches: Sequence[CrystalBatch]) -> CrystalBatch:
        """Concatenate batches (same dtype and device)."""
        if not batches:
            raise ValueError("concat needs at least one batch")
        return cls(
            torch.cat([b.atom_types for b in batches]),
            torch.cat([b.frac_coords for b in batches]),
            torch.cat([b.lattice for b in batches]),
            torch.cat([b.num_atoms for b in batches]),
        )

    @classmethod
    def _from_lists(cls, types, fracs, lats, nums, dtype: torch.dtype) -> CrystalBatch:
        """From per-crystal numpy arrays (atomic numbers, fractional coords, lattice)."""
        if not nums:
            return cls.empty(dtype)
        return cls(
            torch.from_numpy(np.concatenate(types)),
            torch.from_numpy(np.concatenate(fracs)).to(dtype),
            torch.from_numpy(np.stack(lats)).to(dtype),
            torch.tensor(nums, dtype=torch.int64),
        )

    @classmethod
    def from_structures(cls, structures, dtype: torch.dtype = torch.float64) -> CrystalBatch:
        """From pymatgen ``Structure`` objects (ordered: one element per site)."""
        types, fracs, lats, nums = [], [], [], []
        for k, s in enumerate(structures):
            if not s.is_ordered:
                raise ValueError(
                    f"structure {k} ({s.composition.reduced_formula}) is disordered: "
                    "CrystalBatch holds one element per site; order it first"
                )
            types.append(np.array([site.specie.Z for site in s], dtype=np.int64))
            fracs.append(np.asarray(s.frac_coords, dtype=np.float64).reshape(-1, 3))
            lats.append(np.asarray(s.lattice.matrix, dtype=np.float64))
            nums.append(len(s))
        return cls._from_lists(types, fracs, lats, nums, dtype)

    @classmethod
    def from_atoms(cls, atoms_list, dtype: torch.dtype = torch.float64) -> CrystalBatch:
        """From ASE ``Atoms`` objects (must have a non-singular cell)."""
        types, fracs, lats, nums = [], [], [], []
        for k, a in enumerate(atoms_list):
            cell = np.asarray(a.cell[:], dtype=np.float64)
            if abs(np.linalg.det(cell)) < 1e-12:
                raise ValueError(f"Atoms {k} ({a.get_chemical_formula()}) has a singular cell")
            types.append(np.asarray(a.numbers, dtype=np.int64))
            fracs.append(np.asarray(a.get_scaled_positions(wrap=False), dtype=np.float64))
            lats.append(cell)
            nums.append(len(a))
        return cls._from_lists(types, fracs, lats, nums, dtype)

    def _split_numpy(self):
        ptr = self.ptr.tolist()
        types = self.atom_types.cpu().numpy()
        frac = self.frac_coords.detach().cpu().to(torch.float64).numpy()
        lat = self.lattice.detach().cpu().to(torch.float64).numpy()
        for k in range(len(self)):
            yield types[ptr[k] : ptr[k + 1]], frac[ptr[k] : ptr[k + 1]], lat[k]

    def to_structures(self):
        """List of pymatgen ``Structure`` (fractional coordinates kept as stored)."""
        from pymatgen.core import Lattice, Structure  # noqa: PLC0415

        return [
            Structure(Lattice(lat), [int(z) for z in t], f, coords_are_cartesian=False)
            for t, f, lat in self._split_numpy()
        ]

    def to_atoms(self):
        """List of periodic ASE ``Atoms``."""
        from ase import Atoms  # noqa: PLC0415

        return [
            Atoms(numbers=t, scaled_positions=f, cell=lat, pbc=True)
            for t, f, lat in self._split_numpy()
        ]


def canonical_batch(
    structures, max_atoms: int | None = None, dtype: torch.dtype = torch.float64
) -> tuple[CrystalBatch | None, list[int], list[tuple[int, str]]]:
    """Niggli-reduced, canonically oriented structures (as the training data) as one batch.

    Args:
        structures: pymatgen ``Structure`` objects.
        max_atoms: structures with more atoms are left out.

    Returns:
        (batch of the usable structures or None if there are none, their indices in
        ``structures``, [(index, reason)] of the left-out ones).
    """
    from dao.data.csv import canonicalize  # noqa: PLC0415

    types, fracs, lats, nums, kept, failures = [], [], [], [], [], []
    for k, s in enumerate(structures):
        if max_atoms is not None and len(s) > max_atoms:
            failures.append((k, f"{len(s)} atoms, more than this model's {max_atoms}"))
            continue
        try:
            z, f, lat = canonicalize(s)
        except ValueError as exc:
            failures.append((k, str(exc)))
            continue
        types.append(z)
        fracs.append(f)
        lats.append(lat)
        nums.append(len(z))
        kept.append(k)
    if not kept:
        return None, kept, failures
    return CrystalBatch._from_lists(types, fracs, lats, nums, dtype), kept, failures


def predict_structures(fn, structures, max_atoms: int | None = None, device=None) -> list[float]:
    """``fn(batch)`` -> [B] values for structures, through :func:`canonical_batch`; one
    float per structure, NaN for those it leaves out (too large, not canonicalisable)."""
    out = [math.nan] * len(structures)
    batch, kept, _ = canonical_batch(list(structures), max_atoms)
    if batch is None:
        return out
    if device is not None:
        batch = batch.to(device)
    with torch.no_grad():
        values = fn(batch).tolist()
    for k, v in zip(kept, values, strict=True):
        out[k] = float(v)
    return out
