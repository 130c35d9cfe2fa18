"""CSPNet: the DiffCSP denoiser, the baseline backbone of the paper (spec §2).

Node input: an element embedding (a learned table, or frozen CGCNN features →
Linear) concatenated with the sinusoidal time embedding → Linear(h + T, h). Each
of the layers (pre-LayerNorm x̂ = LN(x)):

    m_ij = SiLU(W2 · SiLU(W1 · [x̂_i, x̂_j, (L·Lᵀ)_flat, φ(Δf_ij)] + b1) + b2)
    a_i  = mean_j m_ij                      (over all j of i's crystal, j = i included)
    x_i ← x_i + SiLU(V2 · SiLU(V1 · [x̂_i, a_i] + c1) + c2)

then a final LayerNorm and the heads (coordinate per atom; lattice M·L from the
mean-pooled features; optional energy).

The fast path (default) splits the first edge Linear by input block (an exact
rewrite): W1·[x̂_i, x̂_j, g, φ] = (W_i·x̂ + b1 + W_g·g_crystal)_i + (W_j·x̂)_j + W_φ·φ,
so the node terms are computed on the N nodes and gathered, the lattice term per
crystal, and only the Fourier term per edge; φ(Δf) is built once per forward and
the Fourier terms of all layers come from one wide GEMM. ``naive=True`` runs the
concatenation per layer, as the equations read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dao.models.common import (
    ModelOutput,
    OutputHeads,
    check_model_inputs,
    default_atom_features,
    fourier_features,
    frac_diff,
    fully_connected_edges,
    lattice_gram,
    segment_mean,
    sinusoidal_time_embedding,
)
from dao.models.config import CSPNetConfig

__all__ = ["CSPNet", "CSPNetLayer"]


class CSPNetLayer(nn.Module):
    """One CSPNet message-passing layer (edge MLP, mean aggregation, node MLP, residual)."""

    def __init__(self, config: CSPNetConfig) -> None:
        super().__init__()
        h = config.hidden
        self.hidden = h
        self.norm = nn.LayerNorm(h) if config.layer_norm else nn.Identity()
        # Input columns: [x̂_i (centre), x̂_j (neighbour), L·Lᵀ (9), φ(Δf) (6K)].
        self.edge_in = nn.Linear(config.edge_dim, h)
        self.edge_out = nn.Linear(h, h)
        self.node_in = nn.Linear(2 * h, h)
        self.node_out = nn.Linear(h, h)
        self.dropout = nn.Dropout(config.dropout)

    def edge_weight_blocks(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The first edge Linear's weight split by input block: W_i, W_j, W_g, W_φ."""
        h = self.hidden
        return self.edge_in.weight.split([h, h, 9, self.edge_in.in_features - 2 * h - 9], dim=1)

    def _update(self, x: Tensor, xn: Tensor, pre: Tensor, dst: Tensor) -> Tensor:
        msg = F.silu(self.edge_out(F.silu(pre)))
        agg = segment_mean(msg, dst, x.shape[0])
        upd = F.silu(self.node_out(F.silu(self.node_in(torch.cat([xn, agg], dim=-1)))))
        return x + self.dropout(upd)

    def forward(
        self, x: Tensor, fourier_term: Tensor, gram: Tensor, edges: Tensor, batch: Tensor
    ) -> Tensor:
        """Fast layer.

        Args:
            x: [N, h] node features.
            fourier_term: [E, h] W_φ·φ(Δf) of this layer.
            gram: [B, 9] flattened L·Lᵀ.
            edges: [2, E] (src j, dst i).
            batch: [N] crystal index.
        """
        src, dst = edges[0], edges[1]
        xn = self.norm(x)
        w_i, w_j, w_g, _ = self.edge_weight_blocks()
        centre = F.linear(xn, w_i, self.edge_in.bias) + F.linear(gram, w_g)[batch]
        pre = centre[dst] + F.linear(xn, w_j)[src] + fourier_term
        return self._update(x, xn, pre, dst)

    def forward_naive(
        self, x: Tensor, fourier: Tensor, gram: Tensor, edges: Tensor, batch: Tensor
    ) -> Tensor:
        """The same layer on the concatenated edge input (reference twin); ``fourier``
        is φ(Δf) [E, 6K]."""
        src, dst = edges[0], edges[1]
        xn = self.norm(x)
        pre = self.edge_in(torch.cat([xn[dst], xn[src], gram[batch[dst]], fourier], dim=-1))
        return self._update(x, xn, pre, dst)


