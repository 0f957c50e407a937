r"""Full Bayesian inference with NUTS: the reference the EM variants are compared with.

``method="nuts"`` samples the posterior of every continuous latent θ of the model
with Pyro's No-U-Turn sampler, the discrete latents z summed out exactly by
parallel enumeration, so the chains move on

.. math:: \log p(θ \mid x) = \log \sum_z p(x, z, θ) + \text{const},

in an unconstrained space (Pyro's bijection for each support; covariance matrices
through their log-Cholesky entries). z is never sampled by the chains; its
posterior draws given each θ draw come afterwards from Pyro's ``infer_discrete``
(:meth:`BayesFit.sample_assignments`).

Chains run one after another in this process, each from its own seed (derived from
``seed`` by NumPy's ``SeedSequence``): several processes would buy little on a few
cores and make a fit depend on how they are started.

For a :class:`~pyroem.Mixture` the potential is computed by the mixture's own batched
kernels (the same numbers as its Pyro program, many times faster); for a Pyro
program it is Pyro's enumerated log joint of the program.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import infer_discrete
from pyro.infer.autoguide import init_to_median, init_to_sample, init_to_uniform
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad
from torch.distributions.transforms import Transform
from tqdm import tqdm

from pyroem.diagnostics import ChainDiagnostics, chain_diagnostics, chain_problems
from pyroem.em import History
from pyroem.engines.initialization import site_values
from pyroem.engines.program_map import initial_values, num_observations, program_init, resolve_seed
from pyroem.errors import MCMCWarning, NotSupportedError, SingularCovarianceError, SpecError
from pyroem.estep.enumerate import MixtureEStep, mixture_log_likelihood
from pyroem.estep.nuts import NUTSChain
from pyroem.estep.program import log_joint_terms, posterior
from pyroem.fits.core import fit_start, format_array
from pyroem.fits.program import ProgramFit
from pyroem.model.mixture import Mixture, MixtureParams, as_data
from pyroem.model.program import ProgramModel
from pyroem.model.transforms import constrain, unconstraining
from pyroem.options import check_integer, with_defaults
from pyroem.outputs.alignment import Alignment, align_draws, program_component_axes
from pyroem.outputs.pointwise import pointwise_log_likelihood_draws

__all__ = ["NUTS_OPTIONS", "BayesFit", "fit_nuts"]

NUTS_OPTIONS: dict[str, Any] = {
    "num_samples": 1000,
    "warmup_steps": 500,
    "num_chains": 4,
    "target_accept_prob": 0.8,
    "max_tree_depth": 10,
    "dense_mass": False,
    "init_strategy": None,
    "init_jitter": 0.1,
    "align": "chain",
    "component_axes": None,
    "chunk_size": 65536,
    "jit_compile": False,
}
_INIT_STRATEGIES: dict[str, Callable[..., Any]] = {
    "uniform": init_to_uniform,
    "median": init_to_median,
    "sample": init_to_sample,
}
_ALIGN = ("chain", "draw", None)


class _Settings(NamedTuple):
    num_samples: int
    warmup_steps: int
    num_chains: int
    target_accept_prob: float
    max_tree_depth: int
    dense_mass: bool
    init_strategy: str
    init_jitter: float
    align: str | None
    component_axes: dict[str, int] | None
    chunk_size: int
    jit_compile: bool


def _settings(options: Mapping[str, Any], has_init: bool) -> _Settings:
    given = with_defaults("method='nuts'", options, NUTS_OPTIONS)
    for name, low in (
        ("num_samples", 1),
        ("warmup_steps", 0),
        ("num_chains", 1),
        ("max_tree_depth", 1),
        ("chunk_size", 1),
    ):
        check_integer(name, given[name], low)
    accept = given["target_accept_prob"]
    if not (isinstance(accept, int | float) and 0 < accept < 1):
        raise SpecError(f"target_accept_prob must be in (0, 1); got {accept!r}")
    jitter = given["init_jitter"]
    if not (isinstance(jitter, int | float) and jitter >= 0):
        raise SpecError(f"init_jitter must be a non-negative number; got {jitter!r}")
    strategy = given["init_strategy"] or ("init" if has_init else "uniform")
    if strategy not in ("init", *_INIT_STRATEGIES):
        raise SpecError(
            f"init_strategy must be one of {['init', *_INIT_STRATEGIES]}; got {strategy!r}"
        )
    align = given["align"] or None
    if align not in _ALIGN:
        raise SpecError(f"align must be one of {list(_ALIGN)}; got {given['align']!r}")
    axes = given["component_axes"]
    if axes is not None and not isinstance(axes, Mapping):
        raise SpecError(f"component_axes must be a dict {{site: axis}}; got {axes!r}")
    return _Settings(
        num_samples=given["num_samples"],
        warmup_steps=given["warmup_steps"],
        num_chains=given["num_chains"],
        target_accept_prob=float(accept),
        max_tree_depth=given["max_tree_depth"],
        dense_mass=bool(given["dense_mass"]),
        init_strategy=strategy,
        init_jitter=float(jitter),
        align=align,
        component_axes=None if axes is None else dict(axes),
        chunk_size=given["chunk_size"],
        jit_compile=bool(given["jit_compile"]),
    )


class _SampledProgram(ProgramModel):
    """A :class:`ProgramModel` that keeps continuous latents local to the data: NUTS
    samples them with the parameters."""

    def _check_global(self, name: str, site: Any, observed_plates: set[str]) -> None:
        """Every continuous latent is sampled, global or local."""


def _unconstraining(program: ProgramModel) -> dict[str, Transform]:
    """Site name → bijection from the site's support to an unconstrained space."""
    return {name: unconstraining(name, site.constraint) for name, site in program.params.items()}


