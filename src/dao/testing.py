"""Physics contracts for crystal models, as reusable checks.

Every check takes a *model callable* with the backbone signature

    model(atom_types [N], frac_coords [N, 3], lattice [B, 3, 3], t [B], batch [N])
        -> ModelOutput(coord [N, 3] | None, lattice [B, 3, 3] | None, energy [B] | None)

(any object returning a NamedTuple with those three fields works; wrap extra
options with ``functools.partial``), a :class:`~dao.data.crystal.CrystalBatch`
and the diffusion steps ``t`` [B]. A check returns None or raises AssertionError
saying which output broke which symmetry.

The symmetries (lattice rows are lattice vectors, cartesian x = f·L):

* permutation of the atoms within a crystal: coord permutes, the rest is unchanged;
* periodic translation f → f + τ_b + n (τ_b per crystal, n integer per atom):
  every output is unchanged;
* rotation or reflection R ∈ O(3), L → L·Rᵀ: coord and energy unchanged, the
  lattice output rotates, out → out·Rᵀ;
* independence of the crystals in a batch: batched == one by one;
* no mutation of the inputs (values and in-place version counters).

Run the checks in float64: in float32 the Fourier features of high frequencies
(arguments up to 2π·K) change at the 1e-4 level under an exact translation, so
equality holds only to that tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dao.data.crystal import CrystalBatch

__all__ = [
    "CONTRACT_TOLERANCES",
    "atom_feature_table",
    "call_model",
    "check_all_contracts",
    "check_batched_equals_single",
    "check_gradients_reach_parameters",
    "check_no_input_mutation",
    "check_periodic_translation_invariance",
    "check_permutation_equivariance",
    "check_rotation_equivariance",
    "random_crystals",
    "random_orthogonal",
    "random_steps",
    "validate_model_outputs",
]

ModelFn = Callable[..., Any]

#: Default (atol, rtol) of the contract checks, keyed by the outputs' dtype.
CONTRACT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-4, 2e-4),
}

_FIELDS = ("coord", "lattice", "energy")


# ----------------------------------------------------------------- inputs


def random_crystals(
    num_crystals: int,
    atoms_range: tuple[int, int] = (4, 20),
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    max_z: int = 100,
    volume_per_atom: tuple[float, float] = (10.0, 30.0),
) -> CrystalBatch:
    """MP-20-like random crystals: uniform atom counts, elements and positions in the
    cell, moderately skewed cells of realistic volume.

    Args:
        num_crystals: B.
        atoms_range: inclusive range of atoms per crystal (0 allowed).
        seed: numpy seed.
        dtype: floating dtype of coordinates and lattices.
        max_z: largest atomic number drawn (elements 1..max_z).
        volume_per_atom: range of the cell volume per atom (Å³).
    """
    rng = np.random.default_rng(seed)
    nums = rng.integers(atoms_range[0], atoms_range[1] + 1, size=num_crystals)
    lattices = []
    for n in nums:
        while True:
            m = np.eye(3) + 0.25 * rng.normal(size=(3, 3))
            det = np.linalg.det(m)
            if det > 0.3:
                break
        lattices.append(m * (max(int(n), 1) * rng.uniform(*volume_per_atom) / det) ** (1 / 3))
    total = int(nums.sum())
    return CrystalBatch(
        torch.as_tensor(rng.integers(1, max_z + 1, size=total), dtype=torch.int64),
        torch.as_tensor(rng.random((total, 3)), dtype=dtype),
        torch.as_tensor(np.array(lattices).reshape(-1, 3, 3), dtype=dtype),
        torch.as_tensor(nums, dtype=torch.int64),
    )


def random_steps(num_crystals: int, num_steps: int = 1000, *, seed: int = 0) -> Tensor:
    """[B] int64 diffusion steps drawn uniformly from 0..num_steps."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_steps + 1, (num_crystals,), generator=gen)


