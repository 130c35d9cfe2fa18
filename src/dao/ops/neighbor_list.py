"""Periodic neighbour lists for batches of crystals, as the ``dao::neighbor_list`` op.

One call handles a whole batch: systems are stored one after another
(``num_atoms`` or a sorted ``batch`` vector) and each has its own cell and
per-axis periodicity. Backends:

* ``"cpp"``: the multithreaded C++ core (``csrc/neighbor_list.cpp``), CPU tensors.
* ``"cuda"``: the CUDA kernels (``csrc/cuda/``), when built with DAO_ENABLE_CUDA.
* ``"triton"``: ``dao.kernels.neighbor_list``, on a GPU or under TRITON_INTERPRET=1.
* ``"torch"``: the pure-PyTorch reference twin (:mod:`dao.reference.neighbor_list`).
* ``"auto"``: cpp on CPU; cuda, else triton, else torch (with a warning) on GPU.

Distances and vectors are differentiable with respect to positions and cell
(autograd registered on the op; the backward recomputes vectors when they were
not returned). Output layout: int32 i, int32 j, int16 shifts[3] and distances in the input's
float dtype: 18 bytes per pair for float32 (the default dtype), 22 for float64.
"""

from __future__ import annotations

import warnings

import torch

from dao._checks import check_cutoff, check_systems
from dao._ext import has_cuda_ext, has_triton, load_core, num_threads
from dao._types import NeighborList, empty_neighbor_outputs
from dao.reference import neighbor_list as _ref

__all__ = ["NeighborList", "neighbor_list", "BACKENDS"]

BACKENDS = ("auto", "cpp", "cuda", "triton", "torch")
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1}


def _run_cpp(positions, cell, ptr, pbc, cutoff, self_interaction, want_d, want_v):
    core = load_core()
    pbc_u8 = pbc.to(torch.uint8).contiguous()
    nt = num_threads()
    res = core.neighbor_list_cpu(
        positions.data_ptr(),
        cell.data_ptr(),
        ptr.data_ptr(),
        pbc_u8.data_ptr(),
        positions.shape[0],
        cell.shape[0],
        _DTYPE_CODE[positions.dtype],
        float(cutoff),
        bool(self_interaction),
        bool(want_d),
        bool(want_v),
        nt,
    )
    out = empty_neighbor_outputs(positions, res.size(), want_d, want_v)
    i, j, s, d, v = out
    res.copy_to(
        i.data_ptr(),
        j.data_ptr(),
        s.data_ptr(),
        d.data_ptr() if want_d else 0,
        v.data_ptr() if want_v else 0,
        nt,
    )
    return out


def _run_torch(positions, cell, ptr, pbc, cutoff, self_interaction, want_d, want_v):
    i, j, s = _ref.neighbor_pairs(positions, cell, ptr, pbc, cutoff, self_interaction)
    vec = _ref.pair_vectors(positions, cell, ptr, i, j, s)
    out = empty_neighbor_outputs(positions, 0, False, False)
    return (
        i.to(torch.int32),
        j.to(torch.int32),
        s.to(torch.int16),
        vec.norm(dim=-1) if want_d else out[3],
        vec if want_v else out[4],
    )


def _run_triton(positions, cell, ptr, pbc, cutoff, self_interaction, want_d, want_v):
    from dao.kernels.neighbor_list import neighbor_list_forward  # noqa: PLC0415

    return neighbor_list_forward(
        positions, cell, ptr, pbc, cutoff, self_interaction, want_d, want_v
    )


def _run_cuda(positions, cell, ptr, pbc, cutoff, self_interaction, want_d, want_v):
    from dao.ops._neighbor_list_cuda import neighbor_list_cuda  # noqa: PLC0415

    return neighbor_list_cuda(positions, cell, ptr, pbc, cutoff, self_interaction, want_d, want_v)


_RUNNERS = {"cpp": _run_cpp, "torch": _run_torch, "triton": _run_triton, "cuda": _run_cuda}


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device.type == "cpu":
        if backend == "auto":
            return "cpp"
        if backend == "cuda":
            raise ValueError("backend='cuda' needs CUDA tensors; move positions and cell to a GPU")
        if backend == "triton" and not has_triton():
            raise ValueError(
                "backend='triton' on CPU tensors needs triton and TRITON_INTERPRET=1 "
                "(the interpreter); use backend='cpp' for speed"
            )
        return backend
    if device.type == "cuda":
        if backend == "auto":
            if has_cuda_ext():
                return "cuda"
            if has_triton():
                return "triton"
            warnings.warn(
                "dao.ops.neighbor_list: neither the CUDA extension nor triton is available; "
                "falling back to the O(N^2) PyTorch reference",
                RuntimeWarning,
                stacklevel=3,
            )
            return "torch"
        if backend == "cpp":
            raise ValueError("backend='cpp' needs CPU tensors")
        if backend == "cuda" and not has_cuda_ext():
            raise ValueError(
                "dao was not built with CUDA: reinstall with DAO_ENABLE_CUDA=ON, or use "
                "backend='triton' or 'torch'"
            )
        if backend == "triton" and not has_triton():
            raise ValueError("backend='triton' needs the triton package")
        return backend
    if backend in ("auto", "torch"):
        return "torch"
    raise ValueError(f"backend {backend!r} does not support device {device}")


