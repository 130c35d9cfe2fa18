"""``dao predict`` and ``dao relax``: DAO-P on structure files.

Inputs: any file pymatgen reads (CIF, POSCAR, ...), or a CSV with a ``cif`` column
(the CDVAE format; ``material_id`` names the rows when present). Every structure is
Niggli-reduced and put in the canonical orientation, as the training data was.
Unreadable inputs are reported and skipped, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import warnings
from pathlib import Path

import torch

from dao._progress import show_progress
from dao.data.crystal import canonical_batch

__all__ = ["add_daop_parsers", "read_structures"]

log = logging.getLogger(__name__)


def read_structures(paths) -> tuple[list[str], list, list[tuple[str, str]]]:
    """(names, pymatgen Structures, failures [(name, reason)]) from files and CSVs.

    pymatgen's parser warnings (rounded coordinates and the like) are silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_structures(paths)


def _read_structures(paths):
    from pymatgen.core import Structure  # noqa: PLC0415

    from dao.data.csv import read_csv_rows  # noqa: PLC0415

    names, structures, failures = [], [], []
    for p in map(Path, paths):
        if not p.exists():
            failures.append((str(p), "no such file"))
            continue
        if p.name.endswith((".csv", ".csv.gz")):
            columns, rows = read_csv_rows(p)
            if "cif" not in columns:
                failures.append((str(p), "CSV without a 'cif' column"))
                continue
            for k, row in enumerate(rows):
                name = row.get("material_id") or f"{p.name}:{k}"
                try:
                    structures.append(Structure.from_str(row["cif"], fmt="cif"))
                    names.append(name)
                except Exception as exc:  # noqa: BLE001 - one bad row is skipped
                    failures.append((name, f"unreadable CIF: {exc}"))
            continue
        try:
            structures.append(Structure.from_file(p))
            names.append(str(p))
        except Exception as exc:  # noqa: BLE001 - one bad file is skipped
            failures.append((str(p), f"pymatgen cannot read it: {exc}"))
    return names, structures, failures


def _write_table(rows: list[dict], out: str | None) -> None:
    if out is None:
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["name"])
        w.writeheader()
        w.writerows(rows)
        return
    path = Path(out)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name"])
        w.writeheader()
        w.writerows(rows)
        path.write_text(buf.getvalue())
    print(f"wrote {len(rows)} rows to {path}", file=sys.stderr)


def _property_predictor(args):
    """(column name, fn(batch) -> [B] values, extra column fn) for ``--property``."""
    from dao.daop.property import load_property_ensemble  # noqa: PLC0415
    from dao.pretrained import default_tc_weights_path, load_daop  # noqa: PLC0415

    if args.property is None:
        daop, _ = load_daop(args.weights, args.device)
        return "e_above_hull_pred_eV_per_atom", daop.energy
    path = args.property_weights
    if path is None:
        if args.property not in ("tc", "log_tc"):
            raise SystemExit(
                f"dao predict: no shipped model for property {args.property!r}: "
                "pass --property-weights (a fine-tuned model)"
            )
        path = default_tc_weights_path()
    ens = load_property_ensemble(path, args.device)
    if args.property in ("tc", "log_tc") and ens.target == "log_tc":
        return "tc_pred_K", ens.predict_tc
    if ens.target != args.property:
        raise SystemExit(f"dao predict: the model predicts {ens.target!r}, not {args.property!r}")
    return f"{ens.target}_pred", ens.predict


def _cmd_predict(args) -> int:
    column, predict = _property_predictor(args)
    names, structures, failures = read_structures(args.files)
    rows = []
    for start in range(0, len(structures), args.batch_size):
        chunk = structures[start : start + args.batch_size]
        batch, kept, bad = canonical_batch(chunk, args.max_atoms)
        failures += [(names[start + k], why) for k, why in bad]
        if batch is None:
            continue
        with torch.no_grad():
            values = predict(batch).tolist()
        for k, e in zip(kept, values, strict=True):
            s = chunk[k]
            rows.append(
                {
                    "name": names[start + k],
                    "formula": s.composition.reduced_formula,
                    "atoms": len(s),
                    column: round(float(e), 5),
                }
            )
    for name, why in failures:
        print(f"skipped {name}: {why}", file=sys.stderr)
    _write_table(rows, args.out)
    return 0 if rows or not failures else 1


