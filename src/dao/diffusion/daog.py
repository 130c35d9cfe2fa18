"""DAO-G: joint diffusion of lattice and fractional coordinates (spec section 3).

The lattice L [B, 3, 3] (rows are lattice vectors, in Angstrom) follows a DDPM with
the cosine schedule and epsilon-prediction; the fractional coordinates F [N, 3] follow
a variance-exploding wrapped-normal diffusion on the torus with score matching. Atom
types are given (CSP) and never diffused.

Conventions (fixed here, used by training and sampling alike):

* Steps are integers t = 1..T; schedules are indexed 0..T with entry 0 the clean
  data (see :mod:`dao.diffusion.schedules`): sigma_1 = sigma_begin is the smallest
  noise, sigma_T = sigma_end the largest, sigma_0 = 0. The model sees t as an int64
  tensor [B] in 1..T.
* Model contract::

      model(atom_types [N] int64, frac_coords [N, 3], lattice [B, 3, 3], t [B] int64,
            batch [N] int64) -> output with .coord [N, 3] and .lattice [B, 3, 3]

  ``coord`` predicts the *normalised score* of the coordinate noise,
  grad log N_w(F_t - F_0; sigma_t) / sqrt(lambda_t), which points from F_t towards
  the data (for small sigma it is -(F_t - F_0) / (sigma_t sqrt(lambda_t))); the
  sampler therefore *adds* step * sqrt(lambda_t) * coord. ``lattice`` predicts the
  lattice noise epsilon.
* lambda_t is the per-coordinate E[score^2] (quadrature, exact to float64
  round-off), so the normalised target has unit variance in every component.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dao._graph import static_batch
from dao.data.crystal import CrystalBatch
from dao.diffusion.schedules import cosine_beta_schedule, geometric_sigma_schedule
from dao.diffusion.wrapped_normal import wrapped_normal_score
from dao.ops.diffusion_step import BACKENDS as STEP_BACKENDS
from dao.ops.diffusion_step import corrector_step, predictor_step

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "DAOGDiffusion",
    "EnergyGuidance",
    "NoisedCrystals",
    "wrap_frac",
]

#: The guidance scale w the DAO paper uses when energy guidance is on.
DEFAULT_GUIDANCE_SCALE = 20.0

Generators = torch.Generator | Sequence[torch.Generator] | None
EnergyGuidance = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor | None, Tensor | None]]


def wrap_frac(x: Tensor) -> Tensor:
    """x mod 1 in [0, 1), also in float32 where ``x % 1`` can round to exactly 1.0."""
    y = x - torch.floor(x)
    return torch.where(y >= 1.0, y - 1.0, y)


class NoisedCrystals(NamedTuple):
    """One draw of the forward process q(F_t, L_t | F_0, L_0) and its training targets.

    Attributes:
        frac_coords: [N, 3] F_t = (F_0 + sigma_t eps_F) mod 1, in [0, 1).
        lattice: [B, 3, 3] L_t = sqrt(alpha_bar_t) L_0 + sqrt(1 - alpha_bar_t) eps_L.
        coord_noise: [N, 3] eps_F ~ N(0, I).
        lattice_noise: [B, 3, 3] eps_L ~ N(0, I), the lattice target.
        coord_target: [N, 3] grad log N_w(sigma_t eps_F; sigma_t) / sqrt(lambda_t).
    """

    frac_coords: Tensor
    lattice: Tensor
    coord_noise: Tensor
    lattice_noise: Tensor
    coord_target: Tensor


def _draw(fn, shape, generator: torch.Generator | None, device, dtype) -> Tensor:
    """fn(shape) on ``generator``'s device (as torch requires), then moved to ``device``."""
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    return fn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


