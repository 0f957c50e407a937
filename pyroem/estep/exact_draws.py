r"""Exact E-step draws of discrete latents: forward filtering, backward sampling.

For a program whose discrete latents Pyro can enumerate, their joint conditional
posterior :math:`p(z \mid x, θ_t)` (given the continuous latents' draws, if any) is a
product of factor tables. Pyro's :func:`~pyro.infer.infer_discrete` with temperature
1 contracts them (the forward pass of forward–backward for a ``pyro.markov`` chain,
the responsibilities of a mixture) and samples backwards, giving an **exact** draw
of every discrete latent jointly — the blocked Gibbs step with nothing left to
condition on. All draws of one E-step come from one run: the program is stacked
along an outer plate with one entry per draw (see :mod:`pyroem.estep.stacked_draws`).

The draws are independent, so their effective sample size is their number, and
R-hat does not apply: :class:`~pyroem.diagnostics.ChainDiagnostics` of an exact
E-step report ``max_rhat = nan``, both ESS equal to the number of draws and no
divergences.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import infer_discrete

from pyroem.diagnostics import ChainDiagnostics
from pyroem.estep.stacked_draws import LatentProgram, StackedProgram

__all__ = ["Draws", "ExactSampler", "sample_discrete"]


class Draws(NamedTuple):
    """The latent draws of one E-step.

    Attributes:
        continuous: continuous latent site → constrained draws
            ``(num_chains, num_draws, *shape)``.
        unconstrained: the same in the sampler's unconstrained space.
        discrete: discrete latent site → draws ``(num_chains, num_draws, *shape)``
            (``shape``: its plates' sizes).
        diagnostics: R-hat, ESS and divergences of these draws.
        divergences: divergent transitions ``(num_chains, num_draws)``.
        step_size: NUTS step size, averaged over chains (``nan`` for exact draws).
        rewarmed: chains that ran a fresh warm-up (adaptation) in this E-step.
    """

    continuous: dict[str, torch.Tensor]
    unconstrained: dict[str, torch.Tensor]
    discrete: dict[str, torch.Tensor]
    diagnostics: ChainDiagnostics
    divergences: torch.Tensor
    step_size: float
    rewarmed: int

    @property
    def num_chains(self) -> int:
        """Chains."""
        return self.diagnostics.num_chains

    @property
    def num_draws(self) -> int:
        """Draws per chain."""
        return self.diagnostics.num_draws

    def flat(self) -> dict[str, torch.Tensor]:
        """Every latent's draws with chains and draws merged, ``(S, *shape)``."""
        return {
            name: value.reshape(-1, *value.shape[2:])
            for name, value in {**self.continuous, **self.discrete}.items()
        }


def sample_discrete(
    program: LatentProgram,
    values: Mapping[str, torch.Tensor],
    num_draws: int,
    continuous: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Exact joint draws of every discrete latent from ``p(z | x, θ[, continuous])``.

    Args:
        program: the program.
        values: the parameters θ.
        num_draws: ``S``.
        continuous: optional continuous latent draws ``(S, *shape)`` to condition on,
            one per discrete draw.

    Returns:
        Discrete site → draws ``(S, *shape)`` (``shape``: its plates' sizes).
    """
    stacked = StackedProgram(program, continuous or {}, num_draws)
    sampler = infer_discrete(
        stacked.runnable(values),
        first_available_dim=-stacked.max_plate_nesting - 1,
        temperature=1,
    )
    with poutine.block(), pyro.validation_enabled(False), torch.no_grad():
        trace = poutine.trace(sampler).get_trace(*program.model_args, **program.model_kwargs)
    nesting = stacked.max_plate_nesting
    draws = {}
    for name in program.enumerated:
        value = trace.nodes[name]["value"]
        value = value.reshape(*(1,) * (nesting - value.dim()), *value.shape)
        value = value.expand(num_draws, *value.shape[1:])
        draws[name] = value.reshape(num_draws, *program.discrete_shapes[name])
    return draws


class ExactSampler:
    """E-steps of a program whose latents are all discrete: independent exact draws.

    Args:
        program: the program (no continuous latents).
    """

    def __init__(self, program: LatentProgram) -> None:
        self.program = program

    def sample(self, values: Mapping[str, torch.Tensor], num_draws: int) -> Draws:
        """``num_draws`` independent draws of every discrete latent at θ = ``values``."""
        discrete = sample_discrete(self.program, values, num_draws)
        diagnostics = ChainDiagnostics(
            max_rhat=math.nan,
            min_ess_bulk=float(num_draws),
            min_ess_tail=float(num_draws),
            num_divergences=0,
            num_chains=1,
            num_draws=num_draws,
        )
        return Draws(
            continuous={},
            unconstrained={},
            discrete={name: value.unsqueeze(0) for name, value in discrete.items()},
            diagnostics=diagnostics,
            divergences=torch.zeros(1, num_draws, dtype=torch.bool),
            step_size=math.nan,
            rewarmed=0,
        )
