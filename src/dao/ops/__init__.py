"""Public compute kernels of dao, each a ``torch.library`` op with a reference twin."""

from dao.ops.neighbor_list import NeighborList, neighbor_list

__all__ = ["NeighborList", "neighbor_list"]
