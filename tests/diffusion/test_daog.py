"""DAO-G joint diffusion: forward process, training loss and the predictor-corrector sampler.

The sampler checks use "oracle" denoisers that return the exact (normalised) scores of
a known data distribution, so the sampler maths is checked end to end: a point mass
must be recovered, the intermediate marginals of the exact ancestral sampler must be
those of the forward process, and a two-point mixture must be split in proportion.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from helpers import random_cell
from scipy import stats
from torch import nn

from dao.data.crystal import CrystalBatch
from dao.diffusion import (
    DEFAULT_GUIDANCE_SCALE,
    DAOGDiffusion,
    cosine_beta_schedule,
    geometric_sigma_schedule,
    wrap_frac,
    wrapped_normal_log_prob,
    wrapped_normal_score,
)


class Out(NamedTuple):
    coord: torch.Tensor
    lattice: torch.Tensor
    energy: torch.Tensor | None


pytestmark = pytest.mark.usefixtures("one_thread")


def _centred(x: torch.Tensor) -> torch.Tensor:
    return x - torch.round(x)


def _wrapped_normal_cdf(x: np.ndarray, sigma: float) -> np.ndarray:
    """CDF on [-0.5, 0.5) of the wrapped normal, from scipy's normal CDF (independent)."""
    k = np.arange(-12, 13)[:, None]
    return (stats.norm.cdf((x + k) / sigma) - stats.norm.cdf((-0.5 + k) / sigma)).sum(0)


class Schedules(nn.Module):
    """The schedules, built from the public schedule functions, for the oracles."""

    def __init__(self, T: int, dtype: torch.dtype, sigma_begin=0.005, sigma_end=0.5):
        super().__init__()
        beta = cosine_beta_schedule(T)
        sig = geometric_sigma_schedule(T, sigma_begin, sigma_end)
        self.register_buffer("alpha_bars", beta.alpha_bars.to(dtype))
        self.register_buffer("sigmas", sig.sigmas.to(dtype))
        self.register_buffer("lambdas", sig.lambdas.to(dtype))


class MixtureOracle(Schedules):
    """Exact denoiser of the distribution putting weight w_m on (F0_m, L0_m), per crystal.

    frac0: [M, N, 3], lat0: [M, B, 3, 3] laid out like the batch being sampled.
    coord = E[grad log q(F_t | F0) | F_t, L_t] / sqrt(lambda_t) (the exact normalised
    score of the mixture), lattice = E[eps | F_t, L_t].
    """

    def __init__(self, T, frac0, lat0, weights=None, dtype=torch.float64):
        super().__init__(T, dtype)
        m = frac0.shape[0]
        weights = torch.full((m,), 1.0 / m) if weights is None else torch.as_tensor(weights)
        self.register_buffer("frac0", frac0.to(dtype))
        self.register_buffer("lat0", lat0.to(dtype))
        self.register_buffer("log_w", weights.to(dtype).log())
        self.calls: list[int] = []

    def forward(self, atom_types, frac, lattice, t, batch, edges=None):
        self.calls.append(int(t[0]))
        abar = self.alpha_bars[t][:, None, None]  # [B, 1, 1]
        sigma = self.sigmas[t][batch][:, None]  # [N, 1]
        d = frac[None] - self.frac0  # [M, N, 3]
        logq_atoms = wrapped_normal_log_prob(d, sigma).sum(-1)  # [M, N]
        logq_f = torch.zeros(len(self.log_w), lattice.shape[0], dtype=frac.dtype)
        logq_f.index_add_(1, batch, logq_atoms)
        resid = lattice[None] - abar.sqrt() * self.lat0
        logq_l = -0.5 * (resid**2).sum((-1, -2)) / (1 - abar[:, 0, 0])  # [M, B]
        w = torch.softmax(self.log_w[:, None] + logq_f + logq_l, dim=0)  # [M, B]
        score = (w[:, batch, None] * wrapped_normal_score(d, sigma)).sum(0)
        coord = score / self.lambdas[t][batch][:, None].sqrt()
        lat0_hat = (w[:, :, None, None] * self.lat0).sum(0)
        eps = (lattice - abar.sqrt() * lat0_hat) / (1 - abar).sqrt()
        return Out(coord, eps, None)


