"""Superconducting Tc from structure: the 3DSC data, 5-fold cross-validation of the
fine-tuned DAO-P encoder, and a composition-only baseline (spec §4).

Data: ``../shared/data/3dsc_mp`` (3DSC, Sommer et al., Sci. Data 2023; SuperCon via
Stanev et al., npj Comput. Mater. 2018; CC BY 4.0): Materials Project structures
matched to SuperCon formulas. One label per formula (``formula_sc``): its ordered
(not ``synth_doped``) structure when there is one, else the first doped match.
Non-superconductors have Tc = 0, so the target is y = ln(1 + Tc / K) ("log Tc";
MAE in these units is reported as "log K", and in kelvin after back-transform).

Folds are drawn over formulas (each formula is in exactly one test fold). The
baseline sees only the composition: gradient boosting (scikit-learn's
HistGradientBoostingRegressor, an optional dependency) on the element fractions of
``formula_sc`` — dopant fractions included, which the structure (the parent
compound's MP entry) does not show.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["composition_features", "cross_validate_tc", "load_3dsc", "tc_from_log"]

log = logging.getLogger(__name__)


def tc_from_log(y):
    """Tc in K from the target y = ln(1 + Tc)."""
    return np.expm1(np.asarray(y, dtype=np.float64))


def load_3dsc(
    data_root: str | os.PathLike = "../shared/data",
    *,
    max_atoms: int | None = 60,
    exclude_formulas: tuple[str, ...] = (),
):
    """The 3DSC structures with Tc labels as a :class:`dao.data.dataset.CrystalDataset`.

    ``material_ids`` hold the SuperCon formula; ``props`` hold ``tc`` (K) and
    ``log_tc`` = ln(1 + Tc); ``sources`` the CIF name. Rows without Tc, unreadable
    CIFs and cells above ``max_atoms`` are skipped (counted in the log).
    ``exclude_formulas`` keeps case-study materials out (matched on the reduced
    formula of the structure).
    """
    from pymatgen.core import Composition, Structure  # noqa: PLC0415

    from dao.data.csv import canonicalize  # noqa: PLC0415
    from dao.data.dataset import CrystalDataset  # noqa: PLC0415

    root = Path(data_root) / "3dsc_mp"
    labels = root / "derived_pool_labels.csv.gz"
    tar_path = root / "cifs.tar.gz"
    for p in (labels, tar_path):
        if not p.exists():
            raise FileNotFoundError(f"missing {p}: see ../shared/data/README.md (3dsc_mp)")
    with gzip.open(labels, "rt", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["tc"] not in ("", "nan")]
    chosen: dict[str, dict] = {}
    for r in rows:  # one structure per formula, ordered ones preferred
        cur = chosen.get(r["formula_sc"])
        if cur is None or (cur["synth_doped"] == "True" and r["synth_doped"] == "False"):
            chosen[r["formula_sc"]] = r
    excluded = {Composition(f).reduced_formula for f in exclude_formulas}
    wanted = {"cifs/" + r["cif"]: r for r in chosen.values()}
    types, fracs, lats, nums, ids, tcs, names = [], [], [], [], [], [], []
    skipped = {"unreadable": 0, "too large": 0, "excluded": 0}
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            r = wanted.get(member.name)
            if r is None:
                continue
            try:
                text = tar.extractfile(member).read().decode()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    s = Structure.from_str(text, fmt="cif")
                if s.composition.reduced_formula in excluded:
                    skipped["excluded"] += 1
                    continue
                if max_atoms is not None and len(s) > max_atoms:
                    skipped["too large"] += 1
                    continue
                z, fr, lat = canonicalize(s)
            except Exception as exc:  # noqa: BLE001 - a bad CIF is skipped and counted
                log.info("3DSC %s skipped: %s", member.name, exc)
                skipped["unreadable"] += 1
                continue
            types.append(z)
            fracs.append(fr)
            lats.append(lat)
            nums.append(len(z))
            ids.append(r["formula_sc"])
            tcs.append(float(r["tc"]))
            names.append(r["cif"])
    log.info("3DSC: %d formulas kept, skipped %s", len(ids), skipped)
    tc = np.asarray(tcs)
    return CrystalDataset(
        np.concatenate(types),
        np.concatenate(fracs),
        np.stack(lats),
        np.asarray(nums),
        ids,
        props={"tc": tc, "log_tc": np.log1p(tc)},
        sources=names,
    )


def composition_features(formulas) -> np.ndarray:
    """[n, 103] element fractions (Z = 1..103) of each formula."""
    from pymatgen.core import Composition  # noqa: PLC0415

    out = np.zeros((len(formulas), 103))
    for k, f in enumerate(formulas):
        comp = Composition(f).fractional_composition
        for el, x in comp.items():
            if 1 <= el.Z <= 103:
                out[k, el.Z - 1] = x
    return out


def _fold_ids(n: int, folds: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % folds
    return fold


def _mae(a, b) -> float:
    return float(np.mean(np.abs(np.asarray(a) - np.asarray(b))))


def cross_validate_tc(
    dataset,
    out_dir: str | os.PathLike,
    *,
    daop_weights: str | os.PathLike | None = None,
    folds: int = 5,
    seed: int = 0,
    train_cfg: dict[str, Any] | None = None,
    val_fraction: float = 0.1,
    baseline: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """k-fold CV of the fine-tuned DAO-P encoder on ``log_tc``, and of the baseline.

    Writes ``fold<k>/`` run folders (resumable) and ``report.json`` under ``out_dir``.
    Returns the report: per fold and overall MAE in log K and K for both models,
    with the out-of-fold predictions.
    """
    from dao.daop.property import finetune_property  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    fold = _fold_ids(n, folds, seed)
    y = np.asarray(dataset.props["log_tc"])
    pred_model = np.full(n, math.nan)
    pred_base = np.full(n, math.nan)
    feats = composition_features(dataset.material_ids) if baseline else None
    report: dict[str, Any] = {"n": n, "folds": folds, "seed": seed, "per_fold": []}
    for k in range(folds):
        test_idx = np.flatnonzero(fold == k)
        rest = np.flatnonzero(fold != k)
        rng = np.random.default_rng(seed + 100 + k)
        rest = rng.permutation(rest)
        n_val = max(1, int(round(val_fraction * len(rest))))
        val_idx, train_idx = np.sort(rest[:n_val]), np.sort(rest[n_val:])
        model = finetune_property(
            daop_weights,
            dataset.subset(train_idx),
            dataset.subset(val_idx),
            "log_tc",
            out / f"fold{k}",
            train_cfg,
            progress=progress,
        )
        test = dataset.subset(test_idx)
        with torch.no_grad():
            preds = []
            for b0 in range(0, len(test), 256):
                crystals = test.batch(range(b0, min(len(test), b0 + 256))).crystals
                preds.append(model.predict(crystals).cpu().numpy())
        pred_model[test_idx] = np.concatenate(preds)
        row = {
            "fold": k,
            "n_test": int(len(test_idx)),
            "model_mae_log": _mae(pred_model[test_idx], y[test_idx]),
            "model_mae_K": _mae(tc_from_log(pred_model[test_idx]), tc_from_log(y[test_idx])),
        }
        if baseline:
            from sklearn.ensemble import HistGradientBoostingRegressor  # noqa: PLC0415

            gb = HistGradientBoostingRegressor(random_state=seed)
            gb.fit(feats[rest], y[rest])
            pred_base[test_idx] = gb.predict(feats[test_idx])
            row["baseline_mae_log"] = _mae(pred_base[test_idx], y[test_idx])
            row["baseline_mae_K"] = _mae(tc_from_log(pred_base[test_idx]), tc_from_log(y[test_idx]))
        report["per_fold"].append(row)
        log.info("fold %d: %s", k, row)
    report["model_mae_log"] = _mae(pred_model, y)
    report["model_mae_K"] = _mae(tc_from_log(pred_model), tc_from_log(y))
    if baseline:
        report["baseline_mae_log"] = _mae(pred_base, y)
        report["baseline_mae_K"] = _mae(tc_from_log(pred_base), tc_from_log(y))
    report["predict_mean_baseline_mae_log"] = _mae(np.full(n, y.mean()), y)
    report["out_of_fold"] = {
        "formula": [str(x) for x in dataset.material_ids],
        "log_tc": y.tolist(),
        "model": pred_model.tolist(),
        **({"baseline": pred_base.tolist()} if baseline else {}),
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out / "report.json")
    return report