def _cmd_relax(args) -> int:
    from dao.daop.relax import relax  # noqa: PLC0415
    from dao.pretrained import load_daop  # noqa: PLC0415

    daop, _ = load_daop(args.weights, args.device)
    names, structures, failures = read_structures(args.files)
    batch, kept, bad = canonical_batch(structures, args.max_atoms)
    failures += [(names[k], why) for k, why in bad]
    for name, why in failures:
        print(f"skipped {name}: {why}", file=sys.stderr)
    if batch is None:
        print("nothing to relax", file=sys.stderr)
        return 1
    res = relax(daop, batch, steps=args.steps, lr=args.lr, keep_trajectory=args.trajectory)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    relaxed = res.crystals.to_structures()
    rows = []
    for k, idx in enumerate(kept):
        stem = f"{k:04d}_{relaxed[k].composition.reduced_formula}"
        relaxed[k].to(filename=str(out / f"{stem}_relaxed.cif"))
        if args.trajectory:
            frames = [t.to_structures()[k] for t in res.trajectory]
            with (out / f"{stem}_trajectory.xyz").open("w") as f:
                for i, s in enumerate(frames):
                    f.write(f"{len(s)}\nstep {i}\n")
                    for site in s:
                        x, y, z = site.coords
                        f.write(f"{site.specie.symbol} {x:.6f} {y:.6f} {z:.6f}\n")
        rows.append(
            {
                "name": names[idx],
                "file": f"{stem}_relaxed.cif",
                "e_initial": round(float(res.energy_initial[k]), 5),
                "e_final": round(float(res.energy_final[k]), 5),
                "iterations": int(res.iterations[k]),
                "status": res.status[k],
            }
        )
    _write_table(rows, str(out / "relax.csv"))
    return 0


def _cmd_relax_dataset(args) -> int:
    from dao.daop.dataset_relax import relax_dataset  # noqa: PLC0415
    from dao.pretrained import load_daop  # noqa: PLC0415

    daop, _ = load_daop(args.weights, args.device)
    report = relax_dataset(
        daop,
        args.csv,
        args.out,
        low=args.low,
        high=args.high,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        progress=show_progress(not args.quiet),
    )
    print(json.dumps(report, indent=1))
    return 0


def energy_mae(daop, csv_path, *, batch_size: int = 256, max_atoms: int | None = None) -> dict:
    """Zero-shot energy-above-hull MAE of DAO-P (t = 0) on a labelled CSV, next to the
    MAE of predicting DAO-P's training mean for every crystal."""
    from dao.daop.model import ENERGY_COLUMNS  # noqa: PLC0415
    from dao.data.csv import read_csv_rows  # noqa: PLC0415

    _, rows = read_csv_rows(csv_path)
    rows = list(rows)
    names, structures, failures = read_structures([csv_path])
    labels = {}
    for r in rows:
        for col in ENERGY_COLUMNS:
            if r.get(col) not in (None, ""):
                labels[r.get("material_id")] = float(r[col])
                break
    preds, truth = [], []
    for start in range(0, len(structures), batch_size):
        chunk = structures[start : start + batch_size]
        batch, kept, bad = canonical_batch(chunk, max_atoms)
        failures += [(names[start + k], why) for k, why in bad]
        if batch is None:
            continue
        with torch.no_grad():
            e = daop.energy(batch).tolist()
        for k, v in zip(kept, e, strict=True):
            y = labels.get(names[start + k])
            if y is not None:
                preds.append(v)
                truth.append(y)
    if not truth:
        raise ValueError(f"{csv_path}: no labelled structure could be predicted")
    import numpy as np  # noqa: PLC0415

    p, y = np.asarray(preds), np.asarray(truth)
    return {
        "csv": str(csv_path),
        "n": int(len(y)),
        "skipped": len(failures),
        "mae_eV_per_atom": float(np.abs(p - y).mean()),
        "mae_predict_training_mean": float(np.abs(float(daop.energy_mean) - y).mean()),
        "label_mean": float(y.mean()),
    }


def _cmd_energy_mae(args) -> int:
    from dao.pretrained import load_daop  # noqa: PLC0415

    daop, _ = load_daop(args.weights, args.device)
    print(json.dumps(energy_mae(daop, args.csv, max_atoms=args.max_atoms), indent=1))
    return 0


