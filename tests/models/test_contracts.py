"""Physics contracts (dao.testing) on both backbones, and proof that each check
catches the violation it is for."""

from __future__ import annotations

import functools

import pytest
import torch

from dao.data.crystal import CrystalBatch
from dao.models import Crysformer, CrysformerConfig, CSPNet, CSPNetConfig, ModelOutput
from dao.testing import (
    atom_feature_table,
    check_all_contracts,
    check_batched_equals_single,
    check_gradients_reach_parameters,
    check_no_input_mutation,
    check_periodic_translation_invariance,
    check_permutation_equivariance,
    check_rotation_equivariance,
    random_crystals,
    random_orthogonal,
    random_steps,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def crystals():
    c = random_crystals(4, (3, 8), seed=21)
    return CrystalBatch.concat([c[0], random_crystals(1, (1, 1), seed=22), c[1], c[2], c[3]])


@pytest.fixture(scope="module")
def t(crystals):
    return random_steps(len(crystals), seed=5)


def _crysformer(**kw):
    torch.manual_seed(0)
    cfg = CrysformerConfig(
        num_layers=2, hidden=16, heads=4, num_freqs=6, time_dim=8, ffn_mult=2, **kw
    )
    return Crysformer(cfg, atom_feature_table()).double().eval()


def _cspnet(**kw):
    torch.manual_seed(0)
    cfg = CSPNetConfig(num_layers=2, hidden=16, num_freqs=6, time_dim=8, **kw)
    table = atom_feature_table() if cfg.atom_encoding == "cgcnn" else None
    return CSPNet(cfg, table).double()


BACKBONES = {
    "crysformer": functools.partial(_crysformer, energy_head=True),
    "cspnet": functools.partial(_cspnet, energy_head=True),
    "cspnet-cgcnn": functools.partial(_cspnet, atom_encoding="cgcnn"),
}


CASES = [(name, impl) for name in sorted(BACKBONES) for impl in ("fast", "naive")]
CASES.append(("crysformer", "projected"))  # Crysformer's second fast path


@pytest.mark.parametrize("name, impl", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_backbone_contracts(name, impl, crystals, t):
    model = BACKBONES[name]()
    if impl == "projected":
        model.edge_impl = "projected"
    check_all_contracts(functools.partial(model, naive=impl == "naive"), crystals, t)
    if impl != "naive":
        # A learned element table only gets gradients in the rows that occur.
        learned_table = isinstance(model.atom_embed, torch.nn.Embedding)
        exclude = ["atom_embed.weight"] if learned_table else []
        check_gradients_reach_parameters(model, crystals, t, exclude=exclude)


def test_contracts_in_float32(crystals, t):
    """float32 holds the symmetries to the float32 row of the tolerance table."""
    model = _crysformer(energy_head=True).float()
    check_all_contracts(model, crystals.to(torch.float32), t)


def test_random_orthogonal():
    for reflection in (False, True):
        r = random_orthogonal(3, reflection=reflection)
        torch.testing.assert_close(r @ r.T, torch.eye(3, dtype=torch.float64))
        assert (torch.linalg.det(r) < 0) == reflection


# ----------------------------------------------------- the checks catch violations


class _Broken(torch.nn.Module):
    """A correct backbone with one symmetry deliberately broken."""

    def __init__(self, how: str):
        super().__init__()
        self.inner = _crysformer(energy_head=True)
        self.how = how

    def forward(self, atom_types, frac_coords, lattice, t, batch):
        out = self.inner(atom_types, frac_coords, lattice, t, batch)
        coord, lat, energy = out
        if self.how == "index":  # depends on the atom order
            coord = coord + torch.arange(coord.shape[0], dtype=coord.dtype).unsqueeze(1)
        elif self.how == "raw_frac":  # uses f, not f mod 1 differences
            coord = coord + frac_coords
        elif self.how == "l_times_m":  # L·M instead of M·L
            lat = lattice @ torch.arange(9.0, dtype=lattice.dtype).view(3, 3)
        elif self.how == "cartesian":  # coordinates see the orientation
            coord = coord + torch.einsum("ni,nij->nj", frac_coords, lattice[batch])
        elif self.how == "leak":  # crystals see each other
            energy = energy + coord.mean()
        elif self.how == "inplace":
            frac_coords.add_(0.0)
        return ModelOutput(coord, lat, energy)


@pytest.mark.parametrize(
    "how, check, message",
    [
        ("index", check_permutation_equivariance, "permutation"),
        ("raw_frac", check_periodic_translation_invariance, "translation"),
        ("l_times_m", check_rotation_equivariance, "equivariance"),
        ("cartesian", check_rotation_equivariance, "invariance"),
        ("leak", check_batched_equals_single, "one by one"),
        ("inplace", check_no_input_mutation, "modified in place"),
    ],
)
def test_checks_catch_violations(how, check, message, crystals, t):
    broken = _Broken(how)
    with pytest.raises(AssertionError, match=message):
        check(broken, crystals, t)


def test_gradient_check_catches_dead_parameters(crystals, t):
    model = _crysformer()
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(3, dtype=torch.float64)))
    with pytest.raises(AssertionError, match="unused"):
        check_gradients_reach_parameters(model, crystals, t)
