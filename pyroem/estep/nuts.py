r"""E-step draws of continuous latents: Pyro's NUTS, warm-started across EM iterations.

The target of E-step ``t`` is :math:`p(b \mid x; θ_t) \propto \sum_z p(x, z, b; θ_t)`:
the continuous latents ``b`` given the current parameters, discrete latents ``z``
summed out exactly inside the potential (the contraction MAP-EM uses,
:func:`~pyroem.estep.program.log_joint_terms`), in an unconstrained space
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

Every chain, here and in full-Bayes NUTS (:mod:`pyroem.engines.bayes`), is driven by
:class:`NUTSChain`. Chains run one after another in this process. The draws' R-hat,
bulk and tail ESS (computed by ArviZ, :func:`pyroem.diagnostics.chain_diagnostics`)
and divergences are returned with them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyro
import torch
from pyro.infer.mcmc import NUTS

from pyroem.diagnostics import chain_diagnostics
from pyroem.errors import FitFileError, SpecError
from pyroem.estep.exact_draws import Draws, sample_discrete
from pyroem.estep.program import log_joint_terms
from pyroem.estep.stacked_draws import LatentProgram
from pyroem.fits.checkpoint import copied
from pyroem.model.transforms import constrain, unconstraining

__all__ = ["NUTSChain", "NUTSSampler"]


class _RecordingNUTS(NUTS):
    """Pyro's NUTS, recording the statistics of every transition (ArviZ's names):
    leapfrog steps, tree depth, mean acceptance probability, divergence, energy."""

    def sample(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._leaves = 0
        self._accept_sum = 0.0
        self._diverged = False
        self._depth = 0
        self._nesting = 0
        self._energy = math.nan
        step_size = self.step_size
        z = super().sample(params)
        potential = self._fetch_from_cache()[1]
        self.last_stats = {
            "diverging": self._diverged,
            "step_size": float(step_size),
            "tree_depth": self._depth,
            "n_steps": self._leaves,
            "acceptance_rate": self._accept_sum / max(self._leaves, 1),
            "energy": self._energy,
            "lp": -float(potential) if potential is not None else math.nan,
        }
        return z

    def _sample_r(self, name: str) -> Any:
        r, r_unscaled = super()._sample_r(name)
        potential = self._fetch_from_cache()[1]
        self._energy = float(self._kinetic_energy(r_unscaled) + potential)
        return r, r_unscaled

    def _build_tree(self, *args: Any) -> Any:
        if self._nesting == 0:
            self._depth += 1
        self._nesting += 1
        try:
            return super()._build_tree(*args)
        finally:
            self._nesting -= 1

    def _build_basetree(self, *args: Any) -> Any:
        tree = super()._build_basetree(*args)
        self._leaves += 1
        self._accept_sum += float(tree.sum_accept_probs)
        self._diverged = self._diverged or bool(tree.diverging)
        return tree


class NUTSChain:
    """One chain of Pyro's NUTS on a potential over unconstrained values, driven
    transition by transition: the NUTS driver of full Bayes and of MCMC-EM.

    Args:
        potential: ``unconstrained values → -log density`` (Jacobian included).
        initial: the starting point (unconstrained).
        target_accept_prob: NUTS's target acceptance probability.
        max_tree_depth: NUTS's largest tree depth.
        full_mass: adapt a dense mass matrix instead of a diagonal one.
    """

    def __init__(
        self,
        potential: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        initial: dict[str, torch.Tensor],
        *,
        target_accept_prob: float,
        max_tree_depth: int,
        full_mass: bool,
    ) -> None:
        self.kernel = _RecordingNUTS(
            potential_fn=potential,
            target_accept_prob=target_accept_prob,
            max_tree_depth=max_tree_depth,
            full_mass=full_mass,
        )
        self.state = initial
        self.adapted = False

    def checkpoint_state(self) -> dict[str, Any]:
        """For checkpoints: the chain's state and, once adapted, its step size, mass
        matrix and transition count (copies)."""
        saved: dict[str, Any] = {"state": copied(self.state), "adapted": self.adapted}
        if self.adapted:
            adapter = self.kernel.mass_matrix_adapter
            saved["kernel"] = {
                "step_size": self.kernel.step_size,
                "t": self.kernel._t,
                "warmup_steps": self.kernel._warmup_steps,
                "inverse_mass_matrix": copied(adapter._inverse_mass_matrix),
                "mass_matrix_sqrt": copied(adapter._mass_matrix_sqrt),
                "mass_matrix_sqrt_inverse": copied(adapter._mass_matrix_sqrt_inverse),
            }
        return saved

    def load_checkpoint_state(self, saved: dict[str, Any]) -> None:
        """Set the chain to a :meth:`checkpoint_state` (an adapted kernel is set up at the
        saved state, then given the saved adaptation)."""
        self.state, self.adapted = dict(saved["state"]), bool(saved["adapted"])
        if not self.adapted:
            return
        kernel = saved["kernel"]
        self.kernel.cleanup()
        self.kernel.initial_params = self.state
        self.kernel.setup(int(kernel["warmup_steps"]))
        self.kernel._t = int(kernel["t"])
        self.kernel._adapter.step_size = kernel["step_size"]
        adapter = self.kernel.mass_matrix_adapter
        adapter._inverse_mass_matrix = dict(kernel["inverse_mass_matrix"])
        adapter._mass_matrix_sqrt = dict(kernel["mass_matrix_sqrt"])
        adapter._mass_matrix_sqrt_inverse = dict(kernel["mass_matrix_sqrt_inverse"])

    def warm_up(self, steps: int, on_step: Callable[[NUTSChain], None] | None = None) -> None:
        """Adapt step size and mass matrix afresh from the current state over ``steps``
        transitions (Pyro's windowed adaptation)."""
        self.kernel.cleanup()
        self.kernel.initial_params = self.state
        self.kernel.setup(steps)
        self.run(steps, on_step)
        self.adapted = True

    def run(
        self, steps: int, on_step: Callable[[NUTSChain], None] | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """``steps`` transitions; their states ``(steps, *shape)`` and statistics ``(steps,)``."""
        kept: dict[str, list[torch.Tensor]] = {name: [] for name in self.state}
        stats: dict[str, list[float]] = {}
        for _ in range(steps):
            self.state = self.kernel.sample(self.state)
            for name, value in self.state.items():
                kept[name].append(value.detach().clone())
            for key, stat in self.kernel.last_stats.items():
                stats.setdefault(key, []).append(stat)
            if on_step is not None:
                on_step(self)
        draws = {name: torch.stack(values) for name, values in kept.items() if values}
        return draws, {key: np.asarray(values) for key, values in stats.items()}


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
        self.transforms = {
            name: unconstraining(name, site.support) for name, site in program.latent_sites.items()
        }
        self._jit_compile = jit_compile
        self._compiled: Any = None
        self._chains = [
            NUTSChain(
                self.potential,
                self._initial_point(),
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                full_mass=full_mass,
            )
            for _ in range(num_chains)
        ]

    def _log_density(self, *tensors: torch.Tensor) -> torch.Tensor:
        """``log p(x, b; θ) + log|db/du|`` from the unconstrained latents ``u`` and θ
        (in that order), discrete latents summed out by enumeration."""
        latents = self.program.latents
        unconstrained = dict(zip(latents, tensors[: len(latents)], strict=True))
        theta = dict(zip(self._parameters, tensors[len(latents) :], strict=True))
        constrained, jacobian = constrain(self.transforms, unconstrained)
        trace = self.program.trace({**theta, **constrained})
        log_likelihood, log_prior = log_joint_terms(self.program, trace)
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
        ``init_to_uniform``), redrawn until the log density is finite; in the program's
        dtype, so that the chains run in it whatever torch's default dtype is."""
        sites = self.program.latent_sites
        shapes = {name: self.transforms[name].forward_shape(sites[name].shape) for name in sites}
        dtype = self.program.dtype
        for _ in range(100):
            point = {name: 4 * torch.rand(shape, dtype=dtype) - 2 for name, shape in shapes.items()}
            with torch.no_grad():
                if bool(torch.isfinite(self.potential(point))):
                    return point
        raise SpecError(
            "no starting point of the latents with a finite log density was found at the "
            "starting parameters; pass other init values"
        )

    def checkpoint_state(self) -> list[dict[str, Any]]:
        """For checkpoints: every chain's :meth:`NUTSChain.checkpoint_state`."""
        return [chain.checkpoint_state() for chain in self._chains]

    def load_checkpoint_state(self, saved: list[dict[str, Any]]) -> None:
        """Set every chain to its saved state."""
        if len(saved) != len(self._chains):
            raise FitFileError(
                f"the checkpoint holds {len(saved)} chains; this fit runs {len(self._chains)}"
            )
        for chain, state in zip(self._chains, saved, strict=True):
            chain.load_checkpoint_state(state)

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
            for index, chain in enumerate(self._chains):
                if not chain.adapted:
                    chain.warm_up(self.warmup_steps)
                    rewarmed += 1
                else:
                    chain.kernel.clear_cache()
                    chain.run(self.discard_steps)
                draws, stats = chain.run(per_chain)
                divergent[index] = torch.as_tensor(stats["diverging"], dtype=torch.bool)
                for name in kept:
                    kept[name].append(draws[name])
                step_sizes.append(float(chain.kernel.step_size))
                chain.adapted = not bool(divergent[index].any())
        unconstrained = {name: torch.stack(value) for name, value in kept.items()}
        continuous, _ = constrain(self.transforms, unconstrained)
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
