"""Fused DAO-G sampling updates, as the ``dao::corrector_step`` and ``dao::predictor_step`` ops.

One predictor-corrector step of :meth:`dao.diffusion.DAOGDiffusion.sample` is, besides
the two network evaluations, a dozen elementwise torch ops on small tensors; on a
GPU each is a kernel launch and on a CPU each a dispatch. These ops do the
arithmetic in one pass each (the predictor updates coordinates and lattices of the
whole batch in one launch):

* corrector, coefficients ``(a, c)``: F' = (F + a s + c z) mod 1;
* predictor, coefficients ``(a, c_frac, g_frac, b, q, c_lattice, g_lattice)``:
  F' = (F + a s + c_frac z_F - g_frac grad_F) mod 1 and
  L' = (L - b eps) / q + c_lattice z_L - g_lattice grad_L.

Noise is drawn by torch outside the ops (so results depend only on the generator);
the mod 1 equals :func:`dao.diffusion.wrap_frac` exactly (result in [0, 1), also for
values that round to 1.0). Coefficients travel as a float64 tensor on the tensors'
device, so the sampler keeps one table for all steps and a CUDA graph replays the
step with new values without recapture.

Backends (same arithmetic, rounding included; see :mod:`dao.reference.diffusion_step`):

* ``"cpp"``: ``csrc/diffusion_step.cpp``, CPU tensors.
* ``"triton"``: ``dao.kernels.diffusion_step``, on a GPU or under TRITON_INTERPRET=1.
* ``"torch"``: the reference twin (about ten torch ops; any device).
* ``"auto"``: cpp on CPU; triton on CUDA if importable, else torch with a warning;
  torch on other devices.

The ops are **not differentiable** (sampling only): the public functions raise a
ValueError when grad mode is on and an input requires grad.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from dao._ext import has_triton, load_core, num_threads
from dao.reference import diffusion_step as _ref
from dao.reference.diffusion_step import CORRECTOR_COEFFICIENTS, PREDICTOR_COEFFICIENTS

__all__ = [
    "BACKENDS",
    "CORRECTOR_COEFFICIENTS",
    "PREDICTOR_COEFFICIENTS",
    "corrector_step",
    "predictor_step",
]

BACKENDS = ("auto", "cpp", "triton", "torch")
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "cpu":
        if backend == "triton" and not has_triton():
            raise ValueError(
                "backend='triton' on CPU tensors needs triton and TRITON_INTERPRET=1 "
                "(the interpreter); use backend='cpp' for speed"
            )
        return "cpp" if backend == "auto" else backend
    if backend == "cpp":
        raise ValueError("backend='cpp' needs CPU tensors; use 'triton', 'torch' or 'auto'")
    if device.type == "cuda":
        if backend == "triton" and not has_triton():
            raise ValueError("backend='triton' needs the triton package")
        if backend != "auto":
            return backend
        if has_triton():
            return "triton"
        warnings.warn(
            "dao.ops diffusion steps: triton is not installed, so the fused kernel is not "
            "available; using the PyTorch twin (same results, more kernel launches)",
            RuntimeWarning,
            stacklevel=4,
        )
        return "torch"
    if backend in ("auto", "torch"):
        return "torch"
    raise ValueError(f"backend {backend!r} does not support device {device}")


# ------------------------------------------------------------------ input checks


def _check_float(name: str, t: Tensor, shape: tuple[int, ...], like: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.dtype != like.dtype:
        raise ValueError(f"{name} must have dtype {like.dtype} (like frac), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on {like.device} (like frac), got {t.device}")


def _check_frac(frac: Tensor) -> None:
    if not isinstance(frac, Tensor):
        raise ValueError(f"frac must be a tensor, got {type(frac).__name__}")
    if frac.dim() != 2 or frac.shape[1] != 3:
        raise ValueError(f"frac must be [N, 3], got shape {list(frac.shape)}")
    if frac.dtype not in _DTYPE_CODE:
        raise ValueError(f"frac must be float32 or float64, got {frac.dtype}")


def _as_coefs(coefs, names: tuple[str, ...], like: Tensor) -> Tensor:
    """The coefficient vector as float64 on the device of ``like`` (from a tensor or floats)."""
    if isinstance(coefs, Tensor):
        if coefs.shape != (len(names),) or not coefs.dtype.is_floating_point:
            raise ValueError(
                f"coefs must be a floating [{len(names)}] tensor {names}, got "
                f"{coefs.dtype} of shape {list(coefs.shape)}"
            )
        if coefs.device != like.device:
            raise ValueError(
                f"coefs must be on {like.device} (like frac), got {coefs.device}: keep the "
                "coefficient table on the device (no host copies inside a sampling loop)"
            )
        return coefs.to(torch.float64)
    if not isinstance(coefs, Sequence) or len(coefs) != len(names):
        raise ValueError(f"coefs must be a [{len(names)}] tensor or {len(names)} floats {names}")
    return torch.tensor([float(c) for c in coefs], dtype=torch.float64, device=like.device)


def _check_no_grad(name: str, tensors) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError(
            f"dao.ops.{name} is not differentiable (a sampling update): call it under "
            "torch.no_grad() or pass detached tensors"
        )


# ------------------------------------------------------------------ backends


def _contig(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _corrector_cpp(frac, score, noise, coefs):
    out = torch.empty_like(frac)
    load_core().corrector_step_cpu(
        frac.data_ptr(), score.data_ptr(), _ptr(noise), coefs.data_ptr(), out.data_ptr(),
        frac.numel(), _DTYPE_CODE[frac.dtype], num_threads(),
    )  # fmt: skip
    return out


def _predictor_cpp(frac, score, noise_f, grad_f, lattice, eps, noise_l, grad_l, coefs):
    out_f, out_l = torch.empty_like(frac), torch.empty_like(lattice)
    load_core().predictor_step_cpu(
        frac.data_ptr(), score.data_ptr(), _ptr(noise_f), _ptr(grad_f), lattice.data_ptr(),
        eps.data_ptr(), _ptr(noise_l), _ptr(grad_l), coefs.data_ptr(), out_f.data_ptr(),
        out_l.data_ptr(), frac.numel(), lattice.numel(), _DTYPE_CODE[frac.dtype],
        num_threads(),
    )  # fmt: skip
    return out_f, out_l


def _corrector_triton(frac, score, noise, coefs):
    from dao.kernels.diffusion_step import corrector_step_forward  # noqa: PLC0415

    return corrector_step_forward(frac, score, noise, coefs)


def _predictor_triton(*args):
    from dao.kernels.diffusion_step import predictor_step_forward  # noqa: PLC0415

    return predictor_step_forward(*args)


_CORRECTORS = {"cpp": _corrector_cpp, "triton": _corrector_triton, "torch": _ref.corrector_step}
_PREDICTORS = {"cpp": _predictor_cpp, "triton": _predictor_triton, "torch": _ref.predictor_step}


# ------------------------------------------------------------------ custom ops


@torch.library.custom_op("dao::corrector_step", mutates_args=())
def _corrector_step_op(
    frac: Tensor, score: Tensor, noise: Tensor | None, coefs: Tensor, backend: str
) -> Tensor:
    """(F + a s + c z) mod 1 [N, 3]; coefs [2] float64 = (a, c)."""
    name = _resolve_backend(backend, frac.device)
    frac, score, noise = frac.contiguous(), score.contiguous(), _contig(noise)
    return _CORRECTORS[name](frac, score, noise, coefs.contiguous())


@_corrector_step_op.register_fake
def _(frac, score, noise, coefs, backend):
    return torch.empty_like(frac, memory_format=torch.contiguous_format)


@torch.library.custom_op("dao::predictor_step", mutates_args=())
def _predictor_step_op(
    frac: Tensor,
    score: Tensor,
    noise_frac: Tensor | None,
    grad_frac: Tensor | None,
    lattice: Tensor,
    eps: Tensor,
    noise_lattice: Tensor | None,
    grad_lattice: Tensor | None,
    coefs: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """((F + a s + c_F z_F - g_F grad_F) mod 1 [N, 3], (L - b eps) / q + c_L z_L - g_L grad_L
    [B, 3, 3]); coefs [7] float64."""
    name = _resolve_backend(backend, frac.device)
    args = (frac, score, noise_frac, grad_frac, lattice, eps, noise_lattice, grad_lattice, coefs)
    return _PREDICTORS[name](*(_contig(t) for t in args))


@_predictor_step_op.register_fake
def _(frac, score, noise_frac, grad_frac, lattice, eps, noise_lat, grad_lat, coefs, backend):
    fmt = torch.contiguous_format
    return torch.empty_like(frac, memory_format=fmt), torch.empty_like(lattice, memory_format=fmt)


# ------------------------------------------------------------------ public functions


def corrector_step(
    frac: Tensor,
    score: Tensor,
    noise: Tensor | None,
    coefs: Tensor | Sequence[float],
    *,
    backend: str = "auto",
) -> Tensor:
    """Fused Langevin corrector of DAO-G: (F + a s + c z) mod 1.

    In the sampler a = gamma sqrt(lambda_t) and c = sqrt(2 gamma) (no noise on the
    last step), gamma = step_lr (sigma_t / sigma_1)^2.

    Args:
        frac: [N, 3] F, float32 or float64.
        score: [N, 3] s (the model's coordinate output), same dtype and device.
        noise: [N, 3] z, or None to leave the noise term out.
        coefs: (a, c) as a [2] floating tensor on the device of ``frac`` (read as
            float64; the kernels read it on the device, so no host sync) or two floats.
        backend: one of ``BACKENDS`` (see the module docstring).

    Returns:
        [N, 3] new tensor in [0, 1), the dtype of ``frac``. Not differentiable.

    Raises:
        ValueError: bad shapes, dtypes or devices, inputs that require grad in grad
            mode, or an unavailable backend.
    """
    _check_frac(frac)
    _check_float("score", score, tuple(frac.shape), frac)
    if noise is not None:
        _check_float("noise", noise, tuple(frac.shape), frac)
    _check_no_grad("corrector_step", (frac, score, noise))
    k = _as_coefs(coefs, CORRECTOR_COEFFICIENTS, frac)
    if backend != "auto":  # clear errors before dispatch ("auto" never fails)
        _resolve_backend(backend, frac.device)
    return _corrector_step_op(frac, score, noise, k, backend)


def predictor_step(
    frac: Tensor,
    score: Tensor,
    noise_frac: Tensor | None,
    grad_frac: Tensor | None,
    lattice: Tensor,
    eps: Tensor,
    noise_lattice: Tensor | None,
    grad_lattice: Tensor | None,
    coefs: Tensor | Sequence[float],
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Fused ancestral predictor of DAO-G for coordinates and lattices (one launch).

    F' = (F + a s + c_frac z_F - g_frac grad_F) mod 1 and
    L' = (L - b eps) / q + c_lattice z_L - g_lattice grad_L. In the sampler, with
    d_t = sigma_t^2 - sigma_{t-1}^2 and v_t = sigma_{t-1}^2 d_t / sigma_t^2:
    a = d_t sqrt(lambda_t), c_frac = sqrt(v_t), g_frac = v_t w,
    b = beta_t / sqrt(1 - alpha_bar_t), q = sqrt(alpha_t),
    c_lattice = sqrt(beta~_t), g_lattice = beta~_t w (w the guidance scale).

    Args:
        frac: [N, 3] F, float32 or float64.
        score: [N, 3] s, the model's coordinate output.
        noise_frac: [N, 3] z_F, or None.
        grad_frac: [N, 3] energy gradient, or None (no guidance on F).
        lattice: [B, 3, 3] L, same dtype and device as ``frac``.
        eps: [B, 3, 3] the model's lattice noise prediction.
        noise_lattice: [B, 3, 3] z_L, or None.
        grad_lattice: [B, 3, 3] energy gradient, or None.
        coefs: (a, c_frac, g_frac, b, q, c_lattice, g_lattice): a [7] floating tensor
            on the device of ``frac`` (read as float64) or seven floats.
        backend: one of ``BACKENDS``.

    Returns:
        (F' [N, 3] in [0, 1), L' [B, 3, 3]), new tensors. Not differentiable.

    Raises:
        ValueError: bad shapes, dtypes or devices, inputs that require grad in grad
            mode, or an unavailable backend.
    """
    _check_frac(frac)
    shape_f = tuple(frac.shape)
    _check_float("score", score, shape_f, frac)
    if not isinstance(lattice, Tensor) or lattice.dim() != 3 or lattice.shape[1:] != (3, 3):
        shape = list(lattice.shape) if isinstance(lattice, Tensor) else type(lattice).__name__
        raise ValueError(f"lattice must be [B, 3, 3], got {shape}")
    shape_l = tuple(lattice.shape)
    _check_float("lattice", lattice, shape_l, frac)
    _check_float("eps", eps, shape_l, frac)
    for name, t, shape in (
        ("noise_frac", noise_frac, shape_f),
        ("grad_frac", grad_frac, shape_f),
        ("noise_lattice", noise_lattice, shape_l),
        ("grad_lattice", grad_lattice, shape_l),
    ):
        if t is not None:
            _check_float(name, t, shape, frac)
    tensors = (frac, score, noise_frac, grad_frac, lattice, eps, noise_lattice, grad_lattice)
    _check_no_grad("predictor_step", tensors)
    k = _as_coefs(coefs, PREDICTOR_COEFFICIENTS, frac)
    if backend != "auto":
        _resolve_backend(backend, frac.device)
    return _predictor_step_op(*tensors, k, backend)
