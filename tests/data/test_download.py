"""`dao data download` without network: a local HTTP server (with Range) and file:// URLs."""

import argparse
import gzip
import hashlib
import http.server
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from dao.data.download import (
    DATASETS,
    ChecksumError,
    DownloadError,
    add_download_parser,
    download_dataset,
    download_file,
    git_blob_sha1,
)

FIXTURES = Path(__file__).parent / "fixtures"
PEROV_VAL = gzip.decompress((FIXTURES / "perov_5" / "val.csv.gz").read_bytes())
PILOT_TEST = gzip.decompress((FIXTURES / "mp_20_pilot" / "test.csv.gz").read_bytes())


class _Server:
    """Serves ``files`` {url path: bytes}; honours Range unless told not to.

    ``drop_after``: on the first request only, send the headers of the full answer
    but only this many bytes, then close (a dropped connection).
    """

    def __init__(self, files, *, ranges=True, drop_after=None):
        self.files, self.ranges, self.drop_after = files, ranges, drop_after
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404, "no such file")
                    return
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if outer.ranges and m:
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if outer.drop_after is not None and len(outer.requests) == 1:
                    payload = payload[: outer.drop_after]
                    self.close_connection = True
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---------------------------------------------------------------------- checksums
def test_git_blob_sha1_matches_git(tmp_path):
    p = tmp_path / "f.csv"
    p.write_bytes(PEROV_VAL)
    expected = hashlib.sha1(b"blob %d\0" % len(PEROV_VAL) + PEROV_VAL).hexdigest()
    assert git_blob_sha1(p) == expected
    if shutil.which("git"):
        out = subprocess.run(["git", "hash-object", str(p)], capture_output=True, text=True)
        assert out.stdout.strip() == expected


def test_registry():
    assert set(DATASETS) == {"mp_20", "mpts_52", "perov_5", "carbon_24"}
    assert DATASETS["mp_20"]["test"].git_blob_sha1 == "5dc643041df53f5ce4970a79930ad262b4f07acd"
    assert "txie-93/cdvae" in DATASETS["perov_5"]["train"].base_url
    assert all(r.git_blob_sha1 is None and r.sha256 is None for r in DATASETS["carbon_24"].values())


# ------------------------------------------------------------------------ transfers
def test_resume_from_truncated_part(tmp_path):
    dest = tmp_path / "out" / "val.csv"
    dest.parent.mkdir()
    Path(str(dest) + ".part").write_bytes(PEROV_VAL[:1000])
    with _Server({"/perov_5/val.csv": PEROV_VAL}) as srv:
        res = download_file(
            f"{srv.url}/perov_5/val.csv", dest, sha256=_sha256(PEROV_VAL), progress=False
        )
    assert srv.requests == [("/perov_5/val.csv", "bytes=1000-")]
    assert dest.read_bytes() == PEROV_VAL and not Path(str(dest) + ".part").exists()
    assert res.verified == "sha256" and res.sha256 == _sha256(PEROV_VAL)


def test_server_without_range_support_restarts(tmp_path):
    dest = tmp_path / "val.csv"
    Path(str(dest) + ".part").write_bytes(b"garbage that is not a prefix")
    with _Server({"/v.csv": PEROV_VAL}, ranges=False) as srv:
        download_file(f"{srv.url}/v.csv", dest, sha256=_sha256(PEROV_VAL), progress=False)
    assert dest.read_bytes() == PEROV_VAL


def test_dropped_connection_is_resumed(tmp_path):
    dest = tmp_path / "val.csv"
    with _Server({"/v.csv": PEROV_VAL}, drop_after=700) as srv:
        download_file(f"{srv.url}/v.csv", dest, sha256=_sha256(PEROV_VAL), progress=False)
    assert [r[1] for r in srv.requests] == [None, "bytes=700-"]
    assert dest.read_bytes() == PEROV_VAL


def test_complete_part_gets_416_and_is_verified(tmp_path):
    dest = tmp_path / "val.csv"
    Path(str(dest) + ".part").write_bytes(PEROV_VAL)
    with _Server({"/v.csv": PEROV_VAL}) as srv:
        res = download_file(f"{srv.url}/v.csv", dest, check_csv=True, progress=False)
    assert res.verified == "unpinned (parsed)" and dest.read_bytes() == PEROV_VAL


