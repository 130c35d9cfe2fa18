"""Cosine beta schedule (lattice) and geometric sigma schedule (coordinates)."""

from __future__ import annotations

import math

import pytest
import torch

from dao.diffusion import (
    cosine_alpha_bar,
    cosine_beta_schedule,
    geometric_sigma_schedule,
    wrapped_normal_score_second_moment,
)


def _reference_betas(T: int, s: float = 0.008) -> list[float]:
    """Plain-math cosine betas, clipped to [1e-4, 0.9999], for t = 1..T."""

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    return [min(max(1 - f(t) / f(t - 1), 1e-4), 0.9999) for t in range(1, T + 1)]


@pytest.mark.parametrize("T", [1000, 100, 7, 1])
def test_cosine_schedule_matches_formula(T):
    sched = cosine_beta_schedule(T)
    for tensor in sched:
        assert tensor.shape == (T + 1,) and tensor.dtype == torch.float64
    torch.testing.assert_close(
        sched.betas[1:], torch.tensor(_reference_betas(T), dtype=torch.float64), rtol=1e-12, atol=0
    )
    assert float(sched.betas[0]) == 0.0 and float(sched.alpha_bars[0]) == 1.0
    torch.testing.assert_close(sched.alphas, 1 - sched.betas)
    torch.testing.assert_close(sched.alpha_bars, torch.cumprod(1 - sched.betas, 0))


def test_cosine_schedule_properties_T1000():
    sched = cosine_beta_schedule(1000)
    b, ab = sched.betas[1:], sched.alpha_bars
    assert float(b.min()) == pytest.approx(1e-4) and float(b.max()) == pytest.approx(0.9999)
    # Both ends are clipped at T = 1000: beta_1 is ~4e-5 unclipped, beta_T is 1.
    assert float(b[0]) == pytest.approx(1e-4, rel=1e-12)
    assert float(b[-1]) == pytest.approx(0.9999, rel=1e-12)
    assert (b.diff() >= 0).all()  # the cosine betas grow with t
    assert (ab.diff() < 0).all()  # alpha_bar strictly decreasing
    assert float(ab[1]) == pytest.approx(1 - 1e-4)
    assert float(ab[-1]) < 1e-7
    # Away from the clipped ends alpha_bar follows the cosine curve up to the constant
    # factor the clipped first betas introduce.
    raw = cosine_alpha_bar(1000)
    ratio = ab[100:900] / raw[100:900]
    torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-10, atol=0)
    assert float(ratio[0]) == pytest.approx(1.0, abs=0.01)


def test_posterior_variance():
    sched = cosine_beta_schedule(1000)
    pv = sched.posterior_variance
    assert float(pv[0]) == 0.0 and float(pv[1]) == 0.0
    assert (pv[2:] > 0).all() and (pv[2:] <= sched.betas[2:]).all()
    t = 500
    expected = sched.betas[t] * (1 - sched.alpha_bars[t - 1]) / (1 - sched.alpha_bars[t])
    assert float(pv[t]) == pytest.approx(float(expected), rel=1e-14)


def test_geometric_sigmas():
    sched = geometric_sigma_schedule(1000, 0.005, 0.5)
    sig = sched.sigmas
    assert sig.shape == (1001,) and float(sig[0]) == 0.0
    assert float(sig[1]) == 0.005 and float(sig[1000]) == 0.5  # exact endpoints
    ratio = sig[2:] / sig[1:-1]
    torch.testing.assert_close(
        ratio, torch.full_like(ratio, 100.0 ** (1 / 999)), rtol=1e-12, atol=0
    )
    lam = sched.lambdas
    assert float(lam[0]) == 1.0 and (lam[1:] > 0).all() and (lam[1:].diff() < 0).all()
    torch.testing.assert_close(lam[1:], wrapped_normal_score_second_moment(sig[1:]))
    assert float(lam[1]) == pytest.approx(1 / 0.005**2, rel=1e-12)


def test_schedule_argument_checks():
    with pytest.raises(ValueError, match="timesteps"):
        cosine_beta_schedule(0)
    with pytest.raises(ValueError, match="timesteps"):
        geometric_sigma_schedule(1)
    with pytest.raises(ValueError, match="sigma_begin"):
        geometric_sigma_schedule(10, 0.5, 0.005)
