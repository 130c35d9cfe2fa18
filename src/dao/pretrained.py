"""Build models from run configs and load the weights shipped with the package.

A run config is a dict with ``model`` (a model config as written by
``CrysformerConfig.to_dict()`` / ``CSPNetConfig.to_dict()``: ``"model"`` names the
backbone) and ``diffusion`` (keyword arguments of
:class:`dao.diffusion.DAOGDiffusion`). Weights files are
safetensors with the config in their metadata (:func:`dao.train.export_weights`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = ["build_diffusion", "default_weights_path", "load_daog"]

DEFAULT_WEIGHTS = "daog_mp20_small.safetensors"


def build_diffusion(run_cfg: dict[str, Any]) -> torch.nn.Module:
    """DAO-G diffusion (untrained) from a run config."""
    from dao.diffusion import DAOGDiffusion  # noqa: PLC0415
    from dao.models import build_model  # noqa: PLC0415

    return DAOGDiffusion(build_model(run_cfg["model"]), **run_cfg.get("diffusion", {}))


def default_weights_path() -> Path:
    """Path of the DAO-G weights shipped in the package (``dao/weights/``)."""
    return Path(str(resources.files("dao") / "weights" / DEFAULT_WEIGHTS))


def load_daog(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """DAO-G diffusion with trained weights (the shipped default when ``path`` is None).

    Returns:
        (diffusion module in eval mode, run config dict).
    """
    from dao.train.checkpoint import load_checkpoint, load_weights  # noqa: PLC0415

    path = Path(path) if path is not None else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"no DAO-G weights at {path}"
            + (
                ": the package was installed without its default weights; reinstall dao-csp"
                if path == default_weights_path()
                else ""
            )
        )
    if path.suffix == ".safetensors":
        state, cfg = load_weights(path)
    else:  # a training checkpoint: use its EMA weights
        ck = load_checkpoint(path)
        cfg = ck["run_config"]
        prefix = "diffusion."  # the training objective wraps the diffusion module
        state = {k.removeprefix(prefix): v for k, v in ck["ema"].items()}
    diff = build_diffusion(cfg)
    missing, unexpected = diff.load_state_dict(state, strict=False)
    # Buffers derived from the config (schedules, lambda tables) may be absent.
    bad = [k for k in missing if k.startswith("model.")] + list(unexpected)
    if bad:
        raise ValueError(f"weights in {path} do not fit the config: {bad[:5]}")
    return diff.to(device).eval(), cfg
