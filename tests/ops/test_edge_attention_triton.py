"""Triton kernels of the edge-attention core against the reference twin.

The kernels (``dao.kernels.edge_attention``) are compared with
:func:`dao.reference.edge_attention.edge_attention_core` evaluated in float64 on the
same values: the forward outputs (o, y, lse) and the gradients of all six inputs,
with the tolerance row of the kernel's dtype. Gradients of the fractional
coordinates carry factors 2πk, so they are compared relative to their largest
entry (as in ``test_edge_attention.py``).

Without a GPU the kernels run in Triton's CPU interpreter, which needs
``TRITON_INTERPRET=1`` *before triton is first imported* (``triton.jit`` picks
interpreter or compiler when a function is decorated, triton's own library
functions included). Hence, as in ``test_neighbor_list_triton.py``:

* in this process, when triton is not imported yet or was imported with the
  interpreter on (e.g. ``pytest tests/ops/test_edge_attention_triton.py``): the
  module-scoped ``_triton_mode`` fixture sets ``TRITON_INTERPRET=1`` for this
  module only, (re)imports ``dao.kernels.edge_attention`` in interpreter mode and
  restores the environment afterwards;
* otherwise those tests skip and ``test_interpreter_in_fresh_process`` runs this
  file in a child pytest with ``TRITON_INTERPRET=1`` set from the start.

With a GPU (and no ``TRITON_INTERPRET`` set by the caller) the same tests run
compiled on CUDA tensors, and the ``gpu`` class checks MP-20-like batches at the
paper's sizes (K = 128, H = 8, d = 48) in float32 and bfloat16.

Inputs are scaled like a layer's: q ~ 1/√d (pre-scaled), u and the gradient of y
~ 1/√D per entry, so q·k, u·z and dY·z are O(1) and float32 rounding stays inside
its tolerance row.
"""

from __future__ import annotations

import importlib
import importlib.util
import math

import numpy as np
import pytest
import torch
from helpers import (
    TOLERANCES,
    TRITON_INTERPRET_MODE,
    assert_close,
    random_cell,
    run_in_fresh_interpreter,
    triton_kernel_module,
)

from dao._graph import lattice_gram
from dao.ops.edge_attention import edge_attention
from dao.reference import edge_attention as ref

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs the triton package"
)

_INTERPRET = TRITON_INTERPRET_MODE
DEVICE = "cpu" if _INTERPRET else "cuda"
DTYPES = [torch.float64, torch.float32]
GRAD_NAMES = ("q", "k", "v", "u", "frac", "gram")


@pytest.fixture(scope="module")
def _triton_mode():
    yield from triton_kernel_module("dao.kernels.edge_attention", "_edge_attention_fwd_kernel")


def test_interpreter_in_fresh_process():
    run_in_fresh_interpreter(__file__)


# ----------------------------------------------------------------- problems


