"""Crysformer: the transformer backbone shared by DAO-G and DAO-P (spec §2).

A transformer over the fully connected graph of each unit cell's atoms (self
pairs included, no periodic images). Node input: frozen CGCNN features →
Linear(92, h), concatenated with a sinusoidal time embedding → Linear(h + T, h).
Each layer: pre-LayerNorm edge attention (q from the centre i, k and v from the
neighbour j, the edge embedding e_ij added to both k and v, softmax over the
neighbours of i), a gated residual, a pre-LayerNorm GELU feed-forward and a
second gated residual. Edge embedding: e_ij = Linear(LayerNorm([φ(Δf_ij), L·Lᵀ])).

Three implementations of the same function live here, all on the same parameters:

* ``edge_impl = "fused"`` calls the fused op :func:`dao.ops.edge_attention.edge_attention`
  per layer: the pair loop runs in a C++ kernel (CPU), a Triton kernel (GPU) or as
  batched matrix products (``edge_backend = "dense"``), never storing per-edge
  features, in the forward or the backward. ``"auto"`` (default) takes it on CPU
  tensors and on GPU tensors without gradients (sampling), and ``"factorized"`` for
  training on a GPU: on an H200 the factorized path trained faster than the fused
  backends (which used 1/5 of the memory; BENCHMARKS.md, "On a GPU").
* the other fast paths share exact rewrites: q, k, v are projected on the N nodes and
  then gathered (never projected on the E edges); φ(Δf) and L·Lᵀ are built once per
  forward; the LayerNorm statistics of the edge features are the same in every
  layer, so the features are normalised once (z) and each layer's LayerNorm affine
  is folded into its Linear: e = W'·z + b' with W' = W·diag γ, b' = W·β + b.
  - ``edge_impl = "projected"`` forms e for all layers with one wide GEMM
    [E, 6K + 9] × [6K + 9, L·h] and attends over the edge list;
  - ``edge_impl = "factorized"`` (default) never forms e: e enters the attention
    linearly, so per head q·e = (W'ᵀq)·z + q·b' and Σ α·e = W'·(Σ α·z) + b'·Σ α,
    products with H columns instead of h (see :meth:`CrysformerLayer.attention`).
    Edges are regrouped as one row of slots per centre atom, so the softmax and
    the sums over neighbours are dense reductions. It is the faster of the two at
    the paper size, most of all for large cells and without gradients (sampling);
    "projected" can be faster for training small models (few heads, few
    frequencies), where the edge GEMM is cheap.
* the naive path (``naive=True``, :func:`reference_edge_attention`) computes
  everything per layer on the edge list, exactly as the equations read. It is the
  test oracle and the benchmark baseline.

A checkpoint runs on every path; ``edge_impl`` is not part of the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dao._graph import attend_on_edges
from dao.models.common import (
    GatedResidual,
    ModelOutput,
    OutputHeads,
    PaddedEdges,
    check_model_inputs,
    default_atom_features,
    fully_connected_edges,
    lattice_gram,
    pad_by_destination,
    sinusoidal_time_embedding,
)
from dao.models.config import CrysformerConfig
from dao.ops.edge_attention import edge_attention, fold_edge_projection
from dao.reference.edge_attention import edge_attention as reference_attention
from dao.reference.edge_attention import edge_raw_features

__all__ = ["Crysformer", "CrysformerLayer", "crysformer_edge_features", "reference_edge_attention"]


def crysformer_edge_features(
    frac_coords: Tensor, lattice: Tensor, batch: Tensor, edges: Tensor, num_freqs: int
) -> Tensor:
    """Raw edge features [E, 6K + 9] = [φ(Δf_ij), (L·Lᵀ)_flat of the edge's crystal]."""
    return edge_raw_features(frac_coords, lattice_gram(lattice), batch, edges, num_freqs)


def _auto_impl(device: torch.device, edges: Tensor | None) -> str:
    """``edge_impl = "auto"``: the fused op on CPU, and on a GPU without gradients
    (sampling: with CUDA graphs the Triton forward ran 2.1-3.5x the factorized path's
    structures/s at the shipped size on an H200); the factorized path for training on a
    GPU (it trained faster than both fused backends there, BENCHMARKS.md "On a GPU");
    the factorized path for a custom edge list (the fused op builds the full graph)."""
    if edges is not None:
        return "factorized"
    if device.type == "cpu" or not torch.is_grad_enabled():
        return "fused"
    return "factorized"


class CrysformerLayer(nn.Module):
    """One Crysformer layer: edge attention and feed-forward, each with a gated residual."""

    def __init__(self, config: CrysformerConfig) -> None:
        super().__init__()
        h = config.hidden
        self.heads = config.heads
        self.num_freqs = config.num_freqs
        self.attn_norm = nn.LayerNorm(h)
        self.q_proj = nn.Linear(h, h)
        self.kv_proj = nn.Linear(h, 2 * h)
        self.out_proj = nn.Linear(h, h)
        self.edge_norm = nn.LayerNorm(config.edge_dim)
        self.edge_proj = nn.Linear(config.edge_dim, h)
        self.attn_gate = GatedResidual(h)
        self.ffn_norm = nn.LayerNorm(h)
        self.ffn = nn.Sequential(
            nn.Linear(h, config.ffn_mult * h), nn.GELU(), nn.Linear(config.ffn_mult * h, h)
        )
        self.ffn_gate = GatedResidual(h)
        self.dropout = nn.Dropout(config.dropout)

    def folded_edge_projection(self) -> tuple[Tensor, Tensor]:
        """(W·diag γ, W·β + b): the edge LayerNorm affine folded into the edge Linear,
        to apply to features normalised without affine. Shapes [h, D] and [h].

        Without gradients (sampling, prediction) the result is cached and reused until
        one of the four parameters changes (new storage or an in-place update: an
        optimiser step, ``load_state_dict``, ``.to()``)."""
        params = (
            self.edge_proj.weight,
            self.edge_proj.bias,
            self.edge_norm.weight,
            self.edge_norm.bias,
        )
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._fold_edge_projection()
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cache = self.__dict__.get("_fold_cache")
        if cache is None or cache[0] != key:
            cache = (key, self._fold_edge_projection())
            self.__dict__["_fold_cache"] = cache
        return cache[1]

    def _fold_edge_projection(self) -> tuple[Tensor, Tensor]:
        return fold_edge_projection(
            self.edge_proj.weight, self.edge_proj.bias, self.edge_norm.weight, self.edge_norm.bias
        )

    def attention(self, x: Tensor, z_pad: Tensor, pad: PaddedEdges) -> Tensor:
        """Fast attention block (exact rewrite of :func:`reference_edge_attention`).

        The edge embedding e_ij = W'·z_ij + b' (LayerNorm affine folded in) enters
        linearly, so per head

            q_i·(k_j + e_ij) = q_i·k_j + (W'ᵀq_i)·z_ij + q_i·b'
            Σ_j α_ij (v_j + e_ij) = Σ_j α_ij v_j + W'·(Σ_j α_ij z_ij) + b'·Σ_j α_ij

        so the [E, D]×[D, h] edge projection is replaced by per-edge products with H
        columns (z_ij·u_i with u_i = W'ᵀq_i, and Σ_j α_ij z_ij: 2H instead of h
        multiply-adds per edge feature) and two node-level [N, D]×[D, d] products per
        head.

        Args:
            x: [N, h] node features.
            z_pad: [N, S, D] edge features normalised without affine, per destination.
            pad: the slot layout (:func:`pad_by_destination`).

        Returns:
            [N, h] the block's output (before dropout and the gated residual).
        """
        n, h = x.shape
        heads, d = self.heads, h // self.heads
        w, b = self.folded_edge_projection()
        w_heads = w.view(heads, d, -1)  # [H, d, D]
        hn = self.attn_norm(x)
        q = self.q_proj(hn).view(n, heads, d)
        k, v = self.kv_proj(hn).chunk(2, dim=-1)
        slots = pad.src.shape[1]
        # index_select, not k[pad.src]: its backward is index_add (atomics on CUDA)
        # where advanced indexing's is a sort-based index_put (on an H200 the paper-size
        # MPTS-52 backward took 565 ms before this change and 35 ms after).
        src = pad.src.reshape(-1)
        k_pad = k.index_select(0, src).view(n, slots, heads, d)  # [N, S, H, d]
        v_pad = v.index_select(0, src).view(n, slots, heads, d)
        u = torch.bmm(q.transpose(0, 1), w_heads)  # [H, N, D]: W'ᵀ q per head
        scores = (
            (q.unsqueeze(1) * k_pad).sum(-1)
            + torch.bmm(z_pad, u.permute(1, 2, 0))
            + (q * b.view(heads, d)).sum(-1).unsqueeze(1)
        ) * (1.0 / math.sqrt(d))  # [N, S, H]
        mask = pad.mask.unsqueeze(-1)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        # A destination without edges gets all-zero weights, like the segment softmax.
        alpha = torch.softmax(scores, dim=1) * mask
        y = torch.bmm(alpha.transpose(1, 2), z_pad)  # [N, H, D]: Σ_j α_ij z_ij
        out = (
            (alpha.unsqueeze(-1) * v_pad).sum(1)
            + torch.bmm(y.transpose(0, 1), w_heads.transpose(1, 2)).transpose(0, 1)
            + alpha.sum(1).unsqueeze(-1) * b.view(heads, d)
        )
        return self.out_proj(out.reshape(n, h))

    def attention_projected(self, x: Tensor, edge_emb: Tensor, edges: Tensor) -> Tensor:
        """Fast attention with the edge embedding formed explicitly: q, k, v projected
        on the nodes and gathered onto the edge list; ``edge_emb`` [E, h] is e_ij."""
        src, dst = edges[0], edges[1]
        hn = self.attn_norm(x)
        q = self.q_proj(hn)
        k, v = self.kv_proj(hn).chunk(2, dim=-1)
        kk, vv = k[src] + edge_emb, v[src] + edge_emb
        out = attend_on_edges(q[dst], kk, vv, dst, x.shape[0], self.heads)
        return self.out_proj(out)

    def attention_fused(
        self, x: Tensor, frac_coords: Tensor, lattice: Tensor, batch: Tensor, backend: str = "auto"
    ) -> Tensor:
        """Fast attention through the fused op :func:`dao.ops.edge_attention.edge_attention`
        (no per-edge tensor in memory, in the forward or the backward) with the op's
        ``backend``."""
        hn = self.attn_norm(x)
        q = self.q_proj(hn)
        # k and v from the two row blocks of kv_proj: contiguous, so the op copies neither.
        h = q.shape[1]
        w, b = self.kv_proj.weight, self.kv_proj.bias
        k, v = F.linear(hn, w[:h], b[:h]), F.linear(hn, w[h:], b[h:])
        out = edge_attention(
            q,
            k,
            v,
            frac_coords,
            lattice,
            batch,
            self.edge_proj.weight,
            self.edge_proj.bias,
            self.edge_norm.weight,
            self.edge_norm.bias,
            self.heads,
            self.num_freqs,
            self.edge_norm.eps,
            folded=self.folded_edge_projection(),
            backend=backend,
        )
        return self.out_proj(out)

    def finish(self, x: Tensor, attn: Tensor) -> Tensor:
        """The rest of the layer after the attention block's output ``attn`` [N, h]:
        gated residual, feed-forward, gated residual."""
        x = self.attn_gate(x, self.dropout(attn))
        return self.ffn_gate(x, self.dropout(self.ffn(self.ffn_norm(x))))

    def forward(self, x: Tensor, z_pad: Tensor, pad: PaddedEdges) -> Tensor:
        """x: [N, h] node features; z_pad, pad: the shared edge data (see :meth:`attention`)."""
        return self.finish(x, self.attention(x, z_pad, pad))


def reference_edge_attention(
    layer: CrysformerLayer,
    x: Tensor,
    frac_coords: Tensor,
    lattice: Tensor,
    batch: Tensor,
    edges: Tensor | None = None,
) -> Tensor:
    """The attention block of ``layer`` as the equations read (the naive twin).

    The node projections, then :func:`dao.reference.edge_attention.edge_attention`
    with the layer's edge LayerNorm and Linear (per-edge features materialised).

    Args:
        layer: the layer whose parameters to use.
        x: [N, h] node features (before the block's LayerNorm).
        frac_coords: [N, 3]; lattice: [B, 3, 3]; batch: [N] sorted crystal index.
        edges: [2, E] (src j, dst i); default the fully connected graph.

    Returns:
        [N, h] the attention block's output (before dropout and the gated residual).
    """
    hn = layer.attn_norm(x)
    k, v = layer.kv_proj(hn).chunk(2, dim=-1)
    out = reference_attention(
        layer.q_proj(hn),
        k,
        v,
        frac_coords,
        lattice,
        batch,
        layer.edge_proj.weight,
        layer.edge_proj.bias,
        layer.edge_norm.weight,
        layer.edge_norm.bias,
        layer.heads,
        layer.num_freqs,
        layer.edge_norm.eps,
        edges=edges,
    )
    return layer.out_proj(out)


class Crysformer(nn.Module):
    """The Crysformer backbone with coordinate, lattice and (optional) energy heads.

    Args:
        config: sizes and heads (:class:`CrysformerConfig`).
        atom_features: [Z_max + 1, F] frozen atom-feature table, row Z = element Z
            (CGCNN: [101, 92]). Stored as a buffer, so it is saved with the weights.
            Default: :func:`dao.data.atom_features.atom_features`.

    Attributes:
        edge_impl: which fast path ``forward`` runs: ``"auto"`` (default), ``"fused"``,
            ``"factorized"`` or ``"projected"`` (see the module docstring); set it
            freely, the result is the same up to rounding.
    """

    def __init__(self, config: CrysformerConfig, atom_features: Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        table = default_atom_features() if atom_features is None else atom_features
        table = torch.as_tensor(table)
        if table.dim() != 2 or table.shape[1] != config.atom_feature_dim:
            raise ValueError(
                f"atom_features must be [Z_max + 1, {config.atom_feature_dim}], "
                f"got {tuple(table.shape)}"
            )
        self.register_buffer("atom_features", table.detach().clone().to(torch.get_default_dtype()))
        h = config.hidden
        self.atom_embed = nn.Linear(config.atom_feature_dim, h)
        self.node_in = nn.Linear(h + config.time_dim, h)
        self.layers = nn.ModuleList(CrysformerLayer(config) for _ in range(config.num_layers))
        self.heads = OutputHeads(
            h, coord=config.coord_head, lattice=config.lattice_head, energy=config.energy_head
        )
        #: Fast-path variant (same result, different speed): "auto", "fused",
        #: "factorized" or "projected".
        self.edge_impl = "auto"
        #: Backend of the fused op when ``edge_impl`` is "fused" (see
        #: :mod:`dao.ops.edge_attention`): "auto", "cpp", "dense", "triton" or "torch".
        self.edge_backend = "auto"

    def _embed_nodes(self, atom_types: Tensor, t: Tensor, batch: Tensor) -> Tensor:
        feats = self.atom_features[atom_types]
        h = self.atom_embed(feats)
        temb = sinusoidal_time_embedding(t, self.config.time_dim, h.dtype)[batch]
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
        """Denoiser outputs for a batch of B crystals with N atoms in total.

        Args:
            atom_types: [N] int64 atomic numbers.
            frac_coords: [N, 3] fractional coordinates (any real values).
            lattice: [B, 3, 3] lattices, rows = lattice vectors.
            t: [B] int64 diffusion steps.
            batch: [N] int64 crystal index of every atom, sorted.
            edges: optional [2, E] (src, dst) from :func:`fully_connected_edges`.
            naive: run the per-layer reference implementation (same result).

        Returns:
            ModelOutput(coord [N, 3], lattice [B, 3, 3], energy [B]); a field is None
            when its head is disabled. Floating inputs are cast to the model dtype.
        """
        check_model_inputs(atom_types, frac_coords, lattice, t, batch)
        x = self.encode(atom_types, frac_coords, lattice, t, batch, edges, naive=naive)
        return self.heads(x, batch, lattice.to(x.dtype))

    def encode(
        self,
        atom_types: Tensor,
        frac_coords: Tensor,
        lattice: Tensor,
        t: Tensor,
        batch: Tensor,
        edges: Tensor | None = None,
        *,
        naive: bool = False,
    ) -> Tensor:
        """[N, h] node features after the last layer (what the heads read; property
        fine-tuning puts its own head on them). Arguments as :meth:`forward`."""
        dtype = self.atom_embed.weight.dtype
        frac_coords, lattice = frac_coords.to(dtype), lattice.to(dtype)
        x = self._embed_nodes(atom_types, t, batch)
        k = self.config.num_freqs
        impl = "naive" if naive else self.edge_impl
        if impl == "auto":
            impl = _auto_impl(frac_coords.device, edges)
        if impl == "fused" and edges is not None:
            raise ValueError(
                "edge_impl 'fused' builds the fully connected graph itself: call the model "
                "with edges=None, or pick 'factorized' for a custom edge list"
            )
        if impl not in ("fused", "factorized", "projected", "naive"):
            raise ValueError(
                f"edge_impl must be 'auto', 'fused', 'factorized' or 'projected', got {impl!r}"
            )
        if impl != "fused" and edges is None:
            edges = fully_connected_edges(batch, lattice.shape[0])
        if impl == "fused":
            for layer in self.layers:
                x = layer.finish(
                    x, layer.attention_fused(x, frac_coords, lattice, batch, self.edge_backend)
                )
        elif impl == "naive":
            for layer in self.layers:
                # The reference does all edge work per layer, features included.
                x = layer.finish(
                    x, reference_edge_attention(layer, x, frac_coords, lattice, batch, edges)
                )
        elif self.layers:
            edge_raw = crysformer_edge_features(frac_coords, lattice, batch, edges, k)
            # LayerNorm statistics are shared by all layers: normalise once, and let
            # each layer apply its own affine (folded into its projection).
            z = F.layer_norm(edge_raw, edge_raw.shape[1:], eps=self.layers[0].edge_norm.eps)
            if impl == "factorized":
                pad = pad_by_destination(edges, x.shape[0])
                # [N, S, D]; unused slots are masked out downstream (index_select: as
                # for k and v in CrysformerLayer.attention)
                z_pad = z.index_select(0, pad.index.reshape(-1)).view(*pad.index.shape, -1)
                for layer in self.layers:
                    x = layer(x, z_pad, pad)
            else:
                folded = [layer.folded_edge_projection() for layer in self.layers]
                w = torch.cat([f[0] for f in folded])
                b = torch.cat([f[1] for f in folded])
                # All layers' edge embeddings from one wide GEMM.
                edge_emb = F.linear(z, w, b).split(self.config.hidden, dim=1)
                for layer, e in zip(self.layers, edge_emb, strict=True):
                    x = layer.finish(x, layer.attention_projected(x, e, edges))
        return x
