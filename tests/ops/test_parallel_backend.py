"""The compiled core's threading backend (csrc/parallel.hpp).

With OpenMP, the core must share torch's OpenMP runtime: a second runtime would bring
back two thread pools competing for the same cores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dao._ext import load_core


def _mapped_libraries(name: str) -> set[str]:
    maps = Path("/proc/self/maps").read_text()
    return {line.split()[-1] for line in maps.splitlines() if name in line.split()[-1]}


def test_backend_is_reported():
    assert load_core().PARALLEL_BACKEND in ("openmp", "threads")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_with_torch():
    torch.zeros(1)  # torch (and its OpenMP runtime) loaded
    core = load_core()
    gomp = _mapped_libraries("libgomp")
    if core.PARALLEL_BACKEND != "openmp" or not any("torch" in p for p in gomp):
        pytest.skip("the core or torch does not use GNU OpenMP here")
    assert len(gomp) == 1, f"two OpenMP runtimes loaded: {sorted(gomp)}"