def test_checksum_mismatch_leaves_no_file(tmp_path):
    # the fixture is not the official MP-20 test split: its git blob id cannot match
    with _Server({"/mp_20/test.csv": PILOT_TEST}) as srv:
        with pytest.raises(ChecksumError, match="5dc643041df53f5ce4970a79930ad262b4f07acd"):
            download_dataset("mp_20", tmp_path, ["test"], base_url=srv.url, progress=False)
    assert list((tmp_path / "mp_20").iterdir()) == []  # neither test.csv nor test.csv.part


def test_user_pin_mismatch(tmp_path):
    base = tmp_path / "mirror"
    (base / "perov_5").mkdir(parents=True)
    (base / "perov_5" / "val.csv").write_bytes(PEROV_VAL)
    with pytest.raises(ChecksumError, match="sha256"):
        download_dataset(
            "perov_5", tmp_path / "d", ["val"], base_url=base.as_uri(), sha256={"val": "0" * 64}
        )
    assert not (tmp_path / "d" / "perov_5" / "val.csv").exists()


def test_file_url_and_existing_file(tmp_path):
    base = tmp_path / "mirror"
    (base / "perov_5").mkdir(parents=True)
    (base / "perov_5" / "val.csv").write_bytes(PEROV_VAL)
    (res,) = download_dataset(
        "perov_5", tmp_path / "d", ["val"], base_url=base.as_uri(), progress=False
    )
    assert res.path == tmp_path / "d" / "perov_5" / "val.csv"
    assert res.path.read_bytes() == PEROV_VAL and res.verified == "unpinned (parsed)"
    # a second call keeps the verified file; a wrong existing file is a clear error
    (again,) = download_dataset("perov_5", tmp_path / "d", ["val"], base_url=base.as_uri())
    assert again.sha256 == res.sha256
    with pytest.raises(DownloadError, match="already there"):
        download_file(base.as_uri() + "/perov_5/val.csv", res.path, sha256="1" * 64)


def test_http_errors_and_bad_content(tmp_path):
    with _Server({"/x/junk.csv": b"<html>rate limited</html>\n"}) as srv:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download_file(f"{srv.url}/missing.csv", tmp_path / "a.csv", progress=False)
        with pytest.raises(DownloadError, match="not a usable crystal CSV"):
            download_file(f"{srv.url}/x/junk.csv", tmp_path / "b.csv", check_csv=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown dataset"):
        download_dataset("mp_21", tmp_path)
    with pytest.raises(ValueError, match="unknown split"):
        download_dataset("mp_20", tmp_path, ["dev"])


# ----------------------------------------------------------------------------- CLI
def _cli(argv):
    parser = argparse.ArgumentParser(prog="dao")
    sub = parser.add_subparsers(dest="command", required=True)
    add_download_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_download(tmp_path, capsys):
    base = tmp_path / "mirror"
    (base / "carbon_24").mkdir(parents=True)
    carbon = gzip.decompress((FIXTURES / "carbon_24" / "val.csv.gz").read_bytes())
    (base / "carbon_24" / "val.csv").write_bytes(carbon)
    argv = ["data", "download", "carbon_24", "--split", "val", "--dest", str(tmp_path / "d")]
    assert _cli([*argv, "--base-url", base.as_uri(), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"sha256={_sha256(carbon)}" in out and "no published checksum" in out
    assert (tmp_path / "d" / "carbon_24" / "val.csv").read_bytes() == carbon

    with _Server({"/mp_20/val.csv": PILOT_TEST}) as srv:
        rc = _cli(
            ["data", "download", "mp_20", "--split", "val", "--dest", str(tmp_path / "f")]
            + ["--base-url", srv.url, "--no-progress"]
        )
    assert rc == 1
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "7efe4d7ebeb4f460ceaad35e5326c42111d9c9a1" in err
    assert not (tmp_path / "f" / "mp_20" / "val.csv").exists()
    with pytest.raises(SystemExit):
        _cli(["data", "download", "carbon_24", "--sha256", "val=xyz"])
