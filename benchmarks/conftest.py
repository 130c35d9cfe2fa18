"""pytest plumbing of the shared benchmark harness (see ``_harness.py``).

Benchmarks are not part of the test suite: pyproject's ``testpaths`` is
``tests`` and the files are named ``bench_*.py``, so a plain ``pytest`` never
collects them. Run them explicitly, e.g.::

    pytest benchmarks/bench_neighbors.py --benchmark-json=benchmarks/results/neighbors.json
"""

from __future__ import annotations

from pathlib import Path

import _harness
import pytest
import torch

_BENCH_DIR = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("dao benchmarks")
    group.addoption(
        "--bench-threads",
        type=int,
        default=None,
        help=f"intra-op threads for dao and torch-based providers "
        f"(default: ${_harness.ENV_THREADS} or {_harness.DEFAULT_THREADS})",
    )
    group.addoption(
        "--bench-wait-load",
        type=float,
        default=None,
        metavar="LOAD",
        help="before starting, wait (up to 10 minutes) until the 1-minute load average is "
        "at most LOAD; the load is recorded either way",
    )
    group.addoption(
        "--bench-quick",
        action="store_true",
        default=False,
        help="smoke run on reduced workloads (checks the harness; results are not comparable)",
    )


def pytest_configure(config):
    limit = config.getoption("--bench-wait-load")
    config._dao_waited_s = _harness.wait_for_load(limit) if limit is not None else 0.0
    # Load before anything of ours runs: the figure that says how busy the machine was.
    config._dao_start_load = _harness.load_avg()
    config._dao_threads = _harness.resolve_threads(config.getoption("--bench-threads"))
    config._dao_not_run = []
    torch.set_num_threads(config._dao_threads)


def _bench_dir_named(config) -> bool:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        path = (base / arg.split("::")[0]).resolve()
        if path == _BENCH_DIR:
            return True
    return False


def pytest_collect_file(file_path, parent):
    # `pytest benchmarks` (the folder named on the command line) collects bench_*.py;
    # a bench file named on the command line is collected by pytest itself. A plain
    # `pytest` (testpaths = tests) or `pytest .` at the root collects no benchmark.
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and file_path.parent == _BENCH_DIR
        and not parent.session.isinitpath(file_path)
        and _bench_dir_named(parent.config)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_threads(pytestconfig) -> int:
    """The harness thread count (default 2)."""
    return pytestconfig._dao_threads


@pytest.fixture(scope="session")
def bench_quick(pytestconfig) -> bool:
    """True for a smoke run on reduced workloads."""
    return bool(pytestconfig.getoption("--bench-quick"))


@pytest.fixture(autouse=True)
def _fixed_threads(pytestconfig):
    # Every benchmark starts at the harness thread count, whatever the previous one did.
    with _harness.threads(pytestconfig._dao_threads):
        yield


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dao"] = _harness.machine_facts(
        getattr(config, "_dao_threads", _harness.DEFAULT_THREADS),
        getattr(config, "_dao_start_load", []),
    )
    machine_info["dao"]["quick"] = bool(config.getoption("--bench-quick", default=False))
    machine_info["dao"]["waited_for_load_s"] = round(getattr(config, "_dao_waited_s", 0.0), 1)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["dao_not_run"] = list(getattr(config, "_dao_not_run", []))
