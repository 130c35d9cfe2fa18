"""Downloading the public benchmark CSVs: ``dao data download <name> [--dest DIR]``.

Sources (raw files of public repositories, MIT):

* MP-20, Perov-5, Carbon-24: the CDVAE repository,
  ``https://raw.githubusercontent.com/txie-93/cdvae/main/data/<name>/<split>.csv``.
* MPTS-52 is not in the CDVAE repository; it comes from the DiffCSP repository,
  ``https://raw.githubusercontent.com/jiaor17/DiffCSP/main/data/mpts_52/<split>.csv``.

Data licences: Materials Project (MP-20, MPTS-52) CC BY 4.0, Jain et al. 2013;
Perov-5, Castelli et al. 2012; Carbon-24, Pickard 2020.

Verification: the three MP-20 files are pinned by their git blob ids (sha1 of
``b"blob <size>\\0" + content``), published in the project's data README. For
the other files no checksum is known to this project: a download is accepted if
it is non-empty, is a CDVAE-format CSV whose first CIFs parse, and its sha256
and git blob id are printed so that users can pin them (``--sha256 SPLIT=HEX``).

Downloads are resumable: bytes go to ``<file>.part`` and an interrupted transfer
continues with an HTTP Range request; the file is verified, then renamed into
place atomically. A checksum mismatch deletes the ``.part`` and leaves no file.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dao.data.csv import parse_cif, read_csv_rows, sha256_file

__all__ = [
    "DATASETS",
    "ChecksumError",
    "DownloadError",
    "DownloadResult",
    "RemoteFile",
    "add_download_parser",
    "download_dataset",
    "download_file",
    "git_blob_sha1",
]

logger = logging.getLogger(__name__)

_CDVAE = "https://raw.githubusercontent.com/txie-93/cdvae/main/data"
_DIFFCSP = "https://raw.githubusercontent.com/jiaor17/DiffCSP/main/data"
_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class RemoteFile:
    """One downloadable file and what is known about its content."""

    base_url: str
    git_blob_sha1: str | None = None
    sha256: str | None = None


#: ``{dataset: {split: RemoteFile}}``. Only the MP-20 checksums are published (data README).
DATASETS: dict[str, dict[str, RemoteFile]] = {
    "mp_20": {
        "train": RemoteFile(_CDVAE, git_blob_sha1="b1c9d498565ac2fd8d075a51ff2ef5e51ba6c21f"),
        "val": RemoteFile(_CDVAE, git_blob_sha1="7efe4d7ebeb4f460ceaad35e5326c42111d9c9a1"),
        "test": RemoteFile(_CDVAE, git_blob_sha1="5dc643041df53f5ce4970a79930ad262b4f07acd"),
    },
    "mpts_52": {s: RemoteFile(_DIFFCSP) for s in _SPLITS},
    "perov_5": {s: RemoteFile(_CDVAE) for s in _SPLITS},
    "carbon_24": {s: RemoteFile(_CDVAE) for s in _SPLITS},
}


class DownloadError(RuntimeError):
    """A download failed (network, HTTP status, incomplete transfer, unusable content)."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected checksum; nothing was kept."""


@dataclass(frozen=True)
class DownloadResult:
    """A verified file: where it is, its checksums, and how it was verified."""

    path: Path
    sha256: str
    git_blob_sha1: str
    verified: str  # "git blob sha1", "sha256", or "unpinned (parsed)"


