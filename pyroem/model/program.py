"""What is what in a Pyro program: parameters, enumerated latents, data.

One trace of the program sorts its sites:

- **parameters θ**: global latent ``pyro.sample`` sites (MAP-estimated under their
  prior) and ``pyro.param`` sites (maximum likelihood: a flat prior);
- **enumerated latents**: discrete sites with finite support, summed out exactly
  by parallel enumeration (sites not marked for enumeration are enumerated too);
- **data**: observed sites.

Anything else — a continuous latent local to the data, a discrete latent with
infinite support, a site asking for sequential enumeration — is a model MAP-EM
cannot fit exactly, and the error names the site and the method to use instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.enum import config_enumerate
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _ENUM_ALLOCATOR, _PYRO_STACK
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from pyroem.errors import DataError, NotSupportedError, SpecError

__all__ = [
    "ParamSite",
    "ProgramModel",
    "broadcast_error",
    "check_full_plates",
    "module_parameter",
    "sample_sites",
    "set_param",
]


class ParamSite(NamedTuple):
    """A parameter of the program.

    Attributes:
        name: the site name.
        kind: ``"sample"`` (a latent with a prior: MAP) or ``"param"`` (``pyro.param``: ML).
        shape: the value's shape.
        constraint: the support, whose bijection maps the unconstrained space to it.
    """

    name: str
    kind: str
    shape: torch.Size
    constraint: constraints.Constraint


class Inject(Messenger):
    """Sets parameter sites to given values: sample sites become observed (their
    log-probability is the log prior), ``pyro.param`` sites return the value."""

    def __init__(self, values: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg: Any) -> None:
        value = self.values.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_param(self, msg: Any) -> None:
        value = self.values.get(msg["name"])
        if value is not None:
            set_param(msg, value)


def module_parameter(msg: Any) -> torch.nn.Parameter | None:
    """The ``torch.nn.Parameter`` behind a ``pyro.param`` message that ``pyro.module``
    sent (its initial tensor), else ``None``."""
    args = msg["args"]
    init = args[1] if len(args) > 1 else None
    return init if isinstance(init, torch.nn.Parameter) else None


def set_param(msg: Any, value: torch.Tensor) -> None:
    """Answer a ``pyro.param`` message with ``value``.

    A module's parameter is also written into the module: ``pyro.module`` keeps the
    network's own weights (``update_module_params=False``), so a value returned to it
    alone would never reach the network.
    """
    msg["value"] = value
    msg["done"] = True
    parameter = module_parameter(msg)
    if parameter is not None and value is not parameter:
        with torch.no_grad():
            parameter.copy_(value)


def broadcast_error(program: str, what: str, method: str, err: Exception) -> NotSupportedError:
    """The error for a program that fails once its latents carry extra leading
    dimensions (stacked draws, or the values of enumerated latents)."""
    return NotSupportedError(
        f"running the model {program} with {what} failed ({type(err).__name__}: {err}); "
        f"{method} evaluates all values at once, so the program must broadcast over leading "
        "dimensions of latent values: index with b[..., i] rather than b[i], combine values "
        "by broadcasting, and do not branch in Python on a latent's value (if z.item(): ...)"
        " but select with torch.where(z.bool(), a, b) or index a tensor by z"
    )


def sample_sites(trace: poutine.Trace) -> list[tuple[str, Any]]:
    """The ``pyro.sample`` sites of a trace, without plates' subsample sites."""
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def _is_discrete(site: Any) -> bool:
    support = getattr(site["fn"], "support", None)
    return bool(getattr(support, "is_discrete", False))


def _check_observed(name: str, site: Any) -> None:
    """Observed values must be finite and inside the distribution's support."""
    value = site["value"]
    if not isinstance(value, torch.Tensor):
        return
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise DataError(
            f"observed site {name!r} has {bad} NaN or infinite values; drop or impute them"
        )
    support = getattr(site["fn"], "support", None)
    if support is None or getattr(support, "is_dependent", False):
        return
    inside = support.check(value)
    if site["mask"] is not None and isinstance(site["mask"], torch.Tensor):
        inside = inside | ~site["mask"]
    if not bool(torch.as_tensor(inside).all()):
        raise DataError(
            f"observed site {name!r} has values outside the support of its "
            f"{type(site['fn']).__name__} distribution ({support}); check the data "
            "(e.g. negative or non-integer counts for a Poisson)"
        )


