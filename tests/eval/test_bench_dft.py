"""benchmarks/bench_dft.py: rows, CSV, markdown and plot, with tiny models and a stand-in
for the QE run (the real pw.x runs are in tests/eval/test_dft.py, marked slow)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
from helpers import write_tiny_daog, write_tiny_daop

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_dft", ROOT / "benchmarks" / "bench_dft.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_dft"] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("bench_dft", None)


def _args(bench, tmp_path, *extra):
    daog = write_tiny_daog(tmp_path / "g.safetensors", max_atoms=8)
    daop = write_tiny_daop(tmp_path / "p.safetensors")
    return bench.parse_args(
        [
            "--quick", "--weights", str(daog), "--daop-weights", str(daop),
            "--out", str(tmp_path / "dft.csv"), "--work-dir", str(tmp_path / "qe"), "-q",
            *extra,
        ]
    )  # fmt: skip


def test_rows_for_a_system_with_and_without_reference(bench, tmp_path, monkeypatch):
    from dao.eval import dft
    from dao.eval.case_studies import get_case_study

    calls = []

    def fake_run_pw(start, settings, work, calculation, max_wall_s, progress=None):
        calls.append((len(start), calculation, max_wall_s, settings.ecutwfc))
        ref = get_case_study("Cr3Os").structure()
        return dft.QERun(
            calculation, True, True, "converged", 12.5, [], [start, ref], ref, Path(work)
        )

    monkeypatch.setattr(dft, "run_pw", fake_run_pw)
    args = _args(bench, tmp_path, "--systems", "Cr3Os", "CsV3Sb5", "--dft-systems", "Cr3Os")
    assert args.num_samples == 2 and args.dft_max_minutes == 2.0
    rows = bench.run(args)
    # 2 DAO rows per system + 1 QE row for Cr3Os; CsV3Sb5 has no reference cell
    assert [(r["system"], r["method"][:5]) for r in rows] == [
        ("Cr3Os", "DAO-G"), ("Cr3Os", "DAO-G"), ("Cr3Os", "QE vc"),
        ("CsV3Sb5", "DAO-G"), ("CsV3Sb5", "DAO-G"),
    ]  # fmt: skip
    assert calls == [(8, "vc-relax", 120.0, 25.0)]
    qe = rows[2]
    assert qe["best_rmse"] == pytest.approx(0.0, abs=1e-6) and qe["ionic_steps"] == 2
    assert qe["start_rmse"] > 0.001  # the perturbed start is not the reference
    cr, cs = rows[0], rows[3]
    assert cr["reference"] == "computed" and cr["samples"] == 2 and cr["matched"] is not None
    assert cs["reference"] == "none" and cs["matched"] is None and cs["tc_ref_pred_k"] is None
    assert "guidance w=20" in rows[1]["method"] and "guidance" not in rows[0]["method"]

    back = bench.read_csv(tmp_path / "dft.csv")
    assert len(back) == 5 and back[2]["stop_reason"] == "converged"
    md = "\n".join(bench.markdown(back, tmp_path / "dft.png"))
    assert md.startswith(bench.BEGIN) and md.endswith(bench.END)
    assert "| Cr3Os | QE vc-relax (perturbed start) |" in md
    assert "Cr3Os: QE vc-relax (perturbed start) (converged, 2 ionic steps) took" in md


def test_a_rerun_replaces_its_own_rows_and_keeps_the_others(bench):
    def row(system, method, wall):
        return {"system": system, "method": method, "wall_s": wall}

    earlier = [
        row("CsV3Sb5", "DAO-G + DAO-P ranking", 1),
        row("Cr3Os", "DAO-G + DAO-P ranking", 2),
        row("Cr3Os", "QE vc-relax (perturbed start)", 2400),
    ]
    new = [row("Cr3Os", "DAO-G + DAO-P ranking", 3), row("Zr4Pd2O", "DAO-G + DAO-P ranking", 4)]
    merged = bench.merge_rows(earlier, new)
    assert [(r["system"], r["wall_s"]) for r in merged] == [
        ("CsV3Sb5", 1), ("Cr3Os", 3), ("Cr3Os", 2400), ("Zr4Pd2O", 4),
    ]  # fmt: skip


def test_reference_cif_and_markdown_replacement(bench, tmp_path):
    from dao.eval.case_studies import get_case_study

    cif = tmp_path / "cr3os.cif"
    get_case_study("Cr3Os").structure().to(filename=str(cif))
    ref, kind = bench.reference_for(get_case_study("CsV3Sb5"), str(cif))
    assert kind == "cif:cr3os.cif" and len(ref) == 8
    with pytest.raises(SystemExit):
        bench.parse_args(["--reference-cif", "Nope=x.cif"])
    md = tmp_path / "B.md"
    md.write_text(f"head\n{bench.BEGIN}\nold\n{bench.END}\ntail\n")
    rows = [
        {k: "" for k in bench.FIELDS}
        | {"system": "Cr3Os", "cell": "Cr6Os2", "method": "DAO-G", "reference": "computed"}
    ]
    bench.update_markdown(rows, md, tmp_path / "dft.png")
    text = md.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "old" not in text
    assert text.count(bench.BEGIN) == 1 and "No DFT run in this CSV." in text


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("pw.x") is None, reason="pw.x not installed (see bench_dft.py)")
def test_quick_benchmark_runs_quantum_espresso(bench, tmp_path, monkeypatch):
    pseudo = ROOT.parent / "shared" / "data" / "pseudo"
    if not pseudo.is_dir():
        pytest.skip(f"shared pseudopotentials not found in {pseudo}")
    monkeypatch.setenv("DAO_PSEUDO_DIR", str(pseudo))
    args = _args(bench, tmp_path, "--systems", "Cr3Os", "--dft-systems", "Cr3Os")
    rows = bench.run(args)
    qe = [r for r in rows if r["method"].startswith("QE")]
    assert len(qe) == 1 and qe[0]["scf_iterations"] > 0 and qe[0]["wall_s"] > 0
    assert qe[0]["stop_reason"] in ("converged", "nstep reached", "time limit")
