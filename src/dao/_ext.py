"""Access to the compiled core and to optional accelerators.

The compiled module ``dao._C`` is torch-free; this file is the only place that
imports it, so a broken or missing build gives one clear message.
"""

from __future__ import annotations

import functools
import importlib.util
import os

__all__ = ["load_core", "has_cuda_ext", "has_triton", "num_threads", "triton_interpret"]


@functools.cache
def load_core():
    """Return the compiled ``dao._C`` module, or raise an ImportError that says how to build it."""
    try:
        from dao import _C  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "dao's compiled core (dao._C) is missing: install the package with "
            "`pip install .` (it builds the C++ extension) rather than putting src/ on "
            "the path"
        ) from exc
    return _C


def has_cuda_ext() -> bool:
    """True if ``dao._C`` was compiled with CUDA kernels (DAO_ENABLE_CUDA=ON)."""
    try:
        return bool(load_core().WITH_CUDA)
    except ImportError:
        return False


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def has_triton() -> bool:
    """True if Triton kernels can run: triton imports and a GPU or the interpreter is there."""
    if not _triton_importable():
        return False
    import torch  # noqa: PLC0415

    return torch.cuda.is_available() or triton_interpret()


def num_threads() -> int:
    """Threads for the C++ kernels: ``$DAO_NUM_THREADS`` if set, else torch's intra-op
    thread count (at least 1)."""
    env = os.environ.get("DAO_NUM_THREADS")
    if env:
        return max(1, int(env))
    import torch  # noqa: PLC0415

    return max(1, torch.get_num_threads())
