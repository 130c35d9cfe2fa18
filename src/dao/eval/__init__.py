"""CSP evaluation (spec §6): validity, StructureMatcher match rate / RMSE, and the
template baseline that every model is reported beside.

Importing this package does not import torch (match workers import it), so the
submodules stay light: only the structural validity check loads ``dao.ops``.
"""

from dao.eval.baseline import TemplateBaseline, read_pool
from dao.eval.match import evaluate, read_results, rms_dist, summarize
from dao.eval.validity import Validity, smact_validity, structure_validity, validity, validity_many

__all__ = [
    "TemplateBaseline",
    "Validity",
    "evaluate",
    "read_pool",
    "read_results",
    "rms_dist",
    "smact_validity",
    "structure_validity",
    "summarize",
    "validity",
    "validity_many",
]
