"""Matching: StructureMatcher results, killed hangs, crashes, volume rejection, resume."""

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from dao.eval.baseline import parse_cif, read_csv_rows
from dao.eval.match import evaluate, read_results, rms_dist, summarize

FIXTURES = Path(__file__).parent / "fixtures"


def hooked_match(pred, gt, **kwargs):
    """Match function run in the workers; ``pred.properties["test_hook"]`` misbehaves."""
    hook = pred.properties.get("test_hook")
    if hook == "hang":
        time.sleep(3600)  # stands in for StructureMatcher stuck in compiled code
    if hook == "crash":
        os._exit(3)
    if hook == "raise":
        raise RuntimeError("matcher failed")
    return rms_dist(pred, gt, **kwargs)


def _fixture_structures(n: int) -> list[tuple[str, Structure]]:
    rows = list(read_csv_rows(FIXTURES / "mp_20_pilot_test_slice30.csv.gz"))[:n]
    return [(r["material_id"], parse_cif(r["cif"])) for r in rows]


def _perturbed(s: Structure, seed: int, amp: float = 0.05, hook: str | None = None) -> Structure:
    rng = np.random.default_rng(seed)
    cart = s.cart_coords + rng.normal(scale=amp, size=(len(s), 3))
    props = {"test_hook": hook} if hook else {}
    lat = Lattice(s.lattice.matrix * 1.01)  # a slightly strained cell too
    return Structure(lat, s.species, cart @ np.linalg.inv(s.lattice.matrix), properties=props)


def _rocksalt() -> Structure:
    return Structure.from_spacegroup(
        "Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0] * 3, [0.5] * 3]
    )


