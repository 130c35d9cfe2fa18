"""Reading CDVAE/DiffCSP-format crystal CSVs into compact arrays, with an on-disk cache.

The format: one row per crystal, the structure as a CIF string in column ``cif``,
an identifier in ``material_id``, optional property columns (``e_above_hull``,
``energy_above_hull``, ``formation_energy_per_atom``, ...) and a leading pandas
index column (named ``Unnamed: 0`` in the MP-20 files, unnamed elsewhere). Files
may be plain or gzip-compressed. The datasets and their sources are described in
``../shared/data/README.md``; Materials Project data is CC BY 4.0 (Jain et al.,
APL Materials 2013), Perov-5 comes from Castelli et al. 2012, Carbon-24 from
Pickard 2020, redistributed by the CDVAE, DiffCSP and WyckoffTransformer
repositories.

Every CIF is parsed with pymatgen, **Niggli-reduced**, and its lattice rebuilt in
the canonical orientation from its six lattice parameters
(``Lattice.from_parameters``: c along z, a in the x-z plane), keeping the
fractional coordinates, so the stored crystal is the input crystal up to a proper
rotation (spec section 1). Rows that fail are logged and skipped, never fatal.

Processed arrays are cached under ``<cache root>/processed/`` (default root
``~/.cache/dao``, or ``$DAO_CACHE_DIR``), one ``.npz`` per source file, keyed by
the file's sha256 and :data:`PROCESSING_VERSION`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "PROCESSING_VERSION",
    "ProcessedCSV",
    "cache_root",
    "canonicalize",
    "load_csv",
    "load_processed",
    "parse_cif",
    "process_csv",
    "read_csv_rows",
    "read_material_ids",
    "save_processed",
    "sha256_file",
]

logger = logging.getLogger(__name__)

#: Bump when the processing changes its output; old cache files are then ignored.
PROCESSING_VERSION = 1

_INDEX_COLUMNS = ("", "Unnamed: 0")
_REQUIRED = ("material_id", "cif")
_MISSING = ("", "nan", "none", "null", "na")


# ---------------------------------------------------------------------- reading
def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _raise_field_limit() -> None:
    # CIF strings of large cells exceed the csv module's default 128 KiB field limit.
    # The limit is a C long, which is 32-bit on some platforms.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def read_csv_rows(path: str | os.PathLike) -> tuple[list[str], Iterator[dict[str, str]]]:
    """Open a (possibly gzipped) CSV and stream its rows.

    Args:
        path: the CSV file, plain or ``.gz`` (detected from the content, not the name).

    Returns:
        ``(columns, rows)``: the column names without the leading index column, and
        an iterator of ``{column: value}`` dicts (the file is closed when it ends).

    Raises:
        ValueError: if the file lacks a ``material_id`` or ``cif`` column.
    """
    path = Path(path)
    _raise_field_limit()
    fh = _open_text(path)
    reader = csv.reader(fh)
    try:
        header = next(reader)
    except StopIteration:
        fh.close()
        raise ValueError(f"{path}: empty file, expected a CSV header") from None
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        fh.close()
        raise ValueError(
            f"{path}: missing column(s) {missing}; a CDVAE/DiffCSP-format CSV needs "
            f"'material_id' and 'cif' (found {header[:12]})"
        )
    keep = [i for i, name in enumerate(header) if not (i == 0 and name in _INDEX_COLUMNS)]
    columns = [header[i] for i in keep]

    def rows() -> Iterator[dict[str, str]]:
        with fh:
            for line_no, values in enumerate(reader, start=1):
                if not values:
                    continue
                if len(values) != len(header):
                    raise ValueError(
                        f"{path}: data row {line_no} has {len(values)} fields, header has "
                        f"{len(header)}"
                    )
                yield {header[i]: values[i] for i in keep}

    return columns, rows()


def read_material_ids(path: str | os.PathLike) -> list[str]:
    """The ``material_id`` column of a CSV, in file order, without parsing any CIF."""
    _, rows = read_csv_rows(path)
    return [r["material_id"].strip() for r in rows]


def _to_float(value: str) -> float:
    v = value.strip()
    if v.lower() in _MISSING:
        return math.nan
    return float(v)


def _numeric_columns(columns: Sequence[str], rows: Sequence[dict[str, str]]) -> list[str]:
    """Property columns whose every non-missing value parses as a float."""
    numeric = []
    for name in columns:
        if name in _REQUIRED:
            continue
        try:
            for r in rows:
                _to_float(r[name])
        except ValueError:
            continue
        numeric.append(name)
    return numeric


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------ structures
def canonicalize(structure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Niggli-reduce a pymatgen ``Structure`` and rebuild its lattice canonically.

    Args:
        structure: an ordered pymatgen ``Structure``.

    Returns:
        ``(atom_types [n] int64, frac_coords [n, 3] float64 in [0, 1), lattice [3, 3]
        float64 rows)``: ``Lattice.from_parameters`` of the Niggli cell's six
        parameters, with the fractional coordinates of the Niggli cell. The result is
        the input crystal after a proper rotation (handedness is kept).

    Raises:
        ValueError: disordered structure, atomic numbers outside 1..118, or a
            degenerate lattice.
    """
    from pymatgen.core import Lattice  # noqa: PLC0415

    if not structure.is_ordered:
        raise ValueError("disordered structure (partial occupancies)")
    if len(structure) == 0:
        raise ValueError("structure has no atoms")
    z = np.array([site.specie.Z for site in structure], dtype=np.int64)
    if (z < 1).any() or (z > 118).any():
        raise ValueError(f"atomic numbers outside 1..118: {sorted(set(z.tolist()))}")
    if structure.volume < 1e-6:
        raise ValueError(f"degenerate lattice (volume {structure.volume:.3g} A^3)")
    reduced = structure.get_reduced_structure(reduction_algo="niggli")
    frac = np.asarray(reduced.frac_coords, dtype=np.float64).reshape(-1, 3)
    if np.linalg.det(reduced.lattice.matrix) < 0:
        # from_parameters always returns a right-handed cell. For a left-handed cell L
        # the crystal is unchanged by L -> -L, f -> -f (same cartesian positions), and
        # -L is right-handed with the same six parameters; without this the rebuilt
        # crystal would be the mirror image (enantiomorph) of the input.
        frac = -frac
    lattice = Lattice.from_parameters(*reduced.lattice.parameters)
    frac = frac - np.floor(frac)
    frac[frac >= 1.0] = 0.0  # -1e-17 - floor(-1e-17) rounds to exactly 1.0
    return z, frac, np.asarray(lattice.matrix, dtype=np.float64)


