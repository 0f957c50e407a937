r"""MCMC-EM: EM whose E-step draws the latent variables instead of summing them out.

``method="mcmc-em"`` approximates

.. math:: Q(θ; θ_t) = E_{p(z \mid x; θ_t)}[\log p(x, z; θ)]
          \approx \frac1S \sum_{s=1}^S \log p(x, z_s; θ),\qquad z_s \sim p(z \mid x; θ_t),

the variant for models whose E-step has no closed form (continuous latent variables)
and a check on the exact ones:

- **E-step** (:mod:`pyroem.estep.exact_draws`, :mod:`pyroem.estep.nuts`): discrete
  latents are drawn exactly from their joint conditional posterior (forward
  filtering, backward sampling through Pyro's enumeration; where the one latent is a
  discrete site per data point, such as a mixture's assignment, by inversion of each
  point's posterior with uniforms keyed on its row, see
  :class:`~pyroem.estep.exact_draws.KeyedSampler`); continuous latents by
  Pyro's NUTS with θ held fixed, chains warm-started from the previous iteration's
  state, step size and mass matrix, discrete latents then drawn exactly given each
  draw.
- **M-step**: the MAP-EM M-steps — recognised closed forms, L-BFGS on Q for the
  other parameters — applied to the Monte Carlo Q (:mod:`pyroem.estep.stacked_draws`).
- **Schedules** (:mod:`pyroem.engines.mcmc_schedules`): Monte Carlo EM with a growing
  number of draws, or SAEM; convergence is declared by a test on the M-step's gain
  that accounts for Monte Carlo noise.

**Processes.** Inside a ``torch.distributed`` process group each rank holds a shard of
the data points and draws their latents only; this is written for programs whose one
latent is a discrete site per data point (a mixture's assignment), drawn from
generators keyed on the global row (:class:`~pyroem.estep.exact_draws.KeyedSampler`,
also used in one process), so the ranks draw exactly what one process draws. The
closed forms sum their Monte Carlo statistics over the ranks (float64), and the
objective, the M-step's gain and the per-draw gains the schedule reads are summed over
the ranks too (the prior once): step sizes, draw counts and stopping are the same on
every rank. Other latents (NUTS-drawn continuous ones, chains and other jointly drawn
discrete ones) are refused there with :class:`~pyroem.errors.NotSupportedError`.

Parameters θ are as for MAP-EM: ``pyro.param`` sites (maximum likelihood) and
global latent sample sites (MAP under their prior). Latent variables are the
discrete sites, the continuous sample sites local to the data, and the sites named
by the ``latents`` option.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyroem.diagnostics import ChainDiagnostics, chain_diagnostics, chain_problems
from pyroem.em import EMResult, EMRun, Engine, EStepResult, Iteration, MStepResult, run_em
from pyroem.engines.distributed import LOCAL, Collective
from pyroem.engines.mcmc_schedules import Gain, MCEMSchedule, MonteCarloQ, SAEMSchedule
from pyroem.engines.program_map import (
    block_order,
    broadcast_values,
    check_sharded,
    closed_form_sweep,
    counted_once,
    initial_values,
    needs_trace,
    num_observations,
    program_init,
    resolve_seed,
    summed_over_ranks,
)
from pyroem.errors import MCMCWarning, NotSupportedError, SpecError
from pyroem.estep.exact_draws import Draws, ExactSampler, KeyedSampler, keyed_site
from pyroem.estep.nuts import NUTSSampler
from pyroem.estep.program import expected_log_joint, posterior
from pyroem.estep.stacked_draws import (
    LatentProgram,
    StackedProgram,
    check_stackable,
    per_draw_log_joint,
)
from pyroem.fits.checkpoint import copied
from pyroem.fits.program import ProgramFit
from pyroem.model.program import ProgramModel
from pyroem.model.transforms import constrain
from pyroem.mstep.gradient import gradient_m_step
from pyroem.mstep.recognised import ClosedForm, recognise
from pyroem.options import check_integer, with_defaults
from pyroem.outputs.pointwise import pointwise_log_likelihood, pointwise_log_likelihood_draws

__all__ = ["MCMC_EM_OPTIONS", "MCMCEMFit", "fit_mcmc_em"]

#: The options of ``method="mcmc-em"`` and their defaults.
MCMC_EM_OPTIONS: dict[str, Any] = {
    "schedule": "saem",
    "num_samples": 100,
    "max_samples": 20000,
    "sample_growth": 1.5,
    "burn_in": "auto",
    "step_exponent": 1.0,
    "num_chains": 4,
    "warmup_steps": 200,
    "discard_steps": 5,
    "final_draws": 1000,
    "target_accept_prob": 0.8,
    "max_tree_depth": 10,
    "full_mass": False,
    "jit_compile": False,
    "latents": (),
    "m_step": "auto",
    "gradient_steps": 50,
    "log_likelihood_samples": 1000,
}
_SCHEDULES = ("mcem", "saem")
_M_STEPS = ("auto", "gradient")
# Student-t degrees of freedom of the importance-sampling proposal for log p(x | θ).
_PROPOSAL_DF = 10.0


class _Settings(NamedTuple):
    schedule: str
    num_samples: int
    max_samples: int
    sample_growth: float
    burn_in: int | None
    step_exponent: float
    num_chains: int
    warmup_steps: int
    discard_steps: int
    final_draws: int
    target_accept_prob: float
    max_tree_depth: int
    full_mass: bool
    jit_compile: bool
    latents: tuple[str, ...]
    m_step: str
    gradient_steps: int
    log_likelihood_samples: int


def _settings(options: Mapping[str, Any]) -> _Settings:
    """Validate the options of ``method="mcmc-em"``."""
    given = with_defaults("method='mcmc-em'", options, MCMC_EM_OPTIONS)
    if given["schedule"] not in _SCHEDULES:
        raise SpecError(f"schedule must be one of {_SCHEDULES}; got {given['schedule']!r}")
    if given["m_step"] not in _M_STEPS:
        raise SpecError(f"m_step must be one of {_M_STEPS}; got {given['m_step']!r}")
    num_samples = check_integer("num_samples", given["num_samples"], 1)
    max_samples = check_integer("max_samples", given["max_samples"], 1)
    if max_samples < num_samples:
        raise SpecError(f"max_samples ({max_samples}) must be at least num_samples ({num_samples})")
    growth = given["sample_growth"]
    if isinstance(growth, bool) or not isinstance(growth, int | float) or not growth > 1:
        raise SpecError(f"sample_growth must be a number > 1; got {growth!r}")
    burn_in = given["burn_in"]
    if burn_in != "auto":
        burn_in = check_integer("burn_in", burn_in, 0)
    exponent = given["step_exponent"]
    if isinstance(exponent, bool) or not isinstance(exponent, int | float):
        raise SpecError(f"step_exponent must be a number in (0.5, 1]; got {exponent!r}")
    if not 0.5 < exponent <= 1:
        raise SpecError(
            f"step_exponent must be in (0.5, 1] (the step sizes of SAEM must sum to "
            f"infinity and their squares must not); got {exponent!r}"
        )
    accept = given["target_accept_prob"]
    if isinstance(accept, bool) or not isinstance(accept, int | float) or not 0 < accept < 1:
        raise SpecError(f"target_accept_prob must be in (0, 1); got {accept!r}")
    latents = given["latents"]
    if isinstance(latents, str) or not all(isinstance(name, str) for name in latents):
        raise SpecError(f"latents must be a list of site names; got {latents!r}")
    for flag in ("full_mass", "jit_compile"):
        if not isinstance(given[flag], bool):
            raise SpecError(f"{flag} must be True or False; got {given[flag]!r}")
    return _Settings(
        schedule=given["schedule"],
        num_samples=num_samples,
        max_samples=max_samples,
        sample_growth=float(growth),
        burn_in=None if burn_in == "auto" else burn_in,
        step_exponent=float(exponent),
        num_chains=check_integer("num_chains", given["num_chains"], 1),
        warmup_steps=check_integer("warmup_steps", given["warmup_steps"], 0),
        discard_steps=check_integer("discard_steps", given["discard_steps"], 0),
        final_draws=check_integer("final_draws", given["final_draws"], 0),
        target_accept_prob=float(accept),
        max_tree_depth=check_integer("max_tree_depth", given["max_tree_depth"], 1),
        full_mass=given["full_mass"],
        jit_compile=given["jit_compile"],
        latents=tuple(latents),
        m_step=given["m_step"],
        gradient_steps=check_integer("gradient_steps", given["gradient_steps"], 1),
        log_likelihood_samples=check_integer(
            "log_likelihood_samples", given["log_likelihood_samples"], 0
        ),
    )


class MCMCEMFit(ProgramFit):
    """A Pyro program fitted by MCMC-EM (``method="mcmc-em"``).

    On top of :class:`~pyroem.ProgramFit`:

    - ``params``: the final θ_T.
    - ``draws``: the last E-step's latent draws (at θ_T), every latent site (continuous
      and discrete) ``(num_chains, num_draws, *shape)``; exact discrete draws form one
      chain. In a distributed fit, those of this rank's data points (as ``marginals``).
    - ``history.objective``: where every latent is discrete, the exact log joint
      ``log p(x, θ_t)`` (z summed out by enumeration; ``history.log_likelihood`` exact
      too). With continuous latents, the Monte Carlo estimate
      :math:`\\hat Q(θ_t; θ_t) = \\frac1S \\sum_s \\log p(x, z_s; θ_t)` over the E-step's
      draws at θ_t (an estimate of :math:`E[\\log p(x, z; θ_t) \\mid x]`, not of the
      log-likelihood); ``history.log_likelihood`` is NaN but for its last entry.
    - ``log_likelihood()``/``log_joint()``: exact where every latent is discrete; with
      continuous latents an importance-sampling estimate at θ_T (a multivariate
      Student-t proposal fitted to the last draws in the sampler's unconstrained
      space), standard error in ``log_likelihood_se``; NaN when the program also has
      discrete latents or ``log_likelihood_samples=0``.
    - ``marginals``: exact posterior marginals of the discrete latents at θ_T where
      every latent is discrete; else the frequencies in the last draws.
    - ``sample_stats``: per E-step, ``(T+1,)`` like the history: ``num_samples``,
      ``step_size`` (γ_t of the M-step that gave θ_t; NaN at 0), ``delta_q`` and
      ``delta_q_se`` (its gain on the Monte Carlo objective and standard error),
      ``max_rhat``, ``min_ess_bulk``, ``min_ess_tail``, ``num_divergences``,
      ``nuts_step_size``, ``rewarmed_chains``.

    Attributes:
        diagnostics: one :class:`~pyroem.diagnostics.ChainDiagnostics` per E-step
            (``T+1``). For exact discrete draws R-hat is NaN (independent draws) and
            both ESS equal the number of draws.
        final_diagnostics: diagnostics of the last E-step (at θ_T, at least
            ``final_draws`` draws per chain), which the MCMC warning is based on;
            ``None`` for exact draws.
        problems: what is wrong with those chains, in words (empty when nothing is).
        parameter_trace: θ across iterations, site → ``(T+1, *shape)``.
        schedule: ``"mcem"`` or ``"saem"``.
        burn_in: SAEM's last burn-in iteration (``None`` for MCEM or when it did not end).
        latents: the latent sites (continuous, then discrete).
        log_likelihood_se: Monte Carlo standard error of ``log_likelihood()`` (0 when exact).
    """

    @classmethod
    def rebuild_program(
        cls,
        model: Callable[..., Any],
        model_args: tuple[Any, ...],
        model_kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> ProgramModel:
        """The program with the latent sites the fit was told of."""
        return LatentProgram(model, model_args, model_kwargs, options.get("latents", ()))

    def __init__(
        self,
        *,
        diagnostics: list[ChainDiagnostics],
        final_diagnostics: ChainDiagnostics | None,
        problems: list[str],
        parameter_trace: dict[str, torch.Tensor],
        schedule: str,
        burn_in: int | None,
        latents: list[str],
        log_likelihood_se: float,
        **fit: Any,
    ) -> None:
        super().__init__(**fit)
        self.diagnostics = diagnostics
        self.final_diagnostics = final_diagnostics
        self.problems = problems
        self.parameter_trace = parameter_trace
        self.schedule = schedule
        self.burn_in = burn_in
        self.latents = latents
        self.log_likelihood_se = log_likelihood_se

    def pointwise_log_likelihood(self, *, plate: str | None = None) -> torch.Tensor:
        """``log p(x_i | θ_T, b_s)`` per draw ``s`` of the continuous latents ``b``,
        discrete latents summed out, ``(num_chains, num_draws, N)``; without continuous
        latents ``log p(x_i | θ_T)``, the same for every draw.

        Args:
            plate: the observation plate (default: see
                :func:`pyroem.outputs.pointwise.observation_plate`).
        """
        assert self.draws is not None
        continuous = {name: self.draws[name] for name in self.program.latents}  # type: ignore[attr-defined]
        if continuous:
            return pointwise_log_likelihood_draws(
                self.program, continuous, self.params, plate=plate
            )
        table = pointwise_log_likelihood(self.program, self.params, plate=plate)
        num_chains, num_draws = next(iter(self.draws.values())).shape[:2]
        return table.expand(num_chains, num_draws, *table.shape)

    def summary(self) -> str:
        """:meth:`ProgramFit.summary` plus the schedule, the draws and the chains."""
        stats = self.sample_stats
        lines = [
            super().summary(),
            "",
            f"  schedule           {self.schedule}"
            + ("" if self.burn_in is None else f" (burn-in ended at iteration {self.burn_in})"),
            f"  draws per E-step   {int(stats['num_samples'][0])} first, "
            f"{int(stats['num_samples'][-1])} last",
            f"  last gain of Q     {stats['delta_q'][-1]:.3g} ± {stats['delta_q_se'][-1]:.2g}",
        ]
        if self.final_diagnostics is not None:
            final = self.final_diagnostics
            lines.append(
                f"  last E-step chains R-hat {final.max_rhat:.3f}, bulk ESS "
                f"{final.min_ess_bulk:.0f}, tail ESS {final.min_ess_tail:.0f}, "
                f"{final.num_divergences} divergences"
                + (f" — {'; '.join(self.problems)}" if self.problems else "")
            )
        return "\n".join(lines)

    def _archive(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """:class:`~pyroem.ProgramFit`'s, with the parameter trace and the chains'
        diagnostics of every E-step."""
        arrays, meta = super()._archive()
        for name, value in self.parameter_trace.items():
            arrays[f"parameter_trace/{name}"] = value.detach().cpu().numpy()
        arrays["diagnostics"] = np.array(self.diagnostics, dtype=np.float64).reshape(-1, 6)
        final = self.final_diagnostics
        meta.update(
            final_diagnostics=None if final is None else [float(value) for value in final],
            problems=list(self.problems),
            schedule=self.schedule,
            burn_in=self.burn_in,
            latents=list(self.latents),
            log_likelihood_se=self.log_likelihood_se,
        )
        return arrays, meta

    @classmethod
    def from_archive(
        cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], fields: dict[str, Any]
    ) -> MCMCEMFit:
        """A saved MCMC-EM fit."""
        final = meta["final_diagnostics"]
        return cls(
            diagnostics=[ChainDiagnostics.from_numbers(row) for row in arrays["diagnostics"]],
            final_diagnostics=None if final is None else ChainDiagnostics.from_numbers(final),
            problems=[str(problem) for problem in meta["problems"]],
            parameter_trace={
                key.removeprefix("parameter_trace/"): torch.from_numpy(value)
                for key, value in arrays.items()
                if key.startswith("parameter_trace/")
            },
            schedule=str(meta["schedule"]),
            burn_in=meta["burn_in"],
            latents=[str(name) for name in meta["latents"]],
            log_likelihood_se=float(meta["log_likelihood_se"]),
            **fields,
        )

    def _repr_fields(self) -> list[str]:
        return [
            f"model={self.program.name}",
            f"schedule={self.schedule!r}",
            f"objective={self.history.objective[-1]:.6g}",
        ]


def _m_step(
    program: ProgramModel,
    blocks: Mapping[str, ClosedForm | None],
    values: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    gradient_steps: int,
    parameters_once: bool = False,
) -> dict[str, torch.Tensor]:
    """One ECM sweep on Q: each closed-form block in MAP-EM's order, the program run
    again where an earlier block changed what the next one reads, then the gradient
    M-step. ``parameters_once``: ``weights`` count the parameter sites on one rank of a
    distributed fit only (see :func:`~pyroem.engines.program_map.closed_form_sweep`)."""
    values = dict(values)
    order = block_order(program, blocks)
    retrace = needs_trace(blocks, order)
    trace = program.trace(values)
    closed_form_sweep(
        program, blocks, order, retrace, trace, weights, values, parameters_once=parameters_once
    )
    gradient_sites = [name for name in program.params if blocks[name] is None]
    if gradient_sites:
        values.update(
            gradient_m_step(program, values, weights, gradient_sites, max_steps=gradient_steps)
        )
    return values


class _EStep(NamedTuple):
    """An E-step at θ_t and the quantities read from it."""

    draws: Draws
    per_draw: torch.Tensor
    objective: float
    log_likelihood: float
    trace: Any
    marginals: dict[str, torch.Tensor]
    log_prior: float = 0.0


def _frequencies(
    program: LatentProgram, draws: Draws, supports: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Frequencies of each discrete latent's values in the draws, ``(*shape, K)``."""
    flat = draws.flat()
    return {
        name: (flat[name].unsqueeze(-1) == supports[name]).to(dtype).mean(0)
        for name in program.enumerated
    }


