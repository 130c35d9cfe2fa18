"""Autograd, ``torch.library.opcheck`` and ``torch.compile`` of ``dao::neighbor_list``.

Gradients of distances and vectors flow to positions and cell through the
backward registered on the op. The functions handed to gradcheck sort the pairs
canonically (the order of the list is not part of the contract) and use
cutoffs far from every pair distance, so the finite-difference perturbations
never change the pair set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_close, canonical_pairs, random_batch, random_cell

from dao.ops import neighbor_list
from dao.reference import neighbor_list as ref

DTYPES = [torch.float64, torch.float32]
# Torch-internal warnings that the strict filterwarnings=error setting would turn into
# errors under torch.compile: importing inductor touches the deprecated
# torch.jit.script_method, and dynamo probes .grad of non-leaf tensors.
IGNORE_JIT_DEPRECATION = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)
IGNORE_NON_LEAF_GRAD = pytest.mark.filterwarnings(
    "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"
)


def _safe_cutoff(pos, cell, num, pbc, target, margin=1e-2):
    """A cutoff near ``target`` at least ``margin`` away from every pair distance."""
    d = ref.neighbor_list(pos, cell, target + 1.0, num_atoms=num, pbc=pbc).distances
    d = np.sort(d.detach().numpy())
    grid = np.linspace(target - 0.8, target + 0.8, 801)
    gap = np.abs(grid[:, None] - d[None, :]).min(axis=1) if d.size else np.ones_like(grid)
    best = int(np.argmax(gap))
    assert gap[best] > margin
    return float(grid[best])


def _small_batch(seed, n_systems, n_atoms=4, mixed_pbc=False):
    """Tiny float64 systems where the cutoff spans a few cells (many images)."""
    rng = np.random.default_rng(seed)
    pos, cell, num = random_batch(
        rng, n_systems, (n_atoms, n_atoms), volume_per_atom=(6.0, 9.0), skew=0.5, outside=1
    )
    pbc = torch.ones(n_systems, 3, dtype=torch.bool)
    if mixed_pbc:
        pbc[-1, 1] = False
    cutoff = _safe_cutoff(pos, cell, num, pbc, 3.5)
    return pos, cell, num, pbc, cutoff


def _sorted_outputs(fn, want_d, want_v, **kw):
    """f(positions, cell) -> the requested float outputs in canonical pair order."""

    def f(pos, cell):
        nl = fn(pos, cell, return_distances=want_d, return_vectors=want_v, **kw)
        order = torch.as_tensor(canonical_pairs(nl.i, nl.j, nl.shifts)[1])
        out = []
        if want_d:
            out.append(nl.distances[order])
        if want_v:
            out.append(nl.vectors[order])
        return tuple(out)

    return f


OUTPUTS = {"distances": (True, False), "vectors": (False, True), "both": (True, True)}


@pytest.mark.parametrize("outputs", list(OUTPUTS))
@pytest.mark.parametrize("n_systems", [1, 2])
def test_gradcheck_positions_and_cell(outputs, n_systems):
    """float64 gradcheck w.r.t. positions AND cell; "distances" alone is the path where
    the backward recomputes the vectors it was not given."""
    want_d, want_v = OUTPUTS[outputs]
    pos, cell, num, pbc, cutoff = _small_batch(10 + n_systems, n_systems, mixed_pbc=True)
    f = _sorted_outputs(neighbor_list, want_d, want_v, cutoff=cutoff, num_atoms=num, pbc=pbc)
    assert f(pos, cell)[0].shape[0] > 10  # a real list, images included
    pos.requires_grad_(True)
    cell.requires_grad_(True)
    assert torch.autograd.gradcheck(f, (pos, cell))


def test_gradcheck_single_cell_3x3_and_self_interaction():
    """A [3, 3] cell leaf (unsqueezed inside) and zero-length self pairs, whose
    gradient is defined as zero."""
    pos, cell, num, pbc, cutoff = _small_batch(3, 1, n_atoms=3)
    cell3 = cell[0].clone().requires_grad_(True)
    pos.requires_grad_(True)
    for want_d, want_v in OUTPUTS.values():
        f = _sorted_outputs(
            neighbor_list, want_d, want_v, cutoff=cutoff, pbc=pbc[0], self_interaction=True
        )
        assert torch.autograd.gradcheck(f, (pos, cell3))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("outputs", list(OUTPUTS))
def test_gradients_match_reference_twin(dtype, outputs):
    """Random weights on the sorted outputs; the op's backward against plain autograd
    through the reference twin. Includes a system large enough for the cell list."""
    want_d, want_v = OUTPUTS[outputs]
    rng = np.random.default_rng(7)
    pos, cell, num = random_batch(rng, 4, (1, 12), skew=0.7, outside=2, dtype=dtype)
    big = torch.tensor(random_cell(rng, 1500.0, 0.3), dtype=dtype)
    pos = torch.cat([pos, torch.tensor(rng.random((100, 3)), dtype=dtype) @ big])
    cell = torch.cat([cell, big[None]])
    num = torch.cat([num, torch.tensor([100])])
    pbc = torch.tensor(rng.random((5, 3)) < 0.7)
    kw = dict(cutoff=4.0, num_atoms=num, pbc=pbc, self_interaction=True)
    grads = []
    for fn in (neighbor_list, ref.neighbor_list):
        p = pos.clone().requires_grad_(True)
        c = cell.clone().requires_grad_(True)
        outs = _sorted_outputs(fn, want_d, want_v, **kw)(p, c)
        w = torch.Generator().manual_seed(3)
        loss = sum((torch.randn(o.shape, generator=w, dtype=dtype) * o).sum() for o in outs)
        grads.append(torch.autograd.grad(loss, (p, c)))
    for got, want in zip(*grads, strict=True):
        assert torch.isfinite(got).all()
        assert_close(got, want, dtype)


# Training on forces (F = -dE/dr, then a loss on F) differentiates the backward
# itself, including the path where the backward recomputes the vectors.
@pytest.mark.parametrize("outputs", ["distances", "vectors", "both"])
def test_gradgradcheck(outputs):
    want_d, want_v = OUTPUTS[outputs]
    pos, cell, num, pbc, cutoff = _small_batch(31, 1, n_atoms=3)
    f = _sorted_outputs(neighbor_list, want_d, want_v, cutoff=cutoff, num_atoms=num, pbc=pbc)
    pos.requires_grad_(True)
    cell.requires_grad_(True)
    assert torch.autograd.gradgradcheck(f, (pos, cell))


def test_force_training_gradient_matches_reference():
    """d/dr of |F|^2 with F = -dE/dr, E a pair potential on distances (default flags):
    the second-order path, against the reference twin."""
    pos, cell, num, pbc, cutoff = _small_batch(33, 2)
    grads = []
    for fn in (neighbor_list, ref.neighbor_list):
        p = pos.clone().requires_grad_(True)
        d = fn(p, cell, cutoff, num_atoms=num, pbc=pbc).distances
        energy = (torch.exp(-d) + d * d).sum()
        (force,) = torch.autograd.grad(-energy, p, create_graph=True)
        grads.append(torch.autograd.grad((force * force).sum(), p)[0])
    assert_close(*grads)


def test_backward_of_empty_list():
    for n in (0, 1):
        pos = torch.zeros(n, 3, dtype=torch.float64, requires_grad=True)
        cell = (10.0 * torch.eye(3, dtype=torch.float64)).requires_grad_(True)
        nl = neighbor_list(pos, cell, 2.0, return_vectors=True)
        assert nl.i.numel() == 0
        gp, gc = torch.autograd.grad(nl.distances.sum() + nl.vectors.sum(), (pos, cell))
        assert gp.shape == (n, 3) and not gp.any() and not gc.any()


def test_integer_outputs_carry_no_gradient():
    pos, cell, num, pbc, cutoff = _small_batch(5, 1)
    pos.requires_grad_(True)
    nl = neighbor_list(pos, cell, cutoff, num_atoms=num)
    assert nl.distances.requires_grad
    assert not (nl.i.requires_grad or nl.j.requires_grad or nl.shifts.requires_grad)
    with torch.no_grad():
        assert not neighbor_list(pos, cell, cutoff, num_atoms=num).distances.requires_grad


# ------------------------------------------------------------------- opcheck


def _pack(pos, cell, num, pbc, cutoff, self_interaction, want_d, want_v, backend="cpp"):
    return (pos, cell, num, pbc, cutoff, self_interaction, want_d, want_v, backend)


def _op_args(case):
    """Arguments of the public function's order, with num_atoms in place of ptr."""
    rng = np.random.default_rng(17)
    if case == "f64_distances":
        pos, cell, num = random_batch(rng, 1, (5, 5))
        pbc = torch.ones(1, 3, dtype=torch.bool)
        return _pack(pos.requires_grad_(), cell, num, pbc, 3.5, False, True, False)
    if case == "f32_batch_with_empty_system_both":
        pos, cell, num = random_batch(rng, 3, (3, 7), dtype=torch.float32, outside=1)
        cell = torch.cat([cell, 4.0 * torch.eye(3)[None]])
        num = torch.cat([num, torch.tensor([0])])
        pbc = torch.tensor([[True, True, True], [True, False, True], [False] * 3, [True] * 3])
        return _pack(pos, cell.requires_grad_(), num, pbc, 4.0, False, True, True)
    if case == "self_interaction_vectors_cell_list":
        cell = torch.tensor(random_cell(rng, 900.0, 0.4))[None]
        pos = torch.tensor(rng.random((80, 3))) @ cell[0]
        pbc = torch.ones(1, 3, dtype=torch.bool)
        num = torch.tensor([80])
        return _pack(pos.requires_grad_(), cell.requires_grad_(), num, pbc, 3.0, True, False, True)
    if case == "torch_backend_nothing_returned":
        pos, cell, num = random_batch(rng, 2, (2, 4))
        pbc = torch.ones(2, 3, dtype=torch.bool)
        return _pack(pos.requires_grad_(), cell, num, pbc, 3.0, False, False, False, "torch")
    raise AssertionError(case)


