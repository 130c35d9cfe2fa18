"""Crystal containers and datasets.

Exports are resolved on first use (PEP 562) so that ``import dao.data.csv`` -- what
the CSV worker processes import -- does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dao.data.atom_features import atom_features, lookup_atom_features
    from dao.data.crystal import CrystalBatch
    from dao.data.csv import ProcessedCSV, load_csv, process_csv, read_material_ids
    from dao.data.dataset import (
        DEFAULT_EXCLUDE,
        DEFAULT_POOL,
        CrystalDataset,
        CrystalRecord,
        LabelledBatch,
        RandomBatchSampler,
        collate,
        training_pool,
        training_pool_ids,
    )

_EXPORTS = {
    "CrystalBatch": "dao.data.crystal",
    "atom_features": "dao.data.atom_features",
    "lookup_atom_features": "dao.data.atom_features",
    "ProcessedCSV": "dao.data.csv",
    "load_csv": "dao.data.csv",
    "process_csv": "dao.data.csv",
    "read_material_ids": "dao.data.csv",
    "DEFAULT_EXCLUDE": "dao.data.dataset",
    "DEFAULT_POOL": "dao.data.dataset",
    "CrystalDataset": "dao.data.dataset",
    "CrystalRecord": "dao.data.dataset",
    "LabelledBatch": "dao.data.dataset",
    "RandomBatchSampler": "dao.data.dataset",
    "collate": "dao.data.dataset",
    "training_pool": "dao.data.dataset",
    "training_pool_ids": "dao.data.dataset",
}

__all__ = [
    "CrystalBatch",
    "CrystalDataset",
    "CrystalRecord",
    "DEFAULT_EXCLUDE",
    "DEFAULT_POOL",
    "LabelledBatch",
    "ProcessedCSV",
    "RandomBatchSampler",
    "atom_features",
    "collate",
    "load_csv",
    "lookup_atom_features",
    "process_csv",
    "read_material_ids",
    "training_pool",
    "training_pool_ids",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dao.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
