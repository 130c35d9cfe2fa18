"""Property fine-tuning of the DAO-P encoder (spec §4).

The Crysformer encoder of DAO-P at t = 0, a mean pool over atoms and a new head
Linear(h, h)–SiLU–Linear(h, 1), trained with an L1 loss on the standardised target
(any scalar column of a dataset). :func:`finetune_property` runs it on the project's
training loop (atomic checkpoints, resume, EMA, DDP); :func:`load_property_model`
reads an exported model back; :class:`PropertyEnsemble` averages several (e.g. the
5 cross-validation folds of the Tc model).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dao.data.crystal import CrystalBatch
from dao.models.common import segment_mean

__all__ = [
    "PropertyEnsemble",
    "PropertyModel",
    "export_property_ensemble",
    "finetune_property",
    "load_property_ensemble",
    "load_property_model",
]


class PropertyModel(nn.Module):
    """A scalar property from the DAO-P encoder.

    Args:
        backbone: the Crysformer of a DAO-P (its weights are fine-tuned; its own
            heads are not used).
        target: the property's name (a dataset column).
        mean, std: standardisation of the training targets.
    """

    def __init__(self, backbone: nn.Module, target: str, mean: float, std: float) -> None:
        super().__init__()
        if not hasattr(backbone, "encode"):
            raise ValueError("property fine-tuning needs a Crysformer backbone (DAO-P's)")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.backbone = backbone
        self.target = target
        h = backbone.config.hidden
        self.property_head = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 1))
        self.register_buffer("target_mean", torch.tensor(float(mean), dtype=torch.float64))
        self.register_buffer("target_std", torch.tensor(float(std), dtype=torch.float64))

    def standardized(self, crystals: CrystalBatch) -> Tensor:
        """[B] the head's output (standardised units; differentiable)."""
        dtype = self.property_head[0].weight.dtype
        crystals = crystals.to(device=self.property_head[0].weight.device, dtype=dtype)
        t = torch.zeros(len(crystals), dtype=torch.int64, device=crystals.lattice.device)
        x = self.backbone.encode(
            crystals.atom_types, crystals.frac_coords, crystals.lattice, t, crystals.batch
        )
        pooled = segment_mean(x, crystals.batch, len(crystals))
        return self.property_head(pooled).squeeze(-1)

    def predict(self, crystals: CrystalBatch) -> Tensor:
        """[B] predictions in the target's units (float64)."""
        return self.standardized(crystals).double() * self.target_std + self.target_mean

    def loss(self, batch, generator=None) -> dict[str, Tensor]:  # noqa: ARG002 - loop API
        """L1 between prediction and standardised target (crystals without a value skipped)."""
        y = torch.as_tensor(batch.props[self.target], dtype=torch.float64)
        pred = self.standardized(batch.crystals)
        y = y.to(pred.device)
        known = ~torch.isnan(y)
        target = ((y - self.target_mean) / self.target_std).to(pred.dtype)
        if bool(known.any()):
            loss = F.l1_loss(pred[known], target[known])
        else:
            loss = pred.sum() * 0.0
        return {"loss": loss}

    def forward(self, batch, generator=None) -> dict[str, Tensor]:
        return self.loss(batch, generator)


class PropertyEnsemble(nn.Module):
    """The mean prediction of several :class:`PropertyModel` (same target)."""

    def __init__(self, models: list[PropertyModel]) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        if len({m.target for m in models}) != 1:
            raise ValueError("ensemble members must predict the same target")
        self.members = nn.ModuleList(models)
        self.target = models[0].target

    def predict(self, crystals: CrystalBatch) -> Tensor:
        return torch.stack([m.predict(crystals) for m in self.members]).mean(0)

    def require_log_tc(self) -> None:
        """Raise ValueError unless this ensemble predicts ln(1 + Tc/K) (``log_tc``)."""
        if self.target != "log_tc":
            raise ValueError(f"the property model predicts {self.target!r}, not log_tc")

    def predict_tc(self, crystals: CrystalBatch) -> Tensor:
        """Tc in K of a log-Tc ensemble (target ln(1 + Tc/K), see :mod:`dao.daop.tc`)."""
        self.require_log_tc()
        return torch.expm1(self.predict(crystals))


