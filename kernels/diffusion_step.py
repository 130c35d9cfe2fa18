"""Triton kernels of ``dao::corrector_step`` and ``dao::predictor_step`` (``backend="triton"``).

Same contract as the C++ kernels (``csrc/diffusion_step.cpp``) and the reference twin
(:mod:`dao.reference.diffusion_step`):

* corrector: F' = (F + a s + c z) mod 1, coefficients ``(a, c)``;
* predictor, one launch over the whole batch: the first ``cdiv(3N, BLOCK)`` programs
  update coordinates, F' = (F + a s + c_F z_F - g_F grad_F) mod 1, the rest update
  lattices, L' = (L - b eps) / q + c_L z_L - g_L grad_L, coefficients
  ``(a, c_F, g_F, b, q, c_L, g_L)``.

The coefficients are read from a float64 device tensor (not passed as Python
scalars), so a CUDA graph that captured the launch picks up new values on replay
when the tensor's contents change. Absent terms are compiled out (constexpr flags);
their pointer arguments then receive any tensor of the right dtype and are never read.

Rounding: every coefficient is rounded to the element dtype and every product and
sum rounded on its own (``enable_fp_fusion=False``: no FMA contraction; the division
IEEE-rounded, ``tl.fdiv(ieee_rounding=True)``), the same
arithmetic as the unfused torch loop and the reference twin; the mod 1 is
``x - floor(x)`` with 1.0 folded back to 0.0, like :func:`dao.diffusion.wrap_frac`.

Launch choice: plain ``kernel[grid](...)`` launches inside the custom ops of
:mod:`dao.ops.diffusion_step`, which already have fake implementations (so
torch.compile treats them as opaque nodes). A ``torch.library.triton_op`` would let
torch.compile see the launch, but the op has one schema for four backends (C++ on
CPU tensors among them, which cannot be traced), and an elementwise kernel gains
nothing from being traced into. The launches also run unchanged under
``TRITON_INTERPRET=1`` (set it before the first import of this module).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["corrector_step_forward", "predictor_step_forward"]

_BLOCK = 1024
_NUM_WARPS = 4


@triton.jit
def _sign_bit(y):
    """True where y's sign bit is set (-0.0, negative values and subnormals, NaN)."""
    if y.dtype == tl.float64:
        neg = y.to(tl.int64, bitcast=True) < 0
    elif y.dtype == tl.float32:
        neg = y.to(tl.int32, bitcast=True) < 0
    else:
        neg = y.to(tl.int16, bitcast=True) < 0
    return neg


@triton.jit
def _wrap_unit(x):
    y = x - tl.floor(x)
    # Compiled for NVIDIA GPUs, floor flushes a float32 subnormal to zero (Triton links
    # libdevice with FTZ) while the subtraction keeps it: a negative subnormal x gives
    # y = x < 0 (seen on an H200, triton 3.6). Lift anything with the sign bit set by
    # one (a float comparison could flush too); exact x - floor(x) is never negative.
    y = tl.where(_sign_bit(y), y + 1.0, y)
    return tl.where(y >= 1.0, y - 1.0, y)


