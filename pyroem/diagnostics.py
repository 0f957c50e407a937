"""Everything pyroem does through ArviZ lives in this module.

Chain diagnostics (R-hat, ESS, divergences), the conversion of a fit of any method
to ``InferenceData`` (:func:`to_arviz`, with the pointwise log-likelihood summed over
the discrete latents), netCDF reading, LOO and its comparison table, and the forest
plot across fits. ArviZ 0.x (``InferenceData``) is what Python 3.11 gets; keeping
every ArviZ call here makes a move to ArviZ 1.x (xarray ``DataTree``) a change to one
file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from pyroem.errors import NotSupportedError, SpecError
from pyroem.estep.enumerate import score_mixture
from pyroem.model.params import MixtureParams
from pyroem.model.program import Inject
from pyroem.outputs.alignment import align_fits
from pyroem.outputs.pointwise import observation_plate, pointwise_log_likelihood_draws

__all__ = [
    "ChainDiagnostics",
    "chain_diagnostics",
    "chain_problems",
    "from_netcdf",
    "independent_chains",
    "loo",
    "loo_table",
    "mixture_dims",
    "plot_forest",
    "to_arviz",
]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence ArviZ's warnings and log messages about shapes it cannot judge (one
    chain, one draw); the numbers still come back."""
    logger = logging.getLogger("arviz")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _arviz() -> Any:
    """ArviZ, imported on first use (its import announces a refactor with a FutureWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


class ChainDiagnostics(NamedTuple):
    """Convergence diagnostics of a set of chains (worst value over every variable).

    Attributes:
        max_rhat: largest rank-normalised split R-hat.
        min_ess_bulk: smallest bulk effective sample size.
        min_ess_tail: smallest tail effective sample size.
        num_divergences: divergent transitions (NUTS), summed over chains.
        num_chains: chains.
        num_draws: draws per chain.
    """

    max_rhat: float
    min_ess_bulk: float
    min_ess_tail: float
    num_divergences: int
    num_chains: int
    num_draws: int

    @classmethod
    def from_numbers(cls, values: Sequence[float]) -> ChainDiagnostics:
        """The diagnostics from their values in field order, as a saved fit holds them."""
        rhat, bulk, tail, *counts = values
        return cls(float(rhat), float(bulk), float(tail), *(int(count) for count in counts))


def chain_diagnostics(draws: Mapping[str, Any], divergences: Any = None) -> ChainDiagnostics:
    """R-hat, bulk and tail ESS (computed by ArviZ) and divergences of chains.

    Args:
        draws: variable name → draws ``(num_chains, num_draws, *shape)`` (tensor or array).
        divergences: optional divergence flags ``(num_chains, num_draws)``.

    Returns:
        The worst value of each diagnostic over every variable and element.
    """
    arviz = _arviz()
    arrays = {name: _as_numpy(value) for name, value in draws.items()}
    num_chains, num_draws = next(iter(arrays.values())).shape[:2]
    with _quiet():
        dataset = arviz.convert_to_dataset(arrays)
        rhat = arviz.rhat(dataset)
        bulk = arviz.ess(dataset, method="bulk")
        tail = arviz.ess(dataset, method="tail")

    def worst(result: Any, pick: Any) -> float:
        values = np.concatenate([np.ravel(result[name].values) for name in arrays])
        values = values[np.isfinite(values)]
        return float(pick(values)) if values.size else float("nan")

    return ChainDiagnostics(
        max_rhat=worst(rhat, np.max),
        min_ess_bulk=worst(bulk, np.min),
        min_ess_tail=worst(tail, np.min),
        num_divergences=0 if divergences is None else int(_as_numpy(divergences).sum()),
        num_chains=int(num_chains),
        num_draws=int(num_draws),
    )


def chain_problems(
    diagnostics: ChainDiagnostics, *, max_rhat: float = 1.01, min_ess: float = 100.0
) -> list[str]:
    """What is wrong with the chains, in words (empty when nothing is).

    Thresholds follow Vehtari et al. (2021): R-hat below 1.01, and bulk and tail ESS
    of at least 100 (the caller scales ``min_ess`` with the number of chains if it
    wants the paper's 100 per chain).
    """
    problems = []
    if not diagnostics.max_rhat < max_rhat:
        problems.append(f"R-hat {diagnostics.max_rhat:.3f} (should be < {max_rhat})")
    for kind, value in (("bulk", diagnostics.min_ess_bulk), ("tail", diagnostics.min_ess_tail)):
        if not value >= min_ess:
            problems.append(f"{kind} ESS {value:.0f} (should be >= {min_ess:.0f})")
    if diagnostics.num_divergences:
        problems.append(f"{diagnostics.num_divergences} divergent transitions")
    return problems


def independent_chains(draws: torch.Tensor, max_chains: int = 4) -> torch.Tensor:
    """Independent draws ``(num_draws, *shape)`` as ``(num_chains, num_draws // num_chains,
    *shape)``, in order.

    Draws from a variational posterior are independent, so any split of them into
    chains is as good as separate chains. With one chain ArviZ's R-hat is undefined
    (NaN); with several it is near 1 and measures what it can for independent draws:
    that they are draws of one distribution. ``num_chains`` is the largest number up to
    ``max_chains`` that divides ``num_draws`` with at least 4 draws per chain (1 for
    fewer than 8 draws).
    """
    num_draws = draws.shape[0]
    num_chains = next(
        (c for c in range(max_chains, 1, -1) if num_draws % c == 0 and num_draws // c >= 4), 1
    )
    return draws.reshape(num_chains, num_draws // num_chains, *draws.shape[1:])


# ----- InferenceData ------------------------------------------------------------------

_ESTIMATES = {
    "map-em": "maximum a posteriori estimate (MAP-EM)",
    "vb-em": "variational posterior mean (VB-EM)",
    "mcmc-em": "final Monte Carlo EM estimate (MCMC-EM)",
    "nuts": "posterior mean of the NUTS draws",
}
_MIXTURE_SITES = frozenset({"weights", "means", "covariances", "rates", "probs"})


def mixture_dims(name: str, ndim: int, *, per_component: bool = True) -> tuple[str, ...]:
    """Dimension names of a :class:`~pyroem.Mixture` parameter.

    ``weights`` → ``("component",)``; a per-component parameter → ``("component", …)``
    followed by ``"dim"`` for a vector (means, rates, Bernoulli probs, diagonal
    covariances), ``("dim_row", "dim_col")`` for a covariance matrix,
    ``("dim", "category")`` for categorical probabilities; a shared (tied) covariance
    has no ``"component"``.

    Args:
        name: the parameter's name (a key of ``fit.params``).
        ndim: the number of dimensions of its value.
        per_component: whether its leading axis indexes components.
    """
    if name == "weights":
        return ("component",)
    lead = ("component",) if per_component else ()
    rest = ndim - len(lead)
    if rest == 0:
        return lead
    if rest == 1:
        return (*lead, "dim")
    if rest == 2:
        return (*lead, *(("dim_row", "dim_col") if name == "covariances" else ("dim", "category")))
    return (*lead, *(f"{name}_dim_{i}" for i in range(rest)))


def _site_dims(trace: Any, name: str, shape: tuple[int, ...]) -> tuple[str, ...]:
    """Dimension names of a site's value: plate names for batch dimensions that a
    ``pyro.plate`` indexes, ``{site}_dim_{i}`` for the others."""
    site = trace.nodes.get(name) if trace is not None else None
    if site is None:
        return tuple(f"{name}_dim_{i}" for i in range(len(shape)))
    event_dim = site["fn"].event_dim if site["type"] == "sample" else 0
    batch = len(shape) - event_dim
    plates = {frame.dim: frame.name for frame in site["cond_indep_stack"] if frame.vectorized}
    return tuple(
        plates.get(i - batch, f"{name}_dim_{i}") if i < batch else f"{name}_dim_{i}"
        for i in range(len(shape))
    )


def _theta_draws(fit: Any) -> dict[str, Any]:
    """The draws of the fit's parameters θ (not of its latent variables)."""
    return {name: value for name, value in (fit.draws or {}).items() if name in fit.params}


def _no_loo_reason(idata: Any) -> str:
    """Why an InferenceData without a ``log_likelihood`` group has none."""
    if idata.attrs.get("method") == "mcmc-em":
        return (
            "MCMC-EM draws the latent variables at its final θ, not θ, so there is no "
            "posterior over θ for LOO to average over (its pointwise values would not vary "
            "between draws, p_loo 0, and az.compare would rank it first for no reason)"
        )
    return "a point estimate has no posterior draws for LOO to average over"


class _Parts(NamedTuple):
    """What a fit contributes to its InferenceData, method aside."""

    dims: dict[str, tuple[str, ...]]
    pointwise: np.ndarray | None
    pointwise_name: str
    pointwise_dim: str
    observed: dict[str, np.ndarray]


def _mixture_parts(fit: Any, log_likelihood: bool) -> _Parts:
    """Dims, pointwise log-likelihood and data of a Mixture ``FitResult``."""
    shared = set(fit.family.shared_params)
    params = fit.params
    dims = {
        name: mixture_dims(name, value.dim(), per_component=name not in shared)
        for name, value in params.items()
    }
    # The latent draws of a Mixture's program (MCMC-EM): one assignment per data point.
    dims.update({name: ("data",) for name in fit.draws or {} if name not in params})
    pointwise = None
    if log_likelihood and _theta_draws(fit):
        if fit.data is None:
            raise SpecError(
                "this fit holds no training data (a loaded fit, or a fit of a streamed "
                "source, which keeps no per-row values), so the pointwise log-likelihood "
                "of its draws cannot be computed; pass log_likelihood=False"
            )
        else:
            num_chains, num_draws = next(iter(fit.draws.values())).shape[:2]
            fields = fit.family.params_type._fields
            chunk_size = int(fit.options.get("chunk_size", 65536))
            rows = np.empty((num_chains, num_draws, fit.data.shape[0]))
            with torch.no_grad():
                for chain in range(num_chains):
                    for draw in range(num_draws):
                        values = {
                            **params,
                            **{name: value[chain, draw] for name, value in fit.draws.items()},
                        }
                        internal = MixtureParams(
                            values["weights"],
                            fit.family.params_type(**{f: values[f] for f in fields}),
                            torch.arange(values["weights"].shape[0]),
                        )
                        score = score_mixture(fit.family, internal, fit.data, chunk_size, False)[0]
                        rows[chain, draw] = _as_numpy(score)
            pointwise = rows
    observed = {} if fit.data is None else {"obs": _as_numpy(fit.data)}
    dims["obs"] = ("data", "dim")
    return _Parts(dims, pointwise, "obs", "data", observed)


def _program_parts(fit: Any, obs_plate: str | None, log_likelihood: bool, progress: bool) -> _Parts:
    """Dims, pointwise log-likelihood and data of a ``ProgramFit``."""
    program = fit.program
    params = fit.params
    trace = program.trace(params)
    mixture = program.name == "mixture_model" and set(program.params) <= _MIXTURE_SITES
    dims = {}
    values = dict(params)
    if fit.draws:
        values.update({name: value[0, 0] for name, value in fit.draws.items()})
    if isinstance(getattr(fit, "parameter_trace", None), Mapping):
        values.update({name: value[0] for name, value in fit.parameter_trace.items()})
    for name, value in values.items():
        if mixture and name in _MIXTURE_SITES:
            plates = {frame.name for frame in trace.nodes[name]["cond_indep_stack"]}
            dims[name] = mixture_dims(name, value.dim(), per_component="components" in plates)
        else:
            dims[name] = _site_dims(trace, name, tuple(value.shape))
    observed = {}
    for name in program.observed:
        value = trace.nodes[name]["value"]
        if isinstance(value, torch.Tensor) and value.numel():
            observed[name] = _as_numpy(value)
            dims[name] = (
                ("data", "dim")
                if mixture and name == "obs"
                else _site_dims(trace, name, tuple(value.shape))
            )
    pointwise = None
    plate = ""
    if log_likelihood and _theta_draws(fit):
        plate = observation_plate(trace, program, obs_plate)
        pointwise_fn = getattr(fit, "pointwise_log_likelihood", None)
        if callable(pointwise_fn):
            table = pointwise_fn(plate=plate)
        else:
            fixed = {name: value for name, value in params.items() if name not in fit.draws}
            table = pointwise_log_likelihood_draws(
                program, fit.draws, fixed, plate=plate, progress=progress
            )
        pointwise = _as_numpy(table)
    name = program.observed[0] if len(program.observed) == 1 else "log_likelihood"
    return _Parts(dims, pointwise, name, plate, observed)


def _dataset(
    arviz: Any,
    values: Mapping[str, np.ndarray],
    dims: Mapping[str, tuple[str, ...]],
    *,
    sampled: bool,
    attrs: Mapping[str, Any] | None = None,
    labels: Mapping[str, Any] | None = None,
    lead: tuple[str, ...] = (),
) -> Any:
    """One InferenceData group; ``sampled``: leading ``(chain, draw)`` dimensions, else
    ``lead``; ``labels``: coordinate values by dimension (integers where absent or of
    another length)."""
    data = {name: np.asarray(value) for name, value in values.items()}
    leading = ["chain", "draw"] if sampled else list(lead)
    named = {name: [*leading, *dims[name]] for name in data}
    coords: dict[str, Any] = {}
    for name, value in data.items():
        for dim, size in zip(named[name], value.shape, strict=True):
            given = (labels or {}).get(dim)
            if given is not None and len(given) == size:
                coords.setdefault(dim, np.asarray(given))
            else:
                coords.setdefault(dim, np.arange(size))
    return arviz.dict_to_dataset(
        data,
        coords=coords,
        dims=named,
        default_dims=[],
        attrs=dict(attrs or {}),
        library=None,
    )


def _stats_dims(
    name: str, value: np.ndarray, chains_draws: tuple[int, int] | None, num_iterations: int
) -> tuple[str, ...]:
    """``(chain, draw, …)`` for per-draw statistics, ``("iteration",)`` for a trace as
    long as the history, ``{name}_dim_{i}`` otherwise."""
    if chains_draws is not None and value.ndim >= 2 and value.shape[:2] == chains_draws:
        return ("chain", "draw", *(f"{name}_dim_{i}" for i in range(value.ndim - 2)))
    if value.ndim == 1 and value.shape[0] == num_iterations:
        return ("iteration",)
    return tuple(f"{name}_dim_{i}" for i in range(value.ndim))


def _netcdf_attrs(values: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes netCDF can store: strings and numbers (booleans as 0/1)."""
    attrs: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            attrs[key] = int(value)
        elif isinstance(value, int | float | str):
            attrs[key] = value
    return attrs


#: Replicated data sets in the ``posterior_predictive`` group: at most this many.
_MAX_PREDICTIVE = 200


def _predictive_thetas(fit: Any) -> tuple[list[dict[str, torch.Tensor]], tuple[int, int]]:
    """The θ values to simulate from and the ``(chain, draw)`` shape they fill: every
    k-th draw of each chain (at most ``_MAX_PREDICTIVE`` in all), or the point estimate
    ``_MAX_PREDICTIVE // 2`` times (a plug-in predictive) without draws of θ."""
    draws = _theta_draws(fit)
    if not draws:
        count = _MAX_PREDICTIVE // 2
        return [dict(fit.params)] * count, (1, count)
    num_chains, num_draws = next(iter(draws.values())).shape[:2]
    step = max(1, math.ceil(num_chains * num_draws / _MAX_PREDICTIVE))
    picks = range(0, num_draws, step)
    thetas = [
        {**fit.params, **{name: value[chain, draw] for name, value in draws.items()}}
        for chain in range(num_chains)
        for draw in picks
    ]
    return thetas, (num_chains, len(picks))


def _mixture_predictive(fit: Any, generator: torch.Generator) -> dict[str, np.ndarray] | None:
    """Replicated data ``(chain, draw, data, dim)`` of a Mixture fit: for each θ, every
    point's component drawn from the weights, then its value from that component."""
    if fit.data is None:
        return None
    thetas, shape = _predictive_thetas(fit)
    fields = fit.family.params_type._fields
    num_data = fit.data.shape[0]
    replicas = []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        for values in thetas:
            weights = values["weights"]
            assignment = torch.multinomial(weights, num_data, replacement=True)
            components = fit.family.params_type(**{f: values[f] for f in fields})
            chosen = fit.family.select(components, assignment)
            replicas.append(_as_numpy(fit.family.component_distribution(chosen).sample()))
    return {"obs": np.stack(replicas).reshape(*shape, *replicas[0].shape)}


def _program_predictive(fit: Any, generator: torch.Generator) -> dict[str, np.ndarray] | None:
    """Replicated observed sites of a Pyro program: for each θ the program is run with
    its observations released, so discrete latents and data are drawn forward."""
    import pyro
    import pyro.poutine as poutine

    program = fit.program
    thetas, shape = _predictive_thetas(fit)
    replicas: dict[str, list[np.ndarray]] = {name: [] for name in program.observed}
    with torch.no_grad(), torch.random.fork_rng(), pyro.validation_enabled(False):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        for values in thetas:
            released = Inject(values)(poutine.uncondition(program.model))
            with poutine.block():
                trace = poutine.trace(released).get_trace(
                    *program.model_args, **program.model_kwargs
                )
            for name in replicas:
                replicas[name].append(_as_numpy(trace.nodes[name]["value"]))
    return {
        name: np.stack(values).reshape(*shape, *values[0].shape)
        for name, values in replicas.items()
    }


def to_arviz(
    fit: Any,
    *,
    obs_plate: str | None = None,
    log_likelihood: bool = True,
    dims: Mapping[str, tuple[str, ...]] | None = None,
    coords: Mapping[str, Any] | None = None,
    posterior_predictive: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> Any:
    """A fit of any method as ``arviz.InferenceData``.

    Groups:

    - ``posterior``: the draws of θ (NUTS, a guide's or the variational posterior's
      draws), ``(chain, draw, …)``. A method without draws of θ (MAP-EM, MCMC-EM) puts
      its point estimate here as one chain of one draw (attribute ``note`` says so), so
      ``az.summary`` and ArviZ's plots show θ; R-hat, ESS and the spread are then
      undefined (NaN), as they are for one value.
    - ``point_estimate``: ``fit.params`` (MAP for map-em, variational posterior mean
      for vb-em, final θ for mcmc-em, posterior mean for nuts; attribute ``estimate``
      says which).
    - ``latent_draws``: draws of latent variables that are not parameters
      (MCMC-EM's last E-step at θ_T: the assignments, continuous local latents),
      ``(chain, draw, …)``; never in ``posterior``.
    - ``parameter_trace``: MCMC-EM's θ_t per iteration, ``(iteration, …)``.
    - ``sample_stats``: the objective trace (``objective``, ``log_likelihood_trace``,
      ``elapsed``, dimension ``iteration``), the method's own per-iteration statistics,
      and per-draw statistics with dimensions ``(chain, draw)`` (NUTS: ``diverging``,
      ``step_size``, ``tree_depth``, ``n_steps``, ``acceptance_rate``, ``energy``,
      ``lp``, …).
    - ``log_likelihood``: pointwise ``log p(x_i | θ_s)`` at each draw of θ with every
      discrete latent summed out, ``(chain, draw, unit)``, so ``az.loo``, ``az.waic`` and
      ``az.compare`` are right. Only for fits with draws of θ: a point estimate (MAP-EM)
      or MCMC-EM's draws of the latents at one θ have no posterior over θ, and LOO on
      them would be degenerate (p_loo 0) and rank them first in ``az.compare``; without
      the group ArviZ refuses instead (:func:`loo` says why). A
      :class:`~pyroem.Mixture` fit names it ``obs`` over dimension ``data``; a Pyro
      program names it after its observed site (``log_likelihood`` when there are
      several) over the observation plate (see :mod:`pyroem.outputs.pointwise`).
    - ``posterior_predictive``: replicated data sets, named and shaped like
      ``observed_data`` with leading ``(chain, draw)``: for each of up to 200 draws of θ
      (every k-th draw of each chain) the discrete latents are drawn from their prior
      given θ and the data from the likelihood given both, so ``az.plot_ppc`` works. A
      point estimate gives 100 replicas at θ̂ (the plug-in predictive, one chain).
    - ``observed_data``: the observed values.

    Dimensions: a Mixture's ``weights`` ``(component)``, ``means`` ``(component, dim)``,
    full ``covariances`` ``(component, dim_row, dim_col)``, … (see
    :func:`mixture_dims`), the same for every method; a Pyro program's batch
    dimensions are named after their plates, the rest ``{site}_dim_{i}``. Coordinates:
    the data's column names for ``dim``, ``dim_row`` and ``dim_col`` where the fit was
    given a DataFrame, integers elsewhere (component ``k`` is coordinate ``k``).

    Args:
        fit: a :class:`~pyroem.Fit`: any model, any method.
        obs_plate: for a Pyro program, the plate whose entries are the observation units.
        log_likelihood: include the ``log_likelihood`` group.
        dims: dimension names per variable, overriding the defaults.
        coords: coordinate values per dimension, e.g. ``{"dim": ["eruptions", "waiting"]}``,
            overriding the defaults.
        posterior_predictive: include the ``posterior_predictive`` group.
        seed: seeds the replicated data sets.
        progress: show a progress bar while the pointwise log-likelihood is computed.

    Returns:
        ``arviz.InferenceData``; save it with ``idata.to_netcdf(path)``, read it back with
        :func:`from_netcdf`.
    """
    arviz = _arviz()
    kind = getattr(fit, "kind", None)
    if kind == "mixture":
        parts = _mixture_parts(fit, log_likelihood)
    elif kind == "program":
        parts = _program_parts(fit, obs_plate, log_likelihood, progress)
    else:
        raise SpecError(f"to_arviz takes a pyroem fit; got {type(fit).__name__}")
    names = {**parts.dims, **{name: tuple(value) for name, value in (dims or {}).items()}}
    labels = _coordinate_labels(fit, coords)
    theta_draws = {name: _as_numpy(value) for name, value in _theta_draws(fit).items()}
    attrs = _netcdf_attrs(
        {
            "method": fit.method,
            "inference_library": "pyroem",
            "runtime_seconds": float(getattr(fit, "runtime", math.nan)),
            "converged": bool(fit.converged),
            "num_iterations": int(fit.num_iterations),
            "posterior_draws": bool(theta_draws),
        }
    )
    groups: dict[str, Any] = {}
    params = {name: _as_numpy(value) for name, value in fit.params.items()}
    estimate = {**attrs, "estimate": _ESTIMATES.get(fit.method, "point estimate")}
    if theta_draws:
        groups["posterior"] = _dataset(
            arviz, theta_draws, names, sampled=True, attrs=attrs, labels=labels
        )
    else:
        # One chain of one draw: az.summary and the plots then show θ, with no spread.
        single = {name: value[None, None] for name, value in params.items()}
        groups["posterior"] = _dataset(
            arviz,
            single,
            names,
            sampled=True,
            attrs={**estimate, "note": "a point estimate as one draw, not posterior draws"},
            labels=labels,
        )
    groups["point_estimate"] = _dataset(
        arviz, params, names, sampled=False, attrs=estimate, labels=labels
    )
    latent_draws = {
        name: _as_numpy(value)
        for name, value in (fit.draws or {}).items()
        if name not in fit.params
    }
    if latent_draws:
        groups["latent_draws"] = _dataset(
            arviz, latent_draws, names, sampled=True, attrs=attrs, labels=labels
        )
    trace = getattr(fit, "parameter_trace", None)
    if isinstance(trace, Mapping) and trace:
        groups["parameter_trace"] = _dataset(
            arviz,
            {name: _as_numpy(value) for name, value in trace.items()},
            names,
            sampled=False,
            attrs=attrs,
            labels=labels,
            lead=("iteration",),
        )
    chains_draws = None
    if fit.draws:
        chains_draws = tuple(next(iter(fit.draws.values())).shape[:2])
    history = fit.history
    stats = {
        "objective": np.asarray(history.objective, dtype=np.float64),
        "log_likelihood_trace": np.asarray(history.log_likelihood, dtype=np.float64),
        "elapsed": np.asarray(history.elapsed, dtype=np.float64),
        **{name: np.asarray(value) for name, value in fit.sample_stats.items()},
    }
    num_iterations = len(history.objective)
    stats_dims = {
        name: _stats_dims(name, value, chains_draws, num_iterations)
        for name, value in stats.items()
    }
    groups["sample_stats"] = _dataset(arviz, stats, stats_dims, sampled=False, attrs=attrs)
    if parts.pointwise is not None:
        groups["log_likelihood"] = _dataset(
            arviz,
            {parts.pointwise_name: parts.pointwise},
            {parts.pointwise_name: ("chain", "draw", parts.pointwise_dim)},
            sampled=False,
            attrs=attrs,
        )
    if posterior_predictive and parts.observed:
        generator = torch.Generator().manual_seed(seed)
        replicas = (
            _mixture_predictive(fit, generator)
            if fit.kind == "mixture"
            else _program_predictive(fit, generator)
        )
        if replicas:
            groups["posterior_predictive"] = _dataset(
                arviz, replicas, names, sampled=True, attrs=attrs, labels=labels
            )
    if parts.observed:
        groups["observed_data"] = _dataset(
            arviz, parts.observed, names, sampled=False, attrs=attrs, labels=labels
        )
    with warnings.catch_warnings():
        # pyroem's own groups (point_estimate, latent_draws, parameter_trace) are not
        # in ArviZ's list of standard groups, which it says in a warning.
        warnings.simplefilter("ignore", UserWarning)
        return arviz.InferenceData(attrs=attrs, **groups)


def _coordinate_labels(fit: Any, coords: Mapping[str, Any] | None) -> dict[str, Any]:
    """Coordinate values: the data's column names (``fit.feature_names``, set when the
    data came as a DataFrame) for ``dim``, ``dim_row`` and ``dim_col``, then ``coords``."""
    labels: dict[str, Any] = {}
    names = getattr(fit, "feature_names", None)
    if names is not None:
        columns = [str(name) for name in names]
        labels.update({dim: columns for dim in ("dim", "dim_row", "dim_col")})
    labels.update({dim: list(values) for dim, values in (coords or {}).items()})
    return labels


def from_netcdf(path: str | os.PathLike[str]) -> Any:
    """Read an ``InferenceData`` saved with ``idata.to_netcdf(path)``."""
    return _arviz().from_netcdf(os.fspath(path))


def loo(data: Any, *, pointwise: bool = False) -> Any:
    """Pareto-smoothed importance-sampling LOO (``az.loo``) of a fit or InferenceData.

    Args:
        data: a pyroem fit (converted with :func:`to_arviz`) or an ``InferenceData``.
        pointwise: also return the per-observation values (``loo_i``, ``pareto_k``).

    Raises:
        NotSupportedError: there are no posterior draws of θ (a MAP-EM fit, whose point
            estimate has no posterior to average over, or an MCMC-EM fit, whose draws
            are of the latent variables at one θ).
    """
    arviz = _arviz()
    idata = _inference_data(arviz, data, posterior_predictive=False)
    if "log_likelihood" not in idata.groups():
        raise NotSupportedError(
            f"LOO needs posterior draws of θ: {_no_loo_reason(idata)}; fit with "
            "method='nuts' or 'vb-em', or compare point estimates by BIC"
        )
    return arviz.loo(idata, pointwise=pointwise)


def _inference_data(arviz: Any, value: Any, **options: Any) -> Any:
    return value if isinstance(value, arviz.InferenceData) else to_arviz(value, **options)


def loo_table(fits: Mapping[Any, Any]) -> Any:
    """LOO of several fits side by side (``az.compare``), best first.

    Args:
        fits: ``{label: fit or InferenceData}``; every one needs posterior draws.

    Returns:
        ArviZ's comparison DataFrame indexed by the given labels: ``rank``,
        ``elpd_loo``, ``p_loo``, ``elpd_diff``, ``weight``, ``se``, ``dse``,
        ``warning``, ``scale``.

    Raises:
        NotSupportedError: a fit has no posterior draws of θ (see :func:`loo`).
    """
    arviz = _arviz()
    datasets = {
        label: _inference_data(arviz, fit, posterior_predictive=False)
        for label, fit in fits.items()
    }
    without = {
        label: _no_loo_reason(data)
        for label, data in datasets.items()
        if "log_likelihood" not in data.groups()
    }
    if without:
        reasons = "; ".join(f"{label!r}: {reason}" for label, reason in without.items())
        raise NotSupportedError(
            f"LOO needs posterior draws of θ, and the fits {list(without)} have none "
            f"({reasons}); compare fits from method='nuts' or 'vb-em'"
        )
    keys = {str(label): label for label in datasets}
    with warnings.catch_warnings():
        # pandas deprecations inside ArviZ 0.x; Pareto-k warnings still reach the caller.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        table = arviz.compare({str(label): data for label, data in datasets.items()}, ic="loo")
    table.index = [keys[str(label)] for label in table.index]
    return table


def plot_forest(
    fits: Mapping[Any, Any],
    var_names: list[str] | None = None,
    *,
    interval: float = 0.94,
    align: bool = True,
) -> Any:
    """Forest plots of the same parameters across fits (``az.plot_forest``), one panel
    per parameter, and per entry of its non-component dimensions (a mean's ``dim``, a
    covariance's ``dim_row``/``dim_col``, up to 9 panels), so each has its own scale.

    The fits' mixture components are first put in one order (label switching, the same
    alignment :func:`pyroem.compare` uses). Fits with draws of θ show their credible
    intervals; a point estimate (MAP-EM, MCMC-EM's final θ) shows as a dot. Latent
    variables (MCMC-EM's assignments) are never drawn: only the fits' parameters.

    Args:
        fits: ``{label: fit}``.
        var_names: parameters to show (default: every parameter the fits share).
        interval: probability of the highest-density intervals.
        align: align the components to the first fit first.

    Returns:
        The matplotlib ``Axes``, one per panel, in a NumPy array; each panel's title
        names the parameter and the entry (``means (dim=waiting)``).
    """
    arviz = _arviz()
    plt = _pyplot()
    if align and len(fits) > 1:
        fits = align_fits(fits)
    datasets = [
        to_arviz(fit, log_likelihood=False, posterior_predictive=False).posterior
        for fit in fits.values()
    ]
    shared = set(datasets[0].data_vars).intersection(*(d.data_vars for d in datasets[1:]))
    if var_names is None:
        var_names = [str(name) for name in datasets[0].data_vars if name in shared]
    missing = [name for name in var_names if name not in shared]
    if missing or not var_names:
        raise SpecError(
            f"plot_forest draws parameters every fit has ({sorted(map(str, shared))}); "
            f"got var_names={var_names!r}"
        )
    panels = [(name, selection) for name in var_names for selection in _panels(datasets[0][name])]
    rows = [int(np.prod(datasets[0][name].sel(selection).shape[2:])) for name, selection in panels]
    figure, axes = plt.subplots(
        len(panels),
        1,
        figsize=(6, 0.8 + 0.2 * len(fits) * sum(rows) + 0.6 * len(panels)),
        gridspec_kw={"height_ratios": rows},
        squeeze=False,
    )
    for ax, (name, selection) in zip(axes[:, 0], panels, strict=True):
        with _quiet():
            arviz.plot_forest(
                [arviz.InferenceData(posterior=data[[name]]) for data in datasets],
                model_names=[str(label) for label in fits],
                var_names=[name],
                coords=selection,
                combined=True,
                hdi_prob=interval,
                ax=ax,
            )
        where = ", ".join(f"{dim}={value}" for dim, value in selection.items())
        ax.set_title(f"{name} ({where})" if where else name)
        if ax is not axes[0, 0] and ax.get_legend() is not None:
            ax.get_legend().remove()
    figure.tight_layout()
    return axes[:, 0]


#: Most panels one parameter is split into (one per entry of its non-component dimensions).
_MAX_PANELS = 9


def _panels(variable: Any) -> list[dict[str, Any]]:
    """Coordinate selections, one per forest panel of a ``(chain, draw, …)`` variable:
    one per entry of the dimensions other than ``component`` (a mean's ``dim``, a
    covariance's ``dim_row``/``dim_col``), whose values may differ in scale, when there
    are at most ``_MAX_PANELS``; else one panel."""
    import itertools

    other = [dim for dim in variable.dims[2:] if dim != "component"]
    values = [variable.coords[dim].values.tolist() for dim in other]
    combos = list(itertools.product(*values))
    if not other or len(combos) > _MAX_PANELS:
        return [{}]
    return [dict(zip(other, combo, strict=True)) for combo in combos]


def _pyplot() -> Any:
    """Matplotlib's pyplot on a non-interactive backend unless one is already chosen."""
    import sys

    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