def _cscl_type() -> Structure:
    return Structure(Lattice.cubic(3.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def test_rms_dist_in_process():
    (_, s), *_ = _fixture_structures(1)
    r = rms_dist(_perturbed(s, 0), s)
    assert r is not None and 0 < r < 0.05
    assert rms_dist(s.copy(), s) == pytest.approx(0.0, abs=1e-6)
    assert rms_dist(_cscl_type(), _rocksalt()) is None  # same formula, other structure


def test_evaluate_kills_hangs_counts_crashes_and_filters(tmp_path, caplog):
    (ida, a), (idb, b), (idc, c), (idd, d), (ide, e) = _fixture_structures(5)
    # NaCl2 is not charge-balanced: an invalid ground truth
    bad_gt = Structure(Lattice.cubic(6.0), ["Na", "Cl", "Cl"], [[0] * 3, [0.5] * 3, [0, 0.5, 0]])
    tiny = Structure(
        Lattice([[3, 0, 0], [0, 3, 0], [0, 0, 0.001]]),
        c.species,
        c.frac_coords,
        properties={"test_hook": "hang"},  # would time out if it reached the matcher
    )
    gt = [
        (ida, a),
        ("rocksalt", _rocksalt()),
        (idc, c),
        (idd, d),
        (ide, e),
        ("invalid-gt", bad_gt),
        (idb, b),
        ("no-prediction", _rocksalt()),
    ]
    preds = {
        ida: [_perturbed(a, 1)],
        "rocksalt": [_cscl_type()],
        idc: [tiny],
        idd: [_perturbed(d, 2, hook="hang")],
        ide: [_perturbed(e, 3, hook="crash")],
        "invalid-gt": [_perturbed(bad_gt, 4)],
        idb: [_perturbed(b, 5)],  # after the hang and the crash: the run goes on
    }
    out = tmp_path / "results.jsonl"
    caplog.set_level(logging.WARNING, logger="dao.eval.match")
    t0 = time.monotonic()
    res = evaluate(gt, preds, out=out, workers=2, timeout=3.0, match_fn=hooked_match)
    assert time.monotonic() - t0 < 60
    recs = {r["material_id"]: r for r in res["records"]}
    status = {m: r["samples"][0]["status"] for m, r in recs.items()}
    assert status == {
        ida: "match",
        "rocksalt": "no_match",
        idc: "rejected",
        idd: "timeout",
        ide: "crash",
        "invalid-gt": "match",
        idb: "match",
        "no-prediction": "missing",
    }
    assert "0.1" in recs[idc]["samples"][0]["detail"]
    assert res["samples_by_status"]["timeout"] == 1 and res["samples_by_status"]["crash"] == 1
    assert any("killed" in m for m in caplog.messages)
    assert any("died" in m for m in caplog.messages)
    # the invalid ground truth counts only without the validity filter
    assert res["num_test"] == 8
    assert res["matched_unfiltered"] == 3 and res["matched_valid_filtered"] == 2
    assert res["match_rate_unfiltered"] == pytest.approx(3 / 8)
    assert res["match_rate_valid_filtered"] == pytest.approx(2 / 8)
    assert res["valid_filter"] == "sample valid and ground truth valid"
    rms = [recs[m]["samples"][0]["rms"] for m in (ida, "invalid-gt", idb)]
    assert all(0 < r < 0.1 for r in rms)
    assert res["rmse_unfiltered"] == pytest.approx(np.mean(rms))
    assert res["rmse_valid_filtered"] == pytest.approx(np.mean([rms[0], rms[2]]))
    # streamed: one line per test crystal; a rerun finds everything done (no processes)
    lines = out.read_text().splitlines()
    assert sorted(json.loads(x)["material_id"] for x in lines) == sorted(m for m, _ in gt)
    again = evaluate(gt, preds, out=out, workers=2, timeout=3.0, match_fn=hooked_match)
    assert out.read_text().splitlines() == lines
    assert {k: v for k, v in again.items() if k != "records"} == {
        k: v for k, v in res.items() if k != "records"
    }


class _Interrupted(Exception):
    pass


class _InterruptingPredictions(dict):
    """Raises when asked for ``stop_at``: an evaluation interrupted mid-way."""

    def __init__(self, data, stop_at):
        super().__init__(data)
        self.stop_at = stop_at

    def get(self, key, default=None):
        if key == self.stop_at:
            raise _Interrupted(key)
        return super().get(key, default)


def test_resume_after_interruption_skips_done_ids(tmp_path):
    items = _fixture_structures(4)
    preds = {m: [_perturbed(s, k)] for k, (m, s) in enumerate(items)}
    out = tmp_path / "results.jsonl"
    # one worker, one crystal per chunk: the first crystal is done when the second is read
    with pytest.raises(_Interrupted):
        evaluate(
            items,
            _InterruptingPredictions(preds, items[1][0]),
            out=out,
            workers=1,
            timeout=30.0,
            chunk=1,
        )
    first = read_results(out)
    assert list(first) == [items[0][0]]
    # a torn last line (killed mid-write) is cut, not parsed
    with out.open("a") as f:
        f.write('{"material_id": "' + items[1][0] + '", "num_sa')
    res = evaluate(items, preds, out=out, workers=1, timeout=30.0)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["material_id"] for r in lines) == sorted(m for m, _ in items)
    assert lines[0] == first[items[0][0]]  # kept as it was, not recomputed
    assert res["num_evaluated"] == 4 and res["matched_unfiltered"] == 4

    # planted records prove that done ids are skipped: nothing here is recomputed
    planted = dict(first[items[0][0]])
    planted["samples"] = [dict(planted["samples"][0], rms=0.123)]
    out2 = tmp_path / "planted.jsonl"
    out2.write_text(json.dumps(planted) + "\n")
    res2 = evaluate(items[:1], {}, out=out2)
    assert res2["rmse_unfiltered"] == pytest.approx(0.123)
    assert len(out2.read_text().splitlines()) == 1
    with pytest.raises(ValueError, match="samples"):
        evaluate(items[:1], {}, out=out2, num_samples=2)


def test_summarize_multi_sample_conventions():
    def rec(gt_valid, samples):
        return {
            "material_id": "x",
            "num_samples": 2,
            "gt_valid": gt_valid,
            "samples": [
                {"rms": r, "valid": v, "status": "match" if r else "no_match"} for r, v in samples
            ],
        }

    recs = [
        rec(True, [(0.05, True), (0.02, False)]),  # min over valid samples only: 0.05
        rec(False, [(0.03, True), (None, True)]),  # gt invalid: counts with k > 1
        rec(True, [(None, True), (None, False)]),
    ]
    s = summarize(recs)
    assert s["match_rate_unfiltered"] == pytest.approx(2 / 3)
    assert s["rmse_unfiltered"] == pytest.approx((0.02 + 0.03) / 2)
    assert s["match_rate_valid_filtered"] == pytest.approx(2 / 3)
    assert s["rmse_valid_filtered"] == pytest.approx((0.05 + 0.03) / 2)
    assert s["valid_filter"] == "sample valid (ground truth not checked)"
    strict = summarize(recs, require_valid_gt=True)
    assert strict["match_rate_valid_filtered"] == pytest.approx(1 / 3)
    assert summarize(recs, num_test=6)["match_rate_unfiltered"] == pytest.approx(2 / 6)


def _rec(mid, matched, valid=True, gt_valid=True, k=1):
    sample = {"status": "match" if matched else "no_match", "rms": 0.1 if matched else None}
    sample.update(valid=valid, comp_valid=valid, struct_valid=valid, seconds=0.0)
    return {"material_id": mid, "num_samples": k, "gt_valid": gt_valid, "samples": [sample] * k}


def test_compare_counts_discordant_crystals_and_exact_mcnemar(tmp_path, capsys):
    from dao.cli import main  # noqa: PLC0415
    from dao.eval.match import compare  # noqa: PLC0415

    # 10 crystals: both match 0-1, A alone 2-6, B alone none, neither 7-9; crystal 5's
    # A sample is invalid (counts unfiltered only), crystal 6's ground truth invalid
    a = {f"m{i}": _rec(f"m{i}", 0 <= i <= 6, valid=i != 5, gt_valid=i != 6) for i in range(10)}
    b = {f"m{i}": _rec(f"m{i}", i <= 1, gt_valid=i != 6) for i in range(10)}
    b["extra"] = _rec("extra", True)  # not in A: ignored
    out = compare(a, b)
    assert out["num_test"] == 10
    vf, un = out["valid_filtered"], out["unfiltered"]
    assert (vf["matched_a"], vf["matched_b"], vf["both"], vf["only_a"], vf["only_b"]) == (
        5,
        2,
        2,
        3,
        0,
    )
    assert (un["matched_a"], un["only_a"], un["only_b"]) == (7, 5, 0)
    # exact two-sided binomial test of the discordant pairs: 2 * 0.5^n for an n-0 split
    assert vf["mcnemar_p"] == pytest.approx(2 * 0.5**3)
    assert un["mcnemar_p"] == pytest.approx(2 * 0.5**5)
    assert compare(a, a)["valid_filtered"]["mcnemar_p"] == 1.0  # nothing discordant
    with pytest.raises(ValueError, match="same number of samples"):
        compare(a, {"m0": _rec("m0", True, k=2)})
    with pytest.raises(ValueError, match="share no material_id"):
        compare(a, {"zz": _rec("zz", True)})

    # the command: table, JSON, clear error for a missing file
    pa, pb = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    pa.write_text("".join(json.dumps(r) + "\n" for r in a.values()))
    pb.write_text("".join(json.dumps(r) + "\n" for r in b.values()))
    assert (
        main(["compare", str(pa), str(pb), "--names", "X", "Y", "--json", str(tmp_path / "c.json")])
        == 0
    )
    text = capsys.readouterr().out
    assert "10 shared test crystals" in text and "X only" in text
    assert json.loads((tmp_path / "c.json").read_text())["unfiltered"]["only_a"] == 5
    with pytest.raises(SystemExit, match="no results file"):
        main(["compare", str(tmp_path / "missing.jsonl"), str(pb)])
