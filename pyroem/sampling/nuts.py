r"""E-step draws of continuous latents: Pyro's NUTS, warm-started across EM iterations.

The target of E-step ``t`` is :math:`p(b \mid x; θ_t) \propto \sum_z p(x, z, b; θ_t)`:
the continuous latents ``b`` given the current parameters, discrete latents ``z``
summed out exactly inside the potential (the contraction MAP-EM uses,
:func:`~pyroem.program.posterior.log_joint_terms`), in an unconstrained space
(Pyro's bijection for each support). θ is an argument of the log density, read from
the current parameters at every call, so one potential — compiled once with
``jit_compile=True`` — serves every iteration.

Each chain is one :class:`~pyro.infer.mcmc.NUTS` kernel driven step by step:

- the **first** E-step runs ``warmup_steps`` of Pyro's windowed adaptation (step
  size by dual averaging, diagonal or dense mass matrix) from a random point
  (Pyro's ``init_to_uniform``), then keeps the draws;
- **later** E-steps continue each chain from its last state with its adapted step
  size and mass matrix: the parameters moved by one M-step, so the posterior moved
  little, and ``discard_steps`` transitions carry the chain to the new target
  before the draws are kept;
- a chain that had a divergent transition in an E-step adapts afresh
  (``warmup_steps`` from its current state) at the start of the next one.

Chains run one after another in this process. The draws' R-hat, bulk and tail ESS
(computed by ArviZ, :func:`pyroem.diagnostics.chain_diagnostics`) and divergences are
returned with them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import pyro
import torch
from pyro.infer.mcmc import NUTS
from torch.distributions import biject_to
from torch.distributions.transforms import Transform

from pyroem.diagnostics import chain_diagnostics
from pyroem.errors import NotSupportedError, SpecError
from pyroem.program.model import sample_sites
from pyroem.program.posterior import log_joint_terms
from pyroem.sampling.exact import Draws, sample_discrete
from pyroem.sampling.stacked import LatentProgram

__all__ = ["NUTSSampler"]


class NUTSSampler:
    """NUTS chains over the continuous latents of a program, θ held fixed per E-step.

    Args:
        program: the program (with continuous latents).
        values: the starting parameters θ_0.
        num_chains: chains.
        warmup_steps: adaptation steps of a chain's first E-step (and of an E-step
            after a divergence).
        discard_steps: transitions discarded at the start of every later E-step.
        target_accept_prob: NUTS's target acceptance probability.
        max_tree_depth: NUTS's largest tree depth.
        full_mass: adapt a dense mass matrix instead of a diagonal one.
        jit_compile: compile the log density with ``torch.jit.trace`` (θ an input of
            the compiled function, so one compilation serves every iteration).

    Raises:
        NotSupportedError: a latent's support has no bijection from an unconstrained space.
        SpecError: no starting point with a finite log density was found.
    """

    def __init__(
        self,
        program: LatentProgram,
        values: Mapping[str, torch.Tensor],
        *,
        num_chains: int,
        warmup_steps: int,
        discard_steps: int,
        target_accept_prob: float,
        max_tree_depth: int,
        full_mass: bool,
        jit_compile: bool,
    ) -> None:
        self.program = program
        self.num_chains = num_chains
        self.warmup_steps = warmup_steps
        self.discard_steps = discard_steps
        self._values = {name: value.detach() for name, value in values.items()}
        self._parameters = list(program.params)
        self.transforms: dict[str, Transform] = {}
        for name, site in program.latent_sites.items():
            try:
                self.transforms[name] = biject_to(site.support).inv
            except NotImplementedError as err:
                raise NotSupportedError(
                    f"latent {name!r} has support {site.support}, which has no bijection from "
                    "an unconstrained space, so NUTS cannot move on it; reparametrise the site"
                ) from err
        self._jit_compile = jit_compile
        self._compiled: Any = None
        self._states = [self._initial_point() for _ in range(num_chains)]
        self._kernels = [
            NUTS(
                potential_fn=self.potential,
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                full_mass=full_mass,
            )
            for _ in range(num_chains)
        ]
        self._adapted = [False] * num_chains
        self._transitions = [0] * num_chains
        self._seen = [0] * num_chains

    def _log_density(self, *tensors: torch.Tensor) -> torch.Tensor:
        """``log p(x, b; θ) + log|db/du|`` from the unconstrained latents ``u`` and θ
        (in that order), discrete latents summed out by enumeration."""
        latents = self.program.latents
        unconstrained = dict(zip(latents, tensors[: len(latents)], strict=True))
        theta = dict(zip(self._parameters, tensors[len(latents) :], strict=True))
        constrained = self.constrain(unconstrained)
        trace = self.program.trace({**theta, **constrained})
        log_probs = {name: site["unscaled_log_prob"] for name, site in sample_sites(trace)}
        log_likelihood, log_prior = log_joint_terms(self.program, trace, log_probs)
        jacobian = self.log_abs_det_jacobian(unconstrained, 0)
        return log_likelihood + log_prior + jacobian

    def potential(self, unconstrained: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """NUTS's potential energy ``-log p(x, b(u); θ) - log|db/du|`` at the current θ."""
        tensors = [unconstrained[name] for name in self.program.latents]
        tensors += [self._values[name] for name in self._parameters]
        if not self._jit_compile:
            return -self._log_density(*tensors)
        if self._compiled is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._compiled = torch.jit.trace(
                    self._log_density, [t.detach() for t in tensors], check_trace=False
                )
        return -self._compiled(*tensors)

    def _initial_point(self) -> dict[str, torch.Tensor]:
        """A random start, uniform on (-2, 2) in the unconstrained space (Pyro's
        ``init_to_uniform``), redrawn until the log density is finite."""
        shapes = {
            name: self.transforms[name](torch.zeros(site.shape)).shape
            for name, site in self.program.latent_sites.items()
        }
        for _ in range(100):
            point = {name: 4 * torch.rand(shape) - 2 for name, shape in shapes.items()}
            with torch.no_grad():
                if bool(torch.isfinite(self.potential(point))):
                    return point
        raise SpecError(
            "no starting point of the latents with a finite log density was found at the "
            "starting parameters; pass other init values"
        )

    def constrain(self, unconstrained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map unconstrained latent values to their supports."""
        return {name: self.transforms[name].inv(value) for name, value in unconstrained.items()}

    def log_abs_det_jacobian(
        self, unconstrained: Mapping[str, torch.Tensor], num_dims: int
    ) -> torch.Tensor:
        """``log |d constrained / d unconstrained|`` summed over all but the leading
        ``num_dims`` dimensions."""
        total = torch.zeros(())
        for name, value in unconstrained.items():
            forward = self.transforms[name].inv
            term = forward.log_abs_det_jacobian(value, forward(value))
            total = total + term.reshape(*term.shape[:num_dims], -1).sum(-1)
        return total

    def _step(self, chain: int, state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], bool]:
        """One transition of a chain; whether it diverged (after warm-up)."""
        kernel = self._kernels[chain]
        state = kernel.sample(state)
        self._transitions[chain] += 1
        if self._transitions[chain] <= self.warmup_steps:
            return state, False
        divergences = len(kernel.diagnostics()["divergences"])
        diverged = divergences > self._seen[chain]
        self._seen[chain] = divergences
        return state, diverged

    def _warm_up(self, chain: int) -> None:
        kernel = self._kernels[chain]
        kernel.cleanup()
        kernel.initial_params = self._states[chain]
        kernel.setup(self.warmup_steps)
        self._transitions[chain] = 0
        self._seen[chain] = 0
        state = self._states[chain]
        for _ in range(self.warmup_steps):
            state, _ = self._step(chain, state)
        self._states[chain] = state
        self._adapted[chain] = True

    def sample(self, values: Mapping[str, torch.Tensor], num_draws: int) -> Draws:
        """Draws of the latents at θ = ``values``: ``ceil(num_draws / num_chains)`` per chain.

        Continuous latents come from the chains; discrete latents, if any, are then
        drawn exactly given each continuous draw (:func:`sample_discrete`).
        """
        self._values.update({name: value.detach() for name, value in values.items()})
        per_chain = math.ceil(num_draws / self.num_chains)
        kept: dict[str, list[torch.Tensor]] = {name: [] for name in self.program.latents}
        divergent = torch.zeros(self.num_chains, per_chain, dtype=torch.bool)
        step_sizes = []
        rewarmed = 0
        with pyro.validation_enabled(False):
            for chain in range(self.num_chains):
                kernel = self._kernels[chain]
                if not self._adapted[chain]:
                    self._warm_up(chain)
                    rewarmed += 1
                    discard = 0
                else:
                    kernel.clear_cache()
                    discard = self.discard_steps
                state = self._states[chain]
                for _ in range(discard):
                    state, _ = self._step(chain, state)
                chain_draws: dict[str, list[torch.Tensor]] = {name: [] for name in kept}
                for draw in range(per_chain):
                    state, diverged = self._step(chain, state)
                    divergent[chain, draw] = diverged
                    for name in kept:
                        chain_draws[name].append(state[name].detach())
                self._states[chain] = state
                for name in kept:
                    kept[name].append(torch.stack(chain_draws[name]))
                step_sizes.append(float(kernel.step_size))
                if bool(divergent[chain].any()):
                    self._adapted[chain] = False
        unconstrained = {name: torch.stack(value) for name, value in kept.items()}
        continuous = self.constrain(unconstrained)
        discrete = {}
        if self.program.enumerated:
            flat = {name: value.flatten(0, 1) for name, value in continuous.items()}
            drawn = sample_discrete(self.program, values, self.num_chains * per_chain, flat)
            discrete = {
                name: value.reshape(self.num_chains, per_chain, *value.shape[1:])
                for name, value in drawn.items()
            }
        diagnostics = chain_diagnostics(continuous, divergent)
        return Draws(
            continuous=continuous,
            unconstrained=unconstrained,
            discrete=discrete,
            diagnostics=diagnostics,
            divergences=divergent,
            step_size=sum(step_sizes) / len(step_sizes),
            rewarmed=rewarmed,
        )