def _effective_size(draws: Draws, gains: torch.Tensor) -> float:
    """Effective sample size of the per-draw gains: their number for exact draws,
    ArviZ's bulk ESS over the chains for NUTS draws."""
    size = gains.numel()
    if not draws.continuous:
        return float(size)
    ess = chain_diagnostics({"gain": gains.reshape(draws.num_chains, draws.num_draws)}).min_ess_bulk
    return float(min(size, ess)) if math.isfinite(ess) else float(size)


def _importance_log_likelihood(
    program: LatentProgram,
    sampler: NUTSSampler,
    values: Mapping[str, torch.Tensor],
    draws: Mapping[str, torch.Tensor],
    num_samples: int,
) -> tuple[float, float, float]:
    r"""Importance-sampling estimate of :math:`\log p(x, θ)` and :math:`\log p(x \mid θ)`.

    The proposal is a multivariate Student-t (10 degrees of freedom) with the mean and
    covariance of ``draws`` (unconstrained, ``(num_chains, num_draws, *shape)``) in the
    sampler's unconstrained space (diagonal covariance when there are fewer than twice
    as many draws as dimensions).

    Returns:
        ``(log_joint, log_likelihood, standard_error)``.
    """
    names = program.latents
    flat = {name: draws[name].flatten(0, 1) for name in names}
    sizes = [flat[name][0].numel() for name in names]
    # The proposal and the weights in float64 whatever the program's dtype: the program
    # is evaluated at the proposed points rounded to its dtype, and log q at those points.
    wide = torch.float64
    points = torch.cat(
        [flat[name].reshape(flat[name].shape[0], -1).to(wide) for name in names], dim=1
    )
    mean = points.mean(0)
    centred = points - mean
    num_points, dim = points.shape
    covariance = centred.T @ centred / max(num_points - 1, 1)
    if num_points < 2 * dim:
        covariance = torch.diag(torch.diagonal(covariance))
    covariance = covariance + 1e-9 * torch.diagonal(covariance).mean() * torch.eye(dim, dtype=wide)
    proposal = dist.MultivariateStudentT(
        torch.tensor(_PROPOSAL_DF, dtype=wide), mean, torch.linalg.cholesky(covariance)
    )
    proposed = proposal.sample((num_samples,)).to(program.dtype)
    log_q = proposal.log_prob(proposed.to(wide))
    unconstrained = {
        name: part.reshape(num_samples, *draws[name].shape[2:])
        for name, part in zip(names, proposed.split(sizes, dim=1), strict=True)
    }
    constrained, log_jacobian = constrain(sampler.transforms, unconstrained, 1)
    log_joint, log_prior = per_draw_log_joint(program, values, constrained)
    log_weights = log_joint.to(wide) + log_jacobian.to(wide) - log_q
    estimate = float(torch.logsumexp(log_weights, 0) - math.log(num_samples))
    scaled = (log_weights - log_weights.max()).exp()
    standard_error = float(scaled.std() / (scaled.mean() * math.sqrt(num_samples)))
    return estimate, estimate - float(log_prior[0]), standard_error


