"""`dao sample-test`: predictions for a CSP test set, resumable, read by dao evaluate."""

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import write_tiny_daog

from dao.eval.cli import load_predictions
from dao.eval.sample import sample_test_set

FIXTURES = Path(__file__).parents[1] / "eval" / "fixtures"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return write_tiny_daog(tmp_path_factory.mktemp("w") / "tiny.safetensors", 4, 20)


def test_sample_resume_and_read_back(tiny_weights, tmp_path):
    gt = next(FIXTURES.glob("*test*.csv*"))
    out = tmp_path / "pred.jsonl"
    info = sample_test_set(
        gt, out, weights=tiny_weights, num_samples=2, subset=4, seed=1, batch_size=3, progress=False
    )
    assert info["crystals"] == 4 and info["structures"] == 8
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 8
    assert Counter(r["material_id"] for r in lines).most_common(1)[0][1] == 2
    # a second call resumes: nothing left to do, nothing duplicated
    again = sample_test_set(
        gt, out, weights=tiny_weights, num_samples=2, subset=4, seed=1, progress=False
    )
    assert again["crystals"] == 0
    assert len(out.read_text().splitlines()) == 8
    preds = load_predictions([out])
    assert len(preds) == 4 and all(len(v) == 2 and v[0] is not None for v in preds.values())
    # CSP: each prediction has exactly the ground truth's atoms
    from dao.data.csv import read_csv_rows
    from dao.eval.baseline import parse_cif

    gts = {r["material_id"]: parse_cif(r["cif"]) for r in read_csv_rows(gt)[1]}
    for mid, samples in preds.items():
        assert samples[0].composition == gts[mid].composition


def test_resume_completes_a_crystal_cut_between_batches(tiny_weights, tmp_path):
    gt = next(FIXTURES.glob("*test*.csv*"))
    out = tmp_path / "pred.jsonl"
    kw = {"weights": tiny_weights, "subset": 3, "seed": 2, "progress": False}
    sample_test_set(gt, out, num_samples=3, batch_size=4, **kw)
    full = [json.loads(x) for x in out.read_text().splitlines()]
    # simulate a kill after the first batch of 4: crystal 2 has 1 of its 3 samples
    out.write_text("".join(json.dumps(r) + "\n" for r in full[:4]) + '{"material_id": "to')
    again = sample_test_set(gt, out, num_samples=3, batch_size=4, **kw)
    assert again["structures"] == 5  # the 2 missing samples of crystal 2 and all of crystal 3
    preds = load_predictions([out])
    assert len(preds) == 3 and all(len(v) == 3 for v in preds.values())
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len({(r["material_id"], r["sample"]) for r in records}) == len(records) == 9


def test_shards_split_the_job(tiny_weights, tmp_path):
    gt = next(FIXTURES.glob("*test*.csv*"))
    kw = {"weights": tiny_weights, "subset": 5, "seed": 3, "progress": False, "num_samples": 1}
    outs = [tmp_path / f"p{k}.jsonl" for k in range(2)]
    infos = [sample_test_set(gt, outs[k], shard=(k, 2), **kw) for k in range(2)]
    assert [i["crystals"] for i in infos] == [3, 2]
    ids = [{json.loads(x)["material_id"] for x in o.read_text().splitlines()} for o in outs]
    assert not ids[0] & ids[1]
    assert len(load_predictions(outs)) == 5
    with pytest.raises(ValueError, match="shard"):
        sample_test_set(gt, tmp_path / "x.jsonl", shard=(2, 2), **kw)


def test_guided_sampling_changes_the_samples(tiny_weights, tmp_path):
    from helpers import write_tiny_daop

    gt = next(FIXTURES.glob("*test*.csv*"))
    daop = write_tiny_daop(tmp_path / "p.safetensors", timesteps=4)
    kw = {"weights": tiny_weights, "subset": 2, "seed": 1, "progress": False}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    sample_test_set(gt, a, **kw)
    sample_test_set(gt, b, daop_weights=daop, guidance_scale=50.0, **kw)
    ra = [json.loads(x) for x in a.read_text().splitlines()]
    rb = [json.loads(x) for x in b.read_text().splitlines()]
    assert [r["material_id"] for r in ra] == [r["material_id"] for r in rb]
    assert any(x["lattice"] != y["lattice"] for x, y in zip(ra, rb, strict=True))
