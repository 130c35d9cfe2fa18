"""Pieces shared by the denoiser backbones (Crysformer, CSPNet).

Graph convention: a crystal's atoms form a fully connected directed graph with
self pairs, no cutoff and no periodic images. ``edges[0]`` is the *source*
(neighbour j), ``edges[1]`` the *destination* (centre i); messages flow j → i and
every reduction (softmax, mean) runs over the edges that share a destination.
The edge feature of (i, j) uses Δf = (f_j − f_i) mod 1.

Everything here is plain PyTorch: segment reductions use ``index_add_`` and
``scatter_reduce``, so no compiled graph package is needed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dao._graph import (
    fourier_features,
    frac_diff,
    fully_connected_edges,
    lattice_gram,
    memoized,
    segment_logsumexp,
    segment_softmax,
)

__all__ = [
    "ModelOutput",
    "GatedResidual",
    "OutputHeads",
    "PaddedEdges",
    "check_model_inputs",
    "default_atom_features",
    "edge_crystal_index",
    "fourier_features",
    "frac_diff",
    "fully_connected_edges",
    "lattice_gram",
    "pad_by_destination",
    "segment_logsumexp",
    "segment_mean",
    "segment_softmax",
    "sinusoidal_time_embedding",
]


class ModelOutput(NamedTuple):
    """What a denoiser backbone returns.

    Attributes:
        coord: [N, 3] per-atom fractional-coordinate score, or None without a
            coordinate head.
        lattice: [B, 3, 3] lattice output M·L (rows = lattice vectors, rotates like
            the input lattice), or None without a lattice head.
        energy: [B] energy per crystal, or None without an energy head.
    """

    coord: Tensor | None
    lattice: Tensor | None
    energy: Tensor | None


# ----------------------------------------------------------------- inputs


def check_model_inputs(
    atom_types: Tensor, frac_coords: Tensor, lattice: Tensor, t: Tensor, batch: Tensor
) -> None:
    """Raise ValueError unless the inputs follow the model contract (shapes, dtypes).

    Only metadata is inspected (no device synchronisation); the sortedness of
    ``batch`` is checked where the edges are built.
    """
    n = atom_types.shape[0] if atom_types.dim() == 1 else -1
    if atom_types.dim() != 1 or atom_types.dtype != torch.int64:
        raise ValueError(
            f"atom_types must be [N] int64 atomic numbers, got {tuple(atom_types.shape)} "
            f"{atom_types.dtype}"
        )
    if frac_coords.shape != (n, 3) or not frac_coords.dtype.is_floating_point:
        raise ValueError(
            f"frac_coords must be floating [N, 3] = [{n}, 3], got "
            f"{tuple(frac_coords.shape)} {frac_coords.dtype}"
        )
    if lattice.dim() != 3 or lattice.shape[1:] != (3, 3):
        raise ValueError(
            f"lattice must be [B, 3, 3] with lattice vectors as rows, got {tuple(lattice.shape)}"
        )
    if lattice.dtype != frac_coords.dtype:
        raise ValueError(
            f"lattice dtype {lattice.dtype} differs from frac_coords dtype {frac_coords.dtype}"
        )
    b = lattice.shape[0]
    if t.shape != (b,) or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(
            f"t must be [B] = [{b}] integer diffusion steps, got {tuple(t.shape)} {t.dtype}"
        )
    if batch.shape != (n,) or batch.dtype != torch.int64:
        raise ValueError(
            f"batch must be [N] = [{n}] int64 crystal indices, got {tuple(batch.shape)} "
            f"{batch.dtype}"
        )


def default_atom_features() -> Tensor:
    """The CGCNN atom-feature table [101, 92] (row Z = element Z) from ``dao.data``.

    Raises:
        RuntimeError: if ``dao.data.atom_features`` is not available; pass the
            table to the model constructor instead.
    """
    try:
        from dao.data.atom_features import atom_features  # noqa: PLC0415
    except ModuleNotFoundError as err:
        if err.name not in ("dao.data.atom_features", "dao.data"):
            raise
        raise RuntimeError(
            "the model needs the frozen CGCNN atom-feature table, but "
            "dao.data.atom_features is not available: pass atom_features=<[101, 92] "
            "tensor, row Z = element Z> to the constructor (e.g. built from "
            "cgcnn/atom_init.json), or load a checkpoint that holds the table"
        ) from err
    return torch.as_tensor(atom_features())


# ---------------------------------------------------------------- graph


class PaddedEdges(NamedTuple):
    """The edges regrouped as one row of S slots per destination atom (S = max in-degree).

    Attributes:
        index: [N, S] int64 edge id of each (destination, slot); 0 in unused slots.
        src: [N, S] int64 source atom of each slot; 0 in unused slots.
        mask: [N, S] bool, True where the slot holds an edge.
    """

    index: Tensor
    src: Tensor
    mask: Tensor


def pad_by_destination(edges: Tensor, num_nodes: int) -> PaddedEdges:
    """Regroup an edge list [2, E] by destination (any order, any graph).

    Per-destination reductions then become dense reductions over the slot axis.
    Slots follow the edges' order within each destination (a stable sort). Memoized
    inside :func:`dao._graph.static_batch` (it reads the widest degree back from the
    device).
    """
    return memoized("pad_by_destination", edges, _pad_by_destination, num_nodes)


def _pad_by_destination(edges: Tensor, num_nodes: int) -> PaddedEdges:
    src, dst = edges[0], edges[1]
    device = edges.device
    deg = torch.bincount(dst, minlength=num_nodes)
    width = int(deg.max()) if deg.numel() else 0
    order = torch.argsort(dst, stable=True)
    d_sorted = dst[order]
    slot = torch.arange(order.numel(), device=device) - (torch.cumsum(deg, 0) - deg)[d_sorted]
    index = torch.zeros(num_nodes, width, dtype=torch.int64, device=device)
    index[d_sorted, slot] = order
    mask = torch.zeros(num_nodes, width, dtype=torch.bool, device=device)
    mask[d_sorted, slot] = True
    return PaddedEdges(index, src[index] * mask, mask)


def edge_crystal_index(batch: Tensor, edges: Tensor) -> Tensor:
    """[E] crystal index of every edge (that of its destination atom)."""
    return batch[edges[1]]


def sinusoidal_time_embedding(t: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """Transformer-style sinusoidal embedding of integer diffusion steps.

    Args:
        t: [B] integer steps.
        dim: even embedding width D.
        dtype: floating dtype of the result.

    Returns:
        [B, D] = [sin(t·ω_k), cos(t·ω_k)] with ω_k = 10000^(−k/(D/2 − 1)), k < D/2.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"time embedding width must be even and >= 4, got {dim}")
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * k / (half - 1))
    # Angles in float64: t reaches 1000 and fp32 angles would lose ~1e-4 rad.
    ang = t.to(torch.float64).unsqueeze(-1) * freqs
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).to(dtype)


