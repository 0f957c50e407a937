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
:mod:`pyroem.model.transforms`), which Pyro lacks.

Data-parallel SVI (``guide="delta"``): inside a ``torch.distributed`` process group
(:mod:`pyroem.engines.distributed`) each rank passes its shard of the data; its ELBO
covers that shard, with the global sites' prior terms and the guide's terms counted on
rank 0 only (masked on the others); every step's ELBO and gradients are summed over the
ranks (one ``all_reduce`` in float64), so every rank takes the same optimiser step. The
start is rank 0's, broadcast.
"""

from __future__ import annotations

import math
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
from pyro.infer.util import zero_grads
from pyro.optim import ClippedAdam, PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler
from pyro.params.param_store import StateDict
from pyro.poutine.messenger import Messenger

from pyroem.diagnostics import independent_chains
from pyroem.em import EMRun, Engine, EStepResult, Iteration, MStepResult, run_em
from pyroem.engines.distributed import LOCAL, Collective
from pyroem.engines.program_map import (
    broadcast_values,
    initial_values,
    num_observations,
    program_init,
    resolve_seed,
    unsharded_sites,
)
from pyroem.errors import FitFileError, NotSupportedError, PyroEMError, SpecError
from pyroem.estep.program import posterior
from pyroem.fits.checkpoint import copied
from pyroem.fits.program import ProgramFit
from pyroem.model.program import ProgramModel
from pyroem.model.transforms import BijectiveSupports, needs_bijection
from pyroem.mstep.gradient import summed_loss
from pyroem.options import check_integer, with_defaults

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

    A fit read back by :func:`pyroem.load` has all of this but the guide and its
    parameter-store state (code and Pyro's parameter store are not saved): ``guide``,
    ``param_state`` and :meth:`scope` raise :class:`~pyroem.errors.NotSupportedError`.

    Attributes:
        guide: the fitted guide (an autoguide, or the guide function given).
        param_state: its variational parameters and the program's ``pyro.param``
            values, as a Pyro parameter-store state; :meth:`scope` makes them current.
        elbo: the final ELBO estimate.
        elbo_stderr: its Monte Carlo standard error (0 for a deterministic ELBO).
        local_latents: latent sites local to the data (covered by the guide).
    """

    program_type = _SVIProgram

    def __init__(
        self,
        *,
        guide: Callable[..., Any] | None,
        param_state: StateDict | None,
        elbo: float,
        elbo_stderr: float,
        local_latents: list[str],
        **fit: Any,
    ) -> None:
        super().__init__(**fit)
        self._guide = guide
        self._param_state = param_state
        self.elbo = elbo
        self.elbo_stderr = elbo_stderr
        self.local_latents = local_latents

    def _fitted(self, what: str) -> Any:
        value = getattr(self, f"_{what}")
        if value is None:
            raise NotSupportedError(
                f"this SVI fit was loaded from a file, which holds no {what} (code and "
                "Pyro's parameter store are not saved); its params, draws, summary and "
                "to_arviz() are there, or fit the model again for the guide"
            )
        return value

    @property
    def guide(self) -> Callable[..., Any]:
        return self._fitted("guide")

    @property
    def param_state(self) -> StateDict:
        return self._fitted("param_state")

    def _archive(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """:class:`~pyroem.ProgramFit`'s, with the final ELBO; not the guide."""
        arrays, meta = super()._archive()
        meta.update(elbo=self.elbo, elbo_stderr=self.elbo_stderr, local_latents=self.local_latents)
        return arrays, meta

    @classmethod
    def from_archive(
        cls, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], fields: dict[str, Any]
    ) -> SVIFit:
        """A saved SVI fit, without its guide."""
        return cls(
            guide=None,
            param_state=None,
            elbo=float(meta["elbo"]),
            elbo_stderr=float(meta["elbo_stderr"]),
            local_latents=[str(name) for name in meta["local_latents"]],
            **fields,
        )

    @contextmanager
    def scope(self) -> Iterator[StateDict]:
        """Run code with the fitted parameters in Pyro's parameter store, e.g.
        ``with fit.scope(): fit.guide.quantiles([0.05, 0.95])``; the store is
        restored on exit, and other fits never see these parameters."""
        with pyro.get_param_store().scope(self.param_state) as state:
            yield state

    def _repr_fields(self) -> list[str]:
        return [
            f"model={self.program.name}",
            f"guide={self.options['guide']!r}",
            f"elbo={self.elbo:.6g}",
        ]


def _window_change(elbos: list[float], window: int) -> tuple[float, float]:
    """The change between the means of the last two windows, and its standard error."""
    last = np.asarray(elbos[-window:])
    before = np.asarray(elbos[-2 * window : -window])
    change = float(last.mean() - before.mean())
    if window == 1:
        return change, 0.0
    stderr = math.sqrt((last.var(ddof=1) + before.var(ddof=1)) / window)
    return change, stderr


