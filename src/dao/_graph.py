"""Pure-PyTorch pieces of the crystal graph shared by the models and the ops.

A crystal's atoms form a fully connected directed graph with self pairs, no
cutoff and no periodic images. ``edges[0]`` is the *source* (neighbour j),
``edges[1]`` the *destination* (centre i); reductions run over the edges that
share a destination. The edge feature of (i, j) uses Δf = (f_j − f_i) mod 1.

This module sits below ``models/`` and ``reference/`` (it imports only torch), so
the reference twins of the ops and the models build edges and features with the
same code.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

__all__ = [
    "attend_on_edges",
    "fourier_features",
    "frac_diff",
    "fully_connected_edges",
    "lattice_gram",
    "memoized",
    "segment_logsumexp",
    "segment_softmax",
    "static_batch",
]


# ------------------------------------------------------- static batch memo
class _Memo:
    """The process-wide memo of :func:`static_batch`: not thread-local, because the
    autograd engine runs a CUDA backward on its own worker thread, and the backward of
    the fused op reads the same layouts as its forward (with a thread-local memo every
    backward on a GPU rebuilt them, a host sync per layer, and a training step could
    not be captured in a CUDA graph)."""

    lock = threading.Lock()
    depth = 0
    memo: dict | None = None


_STATE = _Memo()


@contextlib.contextmanager
def static_batch() -> Iterator[None]:
    """Inside, what :func:`memoized` computes from a batch-layout tensor (edge lists,
    crystal pointers, slot layouts, kernel tile schedules) is computed once and reused.

    A sampling loop evaluates the model thousands of times on one unchanging crystal
    layout; those computations need host synchronisation (``bincount``, sizes read
    back from the device), which costs time on a GPU and cannot be captured in a CUDA
    graph. Values are keyed by the tensor's storage, version, shape, dtype and device
    (and the extra arguments), so a layout tensor changed in place is recomputed.
    Not used while torch.compile traces. One memo per process (shared with the
    autograd engine's worker threads), dropped when the last open ``static_batch``
    exits.
    """
    with _STATE.lock:
        if _STATE.depth == 0:
            _STATE.memo = {}
        _STATE.depth += 1
    try:
        yield
    finally:
        with _STATE.lock:
            _STATE.depth -= 1
            if _STATE.depth == 0:
                _STATE.memo = None


def memoized(name: str, tensor: Tensor, fn: Callable, *args):
    """``fn(tensor, *args)``, computed once per (name, tensor, args) inside
    :func:`static_batch` (every call outside it)."""
    memo = _STATE.memo
    if memo is None or torch.compiler.is_compiling():
        return fn(tensor, *args)
    version = -1 if tensor.is_inference() else tensor._version  # inference tensors have none
    key = (name, tensor.data_ptr(), version, tuple(tensor.shape), tensor.dtype,
           str(tensor.device), args)  # fmt: skip
    hit = memo.get(key)
    if hit is None:
        # The entry holds the tensor, so its storage (part of the key) is not reused.
        hit = memo[key] = (tensor, fn(tensor, *args))
    return hit[1]


def fully_connected_edges(batch: Tensor, num_crystals: int) -> Tensor:
    """All ordered pairs (j, i) of atoms in the same crystal, self pairs included
    (memoized inside :func:`static_batch`).

    Args:
        batch: [N] int64 crystal index of every atom, sorted (crystal after crystal).
        num_crystals: B, the number of crystals (some may have no atoms).

    Returns:
        [2, E] int64 (src j, dst i) with E = Σ_b N_b², ordered by crystal, then
        destination i, then source j; so each destination's edges are contiguous.
    """
    return memoized("fully_connected_edges", batch, _fully_connected_edges, num_crystals)


def _fully_connected_edges(batch: Tensor, num_crystals: int) -> Tensor:
    if batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted: list each crystal's atoms together, in order")
    device = batch.device
    counts = torch.bincount(batch, minlength=num_crystals)
    if counts.numel() > num_crystals:
        raise ValueError(f"batch holds crystal indices >= num_crystals = {num_crystals}")
    ptr = torch.cumsum(counts, 0) - counts  # first atom of each crystal
    sq = counts * counts
    crystal = torch.repeat_interleave(torch.arange(num_crystals, device=device), sq)
    start = torch.cumsum(sq, 0) - sq
    local = torch.arange(crystal.numel(), device=device) - start[crystal]
    n = counts[crystal]
    base = ptr[crystal]
    dst = base + torch.div(local, n, rounding_mode="floor")
    src = base + local % n
    return torch.stack([src, dst])


def frac_diff(frac_coords: Tensor, edges: Tensor) -> Tensor:
    """[E, 3] Δf = (f_src − f_dst) mod 1 ∈ [0, 1) of every edge (j → i: f_j − f_i)."""
    return torch.remainder(frac_coords[edges[0]] - frac_coords[edges[1]], 1.0)


def lattice_gram(lattice: Tensor) -> Tensor:
    """[B, 9] flattened L·Lᵀ (the O(3)-invariant metric of row-vector lattices)."""
    return (lattice @ lattice.transpose(-1, -2)).reshape(-1, 9)


# ------------------------------------------------------------- features


def fourier_features(delta: Tensor, num_freqs: int) -> Tensor:
    """Fourier features of fractional differences.

    Args:
        delta: [E, 3] fractional differences.
        num_freqs: K; frequencies 2πk for k = 0..K−1.

    Returns:
        [E, 6K]: sin(2πkΔf_a) for (a, k) in row-major order (a = axis), then the cos
        in the same order. The k = 0 columns are the constants 0 and 1; they are
        kept because the feature width 6K is part of the architecture.
    """
    freqs = (2.0 * math.pi) * torch.arange(num_freqs, device=delta.device, dtype=delta.dtype)
    x = (delta.unsqueeze(-1) * freqs).flatten(1)
    return torch.cat([torch.sin(x), torch.cos(x)], dim=1)


def segment_logsumexp(scores: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """[S, H] log Σ exp(scores) over the rows of ``scores`` [E, H] per segment
    (``index`` [E]); -inf for empty segments."""
    h = scores.shape[1]
    idx = index.unsqueeze(1).expand(-1, h)
    # The per-segment maximum only guards exp() against overflow; the result does
    # not depend on it, so it takes no part in autograd.
    with torch.no_grad():
        smax = torch.full(
            (num_segments, h), -torch.inf, dtype=scores.dtype, device=scores.device
        ).scatter_reduce_(0, idx, scores.detach(), reduce="amax", include_self=True)
        smax = torch.where(torch.isfinite(smax), smax, torch.zeros_like(smax))
    denom = torch.zeros(num_segments, h, dtype=scores.dtype, device=scores.device)
    denom = denom.index_add(0, index, torch.exp(scores - smax[index]))
    return smax + torch.log(denom)


def segment_softmax(scores: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Softmax of ``scores`` over the rows that share an ``index`` value.

    Args:
        scores: [E, H] logits.
        index: [E] int64 segment (destination) of every row.
        num_segments: number of segments S (rows of the reduction result).

    Returns:
        [E, H] weights; in every segment and column they sum to 1.
    """
    return torch.exp(scores - segment_logsumexp(scores, index, num_segments)[index])


def attend_on_edges(
    q: Tensor, k: Tensor, v: Tensor, dst: Tensor, num_nodes: int, heads: int
) -> Tensor:
    """Multi-head attention on edges: q, k, v [E, h] (already per edge, q unscaled),
    softmax over the edges of each destination ``dst`` [E] → [N, h]."""
    e, h = q.shape
    d = h // heads
    scores = (q * k).view(e, heads, d).sum(-1) * (1.0 / math.sqrt(d))
    alpha = segment_softmax(scores, dst, num_nodes)
    weighted = (alpha.unsqueeze(-1) * v.view(e, heads, d)).view(e, h)
    return torch.zeros(num_nodes, h, dtype=v.dtype, device=v.device).index_add(0, dst, weighted)