def finetune_property(
    daop_weights: str | os.PathLike | None,
    train_set,
    val_set,
    target: str,
    out_dir: str | os.PathLike,
    train_cfg: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> PropertyModel:
    """Fine-tune DAO-P's encoder plus a new head on ``target``; returns the EMA model.

    Args:
        daop_weights: DAO-P weights (None: the shipped model).
        train_set, val_set: :class:`dao.data.dataset.CrystalDataset` (or subsets)
            whose ``props`` hold ``target``.
        target: property column.
        out_dir: run folder (checkpoints, log; a second call resumes).
        train_cfg: :class:`dao.train.TrainConfig` fields.
    """
    from dao.data.dataset import collate  # noqa: PLC0415
    from dao.pretrained import load_daop  # noqa: PLC0415
    from dao.train import TrainConfig, Trainer  # noqa: PLC0415

    values = np.asarray(_column(train_set, target), dtype=np.float64)
    known = values[~np.isnan(values)]
    if known.size < 2:
        raise ValueError(f"property {target!r}: {known.size} training values, need >= 2")
    daop, daop_cfg = load_daop(daop_weights)
    backbone = copy.deepcopy(daop.model)
    model = PropertyModel(backbone, target, float(known.mean()), float(known.std()) or 1.0)
    model = model.to(dtype)
    cfg = TrainConfig.from_dict(dict(train_cfg or {}))
    run_config = {
        "model": daop_cfg["model"],
        "property": {
            "target": target,
            "mean": float(known.mean()),
            "std": float(known.std()) or 1.0,
        },
    }
    trainer = Trainer(
        model,
        cfg,
        train_set,
        val_set,
        functools.partial(collate, dtype=dtype),
        Path(out_dir),
        run_config=run_config,
        progress=progress,
    )
    trainer.fit()
    best = trainer.ema.module
    best.eval()
    return best


def _column(dataset, name: str) -> np.ndarray:
    data = getattr(dataset, "data", None)  # a _Subset-like wrapper
    if data is not None and hasattr(dataset, "idx"):
        return np.asarray(data.props[name])[np.asarray(dataset.idx)]
    return np.asarray(dataset.props[name])


def load_property_model(path: str | os.PathLike, device: str = "cpu") -> PropertyModel:
    """A :class:`PropertyModel` from a training checkpoint (EMA weights)."""
    from dao.models import build_model  # noqa: PLC0415
    from dao.train.checkpoint import load_checkpoint  # noqa: PLC0415

    ck = load_checkpoint(path, map_location=device)
    cfg = ck["run_config"]
    prop = cfg.get("property")
    if prop is None:
        raise ValueError(f"{path} is not a property model checkpoint (no [property] config)")
    model = PropertyModel(build_model(cfg["model"]), prop["target"], prop["mean"], prop["std"])
    model.load_state_dict(ck["ema"])
    return model.to(device).eval()


def export_property_ensemble(
    checkpoints, path: str | os.PathLike, storage_dtype: torch.dtype = torch.float16
) -> Path:
    """Write the EMA weights of property checkpoints (e.g. the CV folds) as one
    safetensors file: member k's tensors under ``member<k>.``, configs in the metadata.

    Floating tensors are stored as ``storage_dtype`` (float16: five small models stay
    well under 20 MB) and cast back to float32 on loading; buffers that hold
    statistics (``target_mean`` / ``target_std``) keep float64.
    """
    from dao.train import export_weights  # noqa: PLC0415
    from dao.train.checkpoint import load_checkpoint  # noqa: PLC0415

    state, members = {}, []
    for k, ckpt in enumerate(checkpoints):
        ck = load_checkpoint(ckpt)
        if "property" not in ck["run_config"]:
            raise ValueError(f"{ckpt} is not a property model checkpoint")
        members.append({"model": ck["run_config"]["model"], **ck["run_config"]["property"]})
        for name, v in ck["ema"].items():
            keep = not v.is_floating_point() or name.startswith("target_")
            state[f"member{k}.{name}"] = v if keep else v.to(storage_dtype)
    if not members:
        raise ValueError("no checkpoints given")
    export_weights(state, {"property_ensemble": members}, path)
    return Path(path)


def load_property_ensemble(path: str | os.PathLike, device: str = "cpu") -> PropertyEnsemble:
    """A :class:`PropertyEnsemble` from :func:`export_property_ensemble`'s file, or a
    single property checkpoint (an ensemble of one)."""
    from dao.models import build_model  # noqa: PLC0415
    from dao.train.checkpoint import load_weights  # noqa: PLC0415

    path = Path(path)
    if path.suffix != ".safetensors":
        return PropertyEnsemble([load_property_model(path, device)])
    state, cfg = load_weights(path)
    if "property_ensemble" not in cfg:
        raise ValueError(f"{path} holds no property model (is it a DAO-G or DAO-P file?)")
    models = []
    for k, m in enumerate(cfg["property_ensemble"]):
        model = PropertyModel(build_model(m["model"]), m["target"], m["mean"], m["std"])
        prefix = f"member{k}."
        own = {n[len(prefix) :]: v for n, v in state.items() if n.startswith(prefix)}
        model.load_state_dict(own)  # load_state_dict casts into the float32 parameters
        models.append(model.to(device).eval())
    return PropertyEnsemble(models)
