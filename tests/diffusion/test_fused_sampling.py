"""DAO-G sampling with the fused steps, and the CUDA-graph sampling loop.

``_unfused_sample`` is the sampler loop as it was before the fused ops: plain torch
arithmetic on Python-float scalars. The fused loop must reproduce it with the same
generator (same noise, same order) within the tolerance table, for every backend.

The CUDA-graph tests are marked ``gpu``. With a CUDA generator the graph draws the
same noise as the eager loop (the generator is rewound after warm-up and capture, and
replay i advances it as eager step i does), so graph and eager agree within float
rounding; the remaining tests check the sampled distribution statistically and the
fallbacks. Their models avoid host synchronisation (no bincount, item, nonzero), as
graph capture requires.
"""

from __future__ import annotations

import math
import platform
from typing import NamedTuple

import numpy as np
import pytest
import torch
from helpers import TOLERANCES, assert_close, random_cell
from torch import nn

import dao
from dao.data.crystal import CrystalBatch
from dao.diffusion import DAOGDiffusion, wrap_frac
from dao.diffusion.daog import _Noise

pytestmark = pytest.mark.usefixtures("one_thread")

_HAS_TRITON_INTERPRETER = not torch.cuda.is_available() and dao.has_triton()


class Out(NamedTuple):
    coord: torch.Tensor
    lattice: torch.Tensor
    energy: torch.Tensor | None


class SyncFreeNet(nn.Module):
    """A small denoiser of the model contract that pools per crystal with a one-hot
    matrix product: no host synchronisation and no atomics, so it can be captured in a
    CUDA graph and gives the same numbers in a graph and eagerly."""

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
        onehot = (batch[:, None] == torch.arange(n_crystals, device=batch.device)).to(e.dtype)
        pooled = (onehot.T @ e) / onehot.sum(0).clamp(min=1.0)[:, None]
        tt = (t.to(e.dtype) / 1000.0)[:, None]
        ang = 2 * math.pi * frac
        h = torch.cat([ang.sin(), ang.cos(), e, pooled[batch], tt[batch]], dim=1)
        gram = (lattice @ lattice.transpose(1, 2)).reshape(n_crystals, 9) / 30.0
        m = self.lat_head(torch.cat([pooled, gram.tanh(), tt], dim=1)).reshape(n_crystals, 3, 3)
        return Out(torch.tanh(self.coord_head(h)), m @ lattice / 5.0, None)


class PointOracle(nn.Module):
    """Exact denoiser of a point mass at (F0, L0) laid out like the batch (sync-free)."""

    def __init__(self, diffusion_schedules: DAOGDiffusion, frac0, lat0):
        super().__init__()
        d = diffusion_schedules
        dtype = frac0.dtype
        self.register_buffer("frac0", frac0)
        self.register_buffer("lat0", lat0)
        self.register_buffer("alpha_bars", d.alpha_bars.to(dtype))
        self.register_buffer("sigmas", d.sigmas.to(dtype))
        self.register_buffer("lambdas", d.lambdas.to(dtype))

    def forward(self, atom_types, frac, lattice, t, batch, edges=None):
        from dao.diffusion import wrapped_normal_score  # noqa: PLC0415

        abar = self.alpha_bars[t][:, None, None]
        sigma = self.sigmas[t][batch][:, None]
        score = wrapped_normal_score(frac - self.frac0, sigma)
        coord = score / self.lambdas[t][batch][:, None].sqrt()
        eps = (lattice - abar.sqrt() * self.lat0) / (1 - abar).sqrt()
        return Out(coord, eps, None)


def _point_oracle_diffusion(crystals: CrystalBatch, T: int) -> DAOGDiffusion:
    schedules = DAOGDiffusion(nn.Identity(), timesteps=T)
    oracle = PointOracle(schedules, crystals.frac_coords, crystals.lattice)
    return DAOGDiffusion(oracle, timesteps=T)


