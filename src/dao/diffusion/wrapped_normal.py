"""The wrapped normal distribution on the unit circle [0, 1) and its score.

DAO-G diffuses fractional coordinates on the torus: F_t = (F_0 + sigma_t eps) mod 1,
so the displacement d = F_t - F_0 (one coordinate) has the density

    N_w(d; sigma) = sum_k N(d + k; 0, sigma^2),   k = -n_images .. n_images,

and the training target is its score d/dd log N_w(d; sigma), divided by sqrt(lambda)
with lambda = E[score^2] so that the target has unit variance per component.

Every function treats each coordinate independently (the 3-D density is the product
of three 1-D ones), is periodic with period 1 and broadcasts ``x`` against ``sigma``.
Inputs are first reduced to [-0.5, 0.5): the functions are periodic, and the image
sum is then centred on the argument, so the truncation at +-n_images (default 10) is
far below float64 round-off for every sigma <= 1.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "wrapped_normal_log_prob",
    "wrapped_normal_prob",
    "wrapped_normal_score",
    "wrapped_normal_score_second_moment",
]

_N_IMAGES = 10


def _centred(x: Tensor) -> Tensor:
    # Periodic reduction to [-0.5, 0.5); keeps autograd (derivative 1 almost everywhere).
    return x - torch.round(x)


def _image_exponents(x: Tensor, sigma: Tensor, n_images: int) -> tuple[Tensor, Tensor]:
    """Shifted arguments x + k [..., K] and the Gaussian exponents -(x + k)^2 / (2 sigma^2)."""
    x, sigma = torch.broadcast_tensors(_centred(x), sigma)
    k = torch.arange(-n_images, n_images + 1, dtype=x.dtype, device=x.device)
    shifted = x.unsqueeze(-1) + k
    expo = -0.5 * (shifted / sigma.unsqueeze(-1)) ** 2
    return shifted, expo


def _as_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype}")
    return sigma


def wrapped_normal_log_prob(x: Tensor, sigma: Tensor | float, n_images: int = _N_IMAGES) -> Tensor:
    """log N_w(x; sigma), the log-density on the unit circle (integrates to 1 over [0, 1)).

    Computed with logsumexp over the images, so it stays finite where every image
    underflows (small sigma, x far from 0 mod 1).

    Args:
        x: [...] displacements (any real values; period 1).
        sigma: scalar or a tensor broadcastable with ``x``, > 0.
        n_images: images k = -n_images..n_images in the sum.

    Returns:
        [...] log-density, dtype of ``x``.
    """
    sigma = _as_sigma(sigma, x)
    _, expo = _image_exponents(x, sigma, n_images)
    log_norm = torch.log(sigma) + 0.5 * math.log(2.0 * math.pi)
    return torch.logsumexp(expo, dim=-1) - log_norm


def wrapped_normal_prob(x: Tensor, sigma: Tensor | float, n_images: int = _N_IMAGES) -> Tensor:
    """N_w(x; sigma), the density on the unit circle; see :func:`wrapped_normal_log_prob`."""
    return wrapped_normal_log_prob(x, sigma, n_images).exp()


def wrapped_normal_score(x: Tensor, sigma: Tensor | float, n_images: int = _N_IMAGES) -> Tensor:
    """d/dx log N_w(x; sigma): the score of the wrapped normal (points towards 0 mod 1).

    The score is a softmax-weighted average of the image scores -(x + k) / sigma^2,
    with weights softmax_k(-(x + k)^2 / (2 sigma^2)); the softmax keeps it finite and
    accurate where the density itself underflows. For small sigma it is -x / sigma^2
    (x reduced to [-0.5, 0.5)); at x = +-0.5 it is 0 by symmetry.

    Args:
        x: [...] displacements (any real values; period 1).
        sigma: scalar or a tensor broadcastable with ``x``, > 0.
        n_images: images k = -n_images..n_images in the sum.

    Returns:
        [...] score, dtype of ``x``.
    """
    sigma = _as_sigma(sigma, x)
    shifted, expo = _image_exponents(x, sigma, n_images)
    weights = torch.softmax(expo, dim=-1)
    sigma = torch.broadcast_to(sigma, shifted.shape[:-1])
    return -(weights * shifted).sum(-1) / sigma**2


# Periodic trapezoid rule on M points of [-0.5, 0.5): for a smooth periodic integrand
# of width sigma its error is of order exp(-2 pi^2 sigma^2 M^2) (aliasing of the
# Gaussian's Fourier transform). M is chosen per noise level with sigma * M >= 8,
# which puts that error below exp(-1200): the result is exact to float64 round-off
# (~1e-14 relative; the tests check it against scipy.integrate.quad, Monte Carlo and
# both asymptotes).
_POINTS_PER_SIGMA = 8.0
_MIN_POINTS = 128
_CHUNK_ELEMENTS = 1 << 21


def _quadrature_points(sigma: float) -> int:
    m = max(_MIN_POINTS, math.ceil(_POINTS_PER_SIGMA / sigma))
    return m + (m % 2)


def _second_moment_chunk(sig: Tensor, num_points: int) -> Tensor:
    # The integrand p s^2 is even, so the M-point rule on [-0.5, 0.5) equals weighted
    # points on [0, 0.5]: x = 0 and x = 0.5 once, the M/2 - 1 interior points twice.
    half = num_points // 2
    x = torch.arange(half + 1, dtype=torch.float64) / num_points
    w = torch.full((half + 1,), 2.0 / num_points, dtype=torch.float64)
    w[0] = w[-1] = 1.0 / num_points
    s = sig.unsqueeze(-1)
    shifted, expo = _image_exponents(x, s, _N_IMAGES)
    lse = torch.logsumexp(expo, dim=-1, keepdim=True)
    score = -((expo - lse).exp() * shifted).sum(-1) / s**2
    prob = (lse.squeeze(-1) - torch.log(s) - 0.5 * math.log(2.0 * math.pi)).exp()
    return (w * prob * score**2).sum(-1)


@functools.lru_cache(maxsize=16)
def _second_moment_cached(sigmas: tuple[float, ...]) -> tuple[float, ...]:
    out = [0.0] * len(sigmas)
    order = sorted(range(len(sigmas)), key=lambda i: sigmas[i])
    start = 0
    while start < len(order):
        # Sorted ascending, so the first sigma of a chunk needs the most points.
        m = _quadrature_points(sigmas[order[start]])
        size = max(1, _CHUNK_ELEMENTS // ((m // 2 + 1) * (2 * _N_IMAGES + 1)))
        idx = order[start : start + size]
        vals = _second_moment_chunk(torch.tensor([sigmas[i] for i in idx], dtype=torch.float64), m)
        for i, v in zip(idx, vals.tolist(), strict=True):
            out[i] = v
        start += size
    return tuple(out)


def wrapped_normal_score_second_moment(sigma: Tensor | float) -> Tensor:
    """lambda(sigma) = E[score(d; sigma)^2] for d ~ N_w(0, sigma), per coordinate.

    This is the 1-D second moment: dividing the score by sqrt(lambda) gives every
    coordinate unit variance. (The 3-D E||score||^2 of one atom is 3 lambda.)

    Computed by quadrature, not Monte Carlo: lambda = int_{-1/2}^{1/2} p s^2 dx with
    the periodic trapezoid rule in float64 on M >= 8 / sigma points; the integrand is
    smooth and periodic, so the rule converges exponentially and the result is exact
    to float64 round-off (relative error ~1e-14). Small sigma: lambda -> 1 / sigma^2;
    large sigma: lambda -> 8 pi^2 exp(-4 pi^2 sigma^2) (the density tends to uniform).
    Results are cached per tuple of sigmas.

    Args:
        sigma: scalar or [S] noise levels, > 0.

    Returns:
        Tensor of the shape of ``sigma``, float64.
    """
    sig = torch.as_tensor(sigma, dtype=torch.float64)
    if sig.numel() and not bool((sig > 0).all()):
        raise ValueError("sigma must be positive")
    flat = tuple(float(v) for v in sig.reshape(-1).tolist())
    values = _second_moment_cached(flat)
    return torch.tensor(values, dtype=torch.float64).reshape(sig.shape)
