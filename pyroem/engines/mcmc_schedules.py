r"""Schedules of Monte Carlo EM: how many draws, how E-steps combine, when to stop.

Every iteration ``t`` maximises a Monte Carlo objective built from the draws of the
E-steps so far,

.. math:: Q_t(θ) = (1 - γ_t)\, Q_{t-1}(θ) + γ_t\, \hat Q_t(θ),\qquad
          \hat Q_t(θ) = \frac1{S_t} \sum_{s=1}^{S_t} \log p(x, z_s; θ),\quad
          z_s \sim p(z \mid x; θ_{t-1}),

and the two schedules differ in :math:`S_t` and :math:`γ_t`:

- ``"mcem"`` — Monte Carlo EM: :math:`γ_t = 1` (each E-step stands alone) and the
  number of draws grows when the M-step's gain is lost in Monte Carlo noise. After
  M-step ``t`` the gain :math:`ΔQ_t = Q_t(θ_t) - Q_t(θ_{t-1})` has a standard error
  ``se`` (below); if the one-sided 75% lower bound :math:`ΔQ_t - 0.674\,\mathrm{se}`
  is negative — the step cannot be told from noise — then
  :math:`S_{t+1} = \lceil g\,S_t \rceil` (``sample_growth`` g, capped at
  ``max_samples``), otherwise :math:`S_{t+1} = S_t` (the ascent test of Caffo, Jank
  and Jones, 2005, with their α = 0.25).
- ``"saem"`` — stochastic approximation EM (Delyon, Lavielle and Moulines, 1999):
  :math:`S_t` fixed; :math:`γ_t = 1` during a burn-in of :math:`K_0` iterations, then
  :math:`γ_t = (t - K_0)^{-a}` (``step_exponent`` a ∈ (1/2, 1], 1 by default: an
  equally weighted average of every post-burn-in E-step). With ``burn_in="auto"``
  the burn-in ends after the first step that fails the ascent test above. Because
  :math:`Q` is linear in the weights of the draws, averaging :math:`Q` is averaging
  the sufficient statistics the closed-form M-steps read: the SAEM of the paper.

**Stopping.** The standard error of :math:`ΔQ_t` comes from the per-draw gains
:math:`Λ_s = \log p(x, z_s; θ_t) - \log p(x, z_s; θ_{t-1})` on the newest draws:
:math:`\mathrm{se} = \mathrm{sd}(Λ) / \sqrt{\mathrm{ESS}(Λ)} \cdot
\sqrt{\sum_i w_i^2 S_t / S_i}`, with :math:`w_i` the weight of E-step ``i`` in
:math:`Q_t` (1 for MCEM) and ESS the draws' number for exact draws, ArviZ's bulk ESS
of Λ over the chains for NUTS. The run has converged when the one-sided 95% upper
bound :math:`ΔQ_t + 1.645\,\mathrm{se}` falls below ``tol × N`` (``N`` observations):
with 95% confidence the M-step gains less than ``tol`` per observation. SAEM may stop
only after its burn-in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from pyroem.estep.exact_draws import Draws
from pyroem.estep.stacked_draws import LatentProgram, StackedProgram, table_weights
from pyroem.model.program import ProgramModel

__all__ = [
    "ASCENT_Z",
    "STOP_Z",
    "Gain",
    "MCEMSchedule",
    "MonteCarloQ",
    "SAEMSchedule",
]

#: One-sided 75% normal quantile: the ascent test (Caffo, Jank and Jones, 2005, α = 0.25).
ASCENT_Z = 0.6745
#: One-sided 95% normal quantile: the stopping test.
STOP_Z = 1.6449

# E-steps whose weight in Q fell below this fraction of the largest are dropped.
_NEGLIGIBLE = 1e-8


class Gain(NamedTuple):
    """The M-step's gain on the Monte Carlo objective.

    Attributes:
        delta: :math:`ΔQ_t = Q_t(θ_t) - Q_t(θ_{t-1})`.
        se: its Monte Carlo standard error.
    """

    delta: float
    se: float

    @property
    def lower(self) -> float:
        """Lower bound of the ascent test."""
        return self.delta - ASCENT_Z * self.se

    @property
    def upper(self) -> float:
        """Upper bound of the stopping test."""
        return self.delta + STOP_Z * self.se


class MCEMSchedule:
    """Monte Carlo EM with a growing number of draws (see the module docstring).

    Args:
        num_samples: draws of the first E-step.
        max_samples: the most draws of an E-step.
        growth: factor applied to the draws when a step is lost in noise.
    """

    name = "mcem"

    def __init__(self, num_samples: int, max_samples: int, growth: float) -> None:
        self.num_samples = num_samples
        self.max_samples = max_samples
        self.growth = growth

    def step_size(self, iteration: int) -> float:
        """γ_t of M-step ``iteration`` (counted from 1)."""
        return 1.0

    def update(self, iteration: int, gain: Gain) -> None:
        """Grow the draws when the gain of M-step ``iteration`` is within noise."""
        if gain.lower < 0:
            grown = math.ceil(self.growth * self.num_samples)
            self.num_samples = min(self.max_samples, grown)

    def may_stop(self, iteration: int) -> bool:
        """Whether the stopping test applies after M-step ``iteration``."""
        return True


class SAEMSchedule:
    """Stochastic approximation EM (see the module docstring).

    Args:
        num_samples: draws of every E-step.
        burn_in: iterations with step size 1, or ``None`` to end the burn-in after
            the first step within Monte Carlo noise.
        exponent: ``a`` in :math:`γ_t = (t - K_0)^{-a}`.
    """

    name = "saem"

    def __init__(self, num_samples: int, burn_in: int | None, exponent: float) -> None:
        self.num_samples = num_samples
        self.exponent = exponent
        self.burn_in_end: int | None = burn_in
        self._auto = burn_in is None

    def step_size(self, iteration: int) -> float:
        """γ_t of M-step ``iteration`` (counted from 1)."""
        if self.burn_in_end is None or iteration <= self.burn_in_end:
            return 1.0
        return float((iteration - self.burn_in_end) ** -self.exponent)

    def update(self, iteration: int, gain: Gain) -> None:
        """End an automatic burn-in at the first step within noise."""
        if self._auto and self.burn_in_end is None and gain.lower < 0:
            self.burn_in_end = iteration

    def may_stop(self, iteration: int) -> bool:
        """Whether the stopping test applies after M-step ``iteration``."""
        return self.burn_in_end is not None and iteration > self.burn_in_end


class _Kept(NamedTuple):
    """One E-step's draws in Q, with their weight."""

    continuous: dict[str, torch.Tensor]
    discrete: dict[str, torch.Tensor]
    weight: float


