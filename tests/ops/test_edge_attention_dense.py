"""The ``dense`` backend of the fused edge attention (batched products over padded
crystals, hand-written backward) against the float64 reference, on CPU and, where
there is one, on a GPU. Also the ``torch`` backend's backward (a regression: it used
``torch.autograd.grad`` inside the op, where nothing is recorded). opcheck,
torch.compile and the full op against the naive reference run for this backend in
test_edge_attention.py, parametrized over the backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import TOLERANCES, assert_close
from ops.test_edge_attention import SIZES, _batch

from dao._graph import static_batch
from dao.ops import _edge_attention_dense as dense
from dao.ops.edge_attention import _crystal_ptr, edge_attention_core
from dao.reference import edge_attention as ref

NAMES = ("q", "k", "v", "u", "frac", "gram")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _compare(sizes, dtype, shape, backend, device="cpu", seed=None):
    heads, d, num_freqs = shape
    q, k, v, u, frac, gram, batch, _ = _batch(sizes, heads, d, num_freqs, seed=seed or len(sizes))
    # the reference sees the inputs rounded to the dtype under test
    ins = [t.to(dtype).double().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    o_ref, y_ref, lse_ref = ref.edge_attention_core(*ins, batch, num_freqs)
    g = torch.Generator().manual_seed(1)
    go = torch.randn(o_ref.shape, generator=g, dtype=torch.float64).to(dtype).double()
    gy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64).to(dtype).double()
    grads_ref = torch.autograd.grad((o_ref, y_ref), ins, (go, gy))

    low = [t.detach().to(device, dtype).requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    o, y, lse = edge_attention_core(*low, batch.to(device), num_freqs, backend=backend)
    assert o.dtype == y.dtype == dtype
    assert lse.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    for a, b in ((o, o_ref), (y, y_ref), (lse, lse_ref)):
        assert_close(a.cpu(), b.detach(), dtype)
    grads = torch.autograd.grad((o, y), low, (go.to(device, dtype), gy.to(device, dtype)))
    tol = TOLERANCES[dtype]
    for name, a, b in zip(NAMES, grads, grads_ref, strict=True):
        # frac gradients carry factors 2πk: compare them relative to their scale
        scale = max(1.0, float(b.abs().max())) if name == "frac" else 1.0
        torch.testing.assert_close(
            a.cpu().double() / scale, b / scale, atol=tol["atol"], rtol=tol["rtol"], msg=name
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", SIZES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 3), (1, 4, 1), (3, 2, 5)], ids=str)
def test_dense_matches_reference(sizes, dtype, shape, device):
    _compare(sizes, dtype, shape, "dense", device)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_bfloat16_within_its_row(device):
    """16-bit inputs are computed in float32 and rounded once: within the bf16 row."""
    _compare([5, 3, 7], torch.bfloat16, (2, 4, 3), "dense", device)


def test_torch_backend_backward_matches_reference():
    _compare([3, 1, 5], torch.float64, (2, 3, 3), "torch")
    _compare([4, 2], torch.float32, (1, 4, 2), "torch")


def test_hand_backward_equals_autograd_of_the_forward():
    """The hand-written backward against autograd through ``dense_core`` itself (same
    arithmetic, so to rounding), y included."""
    q, k, v, u, frac, gram, batch, _ = _batch([6, 0, 2, 9], 3, 2, 4, seed=3)
    ptr = _crystal_ptr(batch, gram.shape[0])
    ins = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    o, y, _ = dense.dense_core(*ins, batch, ptr, 4, 1e-5)
    g = torch.Generator().manual_seed(2)
    go = torch.randn(o.shape, generator=g, dtype=o.dtype)
    gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    auto = torch.autograd.grad((o, y), ins, (go, gy))
    *hand, y_hand = dense.dense_backward(go, gy, q, k, v, u, frac, gram, batch, ptr, 4, 1e-5)
    assert_close(y_hand, y.detach())
    for name, a, b in zip(NAMES, hand, auto, strict=True):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-10, msg=name)


def test_gradcheck():
    q, k, v, u, frac, gram, batch, _ = _batch([3, 2, 1], 2, 2, 2, seed=4)
    xs = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]

    def fn(*xs):
        o, y, _ = edge_attention_core(*xs, batch, 2, backend="dense")
        return o, y

    assert torch.autograd.gradcheck(fn, xs, eps=1e-6, atol=1e-6)


def test_empty_input():
    q, k, v, u, frac, gram, batch, _ = _batch([0, 0])
    xs = [t.clone().requires_grad_(True) for t in (q, k, v, u, frac, gram)]
    o, y, lse = edge_attention_core(*xs, batch, 3, backend="dense")
    assert o.shape == (0, 2, 3) and y.shape == (0, 2, 27) and lse.shape == (0, 2)
    grads = torch.autograd.grad((o.sum() + y.sum()), xs)
    assert all(g.shape == x.shape and not g.any() for g, x in zip(grads, xs, strict=True))


def test_layout_is_built_once_inside_static_batch(monkeypatch):
    """The padded layout (one host read of the crystal sizes) is memoized per batch
    inside static_batch, so a sampler step or training step does no host sync for it."""
    q, k, v, u, frac, gram, batch, _ = _batch([4, 1, 6])
    calls = []
    real = dense._dense_layout
    monkeypatch.setattr(dense, "_dense_layout", lambda *a: calls.append(1) or real(*a))
    with static_batch():
        for _ in range(3):
            edge_attention_core(q, k, v, u, frac, gram, batch, 3, backend="dense")
    assert len(calls) == 1


def test_layout_groups_crystals_by_size():
    sizes = [20, 1, 12, 1, 12, 1, 12, 1, 0, 12, 12, 1, 1, 1]
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    lay = dense._dense_layout(batch, _crystal_ptr(batch, len(sizes)))
    # three groups (0-1, 12 and 20 atoms), crystals sorted by size, stable
    assert [(g.width, g.count, g.first) for g in lay.groups] == [(1, 8, 0), (12, 5, 8), (20, 1, 13)]
    assert lay.crystals.tolist() == [8, 1, 3, 5, 7, 11, 12, 13, 2, 4, 6, 9, 10, 0]
    assert lay.valid.numel() == 8 * 1 + 5 * 12 + 1 * 20
    # every atom has its own slot, and the slot maps back to it
    n = sum(sizes)
    assert lay.valid.sum() == n and lay.gather[lay.pos].tolist() == list(range(n))
    assert len(set(lay.pos.tolist())) == n


@pytest.mark.parametrize(
    "sizes, groups",
    [
        ([5, 5, 5], 1),
        ([20] * 4 + [2] * 12, 2),
        ([1] * 10 + [8] * 10 + [30] * 10, 2),  # a third group would save 6 %: not worth it
        ([1] * 10 + [12] * 10 + [20] * 2, 3),
        ([], 0),
    ],
)
def test_split_by_size_adds_groups_only_where_they_pay(sizes, groups):
    runs = dense.split_by_size(np.sort(np.array(sizes, dtype=np.int64)))
    assert len(runs) == groups
    assert [a for a, _ in runs] == sorted({a for a, _ in runs})  # contiguous, in order
    if runs:
        assert runs[0][0] == 0 and runs[-1][1] == len(sizes)
        assert all(b == c for (_, b), (c, _) in zip(runs, runs[1:], strict=False))


def test_three_groups_match_reference():
    sizes = [20, 1, 12, 1, 12, 1, 12, 1, 0, 12, 12, 1, 1, 1]
    assert len(dense.split_by_size(np.sort(np.array(sizes)))) == 3
    _compare(sizes, torch.float64, (2, 3, 3), "dense", seed=9)
    _compare(sizes[::-1], torch.float32, (2, 3, 3), "dense", seed=10)


def test_model_with_dense_backend_matches_naive():
    """A Crysformer on the fused path with the dense backend equals the naive path
    (forward and every parameter gradient)."""
    from dao.models.config import CrysformerConfig  # noqa: PLC0415
    from dao.models.crysformer import Crysformer  # noqa: PLC0415

    torch.manual_seed(0)
    cfg = CrysformerConfig(num_layers=2, hidden=16, heads=2, num_freqs=4)
    model = Crysformer(cfg).double()
    g = torch.Generator().manual_seed(5)
    nums = torch.tensor([3, 5, 1])
    batch = torch.repeat_interleave(torch.arange(3), nums)
    types = torch.randint(1, 90, (9,), generator=g)
    frac = torch.rand(9, 3, generator=g, dtype=torch.float64)
    lattice = 3 * torch.eye(3, dtype=torch.float64) + torch.rand(3, 3, 3, generator=g).double()
    t = torch.tensor([5, 300, 999])
    outs = []
    for impl, backend in (("naive", "auto"), ("fused", "dense")):
        model.edge_impl, model.edge_backend = impl, backend
        model.zero_grad()
        out = model(types, frac, lattice, t, batch, naive=impl == "naive")
        (out.coord.square().sum() + out.lattice.square().sum()).backward()
        outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ga), (b, gb) = outs
    assert_close(b.coord, a.coord.detach())
    assert_close(b.lattice, a.lattice.detach())
    for name in ga:
        torch.testing.assert_close(gb[name], ga[name], atol=1e-9, rtol=1e-9, msg=name)


def test_split_by_size_matches_a_search_over_every_split_point():
    """Trying only the ends of runs of equal sizes finds the cost of the exhaustive
    search (every split point), on random batches."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        sizes = np.sort(rng.integers(1, 53, size=int(rng.integers(1, 40))))
        b, sq = len(sizes), sizes.astype(np.float64) ** 2

        def cost(runs, sq=sq):
            return sum((e - a) * sq[e - 1] for a, e in runs)

        best = {1: b * sq[-1]}
        for k in range(1, b):
            best[2] = min(best.get(2, np.inf), cost([(0, k), (k, b)]))
            for k2 in range(k + 1, b):
                best[3] = min(best.get(3, np.inf), cost([(0, k), (k, k2), (k2, b)]))
        runs = dense.split_by_size(sizes)
        assert cost(runs) == pytest.approx(best[len(runs)])
