"""MAP-EM on a Pyro program: exact enumeration E-step, ECM M-step."""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from torch.distributions import constraints

from pyroem.em import Engine, EStepResult, Iteration, MStepResult, run_em
from pyroem.engines.distributed import LOCAL, Collective
from pyroem.engines.program_stepwise import (
    ProgramStepwiseEngine,
    StepwiseOptions,
    check_closed_forms,
    check_stepwise_plate,
    check_uses_fixed,
    minibatch_error,
    minibatch_plate,
    stepwise_plate,
)
from pyroem.engines.squarem import ACCELERATIONS, SquaremEngine
from pyroem.errors import (
    ConvergenceWarning,
    DataError,
    NotSupportedError,
    PyroEMError,
    SpecError,
)
from pyroem.estep.compiled import CompiledEStep, CompiledProgram
from pyroem.estep.program import posterior
from pyroem.estep.recognised_mixture import MixtureEStep, MixtureKernel
from pyroem.fits.checkpoint import checkpointing
from pyroem.fits.core import Fit
from pyroem.fits.program import ProgramFit
from pyroem.model.program import Inject, ProgramModel, check_full_plates, sample_sites
from pyroem.model.space import (
    jacobian_sites,
    log_jacobian,
    resolve_space,
    unbounded_error,
    unbounded_priors,
)
from pyroem.model.transforms import unconstraining
from pyroem.mstep.gradient import MarginalObjective, ecme_m_step, gradient_m_step
from pyroem.mstep.recognised import (
    ADJUSTABLE_PRIORS,
    LOCATION_SLOTS,
    SCALE_SLOTS,
    ClosedForm,
    closed_form_update,
    prior_weight,
    recognise,
    summed_over_shards,
    unwrap_distribution,
)
from pyroem.mstep.stacked import StackedUpdate

__all__ = [
    "INNER_TOL_FRACTION",
    "SHORT_RUNS",
    "SHORT_RUNS_AGREE",
    "SHORT_RUNS_MAX_DATA",
    "SHORT_RUN_AGREE_TOL",
    "SHORT_RUN_GRADIENT_STEPS",
    "SHORT_RUN_MAX_ITER",
    "SHORT_RUN_MAX_RATE",
    "SHORT_RUN_TOL",
    "agreeing_runs",
    "block_order",
    "broadcast_values",
    "check_sharded",
    "closed_form_sweep",
    "counted_once",
    "drawn_sites",
    "fit_program",
    "initial_values",
    "needs_trace",
    "num_observations",
    "program_init",
    "resolve_seed",
    "run_limit",
    "summed_over_ranks",
    "uniform_values",
    "unsharded_sites",
]

M_STEPS = ("auto", "gradient")

SHORT_RUNS = 20
"""Short EM runs of the default start of map-em on a small Pyro program (em-EM)."""

SHORT_RUN_TOL = 1e-3
"""Tolerance (objective change per data point) at which a short run stops."""

SHORT_RUN_MAX_ITER = 50
"""Most iterations of one short run."""

SHORT_RUNS_MAX_DATA = 10_000
"""Programs with at most this many observed data points start from short runs."""

SHORT_RUN_GRADIENT_STEPS = 5
"""Most L-BFGS iterations of a gradient M-step in a short run."""

SHORT_RUNS_AGREE = 3
"""The short runs stop once this many have found the best optimum so far (their limits
agree to :data:`SHORT_RUN_AGREE_TOL` per data point; see :func:`agreeing_runs`)."""

SHORT_RUN_AGREE_TOL = 5e-4
"""Two short runs whose limits differ by less than this per data point are taken to
have found the same optimum: half :data:`SHORT_RUN_TOL`, because at the full tolerance
runs of hmm.py's model_1 (240 points) heading to optima 0.07 nats apart agreed."""

SHORT_RUN_MAX_RATE = 0.8
"""Cap on the rate of linear convergence of a short run's limit estimate
(:func:`run_limit`): the limit lies at most ``rate / (1 - rate) = 4`` last gains on."""

AUTO_SWITCH_RATE = 0.5
"""``accelerate="auto"``: a program with gradient M-steps switches from plain EM to
SQUAREM once a gain is more than this fraction of the one before (see
:class:`~pyroem.engines.squarem.SquaremEngine`)."""

INNER_TOL_FRACTION = 0.1
"""A gradient M-step's L-BFGS stops once its gains fall below this fraction of the
fit's ``tol × N`` (see :func:`~pyroem.mstep.gradient.ecme_m_step`)."""

# Run E-steps through CompiledProgram while the program keeps its structure; off, every
# E-step is a full trace (the reference the fast path is tested against).
_COMPILED = True

# Sort a program's sites on its first enumerated trace where that run can be both; off,
# the sites are sorted on a run of their own (the reference the merged run is timed
# against in bench/bench_program.py).
_SORT_ENUMERATED = True


def _as_value(name: str, value: Any, program: ProgramModel, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device).detach().clone()
    _check_init(name, tensor, program)
    return tensor


def _check_init(name: str, tensor: torch.Tensor, program: ProgramModel) -> None:
    """Raise if ``init[name]`` has the wrong shape, non-finite entries or is outside
    the site's support."""
    site = program.params[name]
    if tensor.shape != site.shape:
        raise SpecError(
            f"init[{name!r}] has shape {tuple(tensor.shape)}; the site's value has shape "
            f"{tuple(site.shape)}"
        )
    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"init[{name!r}] has NaN or infinite entries")
    if not bool(site.constraint.check(tensor).all()):
        shown = tensor.tolist() if tensor.numel() <= 6 else f"shape {tuple(tensor.shape)}"
        raise SpecError(
            f"init[{name!r}] = {shown} is outside the site's support {site.constraint}; give "
            "a value inside it, or leave the site out of init to start from a prior draw"
        )


def _init_tensor(name: str, value: Any) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise SpecError(f"init[{name!r}] must be a number or a tensor; got {value!r}") from err


