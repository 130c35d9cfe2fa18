"""CrystalDataset, collate, the batch sampler, the training pool, and CGCNN atom features."""

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dao.data
from dao.data import (
    DEFAULT_EXCLUDE,
    DEFAULT_POOL,
    CrystalBatch,
    CrystalDataset,
    LabelledBatch,
    RandomBatchSampler,
    atom_features,
    collate,
    lookup_atom_features,
    read_material_ids,
    training_pool,
    training_pool_ids,
)

FIXTURES = Path(__file__).parent / "fixtures"
# The offline data folder sits at ../shared/data relative to the project root.
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL_DATA = all((SHARED / f).is_file() for f in DEFAULT_POOL + DEFAULT_EXCLUDE)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dao-cache")


@pytest.fixture(scope="module")
def pilot(cache) -> CrystalDataset:
    return CrystalDataset.from_csv(
        FIXTURES / "mp_20_pilot" / "test.csv.gz", cache_dir=cache, workers=0, progress=False
    )


@pytest.fixture(scope="module")
def mixed(cache) -> CrystalDataset:
    parts = [
        CrystalDataset.from_csv(FIXTURES / f, cache_dir=cache, workers=0, progress=False)
        for f in ("perov_5/val.csv.gz", "mpts_52/val.csv.gz", "carbon_24/val.csv.gz")
    ]
    return CrystalDataset.concat(parts)


def test_exports_resolve():
    for name in dao.data.__all__:
        assert getattr(dao.data, name) is not None
    with pytest.raises(AttributeError):
        dao.data.no_such_thing  # noqa: B018


# --------------------------------------------------------------- the dataset
def test_getitem_record(pilot):
    assert len(pilot) == 14
    r = pilot[0]
    assert r.material_id == "mp-10009" and r.num_atoms == 8 and r.index == 0
    assert r.atom_types.dtype == np.int64 and sorted(set(r.atom_types.tolist())) == [31, 52]
    assert r.frac_coords.shape == (8, 3) and r.lattice.shape == (3, 3)
    assert r.props["e_above_hull"] == 0.0 and r.source.endswith("test.csv.gz")
    assert pilot[-1].material_id == pilot[13].material_id
    with pytest.raises(IndexError):
        pilot[14]
    with pytest.raises(ValueError):  # read-only views: a record cannot corrupt the dataset
        r.frac_coords[0, 0] = 0.5


def test_collate_matches_one_by_one_and_batch(pilot):
    idx = [3, 0, 7]
    out = collate([pilot[i] for i in idx])
    assert isinstance(out, LabelledBatch)
    crystals, props, ids = out  # documented unpacking
    assert isinstance(crystals, CrystalBatch) and len(crystals) == 3
    assert ids == [pilot[i].material_id for i in idx]
    for j, i in enumerate(idx):
        one = crystals[j]
        rec = pilot[i]
        np.testing.assert_array_equal(one.atom_types.numpy(), rec.atom_types)
        np.testing.assert_array_equal(one.frac_coords.numpy(), rec.frac_coords)
        np.testing.assert_array_equal(one.lattice[0].numpy(), rec.lattice)
        for k, v in props.items():
            assert v.shape == (3,) and v[j].item() == rec.props[k]
    fast = pilot.batch(idx)
    assert fast.material_ids == ids and fast.props.keys() == props.keys()
    for name in ("atom_types", "frac_coords", "lattice", "num_atoms", "batch"):
        assert torch.equal(getattr(fast.crystals, name), getattr(crystals, name))
    f32 = collate([pilot[i] for i in idx], dtype=torch.float32)
    assert f32.crystals.frac_coords.dtype == torch.float32
    assert f32.props["e_above_hull"].dtype == torch.float32
    assert collate([]).crystals.num_nodes == 0


