"""A stability proxy for generated structures, computed by an independent model.

CHGNet (Deng et al., Nat. Mach. Intell. 2023; its weights ship in its wheel, so it
works offline) relaxes each structure briefly and gives its energy per atom; the
proxy is E(sample) − E(ground truth) after the same short relaxation (eV/atom):
near 0 means as stable as the known structure, large positive values mean an
unfavourable one. CHGNet is an optional dependency (``pip install chgnet``; the
``eval`` extra), never needed at run time by the rest of the package.

Per-structure failures (CHGNet errors, non-finite energies) are recorded and
skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["relaxed_energy_per_atom", "stability_proxy"]

log = logging.getLogger(__name__)


def _chgnet():
    try:
        from chgnet.model import StructOptimizer  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the stability proxy needs CHGNet: pip install chgnet (or the 'eval' extra)"
        ) from exc
    return StructOptimizer()


def relaxed_energy_per_atom(optimizer, structure, steps: int = 50, fmax: float = 0.1) -> float:
    """CHGNet energy per atom (eV) after at most ``steps`` FIRE steps; NaN on failure."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = optimizer.relax(structure, fmax=fmax, steps=steps, verbose=False)
        n = len(res["final_structure"])
        e = float(res["trajectory"].energies[-1]) / n
        return e if math.isfinite(e) else math.nan
    except Exception as exc:  # noqa: BLE001 - one bad structure is logged and skipped
        log.warning("CHGNet failed on %s: %s", structure.composition.reduced_formula, exc)
        return math.nan


def stability_proxy(
    gt_csv: str | os.PathLike,
    runs: dict[str, list[str | os.PathLike]],
    out: str | os.PathLike,
    *,
    subset: int | None = None,
    seed: int = 0,
    sample: int = 0,
    steps: int = 50,
    fmax: float = 0.1,
    optimizer=None,
) -> dict:
    """ΔE = E(sample) − E(ground truth) per test crystal for each run of predictions.

    Args:
        gt_csv: the test CSV; ``subset``/``seed`` as in ``dao evaluate``.
        runs: {label: prediction files (JSONL or CIF folders, as ``dao evaluate``)}.
        out: JSON file for the per-crystal values and the summary.
        sample: which sample of each crystal to score (0: the first).
        optimizer: anything with CHGNet's ``StructOptimizer.relax`` interface
            (default: CHGNet's pretrained model).

    Returns:
        {label: {n, failed, mean, median, frac_within_0.05, ...}, "per_crystal": ...}.
    """
    from dao.data.csv import read_csv_rows  # noqa: PLC0415
    from dao.eval.baseline import parse_cif  # noqa: PLC0415
    from dao.eval.cli import load_predictions, subset_indices  # noqa: PLC0415

    _, rows = read_csv_rows(gt_csv)
    rows = list(rows)
    rows = [rows[i] for i in subset_indices(len(rows), subset, seed)]
    opt = optimizer if optimizer is not None else _chgnet()
    ids = [r["material_id"] for r in rows]
    e_gt = {}
    for r in rows:
        e_gt[r["material_id"]] = relaxed_energy_per_atom(opt, parse_cif(r["cif"]), steps, fmax)
    report: dict = {"steps": steps, "fmax": fmax, "per_crystal": {"gt": e_gt}}
    for label, files in runs.items():
        preds = load_predictions(files, ids)
        deltas, values = [], {}
        for mid in ids:
            samples = preds.get(mid) or []
            s = samples[sample] if len(samples) > sample else None
            if s is None or not math.isfinite(e_gt[mid]):
                values[mid] = math.nan
                continue
            e = relaxed_energy_per_atom(opt, s, steps, fmax)
            values[mid] = e
            if math.isfinite(e):
                deltas.append(e - e_gt[mid])
        d = np.asarray(deltas)
        report["per_crystal"][label] = values
        report[label] = {
            "n": int(d.size),
            "failed_or_missing": len(ids) - int(d.size),
            "mean_dE_eV_per_atom": float(d.mean()) if d.size else math.nan,
            "median_dE_eV_per_atom": float(np.median(d)) if d.size else math.nan,
            "frac_dE_below_0.05": float((d < 0.05).mean()) if d.size else math.nan,
            "frac_dE_below_0.1": float((d < 0.1).mean()) if d.size else math.nan,
        }
    path = Path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, path)
    return report