def _potential(
    terms: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
    transforms: Mapping[str, Transform],
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``-log p(x, θ(u)) - log|dθ/du|`` on the unconstrained space, from
    ``terms: values → (log p(x | θ), log p(θ))``."""

    def potential(unconstrained: dict[str, torch.Tensor]) -> torch.Tensor:
        values, log_jacobian = constrain(transforms, unconstrained)
        try:
            log_likelihood, log_prior = terms(values)
            total = log_likelihood + log_prior + log_jacobian
        except SingularCovarianceError:
            # A covariance too close to singular to factor: a point of zero density,
            # which NUTS treats as a divergence.
            total = torch.stack([value.sum() for value in unconstrained.values()]).sum() * math.nan
        return -total

    return potential


def _mixture_log_joint(
    spec: Mixture, family: Any, data: torch.Tensor, chunk_size: int
) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """``values → (log p(x | θ), log p(θ))`` of a Mixture by its batched kernels."""
    e_step = MixtureEStep(family, spec.weights_prior, data, chunk_size)
    pointwise = _mixture_pointwise(spec, family, data, chunk_size)
    active = torch.arange(spec.num_components)
    fields = family.params_type._fields

    def terms(values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        components = family.params_type(**{f: values[f] for f in fields})
        params = MixtureParams(values["weights"], components, active)
        return pointwise(values).sum(), e_step.log_prior(params)

    return terms


def _mixture_pointwise(
    spec: Mixture, family: Any, data: torch.Tensor, chunk_size: int
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``values → log p(x_n | θ)`` ``(N,)`` of a Mixture by its batched kernels."""
    chunks = [family.prepare(chunk) for chunk in data.split(chunk_size)]
    fields = family.params_type._fields

    def pointwise(values: dict[str, torch.Tensor]) -> torch.Tensor:
        log_prob = family.log_prob_fn(family.params_type(**{f: values[f] for f in fields}))
        return mixture_log_likelihood(log_prob, values["weights"], chunks)[0]

    return pointwise


def _program_potential(
    program: ProgramModel, transforms: Mapping[str, Transform], jit_compile: bool
) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Pyro's potential of the program (its enumerated log joint, ``TraceEinsumEvaluator``)."""
    with pyro.validation_enabled(False), warnings.catch_warnings(), torch.random.fork_rng():
        # Tracing for the JIT warns about Python values it freezes; the program's
        # structure does not change between evaluations.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        potential = initialize_model(
            program.model,
            program.model_args,
            program.model_kwargs,
            transforms=dict(transforms),
            max_plate_nesting=program.max_plate_nesting,
            jit_compile=jit_compile,
            skip_jit_warnings=True,
            init_strategy=init_to_sample,
        )[1]
    pyro_potential = cast(Callable[[dict[str, torch.Tensor]], torch.Tensor], potential)

    def in_values_dtype(unconstrained: dict[str, torch.Tensor]) -> torch.Tensor:
        # Pyro's log density adds its plates' zero log-probabilities, made in torch's
        # default dtype: a float32 program under the float64 default would get a float64
        # potential, and NUTS would draw its momenta, and so move its chains, in float64.
        energy = pyro_potential(unconstrained)
        if not unconstrained:
            return energy
        return energy.to(next(iter(unconstrained.values())).dtype)

    return in_values_dtype


