"""Public compute kernels of dao, each a ``torch.library`` op with a reference twin."""

from dao.ops.diffusion_step import corrector_step, predictor_step
from dao.ops.neighbor_list import NeighborList, neighbor_list

__all__ = ["NeighborList", "corrector_step", "neighbor_list", "predictor_step"]