class CSPNet(nn.Module):
    """The CSPNet backbone with coordinate, lattice and (optional) energy heads.

    Args:
        config: sizes and heads (:class:`CSPNetConfig`).
        atom_features: [Z_max + 1, F] frozen atom-feature table, row Z = element Z;
            used (and stored as a buffer) only with ``atom_encoding="cgcnn"``.
            Default there: :func:`dao.data.atom_features.atom_features`.
    """

    def __init__(self, config: CSPNetConfig, atom_features: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden
        if config.atom_encoding == "cgcnn":
            table = default_atom_features() if atom_features is None else atom_features
            table = torch.as_tensor(table)
            if table.dim() != 2 or table.shape[1] != config.atom_feature_dim:
                raise ValueError(
                    f"atom_features must be [Z_max + 1, {config.atom_feature_dim}], "
                    f"got {tuple(table.shape)}"
                )
            self.register_buffer(
                "atom_features", table.detach().clone().to(torch.get_default_dtype())
            )
            self.atom_embed = nn.Linear(config.atom_feature_dim, h)
        else:
            self.atom_features = None
            # Row Z − 1 holds element Z (elements 1..num_atom_types).
            self.atom_embed = nn.Embedding(config.num_atom_types, h)
        self.node_in = nn.Linear(h + config.time_dim, h)
        self.layers = nn.ModuleList(CSPNetLayer(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(h) if config.layer_norm else nn.Identity()
        self.heads = OutputHeads(
            h, coord=config.coord_head, lattice=config.lattice_head, energy=config.energy_head
        )

    def _embed_nodes(self, atom_types: Tensor, t: Tensor, batch: Tensor, dtype) -> Tensor:
        if self.atom_features is not None:
            h = self.atom_embed(self.atom_features[atom_types])
        else:
            h = self.atom_embed(atom_types - 1)
        temb = sinusoidal_time_embedding(t, self.config.time_dim, dtype)[batch]
        return self.node_in(torch.cat([h, temb], dim=-1))

    def forward(
        self,
        atom_types: Tensor,
        frac_coords: Tensor,
        lattice: Tensor,
        t: Tensor,
        batch: Tensor,
        edges: Tensor | None = None,
        *,
        naive: bool = False,
    ) -> ModelOutput:
        """Denoiser outputs; same contract as :meth:`dao.models.Crysformer.forward`.

        Args:
            atom_types: [N] int64 atomic numbers.
            frac_coords: [N, 3] fractional coordinates.
            lattice: [B, 3, 3] lattices, rows = lattice vectors.
            t: [B] int64 diffusion steps.
            batch: [N] int64 crystal index of every atom, sorted.
            edges: optional [2, E] (src, dst) from :func:`fully_connected_edges`.
            naive: run the concatenating reference implementation (same result).

        Returns:
            ModelOutput(coord [N, 3], lattice [B, 3, 3], energy [B] or None).
        """
        check_model_inputs(atom_types, frac_coords, lattice, t, batch)
        dtype = self.node_in.weight.dtype
        frac_coords, lattice = frac_coords.to(dtype), lattice.to(dtype)
        if edges is None:
            edges = fully_connected_edges(batch, lattice.shape[0])
        x = self._embed_nodes(atom_types, t, batch, dtype)
        gram = lattice_gram(lattice)
        k = self.config.num_freqs
        if naive:
            for layer in self.layers:
                # Deliberately rebuilt per layer, as in a straightforward implementation.
                fourier = fourier_features(frac_diff(frac_coords, edges), k)
                x = layer.forward_naive(x, fourier, gram, edges, batch)
        elif self.layers:
            fourier = fourier_features(frac_diff(frac_coords, edges), k)
            w = torch.cat([layer.edge_weight_blocks()[3] for layer in self.layers])
            terms = F.linear(fourier, w).split(self.config.hidden, dim=1)
            for layer, term in zip(self.layers, terms, strict=True):
                x = layer(x, term, gram, edges, batch)
        return self.heads(self.final_norm(x), batch, lattice)
