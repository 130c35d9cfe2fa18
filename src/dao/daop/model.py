"""DAO-P: the time-dependent energy model (spec §3 guidance, §4).

DAO-P is the DAO-G diffusion model whose backbone also has the energy head: it is
trained on noisy structures M_t with the diffusion loss plus the exponential
energy loss MSE(exp(−E_θ(M_t, t)), exp(−E_0)) on standardized energy-above-hull
labels, whose minimiser is E_t = −log E[exp(−E_0) | M_t] (the intermediate energy
the guidance needs). At t = 0 it predicts the energy above hull of a structure.

This module holds the model wrapper (label standardisation, energies in eV/atom),
its training loss and the guidance callback for :meth:`DAOGDiffusion.sample`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dao.data.crystal import CrystalBatch

__all__ = ["ENERGY_COLUMNS", "DAOP", "energy_labels"]

#: Energy-above-hull columns of the data (MP-20 files, MPTS-52), in priority order.
ENERGY_COLUMNS = ("e_above_hull", "energy_above_hull")


def energy_labels(props: dict[str, Tensor], num_crystals: int) -> Tensor:
    """[B] energy above hull (eV/atom) from a batch's property columns, NaN if absent.

    The first column of :data:`ENERGY_COLUMNS` that holds a value wins per crystal.
    """
    out = None
    for name in ENERGY_COLUMNS:
        col = props.get(name)
        if col is None:
            continue
        col = torch.as_tensor(col, dtype=torch.float64)
        out = col if out is None else torch.where(torch.isnan(out), col, out)
    if out is None:
        return torch.full((num_crystals,), math.nan, dtype=torch.float64)
    return out


class DAOP(nn.Module):
    """DAO-P around a DAO-G diffusion module whose model has an energy head.

    Args:
        diffusion: a :class:`dao.diffusion.DAOGDiffusion` whose model returns an energy
            (``energy_head = true`` in the model config).
        energy_mean, energy_std: the standardisation of the training labels (eV/atom);
            the network predicts (E − mean) / std. Stored as buffers (saved with the
            weights).
        energy_weight: weight of the energy loss next to the diffusion loss.
    """

    def __init__(
        self,
        diffusion: nn.Module,
        energy_mean: float = 0.0,
        energy_std: float = 1.0,
        energy_weight: float = 1.0,
    ) -> None:
        super().__init__()
        heads = getattr(diffusion.model, "heads", None)
        if heads is None or getattr(heads, "energy", None) is None:
            raise ValueError(
                "DAO-P needs a model with an energy head: set energy_head = true in [model]"
            )
        if not energy_std > 0:
            raise ValueError(f"energy_std must be > 0, got {energy_std}")
        self.diffusion = diffusion
        self.energy_weight = float(energy_weight)
        self.register_buffer("energy_mean", torch.tensor(float(energy_mean), dtype=torch.float64))
        self.register_buffer("energy_std", torch.tensor(float(energy_std), dtype=torch.float64))

    @property
    def model(self) -> nn.Module:
        return self.diffusion.model

    def standardized_energy(
        self, atom_types: Tensor, frac: Tensor, lattice: Tensor, t: Tensor, batch: Tensor
    ) -> Tensor:
        """[B] the network's energy E_θ(M_t, t) (standardized units; differentiable)."""
        return self.model(atom_types, frac, lattice, t, batch).energy

    def energy(self, crystals: CrystalBatch, t: Tensor | int = 0) -> Tensor:
        """[B] predicted energy above hull in eV/atom (float64) of clean (t = 0) or
        noisy structures."""
        dtype = self.model.atom_embed.weight.dtype
        device = self.model.atom_embed.weight.device
        crystals = crystals.to(device=device, dtype=dtype)
        t = torch.as_tensor(t, device=device, dtype=torch.int64).expand(len(crystals))
        e = self.standardized_energy(
            crystals.atom_types, crystals.frac_coords, crystals.lattice, t, crystals.batch
        )
        return e.double() * self.energy_std + self.energy_mean

    def loss(self, batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Diffusion loss + energy_weight · MSE(exp(−E_θ(M_t, t)), exp(−E_0)).

        ``batch`` is a :class:`dao.data.dataset.LabelledBatch`; crystals without an
        energy label take part in the diffusion loss only.
        """
        crystals, props = batch.crystals, batch.props
        terms, out, _t = self.diffusion.loss_terms(crystals, generator)
        labels = energy_labels(props, len(crystals)).to(out.energy.device)
        known = ~torch.isnan(labels)
        if bool(known.any()):
            target = ((labels[known] - self.energy_mean) / self.energy_std).to(out.energy.dtype)
            loss_energy = F.mse_loss(torch.exp(-out.energy[known]), torch.exp(-target))
        else:
            loss_energy = out.energy.sum() * 0.0  # keeps the graph (DDP) when none is labelled
        terms["loss_energy"] = loss_energy
        terms["loss"] = terms["loss"] + self.energy_weight * loss_energy
        return terms

    def forward(self, batch, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Same as :meth:`loss` (what the training loop and DDP call)."""
        return self.loss(batch, generator)

    def guidance(self, atom_types: Tensor):
        """The ``energy_guidance`` callback of :meth:`DAOGDiffusion.sample`.

        Returns ``fn(frac, lattice, t, batch) -> (∇_F E_t, ∇_L E_t)``, gradients of
        the summed standardized energies (crystals are independent, so each crystal
        gets the gradient of its own energy) at the sampler's noisy structure.
        """

        def fn(frac: Tensor, lattice: Tensor, t: Tensor, batch: Tensor):
            frac = frac.detach().requires_grad_(True)
            lattice = lattice.detach().requires_grad_(True)
            e = self.standardized_energy(atom_types, frac, lattice, t, batch)
            grad_f, grad_l = torch.autograd.grad(e.sum(), (frac, lattice))
            return grad_f, grad_l

        return fn