def git_blob_sha1(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """The git blob id of a file: sha1 of ``b"blob <size>\\0"`` followed by its bytes."""
    size = os.path.getsize(path)
    h = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


class _Incomplete(Exception):
    """The transfer ended early; the .part file holds what arrived (resume later)."""


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, chunk_size: int) -> None:
    """Append the rest of ``url`` to ``part`` (a Range request if ``part`` has bytes)."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dao-csp", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            return  # nothing left to fetch: the .part is complete (verification decides)
        raise
    with resp:
        status = resp.status  # None for file:// URLs, which ignore Range
        total = None
        if offset and status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                # A range we did not ask for: restart rather than splice wrong bytes.
                part.unlink()
                raise _Incomplete(f"server answered range {m.group(0) if m else '?'}")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:
            offset, mode = 0, "wb"  # full content (no Range support): start over
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with (
            open(part, mode) as fh,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name[: -len(".part")],
                disable=not progress,
            ) as bar,
        ):
            while chunk := resp.read(chunk_size):
                fh.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise _Incomplete(f"got {part.stat().st_size} of {total} bytes")


def _check_csv(path: Path, n_parse: int = 3) -> int:
    """A downloaded CSV must have data rows and parseable CIFs; returns the row count."""
    try:
        _, rows = read_csv_rows(path)
        n = 0
        for r in rows:
            if n < n_parse:
                parse_cif(r["cif"])
            n += 1
    except Exception as exc:
        raise DownloadError(f"{path} is not a usable crystal CSV: {exc}") from exc
    if n == 0:
        raise DownloadError(f"{path} has no data rows")
    return n


def download_file(
    url: str,
    dest: str | os.PathLike,
    *,
    git_blob_sha1: str | None = None,
    sha256: str | None = None,
    check_csv: bool = False,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 3,
    chunk_size: int = 1 << 20,
) -> DownloadResult:
    """Download ``url`` to ``dest``: resumable, verified, renamed into place atomically.

    Args:
        url: ``http(s)://`` or ``file://`` URL.
        dest: the final file; bytes accumulate in ``<dest>.part`` until verified.
        git_blob_sha1: expected git blob id of the content, if known.
        sha256: expected sha256 of the content, if known.
        check_csv: also require a crystal CSV whose first CIFs parse.
        progress: tqdm progress bar.
        timeout: socket timeout, seconds.
        retries: further attempts (each resuming the ``.part``) after a dropped transfer.
        chunk_size: read size, bytes.

    Returns:
        A :class:`DownloadResult`. An existing ``dest`` that verifies is kept as is.

    Raises:
        ChecksumError: content does not match; the ``.part`` is deleted, no ``dest``.
        DownloadError: HTTP errors, repeated interruptions (the ``.part`` is kept so a
            new call resumes), an empty file, or an existing ``dest`` that fails
            verification.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        try:
            return _verify(dest, url, git_blob_sha1, sha256, check_csv)
        except ChecksumError as exc:
            raise DownloadError(
                f"{exc}; the file was already there: delete it to download again"
            ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout=timeout, progress=progress, chunk_size=chunk_size)
            break
        except urllib.error.HTTPError as exc:
            if 500 <= exc.code < 600 and attempt < retries:
                logger.warning("%s: HTTP %d, retrying", url, exc.code)
                time.sleep(0.5 * 2**attempt)
                continue
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            kept = part.exists() and part.stat().st_size > 0
            if attempt == retries:
                where = (
                    f"partial data kept in {part}: run again to resume" if kept else "nothing saved"
                )
                raise DownloadError(
                    f"{url}: download failed after {retries + 1} attempts ({exc}); {where}"
                ) from exc
            logger.warning("%s: %s; %s", url, exc, "resuming" if kept else "retrying")
            time.sleep(0.5 * 2**attempt)
    if not part.exists() or part.stat().st_size == 0:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: empty download")
    try:
        result = _verify(part, url, git_blob_sha1, sha256, check_csv)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return DownloadResult(dest, result.sha256, result.git_blob_sha1, result.verified)


def _verify(path: Path, url: str, blob: str | None, sha256: str | None, check_csv: bool):
    got_sha256, got_blob = sha256_file(path), git_blob_sha1(path)
    if blob is not None and got_blob != blob.lower():
        raise ChecksumError(
            f"{url}: checksum mismatch: git blob sha1 {got_blob}, expected {blob} "
            f"({path.stat().st_size} bytes)"
        )
    if sha256 is not None and got_sha256 != sha256.lower():
        raise ChecksumError(
            f"{url}: checksum mismatch: sha256 {got_sha256}, expected {sha256} "
            f"({path.stat().st_size} bytes)"
        )
    if path.stat().st_size == 0:
        raise DownloadError(f"{url}: empty file")
    if check_csv:
        _check_csv(path)
    verified = "git blob sha1" if blob else "sha256" if sha256 else "unpinned (parsed)"
    return DownloadResult(path, got_sha256, got_blob, verified)