class _Noise:
    """Random draws for a batch, from one generator or one generator per crystal.

    With one generator per crystal every crystal's draws come from its own stream in
    a fixed order, so sampling a batch gives the same crystals as sampling each one
    alone with its generator (the model permitting: it must not mix crystals).
    """

    def __init__(self, generator: Generators, num_atoms: list[int], device, dtype):
        self.num_atoms, self.device, self.dtype = num_atoms, device, dtype
        if generator is None or isinstance(generator, torch.Generator):
            self.per_crystal = None
            self.generator = generator
        else:
            self.per_crystal = list(generator)
            if len(self.per_crystal) != len(num_atoms):
                raise ValueError(
                    f"got {len(self.per_crystal)} generators for {len(num_atoms)} crystals: "
                    "give one torch.Generator, or one per crystal"
                )

    def _draw(self, fn, shape, gen) -> Tensor:
        return _draw(fn, shape, gen, self.device, self.dtype)

    def _coords(self, fn) -> Tensor:
        if self.per_crystal is None:
            return self._draw(fn, (sum(self.num_atoms), 3), self.generator)
        parts = [
            self._draw(fn, (n, 3), g) for n, g in zip(self.num_atoms, self.per_crystal, strict=True)
        ]
        return torch.cat(parts) if parts else self._draw(fn, (0, 3), None)

    def normal_coords(self) -> Tensor:
        return self._coords(torch.randn)

    def uniform_coords(self) -> Tensor:
        return self._coords(torch.rand)

    def normal_lattice(self) -> Tensor:
        if self.per_crystal is None:
            return self._draw(torch.randn, (len(self.num_atoms), 3, 3), self.generator)
        return torch.cat([self._draw(torch.randn, (1, 3, 3), g) for g in self.per_crystal])


def _on_cuda_device(device: torch.device, index: int) -> bool:
    """True if ``device`` is CUDA device ``index`` (index-less "cuda": the current one)."""
    if device.type != "cuda":
        return False
    return (device.index if device.index is not None else torch.cuda.current_device()) == index


def _check_output(out, n_atoms: int, n_crystals: int) -> tuple[Tensor, Tensor]:
    coord = getattr(out, "coord", None)
    lattice = getattr(out, "lattice", None)
    if not isinstance(coord, Tensor) or coord.shape != (n_atoms, 3):
        shape = None if not isinstance(coord, Tensor) else tuple(coord.shape)
        raise ValueError(
            f"model output .coord must be a [N, 3] = [{n_atoms}, 3] tensor, got {shape}"
        )
    if not isinstance(lattice, Tensor) or lattice.shape != (n_crystals, 3, 3):
        shape = None if not isinstance(lattice, Tensor) else tuple(lattice.shape)
        raise ValueError(
            f"model output .lattice must be a [B, 3, 3] = [{n_crystals}, 3, 3] tensor, got {shape}"
        )
    return coord, lattice