# ---------------------------------------------------------- segment ops


def segment_mean(x: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """[S, ...] mean of the rows of ``x`` [E, ...] per segment (0 for empty segments)."""
    out = torch.zeros((num_segments, *x.shape[1:]), dtype=x.dtype, device=x.device)
    out = out.index_add(0, index, x)
    # index_add rather than bincount: no device-to-host sync (CUDA-graph capturable)
    ones = torch.ones(index.shape[0], dtype=x.dtype, device=x.device)
    count = torch.zeros(num_segments, dtype=x.dtype, device=x.device).index_add_(0, index, ones)
    count = count.clamp_(min=1)
    return out / count.view(-1, *([1] * (x.dim() - 1)))


# --------------------------------------------------------------- modules


class GatedResidual(nn.Module):
    """out = x·g + r·(1 − g), g = sigmoid(w·[x, r, x − r]) (one scalar gate per row).

    Args:
        hidden: feature width of x and r.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(3 * hidden, 1, bias=False)

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        """x: [N, hidden] residual stream; r: [N, hidden] block output."""
        # w·[x, r, x − r] = (w_x + w_d)·x + (w_r − w_d)·r: the same gate without
        # materialising the [N, 3·hidden] concatenation.
        w_x, w_r, w_d = self.gate.weight.chunk(3, dim=1)
        d = x - r
        g = torch.sigmoid(F.linear(x, w_x + w_d) + F.linear(r, w_r - w_d))
        return r + g * d


class OutputHeads(nn.Module):
    """The coordinate, lattice and energy heads on top of a backbone's node features.

    * coordinate: Linear(h, 3, no bias) per atom;
    * lattice: mean-pool atoms, Linear(h, 9, no bias) → M [3, 3], output M·L. With
      row-vector lattices a rotation R acts as L → L·Rᵀ, and M (built from invariant
      features) is unchanged, so M·L → (M·L)·Rᵀ: the output rotates like L. (L·M
      would not.)
    * energy: mean-pool, Linear(h, h), SiLU, Linear(h, 1) → [B].

    Args:
        hidden: node feature width h.
        coord, lattice, energy: which heads to build; absent heads return None.
    """

    def __init__(self, hidden: int, coord: bool, lattice: bool, energy: bool) -> None:
        super().__init__()
        self.coord = nn.Linear(hidden, 3, bias=False) if coord else None
        self.lattice = nn.Linear(hidden, 9, bias=False) if lattice else None
        self.energy = (
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            if energy
            else None
        )

    def forward(self, x: Tensor, batch: Tensor, lattice: Tensor) -> ModelOutput:
        """x: [N, h] node features; batch: [N]; lattice: [B, 3, 3] (input L)."""
        num_crystals = lattice.shape[0]
        coord = self.coord(x) if self.coord is not None else None
        lat = energy = None
        if self.lattice is not None or self.energy is not None:
            pooled = segment_mean(x, batch, num_crystals)
            if self.lattice is not None:
                m = self.lattice(pooled).view(num_crystals, 3, 3)
                lat = m @ lattice
            if self.energy is not None:
                energy = self.energy(pooled).squeeze(-1)
        return ModelOutput(coord, lat, energy)