def _subsample_taken(site: Any) -> tuple[int, int] | None:
    """``(size, subsample size)`` of a plate's subsample site that takes fewer entries
    than the plate has, else ``None``."""
    size = getattr(site["fn"], "size", None)
    taken = site["value"].numel() if isinstance(site["value"], torch.Tensor) else size
    if size is not None and taken is not None and taken < size:
        return int(size), int(taken)
    return None


def check_full_plates(trace: poutine.Trace) -> None:
    """Every plate must hand the program all of its data: an exact E-step sums over every
    data point, and a subsample would change from one run of the program to the next.

    Raises:
        NotSupportedError: a plate subsamples; the message names it and the two routes
            (stepwise EM on the subsamples, or no subsampling).
    """
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site_is_subsample(site):
            continue
        taken = _subsample_taken(site)
        if taken is not None:
            size, batch = taken
            raise NotSupportedError(
                f"plate {name!r} subsamples {batch} of its {size} entries (subsample_size "
                "or a batch size); batch map-em's E-step is exact over all the data, so "
                "every run of the program must see all of it. Either fit it by stepwise EM "
                f"on the subsamples: pyroem.fit(..., method='map-em', stepwise=True), which "
                f"scales each subsample by {size}/{batch} as Pyro does (closed-form M-steps "
                "only); or run the program without subsampling (e.g. batch_size=None, "
                "subsample_size=None)"
            )


def _placed_with_data(site: Any, observed_plates: set[str]) -> bool:
    """Is a latent written inside a plate that holds observations, or in a markov chain?"""
    in_plate = any(
        frame.vectorized and frame.name in observed_plates for frame in site["cond_indep_stack"]
    )
    return in_plate or bool(site["infer"].get("_markov_scope"))


def _plate_nesting(trace: poutine.Trace) -> int:
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


class _NotFirstTrace(BaseException):
    """Stops a sorting run that cannot also be the first enumerated trace (a
    ``BaseException``, so that a program's own ``except Exception`` does not catch it)."""


