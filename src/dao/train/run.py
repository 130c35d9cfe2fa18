"""``dao train``: a run config (TOML) -> data, model, diffusion -> the training loop.

A run config has four tables, and a fifth for DAO-P::

    [model]      # a model config: model = "crysformer" | "cspnet" and its fields
    [diffusion]  # DAOGDiffusion arguments (timesteps, sigma_begin, ...)
    [data]       # data_root, max_atoms, val_fraction, dtype, include/exclude lists, exclude_ids
    [train]      # TrainConfig fields (epochs, batch_size, lr, ...)
    [daop]       # DAO-P: energy_weight (the model needs energy_head = true); the
                 # label mean / std are computed from the training split

The run folder receives ``config.toml``-equivalent JSON (``run_config.json``),
``log.csv`` and ``checkpoints/``; running the same command again resumes.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dao.train.checkpoint import export_weights, load_checkpoint
from dao.train.trainer import TrainConfig, Trainer

__all__ = ["DiffusionObjective", "load_run_config", "train_from_config", "export_checkpoint"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def load_run_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (or JSON) run config and check its tables."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    if path.suffix == ".json":
        cfg = json.loads(path.read_text())
    else:
        if sys.version_info >= (3, 11):
            import tomllib  # noqa: PLC0415
        else:  # pragma: no cover
            import tomli as tomllib  # noqa: PLC0415
        cfg = tomllib.loads(path.read_text())
    unknown = set(cfg) - {"model", "diffusion", "data", "train", "daop"}
    if unknown:
        raise ValueError(f"{path}: unknown tables {sorted(unknown)}")
    if "model" not in cfg:
        raise ValueError(f"{path}: a [model] table is required")
    return cfg


class DiffusionObjective(nn.Module):
    """Wraps DAOGDiffusion so ``forward(labelled_batch)`` is its loss (what DDP calls)."""

    def __init__(self, diffusion: nn.Module):
        super().__init__()
        self.diffusion = diffusion

    def forward(self, batch, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        crystals = batch.crystals if hasattr(batch, "crystals") else batch
        return self.diffusion.loss(crystals, generator=generator)


def _datasets(data_cfg: dict[str, Any], seed: int):
    from dao.data.dataset import training_pool  # noqa: PLC0415
    from dao.data.paths import data_root  # noqa: PLC0415

    root = data_cfg.get("data_root") or data_root()
    pool = training_pool(
        root,
        exclude_files=data_cfg.get("exclude"),
        exclude_ids=data_cfg.get("exclude_ids", ()),
        include=data_cfg.get("include"),
        max_atoms=data_cfg.get("max_atoms", 20),
        progress=True,
    )
    n = len(pool)
    n_val = int(round(n * float(data_cfg.get("val_fraction", 0.03))))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    return _Subset(pool, train_idx), _Subset(pool, val_idx), pool


class _Subset:
    def __init__(self, data, idx):
        self.data, self.idx = data, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, k):
        return self.data[self.idx[k]]


def _daop_objective(diffusion, daop_cfg: dict[str, Any], pool, train_idx):
    """DAO-P around ``diffusion``, with the energy labels of the training split standardised."""
    import numpy as np  # noqa: PLC0415

    from dao.daop import DAOP, ENERGY_COLUMNS  # noqa: PLC0415

    labels = np.full(len(train_idx), np.nan)
    for name in ENERGY_COLUMNS:
        col = pool.props.get(name)
        if col is not None:
            vals = np.asarray(col, dtype=np.float64)[train_idx]
            labels = np.where(np.isnan(labels), vals, labels)
    known = labels[~np.isnan(labels)]
    if known.size < 2:
        raise ValueError(
            f"DAO-P needs energy labels ({', '.join(ENERGY_COLUMNS)}) in the training data; "
            f"found {known.size}"
        )
    unknown = set(daop_cfg) - {"energy_weight", "energy_mean", "energy_std"}
    if unknown:
        raise ValueError(f"unknown [daop] settings: {sorted(unknown)}")
    print(
        f"DAO-P: {known.size} of {len(train_idx)} training crystals have energy labels "
        f"(mean {known.mean():.4f}, std {known.std():.4f} eV/atom)"
    )
    return DAOP(
        diffusion,
        energy_mean=float(known.mean()),
        energy_std=float(known.std()),
        energy_weight=float(daop_cfg.get("energy_weight", 1.0)),
    )


def train_from_config(
    cfg: dict[str, Any], out_dir: str | os.PathLike, resume: bool = True, progress: bool = True
) -> dict[str, Any]:
    """Build everything the config describes and train; returns the loop's summary."""
    from dao.data.dataset import collate  # noqa: PLC0415
    from dao.pretrained import build_diffusion  # noqa: PLC0415

    tcfg = TrainConfig.from_dict(dict(cfg.get("train", {})))
    data_cfg = cfg.get("data", {})
    dtype = _DTYPES[data_cfg.get("dtype", "float32")]
    torch.manual_seed(tcfg.seed)
    train_set, val_set, pool = _datasets(data_cfg, tcfg.seed)
    diffusion = build_diffusion(cfg).to(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    n_params = sum(p.numel() for p in diffusion.model.parameters() if p.requires_grad)
    print(
        f"training {cfg['model'].get('model')} ({n_params / 1e6:.2f} M parameters) on "
        f"{len(train_set)} crystals ({len(val_set)} validation) -> {out}"
    )
    objective = DiffusionObjective(diffusion)
    if "daop" in cfg:
        objective = _daop_objective(diffusion, cfg["daop"], pool, train_set.idx)
        cfg = {**cfg, "daop": {**cfg["daop"], "energy_mean": float(objective.energy_mean),
                               "energy_std": float(objective.energy_std)}}  # fmt: skip
    trainer = Trainer(
        objective,
        tcfg,
        train_set,
        val_set,
        functools.partial(collate, dtype=dtype),
        out,
        run_config=cfg,
        progress=progress,
    )
    return trainer.fit(resume=resume)


def export_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, use_ema: bool = True):
    """Write a checkpoint's (EMA) diffusion weights as safetensors with its run config."""
    st = load_checkpoint(ckpt)
    weights = st["ema" if use_ema else "model"]
    prefix = "diffusion."
    state = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    meta = dict(st["run_config"])
    if "energy_mean" in weights:  # DAO-P: the label statistics travel in the metadata
        meta["daop"] = {
            **meta.get("daop", {}),
            "energy_mean": float(weights["energy_mean"]),
            "energy_std": float(weights["energy_std"]),
        }
    meta["provenance"] = {
        "step": st["step"],
        "epoch": st["epoch"],
        "elapsed_s": round(st["elapsed"], 1),
        "ema": use_ema,
    }
    export_weights(state, meta, out)
    return Path(out)