class _TermsOff(Messenger):
    """Masks the log-density terms of the sample sites ``names`` (every sample site
    when ``None``): on the ranks of a distributed fit other than rank 0, the global
    sites' prior terms and the guide's terms, which rank 0 counts once for all."""

    def __init__(self, names: set[str] | None = None) -> None:
        super().__init__()
        self.names = names

    def _pyro_sample(self, msg: Any) -> None:
        if self.names is None or msg["name"] in self.names:
            msg["mask"] = False


class _SVIState:
    """One restart's guide and optimiser; its parameters live in Pyro's parameter store
    (snapshot into ``param_state`` when the run ends)."""

    def __init__(self, guide: Callable[..., Any], svi: SVI, scheduler: PyroLRScheduler | None):
        self.guide, self.svi, self.scheduler = guide, svi, scheduler
        self.steps = 0
        self.param_state: StateDict | None = None


class _SVIResult(NamedTuple):
    """What :meth:`_SVIEngine.finish` reads at the final parameters."""

    elbo: float
    elbo_stderr: float
    draws: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    raw_elbos: np.ndarray


class _SVIEngine(Engine):
    """SVI as an EM engine: the E-step estimates the ELBO and its gradient at the current
    variational and model parameters, the M-step takes the optimiser's step."""

    name = "vb-em (svi)"

    def __init__(
        self,
        settings: SVIOptions,
        program: _SVIProgram,
        init: Mapping[str, Any] | Callable[[int], Any] | None,
        base_seed: int,
        max_iter: int,
        collective: Collective = LOCAL,
    ) -> None:
        self.settings, self.program, self.start, self.base_seed = settings, program, init, base_seed
        self.max_iter = max_iter
        self.collective = collective
        self.first = broadcast_values(collective, program, initial_values(program, init, base_seed))
        # N of the whole data (every rank's shard), so the ranks stop together.
        self.num_data = int(collective.sum(num_observations(program.trace(self.first), program)))
        self.model = BijectiveSupports(_bijective_sites(program))(program.model)
        self.latents = [name for name, site in program.params.items() if site.kind == "sample"]
        # The model and guide the ELBO reads: rank 0 counts the global terms for all.
        self.elbo_model = self.model
        self.elbo_guide: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda guide: guide
        if collective.rank != 0:
            self.elbo_model = _TermsOff(set(self.latents))(self.model)
            self.elbo_guide = lambda guide: _TermsOff()(guide)

    def init(self, restart: int) -> MStepResult:
        start = (
            self.first
            if restart == 0
            else broadcast_values(
                self.collective,
                self.program,
                initial_values(self.program, self.start, self.base_seed + restart),
            )
        )
        pyro.clear_param_store()
        torch.manual_seed(self.base_seed + restart)
        for name, site in self.program.params.items():
            if site.kind == "param":
                pyro.param(name, start[name], constraint=site.constraint)
        guide = _make_guide(self.settings, self.model, self.program, start)
        if self.collective is not LOCAL:
            self._create_parameters(guide)
        optimizer, scheduler = _make_optimizer(self.settings, self.max_iter)
        elbo = _elbo(self.program, self.settings.num_particles)
        svi = SVI(self.elbo_model, self.elbo_guide(guide), optimizer, elbo)
        return MStepResult(_SVIState(guide, svi, scheduler))

    def _create_parameters(self, guide: Callable[..., Any]) -> None:
        """Run ``guide`` once so that its parameters exist before the first step: every
        rank then sums the gradients of the same parameters, even where a step fails."""
        error = None
        try:
            with poutine.block():
                guide(*self.program.model_args, **self.program.model_kwargs)
        except Exception as err:
            error = err
        self.collective.agree(error)

    def e_step(self, state: _SVIState) -> EStepResult:
        """The ELBO estimate (``num_particles`` particles) and its gradient."""
        args, kwargs = self.program.model_args, self.program.model_kwargs
        # Pyro's argument checks run on the first step only: it validates the program,
        # the data and the guide, and later steps move parameters only inside their
        # supports (the checks are about half of a step's time).
        checks = nullcontext() if state.steps == 0 else pyro.validation_enabled(False)

        def loss_and_grads() -> torch.Tensor:
            loss = state.svi.loss_and_grads(state.svi.model, state.svi.guide, *args, **kwargs)
            return torch.tensor(float(loss), dtype=torch.float64)

        with checks, poutine.trace(param_only=True) as capture:
            if self.collective is LOCAL:
                loss = loss_and_grads()
            else:
                # Every parameter, in the order of their names (the same on every rank).
                leaves = [leaf for _, leaf in sorted(pyro.get_param_store().named_parameters())]
                # A step that fails on one rank fails on every rank (none waits for it).
                loss = summed_loss(loss_and_grads, leaves, self.collective.sum_tensors, invalid=())
        nodes: Any = capture.trace.nodes
        elbo = -float(loss)
        if not math.isfinite(elbo):
            raise PyroEMError(
                f"the ELBO became {elbo} at SVI step {state.steps + 1}: the steps diverged; "
                "lower learning_rate, use optimizer='clipped_adam', or start closer (init=...)"
            )
        params = {site["value"].unconstrained() for site in nodes.values()}
        return EStepResult(params, elbo, math.nan)

    def m_step(self, stats: set[torch.Tensor], params: _SVIState, iteration: int) -> MStepResult:
        """One optimiser step on the gradient of the last E-step (``stats``: the
        parameters that have it)."""
        state = params
        state.svi.optim(stats)
        zero_grads(stats)
        if state.scheduler is not None:
            state.scheduler.step()
        state.steps += 1
        return MStepResult(state)

    def snapshot(self, state: _SVIState) -> dict[str, Any]:
        """Copies of the parameter store (unconstrained values), the optimiser's state,
        the global torch generator and the step count."""
        store = pyro.get_param_store().get_state()["params"]
        return {
            "params": {name: value.detach().clone() for name, value in store.items()},
            "optimizer": copied(state.svi.optim.get_state()),
            "rng": torch.get_rng_state(),
            "steps": state.steps,
        }

    def restore(self, snapshot: dict[str, Any], restart: int) -> _SVIState:
        """A fresh start of ``restart`` (guide, optimiser), set to ``snapshot``."""
        state: _SVIState = self.init(restart).params
        saved: dict[str, torch.Tensor] = snapshot["params"]
        store = pyro.get_param_store()
        if set(saved) - set(store.keys()):
            # The guide creates its parameters on its first run.
            args, kwargs = self.program.model_args, self.program.model_kwargs
            with poutine.block():
                state.guide(*args, **kwargs)
        current = store.get_state()["params"]
        if set(saved) != set(current):
            raise FitFileError(
                f"the checkpoint holds the parameters {sorted(saved)}, but this guide and "
                f"model have {sorted(current)}; resume with the original guide"
            )
        with torch.no_grad():
            for name, value in saved.items():
                current[name].copy_(value)
        state.svi.optim.set_state(copied(snapshot["optimizer"]))
        state.steps = int(snapshot["steps"])
        torch.set_rng_state(snapshot["rng"])
        return state

    def converged(self, objectives: list[float], info: list[Mapping[str, Any]], tol: float) -> bool:
        """The windowed rule of the module docstring."""
        window = self.settings.window
        if window == 0 or len(objectives) < 2 * window:
            return False
        change, stderr = _window_change(objectives, window)
        return abs(change) < max(tol * self.num_data, _NOISE_MULTIPLE * stderr)

    def finish(self, run: EMRun) -> EMRun:
        """The final ELBO from ``num_elbo_particles`` particles replaces the last estimate;
        the guide's draws and point estimate; a snapshot of the parameters."""
        state: _SVIState = run.params
        zero_grads(run.last.stats)
        elbo, stderr = _final_elbo(
            self.elbo_model,
            state.svi.guide,
            self.program,
            1 if isinstance(state.guide, AutoDelta) else self.settings.num_elbo_particles,
            self.collective,
        )
        draws = _draw(state.guide, self.program, self.latents, self.settings.num_draws)
        if isinstance(state.guide, AutoDelta):
            values = {name: value.detach() for name, value in state.guide.median().items()}
        else:
            values = {name: draws[name].mean(0) for name in self.latents}
        for name, site in self.program.params.items():
            if site.kind == "param":
                values[name] = pyro.param(name).detach().clone()
        state.param_state = pyro.get_param_store().get_state()
        raw = run.history.objective
        history = run.history._replace(objective=np.append(raw[:-1], elbo))
        values = {name: values[name] for name in self.program.params}
        return run._replace(
            history=history, extras=_SVIResult(elbo, stderr, draws, values, raw[:-1])
        )

    def unconverged_message(self, run: EMRun) -> str | None:
        if self.settings.window == 0:
            return None
        return (
            f"SVI did not converge in {run.num_iterations} steps (smoothed ELBO change over "
            "the last window above tol·N and above its noise); raise max_iter or tol, or lower "
            "the learning rate (learning_rate, lr_decay)"
        )


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
    model: Callable[..., Any],
    guide: Callable[..., Any],
    program: ProgramModel,
    num_particles: int,
    collective: Collective = LOCAL,
) -> tuple[float, float]:
    """The ELBO from ``num_particles`` independent particles, and its standard error;
    in a distributed fit each particle's ELBO summed over the ranks.

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
    if collective is not LOCAL:
        (summed,) = collective.sum_tensors([torch.tensor(values, dtype=torch.float64)])
        values = summed.numpy()
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
    n_init: int = 1,
    callback: Callable[[Iteration], Any] | None = None,
    collective: Collective = LOCAL,
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
        n_init: restarts (a new start and guide each, seeded ``seed + r``); the one with
            the highest final ELBO is kept.
        callback: called after every step (see :func:`pyroem.fit`).
        collective: the ranks of a distributed fit (each passing its shard of the data;
            see the module docstring); one process by default.
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
        NotSupportedError: a latent site no guide can cover; in a distributed fit, a
            continuous latent local to the data, or a site in no plate of data points
            (the guide is checked by :func:`check_guide_over_ranks`, which
            :func:`pyroem.fit` calls before it computes the start).
        PyroEMError: the ELBO became NaN or infinite (the steps diverged).
    """
    settings = _check_options(options)
    program = _SVIProgram(model, model_args, model_kwargs)
    init = program_init(init)
    if isinstance(init, Mapping) and set(init) >= set(program.params):
        n_init = 1
    base_seed = resolve_seed(seed)
    if collective is not LOCAL:
        # Before the engine broadcasts the start (whose local latents differ per rank).
        # pyroem.fit checks the guide before it computes a start; a direct call here.
        check_guide_over_ranks(settings.guide, collective)
        _check_distributed(program, init, base_seed, collective)
    engine = _SVIEngine(settings, program, init, base_seed, max_iter, collective)
    with torch.random.fork_rng(), pyro.get_param_store().scope():
        result = run_em(
            engine, n_init=n_init, tol=tol, max_iter=max_iter, progress=progress, callback=callback
        )
    best = result.best
    state: _SVIState = best.params
    final: _SVIResult = best.extras
    assert state.param_state is not None
    post = posterior(program, final.values)
    # The whole data's log-likelihood; the prior terms are the same on every rank.
    log_likelihood, log_joint = float(post.log_likelihood), float(post.log_joint)
    if collective is not LOCAL:
        log_likelihood = collective.sum(log_likelihood)
        log_joint = log_likelihood + float(post.log_joint - post.log_likelihood)
    history = best.history
    history.log_likelihood[-1] = log_likelihood
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
        "n_init": n_init,
        **result.record(),
        **collective.record(),
    }
    return SVIFit(
        guide=state.guide,
        param_state=state.param_state,
        elbo=final.elbo,
        elbo_stderr=final.elbo_stderr,
        local_latents=list(program.local_latents),
        program=program,
        method="vb-em",
        values=final.values,
        m_step_kinds=kinds,
        marginals=post.marginals,
        log_likelihood=log_likelihood,
        log_joint=log_joint,
        num_data=engine.num_data,
        **result.fit_fields(history),
        options=record,
        draws={name: independent_chains(value) for name, value in final.draws.items()},
        sample_stats={
            "elbo": history.objective.copy(),
            "elbo_smoothed": _smoothed(list(final.raw_elbos), max(settings.window, 1)),
        },
    )


