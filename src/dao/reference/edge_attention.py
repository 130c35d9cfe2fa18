"""Pure-PyTorch twins of :mod:`dao.ops.edge_attention` (Crysformer edge attention).

Everything is computed on the explicit edge list, exactly as the equations read
(spec §2): per edge the raw features [φ(Δf_ij), (L·Lᵀ)_flat], their LayerNorm and
the edge Linear, then softmax attention with e_ij added to keys and values. They
are the test oracle, the fallback and the benchmark baseline of the fused op.

Two levels, matching the op:

* :func:`edge_attention` — a layer's attention output from node q, k, v, the
  coordinates, the lattice and the edge LayerNorm + Linear parameters (naive).
* :func:`edge_attention_core` — the part the fused kernels implement, in the
  factorised form (see :mod:`dao.ops.edge_attention`): scores
  s_ij = q_i·k_j + u_i·z_ij per head, with z_ij the edge features normalised without
  affine; outputs o_i = Σ_j α_ij v_j, y_i = Σ_j α_ij z_ij and the log-sum-exp of the
  scores (what a flash-style backward needs).

Layout (both): crystals stored one after another; ``batch`` [N] sorted crystal
index; the graph is every ordered pair (j → i) of atoms of the same crystal, self
pairs included; Δf_ij = (f_j − f_i) mod 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dao._graph import (
    attend_on_edges,
    fourier_features,
    frac_diff,
    fully_connected_edges,
    lattice_gram,
    segment_logsumexp,
)

__all__ = ["edge_attention", "edge_attention_core", "edge_raw_features", "normalized_edge_features"]


def edge_raw_features(
    frac: Tensor, gram: Tensor, batch: Tensor, edges: Tensor, num_freqs: int
) -> Tensor:
    """[E, 6K + 9] raw edge features: sin(2πkΔf_a) (a-major), cos(...), then gram[c]."""
    phi = fourier_features(frac_diff(frac, edges), num_freqs)
    return torch.cat([phi, gram.reshape(-1, 9)[batch[edges[1]]]], dim=1)


def normalized_edge_features(
    frac: Tensor, gram: Tensor, batch: Tensor, edges: Tensor, num_freqs: int, eps: float
) -> Tensor:
    """[E, D] z_ij: the raw features LayerNorm-ed without affine (D = 6K + 9)."""
    raw = edge_raw_features(frac, gram, batch, edges, num_freqs)
    return torch.nn.functional.layer_norm(raw, raw.shape[1:], eps=eps)


def edge_attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    frac: Tensor,
    gram: Tensor,
    batch: Tensor,
    num_freqs: int,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """The factorised attention core on the explicit edge list.

    Args:
        q: [N, H, d] queries, already scaled by 1/√d.
        k, v: [N, H, d] keys and values (node level, before the edge term).
        u: [N, H, D] per-head edge-score vectors (W'ᵀq, already scaled by 1/√d).
        frac: [N, 3] fractional coordinates.
        gram: [B, 9] (or [B, 3, 3]) L·Lᵀ of every crystal.
        batch: [N] int64 sorted crystal index.
        num_freqs: K (D = 6K + 9).
        eps: the LayerNorm epsilon.

    Returns:
        (o [N, H, d], y [N, H, D], lse [N, H]) with α = softmax_j(s_ij) per head.
    """
    n = q.shape[0]
    edges = fully_connected_edges(batch, gram.shape[0])
    src, dst = edges[0], edges[1]
    z = normalized_edge_features(frac, gram, batch, edges, num_freqs, eps)  # [E, D]
    s = (q[dst] * k[src]).sum(-1) + (u[dst] * z.unsqueeze(1)).sum(-1)  # [E, H]
    lse = segment_logsumexp(s, dst, n)
    alpha = torch.exp(s - lse[dst])
    o = torch.zeros_like(q).index_add(0, dst, alpha.unsqueeze(-1) * v[src])
    y = torch.zeros_like(u).index_add(0, dst, alpha.unsqueeze(-1) * z.unsqueeze(1))
    return o, y, lse


def edge_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    frac: Tensor,
    lattice: Tensor,
    batch: Tensor,
    edge_weight: Tensor,
    edge_bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    heads: int,
    num_freqs: int,
    eps: float = 1e-5,
    *,
    edges: Tensor | None = None,
) -> Tensor:
    """A Crysformer layer's edge attention, naive (per-edge features materialised).

    e_ij = Linear(LayerNorm([φ(Δf_ij), (L·Lᵀ)_flat])); out_i = Σ_j α_ij (v_j + e_ij)
    with α_ij = softmax_j(q_i·(k_j + e_ij)/√d) per head.

    Args:
        q, k, v: [N, h] node queries, keys and values (h = heads·d).
        frac: [N, 3]; lattice: [B, 3, 3] rows = lattice vectors; batch: [N] sorted.
        edge_weight: [h, 6K + 9], edge_bias: [h] (the edge Linear).
        norm_weight, norm_bias: [6K + 9] (the edge LayerNorm affine).
        heads: H; num_freqs: K; eps: LayerNorm epsilon.
        edges: [2, E] (src j, dst i), any edge list; default the fully connected
            graph of every crystal (the graph the fused op implements).

    Returns:
        [N, h] attention output (before the output projection).
    """
    if edges is None:
        edges = fully_connected_edges(batch, lattice.shape[0])
    src, dst = edges[0], edges[1]
    raw = edge_raw_features(frac, lattice_gram(lattice), batch, edges, num_freqs)
    e = torch.nn.functional.layer_norm(raw, raw.shape[1:], norm_weight, norm_bias, eps)
    e = torch.nn.functional.linear(e, edge_weight, edge_bias)
    return attend_on_edges(q[dst], k[src] + e, v[src] + e, dst, q.shape[0], heads)
