"""CGCNN atom features: the frozen 92-d node embedding of DAO.

The table ``atom_init.json`` (shipped in this package) is the CGCNN repository's
``atom_init.json`` (Xie & Grossman, PRL 120, 145301 (2018); MIT licence, see
``ATTRIBUTION.md``): for atomic numbers 1-100, one-hot encodings of group,
period, electronegativity, covalent radius, valence electrons, first ionization
energy, electron affinity, block and atomic volume.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np
import torch

__all__ = ["ATOM_FEATURE_DIM", "MAX_ATOMIC_NUMBER", "atom_features", "lookup_atom_features"]

#: Length of one feature vector.
ATOM_FEATURE_DIM = 92
#: Highest atomic number in the table (fermium).
MAX_ATOMIC_NUMBER = 100


@functools.lru_cache(maxsize=1)
def _table() -> np.ndarray:
    text = resources.files("dao.data").joinpath("atom_init.json").read_text(encoding="utf-8")
    raw = json.loads(text)
    table = np.zeros((MAX_ATOMIC_NUMBER + 1, ATOM_FEATURE_DIM), dtype=np.float32)
    for key, vec in raw.items():
        z = int(key)
        if not 1 <= z <= MAX_ATOMIC_NUMBER or len(vec) != ATOM_FEATURE_DIM:
            raise ValueError(f"atom_init.json: bad entry for Z={key} ({len(vec)} values)")
        table[z] = vec
    missing = [z for z in range(1, MAX_ATOMIC_NUMBER + 1) if str(z) not in raw]
    if missing:
        raise ValueError(f"atom_init.json lacks atomic numbers {missing}")
    table.flags.writeable = False
    return table


def atom_features(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The CGCNN feature table.

    Returns:
        [101, 92] tensor (a fresh copy): row Z holds the features of atomic number Z,
        row 0 is zeros (no element).
    """
    return torch.tensor(_table(), dtype=dtype)


def lookup_atom_features(
    atom_types: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Features of every atom.

    Args:
        atom_types: [N] integer atomic numbers in 1..100.
        dtype: output dtype.

    Returns:
        [N, 92] features, on the device of ``atom_types``.

    Raises:
        ValueError: an atomic number outside 1..100 (CGCNN has no features beyond Fm).
    """
    z = torch.as_tensor(atom_types)
    if z.dtype.is_floating_point or z.dtype == torch.bool:
        raise ValueError(f"atom_types must hold integers, got {z.dtype}")
    if z.numel():
        lo, hi = int(z.min()), int(z.max())
        if lo < 1 or hi > MAX_ATOMIC_NUMBER:
            bad = sorted({int(v) for v in z.flatten().tolist() if not 1 <= v <= MAX_ATOMIC_NUMBER})
            raise ValueError(
                f"CGCNN atom features cover atomic numbers 1..{MAX_ATOMIC_NUMBER}; got {bad[:10]}"
            )
    return atom_features(dtype).to(z.device)[z.long()]
