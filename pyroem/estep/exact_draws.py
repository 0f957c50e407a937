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

**Keyed draws.** Where the only latent is one discrete site in one plate of data
points (a mixture's assignment), its posterior is a product over the data points, so
the exact posterior marginal of each point is its joint conditional: the point's
draws are taken from it by inversion, with uniforms from a generator keyed on the
seed, the restart, the E-step and the point's global row (in blocks of
:data:`KEY_BLOCK` rows) (:class:`KeyedSampler`). The draws of a data point then do
not depend on which other points the process holds, so a fit split over the ranks of
a process group (each holding a shard of the rows) draws exactly what one process
draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import infer_discrete

from pyroem.diagnostics import ChainDiagnostics
from pyroem.estep.stacked_draws import LatentProgram, StackedProgram

__all__ = ["KEY_BLOCK", "Draws", "ExactSampler", "KeyedSampler", "keyed_site", "sample_discrete"]

#: Rows per block of keyed uniforms: the generator of a block is keyed on its index.
KEY_BLOCK = 1024


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
        return independent_draws(sample_discrete(self.program, values, num_draws), num_draws)


def independent_draws(discrete: Mapping[str, torch.Tensor], num_draws: int) -> Draws:
    """:class:`Draws` of independent exact draws ``(S, *shape)`` of discrete latents."""
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


def keyed_site(program: LatentProgram, trace: Any) -> tuple[str | None, str]:
    """The site :class:`KeyedSampler` draws, or ``None`` and why it cannot.

    Keyed draws are exact when the program's only latent is one discrete site in
    exactly one plate, and every site whose log-probability reads it lies in that plate
    (so its posterior is a product over the plate's entries).

    Args:
        program: the program.
        trace: its enumerated trace at some parameters.

    Returns:
        ``(site, "")``, or ``(None, reason)`` with the construct that prevents it.
    """
    if program.latents:
        return None, (
            f"the continuous latent sites {list(program.latents)} are drawn by NUTS chains "
            "over the whole program"
        )
    if len(program.enumerated) != 1:
        return None, (
            f"the discrete latent sites {list(program.enumerated)} are drawn jointly "
            "(forward filtering, backward sampling through Pyro's enumeration), not one "
            "data point at a time"
        )
    name = program.enumerated[0]
    node = trace.nodes[name]
    plates = [frame.name for frame in node["cond_indep_stack"]]
    if len(plates) != 1 or len(program.discrete_shapes[name]) != 1:
        return None, (
            f"the discrete latent site {name!r} lies in the plates {plates}, not in exactly "
            "one plate of data points"
        )
    width = node["value"].dim()
    readers = [
        other
        for other, site in trace.nodes.items()
        if site["type"] == "sample"
        and other != name
        and isinstance(site.get("log_prob"), torch.Tensor)
        and site["log_prob"].dim() >= width
        and site["log_prob"].shape[-width] > 1
        and plates[0] not in {frame.name for frame in site["cond_indep_stack"]}
    ]
    if readers:
        return None, (
            f"the sites {readers} read the discrete latent site {name!r} from outside its "
            f"plate {plates[0]!r}, so its data points are not independent"
        )
    return name, ""


class KeyedSampler:
    """Exact draws of one discrete latent per data point, keyed on the global row (see
    the module docstring).

    Args:
        program: the program (see :func:`keyed_site`).
        site: the discrete latent site.
        support: its values, ``(K,)`` (the enumerated support, in the order of its
            posterior marginals).
        offset: the global row of this process's first row (0 in one process).
    """

    def __init__(
        self, program: LatentProgram, site: str, support: torch.Tensor, offset: int = 0
    ) -> None:
        self.program, self.site, self.support, self.offset = program, site, support, offset

    def sample(self, marginals: torch.Tensor, num_draws: int, key: tuple[int, ...]) -> Draws:
        """``num_draws`` draws of every row from its posterior ``marginals`` ``(n, K)``;
        the uniforms of global rows ``[b B, (b + 1) B)`` come from a generator seeded with
        ``(*key, b)`` (``B`` = :data:`KEY_BLOCK`), ``key`` non-negative integers."""
        rows = marginals.shape[0]
        uniforms = torch.empty(rows, num_draws, dtype=torch.float64)
        start, stop = self.offset, self.offset + rows
        for block in range(start // KEY_BLOCK, (stop - 1) // KEY_BLOCK + 1 if rows else 0):
            first = block * KEY_BLOCK
            generator = np.random.default_rng([*key, block])
            drawn = generator.random((KEY_BLOCK, num_draws))
            low, high = max(start, first), min(stop, first + KEY_BLOCK)
            uniforms[low - start : high - start] = torch.from_numpy(
                drawn[low - first : high - first]
            )
        cumulative = marginals.detach().to(torch.float64).cpu().cumsum(-1)
        cumulative = cumulative / cumulative[:, -1:]
        index = torch.searchsorted(cumulative.contiguous(), uniforms, right=True)
        index = index.clamp_(max=cumulative.shape[-1] - 1)
        values = self.support.cpu()[index].T.contiguous().to(self.support.device)
        return independent_draws({self.site: values}, num_draws)
