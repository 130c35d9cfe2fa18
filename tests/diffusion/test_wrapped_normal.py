"""Wrapped normal on the unit circle: density, score and the score's second moment."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from dao.diffusion import (
    wrapped_normal_log_prob,
    wrapped_normal_prob,
    wrapped_normal_score,
    wrapped_normal_score_second_moment,
)

SIGMAS = [0.005, 0.02, 0.1, 0.3, 0.5]


def _fourier_density(x: np.ndarray, sigma: float, terms: int = 60):
    """Independent representation (Poisson summation): p = 1 + 2 sum_n q^(n^2) cos(2 pi n x),
    and its derivative; converges fast for sigma >~ 0.05."""
    n = np.arange(1, terms + 1)[:, None]
    q = np.exp(-2.0 * math.pi**2 * sigma**2 * n**2)
    p = 1.0 + 2.0 * (q * np.cos(2 * math.pi * n * x)).sum(0)
    dp = -4.0 * math.pi * (q * n * np.sin(2 * math.pi * n * x)).sum(0)
    return p, dp


def _image_density(x: float, sigma: float):
    """Independent plain-numpy image sum (k = -3..3 suffices for sigma <= 0.5), and p'."""
    k = np.arange(-3, 4)
    g = np.exp(-0.5 * ((x + k) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    return g.sum(), (-(x + k) / sigma**2 * g).sum()


@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_matches_finite_differences(sigma):
    x = torch.linspace(-1.3, 1.7, 301, dtype=torch.float64)
    if sigma < 0.05:
        # Away from the peak log p ~ -x^2 / 2 sigma^2 is huge; stay where FD is well conditioned.
        x = torch.linspace(-6 * sigma, 6 * sigma, 301, dtype=torch.float64) + 3.0
    h = 1e-5 * sigma
    fd = (wrapped_normal_log_prob(x + h, sigma) - wrapped_normal_log_prob(x - h, sigma)) / (2 * h)
    score = wrapped_normal_score(x, sigma)
    scale = 1.0 / sigma
    torch.testing.assert_close(score / scale, fd / scale, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_score_is_autograd_of_log_prob(sigma):
    x = torch.linspace(-0.7, 0.7, 57, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(wrapped_normal_log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(wrapped_normal_score(x.detach(), sigma), grad)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_density_integrates_to_one(sigma):
    def p(x):
        return float(wrapped_normal_prob(torch.tensor(x, dtype=torch.float64), sigma))

    # [0, 1) with the peaks at both ends; points tell quad where the mass is.
    total, err = integrate.quad(p, 0.0, 1.0, points=[sigma, 1 - sigma], limit=200)
    assert total == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.5])
def test_density_and_score_match_fourier_series(sigma):
    x = np.linspace(-0.5, 0.5, 101)
    p, dp = _fourier_density(x, sigma)
    xt = torch.tensor(x)
    np.testing.assert_allclose(wrapped_normal_prob(xt, sigma).numpy(), p, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(wrapped_normal_score(xt, sigma).numpy(), dp / p, atol=1e-10)


def test_periodic_odd_and_broadcasting():
    x = torch.rand(7, 3, dtype=torch.float64) - 0.5
    sigma = torch.tensor([0.01, 0.1, 0.5], dtype=torch.float64)
    s = wrapped_normal_score(x, sigma)
    assert s.shape == (7, 3)
    torch.testing.assert_close(wrapped_normal_score(x + 3.0, sigma), s)
    torch.testing.assert_close(wrapped_normal_score(-x, sigma), -s)
    torch.testing.assert_close(
        wrapped_normal_log_prob(x - 2.0, sigma), wrapped_normal_log_prob(x, sigma)
    )
    # Per-element sigma equals scalar sigma column by column.
    for j in range(3):
        torch.testing.assert_close(s[:, j], wrapped_normal_score(x[:, j], float(sigma[j])))
    assert float(
        wrapped_normal_score(torch.tensor(0.5, dtype=torch.float64), 0.1)
    ) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_far_from_the_peak(dtype):
    # sigma = 0.005 at half a period: every image underflows exp, logsumexp must not.
    x = torch.tensor([0.2, 0.45, 0.4999, 0.5, -0.3], dtype=dtype)
    logp = wrapped_normal_log_prob(x, 0.005)
    s = wrapped_normal_score(x, 0.005)
    assert torch.isfinite(logp).all() and torch.isfinite(s).all()
    ref = -0.5 * (x.double() / 0.005) ** 2 - math.log(0.005 * math.sqrt(2 * math.pi))
    torch.testing.assert_close(logp[:2].double(), ref[:2], rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(
        s[[0, 1, 4]].double(), -x[[0, 1, 4]].double() / 0.005**2, rtol=1e-5, atol=0.0
    )


def test_lambda_small_sigma_is_inverse_variance():
    sig = torch.tensor([0.002, 0.005, 0.01, 0.05], dtype=torch.float64)
    lam = wrapped_normal_score_second_moment(sig)
    # The wrapped tails are exp(-1/(8 sigma^2)) <= exp(-50): lambda = 1 / sigma^2 exactly.
    torch.testing.assert_close(lam * sig**2, torch.ones_like(sig), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("sigma", [0.08, 0.15, 0.25, 0.35, 0.5])
def test_lambda_matches_independent_quadrature(sigma):
    # scipy.quad of p'^2 / p with the Fourier-series density (a different representation
    # and a different integrator than the implementation's image sum + trapezoid rule).
    def integrand(x):
        p, dp = _fourier_density(np.array([x]), sigma)
        return float(dp[0] ** 2 / p[0])

    ref, _ = integrate.quad(integrand, -0.5, 0.5, epsabs=0.0, epsrel=1e-12, limit=200)
    lam = float(wrapped_normal_score_second_moment(sigma))
    assert lam == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("sigma", [0.005, 0.01, 0.03])
def test_lambda_small_sigma_against_image_quadrature(sigma):
    def integrand(x):
        p, dp = _image_density(x, sigma)
        return dp**2 / p if p > 0 else 0.0

    ref, _ = integrate.quad(integrand, -0.5, 0.5, points=[-sigma, 0.0, sigma], limit=400)
    assert float(wrapped_normal_score_second_moment(sigma)) == pytest.approx(ref, rel=1e-8)


def test_lambda_large_sigma_asymptote():
    # p -> 1 + 2 q cos(2 pi x), q = exp(-2 pi^2 sigma^2): lambda -> 8 pi^2 q^2 (1 + O(q)).
    for sigma in (0.4, 0.5, 0.6):
        q = math.exp(-2 * math.pi**2 * sigma**2)
        lam = float(wrapped_normal_score_second_moment(sigma))
        assert lam == pytest.approx(8 * math.pi**2 * q**2, rel=4 * q)


def test_lambda_monte_carlo_and_shape():
    gen = torch.Generator().manual_seed(0)
    sig = torch.tensor([[0.01, 0.2], [0.4, 0.5]], dtype=torch.float64)
    lam = wrapped_normal_score_second_moment(sig)
    assert lam.shape == (2, 2) and lam.dtype == torch.float64 and (lam > 0).all()
    d = sig * torch.randn(40_000, 2, 2, generator=gen, dtype=torch.float64)
    s2 = wrapped_normal_score(d, sig) ** 2
    mc, se = s2.mean(0), s2.std(0) / math.sqrt(d.shape[0])
    assert ((mc - lam).abs() < 5 * se).all(), (mc, lam, se)
    # Monotone decreasing in sigma.
    grid = torch.exp(torch.linspace(math.log(0.005), math.log(0.5), 50, dtype=torch.float64))
    assert (wrapped_normal_score_second_moment(grid).diff() < 0).all()


def test_lambda_rejects_nonpositive_sigma():
    with pytest.raises(ValueError, match="positive"):
        wrapped_normal_score_second_moment(torch.tensor([0.1, 0.0]))
