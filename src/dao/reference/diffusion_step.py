"""Pure-PyTorch twins of the fused DAO-G sampling steps (``dao::corrector_step``,
``dao::predictor_step``).

Same signature as the public ops in :mod:`dao.ops.diffusion_step` (less ``backend``)
and the same arithmetic, operation by operation, as the unfused sampler loop: each
coefficient is rounded to the tensors' dtype first and every product and sum is
rounded in that dtype, as torch does for ``tensor * python_float``. The fractional
update ends with ``x mod 1`` written exactly like :func:`dao.diffusion.wrap_frac`
(``x - floor(x)``, and 1.0 folded back to 0.0), so results lie in [0, 1).

Coefficient vectors (float64 on the tensors' device, one entry per name):

* corrector ``(a, c)``: F' = (F + a s + c z) mod 1;
* predictor ``(a, c_frac, g_frac, b, q, c_lattice, g_lattice)``:
  F' = (F + a s + c_frac z_F - g_frac grad_F) mod 1,
  L' = (L - b eps) / q + c_lattice z_L - g_lattice grad_L.

(q = sqrt(alpha_t) divides, as in the unfused loop, rather than r = 1 / q multiplying:
the two differ in the last bit, and over the 2,000 network evaluations of a full
sampling run such differences grow into visibly different samples.)

A term whose tensor is None is left out (not multiplied by zero). Sampling only: no
autograd formula is defined beyond what plain torch gives here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "CORRECTOR_COEFFICIENTS",
    "PREDICTOR_COEFFICIENTS",
    "corrector_step",
    "predictor_step",
    "wrap_unit",
]

#: Names of the entries of the corrector's coefficient vector, in order.
CORRECTOR_COEFFICIENTS = ("a", "c")
#: Names of the entries of the predictor's coefficient vector, in order.
PREDICTOR_COEFFICIENTS = ("a", "c_frac", "g_frac", "b", "q", "c_lattice", "g_lattice")


def wrap_unit(x: Tensor) -> Tensor:
    """x mod 1 in [0, 1): ``x - floor(x)``, with a result that rounds to 1.0 set to 0.0."""
    y = x - torch.floor(x)
    return torch.where(y >= 1.0, y - 1.0, y)


def corrector_step(frac: Tensor, score: Tensor, noise: Tensor | None, coefs: Tensor) -> Tensor:
    """Langevin corrector on the fractional coordinates.

    Args:
        frac: [N, 3] F, float32 or float64.
        score: [N, 3] s, the model's coordinate output (same dtype).
        noise: [N, 3] z ~ N(0, I), or None (no noise term).
        coefs: [2] (a, c), any floating dtype.

    Returns:
        [N, 3] (F + a s + c z) mod 1, a new tensor.
    """
    k = coefs.to(frac.dtype)
    x = frac + k[0] * score
    if noise is not None:
        x = x + k[1] * noise
    return wrap_unit(x)


def predictor_step(
    frac: Tensor,
    score: Tensor,
    noise_frac: Tensor | None,
    grad_frac: Tensor | None,
    lattice: Tensor,
    eps: Tensor,
    noise_lattice: Tensor | None,
    grad_lattice: Tensor | None,
    coefs: Tensor,
) -> tuple[Tensor, Tensor]:
    """Ancestral predictor step t -> t - 1 on coordinates and lattices.

    Args:
        frac: [N, 3] F.
        score: [N, 3] s, the model's coordinate output.
        noise_frac: [N, 3] z_F, or None.
        grad_frac: [N, 3] energy gradient grad_F, or None.
        lattice: [B, 3, 3] L.
        eps: [B, 3, 3] the model's lattice noise prediction.
        noise_lattice: [B, 3, 3] z_L, or None.
        grad_lattice: [B, 3, 3] energy gradient grad_L, or None.
        coefs: [7] (a, c_frac, g_frac, b, q, c_lattice, g_lattice).

    Returns:
        (F' [N, 3] in [0, 1), L' [B, 3, 3]), new tensors.
    """
    k = coefs.to(frac.dtype)
    x = frac + k[0] * score
    if noise_frac is not None:
        x = x + k[1] * noise_frac
    if grad_frac is not None:
        x = x - k[2] * grad_frac
    y = (lattice - k[3] * eps) / k[4]
    if noise_lattice is not None:
        y = y + k[5] * noise_lattice
    if grad_lattice is not None:
        y = y - k[6] * grad_lattice
    return wrap_unit(x), y
