"""``dao evaluate``: CSP match rate / RMSE of predictions against a ground-truth CSV.

Predictions (``--predictions``, repeatable) come in either of two forms:

* a **directory of CIFs** named ``<material_id>__<k>.cif``, k = 0, 1, ... the sample
  index (e.g. ``mp-1234__0.cif``);
* a **JSONL file**, one prediction per line: ``{"material_id": "mp-1234",
  "sample": 0, "cif": "..."}`` or, instead of ``"cif"``, the arrays
  ``"lattice"`` ([3, 3], rows are the lattice vectors, Å), ``"frac_coords"``
  ([N, 3]) and ``"atom_types"`` ([N] atomic numbers or symbols). ``"sample"`` is
  optional (default: order of appearance per material_id).

``--baseline`` evaluates the template baseline (:mod:`dao.eval.baseline`) instead.
Unless ``--no-compare-baseline``, the baseline is also evaluated on the same test
ids and printed beside the predictions, as the spec asks ("the floor to beat");
its records go to ``<out stem>.baseline.jsonl``, so reruns reuse them.

Results stream to ``--out`` (JSONL, one line per test crystal; a rerun with the
same file resumes, so use a new file for new predictions) and the summary goes to
``--summary`` (default ``<out without .jsonl>.summary.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from dao._progress import show_progress

__all__ = ["add_compare_parser", "add_evaluate_parser", "run_evaluate", "load_predictions"]

_CIF_NAME = re.compile(r"^(?P<mid>.+)__(?P<k>\d+)\.cif$")


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on an ``argparse`` subparsers object; returns its parser."""
    p = subparsers.add_parser(
        "evaluate",
        help="CSP match rate and RMSE against a ground-truth CSV (spec §6)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("gt_csv", type=Path, help="ground truth, CDVAE-format CSV(.gz)")
    p.add_argument(
        "--predictions",
        type=Path,
        action="append",
        default=[],
        help="directory of <material_id>__<k>.cif files or a JSONL file (repeatable)",
    )
    p.add_argument("--baseline", action="store_true", help="evaluate the template baseline")
    p.add_argument(
        "--no-compare-baseline",
        dest="compare_baseline",
        action="store_false",
        help="do not evaluate the baseline beside the predictions",
    )
    p.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        default=None,
        help="baseline training CSVs (default: the MP files of --data-root)",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="shared data folder (default: two levels above gt_csv)",
    )
    p.add_argument("--num-samples", type=int, default=1, help="samples k per test crystal")
    p.add_argument("--subset", type=int, default=None, help="evaluate N random test crystals")
    p.add_argument("--seed", type=int, default=0, help="seed of --subset")
    p.add_argument("--workers", type=int, default=2, help="matching processes")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per match, hard")
    p.add_argument("--out", type=Path, required=True, help="results JSONL (resumable)")
    p.add_argument("--summary", type=Path, default=None, help="summary JSON path")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run_evaluate)
    return p


# ---------------------------------------------------------------------------- loading
def _structure_from_arrays(rec: dict):
    from pymatgen.core import Lattice, Structure  # noqa: PLC0415

    return Structure(Lattice(rec["lattice"]), list(rec["atom_types"]), rec["frac_coords"])


def load_predictions(paths, ids=None) -> dict[str, list]:
    """{material_id: [Structure or None per sample]} from CIF folders and JSONL files.

    Unreadable predictions become None (a missing sample) and are logged.
    """
    from dao.eval.baseline import parse_cif  # noqa: PLC0415

    log = logging.getLogger(__name__)
    wanted = None if ids is None else set(ids)
    by_id: dict[str, dict[int, object]] = defaultdict(dict)

    def put(mid: str, k: int | None, make) -> None:
        if wanted is not None and mid not in wanted:
            return
        slot = by_id[mid]
        k = len(slot) if k is None else int(k)
        try:
            slot[k] = make()
        except Exception as exc:  # noqa: BLE001 - a bad prediction is a missing sample
            log.warning("unreadable prediction %s sample %s: %s", mid, k, exc)
            slot[k] = None

    for path in paths:
        path = Path(path)
        if path.is_dir():
            for f in sorted(path.iterdir()):
                m = _CIF_NAME.match(f.name)
                if m:
                    put(m["mid"], int(m["k"]), lambda f=f: parse_cif(f.read_text()))
        elif path.suffix == ".jsonl":
            with path.open() as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    make = (
                        (lambda rec=rec: parse_cif(rec["cif"]))
                        if "cif" in rec
                        else (lambda rec=rec: _structure_from_arrays(rec))
                    )
                    put(str(rec["material_id"]), rec.get("sample"), make)
        else:
            raise ValueError(f"{path}: expected a folder of CIFs or a .jsonl file")
    out = {}
    for mid, slot in by_id.items():
        n = max(slot) + 1
        out[mid] = [slot.get(k) for k in range(n)]
    return out


