"""CSPNet: shapes, fast path == naive path, gradients, configs, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from dao.data.crystal import CrystalBatch
from dao.models import CSPNet, CSPNetConfig, ModelOutput, build_model, config_from_dict
from dao.testing import (
    atom_feature_table,
    call_model,
    check_gradients_reach_parameters,
    random_crystals,
    random_steps,
    validate_model_outputs,
)

SMALL = dict(num_layers=2, hidden=16, num_freqs=5, time_dim=8)
EXACT = dict(atol=1e-11, rtol=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def table():
    return atom_feature_table()


@pytest.fixture(scope="module")
def crystals():
    c = random_crystals(5, (2, 9), seed=11)
    odd = [random_crystals(1, (1, 1), seed=12), random_crystals(1, (0, 0), seed=13)]
    return CrystalBatch.concat([c[0], odd[0], c[1], odd[1], *(c[i] for i in range(2, 5))])


def _model(table=None, seed=0, **overrides):
    torch.manual_seed(seed)
    model = CSPNet(CSPNetConfig(**{**SMALL, **overrides}), table).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 / math.sqrt(p.shape[-1])) + 0.1 * (p.dim() == 1))
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(energy_head=True, coord_head=False),
        dict(layer_norm=False, lattice_head=False),
        dict(atom_encoding="cgcnn"),
    ],
)
def test_shapes_and_fast_equals_naive(table, crystals, overrides):
    model = _model(table, **overrides)
    t = random_steps(len(crystals), seed=3)
    fast = call_model(model, crystals, t)
    assert isinstance(fast, ModelOutput)
    validate_model_outputs(fast, crystals)
    naive = call_model(model, crystals, t, naive=True)
    for a, b in zip(fast, naive, strict=True):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, **EXACT)


def test_fast_equals_naive_gradients(crystals):
    model = _model(energy_head=True)
    t = random_steps(len(crystals), seed=4)
    grads = []
    for naive in (False, True):
        model.zero_grad()
        frac = crystals.frac_coords.clone().requires_grad_(True)
        lat = crystals.lattice.clone().requires_grad_(True)
        out = model(crystals.atom_types, frac, lat, t, crystals.batch, naive=naive)
        (out.coord.square().sum() + out.lattice.square().sum() + out.energy.sum()).backward()
        grads.append([frac.grad, lat.grad] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **EXACT)


def test_gradients_reach_every_parameter(crystals):
    model = _model(energy_head=True)
    # Only the rows of the element table that occur in the batch get gradients.
    check_gradients_reach_parameters(
        model, crystals, random_steps(len(crystals)), exclude=["atom_embed.weight"]
    )
    model.zero_grad()
    call_model(model, crystals, random_steps(len(crystals))).coord.sum().backward()
    rows = model.atom_embed.weight.grad.abs().sum(1) > 0
    assert torch.equal(rows.nonzero().flatten(), torch.unique(crystals.atom_types) - 1)


def test_config_roundtrip_and_checkpoint(crystals):
    model = _model(atom_encoding="embedding", energy_head=True)
    d = model.config.to_dict()
    assert d["model"] == "cspnet"
    assert config_from_dict(d) == model.config
    rebuilt = build_model(d).double()
    rebuilt.load_state_dict(model.state_dict())
    t = random_steps(len(crystals))
    for a, b in zip(call_model(model, crystals, t), call_model(rebuilt, crystals, t), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="atom_encoding"):
        CSPNetConfig(atom_encoding="onehot")


def test_paper_parameter_count(table):
    """Spec: 12.3 M. Counted: element table 100·512 + node input 768·512+512 + 6 layers ×
    (edge MLP 1801·512+512 + 512·512+512, node MLP 1024·512+512 + 512·512+512, LayerNorm
    1024) + final LayerNorm 1024 + heads 512·3 + 512·9 = 12,294,656."""
    model = CSPNet(CSPNetConfig())
    assert sum(p.numel() for p in model.parameters()) == 12_294_656
    assert sum(p.numel() for p in model.layers[0].parameters()) == 1_973_760
    # With frozen CGCNN input (Linear(92, 512) instead of the 100-row table): 12,291,072.
    cgcnn = CSPNet(CSPNetConfig(atom_encoding="cgcnn"), table)
    assert sum(p.numel() for p in cgcnn.parameters()) == 12_291_072