def _cmd_tc_cv(args) -> int:
    from dao.daop.property import export_property_ensemble  # noqa: PLC0415
    from dao.daop.tc import cross_validate_tc, load_3dsc  # noqa: PLC0415
    from dao.data.paths import data_root  # noqa: PLC0415

    root = args.data_root or data_root()
    ds = load_3dsc(root, max_atoms=args.max_atoms, exclude_formulas=args.exclude)
    print(f"3DSC: {len(ds)} formulas with a structure of <= {args.max_atoms} atoms")
    cfg = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": 50,
        "max_minutes": args.max_minutes_per_fold,
        "seed": args.seed,
    }
    rep = cross_validate_tc(
        ds,
        args.out,
        daop_weights=args.daop_weights,
        folds=args.folds,
        seed=args.seed,
        train_cfg=cfg,
        progress=show_progress(not args.quiet),
    )
    out = Path(args.out)
    ens = export_property_ensemble(
        [out / f"fold{k}" / "checkpoints" / "last.pt" for k in range(args.folds)],
        out / "tc_ensemble.safetensors",
    )
    summary = {k: v for k, v in rep.items() if k not in ("out_of_fold",)}
    print(json.dumps(summary, indent=1))
    print(f"fold ensemble: {ens}")
    return 0


def add_daop_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="energy above hull of structures with DAO-P",
        description="Predict the energy above hull (eV/atom) of every structure with DAO-P.",
    )
    p.add_argument("files", nargs="+", help="CIF/POSCAR/... files or CSVs with a 'cif' column")
    p.add_argument("--weights", default=None, help="DAO-P weights (default: shipped model)")
    p.add_argument(
        "--property",
        default=None,
        help="predict this property with a fine-tuned model instead of the energy "
        "('tc': the shipped Tc ensemble, in K)",
    )
    p.add_argument(
        "--property-weights", default=None, help="fine-tuned property model (file or checkpoint)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-atoms", type=int, default=None, help="skip larger cells")
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--out", default=None, help="CSV or .json file (default: stdout)")
    p.set_defaults(func=_cmd_predict)

    p = subparsers.add_parser(
        "relax",
        help="relax structures on DAO-P's energy (L-BFGS over coordinates and lattice)",
    )
    p.add_argument("files", nargs="+", help="CIF/POSCAR/... files or CSVs with a 'cif' column")
    p.add_argument("--weights", default=None, help="DAO-P weights (default: shipped model)")
    p.add_argument("--steps", type=int, default=5, help="L-BFGS iterations (spec: 5)")
    p.add_argument("--lr", type=float, default=1.0, help="L-BFGS step scale (spec: 1.0)")
    p.add_argument("--max-atoms", type=int, default=None, help="skip larger cells")
    p.add_argument("--trajectory", action="store_true", help="also write an .xyz trajectory")
    p.add_argument("--device", default="cpu")
    p.add_argument("-o", "--out", default="dao_relaxed", help="output folder")
    p.set_defaults(func=_cmd_relax)

    p = subparsers.add_parser(
        "relax-dataset",
        help="relax the unstable rows of a training CSV with DAO-P (dataset relaxation)",
        description="Relax rows with LOW < energy above hull <= HIGH on DAO-P's energy and "
        "write the dataset again (same format; other rows unchanged).",
    )
    p.add_argument("csv", help="CDVAE-format CSV (plain or .gz) with energy-above-hull labels")
    p.add_argument("out", help="output CSV (.csv or .csv.gz)")
    p.add_argument("--weights", default=None, help="DAO-P weights (default: shipped model)")
    p.add_argument("--low", type=float, default=0.08, help="eV/atom (exclusive)")
    p.add_argument("--high", type=float, default=0.5, help="eV/atom (inclusive)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_relax_dataset)

    p = subparsers.add_parser(
        "energy-mae",
        help="zero-shot energy-above-hull MAE of DAO-P on a labelled CSV",
    )
    p.add_argument("csv", help="CDVAE-format CSV with e_above_hull / energy_above_hull")
    p.add_argument("--weights", default=None, help="DAO-P weights (default: shipped model)")
    p.add_argument("--max-atoms", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_energy_mae)

    p = subparsers.add_parser(
        "tc-cv",
        help="fine-tune DAO-P for Tc on 3DSC with k-fold cross-validation (and the baseline)",
    )
    p.add_argument("--data-root", default=None, help="data folder (default: dao.data.paths)")
    p.add_argument("--daop-weights", default=None, help="DAO-P to start from (default: shipped)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-atoms", type=int, default=60)
    p.add_argument("--max-minutes-per-fold", type=float, default=None)
    p.add_argument("--exclude", nargs="*", default=[], help="formulas kept out (case studies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", default="runs/tc_cv")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_tc_cv)