def _crystals(sizes, seed=0, dtype=torch.float64) -> CrystalBatch:
    rng = np.random.default_rng(seed)
    types = torch.tensor(rng.integers(1, 90, size=sum(sizes)))
    frac = torch.tensor(rng.random((sum(sizes), 3)), dtype=dtype)
    lat = torch.tensor(np.stack([random_cell(rng, 15.0 * n) for n in sizes]), dtype=dtype)
    return CrystalBatch(types, frac, lat, torch.tensor(sizes))


@torch.no_grad()
def _unfused_sample(diff, atom_types, num_atoms, *, step_lr, generator, guidance=None, w=0.0):
    """The pre-fusion sampler loop (same draws, plain torch arithmetic)."""
    dtype, device = diff._dtype_device()
    n_crystals = num_atoms.shape[0]
    batch = torch.repeat_interleave(torch.arange(n_crystals), num_atoms)
    noise = _Noise(generator, num_atoms.tolist(), device, dtype)
    sig, lam = diff.sigmas.tolist(), diff.lambdas.tolist()
    betas, alphas = diff.betas.tolist(), diff.alphas.tolist()
    abar, post = diff.alpha_bars.tolist(), diff.posterior_variance.tolist()
    lattice = noise.normal_lattice()
    frac = noise.uniform_coords()
    for t in range(diff.timesteps, 0, -1):
        t_vec = torch.full((n_crystals,), t, dtype=torch.int64)
        last = t == 1
        sqrt_lam = math.sqrt(lam[t])
        if step_lr > 0.0:
            coord, _ = diff._call_model(atom_types, frac, lattice, t_vec, batch)
            gamma = step_lr * (sig[t] / sig[1]) ** 2
            frac = frac + gamma * sqrt_lam * coord
            if not last:
                frac = frac + math.sqrt(2.0 * gamma) * noise.normal_coords()
            frac = wrap_frac(frac)
        coord, eps_hat = diff._call_model(atom_types, frac, lattice, t_vec, batch)
        step = sig[t] ** 2 - sig[t - 1] ** 2
        var_f = sig[t - 1] ** 2 * step / sig[t] ** 2
        new_frac = frac + step * sqrt_lam * coord
        new_lattice = (lattice - betas[t] / math.sqrt(1.0 - abar[t]) * eps_hat) / math.sqrt(
            alphas[t]
        )
        if not last:
            new_frac = new_frac + math.sqrt(var_f) * noise.normal_coords()
            new_lattice = new_lattice + math.sqrt(post[t]) * noise.normal_lattice()
        if guidance is not None:
            grad_f, grad_l = diff._guidance(guidance, frac, lattice, t_vec, batch)
            if grad_f is not None:
                new_frac = new_frac - var_f * w * grad_f
            if grad_l is not None:
                new_lattice = new_lattice - post[t] * w * grad_l
        frac, lattice = wrap_frac(new_frac), new_lattice
    return frac, lattice


def _assert_same_crystals(frac, lattice, frac_ref, lat_ref, dtype):
    # Coordinates on the torus: compare the centred difference (a value near 0 may
    # wrap to near 1 in one run and not the other).
    d = frac.double() - frac_ref.double()
    assert_close(d - torch.round(d), torch.zeros_like(d), dtype)
    assert_close(lattice, lat_ref, dtype)


def _backends():
    out = ["cpp", "torch"]
    if _HAS_TRITON_INTERPRETER:
        out.append("triton")
    return out


