"""CSP match rate and RMSE (spec §6), in worker processes that can be killed.

Protocol: pymatgen ``StructureMatcher(stol=0.5, ltol=0.3, angle_tol=10)``. With
k samples per test crystal, the crystal is matched if any sample matches and its
RMSE is the minimum of ``get_rms_dist(pred, gt)[0]`` over matching samples
(normalised by (V/N)^(1/3)). Match rate = matched / all test crystals; RMSE =
mean over matched crystals. Two conventions are reported side by side:

* ``unfiltered``: every sample is matched, whatever its validity.
* ``valid_filtered``: only valid samples count (:mod:`dao.eval.validity`), and with
  one sample the ground truth must be valid too, so its ceiling is the fraction of
  valid ground truths (89.2 % on ``mp_20_pilot/test``). With several samples the
  reference evaluation checks the samples only; ``require_valid_gt`` overrides.

Robustness: ``StructureMatcher`` can hang inside compiled code (near-degenerate
cells), where no signal reaches it. Each (test crystal, sample) match therefore
runs in a worker process with a hard deadline; past it the worker is killed and
replaced, and the sample is recorded as ``timeout``. A worker that dies is
recorded as ``crash``; an exception as ``error``. None of these stop the run.
Cells below 0.1 Å^3 (or with non-finite numbers) are rejected before matching.

Results stream to a JSONL file, one line per test crystal, written when all its
samples are done; a rerun with the same file skips the crystals already in it.
Each line::

    {"material_id": str, "num_samples": k,
     "gt_comp_valid": bool, "gt_struct_valid": bool, "gt_valid": bool,
     "samples": [{"status": "match" | "no_match" | "timeout" | "crash" | "error"
                            | "missing" | "rejected",
                  "rms": float | null, "valid": bool, "comp_valid": bool,
                  "struct_valid": bool, "seconds": float | null, "detail": str?}, ...]}
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np

from dao.eval.validity import Validity, validity_many

__all__ = [
    "compare",
    "MATCHER_KWARGS",
    "MIN_VOLUME",
    "rms_dist",
    "evaluate",
    "summarize",
    "read_results",
]

log = logging.getLogger(__name__)

MATCHER_KWARGS: dict[str, float] = {"stol": 0.5, "ltol": 0.3, "angle_tol": 10.0}
MIN_VOLUME = 0.1  # Å^3: smaller cells are rejected before they reach StructureMatcher

MatchFn = Callable[..., "float | None"]


def rms_dist(pred, gt, stol: float = 0.5, ltol: float = 0.3, angle_tol: float = 10.0):
    """``StructureMatcher(stol, ltol, angle_tol).get_rms_dist(pred, gt)[0]``, or None."""
    from pymatgen.analysis.structure_matcher import StructureMatcher  # noqa: PLC0415

    res = StructureMatcher(stol=stol, ltol=ltol, angle_tol=angle_tol).get_rms_dist(pred, gt)
    return None if res is None else float(res[0])


# ------------------------------------------------------------------------------ workers
def _worker_main(conn, match_fn: MatchFn, kwargs: dict) -> None:
    """Worker loop: receive (task_id, pred, gt), send (task_id, status, value)."""
    warnings.simplefilter("ignore")  # pymatgen's chatter; results are what counts here
    # Ctrl-C is the parent's to handle (it kills the workers); a worker whose parent
    # is gone sees EOF on its pipe and exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import pymatgen.analysis.structure_matcher  # noqa: F401, PLC0415 - before "ready"

    conn.send(("ready", None, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, pred, gt = msg
        try:
            value = match_fn(pred, gt, **kwargs)
            conn.send((task_id, "ok", None if value is None else float(value)))
        except Exception as exc:  # noqa: BLE001 - reported per task, never fatal
            conn.send((task_id, "error", f"{type(exc).__name__}: {exc}"))


@dataclass
class _Worker:
    proc: Any
    conn: Any
    ready: bool = False
    task: Any = None  # (task_id) while busy
    started: float = 0.0  # time.monotonic() of process start or task send


class _KillingPool:
    """N worker processes, each with its own pipe, killed and replaced on a deadline."""

    def __init__(self, n: int, match_fn: MatchFn, kwargs: dict, timeout: float, start_timeout):
        self.n = max(1, int(n))
        self.match_fn = match_fn
        self.kwargs = kwargs
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self.ctx = mp.get_context("spawn")  # no fork of a threaded parent (torch)
        self.workers: list[_Worker] = []
        self.failed_starts = 0

    def _spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(
            target=_worker_main, args=(child, self.match_fn, self.kwargs), daemon=True
        )
        proc.start()
        child.close()
        return _Worker(proc, parent, started=time.monotonic())

    def _retire(self, w: _Worker, kill: bool) -> None:
        if kill and w.proc.is_alive():
            w.proc.kill()
        w.proc.join(timeout=10)
        w.conn.close()

    def close(self) -> None:
        for w in self.workers:
            try:
                if w.ready and w.task is None:
                    w.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for w in self.workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._retire(w, kill=True)
        self.workers = []

    def run(self, tasks: Iterator, on_result: Callable[[Any, str, Any, float], None]) -> None:
        """Run ``tasks`` (task_id, pred, gt); call ``on_result(task_id, status, value, s)``.

        status is "ok" (value = rms or None), "error" (value = message), "timeout"
        or "crash" (value = message).
        """
        first = next(tasks, None)
        if first is None:
            return  # nothing to match: no processes
        tasks = itertools.chain([first], tasks)
        self.workers = [self._spawn() for _ in range(self.n)]
        exhausted = False
        try:
            while True:
                for k, w in enumerate(self.workers):
                    if w.ready and w.task is None and not exhausted:
                        nxt = next(tasks, None)
                        if nxt is None:
                            exhausted = True
                            break
                        task_id, pred, gt = nxt
                        try:
                            w.conn.send((task_id, pred, gt))
                        except OSError as exc:  # died while idle: replace, count a crash
                            self._retire(w, kill=True)
                            self.workers[k] = self._spawn()
                            on_result(task_id, "crash", f"worker lost: {exc}", 0.0)
                            continue
                        w.task, w.started = task_id, time.monotonic()
                busy = [w for w in self.workers if w.task is not None or not w.ready]
                if exhausted and not any(w.task is not None for w in self.workers):
                    return
                now = time.monotonic()
                limits = [
                    w.started + (self.timeout if w.ready else self.start_timeout) for w in busy
                ]
                wait_s = max(0.0, min(limits) - now) if limits else 0.0
                ready = wait([w.conn for w in busy], timeout=wait_s) if busy else []
                for k, w in enumerate(self.workers):
                    if w.conn in ready:
                        self._receive(k, w, on_result)
                now = time.monotonic()
                for k, w in enumerate(self.workers):
                    limit = self.timeout if w.ready else self.start_timeout
                    if (w.task is not None or not w.ready) and now - w.started > limit:
                        self._expire(k, w, now, on_result)
        finally:
            self.close()

    def _receive(self, k: int, w: _Worker, on_result) -> None:
        try:
            task_id, status, value = w.conn.recv()
        except (EOFError, OSError):
            code = w.proc.exitcode
            self._retire(w, kill=True)
            self.workers[k] = self._spawn()
            if w.task is not None:
                log.warning("match worker died (exit code %s) on %s", code, w.task)
                on_result(w.task, "crash", f"worker died, exit code {code}", 0.0)
            else:
                self._failed_start(f"exit code {code}")
            return
        if task_id == "ready":
            w.ready, w.started = True, time.monotonic()
            self.failed_starts = 0
            return
        on_result(task_id, status, value, time.monotonic() - w.started)
        w.task = None

    def _failed_start(self, why: str) -> None:
        self.failed_starts += 1
        log.warning("match worker failed to start (%s); replaced", why)
        if self.failed_starts > 3 * self.n:
            raise RuntimeError(
                f"match workers keep failing to start ({why}); is the match function "
                "importable from a fresh process?"
            )

    def _expire(self, k: int, w: _Worker, now: float, on_result) -> None:
        self._retire(w, kill=True)
        self.workers[k] = self._spawn()
        if w.task is None:
            self._failed_start(f"not ready after {self.start_timeout:g} s")
            return
        log.warning("match of %s exceeded %.1f s: worker killed", w.task, self.timeout)
        on_result(w.task, "timeout", f"killed after {self.timeout:g} s", now - w.started)


# ------------------------------------------------------------------------------ results
def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """Records of a results JSONL file by material_id (a torn last line is ignored)."""
    path = Path(path)
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break  # interrupted mid-write
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["material_id"]] = rec
    return out


def _open_for_append(path: Path):
    """Open ``path`` for appending after cutting a torn (unterminated) last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with path.open("r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return path.open("a")


def _item_result(rec: dict, require_valid_gt: bool) -> tuple[float | None, float | None]:
    """(best rms unfiltered, best rms valid-filtered) of one record; None = unmatched."""
    rms_all = [s["rms"] for s in rec["samples"] if s["rms"] is not None]
    gt_ok = rec["gt_valid"] or not require_valid_gt
    rms_valid = [s["rms"] for s in rec["samples"] if s["rms"] is not None and s["valid"]]
    best_all = min(rms_all) if rms_all else None
    best_valid = min(rms_valid) if (rms_valid and gt_ok) else None
    return best_all, best_valid


def summarize(
    records: Iterable[dict],
    num_test: int | None = None,
    num_samples: int | None = None,
    require_valid_gt: bool | None = None,
) -> dict:
    """Match rates and RMSEs of result records (see module docstring for the keys).

    Args:
        records: one record per test crystal.
        num_test: the denominator (all test crystals); default: number of records.
        num_samples: k; default: taken from the records.
        require_valid_gt: valid-filtered convention; default True for k = 1, else False.

    Rates are fractions in [0, 1]; RMSEs are None when nothing matched.
    """
    records = list(records)
    k = num_samples or (records[0]["num_samples"] if records else 1)
    if require_valid_gt is None:
        require_valid_gt = k == 1
    n = len(records) if num_test is None else int(num_test)
    best = [_item_result(r, require_valid_gt) for r in records]
    all_rms = [a for a, _ in best if a is not None]
    val_rms = [v for _, v in best if v is not None]
    samples = [s for r in records for s in r["samples"]]
    status = {
        st: sum(s["status"] == st for s in samples)
        for st in ("match", "no_match", "timeout", "crash", "error", "missing", "rejected")
    }

    def mean(x):
        return float(np.mean(x)) if x else None

    return {
        "num_test": n,
        "num_evaluated": len(records),
        "num_samples": k,
        "match_rate_valid_filtered": len(val_rms) / n if n else 0.0,
        "rmse_valid_filtered": mean(val_rms),
        "matched_valid_filtered": len(val_rms),
        "match_rate_unfiltered": len(all_rms) / n if n else 0.0,
        "rmse_unfiltered": mean(all_rms),
        "matched_unfiltered": len(all_rms),
        "valid_filter": (
            "sample valid and ground truth valid"
            if require_valid_gt
            else "sample valid (ground truth not checked)"
        ),
        "gt_valid_rate": sum(r["gt_valid"] for r in records) / len(records) if records else 0.0,
        "sample_valid_rate": sum(s["valid"] for s in samples) / len(samples) if samples else 0.0,
        "samples_by_status": status,
        "matcher": dict(MATCHER_KWARGS),
    }


def compare(a: dict[str, dict], b: dict[str, dict], require_valid_gt: bool | None = None) -> dict:
    """Paired comparison of two models' results on the same test crystals.

    Per convention (valid-filtered, unfiltered): crystals matched by both, by A only
    and by B only, and the two-sided exact McNemar p-value (a binomial test of the
    discordant crystals against 1/2): the chance of a split at least this uneven if
    both models matched equally often. Only crystals present in both are compared.

    Args:
        a, b: records by material_id (:func:`read_results`), same k.
        require_valid_gt: valid-filtered convention; default True for k = 1, else False.
    """
    from scipy.stats import binomtest  # noqa: PLC0415  (scipy comes with pymatgen)

    ids = sorted(set(a) & set(b))
    if not ids:
        raise ValueError("the two result files share no material_id")
    ks = {a[i]["num_samples"] for i in ids} | {b[i]["num_samples"] for i in ids}
    if len(ks) != 1:
        raise ValueError(f"both results must use the same number of samples, got {sorted(ks)}")
    k = ks.pop()
    if require_valid_gt is None:
        require_valid_gt = k == 1
    out: dict = {"num_test": len(ids), "num_samples": k}
    for name, pos in (("valid_filtered", 1), ("unfiltered", 0)):
        ma = [_item_result(a[i], require_valid_gt)[pos] is not None for i in ids]
        mb = [_item_result(b[i], require_valid_gt)[pos] is not None for i in ids]
        only_a = sum(x and not y for x, y in zip(ma, mb, strict=True))
        only_b = sum(y and not x for x, y in zip(ma, mb, strict=True))
        n = only_a + only_b
        out[name] = {
            "matched_a": sum(ma),
            "matched_b": sum(mb),
            "both": sum(x and y for x, y in zip(ma, mb, strict=True)),
            "only_a": only_a,
            "only_b": only_b,
            "mcnemar_p": float(binomtest(only_a, n, 0.5).pvalue) if n else 1.0,
        }
    return out


# ----------------------------------------------------------------------------- evaluate
def _matchable(s) -> str | None:
    """Why ``s`` must not reach StructureMatcher, or None if it may."""
    if s is None:
        return "missing"
    if len(s) == 0:
        return "no atoms"
    lat = np.asarray(s.lattice.matrix, dtype=np.float64)
    if not (np.isfinite(lat).all() and np.isfinite(np.asarray(s.frac_coords)).all()):
        return "non-finite lattice or coordinates"
    vol = abs(float(np.linalg.det(lat)))
    if not vol >= MIN_VOLUME:
        return f"cell volume {vol:.3g} Å^3 < {MIN_VOLUME}"
    return None


@dataclass
class _Pending:
    record: dict
    remaining: int = 0
    samples: list = field(default_factory=list)


def evaluate(
    ground_truth: Sequence[tuple[str, Any]] | Mapping[str, Any],
    predictions: Mapping[str, Sequence[Any]],
    *,
    num_samples: int | None = None,
    out: str | os.PathLike | None = None,
    workers: int = 2,
    timeout: float = 60.0,
    match_fn: MatchFn = rms_dist,
    matcher_kwargs: Mapping[str, float] | None = None,
    require_valid_gt: bool | None = None,
    progress: bool = False,
    chunk: int = 64,
) -> dict:
    """Match predictions against ground truths and summarise (spec §6).

    Args:
        ground_truth: (material_id, pymatgen Structure) pairs, or a mapping.
        predictions: material_id -> list of k predicted structures; a missing id,
            a short list or a None entry counts as a missing (unmatched) sample.
        num_samples: k; default: the longest prediction list (at least 1).
        out: results JSONL (one line per test crystal); crystals already in it are
            skipped, so an interrupted evaluation resumes. None: keep in memory.
        workers: matching processes.
        timeout: hard deadline in seconds for one (crystal, sample) match.
        match_fn: ``fn(pred, gt, **matcher_kwargs) -> rms or None``, run in the
            workers; must be importable (picklable by reference).
        matcher_kwargs: StructureMatcher tolerances (default :data:`MATCHER_KWARGS`).
        require_valid_gt: see :func:`summarize`.
        progress: show a tqdm bar.
        chunk: test crystals per validity batch.

    Returns:
        The :func:`summarize` dict over all requested test crystals (earlier runs'
        records in ``out`` included), plus ``"records"``: the per-crystal records.
    """
    gt_items = list(ground_truth.items() if isinstance(ground_truth, Mapping) else ground_truth)
    ids = [mid for mid, _ in gt_items]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate material_id in the ground truth")
    k = num_samples or max([len(v) for v in predictions.values()] + [1])
    kwargs = dict(MATCHER_KWARGS if matcher_kwargs is None else matcher_kwargs)

    done: dict[str, dict] = {}
    path = Path(out) if out is not None else None
    if path is not None:
        wanted = set(ids)
        done = {m: r for m, r in read_results(path).items() if m in wanted}
        for m, r in done.items():
            if r.get("num_samples") != k:
                raise ValueError(
                    f"{path} holds {m} evaluated with {r.get('num_samples')} samples, "
                    f"not {k}: use another results file"
                )
        if done:
            log.info("resuming: %d of %d test crystals already in %s", len(done), len(ids), path)
    todo = [(m, g) for m, g in gt_items if m not in done]
    new_records: dict[str, dict] = {}
    pending: dict[str, _Pending] = {}
    fh = _open_for_append(path) if path is not None else None
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(todo), desc="matching", unit="crystal")

    def finish(mid: str) -> None:
        rec = pending.pop(mid).record
        new_records[mid] = rec
        if fh is not None:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
        if bar is not None:
            bar.update(1)

    def sample_entry(v: Validity, status: str, detail: str | None = None) -> dict:
        entry = {
            "status": status,
            "rms": None,
            "valid": v.valid,
            "comp_valid": v.comp_valid,
            "struct_valid": v.struct_valid,
            "seconds": None,
        }
        if detail:
            entry["detail"] = detail
        return entry

    def task_stream() -> Iterator:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            preds = [list(predictions.get(m, ()))[:k] for m, _ in part]
            preds = [p + [None] * (k - len(p)) for p in preds]
            flat = [g for _, g in part] + [s for p in preds for s in p]
            val = validity_many(flat)
            gt_val, pred_val = val[: len(part)], val[len(part) :]
            for j, ((mid, gt), samples) in enumerate(zip(part, preds, strict=True)):
                gv = gt_val[j]
                rec = {
                    "material_id": mid,
                    "num_samples": k,
                    "gt_comp_valid": gv.comp_valid,
                    "gt_struct_valid": gv.struct_valid,
                    "gt_valid": gv.valid,
                    "samples": [],
                }
                item = _Pending(rec)
                pending[mid] = item
                gt_why = _matchable(gt)
                jobs = []
                for s_idx, s in enumerate(samples):
                    v = pred_val[j * k + s_idx]
                    why = _matchable(s)
                    if why is None and gt_why is not None:
                        why = f"ground truth: {gt_why}"
                    if why is None:
                        rec["samples"].append(sample_entry(v, "pending"))
                        jobs.append(((mid, s_idx), s, gt))
                    else:
                        st = "missing" if why == "missing" else "rejected"
                        rec["samples"].append(sample_entry(v, st, why))
                item.remaining = len(jobs)
                if not jobs:
                    finish(mid)
                yield from jobs

    def on_result(task_id, status: str, value, seconds: float) -> None:
        mid, s_idx = task_id
        entry = pending[mid].record["samples"][s_idx]
        entry["seconds"] = round(float(seconds), 3)
        if status == "ok":
            ok = value is not None and math.isfinite(value)
            entry["status"] = "match" if ok else "no_match"
            entry["rms"] = float(value) if ok else None
        else:
            entry["status"] = status
            entry["detail"] = str(value)
            if status == "error":
                log.warning("match of %s sample %d raised %s", mid, s_idx, value)
        pending[mid].remaining -= 1
        if pending[mid].remaining == 0:
            finish(mid)

    pool = _KillingPool(workers, match_fn, kwargs, timeout, start_timeout=max(120.0, timeout))
    try:
        if todo:
            pool.run(task_stream(), on_result)
    finally:
        if fh is not None:
            fh.close()
        if bar is not None:
            bar.close()
    records = [done.get(m) or new_records[m] for m in ids]
    summary = summarize(records, len(ids), k, require_valid_gt)
    summary["records"] = records
    return summary