def random_orthogonal(
    seed: int = 0, dtype: torch.dtype = torch.float64, reflection: bool | None = None
) -> Tensor:
    """A random 3×3 orthogonal matrix (Haar); ``reflection`` forces det = −1 (True)
    or +1 (False); None leaves the sign random."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if reflection is not None and (bool(torch.linalg.det(q) < 0) != reflection):
        q = q * torch.tensor([1.0, 1.0, -1.0], dtype=q.dtype)
    return q.to(dtype)


def atom_feature_table() -> Tensor:
    """A [101, 92] atom-feature table for tests, row Z = element Z.

    The CGCNN table from :mod:`dao.data.atom_features` when it is available, else
    ``cgcnn/atom_init.json`` in the data folder (:func:`dao.data.paths.data_root`),
    else a fixed random table: the model contracts hold for any table.
    """
    try:
        from dao.data.atom_features import atom_features  # noqa: PLC0415

        return atom_features()
    except ImportError:
        pass
    from dao.data.paths import data_root  # noqa: PLC0415

    path = data_root() / "cgcnn" / "atom_init.json"
    if path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
        table = torch.zeros(101, 92)
        for z, vec in raw.items():
            table[int(z)] = torch.tensor(vec, dtype=torch.float32)
        return table
    gen = torch.Generator().manual_seed(92)
    return (torch.rand(101, 92, generator=gen) < 0.1).float()


# ---------------------------------------------------------------- helpers


def call_model(model: ModelFn, crystals: CrystalBatch, t: Tensor, **kwargs) -> Any:
    """model(atom_types, frac_coords, lattice, t, batch, **kwargs)."""
    return model(
        crystals.atom_types, crystals.frac_coords, crystals.lattice, t, crystals.batch, **kwargs
    )


def _tol(out: Any, atol: float | None, rtol: float | None) -> tuple[float, float]:
    dtype = next((getattr(out, f).dtype for f in _FIELDS if getattr(out, f) is not None), None)
    da, dr = CONTRACT_TOLERANCES.get(dtype, CONTRACT_TOLERANCES[torch.float32])
    return (da if atol is None else atol), (dr if rtol is None else rtol)


def _close(name: str, actual: Tensor, expected: Tensor, atol: float, rtol: float, what: str):
    torch.testing.assert_close(
        actual,
        expected,
        atol=atol,
        rtol=rtol,
        msg=lambda m: f"{what}: output {name!r} differs\n{m}",
    )


def _same_presence(a: Any, b: Any, what: str) -> None:
    for f in _FIELDS:
        if (getattr(a, f) is None) != (getattr(b, f) is None):
            raise AssertionError(f"{what}: output {f!r} is None in one call only")


def validate_model_outputs(out: Any, crystals: CrystalBatch) -> None:
    """Assert the output contract: fields, shapes, one floating dtype, finite values."""
    for f in _FIELDS:
        if not hasattr(out, f):
            raise AssertionError(f"model output has no field {f!r}")
    n, b = crystals.num_nodes, len(crystals)
    shapes = {"coord": (n, 3), "lattice": (b, 3, 3), "energy": (b,)}
    dtypes = set()
    for f, shape in shapes.items():
        x = getattr(out, f)
        if x is None:
            continue
        if tuple(x.shape) != shape:
            raise AssertionError(f"output {f!r} has shape {tuple(x.shape)}, expected {shape}")
        if not x.dtype.is_floating_point:
            raise AssertionError(f"output {f!r} is not floating point ({x.dtype})")
        if not bool(torch.isfinite(x).all()):
            raise AssertionError(f"output {f!r} holds non-finite values")
        dtypes.add(x.dtype)
    if len(dtypes) > 1:
        raise AssertionError(f"outputs mix dtypes {sorted(map(str, dtypes))}")


# -------------------------------------------------------------- contracts


def check_permutation_equivariance(
    model: ModelFn,
    crystals: CrystalBatch,
    t: Tensor,
    *,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Shuffle the atoms within every crystal: coord follows the atoms, lattice and
    energy do not change."""
    gen = torch.Generator().manual_seed(seed)
    ptr = crystals.ptr.tolist()
    perm = torch.cat(
        [torch.randperm(e - s, generator=gen) + s for s, e in zip(ptr[:-1], ptr[1:], strict=True)]
        or [torch.zeros(0, dtype=torch.int64)]
    ).to(crystals.atom_types.device)
    shuffled = CrystalBatch(
        crystals.atom_types[perm], crystals.frac_coords[perm], crystals.lattice, crystals.num_atoms
    )
    with torch.no_grad():
        ref = call_model(model, crystals, t)
        out = call_model(model, shuffled, t)
    atol, rtol = _tol(ref, atol, rtol)
    what = "permutation equivariance"
    _same_presence(ref, out, what)
    if ref.coord is not None:
        _close("coord", out.coord, ref.coord[perm], atol, rtol, what)
    for f in ("lattice", "energy"):
        if getattr(ref, f) is not None:
            _close(f, getattr(out, f), getattr(ref, f), atol, rtol, what)