class MonteCarloQ:
    r"""The Monte Carlo objective :math:`Q_t = \sum_i w_i \hat Q_i` of the E-steps so far.

    For a program whose latents are all discrete, :math:`Q_t` is the table weights of
    the enumerated program (:func:`~pyroem.estep.stacked_draws.table_weights`), averaged
    with the schedule's weights as they come: a fixed amount of memory. With
    continuous latents it keeps the draws of every E-step whose weight is not
    negligible (memory grows with the post-burn-in iterations of SAEM) and stacks them
    into one program for the M-step.

    Args:
        program: the program.
    """

    def __init__(self, program: LatentProgram) -> None:
        self.program = program
        self._weights: dict[str, torch.Tensor] = {}
        self._kept: list[_Kept] = []
        self._sizes: list[tuple[float, int]] = []

    def add(self, draws: Draws, gamma: float, trace: object) -> None:
        """Fold in one E-step: :math:`Q_t = (1 - γ) Q_{t-1} + γ \\hat Q`.

        Args:
            draws: the E-step's draws.
            gamma: the step size γ.
            trace: the enumerated program's trace at the E-step's parameters (read
                for its table shapes when the latents are all discrete).
        """
        flat = draws.flat()
        num_draws = next(iter(flat.values())).shape[0]
        self._sizes = [(weight * (1 - gamma), size) for weight, size in self._sizes]
        self._sizes.append((gamma, num_draws))
        largest = max(weight for weight, _ in self._sizes)
        self._sizes = [(w, n) for w, n in self._sizes if w > _NEGLIGIBLE * largest]
        if not self.program.latents:
            uniform = torch.full((num_draws,), 1.0 / num_draws)
            new = table_weights(self.program, trace, uniform, flat)  # type: ignore[arg-type]
            self._weights = {
                name: value
                if gamma == 1 or name not in self._weights
                else (1 - gamma) * self._weights[name] + gamma * value
                for name, value in new.items()
            }
            return
        continuous = {name: flat[name] for name in self.program.latents}
        discrete = {name: flat[name] for name in self.program.enumerated}
        kept = [entry._replace(weight=entry.weight * (1 - gamma)) for entry in self._kept]
        kept.append(_Kept(continuous, discrete, gamma))
        self._kept = [entry for entry in kept if entry.weight > _NEGLIGIBLE * largest]

    def noise_factor(self) -> float:
        r""":math:`\sqrt{\sum_i w_i^2 S_t / S_i}`: the standard error of a gain on
        :math:`Q_t` relative to one on the newest E-step alone."""
        newest = self._sizes[-1][1]
        return math.sqrt(sum(weight**2 * newest / size for weight, size in self._sizes))

    def target(
        self, values: Mapping[str, torch.Tensor]
    ) -> tuple[ProgramModel, dict[str, torch.Tensor]]:
        """The program and table weights whose weighted log-probabilities are :math:`Q_t`.

        Args:
            values: current parameters (to run the stacked program once for its shapes).

        Returns:
            ``(program, weights)`` for the MAP-EM M-steps.
        """
        if not self.program.latents:
            return self.program, self._weights
        continuous = {
            name: torch.cat([entry.continuous[name] for entry in self._kept])
            for name in self.program.latents
        }
        discrete = {
            name: torch.cat([entry.discrete[name] for entry in self._kept])
            for name in self.program.enumerated
        }
        draw_weights = torch.cat(
            [
                torch.full((entry.continuous[self.program.latents[0]].shape[0],), entry.weight)
                / entry.continuous[self.program.latents[0]].shape[0]
                for entry in self._kept
            ]
        )
        draw_weights = draw_weights / draw_weights.sum()
        stacked = StackedProgram(self.program, continuous)
        trace = stacked.trace(values)
        return stacked, table_weights(stacked, trace, draw_weights, discrete)
