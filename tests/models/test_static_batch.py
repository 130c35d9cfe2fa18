"""The batch-layout memo (dao._graph.static_batch / memoized) used by the samplers."""

from __future__ import annotations

import torch

import dao._graph as graph
import dao.models.common as common
from dao._graph import fully_connected_edges, memoized, static_batch
from dao.pretrained import build_diffusion


def test_memo_reuses_within_and_only_within_the_context():
    batch = torch.tensor([0, 0, 1, 1, 1])
    assert fully_connected_edges(batch, 2) is not fully_connected_edges(batch, 2)
    with static_batch():
        a = fully_connected_edges(batch, 2)
        assert fully_connected_edges(batch, 2) is a
        assert fully_connected_edges(batch, 3) is not a  # other arguments, other entry
        with static_batch():  # nested: the same memo
            assert fully_connected_edges(batch, 2) is a
        assert fully_connected_edges(batch, 2) is a
        batch[4] = 0  # changed in place (unsorted now): recomputed, and checked again
        try:
            fully_connected_edges(batch, 2)
        except ValueError as exc:
            assert "sorted" in str(exc)
        else:
            raise AssertionError("an in-place change must not hit the memo")
    assert fully_connected_edges(torch.tensor([0, 1]), 2) is not fully_connected_edges(
        torch.tensor([0, 1]), 2
    )


def test_memo_accepts_inference_tensors_and_counts_calls():
    calls = []

    def fn(t, k):
        calls.append(k)
        return t * k

    with torch.inference_mode():
        x = torch.arange(4)
    with static_batch():
        assert torch.equal(memoized("f", x, fn, 2), x * 2)
        memoized("f", x, fn, 2)
        memoized("f", x, fn, 3)
    assert calls == [2, 3]


def test_sampling_builds_the_layout_once(monkeypatch):
    counts = {"edges": 0, "pad": 0}
    real_edges, real_pad = graph._fully_connected_edges, common._pad_by_destination

    def edges(*a):
        counts["edges"] += 1
        return real_edges(*a)

    def pad(*a):
        counts["pad"] += 1
        return real_pad(*a)

    monkeypatch.setattr(graph, "_fully_connected_edges", edges)
    monkeypatch.setattr(common, "_pad_by_destination", pad)
    torch.manual_seed(0)
    cfg = {"model": {"model": "crysformer", "num_layers": 1, "hidden": 32, "heads": 2,
                     "num_freqs": 4}, "diffusion": {"timesteps": 6}}  # fmt: skip
    diff = build_diffusion(cfg)
    diff.model.edge_impl = "factorized"
    out = diff.sample(torch.tensor([3, 8, 8, 1]), torch.tensor([1, 3]))
    assert out.frac_coords.shape == (4, 3)
    assert counts == {"edges": 1, "pad": 1}  # 12 model evaluations, one layout
    counts.update(edges=0, pad=0)
    diff.model(torch.tensor([3, 8]), torch.rand(2, 3), torch.eye(3)[None], torch.tensor([5]),
               torch.tensor([0, 0]))  # fmt: skip
    assert counts == {"edges": 1, "pad": 1}  # outside sampling: computed per call


def test_memo_is_shared_with_other_threads(monkeypatch):
    """On a GPU the autograd engine runs the backward on its own thread: the fused op's
    backward must find the layouts its forward memoized (a thread-local memo missed
    them: a host sync per layer, and no CUDA-graph capture of a training step)."""
    import threading  # noqa: PLC0415

    calls = []

    def fn(t):
        calls.append(1)
        return t + 1

    batch = torch.tensor([0, 0, 1])
    seen = []
    with static_batch():
        first = memoized("probe", batch, fn)
        worker = threading.Thread(target=lambda: seen.append(memoized("probe", batch, fn)))
        worker.start()
        worker.join()
    assert seen[0] is first and len(calls) == 1
    # and a backward through the fused op reads the memo its forward filled
    from dao.ops import _edge_attention_dense as dense  # noqa: PLC0415
    from dao.ops.edge_attention import edge_attention_core  # noqa: PLC0415

    layouts = []
    real = dense._dense_layout

    def counting(*args):
        layouts.append(1)
        return real(*args)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 2, 3, generator=g, requires_grad=True) for _ in range(3))
    u = torch.randn(5, 2, 15, generator=g, requires_grad=True)
    frac = torch.rand(5, 3, generator=g, requires_grad=True)
    gram = (torch.eye(3) * 9).reshape(1, 9).repeat(2, 1).requires_grad_(True)
    atoms = torch.tensor([0, 0, 0, 1, 1])
    monkeypatch.setattr(dense, "_dense_layout", counting)
    with static_batch():
        o, y, _ = edge_attention_core(q, k, v, u, frac, gram, atoms, 1, backend="dense")
        (o.sum() + y.sum()).backward()
    assert len(layouts) == 1