def check_periodic_translation_invariance(
    model: ModelFn,
    crystals: CrystalBatch,
    t: Tensor,
    *,
    seed: int = 0,
    max_cells: int = 3,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Shift every crystal by a random fractional vector, and every atom additionally
    by a random whole number of cells (up to ``max_cells``): no output changes."""
    gen = torch.Generator().manual_seed(seed)
    frac = crystals.frac_coords
    b, n = len(crystals), crystals.num_nodes
    tau = torch.rand(b, 3, generator=gen, dtype=torch.float64).to(frac)
    ints = torch.randint(-max_cells, max_cells + 1, (n, 3), generator=gen).to(frac)
    ref_out = None
    for name, shift in (
        ("fractional shift", tau[crystals.batch]),
        ("integer shifts", ints),
        ("both", tau[crystals.batch] + ints),
    ):
        moved = CrystalBatch(
            crystals.atom_types, frac + shift, crystals.lattice, crystals.num_atoms
        )
        with torch.no_grad():
            if ref_out is None:
                ref_out = call_model(model, crystals, t)
            out = call_model(model, moved, t)
        a, r = _tol(ref_out, atol, rtol)
        what = f"periodic translation invariance ({name})"
        _same_presence(ref_out, out, what)
        for f in _FIELDS:
            if getattr(ref_out, f) is not None:
                _close(f, getattr(out, f), getattr(ref_out, f), a, r, what)


def check_rotation_equivariance(
    model: ModelFn,
    crystals: CrystalBatch,
    t: Tensor,
    *,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """L → L·Rᵀ for a proper rotation and for a reflection: coord and energy are
    invariant, the lattice output rotates (out → out·Rᵀ)."""
    with torch.no_grad():
        ref = call_model(model, crystals, t)
    a, r = _tol(ref, atol, rtol)
    for k, reflection in enumerate((False, True)):
        rot = random_orthogonal(seed + k, crystals.lattice.dtype, reflection)
        rot = rot.to(crystals.lattice.device)
        turned = CrystalBatch(
            crystals.atom_types,
            crystals.frac_coords,
            crystals.lattice @ rot.T,
            crystals.num_atoms,
        )
        with torch.no_grad():
            out = call_model(model, turned, t)
        what = f"O(3) ({'reflection' if reflection else 'rotation'})"
        _same_presence(ref, out, what)
        for f in ("coord", "energy"):
            if getattr(ref, f) is not None:
                _close(f, getattr(out, f), getattr(ref, f), a, r, what + " invariance")
        if ref.lattice is not None:
            _close(
                "lattice",
                out.lattice,
                ref.lattice @ rot.T.to(ref.lattice.dtype),
                a,
                r,
                what + " equivariance",
            )


def check_batched_equals_single(
    model: ModelFn,
    crystals: CrystalBatch,
    t: Tensor,
    *,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """The outputs for a batch equal those for each crystal alone."""
    with torch.no_grad():
        ref = call_model(model, crystals, t)
        a, r = _tol(ref, atol, rtol)
        ptr = crystals.ptr.tolist()
        for i in range(len(crystals)):
            out = call_model(model, crystals[i], t[i : i + 1])
            what = f"batched == one by one (crystal {i})"
            _same_presence(ref, out, what)
            if ref.coord is not None:
                _close("coord", out.coord, ref.coord[ptr[i] : ptr[i + 1]], a, r, what)
            for f in ("lattice", "energy"):
                if getattr(ref, f) is not None:
                    _close(f, getattr(out, f), getattr(ref, f)[i : i + 1], a, r, what)


def check_no_input_mutation(
    model: ModelFn, crystals: CrystalBatch, t: Tensor, *, backward: bool = True
) -> None:
    """Forward (and backward through every output) leave the inputs' values and
    in-place version counters unchanged."""
    inputs = {
        "atom_types": crystals.atom_types,
        "frac_coords": crystals.frac_coords,
        "lattice": crystals.lattice,
        "t": t,
        "batch": crystals.batch,
    }
    before = {k: (v.clone(), v._version) for k, v in inputs.items()}

    def unchanged() -> None:
        for k, v in inputs.items():
            value, version = before[k]
            if v._version != version:
                raise AssertionError(f"input {k!r} was modified in place")
            if not torch.equal(v, value):
                raise AssertionError(f"input {k!r} changed")

    out = call_model(model, crystals, t)
    unchanged()  # before the backward, which may itself fail on a mutated saved input
    if backward:
        total = sum(getattr(out, f).sum() for f in _FIELDS if getattr(out, f) is not None)
        if isinstance(total, Tensor) and total.requires_grad:
            total.backward()
        unchanged()


def check_gradients_reach_parameters(
    model: nn.Module,
    crystals: CrystalBatch,
    t: Tensor,
    *,
    exclude: Iterable[str] = (),
) -> None:
    """Every trainable parameter (except names in ``exclude``) gets a nonzero
    gradient from the sum of squares of all outputs."""
    model.zero_grad(set_to_none=True)
    out = call_model(model, crystals, t)
    loss = sum(getattr(out, f).square().sum() for f in _FIELDS if getattr(out, f) is not None)
    loss.backward()
    skip = set(exclude)
    missing = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad
        and name not in skip
        and (p.grad is None or not bool(torch.isfinite(p.grad).all()) or not bool(p.grad.any()))
    ]
    model.zero_grad(set_to_none=True)
    if missing:
        raise AssertionError(f"no (finite, nonzero) gradient reaches: {missing}")


def check_all_contracts(
    model: ModelFn,
    crystals: CrystalBatch,
    t: Tensor,
    *,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
) -> None:
    """Output contract, permutation, periodic translation, O(3), batched == single
    and no input mutation, in that order."""
    with torch.no_grad():
        validate_model_outputs(call_model(model, crystals, t), crystals)
    check_permutation_equivariance(model, crystals, t, seed=seed, atol=atol, rtol=rtol)
    check_periodic_translation_invariance(model, crystals, t, seed=seed, atol=atol, rtol=rtol)
    check_rotation_equivariance(model, crystals, t, seed=seed, atol=atol, rtol=rtol)
    check_batched_equals_single(model, crystals, t, atol=atol, rtol=rtol)
    check_no_input_mutation(model, crystals, t)
