"""Tc: the 3DSC loader, composition features and the k-fold cross-validation loop
(tiny untrained DAO-P, 2 folds, on a 40-structure fixture of the real data)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_tiny_daop

from dao.daop.property import PropertyEnsemble, load_property_model
from dao.daop.tc import composition_features, cross_validate_tc, load_3dsc, tc_from_log

FIXTURE_ROOT = Path(__file__).parents[1] / "data" / "fixtures"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_load_3dsc_one_label_per_formula():
    ds = load_3dsc(FIXTURE_ROOT, max_atoms=None)
    ids = list(ds.material_ids)
    assert len(ids) == len(set(ids)) and 30 <= len(ids) <= 40  # the no-Tc row is dropped
    np.testing.assert_allclose(ds.props["log_tc"], np.log1p(ds.props["tc"]))
    np.testing.assert_allclose(tc_from_log(ds.props["log_tc"]), ds.props["tc"])
    small = load_3dsc(FIXTURE_ROOT, max_atoms=8)
    assert len(small) < len(ds) and small.num_atoms.max() <= 8


def test_composition_features():
    f = composition_features(["Nb3Sn", "MgB2"])
    assert f.shape == (2, 103)
    assert f[0, 41 - 1] == pytest.approx(0.75) and f[0, 50 - 1] == pytest.approx(0.25)
    np.testing.assert_allclose(f.sum(1), 1.0)


def test_cross_validation_runs_and_reports(tmp_path):
    weights = write_tiny_daop(tmp_path / "daop.safetensors")
    ds = load_3dsc(FIXTURE_ROOT, max_atoms=16)
    cfg = {"epochs": 2, "batch_size": 8, "lr": 1e-3, "warmup_steps": 1, "log_every_steps": 1}
    rep = cross_validate_tc(ds, tmp_path / "cv", daop_weights=weights, folds=2, train_cfg=cfg,
                            progress=False)  # fmt: skip
    assert len(rep["per_fold"]) == 2
    assert sum(r["n_test"] for r in rep["per_fold"]) == len(ds)
    for key in ("model_mae_log", "model_mae_K", "baseline_mae_log", "baseline_mae_K"):
        assert math.isfinite(rep[key]) and rep[key] >= 0
    oof = np.asarray(rep["out_of_fold"]["model"])
    assert np.isfinite(oof).all()
    # the fold models load back and ensemble
    models = [
        load_property_model(tmp_path / "cv" / f"fold{k}" / "checkpoints" / "last.pt")
        for k in range(2)
    ]
    ens = PropertyEnsemble(models)
    crystals = ds.batch(range(3)).crystals
    with torch.no_grad():
        mean = ens.predict(crystals)
        torch.testing.assert_close(
            mean, (models[0].predict(crystals) + models[1].predict(crystals)) / 2
        )
    assert (tmp_path / "cv" / "report.json").exists()
    # the exported ensemble (float16 storage) predicts what the checkpoints predict
    from dao.daop.property import export_property_ensemble, load_property_ensemble

    ckpts = [tmp_path / "cv" / f"fold{k}" / "checkpoints" / "last.pt" for k in range(2)]
    path = export_property_ensemble(ckpts, tmp_path / "ens.safetensors")
    loaded = load_property_ensemble(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(crystals), mean, atol=2e-2, rtol=1e-2)


def test_tc_cv_command_and_predict_property(tmp_path):
    from dao.cli import main

    weights = write_tiny_daop(tmp_path / "daop.safetensors")
    out = tmp_path / "cv"
    rc = main(["tc-cv", "--data-root", str(FIXTURE_ROOT), "--daop-weights", str(weights),
               "--folds", "2", "--epochs", "1", "--batch-size", "8", "--max-atoms", "12",
               "-o", str(out), "-q"])  # fmt: skip
    assert rc == 0 and (out / "tc_ensemble.safetensors").exists()
    ds = load_3dsc(FIXTURE_ROOT, max_atoms=12)
    s = ds.batch([0]).crystals.to_structures()[0]
    cif = tmp_path / "x.cif"
    s.to(filename=str(cif))
    table = tmp_path / "tc.csv"
    rc = main(["predict", str(cif), "--property", "tc", "--property-weights",
               str(out / "tc_ensemble.safetensors"), "-o", str(table)])  # fmt: skip
    assert rc == 0
    text = table.read_text()
    assert "tc_pred_K" in text.splitlines()[0]
    assert float(text.splitlines()[1].split(",")[-1]) >= -1.0  # expm1 of a log value
