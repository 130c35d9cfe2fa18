"""DAO-G diffusion: schedules, the wrapped normal on the torus, training loss and sampler."""

from dao.diffusion.daog import (
    DEFAULT_GUIDANCE_SCALE,
    DAOGDiffusion,
    EnergyGuidance,
    NoisedCrystals,
    wrap_frac,
)
from dao.diffusion.schedules import (
    BetaSchedule,
    SigmaSchedule,
    cosine_alpha_bar,
    cosine_beta_schedule,
    geometric_sigma_schedule,
)
from dao.diffusion.wrapped_normal import (
    wrapped_normal_log_prob,
    wrapped_normal_prob,
    wrapped_normal_score,
    wrapped_normal_score_second_moment,
)

__all__ = [
    "DEFAULT_GUIDANCE_SCALE",
    "BetaSchedule",
    "DAOGDiffusion",
    "EnergyGuidance",
    "NoisedCrystals",
    "SigmaSchedule",
    "cosine_alpha_bar",
    "cosine_beta_schedule",
    "geometric_sigma_schedule",
    "wrap_frac",
    "wrapped_normal_log_prob",
    "wrapped_normal_prob",
    "wrapped_normal_score",
    "wrapped_normal_score_second_moment",
]