@torch.library.custom_op("dao::neighbor_list", mutates_args=())
def _neighbor_list_op(
    positions: torch.Tensor,
    cell: torch.Tensor,
    ptr: torch.Tensor,
    pbc: torch.Tensor,
    cutoff: float,
    self_interaction: bool,
    return_distances: bool,
    return_vectors: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i [P] int32, j [P] int32, shifts [P,3] int16, distances [P] or [0], vectors [P,3] or
    [0,3])."""
    name = _resolve_backend(backend, positions.device)
    return _RUNNERS[name](
        positions, cell, ptr, pbc, cutoff, self_interaction, return_distances, return_vectors
    )


@_neighbor_list_op.register_fake
def _(
    positions, cell, ptr, pbc, cutoff, self_interaction, return_distances, return_vectors, backend
):
    n = torch.library.get_ctx().new_dynamic_size()
    return empty_neighbor_outputs(positions, n, return_distances, return_vectors)


def _setup_context(ctx, inputs, output):
    positions, cell, ptr, _pbc, _cutoff, _si, want_d, want_v, _backend = inputs
    i, j, shifts, distances, vectors = output
    ctx.want_d, ctx.want_v = want_d, want_v
    ctx.save_for_backward(positions, cell, ptr, i, j, shifts, distances, vectors)


def _backward(ctx, _gi, _gj, _gs, grad_distances, grad_vectors):
    positions, cell, ptr, i, j, shifts, distances, vectors = ctx.saved_tensors
    if not ctx.want_v:
        # Recomputed under the current grad mode: with create_graph=True the
        # vectors stay functions of positions and cell (double backward).
        vectors = _ref.pair_vectors(positions, cell, ptr, i, j, shifts)
    g = torch.zeros_like(vectors)
    if ctx.want_d and grad_distances is not None:
        if not ctx.want_v:
            distances = vectors.norm(dim=-1)
        # d|v|/dv = v/|v|; zero-length (self, S = 0) pairs get no gradient.
        safe = torch.where(distances > 0, distances, torch.ones_like(distances))
        g = g + (grad_distances / safe).unsqueeze(-1) * vectors
    if ctx.want_v and grad_vectors is not None:
        g = g + grad_vectors
    il, jl = i.to(torch.int64), j.to(torch.int64)
    grad_pos = torch.zeros_like(positions).index_add_(0, jl, g).index_add_(0, il, -g)
    system = torch.searchsorted(ptr, il, right=True) - 1
    outer = shifts.to(g.dtype).unsqueeze(-1) * g.unsqueeze(-2)  # [P, 3, 3]
    grad_cell = torch.zeros_like(cell).index_add_(0, system, outer)
    return grad_pos, grad_cell, None, None, None, None, None, None, None


torch.library.register_autograd("dao::neighbor_list", _backward, setup_context=_setup_context)


def neighbor_list(
    positions: torch.Tensor,
    cell: torch.Tensor,
    cutoff: float,
    *,
    num_atoms: torch.Tensor | None = None,
    batch: torch.Tensor | None = None,
    pbc: bool | torch.Tensor = True,
    self_interaction: bool = False,
    return_distances: bool = True,
    return_vectors: bool = False,
    backend: str = "auto",
) -> NeighborList:
    """Full periodic neighbour list of a batch of systems in one call.

    Every ordered pair (i, j) of atoms of the same system and integer image
    shift S with ``|r_j - r_i + S . L| < cutoff`` is listed (i == j only with
    S != 0, unless ``self_interaction``). No neighbour cap, no truncation.

    Args:
        positions: [N, 3] cartesian positions, float32 or float64; atoms may lie
            outside the cell (shifts are relative to the positions as given).
        cell: [3, 3] or [B, 3, 3] lattices, rows are the lattice vectors.
        cutoff: radius in the units of positions (> 0).
        num_atoms: [B] atoms per system, systems stored one after another.
        batch: [N] sorted system index per atom (alternative to num_atoms).
        pbc: bool, [3] or [B, 3] per-axis periodic boundary conditions.
        self_interaction: include (i, i, S = 0) pairs at distance 0.
        return_distances: compute [P] distances.
        return_vectors: compute [P, 3] vectors r_j - r_i + S . L.
        backend: one of ``BACKENDS`` (see module docstring).

    Returns:
        NeighborList(i, j, shifts, distances, vectors). The order of pairs is
        deterministic for a given input and backend (the same for any thread
        count) but not part of the contract: sort if you need one.

    Raises:
        ValueError: bad shapes/dtypes, NaN/inf, cutoff <= 0, singular cell,
            inconsistent num_atoms/batch, or an unavailable backend.
    """
    cutoff = check_cutoff(cutoff)
    x = check_systems(positions, cell, num_atoms=num_atoms, batch=batch, pbc=pbc)
    _resolve_backend(backend, x.positions.device)  # clear errors before dispatch
    i, j, s, d, v = _neighbor_list_op(
        x.positions,
        x.cell,
        x.ptr,
        x.pbc,
        float(cutoff),
        bool(self_interaction),
        bool(return_distances),
        bool(return_vectors),
        backend,
    )
    return NeighborList(i, j, s, d if return_distances else None, v if return_vectors else None)
