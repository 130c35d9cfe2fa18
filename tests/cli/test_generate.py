"""`dao generate` and its Python API with a tiny untrained model (fast, offline)."""

import csv

import pytest
from helpers import write_tiny_daog

from dao.cli import main
from dao.generate import generate, parse_formula
from dao.pretrained import load_daog


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_daog(tmp_path_factory.mktemp("w") / "tiny.safetensors", 5, 12)


def test_weights_roundtrip(tiny_weights):
    diff, cfg = load_daog(tiny_weights)
    assert cfg["model"]["hidden"] == 16 and diff.timesteps == 5


def test_parse_formula():
    assert parse_formula("CsV3Sb5") == {55: 1, 23: 3, 51: 5}
    assert parse_formula("Fe2O3") == {26: 2, 8: 3}
    assert parse_formula("Ti2O4") == {22: 1, 8: 2}  # reduced
    for bad, msg in [
        ("Xx2O", "unknown element"),
        ("", "formula"),
        ("Fe2.5O", "fractional"),
        ("(Fe", "malformed"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_formula(bad)


def test_generate_api_auto_z(tiny_weights):
    res = generate("SrTiO3", 3, weights=tiny_weights, seed=1, progress=False)
    assert len(res) == 3
    for r in res:
        comp = r.structure.composition
        assert comp.reduced_formula == "SrTiO3"
        assert len(r.structure) == 5 * r.formula_units and r.formula_units in (1, 2)
        counts = r.to_ase().symbols.formula.count()
        assert {k: v // r.formula_units for k, v in counts.items()} == {"Sr": 1, "Ti": 1, "O": 3}
    keys = [(not r.valid, r.residual) for r in res]
    assert keys == sorted(keys)  # best first


def test_generate_same_seed_same_result(tiny_weights):
    a = generate("NaCl", 2, formula_units=2, weights=tiny_weights, seed=3, progress=False)
    b = generate("NaCl", 2, formula_units=2, weights=tiny_weights, seed=3, progress=False)
    for x, y in zip(a, b, strict=True):
        assert x.structure == y.structure


def test_too_many_atoms(tiny_weights):
    with pytest.raises(ValueError, match="limit"):
        generate("NaCl", 1, formula_units=7, weights=tiny_weights, progress=False)
    with pytest.raises(ValueError, match="limit"):
        generate("CsV3Sb5O4", 1, weights=tiny_weights, progress=False)  # 13 atoms per unit


def test_cli_writes_cifs_summary_and_png(tiny_weights, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "generate",
            "LiFePO4",
            "-n",
            "2",
            "-z",
            "1",
            "--weights",
            str(tiny_weights),
            "-o",
            str(out),
            "--png",
            "-q",
        ]
    )
    assert rc == 0
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and rows[0]["rank"] == "1"
    for r in rows:
        assert (out / r["file"]).stat().st_size > 0
        assert (out / r["picture"]).read_bytes()[:4] == b"\x89PNG"
    assert "LiFePO4" in {r["reduced_formula"] for r in rows}
    assert "wrote 2 CIF files" in capsys.readouterr().out


def test_cli_bad_formula_is_a_clear_error(tiny_weights, capsys):
    assert main(["generate", "Qq3", "--weights", str(tiny_weights), "-q"]) == 2
    assert "unknown element" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_daop(tmp_path_factory):
    from helpers import write_tiny_daop

    return write_tiny_daop(tmp_path_factory.mktemp("p") / "daop.safetensors", timesteps=5)


def test_rank_by_energy_and_guidance(tiny_weights, tiny_daop):
    import math

    kw = {"weights": tiny_weights, "seed": 3, "progress": False, "formula_units": 2}
    ranked = generate("NaCl", 4, daop=tiny_daop, rank_by_energy=True, **kw)
    energies = [r.extra["energy"] for r in ranked]
    assert all(math.isfinite(e) for e in energies)
    valid = [r.extra["energy"] for r in ranked if r.valid]
    assert valid == sorted(valid)
    assert "energy" in ranked[0].summary()
    plain = generate("NaCl", 4, **kw)
    guided = generate("NaCl", 4, daop=tiny_daop, guidance_scale=50.0, **kw)
    # guidance changes the samples (same seed); without it nothing changes
    moved = max(
        float(abs(a.structure.lattice.matrix - b.structure.lattice.matrix).max())
        for a, b in zip(
            sorted(plain, key=lambda r: r.sample),
            sorted(guided, key=lambda r: r.sample),
            strict=True,
        )
    )
    assert moved > 1e-6
    with pytest.raises(ValueError, match="need DAO-P"):
        generate("NaCl", 2, rank_by_energy=True, **kw)


def test_cli_guidance_flags(tiny_weights, tiny_daop, tmp_path, capsys):
    out = tmp_path / "g"
    rc = main(
        ["generate", "NaCl", "-n", "2", "-z", "1", "--weights", str(tiny_weights), "-q",
         "--guidance", "--rank-by-energy", "--daop-weights", str(tiny_daop), "-o", str(out)]
    )  # fmt: skip
    assert rc == 0
    rows = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    assert len(rows) == 2 and "energy" in rows[0]
    assert "energy" in capsys.readouterr().out