class GaussianLatticeOracle(Schedules):
    """Data: L0 entries iid N(mu, s^2), F0 uniform; coord score 0, exact eps for L."""

    def __init__(self, T, mu, s, dtype=torch.float64):
        super().__init__(T, dtype)
        self.register_buffer("mu", torch.as_tensor(mu, dtype=dtype))
        self.s = s

    def forward(self, atom_types, frac, lattice, t, batch, edges=None):
        abar = self.alpha_bars[t][:, None, None]
        var = abar * self.s**2 + 1 - abar
        eps = (1 - abar).sqrt() * (lattice - abar.sqrt() * self.mu) / var
        return Out(torch.zeros_like(frac), eps, None)


class ToyNet(nn.Module):
    """A small denoiser of the Crysformer signature that pools per crystal (via batch)."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(119, 8)
        self.coord_head = nn.Linear(6 + 8 + 8 + 1, 3)
        self.lat_head = nn.Linear(8 + 9 + 1, 9)
        self.to(dtype)

    def forward(self, atom_types, frac, lattice, t, batch, edges=None):
        n_crystals = lattice.shape[0]
        e = self.emb(atom_types)
        counts = torch.bincount(batch, minlength=n_crystals).clamp(min=1).to(e.dtype)
        pooled = torch.zeros(n_crystals, e.shape[1], dtype=e.dtype).index_add(0, batch, e)
        pooled = pooled / counts[:, None]
        tt = (t.to(e.dtype) / 1000.0)[:, None]
        ang = 2 * math.pi * frac
        h = torch.cat([ang.sin(), ang.cos(), e, pooled[batch], tt[batch]], dim=1)
        gram = (lattice @ lattice.transpose(1, 2)).reshape(n_crystals, 9) / 30.0
        m = self.lat_head(torch.cat([pooled, gram.tanh(), tt], dim=1)).reshape(n_crystals, 3, 3)
        return Out(torch.tanh(self.coord_head(h)), m @ lattice / 5.0, None)


def _crystals(sizes, seed=0, dtype=torch.float64) -> CrystalBatch:
    rng = np.random.default_rng(seed)
    types = torch.tensor(rng.integers(1, 90, size=sum(sizes)))
    frac = torch.tensor(rng.random((sum(sizes), 3)), dtype=dtype)
    lat = torch.tensor(np.stack([random_cell(rng, 15.0 * n) for n in sizes]), dtype=dtype)
    return CrystalBatch(types, frac, lat, torch.tensor(sizes))


def _point_oracle(T, crystals: CrystalBatch, dtype=torch.float64) -> MixtureOracle:
    return MixtureOracle(T, crystals.frac_coords[None], crystals.lattice[None], dtype=dtype)


# --------------------------------------------------------------------- construction


def test_buffers_follow_dtype_and_stay_out_of_state_dict():
    diff = DAOGDiffusion(ToyNet(), timesteps=50)
    assert diff.sigmas.shape == (51,) and diff.alpha_bars.dtype == torch.float64
    assert all(k.startswith("model.") for k in diff.state_dict())
    ref = geometric_sigma_schedule(50)
    torch.testing.assert_close(diff.lambdas, ref.lambdas)
    diff.float()
    assert diff.lambdas.dtype == torch.float32


def test_wrap_frac_stays_below_one():
    x = torch.tensor([-1e-9, -1.0, 1.0, 2.5, -0.25, 0.9999999], dtype=torch.float32)
    y = wrap_frac(x)
    assert (y >= 0).all() and (y < 1).all()
    torch.testing.assert_close(y, torch.tensor([0.0, 0.0, 0.0, 0.5, 0.75, 0.9999999]))


# ------------------------------------------------------------------ forward process


@pytest.mark.parametrize("t", [1, 250, 700, 1000])
def test_forward_noising_statistics(t):
    diff = DAOGDiffusion(ToyNet(), timesteps=1000)
    n_copies, sizes = 3000, [2]
    one = _crystals(sizes, seed=1)
    frac0 = one.frac_coords.repeat(n_copies, 1)
    lat0 = one.lattice.repeat(n_copies, 1, 1)
    batch = torch.arange(n_copies).repeat_interleave(2)
    gen = torch.Generator().manual_seed(t)
    tt = torch.full((n_copies,), t)
    noised = diff.add_noise(frac0, lat0, tt, batch, gen)

    abar = float(diff.alpha_bars[t])
    sigma = float(diff.sigmas[t])
    lat_mean, lat_var = noised.lattice.mean(0), noised.lattice.var(0)
    se = math.sqrt((1 - abar) / n_copies)
    torch.testing.assert_close(lat_mean, math.sqrt(abar) * one.lattice[0], atol=5 * se, rtol=0)
    torch.testing.assert_close(lat_var, torch.full_like(lat_var, 1 - abar), rtol=0.15, atol=0.0)
    torch.testing.assert_close(
        noised.lattice, math.sqrt(abar) * lat0 + math.sqrt(1 - abar) * noised.lattice_noise
    )

    f = noised.frac_coords
    assert (f >= 0).all() and (f < 1).all()
    d = _centred(f - frac0).reshape(-1).numpy()
    p_value = stats.kstest(d, lambda x: _wrapped_normal_cdf(x, sigma)).pvalue
    assert p_value > 1e-3, p_value
    torch.testing.assert_close(
        _centred(f - frac0), _centred(sigma * noised.coord_noise), atol=1e-12, rtol=0
    )

    # Target: the wrapped-normal score at sigma eps, over sqrt(lambda); unit variance.
    lam = float(diff.lambdas[t])
    expected = wrapped_normal_score(sigma * noised.coord_noise, sigma) / math.sqrt(lam)
    torch.testing.assert_close(noised.coord_target, expected)
    second = float((noised.coord_target**2).mean())
    assert second == pytest.approx(1.0, abs=0.1)


def test_add_noise_checks_t():
    diff = DAOGDiffusion(ToyNet(), timesteps=10)
    c = _crystals([2, 3])
    for bad in (torch.tensor([0, 1]), torch.tensor([1, 11]), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="t must"):
            diff.add_noise(c.frac_coords, c.lattice, bad, c.batch)


# -------------------------------------------------------------------------- loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_finite_differentiable_reproducible(dtype):
    net = ToyNet(dtype=dtype)
    diff = DAOGDiffusion(net, timesteps=100, cost_lattice=2.0, cost_coord=0.5)
    crystals = _crystals([1, 4, 7], seed=3)  # float64 batch: moved to the model dtype
    crystals.frac_coords += 3.0  # unwrapped input is fine
    out = diff.loss(crystals, torch.Generator().manual_seed(0))
    assert set(out) == {"loss", "loss_lattice", "loss_coord"}
    assert all(v.dtype == dtype and v.dim() == 0 and torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"], 2.0 * out["loss_lattice"] + 0.5 * out["loss_coord"])
    out["loss"].backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    again = diff.loss(crystals, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again["loss"], out["loss"])
    assert not torch.equal(diff(crystals, torch.Generator().manual_seed(1))["loss"], out["loss"])


def test_loss_draws_one_t_per_crystal_in_range():
    seen = []

    class Spy(ToyNet):
        def forward(self, atom_types, frac, lattice, t, batch, edges=None):
            seen.append(t.clone())
            assert t.dtype == torch.int64 and t.shape == (lattice.shape[0],)
            return super().forward(atom_types, frac, lattice, t, batch)

    diff = DAOGDiffusion(Spy(), timesteps=5)
    crystals = _crystals([2] * 200)
    diff.loss(crystals, torch.Generator().manual_seed(0))
    t = seen[0]
    assert int(t.min()) == 1 and int(t.max()) == 5  # 200 draws cover U{1..5}
    assert len(set(t.tolist())) == 5


def test_oracle_has_zero_loss():
    # The exact point-mass denoiser reproduces both targets: the loss's targets and
    # the oracle's scores (the ones the sampler relies on) agree in meaning and scale.
    crystals = _crystals([1, 3, 6], seed=5)
    diff = DAOGDiffusion(_point_oracle(1000, crystals), timesteps=1000)
    for seed in range(3):
        out = diff.loss(crystals, torch.Generator().manual_seed(seed))
        assert float(out["loss_lattice"]) < 1e-18 and float(out["loss_coord"]) < 1e-18


def test_loss_rejects_empty_batch():
    diff = DAOGDiffusion(ToyNet(), timesteps=10)
    with pytest.raises(ValueError, match="at least one"):
        diff.loss(CrystalBatch.empty())


# ---------------------------------------------------------------------- sampling


def test_point_mass_oracle_is_recovered():
    crystals = _crystals([1, 4, 7], seed=7)
    T = 100
    oracle = _point_oracle(T, crystals)
    diff = DAOGDiffusion(oracle, timesteps=T)
    out = diff.sample(
        crystals.atom_types, crystals.num_atoms, generator=torch.Generator().manual_seed(0)
    )
    assert out.frac_coords.dtype == torch.float64  # the model's dtype
    assert torch.equal(out.atom_types, crystals.atom_types)
    assert torch.equal(out.num_atoms, crystals.num_atoms)
    assert (out.frac_coords >= 0).all() and (out.frac_coords < 1).all()
    torch.testing.assert_close(
        _centred(out.frac_coords - crystals.frac_coords),
        torch.zeros_like(out.frac_coords),
        atol=1e-6,
        rtol=0,
    )
    torch.testing.assert_close(out.lattice, crystals.lattice, atol=1e-6, rtol=0)
    # Predictor-corrector: two evaluations per step, t = T..1.
    assert oracle.calls == [t for t in range(T, 0, -1) for _ in range(2)]


def test_float32_sampling_of_the_oracle():
    crystals = _crystals([3, 5], seed=8)
    diff = DAOGDiffusion(_point_oracle(50, crystals, dtype=torch.float32), timesteps=50)
    out = diff.sample(
        crystals.atom_types, crystals.num_atoms, generator=torch.Generator().manual_seed(1)
    )
    assert out.frac_coords.dtype == torch.float32 and out.lattice.dtype == torch.float32
    assert (out.frac_coords >= 0).all() and (out.frac_coords < 1).all()
    d = _centred(out.frac_coords.double() - crystals.frac_coords)
    assert float(d.abs().max()) < 1e-4
    torch.testing.assert_close(out.lattice.double(), crystals.lattice, atol=1e-3, rtol=1e-4)


def test_exact_ancestral_sampler_has_forward_marginals():
    # With the corrector off, each predictor step with exact scores of a point mass
    # samples q(x_{t-1} | x_t, x_0) exactly, so every intermediate state must follow
    # the forward marginal q(x_s | x_0).
    T, n_crystals = 50, 500
    one = _crystals([2], seed=11)
    frac0 = one.frac_coords.repeat(n_crystals, 1)
    lat0 = one.lattice.repeat(n_crystals, 1, 1)
    oracle = MixtureOracle(T, frac0[None], lat0[None])
    diff = DAOGDiffusion(oracle, timesteps=T)
    states = {}

    def record(s, state):
        if s in (40, 25, 10, 3):
            states[s] = state

    types = one.atom_types.repeat(n_crystals)
    nums = torch.full((n_crystals,), 2)
    diff.sample(
        types, nums, step_lr=0.0, generator=torch.Generator().manual_seed(2), callback=record
    )
    assert oracle.calls == list(range(T, 0, -1))  # one evaluation per step without corrector
    assert sorted(states) == [3, 10, 25, 40]
    for s, state in states.items():
        abar, sigma = float(diff.alpha_bars[s]), float(diff.sigmas[s])
        mean, var = state.lattice.mean(0), state.lattice.var(0)
        se = math.sqrt((1 - abar) / n_crystals)
        torch.testing.assert_close(mean, math.sqrt(abar) * one.lattice[0], atol=5 * se, rtol=0)
        torch.testing.assert_close(var, torch.full_like(var, 1 - abar), rtol=0.2, atol=0)
        d = _centred(state.frac_coords - frac0).reshape(-1).numpy()
        p_value = stats.kstest(d, lambda x, sigma=sigma: _wrapped_normal_cdf(x, sigma)).pvalue
        assert p_value > 1e-3, (s, p_value)


def test_two_point_mixture_is_split_in_proportion():
    T, n_crystals, w_a = 100, 300, 0.3
    a, b = _crystals([2], seed=21), _crystals([2], seed=22)
    frac0 = torch.stack([a.frac_coords.repeat(n_crystals, 1), b.frac_coords.repeat(n_crystals, 1)])
    lat0 = torch.stack([a.lattice.repeat(n_crystals, 1, 1), b.lattice.repeat(n_crystals, 1, 1)])
    diff = DAOGDiffusion(MixtureOracle(T, frac0, lat0, [w_a, 1 - w_a]), timesteps=T)
    out = diff.sample(
        a.atom_types.repeat(n_crystals),
        torch.full((n_crystals,), 2),
        generator=torch.Generator().manual_seed(3),
    )
    dist_l = (out.lattice[None] - lat0).flatten(2).abs().amax(-1)  # [2, B]
    dist_f = _centred(out.frac_coords[None] - frac0).abs().reshape(2, n_crystals, 6).amax(-1)
    is_a = dist_l[0] < dist_l[1]
    # Every sample lands on one component, with lattice and coordinates from the same one.
    assert float(torch.where(is_a, dist_l[0], dist_l[1]).max()) < 1e-6
    assert float(torch.where(is_a, dist_f[0], dist_f[1]).max()) < 1e-6
    frac_a = float(is_a.double().mean())
    assert abs(frac_a - w_a) < 4 * math.sqrt(w_a * (1 - w_a) / n_crystals), frac_a


def test_batched_equals_one_by_one_with_per_crystal_generators():
    net = ToyNet(seed=4, dtype=torch.float64)
    diff = DAOGDiffusion(net, timesteps=20)
    sizes = [3, 1, 5]
    crystals = _crystals(sizes, seed=9)
    seeds = [101, 202, 303]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    batched = diff.sample(crystals.atom_types, crystals.num_atoms, generator=gens, step_lr=1e-4)
    for k, seed in enumerate(seeds):
        single = crystals[k]
        alone = diff.sample(
            single.atom_types,
            single.num_atoms,
            generator=torch.Generator().manual_seed(seed),  # one generator == list of one
            step_lr=1e-4,
        )
        torch.testing.assert_close(alone.frac_coords, batched[k].frac_coords, atol=1e-10, rtol=0)
        torch.testing.assert_close(alone.lattice, batched[k].lattice, atol=1e-10, rtol=0)
    # Reordering the crystals (and their generators) reorders the results.
    order = [2, 0, 1]
    perm = crystals.select(order)
    gens = [torch.Generator().manual_seed(seeds[i]) for i in order]
    permuted = diff.sample(perm.atom_types, perm.num_atoms, generator=gens, step_lr=1e-4)
    for new, old in enumerate(order):
        torch.testing.assert_close(
            permuted[new].frac_coords, batched[old].frac_coords, atol=1e-10, rtol=0
        )


def test_sample_shapes_dtype_progress_and_callback(capsys):
    net = ToyNet(seed=1)  # float32 parameters
    diff = DAOGDiffusion(net, timesteps=6)
    crystals = _crystals([2, 1, 4])
    seen = []
    out = diff.sample(
        crystals.atom_types,
        crystals.num_atoms,
        progress=True,
        callback=lambda s, state: seen.append((s, state.lattice.shape, state.frac_coords.dtype)),
    )
    assert isinstance(out, CrystalBatch) and len(out) == 3 and out.num_nodes == 7
    assert out.frac_coords.dtype == torch.float32 and out.lattice.shape == (3, 3, 3)
    assert (out.frac_coords >= 0).all() and (out.frac_coords < 1).all()
    assert torch.isfinite(out.lattice).all()
    assert [s for s, _, _ in seen] == [5, 4, 3, 2, 1, 0]
    assert all(shape == (3, 3, 3) and dt == torch.float32 for _, shape, dt in seen)
    assert "DAO-G sampling" in capsys.readouterr().err


def test_parameter_free_model_samples_float32():
    class Zero(nn.Module):
        def forward(self, atom_types, frac, lattice, t, batch, edges=None):
            return Out(torch.zeros_like(frac), torch.zeros_like(lattice), None)

    out = DAOGDiffusion(Zero(), timesteps=4).sample(torch.tensor([8, 8, 14]), torch.tensor([3]))
    assert out.frac_coords.dtype == torch.float32


def test_sample_input_checks():
    diff = DAOGDiffusion(ToyNet(), timesteps=4)
    types = torch.tensor([8, 8, 14])
    with pytest.raises(ValueError, match="num_atoms sums"):
        diff.sample(types, torch.tensor([2]))
    with pytest.raises(ValueError, match="at least one atom"):
        diff.sample(types, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="generators"):
        diff.sample(types, torch.tensor([1, 2]), generator=[torch.Generator()])
    with pytest.raises(ValueError, match="energy_guidance"):
        diff.sample(types, torch.tensor([3]), guidance_scale=1.0)
    empty = diff.sample(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert len(empty) == 0


def test_bad_model_output_is_reported():
    class Bad(nn.Module):
        def forward(self, atom_types, frac, lattice, t, batch, edges=None):
            return Out(frac[:, :2], lattice, None)

    diff = DAOGDiffusion(Bad(), timesteps=3)
    with pytest.raises(ValueError, match=r"\.coord must be a \[N, 3\]"):
        diff.sample(torch.tensor([8, 8]), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"\.coord must be a \[N, 3\]"):
        diff.loss(_crystals([2]))


# ---------------------------------------------------------------------- guidance


def test_guidance_moves_lattice_toward_lower_energy():
    T, n_crystals, kappa = 50, 64, 0.02
    mu, target = 4.0, 6.0
    diff = DAOGDiffusion(GaussianLatticeOracle(T, mu, 0.3), timesteps=T)
    types, nums = torch.full((n_crystals,), 8), torch.ones(n_crystals, dtype=torch.int64)
    calls = []

    def energy_grad(frac, lattice, t, batch):
        # E_t = kappa / 2 ||L - target||^2 per crystal; gradient by autograd as DAO-P would.
        assert torch.is_grad_enabled() and not lattice.requires_grad
        calls.append(int(t[0]))
        lat = lattice.clone().requires_grad_(True)
        energy = 0.5 * kappa * ((lat - target) ** 2).sum((1, 2))
        (grad,) = torch.autograd.grad(energy.sum(), lat)
        return None, grad

    def run(w):
        gens = [torch.Generator().manual_seed(i) for i in range(n_crystals)]
        return diff.sample(
            types, nums, generator=gens, energy_guidance=energy_grad, guidance_scale=w
        ).lattice

    free, guided = run(0.0), run(DEFAULT_GUIDANCE_SCALE)
    assert calls == list(range(T, 0, -1))  # predictor only, once per step, only when w != 0
    e_free = ((free - target) ** 2).mean()
    e_guided = ((guided - target) ** 2).mean()
    assert float(free.mean()) == pytest.approx(mu, abs=0.15)
    # Same noise in both runs, so the difference is the guidance alone.
    assert float((guided - free).mean()) > 0.1
    assert float(e_guided) < 0.9 * float(e_free)


def test_guidance_moves_coordinates_toward_lower_energy():
    T, n_crystals, f_star = 50, 64, 0.5
    diff = DAOGDiffusion(GaussianLatticeOracle(T, 4.0, 0.3), timesteps=T)
    types, nums = torch.full((3 * n_crystals,), 8), torch.full((n_crystals,), 3)

    def energy_grad(frac, lattice, t, batch):
        # E_t = sum A (1 - cos 2 pi (F - f*)), periodic, minimum at F = f*; A = 1/4.
        return 0.5 * math.pi * torch.sin(2 * math.pi * (frac - f_star)), torch.zeros_like(lattice)

    def spread(w):
        gens = [torch.Generator().manual_seed(i) for i in range(n_crystals)]
        out = diff.sample(
            types, nums, generator=gens, energy_guidance=energy_grad, guidance_scale=w
        )
        return float(_centred(out.frac_coords - f_star).abs().mean())

    free, guided = spread(0.0), spread(DEFAULT_GUIDANCE_SCALE)
    assert free == pytest.approx(0.25, abs=0.05)  # uniform on the circle
    assert guided < 0.6 * free


def test_guidance_shift_is_posterior_variance_times_gradient():
    # With a zero denoiser the reverse steps are linear, so a constant energy gradient
    # shifts the result by a closed form: the F update gets -v_t w g_F (no rescaling,
    # the score is 0) and the L update -beta~_t w g_L, which the later steps scale by
    # 1 / sqrt(alpha_s). The corrector is on and sees no guidance.
    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, atom_types, frac, lattice, t, batch, edges=None):
            return Out(torch.zeros_like(frac), torch.zeros_like(lattice), None)

    T, w = 12, 3.0
    diff = DAOGDiffusion(Zero(), timesteps=T)
    g_f = torch.tensor([0.2, -0.1, 0.05], dtype=torch.float64)
    g_l = torch.arange(9, dtype=torch.float64).reshape(3, 3) / 10 - 0.3

    def grads(frac, lattice, t, batch):
        return g_f.expand_as(frac), g_l.expand_as(lattice)

    def run(scale):
        gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]
        return diff.sample(
            torch.tensor([8, 8, 14]),
            torch.tensor([2, 1]),
            generator=gens,
            energy_guidance=grads,
            guidance_scale=scale,
        )

    free, guided = run(0.0), run(w)
    sig, post, alphas = diff.sigmas, diff.posterior_variance, diff.alphas
    var_f = sum(
        sig[t - 1] ** 2 * (sig[t] ** 2 - sig[t - 1] ** 2) / sig[t] ** 2 for t in range(1, T + 1)
    )
    lat_factor = sum(post[t] * torch.prod(alphas[1:t]) ** -0.5 for t in range(1, T + 1))
    torch.testing.assert_close(
        _centred(guided.frac_coords - free.frac_coords), (-w * var_f * g_f).expand(3, 3)
    )
    torch.testing.assert_close(
        guided.lattice - free.lattice, (-w * lat_factor * g_l).expand(2, 3, 3)
    )


def test_guidance_output_shape_is_checked():
    diff = DAOGDiffusion(ToyNet(), timesteps=3)

    def bad(frac, lattice, t, batch):
        return frac[:1], None

    with pytest.raises(ValueError, match="grad_F"):
        diff.sample(
            torch.tensor([8, 8]), torch.tensor([2]), energy_guidance=bad, guidance_scale=1.0
        )