def initial_values(
    program: ProgramModel, init: Mapping[str, Any] | Callable[[int], Any] | None, seed: int
) -> dict[str, torch.Tensor]:
    """Starting parameters: ``init`` where given (a callable is called with ``seed``);
    otherwise a prior draw for sample sites (seeded, drawn given the ``init`` values)
    and the program's value for ``pyro.param`` sites.

    Raises:
        SpecError: ``init`` names an unknown site, or a value of the wrong shape/support.
    """
    init = dict((init(seed) if callable(init) else init) or {})
    unknown = sorted(set(init) - set(program.params))
    if unknown:
        raise SpecError(
            f"init names sites that are not parameters of the model: {unknown}; "
            f"the parameters are {list(program.params)}"
        )
    likes = dict(program.param_inits)
    fixed = {name: _init_tensor(name, value) for name, value in init.items()}
    for name, value in fixed.items():
        # Before the program runs with them: an invalid value would fail inside it.
        _check_init(name, value, program)
    drawn = [name for name, site in program.params.items() if site.kind == "sample"]
    if set(drawn) <= set(init):
        # Nothing to draw: a run would only hand back the injected values.
        likes.update({name: fixed[name].detach() for name in drawn})
    else:
        with torch.random.fork_rng(), pyro.get_param_store().scope(), poutine.block():
            torch.manual_seed(seed)
            trace = poutine.trace(Inject(fixed)(program.model)).get_trace(
                *program.model_args, **program.model_kwargs
            )
        for name, site in sample_sites(trace):
            if name in program.params:
                likes[name] = site["value"].detach()
    values = {}
    for name in program.params:
        if name in init:
            values[name] = _as_value(name, init[name], program, likes[name])
        else:
            values[name] = likes[name].clone()
    return values


def uniform_values(
    program: ProgramModel,
    first: Mapping[str, torch.Tensor],
    seed: int,
    sites: list[str] | None = None,
    radius: float = 2.0,
) -> dict[str, torch.Tensor]:
    """``first`` with every site of ``sites`` (default: the sample sites) redrawn
    uniformly in ``(-radius, radius)`` in its unconstrained coordinates
    (:func:`pyroem.model.transforms.unconstraining`; Stan's and Pyro's
    ``init_to_uniform``), from a generator seeded with ``seed``."""
    if sites is None:
        sites = [name for name, site in program.params.items() if site.kind == "sample"]
    generator = torch.Generator().manual_seed(seed)
    values = dict(first)
    for name in sites:
        site = program.params[name]
        like = first[name]
        transform = unconstraining(name, site.constraint)
        shape = transform.forward_shape(site.shape)
        u = (torch.rand(shape, generator=generator, dtype=like.dtype) * 2 - 1) * radius
        with torch.no_grad():
            values[name] = transform.inv(u.to(like.device)).reshape(site.shape)
    return values


def drawn_sites(program: ProgramModel, seed: int) -> list[str]:
    """The sites the short runs start from draws of: the ``pyro.sample`` parameters.

    In a program with none, the ``pyro.param`` sites whose initial value is itself
    random (the program draws it: another run, with its own parameter store and torch
    seeded with ``seed + 1``, gives another value, as hmm.py's ``torch.rand`` starts do)
    and whose declared constraint is not ``real`` (a simplex, an interval, positive); the
    program's own values are then one start among the draws. A fixed initial value is a
    start the author chose, kept as it is; a ``real`` site (Pyro's default constraint:
    it may be used as a probability all the same) and the weights of ``pyro.module``
    networks keep their values, since the constraint does not say where they are
    valid."""
    samples = [name for name, site in program.params.items() if site.kind == "sample"]
    if samples:
        return samples
    candidates = [
        name
        for name, site in program.params.items()
        if name not in program.module_params and not _is_real(site.constraint)
    ]
    if not candidates:
        return []
    watcher = _ParamWatcher(candidates)
    with torch.random.fork_rng(), pyro.get_param_store().scope(), poutine.block():
        torch.manual_seed(seed + 1)
        depth = len(_PYRO_STACK)
        try:
            with watcher:
                program.model(*program.model_args, **program.model_kwargs)
        except _ParamsSeen:
            # The handlers the program entered left the stack as the exception passed.
            del _PYRO_STACK[depth:]
    return [
        name
        for name, value in watcher.values.items()
        if not torch.equal(value, program.param_inits[name])
    ]


class _ParamsSeen(BaseException):
    """Stops a run once the watched ``pyro.param`` sites have their values (a
    ``BaseException``, so that a program's own ``except Exception`` does not catch it)."""


class _ParamWatcher(Messenger):
    """Records the initial values of ``names`` and stops the program once all are seen:
    a 10,000-step loop after the declarations need not run."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.left = set(names)
        self.values: dict[str, torch.Tensor] = {}

    def _pyro_post_param(self, msg: Any) -> None:
        name = msg["name"]
        if name in self.left:
            self.values[name] = msg["value"].detach().clone()
            self.left.discard(name)
            if not self.left:
                raise _ParamsSeen


def _is_real(constraint: Any) -> bool:
    """Is ``constraint`` Pyro's default ``real`` (or ``real`` over event dimensions)?"""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint is constraints.real


def program_init(init: Any) -> Mapping[str, Any] | Callable[[int], Any] | None:
    """A Pyro program's ``init``: ``{site name: value}``, ``None``, a previous fit (its
    parameters), or a callable ``seed -> {site name: value}`` (one start per restart).

    Raises:
        SpecError: anything else.
    """
    if isinstance(init, Fit):
        return init.params
    if init is not None and not isinstance(init, Mapping) and not callable(init):
        raise SpecError(
            "init for a Pyro program is a dict {site name: value}, a previous fit, or "
            f"'prior' (map-em from one prior draw); got {init!r}"
        )
    return init


def resolve_seed(seed: int | None) -> int:
    """``seed``, or a fresh one from torch's global generator when it is ``None``."""
    return int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed


