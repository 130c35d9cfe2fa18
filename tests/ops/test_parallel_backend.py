"""The compiled core's threading backend (csrc/parallel.hpp).

With OpenMP, the core must share torch's OpenMP runtime: a second runtime would bring
back two thread pools competing for the same cores.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import pytest
import torch

from dao._ext import load_core


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _omp_library_of(path: str) -> str | None:
    """The file that provides omp_get_max_threads to the shared library ``path`` (its
    own dependency lookup, as the loader resolved it), or None if it has none."""
    try:
        fn = ctypes.CDLL(path).omp_get_max_threads
    except AttributeError:
        return None
    info = _DlInfo()
    libc = ctypes.CDLL(None)
    if not libc.dladdr(ctypes.c_void_p(ctypes.cast(fn, ctypes.c_void_p).value), ctypes.byref(info)):
        return None
    return os.path.realpath(info.dli_fname.decode())


def test_backend_is_reported():
    assert load_core().PARALLEL_BACKEND in ("openmp", "threads")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses the glibc loader")
def test_core_shares_torchs_openmp_runtime():
    """Our OpenMP calls must land in the runtime torch uses (other packages, e.g.
    scikit-learn, may load further copies for themselves; that is not ours to fix)."""
    core = load_core()
    if core.PARALLEL_BACKEND != "openmp":
        pytest.skip("the core was built without OpenMP")
    torch_cpu = next(Path(torch.__file__).parent.glob("lib/libtorch_cpu.*"), None)
    theirs = _omp_library_of(str(torch_cpu)) if torch_cpu else None
    if theirs is None:
        pytest.skip("torch does not use an OpenMP runtime here")
    ours = _omp_library_of(core.__file__)
    assert ours is not None
    assert ours == theirs, f"dao._C uses {ours}, torch uses {theirs}"
