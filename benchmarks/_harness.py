"""Shared benchmark harness: thread control, machine facts, "not run" records, timing.

Every ``benchmarks/bench_<op>.py`` uses this module (through the fixtures and
hooks of ``benchmarks/conftest.py``) so that all committed results carry the
same facts: the intra-op thread count they ran at, the machine (CPU model,
cores, load average at the start), library versions and the git commit.

On the 2-core development machines a second busy process slows memory-bound
code several-fold (docs PERF_NOTES), so the thread count is explicit (default
2, ``--bench-threads`` or ``DAO_BENCH_THREADS`` to change) and the 1-minute
load average is stored with the session and with every row.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_THREADS",
    "ENV_THREADS",
    "REPO_ROOT",
    "core_build_id",
    "cpu_model",
    "dist_version",
    "env",
    "git_commit",
    "load_avg",
    "machine_facts",
    "record_not_run",
    "resolve_threads",
    "threads",
    "row_facts",
    "time_call",
    "wait_for_load",
    "write_rows_csv",
]

DEFAULT_THREADS = 2
ENV_THREADS = "DAO_BENCH_THREADS"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Distributions whose versions every result records (peers that are not
# installed are recorded as missing, not left out).
DEFAULT_DISTS = (
    "dao-csp",
    "torch",
    "numpy",
    "pytest-benchmark",
    "vesin",
    "matscipy",
    "ase",
    "pymatgen",
    "pymatgen-core",
    "torch-nl",
)


def resolve_threads(option: int | None = None) -> int:
    """Harness thread count: the command-line option, else ``DAO_BENCH_THREADS``, else 2."""
    if option is not None:
        return max(1, int(option))
    env = os.environ.get(ENV_THREADS)
    return max(1, int(env)) if env else DEFAULT_THREADS


@contextlib.contextmanager
def threads(n: int) -> Iterator[int]:
    """Run the body with ``n`` torch intra-op threads and ``DAO_NUM_THREADS=n``.

    dao's C++ core reads ``DAO_NUM_THREADS`` before ``torch.get_num_threads()``,
    so both are set: a stray environment variable must not change the count a
    row claims to have used.
    """
    old_torch = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with env("DAO_NUM_THREADS", n):
            yield n
    finally:
        torch.set_num_threads(old_torch)


@contextlib.contextmanager
def env(name: str, value) -> Iterator[None]:
    """``$name`` = ``str(value)`` inside (left as it is when value is None), restored after."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = str(value)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def load_avg() -> list[float]:
    """(1, 5, 15)-minute load averages, or empty where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []


def wait_for_load(limit: float, timeout_s: float = 600.0, poll_s: float = 10.0) -> float:
    """Sleep until the 1-minute load average is at most ``limit`` (or ``timeout_s`` passes).

    Returns the seconds waited. Other people's jobs share these machines; waiting
    is cheaper than a run whose 2-thread rows measure someone else's compile.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        now = load_avg()
        if not now or now[0] <= limit:
            break
        time.sleep(poll_s)
    return time.monotonic() - t0


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def dist_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> dict[str, Any]:
    """HEAD commit and whether tracked files differ from it (other work in progress).

    ``$DAO_BENCH_COMMIT``, where set, names the commit instead: a copy of the tree sent
    to a GPU machine may carry no git metadata, or stale metadata."""
    if os.environ.get("DAO_BENCH_COMMIT"):
        return {"id": os.environ["DAO_BENCH_COMMIT"], "short": os.environ["DAO_BENCH_COMMIT"][:10],
                "dirty": False}  # fmt: skip
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"id": sha, "short": sha[:10] if sha else None, "dirty": bool(status)}


def core_build_id() -> str | None:
    """First 12 hex digits of the sha256 of the compiled core ``dao._C``.

    The commit alone does not pin the code that ran: the extension is built at
    install time and may lag or lead the checkout.
    """
    spec = importlib.util.find_spec("dao._C")
    if spec is None or not spec.origin:
        return None
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:12]


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}"
    return "cpu"


def machine_facts(
    n_threads: int, start_load: list[float], dists: tuple[str, ...] = DEFAULT_DISTS
) -> dict[str, Any]:
    """The facts stored once per benchmark session (pytest-benchmark ``machine_info``)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "harness_threads": n_threads,
        "load_avg_start": start_load,
        "load_avg_end": load_avg(),
        "device": _device_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_config_threads": torch.get_num_threads(),
        "versions": {d: dist_version(d) for d in dists},
        "git": git_commit(),
        "core_build": core_build_id(),
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DAO_NUM_THREADS", ENV_THREADS)
            if k in os.environ
        },
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def record_not_run(config: Any, reason: str, **fields: Any) -> None:
    """Remember a provider/workload that was deliberately not timed, with why.

    The rows end up in the benchmark JSON (key ``dao_not_run``) and from there
    in the CSV, so a missing peer is visible rather than silently absent.
    """
    rows = getattr(config, "_dao_not_run", None)
    if rows is None:
        rows = []
        config._dao_not_run = rows
    rows.append({**fields, "reason": reason, "load_avg": load_avg()})


def time_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Call ``fn`` once; return (result, seconds). For untimed checks and warm-ups."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def row_facts(n_threads: int, device: str) -> dict[str, Any]:
    """The facts every row of a plain-script benchmark carries: threads, device name,
    torch version, commit (``+dirty`` when tracked files differ), load and UTC time."""
    git = git_commit()
    return {
        "threads": n_threads,
        "device": device,
        "torch": torch.__version__,
        "commit": (git.get("id") or "") + ("+dirty" if git.get("dirty") else ""),
        "load_avg_1min": load_avg()[0],
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def set_provider(model, provider: str) -> str:
    """Point a Crysformer at the path a benchmark provider names and return the suffix.

    Names read ``PATH[-BACKEND][+SUFFIX]``: PATH is ``reference`` (the naive per-layer
    path), ``factorized`` or ``fused``; BACKEND the fused op's backend (default auto);
    SUFFIX (``cuda_graph``, ``compile``, or "") how the caller runs it."""
    head, _, suffix = provider.partition("+")
    path, _, backend = head.partition("-")
    model.edge_impl = "naive" if path == "reference" else path
    model.edge_backend = backend or "auto"
    return suffix


def attempt(fn, *args, label: str, device: str):
    """``fn(*args)``, or None when it raises: a provider that fails is reported (traceback
    and a FAILED line naming ``label``) and its row left out, so the other rows of a
    short GPU lease still get measured."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        print(f"FAILED: {label} (no row written)", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        return None


def write_rows_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write benchmark rows (one dict each, same keys) as a CSV; returns the path."""
    import csv  # noqa: PLC0415

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {len(rows)} rows to {out}")
    return out


def replace_section(md: str | os.PathLike, begin: str, end: str, block: str) -> Path:
    """Put ``block`` (starting with ``begin``, ending with ``end``) in the markdown file
    ``md`` in place of the old block between those markers, or append it."""
    path = Path(md)
    text = path.read_text() if path.exists() else ""
    if begin in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1] if end in rest else ""
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"updated {path}")
    return path
