"""Fused edge attention (C++ backend) against its reference twins.

The reference is :mod:`dao.reference.edge_attention` evaluated in float64; the
fused op runs in float64 and float32 and is compared with the tolerance row of
its dtype. Gradients of every input are checked the same way, plus gradcheck,
opcheck and torch.compile. Both C++ kernels (``DAO_EDGE_ATTENTION_KERNEL`` =
``gemm``, the default, and ``pairs``) go through the accuracy, thread-count and
instruction-set tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import TOLERANCES, assert_close

import dao.ops.edge_attention as ops_ea
from dao._ext import load_core
from dao.ops.edge_attention import CPP_KERNELS, edge_attention, edge_attention_core
from dao.reference import edge_attention as ref

KERNEL_ENV = "DAO_EDGE_ATTENTION_KERNEL"


@pytest.fixture(params=sorted(CPP_KERNELS))
def kernel(request, monkeypatch):
    """Runs the test once per C++ kernel (the switch is read at every call)."""
    monkeypatch.setenv(KERNEL_ENV, request.param)
    return request.param


def _batch(sizes, heads=2, d=3, num_freqs=3, seed=0, dtype=torch.float64, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    n, b = sum(sizes), len(sizes)
    dim = 6 * num_freqs + 9
    batch = torch.repeat_interleave(torch.arange(b), torch.tensor(sizes, dtype=torch.int64))
    q, k, v = (torch.randn(n, heads, d, generator=g, dtype=dtype) for _ in range(3))
    u = 0.3 * torch.randn(n, heads, dim, generator=g, dtype=dtype)
    # coordinates outside [0, 1) too: only Δf mod 1 may matter
    frac = spread * (3 * torch.rand(n, 3, generator=g, dtype=dtype) - 1)
    lattice = 2 * torch.randn(b, 3, 3, generator=g, dtype=dtype) + 4 * torch.eye(3, dtype=dtype)
    gram = (lattice @ lattice.transpose(1, 2)).reshape(b, 9)
    return q, k, v, u, frac, gram, batch, lattice


SIZES = [[3, 1, 5], [7], [2, 0, 4, 1], [1], [11, 17, 9]]


@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3), (1, 4, 1), (3, 2, 5)], ids=str)
def test_core_matches_reference(sizes, dtype, shape, kernel):
    heads, d, num_freqs = shape
    q, k, v, u, frac, gram, batch, _ = _batch(sizes, heads, d, num_freqs, seed=len(sizes))
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    o_ref, y_ref, lse_ref = ref.edge_attention_core(*ins, batch, num_freqs)
    g = torch.Generator().manual_seed(1)
    go, gy = torch.randn(o_ref.shape, generator=g), torch.randn(y_ref.shape, generator=g)
    grads_ref = torch.autograd.grad((o_ref, y_ref), ins, (go.double(), gy.double()))

    low = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    o, y, lse = edge_attention_core(*low, batch, num_freqs, backend="cpp")
    assert o.dtype == y.dtype == lse.dtype == dtype
    for a, b in ((o, o_ref), (y, y_ref), (lse, lse_ref)):
        assert_close(a, b.detach(), dtype)
    grads = torch.autograd.grad((o, y), low, (go.to(dtype), gy.to(dtype)))
    names = ("q", "k", "v", "u", "frac", "gram")
    for name, a, b in zip(names, grads, grads_ref, strict=True):
        # frac gradients carry factors 2πk: compare them relative to their scale
        scale = max(1.0, float(b.abs().max())) if name == "frac" else 1.0
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(
            a.double() / scale, b / scale, atol=tol["atol"], rtol=tol["rtol"], msg=name
        )


@pytest.mark.parametrize("backend", ["cpp", "dense"])
def test_full_op_matches_naive_reference(backend):
    """The composite (folded LayerNorm affine, u = W'ᵀq, W'·y) equals the naive
    per-edge computation, forward and gradients of every tensor argument."""
    heads, d, num_freqs = 2, 4, 3
    dim = 6 * num_freqs + 9
    q, k, v, _, frac, _, batch, lattice = _batch([4, 1, 3], heads, d, num_freqs, seed=5)
    g = torch.Generator().manual_seed(6)
    h = heads * d
    params = [
        0.3 * torch.randn(h, dim, generator=g, dtype=torch.float64),
        torch.randn(h, generator=g, dtype=torch.float64),
        1 + 0.2 * torch.randn(dim, generator=g, dtype=torch.float64),
        0.2 * torch.randn(dim, generator=g, dtype=torch.float64),
    ]
    args = [t.reshape(-1, h) for t in (q, k, v)] + [frac, lattice]
    outs, grads = [], []
    for fn, kw in ((ref.edge_attention, {}), (edge_attention, {"backend": backend})):
        xs = [t.clone().requires_grad_(True) for t in args + params]
        out = fn(*xs[:5], batch, *xs[5:], heads, num_freqs, **kw)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), xs))
    assert_close(outs[1], outs[0].detach())
    for a, b in zip(grads[1], grads[0], strict=True):
        assert_close(a, b)


def test_precomputed_fold_gives_the_same_result():
    """``folded=`` (the LayerNorm affine folded by the caller) gives the op's own result,
    and gradients reach the raw weights through a fold computed with autograd."""
    heads, d, num_freqs = 2, 4, 3
    dim = 6 * num_freqs + 9
    q, k, v, _, frac, _, batch, lattice = _batch([4, 1, 3], heads, d, num_freqs, seed=7)
    g = torch.Generator().manual_seed(8)
    h = heads * d
    w, eb = (
        torch.randn(h, dim, generator=g, dtype=torch.float64),
        torch.randn(h, generator=g, dtype=torch.float64),
    )
    nw, nb = (
        1 + 0.2 * torch.randn(dim, generator=g, dtype=torch.float64),
        0.2 * torch.randn(dim, generator=g, dtype=torch.float64),
    )
    args = [t.reshape(-1, h) for t in (q, k, v)] + [frac, lattice, batch]
    params = [t.clone().requires_grad_(True) for t in (w, eb, nw, nb)]
    plain = edge_attention(*args, *params, heads, num_freqs)
    grads_plain = torch.autograd.grad(plain.square().sum(), params)
    params2 = [t.clone().requires_grad_(True) for t in (w, eb, nw, nb)]
    fold = (params2[0] * params2[2], torch.mv(params2[0], params2[3]) + params2[1])
    folded = edge_attention(*args, *params2, heads, num_freqs, folded=fold)
    grads_folded = torch.autograd.grad(folded.square().sum(), params2)
    torch.testing.assert_close(folded, plain, rtol=0, atol=0)
    for a, b in zip(grads_folded, grads_plain, strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="folded must be"):
        edge_attention(*args, w, eb, nw, nb, heads, num_freqs, folded=(fold[0][:, :-1], fold[1]))


def test_gradcheck_small(kernel):
    heads, d, num_freqs = 2, 2, 2
    dim = 6 * num_freqs + 9
    q, k, v, _, frac, _, batch, lattice = _batch([3, 2], heads, d, num_freqs, seed=9)
    g = torch.Generator().manual_seed(10)
    h = heads * d
    w = 0.3 * torch.randn(h, dim, generator=g, dtype=torch.float64)
    b = torch.randn(h, generator=g, dtype=torch.float64)
    gam = 1 + 0.2 * torch.randn(dim, generator=g, dtype=torch.float64)
    bet = 0.2 * torch.randn(dim, generator=g, dtype=torch.float64)
    xs = [t.reshape(-1, h) for t in (q, k, v)] + [frac, lattice, w, b, gam, bet]
    xs = [t.clone().requires_grad_(True) for t in xs]

    def fn(q, k, v, frac, lattice, w, b, gam, bet):
        return edge_attention(q, k, v, frac, lattice, batch, w, b, gam, bet, heads, num_freqs)

    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6)


# torch 2.14's fake-tensor conversion inside opcheck (torch/_subclasses/meta_utils.py)
# reads .grad of a non-leaf tensor it made itself and warns; not our op's doing, and
# every opcheck test still runs and must pass.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("backend", ["cpp", "dense"])
def test_opcheck(backend):
    q, k, v, u, frac, gram, batch, _ = _batch([3, 2], seed=11)
    ptr = torch.tensor([0, 3, 5])
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    torch.library.opcheck(
        torch.ops.dao.edge_attention_core.default, (*ins, batch, ptr, 3, 1e-5, backend)
    )
    o, y, lse = torch.ops.dao.edge_attention_core(*ins, batch, ptr, 3, 1e-5, backend)
    args = (torch.ones_like(o), torch.ones_like(y), q, k, v, u, frac, gram, batch, ptr)
    torch.library.opcheck(
        torch.ops.dao.edge_attention_core_backward.default,
        (*args, o.detach(), lse, 3, 1e-5, backend),
    )


@pytest.mark.parametrize("backend", ["cpp", "dense"])
def test_torch_compile_forward_and_backward(backend):
    q, k, v, u, frac, gram, batch, _ = _batch([4, 2, 3], seed=12)

    def loss(q, k, v, u, frac, gram):
        o, y, _ = edge_attention_core(q, k, v, u, frac, gram, batch, 3, backend=backend)
        return o.square().sum() + (y * y.detach()).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    ys = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    eager, comp = loss(*xs), compiled(*ys)
    assert_close(comp, eager.detach())
    for a, b in zip(torch.autograd.grad(comp, ys), torch.autograd.grad(eager, xs), strict=True):
        assert_close(a, b)


def test_thread_count_does_not_change_results(kernel):
    q, k, v, u, frac, gram, batch, _ = _batch([5, 3, 6, 2, 4], seed=13, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        results = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            xs = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
            o, y, lse = edge_attention_core(*xs, batch, 3, backend="cpp")
            grads = torch.autograd.grad((o, y), xs, (torch.ones_like(o), torch.ones_like(y)))
            results.append((o, y, lse, *grads))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_generic_and_avx2_builds_agree(kernel):
    """The baseline build (forced with DAO_EDGE_ATTENTION_ISA=generic, in a child
    process: the choice is made once per process) matches this process's build."""
    sizes, seed = [4, 3], 14
    code = (
        "import json, sys, torch; sys.path.insert(0, 'tests');"
        "from ops.test_edge_attention import _batch;"
        "from dao._ext import load_core;"
        "from dao.ops.edge_attention import edge_attention_core;"
        f"q, k, v, u, frac, gram, batch, _ = _batch({sizes}, seed={seed});"
        "o, y, lse = edge_attention_core(q, k, v, u, frac, gram, batch, 3, backend='cpp');"
        "print(json.dumps([load_core().edge_attention_isa(), o.tolist(), y.tolist()]))"
    )
    env = dict(os.environ, DAO_EDGE_ATTENTION_ISA="generic")  # inherits the kernel
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    isa, o_gen, y_gen = json.loads(out.stdout.strip().splitlines()[-1])
    assert isa == "generic"
    q, k, v, u, frac, gram, batch, _ = _batch(sizes, seed=seed)
    o, y, _ = edge_attention_core(q, k, v, u, frac, gram, batch, 3, backend="cpp")
    assert load_core().edge_attention_isa() in ("avx2", "generic")
    assert_close(torch.tensor(o_gen, dtype=torch.float64), o)
    assert_close(torch.tensor(y_gen, dtype=torch.float64), y)