def _random_states() -> list[torch.Tensor]:
    """The states of the global random number generators a program may draw from:
    torch's (CPU, and CUDA once started), NumPy's and Python's ``random`` (a
    ``torch.Generator`` or NumPy ``Generator`` of the program's own is not seen)."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.extend(torch.cuda.get_rng_state_all())
    legacy: Any = np.random.get_state(legacy=True)  # noqa: NPY002
    _, keys, position, gauss, cached = legacy
    numbers = np.append(np.asarray(keys, np.float64), [position, gauss, cached])
    states.append(torch.from_numpy(numbers))
    states.append(torch.tensor(random.getstate()[1], dtype=torch.float64))
    return states


class _EnumerateWhileSorting(EnumMessenger):
    """Pyro's parallel enumeration, its first dimension chosen at the first enumerated
    site: left of every plate seen so far. The run is a trace :meth:`ProgramModel.trace`
    would give if no plate seen later nests deeper (checked on the finished trace).

    Stops the run (:class:`_NotFirstTrace`) at a latent it would sample (a continuous
    one, or one not marked for parallel enumeration: that trace draws it, this one
    must not) and at a parameter of a torch module. Notes (:attr:`drew`) whether the
    program drew random numbers other than in the initial values of ``pyro.param``
    sites: the sorting run draws those (a parameter's initial value), but a subsample
    or a draw in the program's body would be drawn anew by :meth:`ProgramModel.trace`,
    from the caller's random state.
    """

    def __init__(self) -> None:
        super().__init__(first_available_dim=None)
        self.nesting = 0
        self.first_dim: int | None = None
        self.drew = False
        self._random_states = _random_states()

    def __enter__(self) -> _EnumerateWhileSorting:
        # No dimension allocated yet: the sites before the first enumerated one see none.
        _ENUM_ALLOCATOR.set_first_available_dim(-1)
        self._random_states = _random_states()
        super().__enter__()
        return self

    def _drawn_since(self) -> bool:
        now, before = _random_states(), self._random_states
        return len(now) != len(before) or not all(
            torch.equal(a, b) for a, b in zip(now, before, strict=True)
        )

    def finished(self) -> bool:
        """Was nothing random drawn since the last parameter (see :attr:`drew`)?"""
        self.drew = self.drew or self._drawn_since()
        return not self.drew

    def _pyro_sample(self, msg: Any) -> None:
        for frame in msg["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                self.nesting = max(self.nesting, -frame.dim)
        if not (msg["is_observed"] or msg["done"] or site_is_subsample(msg)):
            if msg["infer"].get("enumerate") != "parallel":
                raise _NotFirstTrace
            if self.first_dim is None:
                self.first_dim = -self.nesting - 1
                _ENUM_ALLOCATOR.set_first_available_dim(self.first_dim)
        super()._pyro_sample(msg)

    def _pyro_param(self, msg: Any) -> None:
        if module_parameter(msg) is not None:
            raise _NotFirstTrace
        self.drew = self.drew or self._drawn_since()

    def _pyro_post_param(self, msg: Any) -> None:
        # What the parameter's initial value drew is drawn by the sorting run too.
        self._random_states = _random_states()


class _DetachedParams(Messenger):
    """Hands ``pyro.param`` values to the program and the trace detached (copies)."""

    def _pyro_post_param(self, msg: Any) -> None:
        value: Any = msg["value"]
        msg["value"] = value.detach().clone()


def _unvalidated(fn: Any) -> None:
    """Turn off argument validation in a distribution and the ones it wraps, as if
    built with validation off."""
    while fn is not None:
        if hasattr(fn, "_validate_args"):
            fn._validate_args = False
        fn = getattr(fn, "base_dist", None)


class ProgramModel:
    """A Pyro program with its sites sorted, ready to be run with parameter values.

    Args:
        model: the Pyro program (a callable).
        model_args: its positional arguments.
        model_kwargs: its keyword arguments.
        check_enumeration: run the program once with its discrete latents enumerated,
            so that one that cannot be is reported here; a caller whose next step is
            such a run (:meth:`trace`, which reports the same way) turns it off.
        sort_enumerated: sort the sites on a run with the discrete latents enumerated,
            which then serves as the first trace (:meth:`sorting_trace`) where it is
            the trace :meth:`trace` would give; otherwise (latents it would sample,
            plates nested deeper than those before the first discrete latent, a
            module's parameters, random numbers drawn other than in parameters' initial
            values, an error) the sites are sorted on an ordinary run as without it.

    Raises:
        NotSupportedError: the program has a site MAP-EM cannot handle; the message
            names the site and the method to use instead.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        model_args: tuple[Any, ...] = (),
        model_kwargs: Mapping[str, Any] | None = None,
        check_enumeration: bool = True,
        sort_enumerated: bool = False,
    ) -> None:
        if not callable(model):
            raise SpecError(
                f"model must be a Pyro program (a callable) or a pyroem.Mixture; "
                f"got {type(model).__name__}"
            )
        self.model = config_enumerate(model, default="parallel")
        self.model_args = tuple(model_args)
        self.model_kwargs = dict(model_kwargs or {})
        self.name = getattr(model, "__name__", type(model).__name__)
        # The trial runs draw latents from the prior: on a forked RNG, so that sorting
        # the sites leaves the caller's random state as it was.
        self._sorting_trace: poutine.Trace | None = None
        with torch.random.fork_rng(), pyro.get_param_store().scope(), poutine.block():
            trace = self._enumerated_run() if sort_enumerated else None
            self._sorting_trace = trace
            if trace is None:
                try:
                    trace = poutine.trace(self.model).get_trace(
                        *self.model_args, **self.model_kwargs
                    )
                except Exception as err:
                    raise SpecError(
                        f"running the model {self.name}(*model_args, **model_kwargs) failed: "
                        f"{type(err).__name__}: {err}"
                    ) from err
            self.max_plate_nesting = _plate_nesting(trace)
            self.params: dict[str, ParamSite] = {}
            self.param_inits: dict[str, torch.Tensor] = {}
            # Continuous latents written with the data that are parameters all the same.
            self._shared_latents: set[str] = set()
            # Parameters of torch modules registered with pyro.module, by site.
            self.module_params: dict[str, torch.nn.Parameter] = {}
            self.enumerated: list[str] = []
            self.observed: list[str] = []
            # Plates that subsample: {name: (size, subsample size)}.
            self.subsampled: dict[str, tuple[int, int]] = {}
            self._sort_sites(trace)
            self._check_dtypes(trace)
            if self.enumerated and check_enumeration and self._sorting_trace is None:
                # Every method runs the program with its discrete latents enumerated: a
                # program that cannot be is reported here, the same way for all of them.
                nodes: Any = trace.nodes
                self.trace({name: nodes[name]["value"].detach() for name in self.params})
        if not self.observed:
            raise SpecError(
                f"the model {self.name} has no observed sites; pass the data to the model "
                "and observe it with pyro.sample(..., obs=data)"
            )

    def _enumerated_run(self) -> poutine.Trace | None:
        """The sorting run with the discrete latents enumerated (see ``sort_enumerated``),
        log-probabilities computed and tensors packed; ``None`` where it is not the
        trace :meth:`trace` would give at the program's own parameter values. The random
        state and parameter store are left as they were found."""
        random_state = torch.get_rng_state()
        enumerate_ = _EnumerateWhileSorting()
        depth = len(_PYRO_STACK)
        traced = poutine.trace(enumerate_(self.model))
        try:
            with pyro.get_param_store().scope(), _DetachedParams():
                trace = traced.get_trace(*self.model_args, **self.model_kwargs)
                nesting = _plate_nesting(trace)
                if enumerate_.first_dim not in (None, -nesting - 1) or not enumerate_.finished():
                    return None
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        # Built as validated as the program asked (the sorting run's
                        # check); scored as :meth:`trace` scores, without validation.
                        _unvalidated(site["fn"])
                trace.compute_log_prob()
                trace.pack_tensors()
        except (_NotFirstTrace, Exception):
            del _PYRO_STACK[depth:]
            return None
        finally:
            torch.set_rng_state(random_state)
        return trace

    def sorting_trace(self, values: Mapping[str, torch.Tensor]) -> poutine.Trace | None:
        """The enumerated sorting run (``sort_enumerated``) as :meth:`trace` at ``values``
        would give it, if ``values`` are the parameter values it ran with, else
        ``None``; handed out once."""
        trace, self._sorting_trace = self._sorting_trace, None
        if trace is None:
            return None
        for name in self.params:
            own: Any = trace.nodes[name]["value"]
            value = values.get(name)
            if not (
                isinstance(value, torch.Tensor)
                and value.shape == own.shape
                and value.dtype == own.dtype
                and value.device == own.device
                and torch.equal(value, own)
            ):
                return None
        for name in self.params:
            trace.nodes[name]["value"] = values[name]
        return trace

    # ----- site classification --------------------------------------------------
    def _sort_sites(self, trace: poutine.Trace) -> None:
        observed_plates = {
            frame.name
            for site in trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        }
        # Continuous latents written inside a plate that holds data, or inside a markov
        # chain: local to the data only if they have a value per observation.
        suspects: list[str] = []
        continuous: dict[str, Any] = {}
        for name, node in trace.nodes.items():
            site: Any = node
            if site["type"] == "sample" and site_is_subsample(site):
                taken = _subsample_taken(site)
                if taken is not None:
                    self.subsampled[name] = taken
                continue
            if site["type"] == "param":
                parameter = module_parameter(site)
                if parameter is not None:
                    self.module_params[name] = parameter
                value = site["value"].detach()
                constraint = site["kwargs"].get("constraint") or constraints.real
                self.params[name] = ParamSite(name, "param", value.shape, constraint)
                self.param_inits[name] = value.clone()
            elif site["type"] != "sample" or site["is_observed"]:
                if site["type"] == "sample":
                    _check_observed(name, site)
                    self.observed.append(name)
                continue
            elif _is_discrete(site):
                self._check_enumerable(name, site)
                self.enumerated.append(name)
            else:
                continuous[name] = site
                if _placed_with_data(site, observed_plates):
                    suspects.append(name)
                support = site["fn"].support
                self.params[name] = ParamSite(name, "sample", site["value"].shape, support)
        if suspects:
            self._shared_latents = set(suspects) - self._local_latents(trace, suspects)
        for name, site in continuous.items():
            self._check_global(name, site, observed_plates)

    def _local_latents(self, trace: poutine.Trace, names: list[str]) -> set[str]:
        """Which of the continuous latents ``names`` are local to the data.

        A latent is local when an observed site reads it directly and lies in no plate
        the latent is not in (each observation has a value of its own), or when it is a
        random effect: a reading observation shares a plate with it and its prior reads
        another parameter (a fitted spread, whose joint mode with the effects would
        collapse). Otherwise — a value per period of a markov chain shared by every
        observation of the period, a value per feature with a fixed prior — it is a
        parameter. Found by one run of the program with the parameters tracking
        gradients; if that run fails, all of them are local.
        """
        values: dict[str, Any] = {}
        for name, param in self.params.items():
            values[name] = (
                self.param_inits[name] if param.kind == "param" else trace.nodes[name]["value"]
            )
        leaves = {
            name: value.detach().clone().requires_grad_()
            for name, value in values.items()
            if value.is_floating_point()
        }
        try:
            with pyro.get_param_store().scope(), torch.enable_grad():
                run = self.trace({**values, **leaves})
        except Exception:
            return set(names)

        def plates(site: Any) -> set[str]:
            return {frame.name for frame in site["cond_indep_stack"] if frame.vectorized}

        def readers(table: torch.Tensor) -> set[str]:
            if not table.requires_grad:
                return set()
            grads = torch.autograd.grad(
                table.sum(), list(leaves.values()), allow_unused=True, retain_graph=True
            )
            return {name for name, grad in zip(leaves, grads, strict=True) if grad is not None}

        hierarchical = {
            name for name in names if readers(run.nodes[name]["unscaled_log_prob"]) - {name}
        }
        local: set[str] = set()
        for name in self.observed:
            site: Any = run.nodes.get(name)
            if site is None:
                continue
            for latent in readers(site["unscaled_log_prob"]) & set(names):
                own = plates(run.nodes[latent])
                if plates(site) <= own or (latent in hierarchical and plates(site) & own):
                    local.add(latent)
        return local

    def _check_enumerable(self, name: str, site: Any) -> None:
        strategy = site["infer"].get("enumerate")
        if strategy == "sequential":
            raise NotSupportedError(
                f"site {name!r} asks for sequential enumeration; pyroem sums discrete "
                "latents by parallel enumeration: use infer={'enumerate': 'parallel'}"
            )
        if strategy != "parallel":
            raise NotSupportedError(
                f"site {name!r} is a discrete latent ({type(site['fn']).__name__}) with "
                "infinite or unenumerable support, which map-em cannot sum out exactly; "
                "bound its support (e.g. a Categorical over 0..max) so it can be enumerated"
            )

    def _check_global(self, name: str, site: Any, observed_plates: set[str]) -> None:
        if name in self._shared_latents:
            # Written with the data, but without a value per observation: a parameter.
            return
        local = [
            frame.name
            for frame in site["cond_indep_stack"]
            if frame.vectorized and frame.name in observed_plates
        ]
        if local:
            raise NotSupportedError(
                f"site {name!r} is a continuous latent variable local to the data "
                f"(inside plate {local[0]!r}, which also holds observations); map-em sums out "
                "only discrete latents: use method='mcmc-em' (or 'vb-em') for this model"
            )
        if site["infer"].get("_markov_scope"):
            raise NotSupportedError(
                f"site {name!r} is a continuous latent inside a pyro.markov chain; map-em "
                "sums out only discrete latents: use method='mcmc-em' (or 'vb-em')"
            )

    def _check_dtypes(self, trace: poutine.Trace) -> None:
        dtypes: dict[torch.dtype, str] = {}
        for name in [*self.params, *self.observed]:
            value = trace.nodes[name]["value"]
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                dtypes.setdefault(value.dtype, name)
        if len(dtypes) > 1:
            found = ", ".join(f"{name!r} is {dtype}" for dtype, name in dtypes.items())
            raise SpecError(
                f"the model mixes floating-point dtypes ({found}); use one dtype throughout, "
                "e.g. torch.set_default_dtype(torch.float64) before building the model, "
                "or convert the data"
            )

    # ----- running ------------------------------------------------------------------
    def trace(self, values: Mapping[str, torch.Tensor], validate: bool = False) -> poutine.Trace:
        """Run the program with parameters ``values``, discrete latents enumerated.

        Pyro's argument validation is off here unless ``validate``: the program, the
        data and the starting values were validated once, when the sites were sorted,
        and EM only moves parameters inside their supports (about a fifth of a run's
        time). A gradient step on a parameter whose support is wider than the argument
        it feeds (a real ``pyro.param`` used as probabilities) is checked with
        ``validate=True``: Pyro raises ``ValueError`` for an invalid argument.

        Returns:
            The trace, with ``log_prob`` terms computed and tensors packed.
        """
        missing = [name for name in self.params if name not in values]
        if missing:
            raise SpecError(f"parameter values missing for sites {missing}")
        first_dim = -self.max_plate_nesting - 1
        program = poutine.enum(Inject(values)(self.model), first_available_dim=first_dim)
        with poutine.block(), pyro.validation_enabled(validate):
            try:
                trace = poutine.trace(program).get_trace(*self.model_args, **self.model_kwargs)
            except (RuntimeError, IndexError) as err:
                if not self.enumerated:
                    raise
                raise broadcast_error(
                    self.name,
                    f"its discrete latents {self.enumerated} enumerated (each holds all its "
                    "values along a new leading dimension)",
                    "pyroem sums discrete latents out exactly and",
                    err,
                ) from err
            trace.compute_log_prob()
            trace.pack_tensors()
        return trace

    def __repr__(self) -> str:
        return (
            f"ProgramModel({self.name}, params={list(self.params)}, "
            f"enumerated={self.enumerated}, observed={self.observed})"
        )
