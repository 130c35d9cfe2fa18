"""Structure relaxation on DAO-P's energy (spec §4, dataset relaxation).

L-BFGS over the fractional coordinates and the lattice of every crystal of a
batch at once, minimising the sum of the per-crystal energies E_θ(M, t = 0)
(crystals do not interact, so each one follows its own gradient; the line search
is shared). The spec's settings are the defaults: lr 1.0, 5 iterations,
fractional coordinates wrapped mod 1 afterwards.

Guard rails: after every iteration each crystal's energy and cell are checked;
a crystal whose energy or coordinates are not finite, or whose cell has
collapsed (volume per atom below ``min_volume_per_atom`` or below
``min_volume_fraction`` of its start), is frozen at its best iterate so far and
its status says why. Nothing with NaN or a collapsed cell is ever returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dao.data.crystal import CrystalBatch
from dao.diffusion import wrap_frac

__all__ = ["RelaxResult", "relax"]


@dataclass
class RelaxResult:
    """What :func:`relax` returns.

    Attributes:
        crystals: the relaxed structures (best iterate of each crystal).
        energy_initial, energy_final: [B] eV/atom before and after (float64).
        status: per crystal, ``"ok"`` or why it was frozen early.
        iterations: [B] L-BFGS iterations each crystal took part in.
        trajectory: the batch after every iteration (if requested), start included.
    """

    crystals: CrystalBatch
    energy_initial: Tensor
    energy_final: Tensor
    status: list[str]
    iterations: Tensor
    trajectory: list[CrystalBatch] = field(default_factory=list)


def _volumes(lattice: Tensor) -> Tensor:
    return torch.linalg.det(lattice.double()).abs()


def relax(
    daop,
    crystals: CrystalBatch,
    *,
    steps: int = 5,
    lr: float = 1.0,
    max_eval: int | None = None,
    min_volume_per_atom: float = 1.0,
    min_volume_fraction: float = 0.25,
    keep_trajectory: bool = False,
) -> RelaxResult:
    """Relax a batch of structures on DAO-P's energy at t = 0.

    Args:
        daop: a :class:`dao.daop.DAOP` (in eval mode).
        crystals: the structures (any number, mixed sizes).
        steps: L-BFGS iterations (spec: 5).
        lr: L-BFGS step scale (spec: 1.0).
        max_eval: energy evaluations per iteration (default 1.25 x L-BFGS's max_iter = 1).
        min_volume_per_atom: Å³ below which a cell counts as collapsed.
        min_volume_fraction: a cell shrinking below this fraction of its start counts
            as collapsed.
        keep_trajectory: also return the batch after every iteration.

    Returns:
        :class:`RelaxResult`.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(crystals) == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return RelaxResult(crystals, empty, empty, [], torch.zeros(0, dtype=torch.int64))
    model = daop.model
    dtype = model.atom_embed.weight.dtype
    device = model.atom_embed.weight.device
    crystals = crystals.to(device=device, dtype=dtype)
    types, batch, nums = crystals.atom_types, crystals.batch, crystals.num_atoms
    n_crystals = len(crystals)
    t0 = torch.zeros(n_crystals, dtype=torch.int64, device=device)

    def energies(frac: Tensor, lattice: Tensor) -> Tensor:
        return daop.standardized_energy(types, frac, lattice, t0, batch)

    with torch.no_grad():
        e_std0 = energies(crystals.frac_coords, crystals.lattice)
    vol0 = _volumes(crystals.lattice)
    best_frac = crystals.frac_coords.detach().clone()
    best_lat = crystals.lattice.detach().clone()
    best_e = e_std0.detach().double().clone()
    status = ["ok"] * n_crystals
    frozen = torch.zeros(n_crystals, dtype=torch.bool, device=device)
    iters = torch.zeros(n_crystals, dtype=torch.int64)
    traj = [crystals] if keep_trajectory else []

    frac = crystals.frac_coords.detach().clone().requires_grad_(True)
    lattice = crystals.lattice.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [frac, lattice], lr=lr, max_iter=1, max_eval=max_eval, line_search_fn=None
    )
    atom_frozen = frozen[batch]

    def closure():
        opt.zero_grad()
        e = energies(frac, lattice)
        total = e[~frozen].sum() if bool((~frozen).any()) else e.sum() * 0.0
        total.backward()
        # frozen crystals do not move
        frac.grad[atom_frozen] = 0.0
        lattice.grad[frozen] = 0.0
        return total

    for _ in range(steps):
        if bool(frozen.all()):
            break
        atom_frozen = frozen[batch]
        opt.step(closure)
        iters[~frozen.cpu()] += 1
        with torch.no_grad():
            e_now = energies(frac, lattice).double()
            vol = _volumes(lattice)
            bad_atom = (~torch.isfinite(frac).all(dim=1)).double()
            bad_frac = torch.zeros(n_crystals, dtype=torch.float64, device=device)
            bad_frac = bad_frac.index_add(0, batch, bad_atom) > 0
            bad = ~torch.isfinite(e_now) | bad_frac | ~torch.isfinite(lattice).all(dim=(1, 2))
            collapsed = (vol / nums.double() < min_volume_per_atom) | (
                vol < min_volume_fraction * vol0
            )
            for c in torch.nonzero(~frozen & (bad | collapsed)).flatten().tolist():
                status[c] = (
                    "stopped: energy or coordinates not finite; best iterate kept"
                    if bool(bad[c])
                    else "stopped: cell collapsed; best iterate kept"
                )
            frozen |= bad | collapsed
            better = ~frozen & (e_now < best_e)
            best_e = torch.where(better, e_now, best_e)
            best_lat = torch.where(better.view(-1, 1, 1), lattice, best_lat)
            best_frac = torch.where(better[batch].unsqueeze(1), frac, best_frac)
            # restart frozen crystals from their best iterate (and keep them there)
            frac.data = torch.where(frozen[batch].unsqueeze(1), best_frac, frac.data)
            lattice.data = torch.where(frozen.view(-1, 1, 1), best_lat, lattice.data)
        if keep_trajectory:
            traj.append(
                CrystalBatch(types, wrap_frac(frac.detach()), lattice.detach().clone(), nums)
            )
    out = CrystalBatch(types, wrap_frac(best_frac.detach()), best_lat.detach(), nums)
    scale = daop.energy_std.double()
    shift = daop.energy_mean.double()
    return RelaxResult(
        out,
        e_std0.double() * scale + shift,
        best_e * scale + shift,
        status,
        iters,
        traj,
    )
