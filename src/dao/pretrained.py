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

__all__ = [
    "build_diffusion",
    "default_daop_weights_path",
    "default_tc_weights_path",
    "default_weights_path",
    "load_daog",
    "load_daop",
]

DEFAULT_WEIGHTS = "daog_mp20_small.safetensors"
DEFAULT_DAOP_WEIGHTS = "daop_mp20_small.safetensors"
DEFAULT_TC_WEIGHTS = "tc_3dsc_ensemble.safetensors"


def build_diffusion(run_cfg: dict[str, Any]) -> torch.nn.Module:
    """DAO-G diffusion (untrained) from a run config."""
    from dao.diffusion import DAOGDiffusion  # noqa: PLC0415
    from dao.models import build_model  # noqa: PLC0415

    return DAOGDiffusion(build_model(run_cfg["model"]), **run_cfg.get("diffusion", {}))


def default_weights_path() -> Path:
    """Path of the DAO-G weights shipped in the package (``dao/weights/``)."""
    return Path(str(resources.files("dao") / "weights" / DEFAULT_WEIGHTS))


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state with keys relative to the diffusion module, run config) of a weights file
    or a training checkpoint (its EMA weights). DAO-P's label statistics, stored as
    ``energy_mean`` / ``energy_std`` next to the diffusion, move to ``config["daop"]``."""
    from dao.train.checkpoint import load_checkpoint, load_weights  # noqa: PLC0415

    if path.suffix == ".safetensors":
        state, cfg = load_weights(path)
    else:  # a training checkpoint: use its EMA weights
        ck = load_checkpoint(path)
        cfg = dict(ck["run_config"])
        prefix = "diffusion."  # the training objective wraps the diffusion module
        ema = ck["ema"]
        state = {k.removeprefix(prefix): v for k, v in ema.items() if k.startswith(prefix)}
        if "energy_mean" in ema:
            cfg["daop"] = {
                **cfg.get("daop", {}),
                "energy_mean": float(ema["energy_mean"]),
                "energy_std": float(ema["energy_std"]),
            }
    return state, cfg


def _load_diffusion(path, device, what: str, default: Path):
    path = Path(path) if path is not None else default
    if not path.is_file():
        raise FileNotFoundError(
            f"no {what} weights at {path}"
            + (
                ": the package was installed without its default weights; reinstall dao-csp"
                if path == default
                else ""
            )
        )
    state, cfg = _read_weights(path)
    diff = build_diffusion(cfg)
    missing, unexpected = diff.load_state_dict(state, strict=False)
    # Buffers derived from the config (schedules, lambda tables) may be absent.
    bad = [k for k in missing if k.startswith("model.")] + list(unexpected)
    if bad:
        raise ValueError(f"weights in {path} do not fit the config: {bad[:5]}")
    return diff.to(device).eval(), cfg


def load_daog(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """DAO-G diffusion with trained weights (the shipped default when ``path`` is None).

    Returns:
        (diffusion module in eval mode, run config dict).
    """
    return _load_diffusion(path, device, "DAO-G", default_weights_path())


def default_daop_weights_path() -> Path:
    """Path of the DAO-P weights shipped in the package (``dao/weights/``)."""
    return Path(str(resources.files("dao") / "weights" / DEFAULT_DAOP_WEIGHTS))


def default_tc_weights_path() -> Path:
    """Path of the Tc fold ensemble shipped in the package (``dao/weights/``)."""
    path = Path(str(resources.files("dao") / "weights" / DEFAULT_TC_WEIGHTS))
    if not path.is_file():
        raise FileNotFoundError(
            f"no shipped Tc model at {path}: train one with `dao tc-cv` and pass "
            "--property-weights <out>/tc_ensemble.safetensors"
        )
    return path


def load_daop(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """DAO-P with trained weights (the shipped default when ``path`` is None).

    Returns:
        (:class:`dao.daop.DAOP` in eval mode, run config dict).
    """
    from dao.daop import DAOP  # noqa: PLC0415

    diff, cfg = _load_diffusion(path, device, "DAO-P", default_daop_weights_path())
    stats = cfg.get("daop", {})
    if "energy_mean" not in stats:
        raise ValueError(
            f"{path} holds no DAO-P label statistics (energy_mean / energy_std): "
            "is it a DAO-G file? Train DAO-P with a config that has a [daop] table"
        )
    daop = DAOP(
        diff,
        energy_mean=stats["energy_mean"],
        energy_std=stats["energy_std"],
        energy_weight=stats.get("energy_weight", 1.0),
    )
    return daop.to(device).eval(), cfg