def fit_mcmc_em(
    model: Callable[..., Any],
    model_args: tuple[Any, ...],
    model_kwargs: Mapping[str, Any] | None,
    *,
    tol: float,
    max_iter: int,
    init: Any,
    seed: int | None,
    progress: bool,
    n_init: int = 1,
    callback: Callable[[Iteration], Any] | None = None,
    collective: Collective = LOCAL,
    **options: Any,
) -> MCMCEMFit:
    """Fit a Pyro program by MCMC-EM (see :func:`pyroem.fit` and the module docstring).

    Args:
        model: the Pyro program.
        model_args: its positional arguments.
        model_kwargs: its keyword arguments.
        tol: convergence when, with 95% confidence, an M-step gains less than ``tol``
            per observation on the Monte Carlo objective (see
            :mod:`pyroem.engines.mcmc_schedules`).
        max_iter: most EM iterations; hitting it warns with
            :class:`~pyroem.errors.ConvergenceWarning`.
        init: ``{site: value}`` for any subset of the parameters, or a previous fit.
        seed: makes the fit reproducible (the global RNG state is left as it was).
        progress: show a progress bar.
        n_init: restarts (restart ``r`` from a new draw, seeded ``seed + r``, with a new
            sampler and schedule); the one with the highest final objective is kept.
        callback: called after every iteration (see :func:`pyroem.fit`).
        collective: a distributed fit's collectives (see the module docstring): each
            rank's program holds its own shard of the data points.
        **options: see :data:`MCMC_EM_OPTIONS` and the README.

    Returns:
        An :class:`MCMCEMFit`; :class:`~pyroem.errors.MCMCWarning` if the final E-step
        chains fail R-hat < 1.01, bulk and tail ESS ≥ 100, or had divergences.
    """
    settings = _settings(options)
    program = LatentProgram(model, model_args, model_kwargs, settings.latents)
    if not program.latents and not program.enumerated:
        raise NotSupportedError(
            f"the model {program.name} has no latent variables to sample; fit it with "
            "method='map-em' (or name its random effects with latents=[...])"
        )
    if program.latents and settings.num_samples < 4 * settings.num_chains:
        raise SpecError(
            f"num_samples must give each of the {settings.num_chains} chains at least 4 "
            f"draws (R-hat and ESS need them); got num_samples={settings.num_samples}"
        )
    init = program_init(init)
    if isinstance(init, Mapping) and set(init) >= set(program.params):
        n_init = 1
    base_seed = resolve_seed(seed)
    with torch.random.fork_rng(), pyro.validation_enabled(False):
        torch.manual_seed(base_seed)
        engine = _MCMCEMEngine(program, settings, init, base_seed, tol, collective)
        result = run_em(
            engine, n_init=n_init, tol=tol, max_iter=max_iter, progress=progress, callback=callback
        )
    return _fit_result(
        engine, result, {"tol": tol, "max_iter": max_iter, "seed": seed, "n_init": n_init}
    )


