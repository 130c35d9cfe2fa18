"""Model configurations: plain dataclasses that a checkpoint stores as a dict.

``config.to_dict()`` records the model name next to every field, so
``build_model(d)`` (in :mod:`dao.models`) or ``<Config>.from_dict(d)`` rebuilds
exactly the module the weights belong to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["CSPNetConfig", "CrysformerConfig", "config_from_dict"]


class _ConfigMixin:
    model_name: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        """All fields plus ``"model"`` (the model name), JSON-serialisable."""
        return {"model": self.model_name, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of :meth:`to_dict`; unknown keys or another model name raise ValueError."""
        d = dict(d)
        name = d.pop("model", cls.model_name)
        if name != cls.model_name:
            raise ValueError(f"config is for model {name!r}, not {cls.model_name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**d)


def _check_common(cfg) -> None:
    if not isinstance(cfg.num_layers, int) or cfg.num_layers < 0:
        raise ValueError(f"num_layers must be a non-negative integer, got {cfg.num_layers!r}")
    for name in ("hidden", "num_freqs", "time_dim", "atom_feature_dim"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cfg.time_dim % 2 or cfg.time_dim < 4:
        raise ValueError(f"time_dim must be even and >= 4, got {cfg.time_dim}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {cfg.dropout}")


@dataclass(frozen=True)
class CrysformerConfig(_ConfigMixin):
    """Crysformer sizes; the defaults are the paper configuration (≈ 25.2 M parameters).

    Attributes:
        num_layers: transformer layers.
        hidden: node feature width (divisible by ``heads``).
        heads: attention heads.
        num_freqs: Fourier frequencies K per axis; edge features are 6K + 9 wide.
        time_dim: width of the sinusoidal time embedding (even).
        ffn_mult: feed-forward expansion factor.
        energy_head: add the energy head (DAO-P).
        coord_head: add the per-atom coordinate head.
        lattice_head: add the lattice head (output M·L).
        dropout: dropout on the attention and feed-forward outputs.
        atom_feature_dim: width of the frozen atom-feature table (CGCNN: 92).
    """

    model_name: ClassVar[str] = "crysformer"

    num_layers: int = 12
    hidden: int = 384
    heads: int = 8
    num_freqs: int = 128
    time_dim: int = 256
    ffn_mult: int = 4
    energy_head: bool = False
    coord_head: bool = True
    lattice_head: bool = True
    dropout: float = 0.0
    atom_feature_dim: int = 92

    def __post_init__(self) -> None:
        _check_common(self)
        if not isinstance(self.heads, int) or self.heads < 1 or self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if not isinstance(self.ffn_mult, int) or self.ffn_mult < 1:
            raise ValueError(f"ffn_mult must be a positive integer, got {self.ffn_mult!r}")

    @property
    def edge_dim(self) -> int:
        """Width of the raw edge features [φ(Δf), L·Lᵀ]: 6K + 9."""
        return 6 * self.num_freqs + 9


@dataclass(frozen=True)
class CSPNetConfig(_ConfigMixin):
    """CSPNet (the DiffCSP denoiser) sizes; defaults give the paper baseline (≈ 12.3 M).

    Attributes:
        num_layers: message-passing layers.
        hidden: node and edge feature width.
        num_freqs: Fourier frequencies K per axis.
        time_dim: width of the sinusoidal time embedding (even).
        atom_encoding: ``"embedding"`` (a learned table over elements 1..num_atom_types,
            as DiffCSP) or ``"cgcnn"`` (frozen CGCNN features → Linear, as Crysformer).
        num_atom_types: rows of the learned element table (``"embedding"`` only).
        layer_norm: pre-LayerNorm in every layer and a final LayerNorm (DiffCSP's ``ln``).
        energy_head: add an energy head (mean-pool, Linear–SiLU–Linear).
        coord_head: add the per-atom coordinate head.
        lattice_head: add the lattice head (output M·L).
        dropout: dropout on each layer's node update.
        atom_feature_dim: width of the frozen atom-feature table (``"cgcnn"`` only).
    """

    model_name: ClassVar[str] = "cspnet"

    num_layers: int = 6
    hidden: int = 512
    num_freqs: int = 128
    time_dim: int = 256
    atom_encoding: str = "embedding"
    num_atom_types: int = 100
    layer_norm: bool = True
    energy_head: bool = False
    coord_head: bool = True
    lattice_head: bool = True
    dropout: float = 0.0
    atom_feature_dim: int = 92

    def __post_init__(self) -> None:
        _check_common(self)
        if self.atom_encoding not in ("embedding", "cgcnn"):
            raise ValueError(
                f"atom_encoding must be 'embedding' or 'cgcnn', got {self.atom_encoding!r}"
            )
        if not isinstance(self.num_atom_types, int) or self.num_atom_types < 1:
            raise ValueError(f"num_atom_types must be positive, got {self.num_atom_types!r}")

    @property
    def edge_dim(self) -> int:
        """Width of the first edge-MLP input [h_i, h_j, L·Lᵀ, φ(Δf)]: 2h + 9 + 6K."""
        return 2 * self.hidden + 9 + 6 * self.num_freqs


_CONFIGS = {c.model_name: c for c in (CrysformerConfig, CSPNetConfig)}


def config_from_dict(d: dict[str, Any]) -> CrysformerConfig | CSPNetConfig:
    """Rebuild whichever config ``d`` (from ``to_dict``) describes."""
    name = d.get("model")
    if name not in _CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(_CONFIGS)}")
    return _CONFIGS[name].from_dict(d)
