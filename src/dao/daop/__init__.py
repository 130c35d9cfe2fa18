"""DAO-P: the time-dependent energy model, its relaxation and its guidance (spec §3-4)."""

from dao.daop.model import DAOP, ENERGY_COLUMNS, energy_labels
from dao.daop.relax import RelaxResult, relax

__all__ = ["DAOP", "ENERGY_COLUMNS", "RelaxResult", "energy_labels", "relax"]
