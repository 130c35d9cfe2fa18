"""Fused Crysformer edge attention, as the ``dao::edge_attention_core`` op.

A Crysformer layer attends over every ordered atom pair (j → i) of each crystal
with an edge embedding e_ij = W·LayerNorm(x_ij) + b added to keys and values,
x_ij = [φ(Δf_ij), (L·Lᵀ)_flat] (6K + 9 values, spec §2). Written naively that
materialises E × (6K + 9) and E × h tensors per layer (E = Σ N²). The fused op
never writes per-edge data to memory; it rests on two exact rewrites:

* the LayerNorm affine folds into the Linear: e_ij = W'·z_ij + b' with z_ij the
  features normalised without affine, W' = W·diag γ, b' = W·β + b;
* e_ij enters the attention linearly, so per head (q already scaled by 1/√d)

      s_ij = q_i·(k_j + e_ij) = q_i·k_j + u_i·z_ij + q_i·b',   u_i = W'ᵀq_i
      out_i = Σ_j α_ij (v_j + e_ij) = o_i + W'·y_i + b'

  with o_i = Σ_j α_ij v_j, y_i = Σ_j α_ij z_ij (Σ_j α_ij = 1: every atom has its
  self pair) and q_i·b' dropped (constant over j, the softmax ignores it).

:func:`edge_attention` wraps the layer in one autograd Function: the node-level parts
(folding, u = W'ᵀq, W'·y) are dense PyTorch products, the pair loop is the core op:
per centre atom i it recomputes z_ij on the fly for every j of the crystal, takes
the softmax and accumulates o_i and y_i, and returns the log-sum-exp of the scores
so the backward recomputes α without a second softmax pass (flash-attention style).
Only node-level tensors of width <= h are kept for the backward (q, k, v, o, lse):
u and y ([N, H, 6K + 9]) are recomputed there. Backends of the core:

* ``"cpp"``: the multithreaded C++ kernel (``csrc/edge_attention.cpp``), CPU. Two
  implementations, picked by ``DAO_EDGE_ATTENTION_KERNEL`` at every call: ``gemm``
  (default; never forms z_ij: with per-atom Fourier tables T_j, u_i·z_ij and Σ_j α_ij z_ij
  are small dense products per crystal and head) and ``pairs`` (z_ij per centre atom, as
  described above; kept for comparison).
* ``"triton"``: ``dao.kernels.edge_attention``, on a GPU or under TRITON_INTERPRET=1.
* ``"torch"``: the reference twin :func:`dao.reference.edge_attention.edge_attention_core`
  on the explicit edge list (materialises everything; the test oracle).
* ``"dense"``: batched matrix products per size group of padded crystals, in plain
  torch operations (``dao.ops._edge_attention_dense``; cuBLAS on a GPU), hand-written
  backward. Any device.
* ``"auto"``: cpp on CPU; triton on a CUDA device if importable, else dense.

All are exact rewrites of :func:`dao.reference.edge_attention.edge_attention`;
agreement is tested in float64 and float32 with the project's tolerance table.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from dao._ext import has_triton, load_core, num_threads
from dao._graph import lattice_gram, memoized
from dao.ops import _edge_attention_dense as _dense
from dao.reference import edge_attention as _ref

__all__ = ["BACKENDS", "edge_attention", "edge_attention_core", "fold_edge_projection"]

BACKENDS = ("auto", "cpp", "dense", "triton", "torch")
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}


CPP_KERNELS = {"pairs": 0, "gemm": 1}


def _cpp_kernel() -> int:
    """The C++ kernels to run, from ``DAO_EDGE_ATTENTION_KERNEL`` (read at every call):
    ``gemm`` (default: the pair loop as small dense products per crystal) or
    ``pairs`` (the per-pair feature vectors of the first kernel, kept for comparison)."""
    name = os.environ.get("DAO_EDGE_ATTENTION_KERNEL", "gemm")
    if name not in CPP_KERNELS:
        raise ValueError(
            f"DAO_EDGE_ATTENTION_KERNEL must be one of {tuple(CPP_KERNELS)}, got {name!r}"
        )
    return CPP_KERNELS[name]


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if backend == "cpp" and device.type != "cpu":
            raise ValueError("backend 'cpp' needs CPU tensors; use 'triton' or 'auto' on GPU")
        return backend
    if device.type == "cpu":
        return "cpp"
    if device.type == "cuda" and has_triton():
        return "triton"
    # no Triton (or not a CUDA device): batched products in plain torch, also exact
    return "dense"


def _crystal_ptr(batch: Tensor, num_crystals: int) -> Tensor:
    """[B + 1] first atom of every crystal (static shape: traceable by torch.compile)."""
    bounds = torch.arange(num_crystals + 1, device=batch.device, dtype=batch.dtype)
    return torch.searchsorted(batch, bounds)


# ------------------------------------------------------------------ backends


def _cpp_forward(q, k, v, u, frac, gram, ptr, num_freqs, eps):
    n, heads, d = q.shape
    dim = u.shape[2]
    q, k, v, u, frac = (t.contiguous() for t in (q, k, v, u, frac))
    gram = gram.reshape(-1, 9).contiguous()
    ptr = ptr.contiguous()
    o = torch.empty_like(q)
    y = torch.empty_like(u)
    lse = torch.empty(n, heads, dtype=q.dtype)
    load_core().edge_attention_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), u.data_ptr(), frac.data_ptr(),
        gram.data_ptr(), ptr.data_ptr(), o.data_ptr(), y.data_ptr(), lse.data_ptr(),
        n, gram.shape[0], heads, d, dim, num_freqs, float(eps), _DTYPE_CODE[q.dtype],
        num_threads(), _cpp_kernel(),
    )  # fmt: skip
    return o, y, lse


def _cpp_backward(grad_o, grad_y, q, k, v, u, frac, gram, ptr, o, lse, num_freqs, eps):
    n, heads, d = q.shape
    dim = u.shape[2]
    ts = (grad_o, grad_y, q, k, v, u, frac, o, lse)
    grad_o, grad_y, q, k, v, u, frac, o, lse = (t.contiguous() for t in ts)
    gram = gram.reshape(-1, 9).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    du, dfrac = torch.empty_like(u), torch.empty_like(frac)
    dgram, y = torch.empty_like(gram), torch.empty_like(u)
    load_core().edge_attention_backward(
        grad_o.data_ptr(), grad_y.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
        u.data_ptr(), frac.data_ptr(), gram.data_ptr(), ptr.data_ptr(), o.data_ptr(),
        lse.data_ptr(), y.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
        du.data_ptr(), dfrac.data_ptr(), dgram.data_ptr(),
        n, gram.shape[0], heads, d, dim, num_freqs, float(eps), _DTYPE_CODE[q.dtype],
        num_threads(), _cpp_kernel(),
    )  # fmt: skip
    return dq, dk, dv, du, dfrac, dgram, y


def _torch_backward(grad_o, grad_y, q, k, v, u, frac, gram, batch, num_freqs, eps):
    """The reference differentiated: ``torch.func.vjp``, not ``torch.autograd.grad``,
    since inside a custom op's implementation the autograd dispatch keys are excluded
    and nothing would be recorded to differentiate."""
    (_, y), pullback = torch.func.vjp(
        lambda *xs: _ref.edge_attention_core(*xs, batch, num_freqs, eps)[:2],
        q, k, v, u, frac, gram,
    )  # fmt: skip
    return (*pullback((grad_o, grad_y)), y)


# ------------------------------------------------------------------ the op


@torch.library.custom_op("dao::edge_attention_core", mutates_args=())
def _core_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    frac: Tensor,
    gram: Tensor,
    batch: Tensor,
    ptr: Tensor,
    num_freqs: int,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "cpp":
        return _cpp_forward(q, k, v, u, frac, gram, ptr, num_freqs, eps)
    if backend == "triton":
        from dao.kernels.edge_attention import edge_attention_core_forward  # noqa: PLC0415

        return edge_attention_core_forward(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)
    if backend == "dense":
        return _dense.dense_forward(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)
    with torch.no_grad():
        o, y, lse = _ref.edge_attention_core(q, k, v, u, frac, gram, batch, num_freqs, eps)
    return o, y, lse.to(_dense.lse_dtype(q.dtype))


@_core_op.register_fake
def _(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps, backend):
    lse = q.new_empty(q.shape[:2], dtype=_dense.lse_dtype(q.dtype))
    return q.new_empty(q.shape), u.new_empty(u.shape), lse


@torch.library.custom_op("dao::edge_attention_core_backward", mutates_args=())
def _core_backward_op(
    grad_o: Tensor,
    grad_y: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    frac: Tensor,
    gram: Tensor,
    batch: Tensor,
    ptr: Tensor,
    o: Tensor,
    lse: Tensor,
    num_freqs: int,
    eps: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, v, u, frac, gram and the forward's y, recomputed (the
    forward's [N, H, D] y need not be kept for the backward)."""
    if backend == "cpp":
        return _cpp_backward(grad_o, grad_y, q, k, v, u, frac, gram, ptr, o, lse, num_freqs, eps)
    if backend == "triton":
        from dao.kernels.edge_attention import (  # noqa: PLC0415
            edge_attention_core_backward,
            edge_attention_core_forward,
        )

        _, y, _ = edge_attention_core_forward(q, k, v, u, frac, gram, batch, ptr, num_freqs, eps)
        grads = edge_attention_core_backward(
            grad_o, grad_y, q, k, v, u, frac, gram, batch, ptr, o, y, lse, num_freqs, eps
        )
        return (*grads, y)
    if backend == "dense":
        return _dense.dense_backward(
            grad_o, grad_y, q, k, v, u, frac, gram, batch, ptr, num_freqs, eps
        )
    return _torch_backward(grad_o, grad_y, q, k, v, u, frac, gram, batch, num_freqs, eps)


