r"""VB-EM by stochastic variational inference: any Pyro program, any guide.

The objective is the evidence lower bound with the discrete latents summed out
exactly (``TraceEnum_ELBO``) and the continuous latents θ covered by a guide
:math:`q_φ(θ)`:

.. math:: \mathcal{L}(φ, η) = \mathbb{E}_{q_φ(θ)}\Big[\log \sum_z p_η(x, z, θ)\Big]
          + \mathrm{H}[q_φ(θ)] \;\le\; \log p_η(x),

maximised jointly over the guide's parameters φ and the program's own
``pyro.param`` sites η (point-estimated: maximum likelihood) by stochastic
gradient steps. θ is every global ``pyro.sample`` site with a prior, and also
every continuous latent local to the data, which the guide covers as well.

Convergence is judged on a smoothed ELBO. With ``W = window`` and
:math:`\bar{\mathcal{L}}_{a:b}` the mean of the per-step ELBO estimates of steps
``a..b-1``, after step ``t ≥ 2W`` the change
:math:`Δ_t = \bar{\mathcal{L}}_{t-W:t} - \bar{\mathcal{L}}_{t-2W:t-W}` is compared with
the standard error :math:`s_t` of that difference (from the spread of the
estimates inside the two windows); the fit has converged when

.. math:: |Δ_t| < \max(\mathrm{tol} \cdot N,\; 2 s_t),

N being the number of observations: the ELBO has risen by less than ``tol`` per
observation over the last window, or by less than its Monte Carlo noise can
resolve. A deterministic ELBO (``guide="delta"``: discrete latents are summed, the
rest are points) has no noise, so only ``tol`` applies, as in the other EM variants.
``window=0`` turns the check off (exactly ``max_iter`` steps, e.g. for a fixed
learning-rate schedule).

The point estimate reported in ``params`` is the mean of ``num_draws`` draws from the
fitted guide (a guide's own point for ``guide="delta"``). Covariance-matrix sites get
a bijection from ``D(D+1)/2`` unconstrained numbers (the log-Cholesky factor, see
:mod:`pyroem.transforms`), which Pyro lacks.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from pyro.optim import ClippedAdam, PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler
from pyro.params.param_store import StateDict
from tqdm import tqdm

from pyroem.diagnostics import independent_chains
from pyroem.em import History
from pyroem.errors import ConvergenceWarning, NotSupportedError, PyroEMError, SpecError
from pyroem.options import check_integer, with_defaults
from pyroem.program.fit import initial_values, num_observations, program_init, resolve_seed
from pyroem.program.model import ProgramModel
from pyroem.program.posterior import posterior
from pyroem.program.results import ProgramFit
from pyroem.transforms import BijectiveSupports, needs_bijection

__all__ = ["GUIDES", "OPTIMIZERS", "SVIFit", "SVIOptions", "fit_svi"]

GUIDES = ("normal", "delta", "mvn", "lowrank")
OPTIMIZERS = ("adam", "clipped_adam")
_AUTOGUIDES = {
    "normal": AutoNormal,
    "delta": AutoDelta,
    "mvn": AutoMultivariateNormal,
    "lowrank": AutoLowRankMultivariateNormal,
}
_DEFAULTS: dict[str, Any] = {
    "guide": "normal",
    "optimizer": "adam",
    "learning_rate": None,
    "lr_decay": None,
    "num_particles": 1,
    "num_draws": 1000,
    "num_elbo_particles": 100,
    "window": 100,
}
_LEARNING_RATE = 0.01
_NOISE_MULTIPLE = 2.0


class SVIOptions(NamedTuple):
    """The options of ``method="vb-em"`` on a Pyro program (see :func:`fit_svi`)."""

    guide: str | Callable[..., Any]
    optimizer: str | PyroOptim
    learning_rate: float
    lr_decay: float
    num_particles: int
    num_draws: int
    num_elbo_particles: int
    window: int


def _check_options(options: Mapping[str, Any]) -> SVIOptions:
    """Validate the method options, with the defaults filled in."""
    given = with_defaults("method='vb-em' (SVI)", options, _DEFAULTS)
    guide = given["guide"]
    if isinstance(guide, str):
        if guide not in GUIDES:
            raise SpecError(
                f"unknown guide {guide!r}; choose one of {GUIDES} or pass a guide function"
            )
    elif not callable(guide):
        raise SpecError(f"guide must be one of {GUIDES} or a callable; got {type(guide).__name__}")
    optimizer = given["optimizer"]
    if isinstance(optimizer, PyroOptim):
        if given["learning_rate"] is not None or given["lr_decay"] is not None:
            raise SpecError(
                "learning_rate and lr_decay apply to optimizer='adam' or 'clipped_adam'; "
                "a pyro.optim optimizer carries its own: set them when building it"
            )
    elif optimizer not in OPTIMIZERS:
        raise SpecError(
            f"optimizer must be one of {OPTIMIZERS} or a pyro.optim optimizer; got {optimizer!r}"
        )
    learning_rate = _LEARNING_RATE if given["learning_rate"] is None else given["learning_rate"]
    if not (isinstance(learning_rate, int | float) and 0 < learning_rate < math.inf):
        raise SpecError(f"learning_rate must be a positive number; got {learning_rate!r}")
    lr_decay = 1.0 if given["lr_decay"] is None else given["lr_decay"]
    if not (isinstance(lr_decay, int | float) and 0 < lr_decay <= 1):
        raise SpecError(
            f"lr_decay (final learning rate as a fraction of the first) must be in (0, 1]; "
            f"got {lr_decay!r}"
        )
    return SVIOptions(
        guide=guide,
        optimizer=optimizer,
        learning_rate=float(learning_rate),
        lr_decay=float(lr_decay),
        num_particles=check_integer("num_particles", given["num_particles"], 1),
        num_draws=check_integer("num_draws", given["num_draws"], 1),
        num_elbo_particles=check_integer("num_elbo_particles", given["num_elbo_particles"], 1),
        window=check_integer("window", given["window"], 0),
    )


class _SVIProgram(ProgramModel):
    """A :class:`ProgramModel` that also takes continuous latents local to the data:
    the guide covers them like any other continuous latent."""

    def __init__(
        self,
        model: Callable[..., Any],
        model_args: tuple[Any, ...],
        model_kwargs: Mapping[str, Any] | None,
    ) -> None:
        self.local_latents: list[str] = []
        super().__init__(model, model_args, model_kwargs)

    def _check_global(self, name: str, site: Any, observed_plates: set[str]) -> None:
        try:
            super()._check_global(name, site, observed_plates)
        except NotSupportedError:
            self.local_latents.append(name)


class SVIFit(ProgramFit):
    """A Pyro program fitted by SVI (``method="vb-em"`` with a guide).

    On top of :class:`~pyroem.ProgramFit`:

    - ``params``: the point estimate: the mean of the guide's draws for every latent
      site (for ``guide="delta"``, its point), the fitted value of every ``pyro.param``
      site of the program; ``log_likelihood()``, ``log_joint()`` and ``marginals`` are
      evaluated there, discrete latents summed out.
    - ``draws``: ``num_draws`` draws from the fitted guide, each
      ``(num_chains, num_draws // num_chains, *shape)``: independent draws split into
      up to 4 chains (:func:`~pyroem.diagnostics.independent_chains`) so R-hat is defined.
    - ``history.objective``: the ELBO, ``(T+1,)`` for ``T`` steps: entry ``t < T`` is the
      raw (unsmoothed) estimate at the parameters after ``t`` steps, from
      ``num_particles`` particles; the last entry is the final ELBO from
      ``num_elbo_particles`` particles (also ``elbo``). ``history.log_likelihood`` is NaN
      but for its last entry, the log-likelihood at the point estimate.
    - ``sample_stats``: ``"elbo"`` (= ``history.objective``) and ``"elbo_smoothed"``, the
      mean over the trailing window at each step, ``(T,)``.

    Attributes:
        guide: the fitted guide (an autoguide, or the guide function given).
        param_state: its variational parameters and the program's ``pyro.param``
            values, as a Pyro parameter-store state; :meth:`scope` makes them current.
        elbo: the final ELBO estimate.
        elbo_stderr: its Monte Carlo standard error (0 for a deterministic ELBO).
        local_latents: latent sites local to the data (covered by the guide).
    """

    def __init__(
        self,
        *,
        guide: Callable[..., Any],
        param_state: StateDict,
        elbo: float,
        elbo_stderr: float,
        local_latents: list[str],
        **fit: Any,
    ) -> None:
        super().__init__(**fit)
        self.guide = guide
        self.param_state = param_state
        self.elbo = elbo
        self.elbo_stderr = elbo_stderr
        self.local_latents = local_latents

    @contextmanager
    def scope(self) -> Iterator[StateDict]:
        """Run code with the fitted parameters in Pyro's parameter store, e.g.
        ``with fit.scope(): fit.guide.quantiles([0.05, 0.95])``; the store is
        restored on exit, and other fits never see these parameters."""
        with pyro.get_param_store().scope(self.param_state) as state:
            yield state

    def __repr__(self) -> str:
        return (
            f"SVIFit(model={self.program.name}, guide={self.options['guide']!r}, "
            f"elbo={self.elbo:.6g}, converged={self.converged}, "
            f"num_iterations={self.num_iterations})"
        )


class _SVIRun(NamedTuple):
    """The per-step ELBO estimates of one SVI run."""

    elbos: list[float]
    elapsed: list[float]
    converged: bool


def _window_change(elbos: list[float], window: int) -> tuple[float, float]:
    """The change between the means of the last two windows, and its standard error."""
    last = np.asarray(elbos[-window:])
    before = np.asarray(elbos[-2 * window : -window])
    change = float(last.mean() - before.mean())
    if window == 1:
        return change, 0.0
    stderr = math.sqrt((last.var(ddof=1) + before.var(ddof=1)) / window)
    return change, stderr


def _run_svi(
    svi: SVI,
    scheduler: PyroLRScheduler | None,
    program: ProgramModel,
    *,
    num_data: int,
    tol: float,
    max_iter: int,
    window: int,
    progress: bool,
) -> _SVIRun:
    """Take SVI steps until the smoothed ELBO settles (see the module docstring)."""
    start = time.perf_counter()
    elbos: list[float] = []
    elapsed: list[float] = []
    converged = False
    args, kwargs = program.model_args, program.model_kwargs
    with tqdm(total=max_iter, desc="vb-em (svi)", disable=not progress, leave=False) as bar:
        for step in range(max_iter):
            # Pyro's argument checks run on the first step only: it validates the program,
            # the data and the guide, and later steps move parameters only inside their
            # supports (the checks are about half of a step's time).
            checks = nullcontext() if step == 0 else pyro.validation_enabled(False)
            with checks:
                elbos.append(-float(svi.step(*args, **kwargs)))
            if scheduler is not None:
                scheduler.step()
            elapsed.append(time.perf_counter() - start)
            bar.update(1)
            if not math.isfinite(elbos[-1]):
                raise PyroEMError(
                    f"the ELBO became {elbos[-1]} at SVI step {step + 1}: the steps diverged; "
                    "lower learning_rate, use optimizer='clipped_adam', or start closer "
                    "(init=...)"
                )
            if window == 0 or len(elbos) < 2 * window:
                continue
            change, stderr = _window_change(elbos, window)
            bar.set_postfix(
                elbo=f"{np.mean(elbos[-window:]):.6g}", change=f"{change:.2e}", refresh=False
            )
            if abs(change) < max(tol * num_data, _NOISE_MULTIPLE * stderr):
                converged = True
                break
    return _SVIRun(elbos, elapsed, converged)


def _make_optimizer(
    settings: SVIOptions, max_iter: int
) -> tuple[PyroOptim, PyroLRScheduler | None]:
    """The optimiser, and the scheduler to step after each SVI step (if any)."""
    if isinstance(settings.optimizer, PyroOptim):
        scheduler = settings.optimizer if isinstance(settings.optimizer, PyroLRScheduler) else None
        return settings.optimizer, scheduler
    gamma = settings.lr_decay ** (1.0 / max(max_iter, 1))
    if settings.optimizer == "clipped_adam":
        return ClippedAdam({"lr": settings.learning_rate, "lrd": gamma}), None
    if settings.lr_decay == 1.0:
        return PyroOptim(torch.optim.Adam, {"lr": settings.learning_rate}), None
    scheduler = PyroLRScheduler(
        torch.optim.lr_scheduler.ExponentialLR,
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": settings.learning_rate},
            "gamma": gamma,
        },
    )
    return scheduler, scheduler


def _make_guide(
    settings: SVIOptions,
    model: Callable[..., Any],
    program: ProgramModel,
    start: Mapping[str, torch.Tensor],
) -> Callable[..., Any]:
    """The guide: an autoguide over every non-enumerated latent, started at ``start``."""
    if not isinstance(settings.guide, str):
        return settings.guide
    hidden = poutine.block(model, hide=program.enumerated)
    locations = {
        name: start[name] for name, site in program.params.items() if site.kind == "sample"
    }
    return _AUTOGUIDES[settings.guide](hidden, init_loc_fn=init_to_value(values=locations))


def _bijective_sites(program: ProgramModel) -> set[str]:
    """Latent sites whose support needs this package's bijection (covariance matrices)."""
    names = set()
    for name, site in program.params.items():
        if site.kind != "sample":
            continue
        try:
            if needs_bijection(site.constraint):
                names.add(name)
        except NotImplementedError as err:
            raise NotSupportedError(
                f"site {name!r} has support {site.constraint}, which no guide can cover "
                "(no bijection from an unconstrained space); use method='map-em' or "
                "'mcmc-em', or reparametrise the site"
            ) from err
    return names


def _elbo(program: ProgramModel, num_particles: int) -> Trace_ELBO | TraceEnum_ELBO:
    """``TraceEnum_ELBO``, or the cheaper ``Trace_ELBO`` when nothing is enumerated."""
    if program.enumerated:
        return TraceEnum_ELBO(
            max_plate_nesting=program.max_plate_nesting, num_particles=num_particles
        )
    return Trace_ELBO(max_plate_nesting=program.max_plate_nesting, num_particles=num_particles)


def _final_elbo(
    model: Callable[..., Any], guide: Callable[..., Any], program: ProgramModel, num_particles: int
) -> tuple[float, float]:
    """The ELBO from ``num_particles`` independent particles, and its standard error.

    A point guide makes the ELBO deterministic (the discrete latents are summed out):
    one particle is exact.
    """
    elbo = _elbo(program, 1)
    if isinstance(guide, AutoDelta):
        num_particles = 1
    with torch.no_grad(), pyro.validation_enabled(False):
        values = np.array(
            [
                -elbo.loss(model, guide, *program.model_args, **program.model_kwargs)
                for _ in range(num_particles)
            ]
        )
    stderr = float(values.std(ddof=1) / math.sqrt(num_particles)) if num_particles > 1 else 0.0
    return float(values.mean()), stderr


def _value(trace: poutine.Trace, name: str) -> torch.Tensor:
    """A site's value in a trace."""
    value = trace.nodes[name]["value"]
    assert isinstance(value, torch.Tensor)
    return value


def _draw(
    guide: Callable[..., Any], program: ProgramModel, names: list[str], num_draws: int
) -> dict[str, torch.Tensor]:
    """``num_draws`` draws of the latent sites from the guide, each ``(num_draws, *shape)``.

    An autoguide draws them all at once in a plate left of the program's plates (as
    ``pyro.infer.Predictive`` does); a guide function, whose shapes are its own
    business, is run once per draw.
    """
    args, kwargs = program.model_args, program.model_kwargs
    with torch.no_grad(), poutine.block(), pyro.validation_enabled(False):
        if isinstance(guide, AutoGuide):
            with pyro.plate("_draws", num_draws, dim=-program.max_plate_nesting - 1):
                traces = [poutine.trace(guide).get_trace(*args, **kwargs)]
        else:
            traces = [poutine.trace(guide).get_trace(*args, **kwargs) for _ in range(num_draws)]
    missing = [name for name in names if name not in traces[0].nodes]
    if missing:
        raise SpecError(
            f"the guide does not sample the latent sites {missing}; a guide must sample "
            f"every latent site of the model but the enumerated ones {program.enumerated}"
        )
    draws = {}
    for name in names:
        shape = program.params[name].shape
        value = torch.cat([_value(trace, name).reshape(-1, *shape) for trace in traces])
        draws[name] = torch.broadcast_to(value, (num_draws, *shape)).clone()
    return draws


def _smoothed(elbos: list[float], window: int) -> np.ndarray:
    """The mean of the last ``window`` (or fewer, at the start) estimates at each step."""
    totals = np.cumsum(np.concatenate([[0.0], elbos]))
    ends = np.arange(1, len(elbos) + 1)
    starts = np.maximum(ends - window, 0)
    return (totals[ends] - totals[starts]) / (ends - starts)


def fit_svi(
    model: Callable[..., Any],
    model_args: tuple[Any, ...],
    model_kwargs: Mapping[str, Any] | None,
    *,
    tol: float,
    max_iter: int,
    init: Any,
    seed: int | None,
    progress: bool,
    **options: Any,
) -> SVIFit:
    r"""Fit a Pyro program by SVI, discrete latents enumerated inside the ELBO.

    Args:
        model: the Pyro program.
        model_args: its positional arguments.
        model_kwargs: its keyword arguments.
        tol: convergence when the smoothed ELBO changes by less than ``tol`` per
            observation over one window, or by less than twice its standard error
            (see the module docstring).
        max_iter: most SVI steps.
        init: ``{site name: value}`` for any subset of the parameters, or a previous
            fit: an autoguide's location starts there (the rest: a prior draw); a
            ``pyro.param`` site of the program starts there (the rest: the program's
            own value). A guide function starts from its own ``pyro.param`` values.
        seed: seeds the start and every draw; two fits with the same seed are identical.
        progress: show a progress bar.
        **options: ``guide`` — ``"normal"`` (default; ``AutoNormal``: independent
            normals on the unconstrained space), ``"delta"`` (``AutoDelta``: a point,
            i.e. MAP by gradient ascent), ``"mvn"`` (``AutoMultivariateNormal``: one
            full-covariance normal), ``"lowrank"`` (``AutoLowRankMultivariateNormal``),
            or a guide function whose ``pyro.param`` sites are the variational
            parameters (it must sample every latent site but the enumerated ones);
            ``optimizer`` — ``"adam"`` (default), ``"clipped_adam"`` (gradients clipped
            at norm 10) or a ``pyro.optim`` optimiser (a ``PyroLRScheduler`` is stepped
            after every SVI step); ``learning_rate`` (default 0.01); ``lr_decay`` — the
            final learning rate as a fraction of the first (default 1: constant),
            reached by exponential decay per step, ``lr_t = lr · lr_decay^(t/max_iter)``;
            ``num_particles`` — ELBO particles per step (default 1); ``num_draws`` —
            draws from the fitted guide (default 1000); ``num_elbo_particles`` —
            particles for the final ELBO (default 100); ``window`` — steps per smoothing
            window (default 100; convergence is checked from step ``2 · window`` on;
            0 turns the check off: exactly ``max_iter`` steps, ``converged=False``, no
            warning).

    Returns:
        An :class:`SVIFit` (``method="vb-em"``).

    Raises:
        SpecError: an unknown or invalid option, or a bad ``init``.
        NotSupportedError: a latent site no guide can cover.
        PyroEMError: the ELBO became NaN or infinite (the steps diverged).
    """
    settings = _check_options(options)
    program = _SVIProgram(model, model_args, model_kwargs)
    init = program_init(init)
    base_seed = resolve_seed(seed)
    start = initial_values(program, init, base_seed)
    num_data = num_observations(program.trace(start), program)
    svi_model = BijectiveSupports(_bijective_sites(program))(program.model)
    latents = [name for name, site in program.params.items() if site.kind == "sample"]
    with torch.random.fork_rng(), pyro.get_param_store().scope() as state:
        torch.manual_seed(base_seed)
        for name, site in program.params.items():
            if site.kind == "param":
                pyro.param(name, start[name], constraint=site.constraint)
        guide = _make_guide(settings, svi_model, program, start)
        optimizer, scheduler = _make_optimizer(settings, max_iter)
        svi = SVI(svi_model, guide, optimizer, _elbo(program, settings.num_particles))
        run = _run_svi(
            svi,
            scheduler,
            program,
            num_data=num_data,
            tol=tol,
            max_iter=max_iter,
            window=settings.window,
            progress=progress,
        )
        final_elbo, elbo_stderr = _final_elbo(
            svi_model, guide, program, settings.num_elbo_particles
        )
        draws = _draw(guide, program, latents, settings.num_draws)
        if isinstance(guide, AutoDelta):
            values = {name: value.detach() for name, value in guide.median().items()}
        else:
            values = {name: draws[name].mean(0) for name in latents}
        for name, site in program.params.items():
            if site.kind == "param":
                values[name] = pyro.param(name).detach().clone()
    values = {name: values[name] for name in program.params}
    if not run.converged and settings.window > 0:
        warnings.warn(
            f"SVI did not converge in {len(run.elbos)} steps (smoothed ELBO change over the "
            "last window above tol·N and above its noise); raise max_iter or tol, or lower "
            "the learning rate (learning_rate, lr_decay)",
            ConvergenceWarning,
            stacklevel=4,
        )
    post = posterior(program, values)
    objective = np.array([*run.elbos, final_elbo])
    log_likelihood = np.full(objective.shape, np.nan)
    log_likelihood[-1] = float(post.log_likelihood)
    elapsed = np.array([0.0, *run.elapsed])
    guide_name = settings.guide if isinstance(settings.guide, str) else "guide"
    kinds = {
        name: f"svi-{guide_name}" if site.kind == "sample" else "svi-ml"
        for name, site in program.params.items()
    }
    custom = not isinstance(settings.optimizer, str)
    record = {
        "guide": guide_name,
        "optimizer": "custom" if custom else settings.optimizer,
        "learning_rate": None if custom else settings.learning_rate,
        "lr_decay": None if custom else settings.lr_decay,
        "num_particles": settings.num_particles,
        "num_draws": settings.num_draws,
        "num_elbo_particles": settings.num_elbo_particles,
        "window": settings.window,
        "tol": tol,
        "max_iter": max_iter,
        "seed": seed,
    }
    return SVIFit(
        guide=guide,
        param_state=state,
        elbo=final_elbo,
        elbo_stderr=elbo_stderr,
        local_latents=list(program.local_latents),
        program=program,
        method="vb-em",
        values=values,
        m_step_kinds=kinds,
        marginals=post.marginals,
        log_likelihood=float(post.log_likelihood),
        log_joint=float(post.log_joint),
        history=History(objective, log_likelihood, elapsed),
        converged=run.converged,
        num_iterations=len(run.elbos),
        num_data=num_data,
        restart_objectives=[final_elbo],
        options=record,
        draws={name: independent_chains(value) for name, value in draws.items()},
        sample_stats={
            "elbo": objective,
            "elbo_smoothed": _smoothed(run.elbos, max(settings.window, 1)),
        },
    )