# ------------------------------------------------------------------ eager, fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", _backends())
def test_fused_loop_matches_unfused_loop(dtype, backend):
    diff = DAOGDiffusion(SyncFreeNet(seed=3, dtype=dtype), timesteps=12)
    crystals = _crystals([3, 1, 5, 2], seed=4)
    kw = dict(step_lr=1e-3)
    types, nums = crystals.atom_types, crystals.num_atoms
    ref = _unfused_sample(diff, types, nums, generator=torch.Generator().manual_seed(7), **kw)
    out = diff.sample(
        crystals.atom_types,
        crystals.num_atoms,
        generator=torch.Generator().manual_seed(7),
        step_backend=backend,
        **kw,
    )
    assert out.frac_coords.dtype == dtype
    assert bool(((out.frac_coords >= 0) & (out.frac_coords < 1)).all())
    _assert_same_crystals(out.frac_coords, out.lattice, *ref, dtype)
    if platform.machine() in ("x86_64", "AMD64"):
        # Bit for bit where the compiler does not contract into FMAs: over a full run
        # (2,000 evaluations of a trained model) last-bit differences grow into
        # different samples, so the fused steps keep the unfused rounding exactly.
        assert torch.equal(out.frac_coords, ref[0]) and torch.equal(out.lattice, ref[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_loop_matches_unfused_with_guidance_and_per_crystal_generators(dtype):
    diff = DAOGDiffusion(SyncFreeNet(seed=5, dtype=dtype), timesteps=10)
    crystals = _crystals([2, 4, 1], seed=6)

    def grads(frac, lattice, t, batch):
        return 0.3 * torch.sin(2 * math.pi * frac), 0.05 * (lattice - 4.0)

    def gens():
        return [torch.Generator().manual_seed(s) for s in (11, 12, 13)]

    kw = dict(step_lr=1e-4)
    types, nums = crystals.atom_types, crystals.num_atoms
    ref = _unfused_sample(diff, types, nums, generator=gens(), guidance=grads, w=20.0, **kw)
    out = diff.sample(
        crystals.atom_types,
        crystals.num_atoms,
        generator=gens(),
        energy_guidance=grads,
        guidance_scale=20.0,
        **kw,
    )
    _assert_same_crystals(out.frac_coords, out.lattice, *ref, dtype)


def test_without_corrector_and_generator_state_after_sampling():
    # step_lr = 0 (one evaluation per step) and the same number of draws as before:
    # the generator ends in the same state, so later draws do not change either.
    diff = DAOGDiffusion(SyncFreeNet(seed=1, dtype=torch.float64), timesteps=8)
    crystals = _crystals([4, 2], seed=2)
    g_ref, g_new = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    types, nums = crystals.atom_types, crystals.num_atoms
    ref = _unfused_sample(diff, types, nums, step_lr=0.0, generator=g_ref)
    out = diff.sample(types, nums, step_lr=0.0, generator=g_new)
    _assert_same_crystals(out.frac_coords, out.lattice, *ref, torch.float64)
    assert torch.equal(torch.rand(4, generator=g_ref), torch.rand(4, generator=g_new))


def test_many_compositions_in_one_call():
    # 24 crystals of 1..20 atoms in one call equal each crystal sampled alone.
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 21, size=24).tolist()
    crystals = _crystals(sizes, seed=8)
    diff = DAOGDiffusion(SyncFreeNet(seed=2, dtype=torch.float64), timesteps=4)
    seeds = list(range(100, 124))
    batched = diff.sample(
        crystals.atom_types,
        crystals.num_atoms,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        step_lr=1e-4,
    )
    assert len(batched) == 24 and batched.num_nodes == sum(sizes)
    for k in (0, 7, 23):
        alone = diff.sample(
            crystals[k].atom_types,
            crystals[k].num_atoms,
            generator=torch.Generator().manual_seed(seeds[k]),
            step_lr=1e-4,
        )
        torch.testing.assert_close(alone.frac_coords, batched[k].frac_coords, atol=1e-12, rtol=0)
        torch.testing.assert_close(alone.lattice, batched[k].lattice, atol=1e-12, rtol=0)


def test_point_mass_is_recovered_with_fused_steps():
    crystals = _crystals([1, 6, 3], seed=9)
    diff = _point_oracle_diffusion(crystals, T=60)
    out = diff.sample(
        crystals.atom_types, crystals.num_atoms, generator=torch.Generator().manual_seed(0)
    )
    d = out.frac_coords - crystals.frac_coords
    assert float((d - torch.round(d)).abs().max()) < 1e-6
    torch.testing.assert_close(out.lattice, crystals.lattice, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ option checks


def test_cuda_graph_and_backend_options_are_checked():
    diff = DAOGDiffusion(SyncFreeNet(), timesteps=3)
    types, nums = torch.tensor([8, 8, 14]), torch.tensor([3])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA"):
            diff.sample(types, nums, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        diff.sample(types, nums, cuda_graph="yes")
    with pytest.raises(ValueError, match="step_backend must be"):
        diff.sample(types, nums, step_backend="cuda")
    # "auto" on a CPU model is the eager loop.
    a = diff.sample(types, nums, generator=torch.Generator().manual_seed(1), cuda_graph="auto")
    b = diff.sample(types, nums, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.frac_coords, b.frac_coords) and torch.equal(a.lattice, b.lattice)


@pytest.mark.parametrize("step_lr", [1e-3, 0.0])
def test_graph_step_replayed_equals_eager_loop(step_lr):
    # The step a CUDA graph captures, called T times on its static buffers with the
    # eager loop's generator (as replays after the rewind), gives the eager result:
    # same coefficients (gathered on the device from t), same draws in the same order.
    T = 9
    diff = DAOGDiffusion(SyncFreeNet(seed=9, dtype=torch.float32), timesteps=T)
    crystals = _crystals([3, 1, 6], seed=15)
    types, nums = crystals.atom_types, crystals.num_atoms
    eager = diff.sample(types, nums, generator=torch.Generator().manual_seed(21), step_lr=step_lr)
    gen = torch.Generator().manual_seed(21)
    lattice = torch.randn(3, 3, 3, generator=gen)  # the start, drawn as sample() draws it
    frac = torch.rand(10, 3, generator=gen)
    start = frac.clone()
    step, state_f, state_l, t_vec = diff._graph_step(
        frac,
        lattice,
        gen,
        atom_types=types,
        batch=crystals.batch,
        table=diff._step_table(step_lr, 0.0, "cpu"),
        step_lr=step_lr,
        backend="auto",
    )
    with torch.no_grad():  # as inside sample()
        for _ in range(T):
            step()
    assert t_vec.tolist() == [0, 0, 0]
    assert torch.equal(state_f, eager.frac_coords) and torch.equal(state_l, eager.lattice)
    assert torch.equal(frac, start)  # the buffers are copies


# ------------------------------------------------------------------ CUDA graphs


def _gpu_sample(diff, crystals, **kw):
    return diff.sample(crystals.atom_types.cuda(), crystals.num_atoms.cuda(), **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("step_lr", [1e-3, 0.0])
def test_graph_equals_eager_with_a_cuda_generator(dtype, step_lr):
    diff = DAOGDiffusion(SyncFreeNet(seed=4, dtype=dtype), timesteps=20).cuda()
    crystals = _crystals([3, 1, 5, 2, 17], seed=10)
    runs = {}
    for mode in (False, True):
        gen = torch.Generator(device="cuda").manual_seed(123)
        runs[mode] = _gpu_sample(diff, crystals, generator=gen, step_lr=step_lr, cuda_graph=mode)
    eager, graph = runs[False], runs[True]
    assert graph.frac_coords.device.type == "cuda" and graph.frac_coords.dtype == dtype
    # A few model evaluations deep the rounding differences of two kernel schedules
    # stay far below the float32 row, scaled by 10 for the 40 chained evaluations.
    tol = {k: 10 * v for k, v in TOLERANCES[dtype].items()}
    d = (graph.frac_coords - eager.frac_coords).double()
    torch.testing.assert_close(d - torch.round(d), torch.zeros_like(d), **tol)
    torch.testing.assert_close(graph.lattice, eager.lattice, **tol)


@pytest.mark.gpu
def test_graph_equals_eager_with_the_default_generator():
    diff = DAOGDiffusion(SyncFreeNet(seed=6, dtype=torch.float64), timesteps=15).cuda()
    crystals = _crystals([4, 4, 1], seed=11)
    runs = {}
    for mode in (False, "auto"):
        torch.cuda.manual_seed(77)
        runs[mode] = _gpu_sample(diff, crystals, step_lr=1e-3, cuda_graph=mode)
    d = (runs["auto"].frac_coords - runs[False].frac_coords).double()
    torch.testing.assert_close(d - torch.round(d), torch.zeros_like(d), atol=1e-9, rtol=0)
    torch.testing.assert_close(runs["auto"].lattice, runs[False].lattice, atol=1e-9, rtol=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_graph_recovers_point_masses_of_mixed_sizes(dtype):
    sizes = [1, 4, 7, 20, 2, 13]
    crystals = _crystals(sizes, seed=12, dtype=dtype)
    diff = _point_oracle_diffusion(crystals, T=100).cuda()
    out = _gpu_sample(diff, crystals, generator=torch.Generator().manual_seed(5), cuda_graph=True)
    assert torch.equal(out.num_atoms.cpu(), torch.tensor(sizes))
    d = out.frac_coords.cpu().double() - crystals.frac_coords.double()
    assert float((d - torch.round(d)).abs().max()) < (1e-4 if dtype == torch.float32 else 1e-6)
    atol = 1e-3 if dtype == torch.float32 else 1e-6
    lat = out.lattice.cpu().double()
    torch.testing.assert_close(lat, crystals.lattice.double(), atol=atol, rtol=0)


class GaussianLatticeOracle(nn.Module):
    """Data: L0 entries iid N(mu, s^2), F0 uniform; exact eps for L, zero coordinate score."""

    def __init__(self, schedules: DAOGDiffusion, mu: float, s: float):
        super().__init__()
        self.register_buffer("alpha_bars", schedules.alpha_bars.clone())
        self.mu, self.s = mu, s

    def forward(self, atom_types, frac, lattice, t, batch, edges=None):
        abar = self.alpha_bars[t][:, None, None]
        var = abar * self.s**2 + 1 - abar
        eps = (1 - abar).sqrt() * (lattice - abar.sqrt() * self.mu) / var
        return Out(torch.zeros_like(frac), eps, None)


@pytest.mark.gpu
def test_graph_samples_the_right_distribution():
    # CPU generator: the graph draws from a CUDA generator seeded by it, so the noise
    # differs from the eager loop's; the sampled lattice law must not.
    T, n_crystals, mu, s = 50, 4000, 4.0, 0.3
    schedules = DAOGDiffusion(nn.Identity(), timesteps=T)
    diff = DAOGDiffusion(GaussianLatticeOracle(schedules, mu, s), timesteps=T).cuda()
    types, nums = torch.full((n_crystals,), 8), torch.ones(n_crystals, dtype=torch.int64)
    stats = {}
    for mode in (False, True):
        out = diff.sample(
            types.cuda(), nums.cuda(), generator=torch.Generator().manual_seed(9), cuda_graph=mode
        )
        lat = out.lattice.double().reshape(-1).cpu()
        stats[mode] = (float(lat.mean()), float(lat.var()))
    m = 9 * n_crystals  # iid lattice entries
    # The ancestral sampler's mean is exact for a Gaussian (linear posterior means);
    # its variance carries a small discretisation bias, the same in both loops.
    for mean, var in stats.values():
        assert abs(mean - mu) < 5 * math.sqrt(var / m)
        assert abs(var - s**2) < 0.3 * s**2
    var = stats[False][1]
    assert abs(stats[True][1] - var) < 5 * math.sqrt(2) * var * math.sqrt(2 / m)


@pytest.mark.gpu
def test_graph_callback_progress_and_reproducibility():
    diff = DAOGDiffusion(SyncFreeNet(seed=7), timesteps=6).cuda()
    crystals = _crystals([2, 3], seed=13)
    seen = []

    def record(s, state):
        seen.append((s, state.lattice.clone()))

    def run(cb=None):
        gen = torch.Generator(device="cuda").manual_seed(4)
        return _gpu_sample(diff, crystals, generator=gen, cuda_graph=True, callback=cb)

    a = run(record)
    b = run()
    assert torch.equal(a.frac_coords, b.frac_coords) and torch.equal(a.lattice, b.lattice)
    assert [s for s, _ in seen] == [5, 4, 3, 2, 1, 0]
    assert not torch.equal(seen[0][1], seen[-1][1])  # snapshots, not one buffer
    torch.testing.assert_close(seen[-1][1], a.lattice)
    c = _gpu_sample(
        diff, crystals, generator=torch.Generator(device="cuda").manual_seed(5), cuda_graph=True
    )
    assert not torch.equal(c.lattice, a.lattice)


@pytest.mark.gpu
def test_graph_fallbacks_and_errors():
    diff = DAOGDiffusion(SyncFreeNet(seed=8), timesteps=5).cuda()
    crystals = _crystals([2, 3], seed=14)

    def gens():
        return [torch.Generator(device="cuda").manual_seed(s) for s in (1, 2)]

    with pytest.raises(ValueError, match="one generator per crystal"):
        _gpu_sample(diff, crystals, generator=gens(), cuda_graph=True)
    auto = _gpu_sample(diff, crystals, generator=gens(), cuda_graph="auto")
    eager = _gpu_sample(diff, crystals, generator=gens())
    assert torch.equal(auto.lattice, eager.lattice)

    # Guidance is a Python callback: nothing is captured, the eager loop runs.
    def grads(frac, lattice, t, batch):
        return None, 0.1 * lattice

    kw = dict(energy_guidance=grads, guidance_scale=2.0)
    g1 = _gpu_sample(diff, crystals, generator=gens(), cuda_graph=True, **kw)
    g2 = _gpu_sample(diff, crystals, generator=gens(), **kw)
    assert torch.equal(g1.lattice, g2.lattice)

    class Syncing(SyncFreeNet):
        def forward(self, atom_types, frac, lattice, t, batch, edges=None):
            if float(frac.sum()) < -1.0:  # a host sync, as graph capture forbids
                raise AssertionError
            return super().forward(atom_types, frac, lattice, t, batch)

    bad = DAOGDiffusion(Syncing(), timesteps=3).cuda()
    with pytest.raises(RuntimeError, match="cuda_graph=False"):
        _gpu_sample(bad, crystals, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "model, impl",
    [
        ("crysformer", "fused"),
        ("crysformer", "fused-dense"),
        ("crysformer", "factorized"),
        ("cspnet", None),
    ],
)
def test_graph_captures_the_real_models(model, impl):
    # The models build edge lists, slot layouts and kernel tile schedules with host
    # syncs; sample() memoizes them (dao._graph.static_batch), so the step captures.
    # (CSPNet has one edge path.)
    from dao.pretrained import build_diffusion  # noqa: PLC0415

    torch.manual_seed(0)
    size = dict(num_layers=2, hidden=64, heads=4, num_freqs=16) if model == "crysformer" else {}
    diff = build_diffusion({"model": {"model": model, **size}, "diffusion": {"timesteps": 12}})
    diff = diff.cuda().eval()
    if impl is not None:
        diff.model.edge_impl, _, backend = impl.partition("-")
        diff.model.edge_backend = backend or "auto"
    crystals = _crystals([3, 1, 7, 20, 2], seed=15, dtype=torch.float32)
    runs = {}
    for mode in (False, True):
        gen = torch.Generator(device="cuda").manual_seed(5)
        runs[mode] = _gpu_sample(diff, crystals, generator=gen, cuda_graph=mode)
    d = (runs[True].frac_coords - runs[False].frac_coords).double()
    tol = {k: 10 * v for k, v in TOLERANCES[torch.float32].items()}
    torch.testing.assert_close(d - torch.round(d), torch.zeros_like(d), **tol)
    torch.testing.assert_close(runs[True].lattice, runs[False].lattice, **tol)