def test_mixed_properties_are_nan_filled(mixed):
    assert len(mixed) == 4 + 11 + 4
    assert {"heat_all", "energy_above_hull", "energy_per_atom"} <= set(mixed.property_names)
    out = collate([mixed[0], mixed[5], mixed[17]])
    assert not math.isnan(out.props["heat_all"][0]) and math.isnan(out.props["heat_all"][1])
    assert math.isnan(out.props["energy_above_hull"][0])
    assert not math.isnan(out.props["energy_above_hull"][1])
    assert not math.isnan(out.props["energy_per_atom"][2])


def test_filters(mixed):
    small = mixed.filter_max_atoms(20)
    assert small.num_atoms.max() <= 20 and len(small) == len(mixed) - 3  # 52, 39, 31 atoms
    ids = mixed.material_ids.tolist()
    assert [r.material_id for r in (small[i] for i in range(len(small)))] == [
        m for m, n in zip(ids, mixed.num_atoms, strict=True) if n <= 20
    ]
    # subset keeps every atom with its crystal
    sub = mixed.subset([5, 0, 5])
    for j, i in enumerate([5, 0, 5]):
        np.testing.assert_array_equal(sub[j].frac_coords, mixed[i].frac_coords)
        assert sub[j].props.keys() == mixed[i].props.keys()
    assert sub.deduplicate().material_ids.tolist() == [ids[5], ids[0]]
    dropped = mixed.exclude_ids([ids[1], " " + ids[2]])
    assert len(dropped) == len(mixed) - 2 and ids[1] not in dropped.material_ids
    assert len(mixed.filter(np.zeros(len(mixed), dtype=bool))) == 0


def test_dataloader_with_sampler(pilot):
    sampler = RandomBatchSampler(len(pilot), 5, seed=1)
    loader = DataLoader(
        pilot, batch_sampler=sampler, collate_fn=functools.partial(collate, dtype=torch.float32)
    )
    seen = []
    for crystals, props, ids in loader:
        assert crystals.lattice.dtype == torch.float32 and len(ids) == len(crystals)
        assert props["e_above_hull"].shape == (len(ids),)
        seen += ids
    assert sorted(seen) == sorted(pilot.material_ids.tolist())