def test_empty_input(kernel):
    q, k, v, u, frac, gram, batch, _ = _batch([0, 0])
    o, y, lse = edge_attention_core(q, k, v, u, frac, gram, batch, 3, backend="cpp")
    assert o.shape == (0, 2, 3) and y.shape == (0, 2, 27) and lse.shape == (0, 2)


def _bad(**change):
    q, k, v, u, frac, gram, batch, _ = _batch([3, 2])
    args = dict(q=q, k=k, v=v, u=u, frac=frac, gram=gram, batch=batch, num_freqs=3)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=torch.zeros(5, 2, 4, dtype=torch.float64)), "q, k, v"),
        (dict(u=torch.zeros(5, 2, 20, dtype=torch.float64)), "u must be"),
        (dict(frac=torch.zeros(5, 2, dtype=torch.float64)), "frac must be"),
        (dict(gram=torch.zeros(2, 8, dtype=torch.float64)), "gram must be"),
        (dict(batch=torch.tensor([0, 1, 0, 1, 1])), "sorted"),
        (dict(batch=torch.tensor([0, 0, 0, 1, 2])), "outside"),
        (dict(batch=torch.zeros(5)), "integer"),
        (dict(frac=torch.zeros(5, 3)), "one floating dtype"),
        (dict(num_freqs=0), "num_freqs"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        edge_attention_core(**_bad(**change), backend="cpp")


def test_bad_backend_and_dtype():
    with pytest.raises(ValueError, match="backend must be"):
        edge_attention_core(**_bad(), backend="fast")
    half = {
        k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
        for k, v in _bad().items()
    }
    with pytest.raises(ValueError, match="float32 or float64"):
        edge_attention_core(**half, backend="cpp")
    with pytest.raises(ValueError, match="divisible"):
        edge_attention(
            *(torch.zeros(5, 6) for _ in range(3)),
            torch.zeros(5, 3),
            torch.eye(3).expand(2, 3, 3),
            torch.tensor([0, 0, 0, 1, 1]),
            torch.zeros(6, 27),
            torch.zeros(6),
            torch.ones(27),
            torch.zeros(27),
            heads=4,
            num_freqs=3,
        )


def test_compiled_core_rejects_inconsistent_sizes():
    """The C++ entry point checks what the Python layer promises (a clear error,
    never a read out of bounds)."""
    core = load_core()
    ptr = torch.tensor([0, 3, 4])  # ends at 4, but n_atoms = 5
    buf = torch.zeros(1000, dtype=torch.float64)
    p = buf.data_ptr()
    with pytest.raises(ValueError, match="ptr must run"):
        core.edge_attention_forward(
            p, p, p, p, p, p, ptr.data_ptr(), p, p, p, 5, 2, 2, 3, 27, 3, 1e-5, 1, 1, 1
        )
    with pytest.raises(ValueError, match="dim must be"):
        core.edge_attention_forward(
            p, p, p, p, p, p, ptr.data_ptr(), p, p, p, 4, 2, 2, 3, 26, 3, 1e-5, 1, 1, 1
        )
    with pytest.raises(ValueError, match="kernel code"):
        core.edge_attention_forward(
            p, p, p, p, p, p, ptr.data_ptr(), p, p, p, 4, 2, 2, 3, 27, 3, 1e-5, 1, 1, 2
        )


def test_nothing_edge_sized_or_feature_wide_is_saved_for_backward():
    """Autograd keeps only node-level tensors of width <= h for the fused op: no
    per-edge tensor and no [N, H, 6K + 9] u or y (both are recomputed)."""
    heads, d, num_freqs = 2, 4, 3
    dim = 6 * num_freqs + 9
    q, k, v, _, frac, _, batch, lattice = _batch([6, 5], heads, d, num_freqs, seed=15)
    h = heads * d
    w = torch.randn(h, dim, dtype=torch.float64, requires_grad=True)
    b, gam, bet = (torch.randn(n, dtype=torch.float64, requires_grad=True) for n in (h, dim, dim))
    xs = [t.reshape(-1, h).clone().requires_grad_(True) for t in (q, k, v)]
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = edge_attention(*xs, frac, lattice, batch, w, b, gam, bet, heads, num_freqs)
    n_edges = 6 * 6 + 5 * 5
    assert saved, "nothing saved at all: the hook did not see the op"
    for shape in saved:
        assert n_edges not in shape, shape
        # D-wide tensors allowed: the weights only (W, W' = W·diag γ per head, γ, β)
        assert shape[-1] != dim or shape in {(dim,), (h, dim), (heads, d, dim)}, shape
    out.sum().backward()
    assert all(x.grad is not None for x in xs) and w.grad is not None


def _core_with_grads(kernel, ins, batch, num_freqs, go, gy):
    """(o, y, lse, grads of q, k, v, u, frac, gram) from the C++ backend with `kernel`."""
    old = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = kernel
    try:
        xs = [t.detach().clone().requires_grad_(True) for t in ins]
        o, y, lse = edge_attention_core(*xs, batch, num_freqs, backend="cpp")
        grads = torch.autograd.grad((o, y), xs, (go.to(o.dtype), gy.to(o.dtype)))
    finally:
        if old is None:
            del os.environ[KERNEL_ENV]
        else:
            os.environ[KERNEL_ENV] = old
    return (o, y, lse, *grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_kernels_agree(dtype):
    """The gemm kernel against the pairs kernel on shapes that reach every tile path
    of its products: crystals of 1 to 21 atoms (partial column blocks, remainder
    rows), an odd head count (a forward head block of one), widths d and 6K that
    are no multiple of the tile width."""
    heads, d, num_freqs = 3, 7, 5
    q, k, v, u, frac, gram, batch, _ = _batch(
        [21, 1, 8, 13, 2, 16], heads, d, num_freqs, seed=21, dtype=dtype
    )
    g = torch.Generator().manual_seed(22)
    go = torch.randn(q.shape, generator=g, dtype=torch.float64)
    gy = torch.randn(u.shape, generator=g, dtype=torch.float64)
    ins = (q, k, v, u, frac, gram)
    gemm = _core_with_grads("gemm", ins, batch, num_freqs, go, gy)
    pairs = _core_with_grads("pairs", ins, batch, num_freqs, go, gy)
    names = ("o", "y", "lse", "q", "k", "v", "u", "frac", "gram")
    for name, a, b in zip(names, gemm, pairs, strict=True):
        scale = max(1.0, float(b.abs().max())) if name == "frac" else 1.0
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(
            a.double() / scale, b.double() / scale, atol=tol["atol"], rtol=tol["rtol"], msg=name
        )


def test_kernel_switch(monkeypatch):
    """DAO_EDGE_ATTENTION_KERNEL picks the kernel code handed to the core, forward and
    backward, read at every call; gemm without it; an unknown name is an error."""
    calls = []
    core = load_core()

    class Recorder:
        def __getattr__(self, name):
            fn = getattr(core, name)

            def call(*args):
                calls.append((name, args[-1]))
                return fn(*args)

            return call

    monkeypatch.setattr(ops_ea, "load_core", lambda: Recorder())
    q, k, v, u, frac, gram, batch, _ = _batch([3, 2], seed=23)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    for env, code in ((None, 1), ("pairs", 0), ("gemm", 1)):
        if env is None:
            monkeypatch.delenv(KERNEL_ENV, raising=False)
        else:
            monkeypatch.setenv(KERNEL_ENV, env)
        calls.clear()
        o, y, _ = edge_attention_core(*xs, batch, 3, backend="cpp")
        torch.autograd.grad((o.sum() + y.sum()), xs)
        assert calls == [("edge_attention_forward", code), ("edge_attention_backward", code)]
    monkeypatch.setenv(KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match=KERNEL_ENV):
        edge_attention_core(*xs, batch, 3, backend="cpp")