def _problem(seed: int, sizes, num_freqs: int, heads: int, head_dim: int) -> dict:
    """A float64 batch: crystals of ``sizes`` atoms with random cells (gram = L·Lᵀ),
    coordinates partly outside [0, 1), node inputs and output gradients."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    n, b = sum(sizes), len(sizes)
    dim = 6 * num_freqs + 9
    cells = [random_cell(rng, max(s, 1) * rng.uniform(15.0, 25.0), 0.3) for s in sizes]
    lattice = torch.tensor(np.stack(cells) if cells else np.zeros((0, 3, 3)))

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "q": randn(n, heads, head_dim, scale=1 / math.sqrt(head_dim)),
        "k": randn(n, heads, head_dim),
        "v": randn(n, heads, head_dim),
        "u": randn(n, heads, dim, scale=1 / math.sqrt(dim)),
        "frac": 3.0 * torch.rand(n, 3, generator=g, dtype=torch.float64) - 1.0,
        "gram": lattice_gram(lattice),
        "batch": torch.repeat_interleave(torch.arange(b), torch.tensor(sizes, dtype=torch.int64)),
        "ptr": torch.tensor([0, *np.cumsum(sizes)], dtype=torch.int64),
        "grad_o": randn(n, heads, head_dim),
        "grad_y": randn(n, heads, dim, scale=1 / math.sqrt(dim)),
        "num_freqs": num_freqs,
    }


def _inputs(p: dict, dtype: torch.dtype) -> list[torch.Tensor]:
    return [p[name].to(dtype) for name in GRAD_NAMES]


def _reference(p: dict, dtype: torch.dtype, device="cpu"):
    """(o, y, lse) and the six gradients of the float64 twin on the dtype-rounded values."""
    ins = [t.to(device, torch.float64).requires_grad_(True) for t in _inputs(p, dtype)]
    o, y, lse = ref.edge_attention_core(*ins, p["batch"].to(device), p["num_freqs"])
    grad_o, grad_y = (p[name].to(dtype).to(device, torch.float64) for name in ("grad_o", "grad_y"))
    grads = torch.autograd.grad((o, y), ins, (grad_o, grad_y))
    return tuple(t.detach().cpu() for t in (o, y, lse)), tuple(t.cpu() for t in grads)


def _run_kernels(kernels, p: dict, dtype: torch.dtype, device=DEVICE, eps=1e-5):
    """Forward and backward launchers on ``device`` in ``dtype``; results on the CPU."""
    dev = torch.device(device)
    ins = [t.to(dev) for t in _inputs(p, dtype)]
    batch, ptr = p["batch"].to(dev), p["ptr"].to(dev)
    k = p["num_freqs"]
    o, y, lse = kernels.edge_attention_core_forward(*ins, batch, ptr, k, eps)
    grad_o, grad_y = (p[name].to(dev, dtype) for name in ("grad_o", "grad_y"))
    grads = kernels.edge_attention_core_backward(
        grad_o, grad_y, *ins, batch, ptr, o, y, lse, k, eps
    )
    return tuple(t.cpu() for t in (o, y, lse)), tuple(t.cpu() for t in grads)


def _assert_matches(got, expected, dtype: torch.dtype):
    """Outputs with the tolerance row of ``dtype``; dfrac relative to its largest entry."""
    (o, y, lse), grads = got
    (o_ref, y_ref, lse_ref), grads_ref = expected
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert o.dtype == y.dtype == dtype and lse.dtype == lse_dtype
    assert o.shape == o_ref.shape and y.shape == y_ref.shape and lse.shape == lse_ref.shape
    assert_close(o, o_ref, dtype)
    assert_close(y, y_ref, dtype)
    assert_close(lse, lse_ref, dtype)
    tol = TOLERANCES[dtype]
    for name, a, b in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        assert a.dtype == dtype and a.shape == b.shape, name
        scale = max(1.0, float(b.abs().max())) if name == "frac" and b.numel() else 1.0
        torch.testing.assert_close(
            a.double() / scale, b / scale, atol=tol["atol"], rtol=tol["rtol"], msg=name
        )


# ----------------------------------------------------------------- tests

# (sizes, K, H, d): five-crystal batches (not a multiple of any block), a 1-atom
# crystal, crystals spanning several 16-atom tiles, empty crystals, and K = 6
# so that the 3K = 18 trig columns take two chunks.
CASES = {
    "k1_h1": ([3, 1, 5], 1, 1, 2),
    "five_crystals": ([7, 1, 4, 2, 9], 3, 2, 4),
    "one_atom": ([1], 3, 2, 2),
    "several_tiles": ([18, 1, 33], 3, 2, 4),
    "empty_crystals": ([0, 3, 0, 2], 1, 2, 2),
    "two_trig_chunks": ([4, 6], 6, 1, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(_triton_mode, dtype, case):
    sizes, num_freqs, heads, head_dim = CASES[case]
    p = _problem(list(CASES).index(case), sizes, num_freqs, heads, head_dim)
    before = {name: p[name].clone() for name in GRAD_NAMES}
    _assert_matches(_run_kernels(_triton_mode, p, dtype), _reference(p, dtype), dtype)
    for name in GRAD_NAMES:  # the launchers never write into their inputs
        assert torch.equal(p[name], before[name]), name


@pytest.mark.parametrize("per_program", [None, "1", "2", "4"])
def test_forward_head_groups(_triton_mode, monkeypatch, per_program):
    # DAO_TRITON_FWD_HEADS splits the forward's heads over a second grid axis (default
    # one head per program; "8" >= H puts all in one): H = 3 (a masked head in the last
    # group of 2) and H = 4; the results of one program for all heads (up to rounding),
    # and the reference's.
    monkeypatch.delenv(_triton_mode.FWD_HEADS_ENV, raising=False)
    assert _triton_mode._forward_heads_per_program(8) == 1
    for seed, heads in ((31, 3), (32, 4)):
        p = _problem(seed, [5, 1, 18], 2, heads, 4)
        monkeypatch.setenv(_triton_mode.FWD_HEADS_ENV, "8")
        whole = _run_kernels(_triton_mode, p, torch.float64)
        if per_program is None:
            monkeypatch.delenv(_triton_mode.FWD_HEADS_ENV)
        else:
            monkeypatch.setenv(_triton_mode.FWD_HEADS_ENV, per_program)
        split = _run_kernels(_triton_mode, p, torch.float64)
        for a, b in zip([*split[0], *split[1]], [*whole[0], *whole[1]], strict=True):
            assert_close(a, b, torch.float64)  # compiled dots may tile rows differently
        _assert_matches(split, _reference(p, torch.float64), torch.float64)


def test_forward_head_groups_checked(_triton_mode, monkeypatch):
    for bad in ("3", "0", "two"):
        monkeypatch.setenv(_triton_mode.FWD_HEADS_ENV, bad)
        with pytest.raises(ValueError, match="power of two"):
            _run_kernels(_triton_mode, _problem(33, [2], 1, 2, 2), torch.float32)


def test_bfloat16_in_float32(_triton_mode):
    # bf16 in, float32 accumulation: o, y and the gradients in bf16, lse in float32.
    p = _problem(3, [5, 1, 8], 3, 2, 4)
    dtype = torch.bfloat16
    _assert_matches(_run_kernels(_triton_mode, p, dtype), _reference(p, dtype), dtype)


def test_large_scores_and_eps(_triton_mode):
    # k + 40 adds 40·Σ_e q_ie to every score of row i: scores far from 0 (the online
    # softmax must rescale, exp must not overflow) and another eps, in float64.
    p = _problem(11, [6, 2, 19], 2, 2, 4)
    p["k"] = p["k"] + 40.0
    got = _run_kernels(_triton_mode, p, torch.float64, eps=0.3)
    ins = [t.clone().requires_grad_(True) for t in _inputs(p, torch.float64)]
    o, y, lse = ref.edge_attention_core(*ins, p["batch"], p["num_freqs"], eps=0.3)
    grads = torch.autograd.grad((o, y), ins, (p["grad_o"], p["grad_y"]))
    assert float(lse.detach().abs().max()) > 20.0
    _assert_matches(got, ((o.detach(), y.detach(), lse.detach()), grads), torch.float64)


@pytest.mark.parametrize("n_crystals", [0, 3])
def test_no_atoms(_triton_mode, n_crystals):
    p = _problem(0, [0] * n_crystals, 2, 2, 3)
    (o, y, lse), grads = _run_kernels(_triton_mode, p, torch.float32)
    assert o.shape == (0, 2, 3) and y.shape == (0, 2, 21) and lse.shape == (0, 2)
    assert [tuple(g.shape) for g in grads] == [
        (0, 2, 3), (0, 2, 3), (0, 2, 3), (0, 2, 21), (0, 3), (n_crystals, 9)
    ]  # fmt: skip
    assert not grads[5].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_through_op(_triton_mode, dtype):
    """``dao.ops.edge_attention.edge_attention(backend="triton")`` against the naive
    reference: forward and the gradients of every tensor argument."""
    heads, head_dim, num_freqs = 2, 4, 3
    p = _problem(21, [4, 1, 6], num_freqs, heads, head_dim)
    n, h, dim = p["q"].shape[0], heads * head_dim, 6 * num_freqs + 9
    g = torch.Generator().manual_seed(22)
    lattice = torch.linalg.cholesky(p["gram"].reshape(-1, 3, 3))  # any L with L·Lᵀ = gram
    args = [
        p["q"].reshape(n, h),
        p["k"].reshape(n, h),
        p["v"].reshape(n, h),
        p["frac"],
        lattice,
        torch.randn(h, dim, generator=g, dtype=torch.float64) / math.sqrt(dim),
        torch.randn(h, generator=g, dtype=torch.float64),
        1 + 0.2 * torch.randn(dim, generator=g, dtype=torch.float64),
        0.2 * torch.randn(dim, generator=g, dtype=torch.float64),
    ]
    grad_out = torch.randn(n, h, generator=g, dtype=torch.float64)
    dev = torch.device(DEVICE)
    results = []
    for fn, run_dtype, device, kw in (
        (ref.edge_attention, torch.float64, "cpu", {}),
        (edge_attention, dtype, dev, {"backend": "triton"}),
    ):
        xs = [t.to(dtype).to(device, run_dtype).requires_grad_(True) for t in args]
        out = fn(*xs[:5], p["batch"].to(device), *xs[5:], heads, num_freqs, **kw)
        grads = torch.autograd.grad(out, xs, grad_out.to(dtype).to(device, run_dtype))
        results.append([out.detach().cpu(), *(t.cpu() for t in grads)])
    for a, b in zip(results[1], results[0], strict=True):
        assert a.dtype == dtype
        assert_close(a, b, dtype)


@pytest.mark.gpu
class TestCompiledOnGpu:
    """Compiled kernels on CUDA at MP-20-like sizes (≤ 20 atoms, K = 128, H = 8, d = 48)
    against the float64 twin (on the GPU: it materialises every edge). In the CPU
    interpreter this batch uses at most 0.51 (float32, dq) and 0.36 (bfloat16, y) of
    the tolerance rows; PyTorch's own float32 twin misses the float32 row."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_mp20_sizes(self, _triton_mode, dtype):
        sizes = np.random.default_rng(5).integers(1, 21, size=24).tolist()
        p = _problem(5, sizes, 128, 8, 48)
        got = _run_kernels(_triton_mode, p, dtype, device="cuda")
        _assert_matches(got, _reference(p, dtype, device="cuda"), dtype)