def subset_indices(n_rows: int, subset: int | None, seed: int) -> list[int]:
    """Sorted row indices of the fixed random test subset (all rows if ``subset`` is None).

    The one rule for "--subset N --seed S", shared by evaluation and sampling.
    """
    if subset is None or subset >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), subset))


def _read_ground_truth(args) -> tuple[list[tuple[str, object]], list[str]]:
    """(selected (id, Structure) pairs, every id of the file)."""
    from dao.eval.baseline import parse_cif, read_csv_rows  # noqa: PLC0415

    rows = [(r["material_id"], r["cif"]) for r in read_csv_rows(args.gt_csv)]
    all_ids = [m for m, _ in rows]
    rows = [rows[i] for i in subset_indices(len(rows), args.subset, args.seed)]
    return [(m, parse_cif(c)) for m, c in rows], all_ids


def _not_done(gt, out: Path) -> list:
    """The test crystals that a resumed evaluation still has to predict."""
    from dao.eval.match import read_results  # noqa: PLC0415

    done = read_results(out)
    return [(m, s) for m, s in gt if m not in done]


def _baseline_predictions(args, gt, exclude_ids, k: int) -> dict[str, list]:
    from dao.eval.baseline import DEFAULT_POOL_FILES, TemplateBaseline, read_pool  # noqa: PLC0415

    if args.pool:
        files = list(args.pool)
    else:
        root = args.data_root or args.gt_csv.resolve().parent.parent
        files = [root / f for f in DEFAULT_POOL_FILES]
    missing = [str(f) for f in files if not Path(f).exists()]
    if missing:
        raise SystemExit(f"baseline pool files not found: {missing}; pass --pool or --data-root")
    if not gt:
        return {}
    t0 = time.perf_counter()
    pool = read_pool(files, exclude_ids=exclude_ids)
    model = TemplateBaseline(pool)
    preds, methods = {}, Counter()
    for mid, s in gt:
        res = model.predict(s, k=k)
        methods[res[0].method if res else "none"] += 1
        preds[mid] = [r.structure for r in res]
    print(
        f"baseline: pool of {len(pool)} crystals; {dict(methods)} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return preds


# ---------------------------------------------------------------------------- report
def _fmt_rate(x) -> str:
    return f"{100 * x:6.2f} %"


def _fmt_rmse(x) -> str:
    return "     -" if x is None else f"{x:.4f}"


def _table(name: str, s: dict) -> str:
    return (
        f"{name:<34}{_fmt_rate(s['match_rate_valid_filtered'])}   "
        f"{_fmt_rmse(s['rmse_valid_filtered'])}   "
        f"{_fmt_rate(s['match_rate_unfiltered'])}   {_fmt_rmse(s['rmse_unfiltered'])}"
    )


def run_evaluate(args) -> int:
    from dao.eval.match import evaluate  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.baseline and not args.predictions:
        raise SystemExit("give --predictions PATH (repeatable) or --baseline")
    k = int(args.num_samples)
    t0 = time.perf_counter()
    gt, all_ids = _read_ground_truth(args)
    ids = [m for m, _ in gt]
    common = dict(
        num_samples=k,
        workers=args.workers,
        timeout=args.timeout,
        progress=show_progress(args.progress),
    )
    out = Path(args.out)
    stem = out.with_suffix("") if out.suffix == ".jsonl" else out
    if args.baseline:
        name = "template baseline"
        preds = _baseline_predictions(args, _not_done(gt, out), all_ids, k)
    else:
        name = "predictions"
        preds = load_predictions(args.predictions, ids)
        if not set(preds) & set(ids):
            raise SystemExit("no prediction matches a test material_id")
    summary = evaluate(gt, preds, out=out, **common)
    summary.pop("records")
    baseline = None
    if args.compare_baseline and not args.baseline:
        bout = Path(f"{stem}.baseline.jsonl")
        bpreds = _baseline_predictions(args, _not_done(gt, bout), all_ids, k)
        baseline = evaluate(gt, bpreds, out=bout, **common)
        baseline.pop("records")
    summary["ground_truth"] = str(args.gt_csv)
    summary["subset"] = None if args.subset is None else {"n": args.subset, "seed": args.seed}
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if baseline is not None:
        summary["baseline"] = baseline
        below = summary["match_rate_valid_filtered"] < baseline["match_rate_valid_filtered"]
        summary["below_baseline"] = below
    path = args.summary or Path(f"{stem}.summary.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")

    print()
    print(
        f"{summary['num_test']} test crystals ({args.gt_csv}), {k} sample(s) each, "
        f"{summary['seconds']} s"
    )
    print(f"{'':<34}{'valid-filtered':^19}   {'unfiltered':^19}")
    print(f"{'':<34}{'match':>8}   {'RMSE':>6}   {'match':>8}   {'RMSE':>6}")
    print(_table(name, summary))
    if baseline is not None:
        print(_table("template baseline (floor to beat)", baseline))
    print(f"valid-filtered: {summary['valid_filter']}")
    print(
        f"ground truth valid {100 * summary['gt_valid_rate']:.1f} %, samples valid "
        f"{100 * summary['sample_valid_rate']:.1f} %; samples by status "
        f"{summary['samples_by_status']}"
    )
    if baseline is not None:
        if summary["below_baseline"]:
            print(
                "BELOW THE FLOOR: the predictions match fewer crystals than the no-learning "
                "template baseline; this is not yet a useful predictor."
            )
        else:
            print("Above the template baseline (valid-filtered match rate).")
    print(f"summary: {path}; per-crystal results: {out}")
    return 0


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``compare`` (paired comparison of two ``dao evaluate`` result files)."""
    p = subparsers.add_parser(
        "compare",
        help="paired comparison of two models' dao evaluate results (exact McNemar test)",
        description="Compare two per-crystal result files of `dao evaluate` (its --out "
        "JSONL) on the test crystals they share: crystals matched by both, by each alone, "
        "and the two-sided exact McNemar p-value of the difference, valid-filtered and "
        "unfiltered. A paired test: far more sensitive than comparing two match rates "
        "with their separate error bars.",
    )
    p.add_argument("results_a", type=Path, help="results JSONL of model A")
    p.add_argument("results_b", type=Path, help="results JSONL of model B")
    p.add_argument("--names", nargs=2, default=("A", "B"), help="labels of the two models")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.set_defaults(func=run_compare)
    return p


def run_compare(args) -> int:
    from dao.eval.match import compare, read_results  # noqa: PLC0415

    results = []
    for path in (args.results_a, args.results_b):
        if not path.exists():
            raise SystemExit(f"no results file at {path} (the --out of `dao evaluate`)")
        results.append(read_results(path))
    try:
        cmp = compare(*results)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    a, b = args.names
    print(f"{cmp['num_test']} shared test crystals, {cmp['num_samples']} sample(s) each")
    heads = [a, b, "both", f"{a} only", f"{b} only", "p"]
    widths = [max(8, len(h) + 2) for h in heads]
    print(f"{'':<16}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)))
    for conv in ("valid_filtered", "unfiltered"):
        c = cmp[conv]
        cells = [c["matched_a"], c["matched_b"], c["both"], c["only_a"], c["only_b"]]
        row = "".join(f"{x:>{w}}" for x, w in zip(cells, widths, strict=False))
        print(f"{conv:<16}{row}{c['mcnemar_p']:>{widths[-1]}.2g}")
    print("p: two-sided exact McNemar test on the crystals only one model matched")
    if args.json:
        args.json.write_text(json.dumps({"names": [a, b], **cmp}, indent=2) + "\n")
    return 0


def main(argv=None) -> int:  # pragma: no cover - convenience: python -m dao.eval.cli
    parser = argparse.ArgumentParser(prog="dao")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