def download_dataset(
    name: str,
    dest: str | os.PathLike = "data",
    splits: list[str] | None = None,
    *,
    base_url: str | None = None,
    sha256: dict[str, str] | None = None,
    progress: bool = True,
    **kwargs,
) -> list[DownloadResult]:
    """Download the splits of a benchmark dataset to ``<dest>/<name>/<split>.csv``.

    Args:
        name: one of :data:`DATASETS` (``mp_20``, ``mpts_52``, ``perov_5``, ``carbon_24``).
        dest: destination root (the CDVAE/DiffCSP layout ``<dest>/<name>/<split>.csv``).
        splits: subset of ``train``, ``val``, ``test`` (default all).
        base_url: replace the repository URL (a mirror, or a local server in tests);
            files are fetched from ``<base_url>/<name>/<split>.csv``.
        sha256: user pins ``{split: hex}``, checked in addition to the built-in ones.
        progress: progress bars.
        **kwargs: passed to :func:`download_file` (``timeout``, ``retries``, ...).

    Returns:
        One :class:`DownloadResult` per split, in order.

    Raises:
        ValueError: unknown dataset or split.
        DownloadError: see :func:`download_file`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    splits = list(_SPLITS) if splits is None else list(splits)
    bad = [s for s in splits if s not in DATASETS[name]]
    if bad:
        raise ValueError(f"unknown split(s) {bad} for {name}; choose from {list(DATASETS[name])}")
    pins = {k: v for k, v in (sha256 or {}).items()}
    extra = sorted(set(pins) - set(splits))
    if extra:
        raise ValueError(f"--sha256 given for split(s) {extra} that are not downloaded")
    results = []
    for split in splits:
        remote = DATASETS[name][split]
        base = (base_url or remote.base_url).rstrip("/")
        results.append(
            download_file(
                f"{base}/{name}/{split}.csv",
                Path(dest) / name / f"{split}.csv",
                git_blob_sha1=remote.git_blob_sha1,
                sha256=pins.get(split, remote.sha256),
                check_csv=True,
                progress=progress,
                **kwargs,
            )
        )
    return results


# ------------------------------------------------------------------------- CLI
def _parse_pin(text: str) -> tuple[str, str]:
    split, sep, hexdigest = text.partition("=")
    if not sep or not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest):
        raise argparse.ArgumentTypeError(f"expected SPLIT=<64 hex digits>, got {text!r}")
    return split, hexdigest.lower()


def _cmd_download(args: argparse.Namespace) -> int:
    try:
        results = download_dataset(
            args.name,
            args.dest,
            args.split,
            base_url=args.base_url,
            sha256=dict(args.sha256 or []),
            progress=not args.no_progress,
        )
    except (DownloadError, ValueError) as exc:
        print(f"dao data download: error: {exc}", file=sys.stderr)
        return 1
    for r in results:
        print(f"{r.path}  sha256={r.sha256}  git-blob-sha1={r.git_blob_sha1}  [{r.verified}]")
    if any(r.verified.startswith("unpinned") for r in results):
        print(
            f"note: no published checksum for {args.name}; the files parse, and the sha256 "
            "values above can be pinned with --sha256 SPLIT=HEX on other machines"
        )
    return 0


def add_download_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``dao data download`` on the top-level ``subparsers`` of the ``dao`` CLI.

    Adds the command group ``data`` with the subcommand ``download`` and sets
    ``func`` to its handler (returns the exit code). Returns the ``download`` parser.
    """
    data = subparsers.add_parser("data", help="datasets: download benchmark CSVs")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser(
        "download",
        help="download a benchmark dataset (CDVAE/DiffCSP CSVs), resumable and verified",
        description=(
            "Download the train/val/test CSVs of a benchmark dataset (CDVAE/DiffCSP "
            "repositories) to DEST/<name>/<split>.csv. Interrupted downloads resume; MP-20 "
            "files are checked against their published git blob ids, the others are "
            "checked to parse and their sha256 is printed for pinning."
        ),
    )
    p.add_argument("name", choices=sorted(DATASETS), help="dataset")
    p.add_argument("--dest", default="data", help="destination root (default: ./data)")
    p.add_argument(
        "--split",
        action="append",
        choices=list(_SPLITS),
        help="split to fetch (repeatable; default: all)",
    )
    p.add_argument("--base-url", help="mirror URL holding <name>/<split>.csv")
    p.add_argument(
        "--sha256",
        action="append",
        type=_parse_pin,
        metavar="SPLIT=HEX",
        help="expected sha256 of a split (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_download)
    return p