@_core_backward_op.register_fake
def _(grad_o, grad_y, q, k, v, u, frac, gram, batch, ptr, o, lse, num_freqs, eps, backend):
    return (*(t.new_empty(t.shape) for t in (q, k, v, u, frac, gram)), u.new_empty(u.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, u, frac, gram, batch, ptr, num_freqs, eps, backend = inputs
    o, _y, lse = output
    ctx.save_for_backward(q, k, v, u, frac, gram, batch, ptr, o, lse)
    ctx.args = (num_freqs, eps, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_o, grad_y, _grad_lse):
    q, k, v, u, frac, gram, batch, ptr, o, lse = ctx.saved_tensors
    num_freqs, eps, backend = ctx.args
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    if grad_y is None:
        grad_y = torch.zeros_like(u)
    *grads, _y = _core_backward_op(
        grad_o, grad_y, q, k, v, u, frac, gram, batch, ptr, o, lse, num_freqs, eps, backend
    )
    return (*grads, None, None, None, None, None)


torch.library.register_autograd("dao::edge_attention_core", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------ public API


def _check_core(q, k, v, u, frac, gram, batch, num_freqs) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must all be [N, H, d]; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    n, heads, _ = q.shape
    dim = 6 * num_freqs + 9
    if num_freqs < 1:
        raise ValueError(f"num_freqs must be >= 1, got {num_freqs}")
    if u is not None and u.shape != (n, heads, dim):
        raise ValueError(f"u must be [N, H, 6K + 9] = {[n, heads, dim]}, got {list(u.shape)}")
    if frac.shape != (n, 3):
        raise ValueError(f"frac must be [N, 3] = {[n, 3]}, got {list(frac.shape)}")
    if gram.shape[1:] not in ((9,), (3, 3)):
        raise ValueError(f"gram must be [B, 9] or [B, 3, 3], got {list(gram.shape)}")
    if batch.shape != (n,) or batch.dtype.is_floating_point:
        raise ValueError(f"batch must be an integer [N] = [{n}] tensor, got {list(batch.shape)}")
    floats = tuple(t for t in (q, k, v, u, frac, gram) if t is not None)
    if len({t.dtype for t in floats}) != 1 or not q.dtype.is_floating_point:
        raise ValueError(
            "q, k, v, u, frac and gram must share one floating dtype, got "
            + ", ".join(str(t.dtype) for t in floats)
        )
    if len({t.device for t in (*floats, batch)}) != 1:
        raise ValueError("all inputs must be on the same device")
    if torch.compiler.is_compiling() or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return  # value checks would break a compiled or captured graph; eager calls run them
    if n and (int(batch.min()) < 0 or int(batch.max()) >= gram.shape[0]):
        raise ValueError(f"batch holds crystal indices outside [0, {gram.shape[0]})")
    if n > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted: list each crystal's atoms together, in order")


def edge_attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    u: Tensor,
    frac: Tensor,
    gram: Tensor,
    batch: Tensor,
    num_freqs: int,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused pair loop: (o [N, H, d], y [N, H, D], lse [N, H]).

    Same arguments and result as :func:`dao.reference.edge_attention.edge_attention_core`
    (q and u pre-scaled by 1/√d); differentiable in q, k, v, u, frac and gram.
    """
    _check_core(q, k, v, u, frac, gram, batch, num_freqs)
    backend = _resolve_backend(backend, q.device)
    if backend == "cpp" and q.dtype not in _DTYPE_CODE:
        raise ValueError(f"the cpp backend takes float32 or float64, got {q.dtype}")
    batch = batch.to(torch.int64)
    ptr = memoized("crystal_ptr", batch, _crystal_ptr, gram.shape[0])
    return _core_op(
        q, k, v, u, frac, gram.reshape(-1, 9), batch, ptr, int(num_freqs), float(eps), backend
    )


def fold_edge_projection(
    edge_weight: Tensor, edge_bias: Tensor, norm_weight: Tensor, norm_bias: Tensor
) -> tuple[Tensor, Tensor]:
    """(W·diag γ [h, D], W·β + b [h]): the edge LayerNorm affine folded into the edge
    Linear, what :func:`edge_attention` takes as ``folded``."""
    return edge_weight * norm_weight, torch.mv(edge_weight, norm_bias) + edge_bias


def edge_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    frac: Tensor,
    lattice: Tensor,
    batch: Tensor,
    edge_weight: Tensor,
    edge_bias: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    heads: int,
    num_freqs: int,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    folded: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """A Crysformer layer's edge attention without per-edge tensors in memory.

    Same arguments and result as :func:`dao.reference.edge_attention.edge_attention`
    (the naive twin), differentiable in every tensor argument.

    Args:
        q, k, v: [N, h] node queries, keys and values (h = heads·d).
        frac: [N, 3] fractional coordinates; lattice: [B, 3, 3] (rows = vectors);
            batch: [N] sorted crystal index.
        edge_weight: [h, 6K + 9] and edge_bias: [h], the edge Linear;
        norm_weight, norm_bias: [6K + 9], the edge LayerNorm affine.
        heads: H; num_freqs: K; eps: LayerNorm epsilon.
        backend: see the module docstring.
        folded: optional precomputed (edge_weight·diag(norm_weight) [h, 6K + 9],
            edge_weight·norm_bias + edge_bias [h]), the LayerNorm affine folded into
            the edge Linear, which is otherwise computed here at every call (a caller
            that runs the same weights many times, e.g. a sampler, can cache it; see
            ``CrysformerLayer.folded_edge_projection``). Gradients then flow into
            ``folded``, not into the four weight arguments.

    Returns:
        [N, h] attention output (before the layer's output projection).
    """
    if q.dim() != 2 or q.shape[1] % heads:
        raise ValueError(
            f"q must be [N, h] with h divisible by heads = {heads}, got {list(q.shape)}"
        )
    n, h = q.shape
    d = h // heads
    dim = 6 * num_freqs + 9
    if edge_weight.shape != (h, dim) or edge_bias.shape != (h,):
        raise ValueError(
            f"edge_weight must be [h, 6K + 9] = {[h, dim]} and edge_bias [h] = [{h}]; got "
            f"{list(edge_weight.shape)} and {list(edge_bias.shape)}"
        )
    if norm_weight.shape != (dim,) or norm_bias.shape != (dim,):
        raise ValueError(f"norm_weight and norm_bias must be [6K + 9] = [{dim}]")
    if lattice.dim() != 3 or lattice.shape[1:] != (3, 3):
        raise ValueError(f"lattice must be [B, 3, 3], got {list(lattice.shape)}")
    if folded is None:  # LayerNorm affine folded into the edge Linear
        w, b = fold_edge_projection(edge_weight, edge_bias, norm_weight, norm_bias)
    else:
        w, b = folded
        if w.shape != (h, dim) or b.shape != (h,):
            raise ValueError(
                f"folded must be ([h, 6K + 9] = {[h, dim]}, [h] = [{h}]); got "
                f"({list(w.shape)}, {list(b.shape)})"
            )
    w, b = w.reshape(heads, d, dim), b.reshape(heads, d)
    qh = q.view(n, heads, d) * (1.0 / math.sqrt(d))
    gram = lattice_gram(lattice)
    _check_core(qh, k.view(n, heads, d), v.view(n, heads, d), None, frac, gram, batch, num_freqs)
    backend = _resolve_backend(backend, q.device)
    if backend == "cpp" and q.dtype not in _DTYPE_CODE:
        raise ValueError(f"the cpp backend takes float32 or float64, got {q.dtype}")
    batch = batch.to(torch.int64)
    ptr = memoized("crystal_ptr", batch, _crystal_ptr, gram.shape[0])
    out, _o, _lse = _FusedEdgeAttention.apply(
        qh, k.view(n, heads, d), v.view(n, heads, d), frac, gram, w, b, batch, ptr,
        int(num_freqs), float(eps), backend,
    )  # fmt: skip
    return out.reshape(n, h)


class _FusedEdgeAttention(torch.autograd.Function):
    """out = o + W'·y + b' with (o, y) from the core op; saves only node-level inputs,
    o and lse: u = W'ᵀq and y ([N, H, 6K + 9] each) are recomputed in the backward."""

    @staticmethod
    def forward(qh, k, v, frac, gram, w, b, batch, ptr, num_freqs, eps, backend):
        u = torch.einsum("nhd,hdD->nhD", qh, w)
        o, y, lse = _core_op(qh, k, v, u, frac, gram, batch, ptr, num_freqs, eps, backend)
        out = o + torch.einsum("nhD,hdD->nhd", y, w) + b
        return out, o, lse

    @staticmethod
    def setup_context(ctx, inputs, output):
        qh, k, v, frac, gram, w, _b, batch, ptr, num_freqs, eps, backend = inputs
        _out, o, lse = output
        ctx.save_for_backward(qh, k, v, frac, gram, w, batch, ptr, o, lse)
        ctx.args = (num_freqs, eps, backend)
        ctx.mark_non_differentiable(o, lse)

    @staticmethod
    def backward(ctx, dout, _do, _dlse):
        qh, k, v, frac, gram, w, batch, ptr, o, lse = ctx.saved_tensors
        num_freqs, eps, backend = ctx.args
        dout = dout.contiguous()
        u = torch.einsum("nhd,hdD->nhD", qh, w)
        dy = torch.einsum("nhd,hdD->nhD", dout, w)
        dq, dk, dv, du, dfrac, dgram, y = _core_backward_op(
            dout, dy, qh, k, v, u, frac, gram, batch, ptr, o, lse, num_freqs, eps, backend
        )
        dq = dq + torch.einsum("nhD,hdD->nhd", du, w)
        dw = torch.einsum("nhd,nhD->hdD", dout, y) + torch.einsum("nhd,nhD->hdD", qh, du)
        db = dout.sum(0)
        return dq, dk, dv, dfrac, dgram, dw, db, None, None, None, None, None