def parse_cif(cif: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parse one CIF string with pymatgen and :func:`canonicalize` it.

    Raises:
        ValueError: unparsable CIF or a structure rejected by :func:`canonicalize`.
    """
    from pymatgen.core import Structure  # noqa: PLC0415

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structure = Structure.from_str(cif, fmt="cif")
        except Exception as exc:
            # pymatgen explains *why* a CIF failed in its warnings, not the exception.
            notes = "; ".join(str(w.message) for w in caught)[:300]
            raise ValueError(f"CIF parse error: {exc}" + (f" ({notes})" if notes else "")) from exc
    return canonicalize(structure)


def _parse_chunk(items: list[tuple[int, str]]) -> list[tuple[int, object]]:
    """Worker: ``(row, cif)`` pairs -> ``(row, arrays | error message)``.

    Any exception is a per-row failure: one bad CIF must not stop a 20k-row file.
    """
    out: list[tuple[int, object]] = []
    for row, cif in items:
        try:
            out.append((row, parse_cif(cif)))
        except Exception as exc:
            out.append((row, f"{type(exc).__name__}: {exc}"))
    return out


# ----------------------------------------------------------------- the container
@dataclass
class ProcessedCSV:
    """The processed crystals of one CSV file (B crystals, N atoms in total).

    Attributes:
        atom_types: [N] int8 atomic numbers, crystals one after another.
        frac_coords: [N, 3] float64 fractional coordinates in [0, 1).
        lattice: [B, 3, 3] float64 canonical lattices (rows are lattice vectors).
        num_atoms: [B] int64 atoms per crystal.
        material_ids: [B] str identifiers.
        row_index: [B] int64 0-based data-row number of each crystal in the CSV.
        props: ``{column: [B] float64}`` every numeric property column (NaN = missing).
        failures: ``(row, material_id, reason)`` of every skipped row.
        source: the CSV path it came from (informational).
        sha256: sha256 of the CSV file's bytes.
    """

    atom_types: np.ndarray
    frac_coords: np.ndarray
    lattice: np.ndarray
    num_atoms: np.ndarray
    material_ids: np.ndarray
    row_index: np.ndarray
    props: dict[str, np.ndarray] = field(default_factory=dict)
    failures: list[tuple[int, str, str]] = field(default_factory=list)
    source: str = ""
    sha256: str = ""

    def __len__(self) -> int:
        return int(self.num_atoms.shape[0])

    @property
    def num_rows(self) -> int:
        """Data rows in the source file (kept + failed)."""
        return len(self) + len(self.failures)


# ---------------------------------------------------------------- processing
def process_csv(
    path: str | os.PathLike,
    *,
    workers: int = 2,
    progress: bool = True,
    max_rows: int | None = None,
    chunk_size: int = 64,
) -> ProcessedCSV:
    """Parse and canonicalize every row of a CSV (no caching; see :func:`load_csv`).

    Args:
        path: a CDVAE/DiffCSP-format CSV, plain or gzipped.
        workers: worker processes; 0 parses in this process.
        progress: show a tqdm progress bar.
        max_rows: only the first ``max_rows`` data rows (for quick looks and tests).
        chunk_size: rows per task sent to a worker.

    Returns:
        The :class:`ProcessedCSV`; failed rows are logged and listed in ``failures``.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    path = Path(path)
    columns, rows_iter = read_csv_rows(path)
    rows = []
    for r in rows_iter:
        rows.append(r)
        if max_rows is not None and len(rows) >= max_rows:
            break
    prop_names = _numeric_columns(columns, rows)
    ids = [r["material_id"].strip() for r in rows]

    results: dict[int, object] = {}
    items = []
    for k, (r, mid) in enumerate(zip(rows, ids, strict=True)):
        if not mid:
            results[k] = "empty material_id"
        elif not r["cif"].strip():
            results[k] = "empty cif"
        else:
            items.append((k, r["cif"]))
    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    with tqdm(total=len(rows), desc=path.name, unit="row", disable=not progress) as bar:
        bar.update(len(results))
        todo = chunks
        if workers > 0 and len(chunks) > 1:
            todo = []
            try:
                with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context()) as pool:
                    futures = {pool.submit(_parse_chunk, c): c for c in chunks}
                    for fut in as_completed(futures):
                        results.update(fut.result())
                        bar.update(len(futures[fut]))
            except (BrokenProcessPool, OSError) as exc:
                # Typically the workers could not re-import the __main__ module (a script
                # without an `if __name__ == "__main__":` guard, or code piped to stdin).
                # Depending on timing that surfaces as a broken pool, or, once the
                # forkserver itself has died of it, as an OSError when the pool starts its
                # next worker (rows never raise here: _parse_chunk catches per row).
                todo = [c for c in chunks if c[0][0] not in results]
                logger.warning(
                    "%s: worker processes failed (%s); parsing the remaining %d rows in "
                    "this process. Run from under `if __name__ == '__main__':` or pass "
                    "workers=0.",
                    path.name,
                    exc,
                    sum(map(len, todo)),
                )
        for chunk in todo:
            results.update(_parse_chunk(chunk))
            bar.update(len(chunk))

    keep, failures = [], []
    for k in range(len(rows)):
        res = results[k]
        if isinstance(res, str):
            failures.append((k, ids[k], res))
            logger.warning("%s: skipped data row %d (%s): %s", path.name, k, ids[k] or "?", res)
        else:
            keep.append(k)
    if failures:
        logger.warning(
            "%s: %d of %d rows failed and were skipped", path.name, len(failures), len(rows)
        )

    parsed = [results[k] for k in keep]
    return ProcessedCSV(
        atom_types=_cat([p[0] for p in parsed], np.int8, (0,)),
        frac_coords=_cat([p[1] for p in parsed], np.float64, (0, 3)),
        lattice=np.stack([p[2] for p in parsed]).astype(np.float64)
        if parsed
        else np.zeros((0, 3, 3)),
        num_atoms=np.array([len(p[0]) for p in parsed], dtype=np.int64),
        material_ids=np.array([ids[k] for k in keep], dtype=np.str_),
        row_index=np.array(keep, dtype=np.int64),
        props={
            name: np.array([_to_float(rows[k][name]) for k in keep], dtype=np.float64)
            for name in prop_names
        },
        failures=failures,
        source=str(path),
        sha256=sha256_file(path),
    )