def _sampler(
    program: LatentProgram, values: dict[str, torch.Tensor], settings: _Settings
) -> ExactSampler | NUTSSampler:
    """Exact draws when every latent is discrete, NUTS chains otherwise."""
    if not program.latents:
        return ExactSampler(program)
    return NUTSSampler(
        program,
        values,
        num_chains=settings.num_chains,
        warmup_steps=settings.warmup_steps,
        discard_steps=settings.discard_steps,
        target_accept_prob=settings.target_accept_prob,
        max_tree_depth=settings.max_tree_depth,
        full_mass=settings.full_mass,
        jit_compile=settings.jit_compile,
    )


def _schedule(settings: _Settings) -> MCEMSchedule | SAEMSchedule:
    if settings.schedule == "mcem":
        return MCEMSchedule(settings.num_samples, settings.max_samples, settings.sample_growth)
    return SAEMSchedule(settings.num_samples, settings.burn_in, settings.step_exponent)


def _closed_forms(
    program: LatentProgram, values: dict[str, torch.Tensor], settings: _Settings, trace: Any
) -> dict[str, ClosedForm | None]:
    """The closed-form block of every parameter (MAP-EM's recognition), probed on the
    program as the M-step sees it: with continuous latents, stacked with one draw."""
    if settings.m_step == "gradient":
        return dict.fromkeys(program.params)
    if not program.latents:
        return recognise(program, values, trace)
    nodes: Any = trace.nodes
    one = {
        name: nodes[name]["value"].detach().reshape(1, *site.shape)
        for name, site in program.latent_sites.items()
    }
    return recognise(StackedProgram(program, one), values)


