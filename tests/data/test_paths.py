"""The one data-folder rule (dao.data.paths.data_root)."""

from __future__ import annotations

from pathlib import Path

from dao.data import paths


def test_data_root_precedence(tmp_path, monkeypatch):
    for var in paths.DATA_ROOT_VARS:
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    beside_checkout = Path(paths.__file__).resolve().parents[4] / "shared" / "data"
    # No ../shared/data here: the folder beside the source checkout if it exists, else
    # ../shared/data (named in the error that follows).
    want = beside_checkout if beside_checkout.is_dir() else Path("../shared/data")
    assert paths.data_root() == want
    (tmp_path / "a" / "shared" / "data").mkdir(parents=True)
    assert paths.data_root().resolve() == (tmp_path / "a" / "shared" / "data").resolve()
    monkeypatch.setenv("DAO_DATA_DIR", str(tmp_path / "old"))
    assert paths.data_root() == tmp_path / "old"
    monkeypatch.setenv("DAO_DATA_ROOT", str(tmp_path / "new"))
    assert paths.data_root() == tmp_path / "new"