def _cat(parts: list[np.ndarray], dtype, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype=dtype)


def _mp_context():
    # Not "fork": the parent may hold torch/tqdm threads, and forking a threaded process
    # can deadlock (Python 3.12+ warns about it). Workers import only pymatgen + numpy.
    import multiprocessing  # noqa: PLC0415

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Import this module and pymatgen once in the fork server rather than once per
        # worker (seconds per worker on a busy machine). Neither imports torch.
        ctx.set_forkserver_preload([__name__, "pymatgen.core", "pymatgen.io.cif"])
        return ctx
    return multiprocessing.get_context("spawn")


# ---------------------------------------------------------------------- cache
def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$DAO_CACHE_DIR``, else ``~/.cache/dao``.

    Processed CSVs go to ``<root>/processed/``.
    """
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("DAO_CACHE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "dao"


def _cache_path(root: Path, sha256: str) -> Path:
    return root / "processed" / f"{sha256}.v{PROCESSING_VERSION}.npz"


def save_processed(data: ProcessedCSV, path: str | os.PathLike) -> Path:
    """Write a :class:`ProcessedCSV` to an uncompressed ``.npz``, atomically.

    The file is written to a temporary name in the same directory and moved into
    place with ``os.replace``, so readers never see a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = sorted(data.props)
    props = np.stack([data.props[n] for n in names], axis=1) if names else np.zeros((len(data), 0))
    arrays = {
        "version": np.array(PROCESSING_VERSION, dtype=np.int64),
        "sha256": np.array(data.sha256, dtype=np.str_),
        "source": np.array(data.source, dtype=np.str_),
        "atom_types": data.atom_types.astype(np.int8),
        "frac_coords": data.frac_coords.astype(np.float64),
        "lattice": data.lattice.astype(np.float64),
        "num_atoms": data.num_atoms.astype(np.int64),
        "material_ids": np.asarray(data.material_ids, dtype=np.str_),
        "row_index": data.row_index.astype(np.int64),
        "prop_names": np.array(names, dtype=np.str_),
        "props": props.astype(np.float64),
        "failure_rows": np.array([f[0] for f in data.failures], dtype=np.int64),
        "failure_ids": np.array([f[1] for f in data.failures], dtype=np.str_),
        "failure_reasons": np.array([f[2] for f in data.failures], dtype=np.str_),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_processed(path: str | os.PathLike) -> ProcessedCSV:
    """Read a file written by :func:`save_processed`.

    Raises:
        ValueError: the file is from another :data:`PROCESSING_VERSION` or malformed.
    """
    with np.load(path, allow_pickle=False) as z:
        version = int(z["version"])
        if version != PROCESSING_VERSION:
            raise ValueError(
                f"{path}: processing version {version}, this code writes {PROCESSING_VERSION}"
            )
        names = [str(n) for n in z["prop_names"]]
        props = z["props"]
        return ProcessedCSV(
            atom_types=z["atom_types"],
            frac_coords=z["frac_coords"],
            lattice=z["lattice"],
            num_atoms=z["num_atoms"],
            material_ids=z["material_ids"],
            row_index=z["row_index"],
            props={n: props[:, i].copy() for i, n in enumerate(names)},
            failures=[
                (int(r), str(m), str(s))
                for r, m, s in zip(
                    z["failure_rows"], z["failure_ids"], z["failure_reasons"], strict=True
                )
            ],
            source=str(z["source"]),
            sha256=str(z["sha256"]),
        )


def load_csv(
    path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    progress: bool = True,
    refresh: bool = False,
) -> ProcessedCSV:
    """:func:`process_csv` with a cache keyed by the file's sha256 and the processing version.

    Args:
        path: the CSV file.
        cache_dir: cache root (see :func:`cache_root`); files go to ``<root>/processed``.
        workers: worker processes for a cache miss (0: this process).
        progress: progress bar on a cache miss.
        refresh: reprocess even if a cache file exists.

    Returns:
        The processed crystals (from the cache when possible).
    """
    path = Path(path)
    digest = sha256_file(path)
    target = _cache_path(cache_root(cache_dir), digest)
    if target.exists() and not refresh:
        try:
            data = load_processed(target)
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("ignoring unreadable cache file %s (%s); reprocessing", target, exc)
        else:
            if data.sha256 == digest:
                data.source = str(path)
                return data
            logger.warning("cache file %s belongs to another file; reprocessing", target)
    data = process_csv(path, workers=workers, progress=progress)
    try:
        save_processed(data, target)
    except OSError as exc:  # a read-only cache must not stop the caller
        logger.warning("could not write cache file %s: %s", target, exc)
    return data