def _gain(
    program: LatentProgram,
    target: ProgramModel,
    weights: Mapping[str, torch.Tensor],
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    step: _EStep,
    objective_q: MonteCarloQ,
    collective: Collective = LOCAL,
) -> Gain:
    """The M-step's gain on Q_t and its Monte Carlo standard error (see
    :mod:`pyroem.engines.mcmc_schedules`); in a distributed fit, of the whole data
    (the ranks' gains summed, the prior's change once)."""
    with torch.no_grad():
        delta = float(
            expected_log_joint(target, new, weights) - expected_log_joint(target, old, weights)
        )
    joint, prior = per_draw_log_joint(program, new, step.draws.flat())
    if collective is not LOCAL:
        change = float(prior[0]) - step.log_prior
        local = torch.cat([joint - prior, torch.tensor([delta - change], dtype=joint.dtype)])
        (summed,) = collective.sum_tensors([local])
        joint, delta = summed[:-1] + prior, float(summed[-1]) + change
    gains = joint - step.per_draw
    spread = float(gains.std()) if gains.numel() > 1 else 0.0
    if spread == 0:
        return Gain(delta, 0.0)
    se = spread / math.sqrt(_effective_size(step.draws, gains))
    return Gain(delta, se * objective_q.noise_factor())


class _Final(NamedTuple):
    """Scores and diagnostics at θ_T, from the final E-step."""

    log_joint: float
    log_likelihood: float
    log_likelihood_se: float
    diagnostics: ChainDiagnostics | None
    problems: list[str]
    burn_in: int | None


