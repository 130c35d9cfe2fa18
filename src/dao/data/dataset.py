"""``CrystalDataset``: processed crystals for training and evaluation, and the training pool.

A dataset holds B crystals as flat arrays (the layout of :class:`CrystalBatch`,
in numpy): indexing gives a light :class:`CrystalRecord`, and :func:`collate`
turns a list of records into a :class:`LabelledBatch` ``(crystals, props,
material_ids)``::

    ds = CrystalDataset.from_csv("mp_20_pilot/test.csv.gz").filter_max_atoms(20)
    loader = DataLoader(ds, batch_sampler=RandomBatchSampler(len(ds), 256), collate_fn=collate)
    for crystals, props, ids in loader:
        ...  # crystals: CrystalBatch; props["e_above_hull"]: [B] tensor (NaN = missing)

:func:`training_pool` builds the training set from the offline data
(``../shared/data``, see its README): several files deduplicated by
``material_id``, with every id of the held-out ``mp_20_pilot/test`` excluded.
Data: Materials Project (CC BY 4.0, Jain et al. 2013), Perov-5 (Castelli et al.
2012), Carbon-24 (Pickard 2020), via the CDVAE, DiffCSP and WyckoffTransformer
repositories.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from dao.data.crystal import CrystalBatch
from dao.data.csv import ProcessedCSV, load_csv, read_material_ids

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_POOL",
    "CrystalDataset",
    "CrystalRecord",
    "LabelledBatch",
    "RandomBatchSampler",
    "collate",
    "training_pool",
    "training_pool_ids",
]

#: The default training pool (paths relative to the data root), per the data README:
#: everything offline except the held-out test file and the 3DSC/CSPBench sets.
DEFAULT_POOL: tuple[str, ...] = (
    "mp_20_pilot/train.csv.gz",
    "mp_20_pilot/val.csv.gz",
    "mp_20_biternary_subset/val.csv.gz",
    "mp_20_biternary_subset/test.csv.gz",
    "mpts_52/val.csv.gz",
    "perov_5/val.csv.gz",
    "perov_5/test.csv.gz",
    "carbon_24/val.csv.gz",
    "carbon_24/test.csv.gz",
)

#: Held-out files whose ``material_id``s never enter training.
DEFAULT_EXCLUDE: tuple[str, ...] = ("mp_20_pilot/test.csv.gz",)


@dataclass(frozen=True)
class CrystalRecord:
    """One crystal of a :class:`CrystalDataset` (read-only numpy views, n atoms).

    Attributes:
        index: position in the dataset.
        material_id: identifier from the source file.
        atom_types: [n] int64 atomic numbers.
        frac_coords: [n, 3] float64 fractional coordinates in [0, 1).
        lattice: [3, 3] float64 lattice, rows are the lattice vectors.
        props: ``{name: value}`` numeric properties (NaN = missing).
        source: the file (pool entry) it came from.
    """

    index: int
    material_id: str
    atom_types: np.ndarray
    frac_coords: np.ndarray
    lattice: np.ndarray
    props: dict[str, float]
    source: str

    @property
    def num_atoms(self) -> int:
        return int(self.atom_types.shape[0])


class LabelledBatch(NamedTuple):
    """What :func:`collate` returns: unpack as ``crystals, props, material_ids``.

    Attributes:
        crystals: the structures as one :class:`CrystalBatch` of B crystals.
        props: ``{name: [B] tensor}`` of every property (NaN where a crystal lacks it).
        material_ids: B identifiers, in batch order.
    """

    crystals: CrystalBatch
    props: dict[str, torch.Tensor]
    material_ids: list[str]

    def to(self, *args, **kwargs) -> LabelledBatch:
        """Move/convert like ``Tensor.to`` (dtype changes apply to float tensors)."""
        return LabelledBatch(
            self.crystals.to(*args, **kwargs),
            {k: v.to(*args, **kwargs) for k, v in self.props.items()},
            self.material_ids,
        )


def collate(records: Sequence[CrystalRecord], dtype: torch.dtype = torch.float64) -> LabelledBatch:
    """Stack records into a :class:`LabelledBatch` (a ``collate_fn`` for ``DataLoader``).

    Args:
        records: crystals from :meth:`CrystalDataset.__getitem__`.
        dtype: floating dtype of coordinates, lattices and properties
            (``functools.partial(collate, dtype=torch.float32)`` for float32 training).

    Returns:
        ``LabelledBatch(crystals, props, material_ids)``; the property names are the
        union over the records, NaN where a record lacks one.
    """
    if not records:
        return LabelledBatch(CrystalBatch.empty(dtype), {}, [])
    names = sorted({k for r in records for k in r.props})
    crystals = CrystalBatch(
        torch.from_numpy(np.concatenate([r.atom_types for r in records]).astype(np.int64)),
        torch.from_numpy(np.concatenate([r.frac_coords for r in records])).to(dtype),
        torch.from_numpy(np.stack([r.lattice for r in records])).to(dtype),
        torch.tensor([r.num_atoms for r in records], dtype=torch.int64),
    )
    props = {
        n: torch.tensor([r.props.get(n, math.nan) for r in records], dtype=dtype) for n in names
    }
    return LabelledBatch(crystals, props, [r.material_id for r in records])


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


class CrystalDataset(Dataset):
    """B processed crystals with N atoms in total, stored flat (no padding).

    Args:
        atom_types: [N] atomic numbers.
        frac_coords: [N, 3] fractional coordinates.
        lattice: [B, 3, 3] lattices (rows are lattice vectors).
        num_atoms: [B] atoms per crystal.
        material_ids: [B] identifiers.
        props: ``{name: [B]}`` numeric properties, NaN for missing.
        sources: [B] where each crystal came from (default: empty strings).

    The arrays are read-only; filters return new datasets.
    """

    def __init__(
        self,
        atom_types: np.ndarray,
        frac_coords: np.ndarray,
        lattice: np.ndarray,
        num_atoms: np.ndarray,
        material_ids: Sequence[str] | np.ndarray,
        props: dict[str, np.ndarray] | None = None,
        sources: Sequence[str] | np.ndarray | None = None,
    ) -> None:
        self.atom_types = _readonly(np.asarray(atom_types, dtype=np.int64).reshape(-1))
        self.frac_coords = _readonly(np.asarray(frac_coords, dtype=np.float64).reshape(-1, 3))
        self.lattice = _readonly(np.asarray(lattice, dtype=np.float64).reshape(-1, 3, 3))
        self.num_atoms = _readonly(np.asarray(num_atoms, dtype=np.int64).reshape(-1))
        b = self.num_atoms.shape[0]
        self.material_ids = _readonly(np.asarray(material_ids, dtype=np.str_).reshape(-1))
        self.sources = _readonly(
            np.full(b, "", dtype=np.str_)
            if sources is None
            else np.asarray(sources, dtype=np.str_).reshape(-1)
        )
        self.props = {
            k: _readonly(np.asarray(v, dtype=np.float64).reshape(-1))
            for k, v in (props or {}).items()
        }
        ptr = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(self.num_atoms, out=ptr[1:])
        self.ptr = _readonly(ptr)
        self._check()

    def _check(self) -> None:
        b, n = self.num_atoms.shape[0], self.atom_types.shape[0]
        if self.lattice.shape[0] != b:
            raise ValueError(f"lattice has {self.lattice.shape[0]} crystals, num_atoms {b}")
        if self.frac_coords.shape[0] != n:
            raise ValueError(f"frac_coords has {self.frac_coords.shape[0]} rows, atom_types {n}")
        if int(self.ptr[-1]) != n:
            raise ValueError(f"num_atoms sums to {int(self.ptr[-1])}, but there are {n} atoms")
        for name, arr in (("material_ids", self.material_ids), ("sources", self.sources)):
            if arr.shape[0] != b:
                raise ValueError(f"{name} has {arr.shape[0]} entries for {b} crystals")
        for k, v in self.props.items():
            if v.shape[0] != b:
                raise ValueError(f"property {k!r} has {v.shape[0]} values for {b} crystals")

    # ---------------------------------------------------------- construction
    @classmethod
    def from_processed(cls, data: ProcessedCSV, source: str | None = None) -> CrystalDataset:
        """From a :class:`~dao.data.csv.ProcessedCSV` (``source`` labels every crystal)."""
        label = source if source is not None else data.source
        return cls(
            data.atom_types,
            data.frac_coords,
            data.lattice,
            data.num_atoms,
            data.material_ids,
            data.props,
            np.array([label] * len(data), dtype=np.str_),
        )

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        workers: int = 2,
        progress: bool = True,
    ) -> CrystalDataset:
        """Read (or reload from the cache) a CDVAE/DiffCSP-format CSV; see :func:`load_csv`."""
        data = load_csv(path, cache_dir=cache_dir, workers=workers, progress=progress)
        return cls.from_processed(data, source=str(path))

    @classmethod
    def concat(cls, datasets: Sequence[CrystalDataset]) -> CrystalDataset:
        """Concatenate datasets; properties are the union (NaN where absent)."""
        if not datasets:
            return cls(np.zeros(0), np.zeros((0, 3)), np.zeros((0, 3, 3)), np.zeros(0), [])
        names = sorted({k for d in datasets for k in d.props})
        props = {
            k: np.concatenate([d.props.get(k, np.full(len(d), np.nan)) for d in datasets])
            for k in names
        }
        return cls(
            np.concatenate([d.atom_types for d in datasets]),
            np.concatenate([d.frac_coords for d in datasets]),
            np.concatenate([d.lattice for d in datasets]),
            np.concatenate([d.num_atoms for d in datasets]),
            np.concatenate([d.material_ids for d in datasets]),
            props,
            np.concatenate([d.sources for d in datasets]),
        )

    # ---------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.num_atoms.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.atom_types.shape[0])

    @property
    def property_names(self) -> list[str]:
        return sorted(self.props)

    def __getitem__(self, k: int) -> CrystalRecord:
        k = int(k)
        if not -len(self) <= k < len(self):
            raise IndexError(f"crystal {k} out of range for a dataset of {len(self)}")
        k %= len(self)
        sl = slice(int(self.ptr[k]), int(self.ptr[k + 1]))
        return CrystalRecord(
            index=k,
            material_id=str(self.material_ids[k]),
            atom_types=self.atom_types[sl],
            frac_coords=self.frac_coords[sl],
            lattice=self.lattice[k],
            props={n: float(v[k]) for n, v in self.props.items()},
            source=str(self.sources[k]),
        )

    def batch(
        self, indices: Sequence[int] | np.ndarray | None = None, dtype: torch.dtype = torch.float64
    ) -> LabelledBatch:
        """The crystals at ``indices`` (default: all) as one :class:`LabelledBatch`.

        Same result as ``collate([self[i] for i in indices], dtype)``, without the records.
        """
        sub = self if indices is None else self.subset(indices)
        crystals = CrystalBatch(
            torch.from_numpy(sub.atom_types.copy()),
            torch.from_numpy(sub.frac_coords.copy()).to(dtype),
            torch.from_numpy(sub.lattice.copy()).to(dtype),
            torch.from_numpy(sub.num_atoms.copy()),
        )
        props = {k: torch.from_numpy(v.copy()).to(dtype) for k, v in sorted(sub.props.items())}
        return LabelledBatch(crystals, props, [str(m) for m in sub.material_ids])

    # --------------------------------------------------------------- filters
    def subset(self, indices: Sequence[int] | np.ndarray) -> CrystalDataset:
        """A new dataset with the given crystals, in the given order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for a dataset of {len(self)}")
        idx = idx % max(len(self), 1)
        counts = self.num_atoms[idx]
        starts = self.ptr[:-1][idx]
        # atom rows: for crystal j, starts[j] + 0..counts[j]-1, all at once
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        atom_idx = np.repeat(starts, counts) + offsets
        return CrystalDataset(
            self.atom_types[atom_idx],
            self.frac_coords[atom_idx],
            self.lattice[idx],
            counts,
            self.material_ids[idx],
            {k: v[idx] for k, v in self.props.items()},
            self.sources[idx],
        )

    def filter(self, mask: np.ndarray | Sequence[bool]) -> CrystalDataset:
        """Keep the crystals where ``mask`` [B] is true."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(self),):
            raise ValueError(f"mask must be [{len(self)}], got {mask.shape}")
        return self.subset(np.flatnonzero(mask))

    def filter_max_atoms(self, max_atoms: int) -> CrystalDataset:
        """Keep crystals with at most ``max_atoms`` atoms (20 for MP-20-like training)."""
        return self.filter(self.num_atoms <= max_atoms)

    def exclude_ids(self, ids: Iterable[str]) -> CrystalDataset:
        """Drop every crystal whose ``material_id`` is in ``ids``."""
        drop = {str(i).strip() for i in ids}
        return self.filter(np.array([m not in drop for m in self.material_ids], dtype=bool))

    def deduplicate(self) -> CrystalDataset:
        """Keep the first crystal of every ``material_id``."""
        _, first = np.unique(self.material_ids, return_index=True)
        return self.subset(np.sort(first))

    def __repr__(self) -> str:
        return (
            f"CrystalDataset({len(self)} crystals, {self.num_nodes} atoms, "
            f"properties={self.property_names})"
        )


class RandomBatchSampler:
    """Random batches of indices, a ``batch_sampler`` for ``DataLoader``.

    Every epoch is a fresh permutation drawn from ``(seed, epoch)``, so runs are
    reproducible and resumable; call :meth:`set_epoch` before each epoch.

    Args:
        num_items: dataset size.
        batch_size: crystals per batch.
        shuffle: permute (False: batches in order).
        drop_last: drop the final short batch.
        seed: base seed.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_items < 0:
            raise ValueError(f"num_items must be non-negative, got {num_items}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        for k in range(len(self)):
            yield order[k * self.batch_size : (k + 1) * self.batch_size].tolist()


# ------------------------------------------------------------------ the pool
def _resolve(data_root: Path, name: str | os.PathLike) -> Path:
    p = Path(name).expanduser()
    p = p if p.is_absolute() else data_root / p
    if not p.is_file():
        raise FileNotFoundError(f"pool file {p} not found (data root {data_root})")
    return p


def _excluded_ids(data_root: Path, exclude_files, exclude_ids) -> set[str]:
    files = DEFAULT_EXCLUDE if exclude_files is None else exclude_files
    ids = {str(i).strip() for i in exclude_ids}
    for f in files:
        ids.update(read_material_ids(_resolve(data_root, f)))
    return ids


def training_pool_ids(
    data_root: str | os.PathLike,
    exclude_files: Sequence[str | os.PathLike] | None = None,
    include: Sequence[str | os.PathLike] | None = None,
    *,
    exclude_ids: Iterable[str] = (),
) -> list[str]:
    """The ``material_id``s :func:`training_pool` draws from, without parsing any CIF.

    Same selection rule: ids of the ``include`` files in order, first occurrence
    kept, every id of the ``exclude_files`` (and ``exclude_ids``) removed. The pool
    itself can only be smaller (rows that fail to parse, ``max_atoms``).
    """
    root = Path(data_root)
    drop = _excluded_ids(root, exclude_files, exclude_ids)
    seen: set[str] = set()
    out = []
    for f in DEFAULT_POOL if include is None else include:
        for mid in read_material_ids(_resolve(root, f)):
            if mid and mid not in seen and mid not in drop:
                seen.add(mid)
                out.append(mid)
    return out


def training_pool(
    data_root: str | os.PathLike,
    exclude_files: Sequence[str | os.PathLike] | None = None,
    include: Sequence[str | os.PathLike] | None = None,
    *,
    exclude_ids: Iterable[str] = (),
    max_atoms: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = True,
) -> CrystalDataset:
    """The training pool: several CSVs, deduplicated by ``material_id``, held-out ids removed.

    Args:
        data_root: the offline data folder (``../shared/data`` from the project root).
        exclude_files: CSVs whose ids never enter the pool; default
            :data:`DEFAULT_EXCLUDE` (the held-out ``mp_20_pilot/test``). Paths are
            relative to ``data_root`` unless absolute.
        include: CSVs to draw from, in priority order for duplicates; default
            :data:`DEFAULT_POOL`.
        exclude_ids: further ids to keep out (e.g. another benchmark's targets).
        max_atoms: keep crystals with at most this many atoms (20 for an MP-20 model).
        cache_dir: cache root for the processed files (see :func:`dao.data.csv.cache_root`).
        workers: worker processes for files not yet cached.
        progress: progress bars while processing.

    Returns:
        A :class:`CrystalDataset` whose ``sources`` name the file of every crystal.

    Raises:
        FileNotFoundError: a listed file is missing.
    """
    root = Path(data_root)
    drop = _excluded_ids(root, exclude_files, exclude_ids)
    parts = []
    for f in DEFAULT_POOL if include is None else include:
        path = _resolve(root, f)
        data = load_csv(path, cache_dir=cache_dir, workers=workers, progress=progress)
        label = str(f) if not Path(f).is_absolute() else str(path)
        parts.append(CrystalDataset.from_processed(data, source=label))
    pool = CrystalDataset.concat(parts).exclude_ids(drop).deduplicate()
    if max_atoms is not None:
        pool = pool.filter_max_atoms(max_atoms)
    leaked = set(pool.material_ids.tolist()) & drop
    if leaked:  # cannot happen by construction; a leak would invalidate every evaluation
        raise RuntimeError(f"held-out ids in the training pool: {sorted(leaked)[:5]}")
    return pool
