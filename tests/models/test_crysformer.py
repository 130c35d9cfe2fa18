"""Crysformer: shapes, fast path == naive path, gradients, configs, parameter counts."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from dao.data.crystal import CrystalBatch
from dao.models import (
    Crysformer,
    CrysformerConfig,
    ModelOutput,
    build_model,
    config_from_dict,
    fully_connected_edges,
)
from dao.models.common import (
    fourier_features,
    pad_by_destination,
    segment_mean,
    segment_softmax,
    sinusoidal_time_embedding,
)
from dao.models.crysformer import crysformer_edge_features, reference_edge_attention
from dao.testing import (
    atom_feature_table,
    call_model,
    check_gradients_reach_parameters,
    random_crystals,
    random_steps,
    validate_model_outputs,
)

SMALL = dict(num_layers=2, hidden=24, heads=3, num_freqs=5, time_dim=8, ffn_mult=2)
# float64 fast-vs-naive agreement: the paths differ only in summation order.
EXACT = dict(atol=1e-11, rtol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table():
    return atom_feature_table()


def _model(table, seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    model = Crysformer(CrysformerConfig(**{**SMALL, **overrides}), table).to(dtype)
    # Nonzero, non-default weights everywhere (LayerNorm affines and biases too), so the
    # folded LayerNorm and every bias term are exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / math.sqrt(p.shape[-1])) + 0.1 * (p.dim() == 1))
    return model


@pytest.fixture(scope="module")
def crystals():
    # Odd sizes: a one-atom crystal, an empty crystal, primes.
    c = random_crystals(6, (4, 11), seed=3)
    parts = [c[0], c[1], random_crystals(1, (1, 1), seed=4), random_crystals(1, (0, 0), seed=5)]
    parts += [c[i] for i in range(2, 6)]
    return CrystalBatch.concat(parts)


# ------------------------------------------------------------------ shared pieces


def test_fully_connected_edges_order_and_count():
    batch = torch.tensor([0, 0, 2, 2, 2, 3], dtype=torch.int64)
    edges = fully_connected_edges(batch, 5)
    assert edges.shape == (2, 4 + 9 + 1)
    expected = [
        (j, i)
        for ptr, n in ((0, 2), (2, 3), (5, 1))
        for i in range(ptr, ptr + n)
        for j in range(ptr, ptr + n)
    ]
    assert [tuple(e) for e in edges.T.tolist()] == expected
    assert fully_connected_edges(torch.zeros(0, dtype=torch.int64), 3).shape == (2, 0)
    with pytest.raises(ValueError, match="sorted"):
        fully_connected_edges(torch.tensor([1, 0]), 2)


def test_segment_softmax_and_mean():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(10, 3, generator=gen, dtype=torch.float64) * 30
    index = torch.tensor([0, 0, 0, 2, 2, 4, 4, 4, 4, 4])
    alpha = segment_softmax(scores, index, 5)
    for s in (0, 2, 4):
        rows = index == s
        torch.testing.assert_close(alpha[rows], torch.softmax(scores[rows], 0))
    mean = segment_mean(scores, index, 5)
    torch.testing.assert_close(mean[2], scores[3:5].mean(0))
    assert torch.equal(mean[1], torch.zeros(3, dtype=torch.float64))


def test_pad_by_destination_roundtrip():
    gen = torch.Generator().manual_seed(1)
    edges = torch.randint(0, 7, (2, 30), generator=gen)
    pad = pad_by_destination(edges, 8)
    got = sorted((int(edges[0, e]), int(edges[1, e]), int(e)) for e in pad.index[pad.mask])
    assert got == sorted((int(s), int(d), e) for e, (s, d) in enumerate(edges.T))
    assert torch.equal(pad.src[pad.mask], edges[0, pad.index[pad.mask]])
    rows = torch.arange(8).unsqueeze(1).expand_as(pad.index)
    assert torch.equal(edges[1, pad.index[pad.mask]], rows[pad.mask])


def test_fourier_features_layout_and_period():
    delta = torch.tensor([[0.1, 0.25, 0.9]], dtype=torch.float64)
    phi = fourier_features(delta, 4)
    assert phi.shape == (1, 24)
    torch.testing.assert_close(
        phi[0, 1 * 4 + 2], torch.sin(torch.tensor(2 * math.pi * 2 * 0.25, dtype=torch.float64))
    )
    torch.testing.assert_close(
        phi[0, 12 + 2 * 4 + 3], torch.cos(torch.tensor(2 * math.pi * 3 * 0.9, dtype=torch.float64))
    )
    torch.testing.assert_close(fourier_features(delta + 3.0, 4), phi, atol=1e-12, rtol=0)


def test_time_embedding():
    t = torch.tensor([0, 1, 1000])
    emb = sinusoidal_time_embedding(t, 8, torch.float64)
    assert emb.shape == (3, 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64))
    torch.testing.assert_close(emb[2, 0], torch.sin(torch.tensor(1000.0, dtype=torch.float64)))
    torch.testing.assert_close(emb[1, 3], torch.sin(torch.tensor(1e-4, dtype=torch.float64)))


# --------------------------------------------------------------------- outputs


@pytest.mark.parametrize(
    "heads_cfg",
    [
        dict(),
        dict(energy_head=True),
        dict(coord_head=False, energy_head=True),
        dict(lattice_head=False),
    ],
)
def test_output_shapes(table, crystals, heads_cfg):
    model = _model(table, **heads_cfg)
    t = random_steps(len(crystals))
    out = call_model(model, crystals, t)
    assert isinstance(out, ModelOutput)
    validate_model_outputs(out, crystals)
    cfg = model.config
    assert (out.coord is None) != cfg.coord_head
    assert (out.lattice is None) != cfg.lattice_head
    assert (out.energy is None) != cfg.energy_head


def test_float32_runs_and_tracks_float64(table, crystals):
    m64 = _model(table)
    m32 = _model(table).float()
    t = random_steps(len(crystals))
    out32 = call_model(m32, crystals.to(torch.float32), t)
    out64 = call_model(m64, crystals, t)
    assert out32.coord.dtype == torch.float32
    torch.testing.assert_close(out32.coord.double(), out64.coord, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(out32.lattice.double(), out64.lattice, atol=1e-4, rtol=1e-3)


def test_lattice_output_is_m_times_l(table, crystals):
    model = _model(table)
    t = random_steps(len(crystals))
    captured = {}
    handle = model.heads.lattice.register_forward_hook(lambda m, i, o: captured.update(m=o))
    out = call_model(model, crystals, t)
    handle.remove()
    m = captured["m"].view(-1, 3, 3)
    torch.testing.assert_close(out.lattice, m @ crystals.lattice)


# ------------------------------------------------------------ fast == naive


IMPLS = ["fused", "factorized", "projected"]
EDGE_LIST_IMPLS = ["factorized", "projected"]  # the paths that take any edge list


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "overrides", [dict(), dict(heads=1, hidden=8), dict(num_layers=3, energy_head=True)]
)
def test_fast_equals_naive(table, crystals, overrides, impl):
    model = _model(table, **overrides)
    model.edge_impl = impl
    t = random_steps(len(crystals), seed=1)
    fast = call_model(model, crystals, t)
    naive = call_model(model, crystals, t, naive=True)
    for a, b in zip(fast, naive, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, **EXACT)


def test_fast_equals_naive_gradients(table, crystals):
    """Parameter gradients and input gradients (energy guidance) agree too."""
    model = _model(table, energy_head=True)
    t = random_steps(len(crystals), seed=2)
    grads = []
    for impl in ("naive", *IMPLS):
        model.edge_impl = impl if impl != "naive" else "factorized"
        model.zero_grad()
        frac = crystals.frac_coords.clone().requires_grad_(True)
        lat = crystals.lattice.clone().requires_grad_(True)
        out = model(crystals.atom_types, frac, lat, t, crystals.batch, naive=impl == "naive")
        loss = out.coord.square().sum() + out.lattice.square().sum() + out.energy.sum()
        loss.backward()
        grads.append([frac.grad, lat.grad] + [p.grad.clone() for p in model.parameters()])
    for fast in grads[1:]:
        for a, b in zip(fast, grads[0], strict=True):
            torch.testing.assert_close(a, b, **EXACT)


def test_unknown_edge_impl(table, crystals):
    model = _model(table)
    model.edge_impl = "dense"
    with pytest.raises(ValueError, match="edge_impl"):
        call_model(model, crystals, random_steps(len(crystals)))


def test_fused_refuses_an_edge_list(table, crystals):
    model = _model(table)
    model.edge_impl = "fused"
    edges = fully_connected_edges(crystals.batch, len(crystals))
    with pytest.raises(ValueError, match="edges=None"):
        call_model(model, crystals, random_steps(len(crystals)), edges=edges)
    model.edge_impl = "auto"  # takes a path that handles the edge list
    out = call_model(model, crystals, random_steps(len(crystals), seed=4), edges=edges)
    ref = call_model(model, crystals, random_steps(len(crystals), seed=4))
    torch.testing.assert_close(out.coord, ref.coord, **EXACT)


def test_subgraph_edges_fast_equals_naive(table, crystals):
    """Any edge list (here: a random subgraph, some atoms without incoming edges)
    gives the same result on every path."""
    model = _model(table)
    t = random_steps(len(crystals))
    edges = fully_connected_edges(crystals.batch, len(crystals))
    keep = torch.rand(edges.shape[1], generator=torch.Generator().manual_seed(3)) < 0.4
    sub = edges[:, keep]
    ref = call_model(model, crystals, t, edges=sub, naive=True)
    for impl in EDGE_LIST_IMPLS:
        model.edge_impl = impl
        out = call_model(model, crystals, t, edges=sub)
        torch.testing.assert_close(out.coord, ref.coord, **EXACT)
        torch.testing.assert_close(out.lattice, ref.lattice, **EXACT)


def test_layer_fast_attention_equals_reference(table, crystals):
    model = _model(table)
    layer = model.layers[0]
    edges = fully_connected_edges(crystals.batch, len(crystals))
    raw = crysformer_edge_features(
        crystals.frac_coords, crystals.lattice, crystals.batch, edges, model.config.num_freqs
    )
    z = torch.nn.functional.layer_norm(raw, raw.shape[1:])
    pad = pad_by_destination(edges, crystals.num_nodes)
    x = torch.randn(crystals.num_nodes, model.config.hidden, dtype=torch.float64)
    ref = reference_edge_attention(layer, x, crystals.frac_coords, crystals.lattice, crystals.batch)
    torch.testing.assert_close(layer.attention(x, z[pad.index], pad), ref, **EXACT)
    w, b = layer.folded_edge_projection()
    e = torch.nn.functional.linear(z, w, b)
    torch.testing.assert_close(layer.attention_projected(x, e, edges), ref, **EXACT)


def test_inference_fold_cache_follows_the_weights(table, crystals):
    """Without gradients the folded edge projection is cached; an in-place update of a
    weight (optimiser step, load_state_dict) or new storage must invalidate it."""
    model = _model(table)
    layer = model.layers[0]
    with torch.no_grad():
        w1, b1 = layer.folded_edge_projection()
        assert layer.folded_edge_projection()[0] is w1  # reused
        layer.edge_norm.weight.mul_(1.5)  # in place
        w2, _ = layer.folded_edge_projection()
        assert w2 is not w1
        torch.testing.assert_close(w2, layer._fold_edge_projection()[0], rtol=0, atol=0)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["layers.0.edge_proj.bias"] += 1.0
        model.load_state_dict(state)
        _, b3 = layer.folded_edge_projection()
        torch.testing.assert_close(b3, layer._fold_edge_projection()[1], rtol=0, atol=0)
        assert not torch.equal(b3, b1)
    # With gradients: never cached, and the result carries the graph.
    w_grad, _ = layer.folded_edge_projection()
    assert w_grad.requires_grad
    # Sampling-style evaluation equals the gradient-enabled one.
    t = random_steps(len(crystals), seed=3)
    out_grad = call_model(model, crystals, t)
    with torch.no_grad():
        out_nograd = call_model(model, crystals, t)
    torch.testing.assert_close(out_nograd.coord, out_grad.coord.detach(), rtol=0, atol=0)


def test_given_edges(table, crystals):
    """Precomputed edges give the same result; any edge order works on both paths."""
    model = _model(table)
    t = random_steps(len(crystals))
    edges = fully_connected_edges(crystals.batch, len(crystals))
    ref = call_model(model, crystals, t)
    shuffled = edges[:, torch.randperm(edges.shape[1], generator=torch.Generator().manual_seed(0))]
    for e in (edges, shuffled):
        for impl in (*EDGE_LIST_IMPLS, "naive"):
            model.edge_impl = impl if impl != "naive" else "factorized"
            out = call_model(model, crystals, t, edges=e, naive=impl == "naive")
            torch.testing.assert_close(out.coord, ref.coord, **EXACT)
            torch.testing.assert_close(out.lattice, ref.lattice, **EXACT)


def test_empty_batch(table):
    model = _model(table, energy_head=True)
    out = call_model(model, CrystalBatch.empty(torch.float64), torch.zeros(0, dtype=torch.int64))
    assert out.coord.shape == (0, 3) and out.lattice.shape == (0, 3, 3)
    assert out.energy.shape == (0,)


# ------------------------------------------------------------------ training


def test_gradients_reach_every_parameter(table, crystals):
    model = _model(table, energy_head=True)
    check_gradients_reach_parameters(model, crystals, random_steps(len(crystals)))
    assert not model.atom_features.requires_grad
    assert "atom_features" not in dict(model.named_parameters())


def test_dropout_only_in_training(table, crystals):
    model = _model(table, dropout=0.5)
    t = random_steps(len(crystals))
    model.eval()
    a, b = call_model(model, crystals, t), call_model(model, crystals, t, naive=True)
    torch.testing.assert_close(a.coord, b.coord, **EXACT)
    model.train()
    assert not torch.allclose(call_model(model, crystals, t).coord, a.coord)


# ---------------------------------------------------------- configs, checkpoints


def test_config_roundtrip_and_checkpoint(table, crystals):
    model = _model(table, energy_head=True)
    d = model.config.to_dict()
    assert d["model"] == "crysformer"
    assert CrysformerConfig.from_dict(d) == model.config == config_from_dict(d)
    state = model.state_dict()
    assert torch.equal(state["atom_features"], table.to(torch.float64))
    rebuilt = build_model(d, atom_features=torch.zeros_like(table)).double()
    rebuilt.load_state_dict(state)
    t = random_steps(len(crystals))
    for a, b in zip(call_model(model, crystals, t), call_model(rebuilt, crystals, t), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown"):
        CrysformerConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="not 'crysformer'"):
        CrysformerConfig.from_dict({**d, "model": "cspnet"})


@pytest.mark.parametrize(
    "bad", [dict(hidden=30, heads=4), dict(time_dim=7), dict(dropout=1.0), dict(ffn_mult=0)]
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        CrysformerConfig(**{**SMALL, **bad})


def test_atom_feature_table_validation(table):
    with pytest.raises(ValueError, match=r"\[Z_max \+ 1, 92\]"):
        Crysformer(CrysformerConfig(**SMALL), table[:, :50])


def test_default_table_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "dao.data.atom_features", None)
    with pytest.raises(RuntimeError, match="atom_features=<"):
        Crysformer(CrysformerConfig(**SMALL))


def test_input_validation(table, crystals):
    model = _model(table)
    c, t = crystals, random_steps(len(crystals))
    with pytest.raises(ValueError, match="lattice"):
        model(c.atom_types, c.frac_coords, c.lattice[:, :2], t, c.batch)
    with pytest.raises(ValueError, match="t must be"):
        model(c.atom_types, c.frac_coords, c.lattice, t.double(), c.batch)
    with pytest.raises(ValueError, match="frac_coords"):
        model(c.atom_types, c.frac_coords[:, :2], c.lattice, t, c.batch)
    with pytest.raises(ValueError, match="sorted"):
        model(c.atom_types, c.frac_coords, c.lattice, t, c.batch.flip(0))


def test_paper_parameter_count(table):
    """Spec: 25.2 M. Counted: 92·384+384 (atom) + 640·384+384 (node input) + 12 layers ×
    2,077,074 + heads 384·3 + 384·9 = 25,211,352; the energy head adds 148,225."""
    model = Crysformer(CrysformerConfig(), table)
    n = sum(p.numel() for p in model.parameters())
    assert n == 25_211_352
    layer = sum(p.numel() for p in model.layers[0].parameters())
    assert layer == 2_077_074
    energy = Crysformer(CrysformerConfig(num_layers=0, energy_head=True), table)
    assert sum(p.numel() for p in energy.heads.energy.parameters()) == 148_225


def test_auto_edge_impl_rule():
    """ "auto": fused on CPU; on a GPU fused without gradients (sampling) and factorized
    for training; factorized whenever a custom edge list is given."""
    from dao.models.crysformer import _auto_impl  # noqa: PLC0415

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    edges = torch.zeros(2, 1, dtype=torch.int64)
    assert _auto_impl(cpu, None) == "fused" and _auto_impl(gpu, None) == "factorized"
    assert _auto_impl(cpu, edges) == _auto_impl(gpu, edges) == "factorized"
    with torch.no_grad():
        assert _auto_impl(gpu, None) == "fused" and _auto_impl(cpu, None) == "fused"
        assert _auto_impl(gpu, edges) == "factorized"