class _MCMCEMEngine(Engine):
    """MCMC-EM: the E-step draws the latents at θ_t (exact or NUTS), the M-step is MAP-EM's
    ECM sweep on the Monte Carlo Q of the schedule (MCEM or SAEM)."""

    name = "mcmc-em"

    def __init__(
        self,
        program: LatentProgram,
        settings: _Settings,
        init: Mapping[str, Any] | Callable[[int], Any] | None,
        base_seed: int,
        tol: float,
        collective: Collective = LOCAL,
    ) -> None:
        self.program, self.settings, self.start, self.base_seed = program, settings, init, base_seed
        self.tol, self.collective = tol, collective
        self.first = broadcast_values(collective, program, initial_values(program, init, base_seed))
        check_stackable(program, self.first)
        first_trace = program.trace(self.first)
        # N of the whole data (every rank's shard), so the ranks stop together.
        self.num_data = collective.sum(num_observations(first_trace, program))
        nodes: Any = first_trace.nodes
        self.supports = {name: nodes[name]["value"].reshape(-1) for name in program.enumerated}
        self.sampler = _sampler(program, self.first, settings)
        self.schedule = _schedule(settings)
        self.blocks = _closed_forms(program, self.first, settings, first_trace)
        self.objective_q = MonteCarloQ(program)
        site, reason = keyed_site(program, first_trace)
        if collective is not LOCAL:
            refused = None
            try:
                if site is None:
                    raise NotSupportedError(
                        f"method='mcmc-em' over torch.distributed ranks draws one discrete latent "
                        f"per data point on each rank's rows, but in the model {program.name} "
                        f"{reason}: pass distributed=False to fit in each process alone"
                    )
                check_sharded(program, first_trace)
                gradient = [name for name, block in self.blocks.items() if block is None]
                if gradient:
                    raise NotSupportedError(
                        f"method='mcmc-em' over torch.distributed ranks takes closed-form "
                        f"M-steps only; the parameters {gradient} have none (they would take "
                        "gradient M-steps): pass distributed=False to fit in each process "
                        "alone, or give them conjugate priors the closed forms recognise"
                    )
            except NotSupportedError as err:
                refused = err
            # Every rank raises when one does.
            collective.check(refused)
        self.keyed: KeyedSampler | None = None
        if site is not None:
            offset = collective.row_offset(program.discrete_shapes[site][0])
            self.keyed = KeyedSampler(program, site, self.supports[site], offset)
        # The keys of the draws: the restart and its E-steps so far.
        self.restart, self.e_steps = 0, 0

    def init(self, restart: int) -> MStepResult:
        """Restart 0 starts where the recognition probed; restart ``r`` from a new draw
        (seeded ``seed + r``), with a new sampler and schedule."""
        values = self.first
        self.restart, self.e_steps = restart, 0
        if restart:
            torch.manual_seed(self.base_seed + restart)
            values = broadcast_values(
                self.collective,
                self.program,
                initial_values(self.program, self.start, self.base_seed + restart),
            )
            self.sampler = _sampler(self.program, values, self.settings)
            self.schedule = _schedule(self.settings)
        self.objective_q = MonteCarloQ(self.program)
        return MStepResult(values, None, {"step_size": math.nan})

    def snapshot(self, params: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The parameters, the schedule, the Monte Carlo Q so far, the chains and the
        global torch generator (copies)."""
        sampler = self.sampler
        return {
            "params": dict(params),
            "schedule": dict(vars(self.schedule)),
            "objective_q": {
                key: copied(value)
                for key, value in vars(self.objective_q).items()
                if key.startswith("_")
            },
            "chains": sampler.checkpoint_state() if isinstance(sampler, NUTSSampler) else None,
            "rng": torch.get_rng_state(),
            "e_steps": self.e_steps,
        }

    def restore(self, snapshot: dict[str, Any], restart: int) -> dict[str, torch.Tensor]:
        """The start of ``restart`` (its sampler and schedule), set to ``snapshot``."""
        self.init(restart)
        vars(self.schedule).update(snapshot["schedule"])
        vars(self.objective_q).update(snapshot["objective_q"])
        if isinstance(self.sampler, NUTSSampler):
            self.sampler.load_checkpoint_state(snapshot["chains"])
        torch.set_rng_state(snapshot["rng"])
        self.e_steps = snapshot.get("e_steps", 0)
        return dict(snapshot["params"])

    def e_step(self, params: dict[str, torch.Tensor], num_draws: int | None = None) -> EStepResult:
        """Draws of the latents at θ = ``params``; the objective is the exact log joint
        where every latent is discrete, else the Monte Carlo ``Q̂(θ; θ)``."""
        program, collective = self.program, self.collective
        num_draws = num_draws or self.schedule.num_samples
        post = None
        if self.keyed is not None:
            post = posterior(program, params)
            # Non-negative keys: a negative seed is read as its 64-bit two's complement.
            key = (self.base_seed & (2**64 - 1), self.restart, self.e_steps)
            draws = self.keyed.sample(post.marginals[self.keyed.site], num_draws, key)
        else:
            draws = self.sampler.sample(params, num_draws)
        self.e_steps += 1
        per_draw, prior = per_draw_log_joint(program, params, draws.flat())
        if collective is not LOCAL:
            # Each draw's log joint of the whole data: the ranks' shards, the prior once.
            per_draw = collective.sum_tensors([per_draw - prior])[0] + prior
        info = {
            "values": params,
            "diagnostics": draws.diagnostics,
            "num_samples": draws.num_chains * draws.num_draws,
            "nuts_step_size": draws.step_size,
            "rewarmed_chains": draws.rewarmed,
        }
        if program.latents:
            frequencies = _frequencies(program, draws, self.supports, per_draw.dtype)
            step = _EStep(draws, per_draw, float(per_draw.mean()), math.nan, None, frequencies)
        else:
            post = posterior(program, params) if post is None else post
            log_joint, log_likelihood = float(post.log_joint), float(post.log_likelihood)
            if collective is not LOCAL:
                # The ranks' log-likelihoods summed, plus the prior term of rank 0.
                total = collective.reduce(EStepResult(None, log_joint, log_likelihood, {}))
                log_joint, log_likelihood = total.objective, total.log_likelihood
            step = _EStep(draws, per_draw, log_joint, log_likelihood, post.trace, post.marginals)
        step = step._replace(log_prior=float(prior[0]))
        return EStepResult(step, step.objective, step.log_likelihood, info)

    def m_step(self, stats: _EStep, params: dict[str, torch.Tensor], iteration: int) -> MStepResult:
        """The ECM sweep on the schedule's Q, and its gain (see :func:`_gain`)."""
        gamma = self.schedule.step_size(iteration)
        self.objective_q.add(stats.draws, gamma, stats.trace)
        target, weights = self.objective_q.target(params)
        # A parameter's table read by another's closed form is the same on every rank:
        # rank 0 alone counts it in the sums over the ranks, the others their data only.
        counted = counted_once(self.program, weights, self.collective)
        with summed_over_ranks(self.collective):
            new = _m_step(
                target,
                self.blocks,
                params,
                counted,
                self.settings.gradient_steps,
                parameters_once=self.collective is not LOCAL,
            )
        gain = _gain(
            self.program, target, weights, params, new, stats, self.objective_q, self.collective
        )
        self.schedule.update(iteration, gain)
        info = {
            "step_size": gamma,
            "delta_q": gain.delta,
            "delta_q_se": gain.se,
            "gain_upper": gain.upper,
            "may_stop": self.schedule.may_stop(iteration),
        }
        return MStepResult(new, None, info)

    def converged(self, objectives: list[float], info: list[Mapping[str, Any]], tol: float) -> bool:
        """With 95% confidence the last M-step gained less than ``tol · N`` on Q, once the
        schedule allows stopping (see :mod:`pyroem.engines.mcmc_schedules`). A bound below 0
        counts as no gain, so ``tol=0`` runs ``max_iter`` iterations, as for every method."""
        gain = max(info[-1]["gain_upper"], 0.0)
        return bool(info[-1]["may_stop"]) and gain < tol * self.num_data

    def finish(self, run: EMRun) -> EMRun:
        """A final E-step at θ_T long enough for R-hat and ESS, and the scores there."""
        final = run.last
        program, settings = self.program, self.settings
        if program.latents and final.stats.draws.num_draws < settings.final_draws:
            final = self.e_step(run.params, settings.final_draws * settings.num_chains)
        info = [*run.info[:-1], {**run.info[-1], **final.info}]
        log_joint, log_likelihood, log_likelihood_se = final.objective, final.log_likelihood, 0.0
        diagnostics = None
        problems: list[str] = []
        if program.latents:
            diagnostics = final.stats.draws.diagnostics
            problems = chain_problems(diagnostics)
            earlier = sum(entry["diagnostics"].num_divergences for entry in info[:-1])
            if earlier:
                problems.append(f"{earlier} divergent transitions in earlier E-steps")
            log_joint = log_likelihood = log_likelihood_se = math.nan
            if not program.enumerated and settings.log_likelihood_samples:
                assert isinstance(self.sampler, NUTSSampler)
                log_joint, log_likelihood, log_likelihood_se = _importance_log_likelihood(
                    program,
                    self.sampler,
                    run.params,
                    final.stats.draws.unconstrained,
                    settings.log_likelihood_samples,
                )
        history = run.history
        history = history._replace(
            objective=np.append(history.objective[:-1], final.objective),
            log_likelihood=np.append(history.log_likelihood[:-1], log_likelihood),
        )
        schedule = self.schedule
        burn_in = schedule.burn_in_end if isinstance(schedule, SAEMSchedule) else None
        extras = _Final(
            log_joint, log_likelihood, log_likelihood_se, diagnostics, problems, burn_in
        )
        return run._replace(last=final, history=history, info=info, extras=extras)

    def unconverged_message(self, run: EMRun) -> str | None:
        last = run.info[-1]
        return (
            f"MCMC-EM did not converge in {run.num_iterations} iterations (last gain "
            f"{last.get('delta_q', math.nan):.3g} ± {last.get('delta_q_se', math.nan):.2g} "
            f"against tol × N = {self.tol * self.num_data:.3g}); raise max_iter, max_samples "
            "or tol"
        )


def _fit_result(engine: _MCMCEMEngine, result: EMResult, options: dict[str, Any]) -> MCMCEMFit:
    """The fit of the kept run, with the MCMC warning for its final chains."""
    best = result.best
    final: _Final = best.extras
    program, settings, last = engine.program, engine.settings, best.last.stats
    if final.problems:
        warnings.warn(
            "the chains of the last E-step look unreliable: "
            + "; ".join(final.problems)
            + ". Raise warmup_steps, final_draws or discard_steps, try full_mass=True, or "
            "reparametrise the model (e.g. centre covariates)",
            MCMCWarning,
            stacklevel=4,
        )
    stats = {
        key: np.array([float(entry.get(key, math.nan)) for entry in best.info])
        for key in (
            "num_samples",
            "step_size",
            "delta_q",
            "delta_q_se",
            "nuts_step_size",
            "rewarmed_chains",
        )
    }
    diagnostics = [entry["diagnostics"] for entry in best.info]
    for field in ("max_rhat", "min_ess_bulk", "min_ess_tail", "num_divergences"):
        stats[field] = np.array([float(getattr(entry, field)) for entry in diagnostics])
    return MCMCEMFit(
        program=program,
        method="mcmc-em",
        values=best.params,
        m_step_kinds={
            name: "gradient" if block is None else block.kind
            for name, block in engine.blocks.items()
        },
        marginals=last.marginals,
        log_likelihood=final.log_likelihood,
        log_joint=final.log_joint,
        num_data=engine.num_data,
        **result.fit_fields(),
        options={
            **options,
            **settings._asdict(),
            **result.record(),
            **engine.collective.record(),
        },
        draws={**last.draws.continuous, **last.draws.discrete},
        sample_stats=stats,
        diagnostics=diagnostics,
        final_diagnostics=final.diagnostics,
        problems=final.problems,
        parameter_trace={
            name: torch.stack([entry["values"][name] for entry in best.info])
            for name in program.params
        },
        schedule=engine.schedule.name,
        burn_in=final.burn_in,
        latents=[*program.latents, *program.enumerated],
        log_likelihood_se=final.log_likelihood_se,
    )