class DAOGDiffusion(nn.Module):
    """DiffCSP-style joint diffusion around a denoiser (Crysformer, CSPNet, ...).

    Args:
        model: the denoiser, with the contract in the module docstring.
        timesteps: T (>= 2).
        sigma_begin: sigma_1, the smallest coordinate noise.
        sigma_end: sigma_T, the largest coordinate noise.
        cost_lattice: weight of the lattice loss.
        cost_coord: weight of the coordinate loss.

    The schedules are non-persistent float64 buffers [T + 1] (they follow ``.to``):
    ``betas``, ``alphas``, ``alpha_bars``, ``posterior_variance`` (lattice) and
    ``sigmas``, ``lambdas`` (coordinates); they are derived from the arguments, so
    they stay out of the state dict.
    """

    betas: Tensor
    alphas: Tensor
    alpha_bars: Tensor
    posterior_variance: Tensor
    sigmas: Tensor
    lambdas: Tensor

    def __init__(
        self,
        model: nn.Module,
        timesteps: int = 1000,
        sigma_begin: float = 0.005,
        sigma_end: float = 0.5,
        cost_lattice: float = 1.0,
        cost_coord: float = 1.0,
    ):
        super().__init__()
        self.model = model
        self.timesteps = timesteps
        self.sigma_begin = float(sigma_begin)
        self.sigma_end = float(sigma_end)
        self.cost_lattice = float(cost_lattice)
        self.cost_coord = float(cost_coord)
        beta = cosine_beta_schedule(timesteps)
        sigma = geometric_sigma_schedule(timesteps, sigma_begin, sigma_end)
        for name, value in (*beta._asdict().items(), *sigma._asdict().items()):
            self.register_buffer(name, value, persistent=False)

    # ----------------------------------------------------------------- helpers
    def _dtype_device(self) -> tuple[torch.dtype, torch.device]:
        """The model's floating dtype and device (float32 / schedule device if it has none)."""
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            if tensor.dtype.is_floating_point:
                return tensor.dtype, tensor.device
        return torch.float32, self.betas.device

    def _call_model(self, atom_types, frac, lattice, t, batch) -> tuple[Tensor, Tensor]:
        out = self.model(atom_types, frac, lattice, t, batch)
        coord, lat = _check_output(out, frac.shape[0], lattice.shape[0])
        return coord.to(frac.dtype), lat.to(lattice.dtype)

    # ----------------------------------------------------------------- training
    def add_noise(
        self,
        frac_coords: Tensor,
        lattice: Tensor,
        t: Tensor,
        batch: Tensor,
        generator: torch.Generator | None = None,
    ) -> NoisedCrystals:
        """Draw (F_t, L_t) from the forward process and the training targets.

        Args:
            frac_coords: [N, 3] clean F_0 (any real values).
            lattice: [B, 3, 3] clean L_0.
            t: [B] int64 steps in 1..T, one per crystal.
            batch: [N] crystal index of every atom.
            generator: source of eps_L (drawn first) and eps_F.

        Returns:
            :class:`NoisedCrystals` in the dtype of ``frac_coords``.
        """
        t = torch.as_tensor(t, device=lattice.device)
        if t.shape != (lattice.shape[0],) or t.dtype.is_floating_point:
            raise ValueError(f"t must be an integer tensor [B] = [{lattice.shape[0]}]")
        if t.numel() and (int(t.min()) < 1 or int(t.max()) > self.timesteps):
            raise ValueError(f"t must lie in 1..{self.timesteps}")
        return self._add_noise(frac_coords, lattice, t, batch, generator)

    def _add_noise(self, frac_coords, lattice, t, batch, generator) -> NoisedCrystals:
        # Unchecked (no device sync): the loss draws t itself.
        dtype, device = frac_coords.dtype, frac_coords.device
        t = t.to(device=self.betas.device, dtype=torch.int64)
        abar = self.alpha_bars[t].to(device=device, dtype=torch.float64)
        sigma = self.sigmas[t].to(device=device, dtype=torch.float64)[batch]  # [N]
        lam = self.lambdas[t].to(device=device, dtype=torch.float64)[batch]
        eps_l = _draw(torch.randn, lattice.shape, generator, device, dtype)
        eps_f = _draw(torch.randn, frac_coords.shape, generator, device, dtype)
        abar = abar.to(dtype)[:, None, None]
        lattice_t = abar.sqrt() * lattice + (1.0 - abar).sqrt() * eps_l
        displacement = sigma[:, None] * eps_f.to(torch.float64)  # float64: exact target
        frac_t = wrap_frac(frac_coords + displacement.to(dtype))
        target = wrapped_normal_score(displacement, sigma[:, None]) / lam.sqrt()[:, None]
        return NoisedCrystals(frac_t, lattice_t, eps_f, eps_l, target.to(dtype))

    def loss(
        self, batch: CrystalBatch, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Diffusion loss of a batch: one t ~ U{1..T} per crystal (spec section 3).

        loss_lattice = MSE(pred.lattice, eps_L), loss_coord = MSE(pred.coord,
        coord_target) (means over all entries), loss = cost_lattice loss_lattice +
        cost_coord loss_coord. The batch is moved to the model's dtype and device.

        Args:
            batch: clean crystals (at least one atom in total).
            generator: source of t (drawn first), eps_L and eps_F.

        Returns:
            dict with scalar tensors 'loss', 'loss_lattice', 'loss_coord'.
        """
        return self.loss_terms(batch, generator)[0]

    def loss_terms(
        self, batch: CrystalBatch, generator: torch.Generator | None = None
    ) -> tuple[dict[str, Tensor], Any, Tensor]:
        """:meth:`loss` plus what a model with more heads needs (DAO-P's energy):
        (loss dict, the model's raw output on the noisy batch, t [B])."""
        if len(batch) == 0 or batch.num_nodes == 0:
            raise ValueError("loss needs a batch with at least one crystal and one atom")
        dtype, device = self._dtype_device()
        batch = batch.to(device=device, dtype=dtype)
        n_crystals = len(batch)
        t = _draw(
            lambda shape, **kw: torch.randint(1, self.timesteps + 1, shape, **kw),
            (n_crystals,),
            generator,
            device,
            torch.int64,
        )
        noised = self._add_noise(batch.frac_coords, batch.lattice, t, batch.batch, generator)
        out = self.model(batch.atom_types, noised.frac_coords, noised.lattice, t, batch.batch)
        coord, lattice = _check_output(out, batch.num_nodes, n_crystals)
        coord, lattice = coord.to(dtype), lattice.to(dtype)
        loss_lattice = F.mse_loss(lattice, noised.lattice_noise)
        loss_coord = F.mse_loss(coord, noised.coord_target)
        loss = self.cost_lattice * loss_lattice + self.cost_coord * loss_coord
        terms = {"loss": loss, "loss_lattice": loss_lattice, "loss_coord": loss_coord}
        return terms, out, t

    def forward(self, batch: CrystalBatch, generator: torch.Generator | None = None):
        """Same as :meth:`loss` (so wrappers such as DDP see the loss as the forward)."""
        return self.loss(batch, generator)

    # ----------------------------------------------------------------- sampling
    def _step_table(self, step_lr: float, guidance_scale: float, device) -> Tensor:
        """Coefficients of every step: [T + 1, 9] float64 on ``device``, row t holding the
        corrector's (a, c) then the predictor's (a, c_F, g_F, b, q, c_L, g_L); row 0 unused.

        Computed in Python floats from the float64 schedules exactly as the unfused loop
        computed its scalars, so the fused steps see the same numbers; the noise
        coefficients are 0 at t = 1 (the last step is deterministic).
        """
        sig, lam = self.sigmas.tolist(), self.lambdas.tolist()
        betas, alphas = self.betas.tolist(), self.alphas.tolist()
        abar, post = self.alpha_bars.tolist(), self.posterior_variance.tolist()
        rows = [[0.0] * 9]
        for t in range(1, self.timesteps + 1):
            last = t == 1
            sqrt_lam = math.sqrt(lam[t])
            gamma = step_lr * (sig[t] / sig[1]) ** 2
            step = sig[t] ** 2 - sig[t - 1] ** 2
            var_f = sig[t - 1] ** 2 * step / sig[t] ** 2
            rows.append(
                [
                    gamma * sqrt_lam,
                    0.0 if last else math.sqrt(2.0 * gamma),
                    step * sqrt_lam,
                    0.0 if last else math.sqrt(var_f),
                    var_f * guidance_scale,
                    betas[t] / math.sqrt(1.0 - abar[t]),
                    math.sqrt(alphas[t]),
                    0.0 if last else math.sqrt(post[t]),
                    post[t] * guidance_scale,
                ]
            )
        return torch.tensor(rows, dtype=torch.float64, device=device)

    @torch.no_grad()
    def sample(
        self,
        atom_types: Tensor,
        num_atoms: Tensor,
        *,
        step_lr: float = 1e-5,
        generator: Generators = None,
        energy_guidance: EnergyGuidance | None = None,
        guidance_scale: float = 0.0,
        progress: bool = False,
        callback: Callable[[int, CrystalBatch], None] | None = None,
        cuda_graph: bool | str = False,
        step_backend: str = "auto",
    ) -> CrystalBatch:
        """Generate structures for given compositions by predictor-corrector sampling.

        Start: L_T ~ N(0, I), F_T ~ U[0, 1). For t = T..1 (all crystals share t), with
        s = model.coord sqrt(lambda_t) the model's score and z fresh N(0, I) noise
        (z = 0 at t = 1, so the last step is deterministic):

        1. Corrector (F only, Langevin): gamma = step_lr (sigma_t / sigma_1)^2,
           F <- (F + gamma s(F, L_t) + sqrt(2 gamma) z) mod 1. Skipped when
           step_lr == 0 (then one network evaluation per step).
        2. Predictor (second evaluation, at the corrected F):
           F <- (F + (sigma_t^2 - sigma_{t-1}^2) s + sqrt(v_t) z) mod 1 with
           v_t = sigma_{t-1}^2 (sigma_t^2 - sigma_{t-1}^2) / sigma_t^2, the
           posterior variance of the reverse VE step (sigma_0 = 0, so v_1 = 0);
           L <- (L - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t)
           + sqrt(beta~_t) z, with beta~_t the DDPM posterior variance (0 at t = 1).

        Both updates run as fused ops (:func:`dao.ops.corrector_step`,
        :func:`dao.ops.predictor_step`: one pass each, the predictor over coordinates
        and lattices of the whole batch); the noise is drawn by torch in the order
        corrector z, predictor z_F, predictor z_L, so results depend only on the
        generator.

        Energy guidance (classifier guidance with an energy, spec section 3): if
        ``energy_guidance`` is given and ``guidance_scale`` w != 0, the predictor
        step subtracts v_t w grad_F E_t from F and beta~_t w grad_L E_t from L,
        each update's own posterior variance (so none at t = 1); the gradients are
        taken at the predictor's input (corrected F, L_t) and step t.

        CUDA graphs (``cuda_graph``): the whole step (both network evaluations, the
        noise draws and the fused updates) is captured once in a
        ``torch.cuda.CUDAGraph`` on static buffers, t and the step's coefficients
        being device tensors inside the graph, and replayed T times, so sampling is
        not bound by kernel-launch latency. Requirements and fallbacks:

        * the model must be capturable: no host synchronisation in its forward
          (``.item()``, ``int(tensor)``, ``bool(tensor)``, ``nonzero``,
          ``torch.bincount`` and ``repeat_interleave`` without ``output_size`` on
          CUDA, ...); otherwise a RuntimeError says so (use ``cuda_graph=False``);
        * with energy guidance (a Python callback per step) nothing is captured: the
          eager loop runs, for ``True`` as for ``"auto"``;
        * noise comes from ``generator`` when it is one CUDA generator on the
          model's device (registered with the graph), from the device's default
          generator when it is None, otherwise from a CUDA generator seeded by one
          draw of ``generator``. Noise and start are then drawn exactly as the eager
          loop draws them, so a CUDA generator (or None) gives the eager result up to
          float rounding; a CPU generator gives a different (still reproducible) draw.
          One generator per crystal cannot feed a graph: ValueError with ``True``,
          the eager loop with ``"auto"``.

        Args:
            atom_types: [N] int64 atomic numbers, crystal after crystal.
            num_atoms: [B] int64 atoms per crystal (each >= 1); crystals of any mix
                of sizes share one call.
            step_lr: corrector step scale (1e-5 for MP-20 and MPTS-52).
            generator: None, one ``torch.Generator``, or a sequence of B generators,
                one per crystal (then each crystal's result does not depend on which
                other crystals share the batch).
            energy_guidance: ``fn(frac_coords [N, 3], lattice [B, 3, 3], t [B] int64,
                batch [N]) -> (grad_F [N, 3] or None, grad_L [B, 3, 3] or None)``,
                gradients of the time-dependent energy E_t; called with gradients
                enabled, on detached inputs.
            guidance_scale: w (the paper uses :data:`DEFAULT_GUIDANCE_SCALE` = 20).
            progress: show a tqdm bar.
            callback: ``fn(s, state)`` after every step, with ``state`` the
                :class:`CrystalBatch` at time index s = t - 1 (T - 1 down to 0).
            cuda_graph: False (eager loop), True (capture and replay; the model must
                be on a CUDA device, else ValueError) or ``"auto"`` (capture on CUDA
                when possible, see above; the eager loop elsewhere).
            step_backend: backend of the fused steps, one of
                :data:`dao.ops.diffusion_step.BACKENDS` (``"auto"``: C++ on CPU,
                Triton on CUDA).

        Returns:
            CrystalBatch with F in [0, 1), in the model's floating dtype (float32 if
            it has none), on the model's device. The model is called in whatever
            mode it is in: call ``.eval()`` first if it has dropout.
        """
        if not isinstance(atom_types, Tensor):
            atom_types = torch.as_tensor(atom_types)
        if not isinstance(num_atoms, Tensor):
            num_atoms = torch.as_tensor(num_atoms)
        if atom_types.dim() != 1 or num_atoms.dim() != 1:
            raise ValueError("atom_types must be [N] and num_atoms [B]")
        if atom_types.dtype.is_floating_point or num_atoms.dtype.is_floating_point:
            raise ValueError("atom_types and num_atoms must be integer tensors")
        if num_atoms.numel() and int(num_atoms.min()) < 1:
            raise ValueError("every crystal needs at least one atom (num_atoms >= 1)")
        if int(num_atoms.sum()) != atom_types.shape[0]:
            raise ValueError(
                f"num_atoms sums to {int(num_atoms.sum())} but atom_types has "
                f"{atom_types.shape[0]} entries"
            )
        if guidance_scale != 0.0 and energy_guidance is None:
            raise ValueError("guidance_scale is set but no energy_guidance was given")
        if step_lr < 0:
            raise ValueError(f"step_lr must be >= 0, got {step_lr}")
        if not (isinstance(cuda_graph, bool) or cuda_graph == "auto"):
            raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
        if step_backend not in STEP_BACKENDS:
            raise ValueError(f"step_backend must be one of {STEP_BACKENDS}, got {step_backend!r}")
        dtype, device = self._dtype_device()
        if cuda_graph is True and device.type != "cuda":
            raise ValueError(
                f"cuda_graph=True needs the model on a CUDA device, it is on {device}: "
                "move it with .to('cuda') or use cuda_graph=False"
            )
        if num_atoms.numel() == 0:
            return CrystalBatch.empty(dtype).to(device)
        atom_types = atom_types.to(device=device, dtype=torch.int64)
        num_atoms = num_atoms.to(device=device, dtype=torch.int64)
        n_crystals = num_atoms.shape[0]
        batch = torch.repeat_interleave(torch.arange(n_crystals, device=device), num_atoms)
        noise = _Noise(generator, num_atoms.tolist(), device, dtype)
        guided = energy_guidance is not None and guidance_scale != 0.0
        use_graph = cuda_graph is not False and device.type == "cuda" and not guided
        if use_graph and noise.per_crystal is not None:
            if cuda_graph is True:
                raise ValueError(
                    "cuda_graph=True cannot use one generator per crystal (a graph draws the "
                    "noise of the whole batch at once): pass one CUDA torch.Generator, or "
                    "use cuda_graph=False"
                )
            use_graph = False

        # One H2D copy of every step's scalars; the loop then never syncs.
        table = self._step_table(step_lr, guidance_scale if guided else 0.0, device)
        lattice = noise.normal_lattice()
        frac = noise.uniform_coords()
        common = dict(
            atom_types=atom_types,
            num_atoms=num_atoms,
            batch=batch,
            table=table,
            step_lr=step_lr,
            progress=progress,
            callback=callback,
            backend=step_backend,
        )
        # One crystal layout for all T steps: edge lists, pointers and tile schedules
        # are built once (no per-step host syncs; capturable in a CUDA graph).
        with static_batch():
            if use_graph:
                frac, lattice = self._sample_graphed(frac, lattice, generator, **common)
            else:
                guidance = energy_guidance if guided else None
                frac, lattice = self._sample_eager(frac, lattice, noise, guidance, **common)
        return CrystalBatch(atom_types, frac, lattice, num_atoms)

    def _sample_eager(
        self, frac, lattice, noise: _Noise, guidance, *, atom_types, num_atoms, batch, table,
        step_lr, progress, callback, backend,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        T, n_crystals = self.timesteps, num_atoms.shape[0]
        for t in tqdm(range(T, 0, -1), total=T, disable=not progress, desc="DAO-G sampling"):
            t_vec = torch.full((n_crystals,), t, dtype=torch.int64, device=frac.device)
            last = t == 1

            # Corrector: Langevin on F at fixed noise level t.
            if step_lr > 0.0:
                coord, _ = self._call_model(atom_types, frac, lattice, t_vec, batch)
                z = None if last else noise.normal_coords()
                frac = corrector_step(frac, coord, z, table[t, :2], backend=backend)

            # Predictor: reverse ancestral steps t -> t - 1.
            coord, eps_hat = self._call_model(atom_types, frac, lattice, t_vec, batch)
            z_f = z_l = grad_f = grad_l = None
            if not last:
                z_f, z_l = noise.normal_coords(), noise.normal_lattice()
            if guidance is not None:
                grad_f, grad_l = self._guidance(guidance, frac, lattice, t_vec, batch)
            frac, lattice = predictor_step(
                frac, coord, z_f, grad_f, lattice, eps_hat, z_l, grad_l, table[t, 2:],
                backend=backend,
            )  # fmt: skip

            if callback is not None:
                callback(t - 1, CrystalBatch(atom_types, frac, lattice, num_atoms))
        return frac, lattice

    def _graph_step(
        self, frac, lattice, gen, *, atom_types, batch, table, step_lr, backend
    ) -> tuple[Callable[[], None], Tensor, Tensor, Tensor]:
        """The step a CUDA graph captures, on static buffers (no host values inside).

        Returns ``(step, frac, lattice, t)``: the buffers start at the given state and
        t = T; each call of ``step`` does one corrector + predictor step in place and
        decrements t. Noise comes from ``gen`` (None: the default generator of the
        device) in the eager loop's order, drawn on every step, the last included,
        where its coefficients are 0. Device-agnostic, so the CPU tests check it
        against the eager loop.
        """
        device = frac.device
        state_f, state_l = frac.clone(), lattice.clone()
        t_vec = torch.full((lattice.shape[0],), self.timesteps, dtype=torch.int64, device=device)

        def noise(like: Tensor) -> Tensor:
            return torch.randn(like.shape, generator=gen, device=device, dtype=like.dtype)

        def step() -> None:
            # The step's coefficients are gathered on the device from t.
            coefs = table.index_select(0, t_vec[:1]).squeeze(0)
            f = state_f
            if step_lr > 0.0:
                coord, _ = self._call_model(atom_types, f, state_l, t_vec, batch)
                f = corrector_step(f, coord, noise(f), coefs[:2], backend=backend)
            coord, eps_hat = self._call_model(atom_types, f, state_l, t_vec, batch)
            z_f = noise(f)
            z_l = noise(state_l)
            f, lat = predictor_step(
                f, coord, z_f, None, state_l, eps_hat, z_l, None, coefs[2:], backend=backend
            )
            state_f.copy_(f)
            state_l.copy_(lat)
            t_vec.sub_(1)

        return step, state_f, state_l, t_vec

    def _sample_graphed(
        self, frac, lattice, generator, *, atom_types, num_atoms, batch, table, step_lr,
        progress, callback, backend,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        device, T = frac.device, self.timesteps
        with torch.cuda.device(device):
            here = torch.cuda.current_device()
            if isinstance(generator, torch.Generator) and _on_cuda_device(generator.device, here):
                gen = generator
            elif isinstance(generator, torch.Generator):
                seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
                gen = torch.Generator(device=device)
                gen.manual_seed(int(seed))
            else:
                gen = None  # the device's default CUDA generator, which graphs register
            rng = gen if gen is not None else torch.cuda.default_generators[here]
            step, state_f, state_l, t_vec = self._graph_step(
                frac, lattice, gen, atom_types=atom_types, batch=batch, table=table,
                step_lr=step_lr, backend=backend,
            )  # fmt: skip

            # Warm-up on a side stream (Triton compilation, library handles, allocator),
            # then capture. The warm-up advances the state and the generator: both are
            # restored, so replay i draws what eager step i would draw.
            rng_state = rng.get_state()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if gen is not None:
                graph.register_generator_state(gen)
            try:
                with torch.cuda.graph(graph):
                    step()
            except RuntimeError as exc:
                raise RuntimeError(
                    "DAOGDiffusion.sample(cuda_graph=...): the sampling step could not be "
                    "captured in a CUDA graph. The model probably synchronises with the host "
                    "in its forward (.item(), int(tensor), bool(tensor), nonzero, bincount or "
                    "repeat_interleave without output_size, ...); use cuda_graph=False"
                ) from exc
            state_f.copy_(frac)
            state_l.copy_(lattice)
            t_vec.fill_(T)
            rng.set_state(rng_state)

            for t in tqdm(range(T, 0, -1), total=T, disable=not progress, desc="DAO-G sampling"):
                graph.replay()
                if callback is not None:
                    state = CrystalBatch(atom_types, state_f.clone(), state_l.clone(), num_atoms)
                    callback(t - 1, state)
            return state_f.clone(), state_l.clone()

    @staticmethod
    def _guidance(fn, frac, lattice, t, batch) -> tuple[Tensor | None, Tensor | None]:
        with torch.enable_grad():
            grad_f, grad_l = fn(frac.detach(), lattice.detach(), t, batch)
        if grad_f is not None:
            if grad_f.shape != frac.shape:
                raise ValueError(
                    f"energy_guidance grad_F must be [N, 3] = {list(frac.shape)}, "
                    f"got {list(grad_f.shape)}"
                )
            grad_f = grad_f.detach().to(frac.dtype)
        if grad_l is not None:
            if grad_l.shape != lattice.shape:
                raise ValueError(
                    f"energy_guidance grad_L must be [B, 3, 3] = {list(lattice.shape)}, "
                    f"got {list(grad_l.shape)}"
                )
            grad_l = grad_l.detach().to(lattice.dtype)
        return grad_f, grad_l
