import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter. Triton fixes its mode
# when first imported, so this has to happen before any test imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests use 2 intra-op threads at most; the C++ core follows torch's setting.
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """One intra-op thread, for tests of thousands of tiny ops (models, sampler): on a
    shared 2-core machine a second thread only adds a barrier per op, and a busy core
    turns each barrier into a ~10 ms stall. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