def num_observations(trace: Any, program: ProgramModel) -> int:
    """``N`` of the convergence tolerance: the observed data points of a trace, each
    observed site counted by its batch entries (its event dimensions are one point)."""
    total = 0
    for name in program.observed:
        if name not in trace.nodes:
            # Observed only in some runs (control flow on the parameters).
            continue
        site = trace.nodes[name]
        value = site["value"]
        total += math.prod(value.shape[: value.dim() - site["fn"].event_dim])
    return max(total, 1)


def block_order(program: ProgramModel, blocks: Mapping[str, ClosedForm | None]) -> list[str]:
    """Closed-form blocks in update order: locations first, then children before parents.

    A location block goes before the scale blocks of the same sites, as in
    scikit-learn's and hmmlearn's M-steps; and a mean whose prior depends on a
    covariance goes before that covariance, which for Normal–Inverse-Wishart
    priors makes one ECM sweep the joint mode.
    """
    order = [name for name in reversed(list(program.params)) if blocks[name] is not None]
    return sorted(order, key=lambda name: blocks[name].slot not in LOCATION_SLOTS)  # type: ignore[union-attr]


def needs_trace(blocks: Mapping[str, ClosedForm | None], order: list[str]) -> list[bool]:
    """Before each block: must the program run again, because an earlier block in the
    sweep changed a site this block reads? A scale block reads changed locations and
    changed parameter values without a new run (see ``closed_form_update``)."""
    touched: dict[str, set[str]] = {}
    needs = []
    for name in order:
        block = blocks[name]
        assert block is not None
        sites = {use.site for use in block.uses}
        tags = set().union(*(touched.get(site, set()) for site in sites))
        patchable = block.slot in SCALE_SLOTS and tags <= {"location", "value"}
        again = bool(tags) and not patchable
        needs.append(again)
        if again:
            touched = {}
        for site in sites:
            touched.setdefault(site, set()).add(
                "location" if block.slot in LOCATION_SLOTS else "other"
            )
        touched.setdefault(name, set()).add("value")
    return needs