@triton.jit
def _corrector_step_fwd_kernel(
    frac_ptr,  # [n] F
    score_ptr,  # [n] s
    noise_ptr,  # [n] z (read only if HAS_NOISE)
    coef_ptr,  # [2] float64 (a, c)
    out_ptr,  # [n]
    n,
    HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dt = out_ptr.dtype.element_ty
    a = tl.load(coef_ptr).to(dt)
    x = tl.load(frac_ptr + offs, mask=mask, other=0.0)
    x = x + a * tl.load(score_ptr + offs, mask=mask, other=0.0)
    if HAS_NOISE:
        c = tl.load(coef_ptr + 1).to(dt)
        x = x + c * tl.load(noise_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _wrap_unit(x), mask=mask)


@triton.jit
def _predictor_step_fwd_kernel(
    frac_ptr,  # [n_frac] F
    score_ptr,  # [n_frac] s
    noise_f_ptr,  # [n_frac] z_F (if HAS_NOISE_F)
    grad_f_ptr,  # [n_frac] grad_F (if HAS_GRAD_F)
    lat_ptr,  # [n_lat] L
    eps_ptr,  # [n_lat] eps_hat
    noise_l_ptr,  # [n_lat] z_L (if HAS_NOISE_L)
    grad_l_ptr,  # [n_lat] grad_L (if HAS_GRAD_L)
    coef_ptr,  # [7] float64 (a, c_F, g_F, b, q, c_L, g_L)
    out_f_ptr,  # [n_frac]
    out_l_ptr,  # [n_lat]
    n_frac,
    n_lat,
    frac_blocks,  # cdiv(n_frac, BLOCK): programs below it work on coordinates
    HAS_NOISE_F: tl.constexpr,
    HAS_GRAD_F: tl.constexpr,
    HAS_NOISE_L: tl.constexpr,
    HAS_GRAD_L: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    dt = out_f_ptr.dtype.element_ty
    if pid < frac_blocks:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_frac
        a = tl.load(coef_ptr).to(dt)
        x = tl.load(frac_ptr + offs, mask=mask, other=0.0)
        x = x + a * tl.load(score_ptr + offs, mask=mask, other=0.0)
        if HAS_NOISE_F:
            c = tl.load(coef_ptr + 1).to(dt)
            x = x + c * tl.load(noise_f_ptr + offs, mask=mask, other=0.0)
        if HAS_GRAD_F:
            g = tl.load(coef_ptr + 2).to(dt)
            x = x - g * tl.load(grad_f_ptr + offs, mask=mask, other=0.0)
        tl.store(out_f_ptr + offs, _wrap_unit(x), mask=mask)
    else:
        offs = (pid - frac_blocks) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_lat
        b = tl.load(coef_ptr + 3).to(dt)
        q = tl.load(coef_ptr + 4).to(dt)
        y = tl.load(lat_ptr + offs, mask=mask, other=0.0)
        y = y - b * tl.load(eps_ptr + offs, mask=mask, other=0.0)
        if dt == tl.float64:
            y = y / q  # float64 division is IEEE round-to-nearest (div.rn.f64) already
        else:
            # float32 "/" is the approximate div.full.f32; fdiv with ieee_rounding is
            # div.rn.f32 (Triton 3.9 rejects it for float64: found by compile_check)
            y = tl.fdiv(y, q, ieee_rounding=True)
        if HAS_NOISE_L:
            c = tl.load(coef_ptr + 5).to(dt)
            y = y + c * tl.load(noise_l_ptr + offs, mask=mask, other=0.0)
        if HAS_GRAD_L:
            g = tl.load(coef_ptr + 6).to(dt)
            y = y - g * tl.load(grad_l_ptr + offs, mask=mask, other=0.0)
        tl.store(out_l_ptr + offs, y, mask=mask)


def corrector_step_forward(
    frac: torch.Tensor, score: torch.Tensor, noise: torch.Tensor | None, coefs: torch.Tensor
) -> torch.Tensor:
    """Launch the corrector on contiguous [N, 3] tensors; ``coefs`` [2] float64, same device."""
    out = torch.empty_like(frac)
    n = frac.numel()
    if n == 0:
        return out
    _corrector_step_fwd_kernel[(triton.cdiv(n, _BLOCK),)](
        frac,
        score,
        frac if noise is None else noise,
        coefs,
        out,
        n,
        HAS_NOISE=noise is not None,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out


def predictor_step_forward(
    frac: torch.Tensor,
    score: torch.Tensor,
    noise_frac: torch.Tensor | None,
    grad_frac: torch.Tensor | None,
    lattice: torch.Tensor,
    eps: torch.Tensor,
    noise_lattice: torch.Tensor | None,
    grad_lattice: torch.Tensor | None,
    coefs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch updating [N, 3] coordinates and [B, 3, 3] lattices (contiguous tensors);
    ``coefs`` [7] float64 on the same device."""
    out_f, out_l = torch.empty_like(frac), torch.empty_like(lattice)
    n_frac, n_lat = frac.numel(), lattice.numel()
    frac_blocks = triton.cdiv(n_frac, _BLOCK)
    grid = (frac_blocks + triton.cdiv(n_lat, _BLOCK),)
    if grid[0] == 0:
        return out_f, out_l
    # Absent terms are compiled out; their pointers only need a tensor of the dtype.
    f_any = frac if n_frac else lattice
    l_any = lattice if n_lat else f_any
    _predictor_step_fwd_kernel[grid](
        f_any,
        score if n_frac else f_any,
        f_any if noise_frac is None else noise_frac,
        f_any if grad_frac is None else grad_frac,
        l_any,
        eps if n_lat else l_any,
        l_any if noise_lattice is None else noise_lattice,
        l_any if grad_lattice is None else grad_lattice,
        coefs,
        out_f if n_frac else out_l,
        out_l if n_lat else out_f,
        n_frac,
        n_lat,
        frac_blocks,
        HAS_NOISE_F=noise_frac is not None,
        HAS_GRAD_F=grad_frac is not None,
        HAS_NOISE_L=noise_lattice is not None,
        HAS_GRAD_L=grad_lattice is not None,
        BLOCK=_BLOCK,
        num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )
    return out_f, out_l