OP_CASES = [
    "f64_distances",
    "f32_batch_with_empty_system_both",
    "self_interaction_vectors_cell_list",
    "torch_backend_nothing_returned",
]


def _ptr_args(args):
    """The op takes ptr [B + 1] where the public function takes num_atoms [B]."""
    pos, cell, num, *rest = args
    ptr = torch.zeros(num.numel() + 1, dtype=torch.int64)
    torch.cumsum(num, 0, out=ptr[1:])
    return (pos, cell, ptr, *rest)


@pytest.mark.parametrize("case", OP_CASES)
def test_opcheck(case):
    # test_aot_dispatch_dynamic is left out: its harness adds every output into one
    # accumulator with an in-place `+=` that starts from the first output, i (int32),
    # so adding the float distances fails inside the harness ("result type Double
    # can't be cast to the desired output type Long") before the op is exercised.
    # test_compiled_op_matches_eager below covers the same ground (AOTAutograd
    # trace with dynamic shapes, outputs and gradients against eager).
    torch.library.opcheck(
        torch.ops.dao.neighbor_list.default,
        _ptr_args(_op_args(case)),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("case", OP_CASES)
def test_fake_impl_shapes(case):
    """Meta shapes from the fake impl: an unbacked pair count P shared by all outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415
    from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: PLC0415

    args = _ptr_args(_op_args(case))
    want_d, want_v = args[6], args[7]
    real = torch.ops.dao.neighbor_list.default(*args)
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        i, j, s, d, v = torch.ops.dao.neighbor_list.default(*fake_args)
    assert [t.dtype for t in (i, j, s, d, v)] == [t.dtype for t in real]
    p = i.shape[0]
    assert isinstance(p, torch.SymInt)
    assert j.shape == (p,) and s.shape == (p, 3)
    assert d.shape == ((p,) if want_d else (0,))
    assert v.shape == ((p, 3) if want_v else (0, 3))


@pytest.mark.parametrize("case", OP_CASES)
@IGNORE_NON_LEAF_GRAD
def test_compiled_op_matches_eager(case):
    """The raw op inside one AOTAutograd graph (dynamic shapes): same outputs and grads."""
    args = _ptr_args(_op_args(case))

    def f(pos, cell, ptr, pbc):
        i, j, s, d, v = torch.ops.dao.neighbor_list.default(pos, cell, ptr, pbc, *args[4:])
        return i, j, s, d, v, d.sum() + (v * v).sum() + s.sum()

    def run(fn):
        pos = args[0].detach().clone().requires_grad_(args[0].requires_grad)
        cell = args[1].detach().clone().requires_grad_(args[1].requires_grad)
        out = fn(pos, cell, args[2], args[3])
        leaves = [t for t in (pos, cell) if t.requires_grad]
        if not out[-1].requires_grad:
            return out, []
        return out, torch.autograd.grad(out[-1], leaves, allow_unused=True)

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
        got, got_g = run(compiled)
    want, want_g = run(f)
    torch._dynamo.reset()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("capture", [False, True], ids=["graph_break", "captured"])
@IGNORE_JIT_DEPRECATION
@IGNORE_NON_LEAF_GRAD
def test_torch_compile_matches_eager(capture):
    """torch.compile(fullgraph=False) of a function that sums distances. By default
    dynamo breaks the graph at the op (its output size depends on the data); with
    capture_dynamic_output_shape_ops the op is traced into the inductor graph
    through its fake impl. Both must match eager, value and gradient."""
    rng = np.random.default_rng(23)
    pos, cell, num = random_batch(rng, 2, (5, 8), skew=0.4)

    def energy(p, c):
        nl = neighbor_list(p, c, 4.0, num_atoms=num)
        return (nl.distances * nl.distances).sum() + nl.distances.sum()

    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
        compiled = torch.compile(energy, fullgraph=False)
        for step in range(2):  # second call: same shapes, new data, no recompile needed
            p = (pos + 0.05 * step).requires_grad_(True)
            e_c = compiled(p, cell)
            (g_c,) = torch.autograd.grad(e_c, p)
            q = (pos + 0.05 * step).requires_grad_(True)
            e = energy(q, cell)
            (g,) = torch.autograd.grad(e, q)
            assert_close(e_c, e)
            assert_close(g_c, g)
    torch._dynamo.reset()
