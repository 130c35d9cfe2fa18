"""Result types shared by the public ops and their reference twins."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["NeighborList", "empty_neighbor_outputs"]


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


def empty_neighbor_outputs(positions: torch.Tensor, n: int, want_d: bool, want_v: bool):
    """Uninitialised raw outputs of every backend for n pairs:
    (i int32 [n], j int32 [n], shifts int16 [n, 3], distances [n] or [0], vectors [n, 3] or
    [0, 3]) on the device and in the float dtype of ``positions``."""
    dev, dt = positions.device, positions.dtype
    return (
        torch.empty(n, dtype=torch.int32, device=dev),
        torch.empty(n, dtype=torch.int32, device=dev),
        torch.empty(n, 3, dtype=torch.int16, device=dev),
        torch.empty(n if want_d else 0, dtype=dt, device=dev),
        torch.empty(n if want_v else 0, 3, dtype=dt, device=dev),
    )
