"""DAO-P end to end on a small real-data fixture: dao train with a [daop] table,
export, load_daop, predict."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dao.daop import DAOP
from dao.data.dataset import collate, training_pool
from dao.pretrained import build_diffusion, load_daop
from dao.train.run import export_checkpoint, load_run_config, train_from_config

FIXTURES = Path(__file__).parents[1] / "eval" / "fixtures"
pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = {
    "model": "crysformer",
    "num_layers": 1,
    "hidden": 16,
    "heads": 2,
    "num_freqs": 4,
    "time_dim": 8,
    "energy_head": True,
}


def _pool():
    return training_pool(
        FIXTURES,
        exclude_files=["mp_20_pilot_test_slice30.csv.gz"],
        include=["mp_20_pilot_train_first300.csv.gz"],
        max_atoms=12,
        progress=False,
        workers=0,
    )


def test_loss_has_energy_term_and_skips_unlabelled():
    torch.manual_seed(0)
    daop = DAOP(build_diffusion({"model": MODEL, "diffusion": {"timesteps": 10}}), 0.1, 0.2)
    pool = _pool()
    batch = collate([pool[k] for k in range(6)], dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    terms = {k: v.detach() for k, v in daop.loss(batch, g).items()}
    assert set(terms) >= {"loss", "loss_lattice", "loss_coord", "loss_energy"}
    assert math.isclose(
        float(terms["loss"]),
        float(terms["loss_lattice"] + terms["loss_coord"] + terms["loss_energy"]),
        rel_tol=1e-5,
    )
    # exact energy term by hand, with the same noise
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, out, _ = daop.diffusion.loss_terms(batch.crystals, g)
    target = (batch.props["e_above_hull"].double() - 0.1) / 0.2
    expect = torch.mean((torch.exp(-out.energy.double()) - torch.exp(-target)) ** 2)
    assert float(terms["loss_energy"]) == pytest.approx(float(expect), rel=1e-4)
    # no labels at all: the energy term is zero but still part of the graph
    unl = batch._replace(props={})
    t2 = daop.loss(unl, torch.Generator().manual_seed(0))
    assert float(t2["loss_energy"].detach()) == 0.0
    t2["loss"].backward()
    assert daop.model.heads.energy[0].weight.grad is not None


def test_train_export_load_predict(tmp_path):
    cfg = load_run_config(Path(__file__).parents[2] / "configs" / "daop_mp20_small.toml")
    cfg["model"] = MODEL
    cfg["diffusion"] = {"timesteps": 10}
    cfg["data"] = {
        "data_root": str(FIXTURES),
        "include": ["mp_20_pilot_train_first300.csv.gz"],
        "exclude": ["mp_20_pilot_test_slice30.csv.gz"],
        "max_atoms": 12,
        "val_fraction": 0.1,
    }
    cfg["train"].update(epochs=1, batch_size=32, max_minutes=None, warmup_steps=2,
                        ckpt_every_steps=1000, log_every_steps=2)  # fmt: skip
    summary = train_from_config(cfg, tmp_path / "run", progress=False)
    assert summary["step"] > 0
    w = export_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", tmp_path / "p.safetensors")
    daop, meta = load_daop(w)
    labels = _pool().props["e_above_hull"]
    assert meta["daop"]["energy_mean"] == pytest.approx(float(np.nanmean(labels)), abs=0.05)
    pool = _pool()
    e = daop.energy(collate([pool[k] for k in range(4)], dtype=torch.float32).crystals)
    assert e.shape == (4,) and torch.isfinite(e).all()
    log = (tmp_path / "run" / "log.csv").read_text()
    assert "loss_energy" in log.splitlines()[0]


def test_daop_stage_starts_from_daog_weights(tmp_path):
    """dao train --init-from a DAO-G run: the backbone and diffusion heads carry over,
    the energy head starts fresh; a model that does not fit is refused."""
    base = {
        "diffusion": {"timesteps": 10},
        "data": {
            "data_root": str(FIXTURES),
            "include": ["mp_20_pilot_train_first300.csv.gz"],
            "exclude": ["mp_20_pilot_test_slice30.csv.gz"],
            "max_atoms": 12,
            "val_fraction": 0.1,
        },
        "train": {"epochs": 1, "batch_size": 64, "warmup_steps": 1, "log_every_steps": 1},
    }
    daog_model = {k: v for k, v in MODEL.items() if k != "energy_head"}
    train_from_config({**base, "model": daog_model}, tmp_path / "g", progress=False)
    src = torch.load(tmp_path / "g" / "checkpoints" / "last.pt", weights_only=False)["ema"]
    cfg = {**base, "model": MODEL, "daop": {"energy_weight": 1.0}}
    cfg["train"] = {**base["train"], "init_from": str(tmp_path / "g/checkpoints/last.pt"),
                    "lr": 0.0, "min_lr": 0.0}  # fmt: skip
    train_from_config(cfg, tmp_path / "p", progress=False)
    daop, _ = load_daop(tmp_path / "p" / "checkpoints" / "last.pt")
    got = daop.diffusion.state_dict()
    key = "model.layers.0.q_proj.weight"
    torch.testing.assert_close(got[key], src["diffusion." + key])
    bad = {**cfg, "model": {**MODEL, "hidden": 32}}
    with pytest.raises((ValueError, RuntimeError)):
        train_from_config(bad, tmp_path / "bad", progress=False)