def closed_form_sweep(
    program: ProgramModel,
    blocks: Mapping[str, ClosedForm | None],
    order: list[str],
    retrace: list[bool],
    trace: Any,
    weights: Mapping[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    start: int = 0,
    parameters_once: bool = False,
) -> None:
    """The closed-form blocks of one ECM sweep, from block ``start`` of ``order`` on,
    updating ``values`` in place.

    Args:
        program: the program.
        blocks: the recognised blocks by site.
        order: :func:`block_order`; ``retrace``: :func:`needs_trace` of that order.
        trace: a full trace of the program at ``values``.
        weights: the weight of every table in Q (exact posterior marginals, or Monte
            Carlo frequencies).
        values: the parameter values.
        start: the first block to update.
        parameters_once: in a distributed fit, whether ``weights`` count the parameter
            sites on one rank only (zero on the others), so that every block's
            statistics are summed over the ranks; otherwise a block read by parameters
            only takes its statistics as they are (the same on every rank).
    """
    changes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for step, (name, again) in enumerate(zip(order, retrace, strict=True)):
        if step < start:
            continue
        if again and step > start:
            trace = program.trace(values)
            changes = {}
        block = blocks[name]
        assert block is not None
        with nullcontext() if parameters_once else _held_whole(program, block):
            new = closed_form_update(program, block, trace, weights, changes, blocks)
        changes[name] = (values[name], new)
        values[name] = new


def counted_once(
    program: ProgramModel, weights: Mapping[str, torch.Tensor], collective: Collective
) -> Mapping[str, torch.Tensor]:
    """``weights`` with the parameter sites' own weights zero on every rank but rank 0:
    summed over the ranks, a parameter's uses in a closed form (a mean's prior read by a
    covariance's, a centre read by the locations) count once, while the data's count on
    every rank's shard."""
    if collective.rank == 0:
        return weights
    return {
        name: torch.zeros_like(weight) if name in program.params else weight
        for name, weight in weights.items()
    }


def _read_by_parameters(program: ProgramModel, block: ClosedForm) -> bool:
    """Is ``block`` read by parameters only (a hierarchical prior's hyperparameter)?"""
    return all(use.site in program.params for use in block.uses)


def _read_by_both(program: ProgramModel, block: ClosedForm | None) -> bool:
    """Is ``block`` read by parameters (every rank holds them whole) and by the data
    (each rank holds its shard)?"""
    if block is None:
        return False
    return not _read_by_parameters(program, block) and any(
        use.site in program.params for use in block.uses
    )


def _as_they_are(sums: list[torch.Tensor]) -> list[torch.Tensor]:
    return sums


def _held_whole(program: ProgramModel, block: ClosedForm) -> Any:
    """A block read by parameters only has the same statistics on every rank of a
    distributed fit (every rank holds the parameters whole): they are not summed over
    the ranks."""
    if _read_by_parameters(program, block):
        return summed_over_shards(_as_they_are)
    return nullcontext()


def _adjust_blocks(
    program: ProgramModel,
    found: dict[str, ClosedForm | None],
    trace: Any,
    jacobian: list[str],
) -> dict[str, ClosedForm | None]:
    """The recognised blocks, told whether they carry the log-Jacobian; a block whose
    prior is weighted (``poutine.scale``/``mask``) or moved by the Jacobian in a way no
    closed form here adjusts for goes to the gradient M-step."""
    adjusted: dict[str, ClosedForm | None] = {}
    for name, block in found.items():
        if block is None or program.params[name].kind != "sample":
            adjusted[name] = block
            continue
        site = trace.nodes[name]
        prior = unwrap_distribution(site["fn"])[0]
        on_boundary = name in jacobian and block.slot not in LOCATION_SLOTS
        needs = prior_weight(site) is not None or on_boundary
        if needs and not isinstance(prior, ADJUSTABLE_PRIORS):
            adjusted[name] = None
        else:
            adjusted[name] = block._replace(jacobian=name in jacobian)
    return adjusted


class _Engine(Engine):
    """MAP-EM on a Pyro program: the exact E-step and one ECM sweep as M-step.

    While the program keeps the structure of its first trace, an E-step is a light
    run of the program plus a compiled contraction (:class:`CompiledProgram`) and
    the closed forms read stacked uses (:class:`StackedUpdate`); the numbers are
    those of :func:`posterior` and :func:`closed_form_update`. A run whose structure
    differs switches the fit, from there on, to those full functions.
    """

    def __init__(
        self,
        program: ProgramModel,
        found: dict[str, ClosedForm | None],
        gradient_steps: int,
        first: dict[str, torch.Tensor],
        first_trace: Any,
        layout: CompiledProgram,
        restart_values: Callable[[int], dict[str, torch.Tensor]],
        name: str,
        jacobian: list[str],
        collective: Collective = LOCAL,
    ) -> None:
        self.name = name
        self.collective = collective
        # N of the whole data (every rank's shard), so the ranks stop together.
        self.num_data = collective.sum(num_observations(first_trace, program))
        self.restart_values = restart_values
        self.program = program
        self.jacobian = jacobian
        self.found = found
        self.gradient_steps = gradient_steps
        self.first = first
        self.first_trace = first_trace
        self.order = block_order(program, found)
        self.retrace = needs_trace(found, self.order)
        self.gradient_sites = [name for name in program.params if found[name] is None]
        self.layout = layout
        # A closed form read by both parameters and data, in a distributed fit: the
        # parameters' weights count on rank 0 only (see m_step), on full traces.
        self.parameters_once = collective is not LOCAL and any(
            _read_by_both(program, block) for block in found.values()
        )
        usable = _COMPILED and layout.supported and not self.parameters_once
        self.compiled: CompiledProgram | None = self.layout if usable else None
        self.updates: dict[str, StackedUpdate] = {}
        # A recognised mixture's E-steps and sweeps without runs of the program.
        self.kernel = (
            MixtureKernel.build(program, layout, found, self.order, first, first_trace)
            if self.compiled is not None and collective is LOCAL and not jacobian
            else None
        )
        # The values and compiled E-step of the last M-step's validated end point.
        self.ready: tuple[Mapping[str, torch.Tensor], CompiledEStep] | None = None
        # The fit's tolerance per data point (0 while the short runs go on): a gradient
        # M-step stops where its gains fall below a tenth of tol × N.
        self.tol = 0.0
        # Set while the start's short runs, or the run continued from them, go on.
        self.starts: list[dict[str, torch.Tensor]] | None = None

    def init(self, restart: int) -> MStepResult:
        if self.kernel is not None:
            self.kernel.count = 0  # every run checks its own first E-steps
        if self.starts is not None:
            return MStepResult(self.starts[restart])
        return MStepResult(self.first if restart == 0 else self.restart_values(restart))

    def snapshot(self, values: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The parameters (never changed in place) and whether the compiled path holds."""
        return {"params": dict(values), "compiled": self.compiled is not None}

    def restore(self, snapshot: dict[str, Any], restart: int) -> dict[str, torch.Tensor]:
        if not snapshot["compiled"]:
            self.compiled = None
        return {
            name: value.to(self.first[name].device) for name, value in snapshot["params"].items()
        }

    def e_step(self, values: dict[str, torch.Tensor], validate: bool = False) -> EStepResult:
        """The E-step at ``values``: compiled while the structure holds, else full. In a
        distributed fit the ranks' objectives are summed (:meth:`Collective.reduce`),
        and where one rank's E-step fails every rank raises an error of the same kind
        (:meth:`Collective.agree`), so every rank takes the same branch.

        ``validate``: the program runs with Pyro's argument checks, which raise
        ``ValueError`` where a value lies outside what its distribution accepts (a
        SQUAREM jump of a real ``pyro.param`` used as probabilities)."""
        if self.collective is LOCAL:
            return self._local_e_step(values, validate)
        error, result = None, None
        try:
            result = self._local_e_step(values, validate)
        except Exception as err:  # every rank raises it, below
            error = err
        self.collective.agree(error)
        assert result is not None
        # The ranks' log-likelihoods summed, plus the prior terms of rank 0.
        total = self.collective.reduce(result._replace(stats=None))
        return total._replace(stats=result.stats)

    def _local_e_step(self, values: dict[str, torch.Tensor], validate: bool = False) -> EStepResult:
        """This rank's E-step (the whole fit's in one process)."""
        if validate:
            self.ready = None
            if self.compiled is not None and not self.compiled.replicating:
                checked = self.compiled(values, validate=True)
                if checked is not None:
                    log_likelihood, log_joint = (
                        float(checked.log_likelihood),
                        float(checked.log_joint),
                    )
                    return self._estep(checked, log_likelihood, log_joint, values)
            post = posterior(self.program, values, self.program.trace(values, validate=True))
            return self._estep(post, float(post.log_likelihood), float(post.log_joint), values)
        if self.compiled is not None:
            estep: CompiledEStep | None
            ready, self.ready = self.ready, None
            if values is self.first:
                estep = self.compiled.estimate_trace(self.first_trace)
            elif ready is not None and _same_values(ready[0], values):
                # The gradient M-step's check of its end point ran the program there.
                estep = ready[1]
            elif self.kernel is not None and self.kernel.active:
                found = self.kernel(values)
                if isinstance(found, MixtureEStep):
                    return self._estep(
                        found, float(found.log_likelihood), float(found.log_joint), values
                    )
                estep = found
            else:
                estep = self.compiled(values)
            if estep is not None:
                log_likelihood, log_joint = float(estep.log_likelihood), float(estep.log_joint)
                return self._estep(estep, log_likelihood, log_joint, values)
            self.compiled = None
        trace = self.first_trace if values is self.first else None
        post = posterior(self.program, values, trace)
        return self._estep(post, float(post.log_likelihood), float(post.log_joint), values)

    def _estep(
        self, stats: Any, log_likelihood: float, log_joint: float, values: dict[str, torch.Tensor]
    ) -> EStepResult:
        """The E-step with its objective: the log joint, plus the log-Jacobian in the
        unconstrained space."""
        if not math.isfinite(log_joint):
            raise self._not_finite(log_joint, values)
        return EStepResult(stats, log_joint + self.log_jacobian(values), log_likelihood)

    def _not_finite(self, log_joint: float, values: Mapping[str, torch.Tensor]) -> Exception:
        """The error for a log joint that is not finite at ``values``: a prior unbounded at
        the edge of its support (an input error), or a likelihood that left the finite
        values, e.g. a variance that collapsed onto one data point (ends the restart)."""
        if log_joint == math.inf and unbounded_priors(self.program, self.first_trace):
            return unbounded_error(self.program, self.first_trace)
        edges = sorted(
            name
            for name, value in values.items()
            if value.is_floating_point() and bool((value == 0).any())
        )
        at = f"; parameters with entries at 0: {edges}" if edges else ""
        return PyroEMError(
            f"the log joint of {self.program.name} is {log_joint} at the current parameters"
            f"{at}. A scale or variance that shrank to 0 around one data point (an unbounded "
            "likelihood), or a probability of 0 where data lie, ends this start: give the "
            "scale a prior (e.g. InverseGamma) or a lower bound, start elsewhere (init=), or "
            "fit more restarts (n_init=)"
        )

    def log_jacobian(self, values: Mapping[str, torch.Tensor]) -> float:
        """The objective less the log joint (0 in the constrained space)."""
        if not self.jacobian:
            return 0.0
        with torch.no_grad():
            return float(log_jacobian(self.program, values, self.jacobian))

    def m_step(self, stats: Any, values: dict[str, torch.Tensor], iteration: int) -> MStepResult:
        """One ECM sweep: closed-form blocks in order, then the gradient blocks."""
        values = dict(values)
        with summed_over_ranks(self.collective):
            if isinstance(stats, MixtureEStep):
                assert self.kernel is not None
                self.kernel.m_step(stats, values)
            elif isinstance(stats, CompiledEStep):
                self._compiled_sweep(stats, values)
            else:
                weights = stats.weights
                if self.parameters_once:
                    weights = counted_once(self.program, weights, self.collective)
                closed_form_sweep(
                    self.program,
                    self.found,
                    self.order,
                    self.retrace,
                    stats.trace,
                    weights,
                    values,
                    parameters_once=self.parameters_once,
                )
        if self.gradient_sites:
            # In a distributed fit each rank's objective and Q cover its shard, rank 0's
            # with the prior and Jacobian terms; values and gradients are summed over the
            # ranks, so every rank takes the same steps.
            group = self.collective
            shards = None if group is LOCAL else group.sum_tensors
            priors = group.rank == 0
            jacobian = self.jacobian if priors else []
            # ECME: the gradient block climbs the objective itself (see ecme_m_step).
            objective = MarginalObjective(self.program, self.compiled, jacobian, priors)
            update = ecme_m_step(
                self.program,
                values,
                self.gradient_sites,
                objective,
                max_steps=self.gradient_steps,
                shards=shards,
                tolerance=max(INNER_TOL_FRACTION * self.tol * float(self.num_data), 1e-15),
            )
            if objective.compiled is None:
                self.compiled = None
            elif update is not None and objective.validated is not None:
                self.ready = objective.validated
            if update is None:
                weights = stats.all_weights() if isinstance(stats, CompiledEStep) else stats.weights
                update = gradient_m_step(
                    self.program,
                    values,
                    weights,
                    self.gradient_sites,
                    max_steps=self.gradient_steps,
                    jacobian=jacobian,
                    priors=priors,
                    shards=shards,
                )
            values.update(update)
        return MStepResult(values)

    def _compiled_sweep(self, estep: CompiledEStep, values: dict[str, torch.Tensor]) -> None:
        """Closed forms on stacked uses."""
        assert self.compiled is not None
        sites: Mapping[str, Any] | None = estep.sites
        changes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        cache: dict[Any, torch.Tensor] = {}
        for step, (name, again) in enumerate(zip(self.order, self.retrace, strict=True)):
            if again:
                sites = self.compiled.run(values)
                changes = {}
                cache = {}
            if sites is None:
                self.compiled = None
                weights = estep.all_weights()
                closed_form_sweep(
                    self.program,
                    self.found,
                    self.order,
                    self.retrace,
                    self.program.trace(values),
                    weights,
                    values,
                    start=step,
                )
                return
            block = self.found[name]
            assert block is not None
            if name not in self.updates:
                self.updates[name] = StackedUpdate(block, self.found, sites, estep)
            with _held_whole(self.program, block):
                new = self.updates[name](values[name], estep, sites, changes, cache)
            changes[name] = (values[name], new)
            values[name] = new

    def marginals(self, stats: Any) -> dict[str, torch.Tensor] | None:
        """Posterior marginals of the enumerated sites from a final E-step; ``None``
        when that E-step was the mixture kernel's and the program's own E-step at the
        same values disagrees with it (the kernel is then off: fit again)."""
        if isinstance(stats, MixtureEStep):
            assert self.kernel is not None
            estep = self.layout(stats.values)
            if estep is None or not self.kernel.agrees(stats, estep):
                self.kernel.active = False
                return None
            stats = estep
        if isinstance(stats, CompiledEStep):
            return self.layout.marginals(stats)
        return stats.marginals


def _same_values(seen: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``values`` hold the very tensors of ``seen`` (never changed in place)."""
    return seen.keys() == values.keys() and all(seen[name] is values[name] for name in seen)


@contextmanager
def summed_over_ranks(group: Collective) -> Iterator[None]:
    """The closed forms' statistics summed over the ranks of a distributed fit."""
    if group is LOCAL:
        yield
        return
    with summed_over_shards(group.sum_tensors):
        yield


def broadcast_values(
    group: Collective, program: ProgramModel, values: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rank 0's parameter values on every rank."""
    if group is LOCAL:
        return values
    names = list(program.params)
    shared = group.broadcast(tuple(values[name] for name in names))
    return dict(zip(names, shared, strict=True))


def unsharded_sites(program: ProgramModel, trace: Any) -> list[str]:
    """The observed or latent sites of ``trace`` that lie in no plate of data points (a
    plate that holds no parameter): each rank of a distributed fit would count them."""
    nodes = trace.nodes
    parameter_plates = {
        frame.name for name in program.params for frame in nodes[name]["cond_indep_stack"]
    }
    plates = {frame.name for site in nodes.values() for frame in site.get("cond_indep_stack", ())}
    return [
        name
        for name, site in nodes.items()
        if site["type"] == "sample"
        and name not in program.params
        and name not in plates  # a plate's own record
        and not any(frame.name not in parameter_plates for frame in site["cond_indep_stack"])
    ]


def check_sharded(program: ProgramModel, first_trace: Any) -> None:
    """Raise unless the fit splits exactly over shards of the data: every observed or
    enumerated site lies in a plate of data (one that holds no parameter). Closed forms
    sum their statistics over the shards (a hierarchical prior's hyperparameter read by
    parameters only takes the same statistics on every rank; one read by both counts the
    parameters' uses on rank 0 only). Parameters without a closed form take gradient
    steps on the ranks' summed objective and Q (their values and gradients are sums over
    the shards)."""
    unsharded = unsharded_sites(program, first_trace)
    if unsharded:
        raise NotSupportedError(
            f"a distributed fit of a Pyro program splits the data over the ranks by its "
            f"plates, but the sites {unsharded} lie in no plate of data points (each rank "
            "would count them once): put them inside the plate over the data, or pass "
            "distributed=False to fit in each process alone"
        )


def _squarem(engine: _Engine, switch_rate: float | None = None) -> SquaremEngine:
    """SQUAREM over the program's EM map, extrapolating in the unconstrained
    coordinates of every parameter (so every extrapolated point is valid)."""
    params = engine.program.params
    transforms = {name: unconstraining(name, site.constraint) for name, site in params.items()}

    def encode(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([transforms[name](values[name]).reshape(-1) for name in params])

    def decode(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        values, offset = {}, 0
        with torch.no_grad():
            for name, transform in transforms.items():
                shape = transform.forward_shape(params[name].shape)
                size = math.prod(shape)
                u = vector[offset : offset + size].reshape(shape)
                values[name] = transform.inv(u).reshape(params[name].shape)
                offset += size
        return values

    if not any(_declared_real(site.constraint) for site in params.values()):
        return SquaremEngine(engine, encode, decode, switch_rate)

    def checked(values: dict[str, torch.Tensor]) -> EStepResult:
        # A real-declared parameter used as, say, probabilities can jump outside what
        # its use accepts: such jumps are scored with Pyro's argument checks, and a jump
        # the program cannot run at (its error, on every rank) is rejected, not fatal.
        try:
            return engine.e_step(values, validate=True)
        except (NotSupportedError, DataError) as error:
            message = f"the program cannot be run at the extrapolated point: {error}"
            raise ValueError(message) from error

    return SquaremEngine(engine, encode, decode, switch_rate, checked)


def _declared_real(constraint: Any) -> bool:
    """Whether a parameter declared with ``constraint`` is unconstrained (``real``,
    ``real_vector``, or ``independent(real)``): SQUAREM's jumps in its coordinates are
    not bounded by any support its uses may have."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    return constraint is constraints.real


def run_limit(objectives: Any) -> float:
    """Where an EM run whose objectives are ``objectives`` is heading: Aitken's Δ²
    extrapolation of its last three values, ``f + Δ r / (1 - r)`` with ``Δ`` the last
    gain and ``r`` the ratio of the last two gains (linear convergence), ``r`` capped at
    :data:`SHORT_RUN_MAX_RATE`; the last value where fewer than three are known or the
    gains are not positive."""
    values = [float(value) for value in objectives]
    if len(values) < 3:
        return values[-1]
    gain, before = values[-1] - values[-2], values[-2] - values[-3]
    if not gain > 0 or not before > 0:
        return values[-1]
    rate = min(gain / before, SHORT_RUN_MAX_RATE)
    return values[-1] + gain * rate / (1 - rate)


def agreeing_runs(limits: list[float], tolerance: float) -> int:
    """How many runs agree with the best: the runs whose limit (:func:`run_limit`; NaN for
    a failed run) is within ``tolerance`` of the highest one, that one included."""
    finite = [value for value in limits if math.isfinite(value)]
    if not finite:
        return 0
    best = max(finite)
    return sum(best - value <= tolerance for value in finite)


def _short_runs(
    engine: _Engine, seed: int, max_iter: int, sites: list[str]
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """em-EM's start (Biernacki, Celeux & Govaert 2003) with a stopping rule: up to
    :data:`SHORT_RUNS` runs, one after another, each to :data:`SHORT_RUN_TOL` (at most
    :data:`SHORT_RUN_MAX_ITER` and ``max_iter`` iterations; gradient M-steps of at most
    :data:`SHORT_RUN_GRADIENT_STEPS` L-BFGS iterations), from the first start (the prior
    draw at ``seed`` and the program's ``pyro.param`` values) and from uniform draws of
    ``sites`` (:func:`drawn_sites`) in their unconstrained coordinates (seeds ``seed + 1``
    …).

    The runs stop early once :data:`SHORT_RUNS_AGREE` of them have found the best
    optimum so far: their limits (:func:`run_limit`, where each run is heading) are
    within :data:`SHORT_RUN_AGREE_TOL` per data point of the highest. The starts are
    independent draws, so a basin that caught three of them is a large one, and the
    chance that the next draw lands in a better basin that none of the earlier ones
    found is small (the "found k times" rule of multistart stopping: Boender &
    Rinnooy Kan 1987). On a program with one optimum (up to relabelling) the start then
    costs a few short runs, not twenty; on one with many (hmm.py's HMMs on little data)
    the best limit is rarely matched and all runs go.

    The short runs are plain EM whatever ``accelerate`` says, so that a fit with SQUAREM
    and one without start from the same point.

    Returns the end point of the run with the highest objective, and every run's final
    objective (NaN: the run failed).
    """
    engine.starts = [engine.first] + [
        uniform_values(engine.program, engine.first, seed + k, sites) for k in range(1, SHORT_RUNS)
    ]
    steps, fit_tol = engine.gradient_steps, engine.tol
    engine.gradient_steps = min(steps, SHORT_RUN_GRADIENT_STEPS)
    # Their gradient M-steps stop at SHORT_RUN_GRADIENT_STEPS only: the runs' limits are
    # compared to a tighter tolerance than theirs (SHORT_RUN_AGREE_TOL).
    engine.tol = 0.0
    tolerance = SHORT_RUN_AGREE_TOL * engine.num_data

    def enough(runs: list[Any]) -> bool:
        limits = [math.nan if run is None else run_limit(run.history.objective) for run in runs]
        return agreeing_runs(limits, tolerance) >= SHORT_RUNS_AGREE

    try:
        # The short runs neither write nor resume the fit's checkpoint, nor warn.
        with warnings.catch_warnings(), checkpointing(None):
            warnings.simplefilter("ignore", ConvergenceWarning)
            short = run_em(
                engine,
                n_init=SHORT_RUNS,
                tol=SHORT_RUN_TOL,
                max_iter=min(SHORT_RUN_MAX_ITER, max_iter),
                enough=enough,
            )
    finally:
        engine.starts = None
        engine.gradient_steps = steps
        engine.tol = fit_tol
    return short.best.params, list(short.restart_objectives)


def _short_run_start(
    engine: _Engine, init: Any, n_init: int, max_iter: int, seed: int
) -> list[str]:
    """The sites the short runs draw (:func:`drawn_sites`), or none where the fit does
    not start from short runs: only by default (no ``init``, one run, some iterations
    allowed), on a small program, and where every parameter has a closed form.

    A program with gradient M-steps starts from the prior draw instead: each of its
    iterations costs one program run plus several for L-BFGS (about ten on the DPMM
    tutorial and the zero-inflated mixture of ``bench/bench_programs.py``), so twenty
    short runs cost several times the fit they start; there, they also picked a lower
    optimum (DPMM: -867.449 against -866.864 from the prior draw)."""
    program, num_data = engine.program, int(engine.num_data)
    if init is not None or n_init != 1 or max_iter <= 0 or num_data > SHORT_RUNS_MAX_DATA:
        return []
    if engine.gradient_sites:
        return []
    return drawn_sites(program, seed)


# Fits whose block of _frozen_heap froze the heap (and will unfreeze it).
_FREEZING: list[bool] = []


@contextmanager
def _frozen_heap() -> Iterator[None]:
    """Move the existing objects to the collector's permanent generation for the block,
    unless something else already froze objects (then leave the collector alone)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    _FREEZING.append(True)
    try:
        yield
    finally:
        _FREEZING.pop()
        gc.unfreeze()


@contextmanager
def _paused_collector() -> Iterator[None]:
    """No automatic garbage collection in the block (a program's setup: its runs and
    first trace allocate objects by the million, most of them kept, and every full
    collection would rescan all of them: a quarter of the setup of a 20,000-site
    program). Then one collection of the youngest generation (where the block's objects
    all are) frees its cycles, and, in a fit that froze the heap, the survivors join the
    permanent generation until the fit ends (the first trace and the compiled structure
    live as long as the fit; later collections need not rescan them)."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        if _FREEZING:
            gc.collect(0)
            gc.freeze()


@_frozen_heap()
def fit_program(
    model: Callable[..., Any],
    model_args: tuple[Any, ...],
    model_kwargs: Mapping[str, Any] | None,
    *,
    method: str,
    init: Any,
    n_init: int,
    seed: int | None,
    tol: float,
    max_iter: int,
    progress: bool,
    m_step: str,
    gradient_steps: int,
    callback: Callable[[Iteration], Any] | None = None,
    space: str = "auto",
    accelerate: str | None = None,
    collective: Collective = LOCAL,
    stepwise: StepwiseOptions | None = None,
) -> ProgramFit:
    """Fit a Pyro program by MAP-EM (see :func:`pyroem.fit`).

    While it runs, the objects that existed before are kept out of the garbage
    collector's full collections (:func:`gc.freeze`; undone at the end): an EM
    iteration reruns the program and allocates much, and each full collection would
    otherwise rescan every object of the interpreter (torch, Pyro, the user's data).

    In a distributed fit (``collective`` of several ranks) each rank's program holds its
    own shard of the data; the ranks' starts are rank 0's, their objectives, closed-form
    statistics and gradient M-steps' values and gradients are summed over the ranks, and
    every rank returns the same parameters.

    With ``stepwise``, the program's subsampling plate is fitted by stepwise EM
    (:mod:`pyroem.engines.program_stepwise`): ``max_iter`` is ignored for its ``passes``.
    """
    if m_step not in M_STEPS:
        raise SpecError(f"m_step must be one of {M_STEPS}; got {m_step!r}")
    steps_ok = isinstance(gradient_steps, int) and not isinstance(gradient_steps, bool)
    if not steps_ok or gradient_steps < 1:
        raise SpecError(f"gradient_steps must be an integer >= 1; got {gradient_steps!r}")
    if accelerate not in ACCELERATIONS:
        raise SpecError(f"accelerate must be one of {ACCELERATIONS}; got {accelerate!r}")
    with _paused_collector():
        # The first trace below runs the program enumerated: no separate check for that.
        # Where it can, the run that sorts the sites is that first trace.
        program = ProgramModel(
            model,
            model_args,
            model_kwargs,
            check_enumeration=False,
            sort_enumerated=_SORT_ENUMERATED and stepwise is None,
        )
        plate = None if stepwise is None else stepwise_plate(program, stepwise)
        if stepwise is not None and accelerate == "auto":
            accelerate = None
        if stepwise is not None and accelerate is not None:
            raise SpecError(
                f"accelerate={accelerate!r} extrapolates batch EM's map; stepwise EM moves "
                "by its step sizes: pass accelerate=None, or leave out stepwise"
            )
        single = isinstance(init, str) and init == "prior"
        init = program_init(None if single else init)
        if isinstance(init, Mapping) and set(init) >= set(program.params):
            n_init = 1
        base_seed = resolve_seed(seed)
        first = broadcast_values(collective, program, initial_values(program, init, base_seed))
        first_trace = program.sorting_trace(first)
        if first_trace is None:
            first_trace = program.trace(first)
        if stepwise is not None and plate is None:
            # No plate subsamples: pyroem minibatches the plate over the data.
            plate = minibatch_plate(program, stepwise, first_trace)
            try:
                first_trace = program.trace(first)
            except (ValueError, RuntimeError, IndexError, NotSupportedError) as err:
                raise minibatch_error(plate, program, err) from err
        if plate is None:
            check_full_plates(first_trace)
        else:
            check_stepwise_plate(program, first_trace, plate)
        # The structure of the first trace, read once: the E-steps and the probes rerun it.
        layout = CompiledProgram(program, first_trace)
        found = (
            recognise(
                program, first, first_trace, runner=layout.runner, replication=layout.replication
            )
            if m_step == "auto"
            else dict.fromkeys(program.params)
        )
    space = resolve_space(space, program, first_trace)
    jacobian = jacobian_sites(program, first_trace) if space == "unconstrained" else []
    found = _adjust_blocks(program, found, first_trace, jacobian)
    if collective is not LOCAL:
        refused = None
        try:
            check_sharded(program, first_trace)
        except NotSupportedError as err:
            refused = err
        # Every rank raises when one does (its shard may have read the program otherwise).
        collective.check(refused)
    if plate is not None:
        check_closed_forms(found)
        check_uses_fixed(program, found, first, plate, first_trace)
    kinds = {name: "gradient" if block is None else block.kind for name, block in found.items()}
    engine = _Engine(
        program,
        found,
        gradient_steps,
        first,
        first_trace,
        layout,
        lambda restart: broadcast_values(
            collective, program, initial_values(program, init, base_seed + restart)
        ),
        method,
        jacobian,
        collective,
    )
    engine.tol = tol
    looped: Engine = engine
    if accelerate == "squarem":
        looped = _squarem(engine)
    elif accelerate == "auto" and engine.gradient_sites:
        # An iteration with gradient M-steps costs several program runs: once plain EM
        # slows down, SQUAREM's fewer iterations pay for its extra E-steps.
        looped = _squarem(engine, AUTO_SWITCH_RATE)
    online: ProgramStepwiseEngine | None = None
    if plate is not None and stepwise is not None:
        online = looped = ProgramStepwiseEngine(
            engine,
            plate,
            stepwise._replace(batch_size=plate.batch),
            base_seed,
            lambda trace, weights, values: closed_form_sweep(
                program, found, engine.order, engine.retrace, trace, weights, values
            ),
        )
        max_iter = stepwise.passes
    short: list[float] | None = None
    drawn = (
        []
        if single or online is not None
        else _short_run_start(engine, init, n_init, max_iter, base_seed)
    )
    if drawn:
        start, short = _short_runs(engine, base_seed, max_iter, drawn)
        engine.starts = [start]
    # The short runs are the start (as k-means++ is a Mixture's): max_iter, the history,
    # callbacks and checkpoints count the continued run's iterations.
    try:
        result = run_em(
            looped, n_init=n_init, tol=tol, max_iter=max_iter, progress=progress, callback=callback
        )
        last = result.best.last.stats
        # A stepwise fit's statistics are the posterior marginals of every entry already.
        marginals = last if online is not None else engine.marginals(last)
        if marginals is None:
            # The mixture kernel's last E-step disagreed with the program's: fit again
            # with the program run at every E-step.
            result = run_em(
                looped,
                n_init=n_init,
                tol=tol,
                max_iter=max_iter,
                progress=progress,
                callback=callback,
            )
            marginals = engine.marginals(result.best.last.stats)
            assert marginals is not None
    finally:
        engine.starts = None
        if plate is not None:
            # The fit's program runs its plate as written again (pointwise values etc.).
            plate.release()
    best = result.best
    # The fitted weights of pyro.module networks go into the networks themselves.
    with torch.no_grad():
        for name, parameter in program.module_params.items():
            parameter.copy_(best.params[name])
    options = {
        "n_init": n_init,
        "tol": tol,
        "max_iter": max_iter,
        "seed": seed,
        "m_step": m_step,
        "gradient_steps": gradient_steps,
        "space": space,
        "accelerate": accelerate,
        # The kept run's iterations taken as SQUAREM cycles ("auto" may take none).
        "squarem_cycles": sum("squarem_alpha" in step for step in best.info),
        **(
            {}
            if online is None
            else {
                "stepwise": True,
                **online.options._asdict(),
                "subsampled_plate": online.plate.name,
            }
        ),
        "start": "prior" if short is None else "short runs",
        **({} if short is None else {"short_run_objectives": short}),
        **result.record(),
        **collective.record(),
    }
    return ProgramFit(
        program=program,
        method=method,
        values=best.params,
        m_step_kinds=kinds,
        marginals=marginals,
        log_likelihood=best.last.log_likelihood,
        log_joint=best.last.objective - engine.log_jacobian(best.params),
        num_data=int(engine.num_data if online is None else online.num_data),
        **result.fit_fields(),
        options=options,
    )