def test_random_batch_sampler():
    s = RandomBatchSampler(23, 5, seed=3)
    first = list(s)
    assert len(s) == 5 and [len(b) for b in first] == [5, 5, 5, 5, 3]
    assert sorted(i for b in first for i in b) == list(range(23))
    assert list(s) == first  # same epoch, same order
    s.set_epoch(1)
    assert list(s) != first
    d = RandomBatchSampler(23, 5, drop_last=True)
    assert len(d) == 4 and all(len(b) == 5 for b in d)
    assert list(RandomBatchSampler(7, 3, shuffle=False)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(RandomBatchSampler(0, 3)) == []
    with pytest.raises(ValueError):
        RandomBatchSampler(5, 0)


# ------------------------------------------------------------ the training pool
def test_training_pool_on_fixtures(cache):
    pool = training_pool(FIXTURES, cache_dir=cache, workers=0, progress=False)
    test_ids = set(read_material_ids(FIXTURES / "mp_20_pilot" / "test.csv.gz"))
    ids = pool.material_ids.tolist()
    assert len(ids) == len(set(ids)) == 43  # see fixtures/README.md
    assert not test_ids & set(ids)
    # the fixtures do contain test ids in pool files: the exclusion did work
    in_files = {m for f in DEFAULT_POOL for m in read_material_ids(FIXTURES / f)}
    assert len(test_ids & in_files) == 8
    assert ids == training_pool_ids(FIXTURES)
    # duplicates keep the first file's copy
    first = {m: f for f in reversed(DEFAULT_POOL) for m in read_material_ids(FIXTURES / f)}
    assert all(pool[i].source == first[m] for i, m in enumerate(ids))
    assert pool[ids.index("mp-568529")].source == "mp_20_pilot/train.csv.gz"
    small = training_pool(FIXTURES, cache_dir=cache, workers=0, progress=False, max_atoms=20)
    assert len(small) == 39 and small.num_atoms.max() <= 20
    extra = training_pool(
        FIXTURES,
        include=["perov_5/val.csv.gz"],
        exclude_ids=["18517"],
        cache_dir=cache,
        workers=0,
        progress=False,
    )
    assert extra.material_ids.tolist() == ["15400", "3409", "8226"]
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        training_pool(FIXTURES, include=["nope.csv"], cache_dir=cache, progress=False)


def test_training_pool_from_run_config_home_paths_and_exclude_ids(cache, tmp_path, monkeypatch):
    """``[data]`` of a run config: include paths may start with ~, exclude_ids are honoured."""
    import shutil

    from dao.train.run import _datasets

    home = tmp_path / "home"
    (home / "d").mkdir(parents=True)
    shutil.copy(FIXTURES / "perov_5" / "val.csv.gz", home / "d" / "relaxed.csv.gz")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DAO_CACHE_DIR", str(cache))
    cfg = {"data_root": str(FIXTURES), "include": ["~/d/relaxed.csv.gz"], "val_fraction": 0.0}
    _, _, pool = _datasets(cfg, seed=0)
    assert sorted(pool.material_ids.tolist()) == ["15400", "18517", "3409", "8226"]
    _, _, pool = _datasets({**cfg, "exclude_ids": ["18517", "3409"]}, seed=0)
    assert sorted(pool.material_ids.tolist()) == ["15400", "8226"]


def test_no_test_id_in_training_pool():
    """The held-out mp_20_pilot/test ids never enter training (real data when present)."""
    root = SHARED if REAL_DATA else FIXTURES
    test_ids = set(read_material_ids(root / "mp_20_pilot" / "test.csv.gz"))
    pool_ids = training_pool_ids(root)
    assert len(pool_ids) == len(set(pool_ids))
    assert not test_ids & set(pool_ids)
    if REAL_DATA:
        assert len(test_ids) == 1000
        raw = [m for f in DEFAULT_POOL for m in read_material_ids(root / f)]
        # 776 test ids sit in mp_20_biternary_subset and 39 in mpts_52/val (data README)
        assert len(test_ids & set(raw)) >= 776
        assert len(pool_ids) == len(set(raw) - test_ids)
        mp_files = [f for f in DEFAULT_POOL if f.startswith(("mp_20", "mpts_52"))]
        mp_ids = {m for f in mp_files for m in read_material_ids(root / f)}
        # "about 19,900 Materials Project crystals" (data README) before the exclusion
        assert 19_800 <= len(mp_ids) <= 20_000
        assert 19_000 <= len(mp_ids - test_ids) <= 19_900


# --------------------------------------------------------------- atom features
def test_atom_features_table():
    table = atom_features()
    assert table.shape == (101, 92) and table.dtype == torch.float32
    assert torch.count_nonzero(table[0]) == 0
    raw = json.loads((FIXTURES.parents[2] / "src/dao/data/atom_init.json").read_text())
    for z in (1, 8, 26, 100):
        assert table[z].tolist() == [float(v) for v in raw[str(z)]]
    table[1] = 7.0  # a copy: the next call is unaffected
    assert atom_features()[1].max() == 1.0
    if (SHARED / "cgcnn" / "atom_init.json").is_file():
        assert raw == json.loads((SHARED / "cgcnn" / "atom_init.json").read_text())


def test_lookup_atom_features():
    z = torch.tensor([8, 1, 8, 100])
    f = lookup_atom_features(z)
    assert (
        f.shape == (4, 92) and torch.equal(f[0], f[2]) and torch.equal(f[3], atom_features()[100])
    )
    assert lookup_atom_features(torch.zeros(0, dtype=torch.int64)).shape == (0, 92)
    with pytest.raises(ValueError, match=r"1\.\.100; got \[101, 118\]"):
        lookup_atom_features(torch.tensor([6, 101, 118]))
    with pytest.raises(ValueError, match="1..100"):
        lookup_atom_features(torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="integers"):
        lookup_atom_features(torch.tensor([6.0]))