def _refused_guide(guide: Any) -> str | None:
    """Why a distributed SVI fit cannot take ``guide`` (``None``: it can)."""
    if not isinstance(guide, str):
        return "a guide function (whose parameters may be local to the data)"
    if guide != "delta":
        return (
            f"guide={guide!r}, whose draws are not written to be the same on every rank "
            "(guide='delta' is)"
        )
    return None


def _distributed_error(refused: str) -> NotSupportedError:
    return NotSupportedError(
        f"a distributed SVI fit sums the ranks' ELBOs over their shards of the data, "
        f"with guide='delta' over the global sites; this fit has {refused}: pass "
        "distributed=False to fit in each process alone"
    )


def check_guide_over_ranks(guide: Any, collective: Collective) -> None:
    """Raise before any work where a distributed SVI fit cannot take ``guide`` (every
    rank is passed the same options, so every rank raises)."""
    refused = None if collective is LOCAL else _refused_guide(guide)
    if refused is not None:
        raise _distributed_error(refused)


def _check_distributed(program: _SVIProgram, init: Any, seed: int, collective: Collective) -> None:
    """Raise on every rank unless the ELBO splits over the ranks' shards: no continuous
    latent local to the data (its guide would differ per shard), every observed or
    enumerated site in a plate of data points. The guide is checked before, by
    :func:`check_guide_over_ranks`."""
    refused = None
    if program.local_latents:
        refused = f"the continuous latents {program.local_latents}, local to the data"
    else:
        unsharded = unsharded_sites(program, program.trace(initial_values(program, init, seed)))
        if unsharded:
            refused = (
                f"the sites {unsharded}, in no plate of data points (each rank would count them)"
            )
    error = None if refused is None else _distributed_error(refused)
    collective.check(error)
