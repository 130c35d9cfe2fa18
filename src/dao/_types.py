"""Result types shared by the public ops and their reference twins."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["NeighborList"]


class NeighborList(NamedTuple):
    """A full periodic neighbour list (both i->j and j->i).

    Attributes:
        i: [P] int32 global index of the centre atom.
        j: [P] int32 global index of the neighbour.
        shifts: [P, 3] int16 image shift S: vector = r_j - r_i + S . L.
        distances: [P] |vector| in the input dtype, or None if not requested.
        vectors: [P, 3] in the input dtype, or None if not requested.
    """

    i: torch.Tensor
    j: torch.Tensor
    shifts: torch.Tensor
    distances: torch.Tensor | None
    vectors: torch.Tensor | None