def _program_terms(
    program: ProgramModel,
) -> Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """``values → (log p(x | θ), log p(θ))`` of a Pyro program, z summed out."""

    def terms(values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return log_joint_terms(program, program.trace(values))

    return terms


class _Chain(NamedTuple):
    """One chain's post-warmup draws (unconstrained), statistics and timing."""

    unconstrained: dict[str, torch.Tensor]
    stats: dict[str, np.ndarray]
    elapsed: np.ndarray


def _initial_point(
    program: ProgramModel,
    transforms: Mapping[str, Transform],
    potential: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    start: Mapping[str, torch.Tensor],
    settings: _Settings,
) -> dict[str, torch.Tensor]:
    """A chain's starting point in the unconstrained space (under the chain's seed)."""
    if settings.init_strategy != "init":
        return initialize_model(
            program.model,
            program.model_args,
            program.model_kwargs,
            transforms=dict(transforms),
            max_plate_nesting=program.max_plate_nesting,
            init_strategy=_INIT_STRATEGIES[settings.init_strategy],
        )[0]
    point = {name: transforms[name](value.detach()) for name, value in start.items()}
    if settings.init_jitter > 0:
        jittered = {
            name: value + settings.init_jitter * torch.randn_like(value)
            for name, value in point.items()
        }
        if bool(torch.isfinite(potential_grad(potential, jittered)[1])):
            point = jittered
    if not bool(torch.isfinite(potential_grad(potential, point)[1])):
        raise SpecError(
            "the model's log density is not finite at the starting values; pass other "
            "init values, or init_strategy='uniform'"
        )
    return {name: value.detach() for name, value in point.items()}


def _run_chain(
    potential: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    initial: dict[str, torch.Tensor],
    settings: _Settings,
    bar: Any,
) -> _Chain:
    """Warm up and sample one chain of Pyro's NUTS."""
    chain = NUTSChain(
        potential,
        initial,
        target_accept_prob=settings.target_accept_prob,
        max_tree_depth=settings.max_tree_depth,
        full_mass=settings.dense_mass,
    )
    start = time.perf_counter()
    elapsed: list[float] = []

    def on_step(chain: NUTSChain) -> None:
        bar.update(1)
        if chain.kernel._t > settings.warmup_steps:
            elapsed.append(time.perf_counter() - start)
        if chain.kernel._t % 25 == 1:
            bar.set_postfix(step_size=f"{chain.kernel.step_size:.3g}")

    chain.warm_up(settings.warmup_steps, on_step)
    draws, stats = chain.run(settings.num_samples, on_step)
    chain.kernel.cleanup()
    return _Chain(draws, stats, np.asarray(elapsed))


def _check_sampleable(program: ProgramModel) -> None:
    fixed = [name for name, site in program.params.items() if site.kind == "param"]
    if fixed:
        raise NotSupportedError(
            f"NUTS samples latent variables, but {fixed} are pyro.param sites (no prior, so "
            "no posterior to sample); give them priors — for a pyroem.Mixture declare "
            "prior='default' (or a prior object) instead of prior=None, in a Pyro program "
            "write pyro.sample(name, prior) instead of pyro.param — or estimate them with "
            "method='map-em' / 'vb-em'"
        )
    if not program.params:
        raise NotSupportedError(
            f"the model {program.name} has no continuous latent variables for NUTS to sample"
        )


def _chain_seeds(seed: int | None, num_chains: int) -> list[int]:
    base = resolve_seed(seed)
    children = np.random.SeedSequence(base).spawn(num_chains)
    return [int(child.generate_state(1)[0]) for child in children]


class BayesFit(ProgramFit):
    """Posterior draws from NUTS (``method="nuts"``).

    On top of :class:`~pyroem.ProgramFit`:

    - ``draws``: every continuous latent site, ``(num_chains, num_samples, *shape)``,
      components aligned across chains (see :mod:`pyroem.outputs.alignment`).
    - ``params``: the posterior mean of the aligned draws; ``log_likelihood()``,
      ``log_joint()`` and ``marginals`` are evaluated there, z summed out.
    - ``history``: one entry per draw ``s`` (not per EM iteration): ``objective`` is the
      log joint ``log p(x, θ_s)`` (z summed out, constrained space) averaged over the
      chains, ``log_likelihood`` likewise, ``elapsed`` the mean seconds since each
      chain started (warm-up included).
    - ``sample_stats``: per chain and draw ``(num_chains, num_samples)``: ``diverging``,
      ``step_size``, ``tree_depth`` (doublings), ``n_steps`` (leapfrog steps),
      ``acceptance_rate``, ``energy`` (Hamiltonian at the start of the transition),
      ``lp`` (log density in the unconstrained space, Jacobian included),
      ``log_joint`` and ``total_log_likelihood`` (constrained, z summed out).
    - ``converged``: the chains pass R-hat < 1.01, bulk and tail ESS ≥ 100 and have no
      divergences (otherwise an :class:`~pyroem.errors.MCMCWarning` said what failed).
    - ``num_iterations``: draws per chain.

    Attributes:
        diagnostics: :class:`~pyroem.diagnostics.ChainDiagnostics` of the aligned draws.
        problems: what is wrong with the chains, in words (empty when nothing is).
        component_axes: site → component axis used to align (``None``: not aligned).
        permutations: the alignment's permutations, ``(num_chains, K)`` or
            ``(num_chains, num_samples, K)`` (``None``: not aligned).
    """

    program_type = _SampledProgram

    def __init__(
        self,
        *,
        diagnostics: ChainDiagnostics,
        problems: list[str],
        component_axes: dict[str, int] | None,
        permutations: np.ndarray | None,
        pointwise: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None,
        **fit: Any,
    ) -> None:
        super().__init__(**fit)
        self.diagnostics = diagnostics
        self.problems = problems
        self.component_axes = component_axes
        self.permutations = permutations
        self._pointwise_fn = pointwise

    @property
    def num_chains(self) -> int:
        return int(self.diagnostics.num_chains)

    @property
    def num_draws(self) -> int:
        return int(self.diagnostics.num_draws)

    def pointwise_log_likelihood(self, *, plate: str | None = None) -> torch.Tensor:
        """``log p(x_i | θ_s)`` at every draw, z summed out, ``(num_chains, num_draws, N)``.

        Args:
            plate: the observation plate (default: see
                :func:`pyroem.outputs.pointwise.observation_plate`).
        """
        assert self.draws is not None
        if self._pointwise_fn is None or plate not in (None, "data"):
            return pointwise_log_likelihood_draws(self.program, self.draws, {}, plate=plate)
        num_chains, num_draws = next(iter(self.draws.values())).shape[:2]
        with torch.no_grad():
            rows = [
                torch.stack(
                    [
                        self._pointwise_fn({n: v[c, s] for n, v in self.draws.items()})
                        for s in range(num_draws)
                    ]
                )
                for c in range(num_chains)
            ]
        return torch.stack(rows)

    def sample_assignments(
        self, num_draws: int = 100, *, seed: int | None = None
    ) -> dict[str, torch.Tensor]:
        r"""Posterior draws of every enumerated (discrete) site.

        For ``num_draws`` posterior draws θ_s, spread evenly over the pooled chains, z
        is drawn from :math:`p(z \mid x, θ_s)` by Pyro's ``infer_discrete`` (forward
        filtering, backward sampling), so the draws carry the uncertainty in θ as well
        as in z: for a mixture, ``(draws["assignment"] == k).float().mean(0)`` is each
        point's posterior probability of component ``k``.

        Args:
            num_draws: how many draws (at most the number of posterior draws).
            seed: makes the draws reproducible.

        Returns:
            Site name → ``(num_draws, *value_shape)`` integer tensor.
        """
        if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
            raise SpecError(f"num_draws must be a positive integer; got {num_draws!r}")
        assert self.draws is not None
        total = self.num_chains * self.num_draws
        picks = np.unique(np.linspace(0, total - 1, min(num_draws, total)).round().astype(int))
        program = self.program
        results: dict[str, list[torch.Tensor]] = {name: [] for name in program.enumerated}
        with torch.random.fork_rng(), poutine.block(), torch.no_grad():
            torch.manual_seed(_chain_seeds(seed, 1)[0])
            for pick in picks:
                chain, draw = divmod(int(pick), self.num_draws)
                values = {name: value[chain, draw] for name, value in self.draws.items()}
                sampler = infer_discrete(
                    poutine.condition(program.model, values),
                    first_available_dim=-program.max_plate_nesting - 1,
                    temperature=1,
                )
                trace = poutine.trace(sampler).get_trace(
                    *program.model_args, **program.model_kwargs
                )
                for name in results:
                    results[name].append(trace.nodes[name]["value"].detach().clone())
        return {name: torch.stack(values) for name, values in results.items()}

    def realigned(self, alignment: Alignment) -> BayesFit:
        """A copy with the draws of ``alignment`` and everything that follows from them
        (posterior mean, diagnostics, marginals) recomputed."""
        new = copy.copy(self)
        summary = _summarise(self.program, alignment.draws, self.sample_stats)
        new.draws = alignment.draws
        new._values = summary.params
        new.marginals = summary.marginals
        new._log_likelihood = summary.log_likelihood
        new._log_joint = summary.log_joint
        new.diagnostics = summary.diagnostics
        new.problems = summary.problems
        new.converged = not summary.problems
        new.permutations = alignment.permutations
        return new

    def _archive(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """:class:`~pyroem.ProgramFit`'s, with the chains' diagnostics and the alignment."""
        arrays, meta = super()._archive()
        if self.permutations is not None:
            arrays["permutations"] = np.asarray(self.permutations)
        meta["diagnostics"] = [float(value) for value in self.diagnostics]
        meta["problems"] = list(self.problems)
        meta["component_axes"] = self.component_axes
        return arrays, meta

    @classmethod
    def from_archive(
        cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], fields: dict[str, Any]
    ) -> BayesFit:
        """A saved NUTS fit; :meth:`pointwise_log_likelihood` then runs the program
        (the compiled mixture density is not saved)."""
        return cls(
            diagnostics=ChainDiagnostics.from_numbers(meta["diagnostics"]),
            problems=[str(problem) for problem in meta["problems"]],
            component_axes=meta["component_axes"],
            permutations=arrays.get("permutations"),
            pointwise=None,
            **fields,
        )

    def _repr_fields(self) -> list[str]:
        return [
            f"model={self.program.name}",
            f"num_chains={self.num_chains}",
            f"num_draws={self.num_draws}",
            f"max_rhat={self.diagnostics.max_rhat:.4f}",
            f"divergences={self.diagnostics.num_divergences}",
        ]

    def _summary_parts(self) -> tuple[str, list[str], list[str], list[str]]:
        """:class:`~pyroem.ProgramFit`'s, with the chains, their diagnostics and the
        posterior mean and sd of every parameter."""
        title, head, notes, _ = super()._summary_parts()
        diag = self.diagnostics
        head += [
            f"  chains x draws     {diag.num_chains} x {diag.num_draws}",
            f"  max R-hat          {diag.max_rhat:.4f}",
            f"  min ESS bulk/tail  {diag.min_ess_bulk:.0f} / {diag.min_ess_tail:.0f}",
            f"  divergences        {diag.num_divergences}",
        ]
        notes = [
            "  scores             at the posterior mean",
            f"  problems           {'; '.join(self.problems) or 'none'}",
            *notes,
        ]
        assert self.draws is not None
        width = max(len(name) for name in self._values)
        params = [
            f"  {name:<{width}}  mean {format_array(value)}  "
            f"sd {format_array(self.draws[name].double().flatten(0, 1).std(0))}"
            for name, value in self._values.items()
        ]
        return title, head, notes, params


class _Summary(NamedTuple):
    params: dict[str, torch.Tensor]
    marginals: dict[str, torch.Tensor]
    log_likelihood: float
    log_joint: float
    diagnostics: ChainDiagnostics
    problems: list[str]


def _summarise(
    program: ProgramModel, draws: dict[str, torch.Tensor], stats: Mapping[str, np.ndarray]
) -> _Summary:
    """Posterior mean, its scores and marginals, and the chains' diagnostics."""
    params = {name: value.mean((0, 1)) for name, value in draws.items()}
    post = posterior(program, params)
    diagnostics = chain_diagnostics(draws, stats.get("diverging"))
    return _Summary(
        params,
        post.marginals,
        float(post.log_likelihood),
        float(post.log_joint),
        diagnostics,
        chain_problems(diagnostics),
    )


def _mixture_setup(
    spec: Mixture, model_args: tuple[Any, ...], model_kwargs: Any, init: Any, seed: int | None
) -> tuple[ProgramModel, dict[str, torch.Tensor], Any, torch.Tensor]:
    """The Mixture's Pyro program, its k-means++ (or given) start, family and data."""
    if model_kwargs:
        raise SpecError("model_kwargs is for Pyro programs; a Mixture takes only the data")
    if len(model_args) != 1:
        raise SpecError(
            f"fit(Mixture, data) takes exactly one data argument; got {len(model_args)}"
        )
    raw = model_args[0]
    floating = isinstance(raw, torch.Tensor) and raw.dtype in (torch.float32, torch.float64)
    data = as_data(raw, dtype=raw.dtype if floating else torch.float64)
    family = spec.bind(data)
    values = site_values(spec, family, data, init, seed)
    return ProgramModel(spec.model(data, params=values)), values, family, data


def fit_nuts(
    model: Any,
    model_args: tuple[Any, ...] = (),
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    init: Any = None,
    seed: int | None = None,
    progress: bool = False,
    **options: Any,
) -> BayesFit:
    r"""Sample the posterior of a model's continuous latents with NUTS, z summed out.

    Args:
        model: a Pyro program, or a :class:`~pyroem.Mixture` (then ``model_args`` is
            ``(data,)``). Every continuous latent must have a prior: a ``pyro.param``
            site cannot be sampled.
        model_args: the program's positional arguments.
        model_kwargs: its keyword arguments.
        init: starting values ``{site: value}`` (any subset; the rest from a prior
            draw), or a previous fit; for a ``Mixture`` also ``"kmeans++"`` (default),
            ``"kmeans"``, ``"random"``, ``"random_from_data"``.
        seed: makes every chain, and so the fit, reproducible.
        progress: show a progress bar over all chains.
        **options: ``num_samples`` (1000 draws per chain after warm-up), ``warmup_steps``
            (500, adapting step size and a diagonal mass matrix), ``num_chains`` (4, run
            one after another), ``target_accept_prob`` (0.8), ``max_tree_depth`` (10),
            ``dense_mass`` (False: a full mass matrix if True), ``init_strategy``
            (``"init"`` when ``init`` is given or the model is a Mixture: every chain
            starts at ``init`` moved by ``N(0, init_jitter²)`` in the unconstrained
            space; otherwise ``"uniform"``, Pyro's uniform draw on (-2, 2) unconstrained;
            also ``"median"``, ``"sample"`` (a prior draw)), ``init_jitter`` (0.1),
            ``align`` (``"chain"``: components aligned per chain before the posterior
            mean and R-hat; ``"draw"``: per draw as well; ``None``: not aligned; only
            where component axes are known, see :mod:`pyroem.outputs.alignment`),
            ``component_axes`` (``{site: axis}`` for a program without a
            ``"components"`` plate), ``chunk_size`` (65536 data rows per block of a
            Mixture's likelihood), ``jit_compile`` (False: a Pyro program's potential
            compiled by the PyTorch JIT if True, about twice as fast, for programs whose
            control flow does not depend on the parameter values).

    Returns:
        A :class:`BayesFit`; :class:`~pyroem.errors.MCMCWarning` if the chains fail
        R-hat, ESS or divergence checks.

    Raises:
        NotSupportedError: the model has ``pyro.param`` sites, or nothing to sample.
    """
    started = time.perf_counter()
    is_mixture = isinstance(model, Mixture)
    init = fit_start(init) if is_mixture else program_init(init)
    settings = _settings(options, has_init=init is not None or is_mixture)
    if is_mixture:
        program, start, family, data = _mixture_setup(model, model_args, model_kwargs, init, seed)
        _check_sampleable(program)
        terms = _mixture_log_joint(model, family, data, settings.chunk_size)
        pointwise = _mixture_pointwise(model, family, data, settings.chunk_size)
        transforms = _unconstraining(program)
        potential = _potential(terms, transforms)
    else:
        program = _SampledProgram(model, model_args, model_kwargs)
        _check_sampleable(program)
        terms = _program_terms(program)
        pointwise = None
        transforms = _unconstraining(program)
        potential = _program_potential(program, transforms, settings.jit_compile)
    seeds = _chain_seeds(seed, settings.num_chains)
    if not is_mixture:
        start = initial_values(program, init, seeds[0] % (2**31 - 1))
    sampling_started = time.perf_counter()
    chains = []
    total = settings.num_chains * (settings.warmup_steps + settings.num_samples)
    with tqdm(total=total, desc="nuts", disable=not progress, leave=False) as bar:
        for index, chain_seed in enumerate(seeds):
            bar.set_description(f"nuts chain {index + 1}/{settings.num_chains}")
            with torch.random.fork_rng(), pyro.validation_enabled(False), warnings.catch_warnings():
                # The JIT (jit_compile=True) traces the potential on its first call.
                warnings.filterwarnings(
                    "ignore", message=".*torch.jit.trace", category=DeprecationWarning
                )
                torch.manual_seed(chain_seed)
                initial = _initial_point(program, transforms, potential, start, settings)
                chains.append(_run_chain(potential, initial, settings, bar))
    draws = {
        name: torch.stack([transforms[name].inv(chain.unconstrained[name]) for chain in chains])
        for name in program.params
    }
    stats = {key: np.stack([chain.stats[key] for chain in chains]) for key in chains[0].stats}
    stats["diverging"] = stats["diverging"].astype(bool)
    with torch.no_grad():
        scores = [
            [terms({n: v[c, s] for n, v in draws.items()}) for s in range(settings.num_samples)]
            for c in range(settings.num_chains)
        ]
    total_log_likelihood = np.array([[float(ll) for ll, _ in row] for row in scores])
    stats["log_joint"] = np.array([[float(ll + lp) for ll, lp in row] for row in scores])
    stats["total_log_likelihood"] = total_log_likelihood
    history = History(
        stats["log_joint"].mean(0),
        total_log_likelihood.mean(0),
        np.stack([chain.elapsed for chain in chains]).mean(0),
    )
    axes = settings.component_axes
    if axes is None and settings.align is not None:
        try:
            axes = program_component_axes(program, start)
        except SpecError:
            axes = None
    permutations = None
    if axes is not None and settings.align is not None:
        aligned = align_draws(draws, axes, per_draw=settings.align == "draw")
        draws, permutations = aligned.draws, aligned.permutations
    summary = _summarise(program, draws, stats)
    if summary.problems:
        warnings.warn(
            "NUTS chains look unreliable: " + "; ".join(summary.problems) + "; draw more "
            "samples (num_samples, warmup_steps), raise target_accept_prob, or check the model",
            MCMCWarning,
            stacklevel=2,
        )
    first_trace = program.trace(summary.params)
    options_record = {
        **settings._asdict(),
        "seed": seed,
        "init": init if isinstance(init, str) else ("kmeans++" if init is None else "params"),
        "sampling_seconds": time.perf_counter() - sampling_started,
    }
    result = BayesFit(
        program=program,
        method="nuts",
        values=summary.params,
        m_step_kinds=dict.fromkeys(program.params, "nuts"),
        marginals=summary.marginals,
        log_likelihood=summary.log_likelihood,
        log_joint=summary.log_joint,
        history=history,
        converged=not summary.problems,
        num_iterations=settings.num_samples,
        num_data=num_observations(first_trace, program),
        restart_objectives=[float(row.mean()) for row in stats["log_joint"]],
        options=options_record,
        draws=draws,
        sample_stats=stats,
        diagnostics=summary.diagnostics,
        problems=summary.problems,
        component_axes=axes,
        permutations=permutations,
        pointwise=pointwise,
    )
    result.runtime = time.perf_counter() - started
    return result
