"""Denoiser backbones: Crysformer (DAO-G / DAO-P) and CSPNet (the DiffCSP baseline).

Both take ``(atom_types [N], frac_coords [N, 3], lattice [B, 3, 3], t [B], batch [N],
edges=None)`` and return :class:`ModelOutput` ``(coord [N, 3], lattice [B, 3, 3],
energy [B] or None)``; lattices hold the lattice vectors as rows.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dao.models.common import ModelOutput, fully_connected_edges
from dao.models.config import CrysformerConfig, CSPNetConfig, config_from_dict
from dao.models.crysformer import Crysformer
from dao.models.cspnet import CSPNet

__all__ = [
    "CSPNet",
    "CSPNetConfig",
    "Crysformer",
    "CrysformerConfig",
    "ModelOutput",
    "build_model",
    "config_from_dict",
    "fully_connected_edges",
]


def build_model(
    config: CrysformerConfig | CSPNetConfig | dict[str, Any], atom_features: Tensor | None = None
) -> nn.Module:
    """The model a config (or its ``to_dict()``) describes, freshly initialised.

    To restore a checkpoint: ``m = build_model(ckpt["config"], atom_features=table);
    m.load_state_dict(ckpt["state_dict"])`` (the state dict also holds the table).
    """
    if isinstance(config, dict):
        config = config_from_dict(config)
    if isinstance(config, CrysformerConfig):
        return Crysformer(config, atom_features)
    if isinstance(config, CSPNetConfig):
        return CSPNet(config, atom_features)
    raise TypeError(f"not a model config: {type(config).__name__}")
