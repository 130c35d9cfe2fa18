"""Crystal containers and datasets."""

from dao.data.crystal import CrystalBatch

__all__ = ["CrystalBatch"]
