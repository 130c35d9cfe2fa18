"""Dataset relaxation with DAO-P (spec §4): relax the unstable part of a training set.

Rows whose energy-above-hull label lies in (``low``, ``high``] (0.08 < E_hull <= 0.5
eV/atom by default) are relaxed on DAO-P's energy at t = 0 with L-BFGS (lr 1.0, 5
iterations, coordinates wrapped mod 1: :func:`dao.daop.relax`); every other row is
copied unchanged. The output is a CSV in the same format (same columns, the relaxed
CIF in ``cif``) plus ``dao_relaxed``, ``dao_e_before`` and ``dao_e_after``
(DAO-P's predictions, eV/atom), so DAO-G stage II trains on it with the same data
code. Rows that cannot be parsed or relaxed are copied unchanged and counted.
"""

from __future__ import annotations

import csv
import gzip
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["relax_dataset"]

log = logging.getLogger(__name__)


def _label(row: dict[str, str]) -> float:
    from dao.daop.model import ENERGY_COLUMNS  # noqa: PLC0415

    for name in ENERGY_COLUMNS:
        v = row.get(name)
        if v not in (None, ""):
            try:
                return float(v)
            except ValueError:
                continue
    return math.nan


def relax_dataset(
    daop,
    csv_in: str | os.PathLike,
    csv_out: str | os.PathLike,
    *,
    low: float = 0.08,
    high: float = 0.5,
    steps: int = 5,
    lr: float = 1.0,
    batch_size: int = 256,
    progress: bool = True,
) -> dict:
    """Relax the rows of ``csv_in`` with low < E_hull <= high; write ``csv_out``.

    Returns:
        A report: rows, selected, relaxed, failed, status counts, mean DAO-P energy
        before and after over the relaxed rows, and the mean/max change of the
        lattice (relative) and of the cartesian positions (Å).
    """
    from pymatgen.core import Structure  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415

    from dao.daop.relax import relax  # noqa: PLC0415
    from dao.data.crystal import canonical_batch  # noqa: PLC0415
    from dao.data.csv import read_csv_rows  # noqa: PLC0415

    if not low < high:
        raise ValueError(f"need low < high, got ({low}, {high}]")
    columns, rows = read_csv_rows(csv_in)
    rows = list(rows)
    if "cif" not in columns:
        raise ValueError(f"{csv_in} has no 'cif' column (CDVAE format expected)")
    selected = [k for k, r in enumerate(rows) if low < _label(r) <= high]
    extra = {"dao_relaxed": "0", "dao_e_before": "", "dao_e_after": ""}
    out_rows = [{**r, **extra} for r in rows]
    report = {"rows": len(rows), "selected": len(selected), "relaxed": 0, "failed": 0}
    status_counts: dict[str, int] = {}
    e_before, e_after, dlat, dpos = [], [], [], []
    bar = tqdm(total=len(selected), disable=not progress, desc="relaxing", unit="crystal")
    for b0 in range(0, len(selected), batch_size):
        chunk = selected[b0 : b0 + batch_size]
        parsed, parsed_rows = [], []
        for k in chunk:
            try:
                with warnings.catch_warnings():  # pymatgen's parser chatter
                    warnings.simplefilter("ignore")
                    parsed.append(Structure.from_str(rows[k]["cif"], fmt="cif"))
                parsed_rows.append(k)
            except Exception as exc:  # noqa: BLE001 - a bad row is copied unchanged
                log.warning("row %d (%s) skipped: %s", k, rows[k].get("material_id"), exc)
                report["failed"] += 1
        batch, kept, bad = canonical_batch(parsed)
        for j, why in bad:
            k = parsed_rows[j]
            log.warning("row %d (%s) skipped: %s", k, rows[k].get("material_id"), why)
            report["failed"] += 1
        if batch is None:
            bar.update(len(chunk))
            continue
        ok = [parsed_rows[j] for j in kept]
        starts = batch.to_structures()
        res = relax(daop, batch, steps=steps, lr=lr)
        structures = res.crystals.to_structures()
        for j, k in enumerate(ok):
            st = res.status[j]
            status_counts[st] = status_counts.get(st, 0) + 1
            s_new = structures[j]
            before, after = float(res.energy_initial[j]), float(res.energy_final[j])
            out_rows[k].update(
                cif=s_new.to(fmt="cif"),
                dao_relaxed="1",
                dao_e_before=f"{before:.6f}",
                dao_e_after=f"{after:.6f}",
            )
            e_before.append(before)
            e_after.append(after)
            lat0 = starts[j].lattice
            dlat.append(float(np.abs(s_new.lattice.matrix - lat0.matrix).max() / max(lat0.abc)))
            frac_move = s_new.frac_coords - starts[j].frac_coords
            frac_move -= np.round(frac_move)  # nearest image: wrapping is not a move
            disp = frac_move @ s_new.lattice.matrix
            dpos.append(float(np.linalg.norm(disp, axis=1).max()))
            report["relaxed"] += 1
        bar.update(len(chunk))
    bar.close()
    out = Path(csv_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    opener = gzip.open if out.name.endswith(".gz") else open
    with opener(tmp, "wt", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*columns, *extra])
        w.writeheader()
        w.writerows(out_rows)
    os.replace(tmp, out)  # atomic: a kill never leaves half a dataset
    if e_before:
        report.update(
            mean_e_before=float(np.mean(e_before)),
            mean_e_after=float(np.mean(e_after)),
            lowered=int(np.sum(np.array(e_after) < np.array(e_before))),
            max_rel_lattice_change_mean=float(np.mean(dlat)),
            max_displacement_A_mean=float(np.mean(dpos)),
        )
    report["status"] = status_counts
    return report
