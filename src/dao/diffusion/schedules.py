"""Noise schedules of DAO-G (spec section 3): cosine DDPM betas for the lattice, geometric
wrapped-normal sigmas for the fractional coordinates.

Index convention (shared by every tensor here and by :class:`DAOGDiffusion`): tensors
have T + 1 entries indexed by the integer step t = 0..T. Entry 0 is the clean data
(beta_0 = 0, alpha_bar_0 = 1, sigma_0 = 0); the diffusion steps are t = 1..T, with
t = 1 the least noisy (sigma_1 = sigma_begin) and t = T the most (sigma_T = sigma_end).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from dao.diffusion.wrapped_normal import wrapped_normal_score_second_moment

__all__ = [
    "BetaSchedule",
    "SigmaSchedule",
    "cosine_alpha_bar",
    "cosine_beta_schedule",
    "geometric_sigma_schedule",
]


class BetaSchedule(NamedTuple):
    """DDPM schedule of the lattice, float64 tensors of shape [T + 1] indexed by t.

    Attributes:
        betas: beta_t; beta_0 = 0.
        alphas: 1 - beta_t.
        alpha_bars: prod_{s <= t} alpha_s; alpha_bar_0 = 1.
        posterior_variance: variance of q(L_{t-1} | L_t, L_0),
            beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t); 0 at t = 0 and t = 1.
    """

    betas: Tensor
    alphas: Tensor
    alpha_bars: Tensor
    posterior_variance: Tensor


class SigmaSchedule(NamedTuple):
    """Wrapped-normal schedule of the coordinates, float64 tensors [T + 1] indexed by t.

    Attributes:
        sigmas: sigma_t; sigma_0 = 0, sigma_1 = sigma_begin, sigma_T = sigma_end.
        lambdas: lambda_t = E[score^2] of the wrapped normal at sigma_t, per
            coordinate (see :func:`wrapped_normal_score_second_moment`); entry 0 is
            a placeholder 1 (sigma_0 = 0 has no score) and is never used.
    """

    sigmas: Tensor
    lambdas: Tensor


def _check_timesteps(timesteps: int, minimum: int) -> None:
    if not isinstance(timesteps, int) or isinstance(timesteps, bool) or timesteps < minimum:
        raise ValueError(f"timesteps must be an integer >= {minimum}, got {timesteps!r}")


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> Tensor:
    """The unclipped cosine alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    Returns:
        [T + 1] float64 for t = 0..T.
    """
    _check_timesteps(timesteps, 1)
    x = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((x + s) / (1.0 + s) * (math.pi / 2.0)) ** 2
    return f / f[0]


def cosine_beta_schedule(
    timesteps: int = 1000,
    s: float = 0.008,
    beta_min: float = 1e-4,
    beta_max: float = 0.9999,
) -> BetaSchedule:
    """Cosine beta schedule (Nichol & Dhariwal) with betas clipped to [beta_min, beta_max].

    beta_t = clip(1 - alpha_bar(t) / alpha_bar(t - 1)) for t = 1..T from
    :func:`cosine_alpha_bar`; alpha_bars are then recomputed as the cumulative product
    of the clipped 1 - beta_t, so the forward process and the sampler agree exactly.
    With T = 1000 the clip is active at both ends: beta_1 (~4e-5 unclipped) becomes
    1e-4 and beta_T (1 unclipped) becomes 0.9999.
    """
    raw = cosine_alpha_bar(timesteps, s)
    betas = torch.zeros(timesteps + 1, dtype=torch.float64)
    betas[1:] = (1.0 - raw[1:] / raw[:-1]).clamp(beta_min, beta_max)
    alphas = 1.0 - betas
    alpha_bars = torch.cumprod(alphas, dim=0)
    post = torch.zeros_like(betas)
    post[1:] = betas[1:] * (1.0 - alpha_bars[:-1]) / (1.0 - alpha_bars[1:])
    return BetaSchedule(betas, alphas, alpha_bars, post)


def geometric_sigma_schedule(
    timesteps: int = 1000, sigma_begin: float = 0.005, sigma_end: float = 0.5
) -> SigmaSchedule:
    """sigma_t = sigma_begin (sigma_end / sigma_begin)^((t - 1) / (T - 1)), t = 1..T.

    Also returns lambda_t (quadrature, exact to float64 round-off; cached).
    """
    _check_timesteps(timesteps, 2)
    if not (0.0 < sigma_begin < sigma_end):
        raise ValueError(
            f"need 0 < sigma_begin < sigma_end, got sigma_begin={sigma_begin}, "
            f"sigma_end={sigma_end}"
        )
    sigmas = torch.zeros(timesteps + 1, dtype=torch.float64)
    sigmas[1:] = torch.exp(
        torch.linspace(math.log(sigma_begin), math.log(sigma_end), timesteps, dtype=torch.float64)
    )
    # Pin the endpoints exactly (exp(log(x)) can be off by an ulp).
    sigmas[1], sigmas[-1] = sigma_begin, sigma_end
    lambdas = torch.ones_like(sigmas)
    lambdas[1:] = wrapped_normal_score_second_moment(sigmas[1:])
    return SigmaSchedule(sigmas, lambdas)
