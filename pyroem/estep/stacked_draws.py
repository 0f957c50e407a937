r"""The Monte Carlo Q of a Pyro program: its latent draws stacked along an outer plate.

MCMC-EM replaces the exact expectation in

.. math:: Q(θ; θ_t) = E_{p(z \mid x, θ_t)}[\log p(x, z; θ)]

by the draws :math:`z_1, …, z_S` of the E-step,
:math:`\hat Q(θ) = \sum_s w_s \log p(x, z_s; θ)` with :math:`\sum_s w_s = 1`
(:math:`w_s = 1/S` for one E-step; stochastic-approximation weights across E-steps).
pyroem feeds this :math:`\hat Q` to the same M-steps as MAP-EM
(:func:`~pyroem.mstep.recognised.closed_form_update`,
:func:`~pyroem.mstep.gradient.gradient_m_step`), which read a trace of the program
and one weight per entry of every site's log-probability table:

- **continuous latents** (random effects, say) are conditioned on their draws with
  the program run once for all draws, the draws stacked along an extra outer plate
  (:class:`StackedProgram`); every table gains that plate's dimension and its entries
  are weighted by :math:`w_s`. The program must broadcast over one more leading
  dimension of its latent values (write ``b[..., index]``, not ``b[index]``), as for
  Pyro's vectorised particles.
- **discrete latents** keep the enumerated trace of MAP-EM; the weight of a table
  entry is the weighted frequency with which the draws took its configuration
  (:func:`table_weights`) — exactly the Monte Carlo version of the posterior
  marginals that :func:`~pyroem.estep.program.posterior` puts there.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from torch.distributions import constraints

from pyroem.errors import NotSupportedError, SpecError
from pyroem.model.program import Inject, ProgramModel, broadcast_error, sample_sites

__all__ = [
    "DRAWS_PLATE",
    "LatentProgram",
    "LatentSite",
    "StackedProgram",
    "check_stackable",
    "per_draw_log_joint",
    "table_weights",
]

#: Name of the outer plate along which draws are stacked.
DRAWS_PLATE = "_mcmc_em_draws"


class LatentSite(NamedTuple):
    """A latent variable MCMC-EM samples.

    Attributes:
        name: the site name.
        shape: its value's shape in one run of the program.
        event_dim: the number of event dimensions of its distribution.
        support: its distribution's support.
    """

    name: str
    shape: torch.Size
    event_dim: int
    support: constraints.Constraint


class LatentProgram(ProgramModel):
    """A :class:`~pyroem.model.program.ProgramModel` whose continuous latents are sampled.

    The sites are sorted as for MAP-EM, except that continuous latents local to the
    data (inside a plate that also holds observations, or inside a ``pyro.markov``
    chain), and the sample sites named in ``latents``, are latent variables listed
    in :attr:`latents` and left out of :attr:`params`. Discrete latents are
    enumerated as for MAP-EM (:attr:`enumerated`).

    Args:
        model: the Pyro program.
        model_args: its positional arguments.
        model_kwargs: its keyword arguments.
        latents: further continuous sample sites to treat as latent variables (for
            example random effects in a plate of groups, which holds no observation).
            When none are named and nothing else is latent, a program with both
            ``pyro.param`` sites and continuous sample sites takes the sample sites as
            its latents (the ``pyro.param`` sites being the parameters).

    Raises:
        SpecError: a name in ``latents`` is not a continuous latent sample site.
        NotSupportedError: an enumerated site has event dimensions.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        model_args: tuple[Any, ...] = (),
        model_kwargs: Mapping[str, Any] | None = None,
        latents: Collection[str] = (),
    ) -> None:
        self._named_latents = frozenset(latents)
        self.latents: list[str] = []
        super().__init__(model, model_args, model_kwargs)
        missing = sorted(self._named_latents - set(self.latents))
        if missing:
            candidates = sorted(name for name, site in self.params.items() if site.kind == "sample")
            raise SpecError(
                f"latents names {missing}, which are not continuous latent sample sites of "
                f"the model {self.name}; the candidates are {candidates}"
            )
        if not latents and not self.latents and not self.enumerated:
            self._default_latents()
        for name in self.latents:
            self.params.pop(name, None)
        self.latent_sites, self.discrete_shapes = self._latent_shapes()

    def _default_latents(self) -> None:
        """With nothing else latent, a program whose parameters are ``pyro.param`` sites
        reads as a mixed model (as in lme4 or statsmodels): its continuous sample sites
        are the random effects to integrate over."""
        kinds = {site.kind for site in self.params.values()}
        if kinds == {"param", "sample"}:
            self.latents = [name for name, site in self.params.items() if site.kind == "sample"]

    def _check_global(self, name: str, site: Any, observed_plates: set[str]) -> None:
        try:
            super()._check_global(name, site, observed_plates)
        except NotSupportedError:
            self.latents.append(name)
            return
        if name in self._named_latents:
            self.latents.append(name)

    def _latent_shapes(self) -> tuple[dict[str, LatentSite], dict[str, torch.Size]]:
        """The continuous latents, and the value shape of each discrete latent, from one
        run with prior draws of them."""
        with (
            torch.random.fork_rng(),
            pyro.get_param_store().scope(),
            poutine.block(),
            pyro.validation_enabled(False),
        ):
            trace = poutine.trace(self.model).get_trace(*self.model_args, **self.model_kwargs)
        for name in self.enumerated:
            if trace.nodes[name]["fn"].event_dim:
                raise NotSupportedError(
                    f"discrete latent {name!r} has event dimensions "
                    f"({type(trace.nodes[name]['fn']).__name__}); mcmc-em samples discrete "
                    "latents with scalar values: use Categorical instead of OneHotCategorical"
                )
        continuous = {
            name: LatentSite(
                name,
                trace.nodes[name]["value"].shape,
                trace.nodes[name]["fn"].event_dim,
                trace.nodes[name]["fn"].support,
            )
            for name in self.latents
        }
        # The program's floating-point dtype (its data and parameters share one, see
        # ProgramModel): the latents are drawn in it, whatever torch's default dtype is.
        floating = [
            trace.nodes[name]["value"]
            for name in [*self.observed, *self.params, *self.latents]
            if isinstance(trace.nodes[name]["value"], torch.Tensor)
            and trace.nodes[name]["value"].is_floating_point()
        ]
        self.dtype = floating[0].dtype if floating else torch.get_default_dtype()
        return continuous, {name: trace.nodes[name]["value"].shape for name in self.enumerated}


def _stack_shape(value: torch.Tensor, num_draws: int, nesting: int, event_dim: int) -> torch.Tensor:
    """``(S, *shape)`` draws → ``(S, 1…1, *shape)`` with ``S`` at plate dim ``-(nesting+1)``."""
    batch = value.dim() - 1 - event_dim
    missing = nesting - batch
    if missing < 0:
        raise NotSupportedError(
            f"a latent has {batch} batch dimensions, more than the {nesting} plates of the "
            "program; declare its batch dimensions with pyro.plate"
        )
    return value.reshape(num_draws, *(1,) * missing, *value.shape[1:])


class StackedProgram(ProgramModel):
    """The program run for every draw at once, draws stacked along an outer plate.

    Sites named in ``draws`` are conditioned on their draws (their table is their
    log density); the parameters are set as for MAP-EM; the remaining discrete
    latents are enumerated, at dimensions left of the draws plate.

    Args:
        base: the program.
        draws: site → draws ``(num_draws, *value_shape)``, where ``value_shape`` is the
            site's shape in one run (a discrete site: its plates' shape, one entry per
            plate dimension).
        num_draws: number of draws, needed when ``draws`` is empty.
    """

    def __init__(
        self,
        base: LatentProgram,
        draws: Mapping[str, torch.Tensor],
        num_draws: int | None = None,
    ) -> None:
        sizes = {value.shape[0] for value in draws.values()}
        if num_draws is not None:
            sizes.add(num_draws)
        if len(sizes) != 1:
            raise SpecError(f"draws of different sizes {sorted(sizes)} cannot be stacked")
        self.num_draws = sizes.pop()
        self.base_nesting = base.max_plate_nesting
        event_dims = {name: site.event_dim for name, site in base.latent_sites.items()}
        self.conditioned = {
            name: _stack_shape(value, self.num_draws, self.base_nesting, event_dims.get(name, 0))
            for name, value in draws.items()
        }
        # The stacked program is a Pyro program in its own right, so that whatever runs
        # ``self.model`` (``ProgramModel.trace`` and every MAP-EM M-step) sees the draws.
        self.model = self._stacked(base.model)
        self.model_args = base.model_args
        self.model_kwargs = base.model_kwargs
        self.name = base.name
        self.params = base.params
        self.param_inits = base.param_inits
        self.module_params = base.module_params
        self.enumerated = [name for name in base.enumerated if name not in draws]
        self.observed = base.observed
        self.max_plate_nesting = base.max_plate_nesting + 1

    def _stacked(self, model: Callable[..., Any]) -> Callable[..., Any]:
        """``model`` with the draws conditioned on, inside the draws plate."""
        conditioned = poutine.condition(model, data=self.conditioned)
        dim = -self.base_nesting - 1
        size = self.num_draws

        def stacked(*args: Any, **kwargs: Any) -> Any:
            with pyro.plate(DRAWS_PLATE, size, dim=dim):
                return conditioned(*args, **kwargs)

        return stacked

    def runnable(self, values: Mapping[str, torch.Tensor]) -> Callable[..., Any]:
        """The stacked program with parameters ``values``."""
        return Inject(values)(self.model)


def _mask_factor(site: Any, like: torch.Tensor) -> torch.Tensor:
    """``scale × mask`` of a site, broadcast to its table."""
    scale = torch.as_tensor(site["scale"], dtype=like.dtype, device=like.device)
    factor = scale.expand(like.shape)
    mask = site["mask"]
    if mask is None or mask is True:
        return factor
    if mask is False:
        return torch.zeros_like(like)
    return torch.where(mask, factor, torch.zeros((), dtype=like.dtype, device=like.device))


def _one_hot(
    draws: torch.Tensor,
    support: torch.Tensor,
    enum_dim: int,
    table_dim: int,
    leading: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Indicators of the drawn values of one enumerated site, laid out like a table.

    Args:
        draws: ``(S, *batch)`` drawn values, ``batch`` one entry per plate dimension
            of the unstacked program.
        support: the enumerated values ``(K,)``.
        enum_dim: the site's enumeration dimension (negative).
        table_dim: number of dimensions of the table.
        leading: put ``S`` in a new leading dimension (an unstacked table) instead of
            at the draws plate's dimension, just left of ``batch`` (a stacked table).
        dtype: floating-point type of the indicators.

    Returns:
        ``(S, *table-like)`` if ``leading`` else table-like, with ``K`` at ``enum_dim``.
    """
    indicators = (draws.unsqueeze(-1) == support).to(dtype)
    num_draws, batch, size = draws.shape[0], draws.shape[1:], support.shape[0]
    gap = -enum_dim - 1 - len(batch)
    if leading:
        indicators = indicators.movedim(-1, 1)
        return indicators.reshape(
            num_draws, *(1,) * (table_dim + enum_dim), size, *(1,) * gap, *batch
        )
    indicators = indicators.movedim(-1, 0)
    return indicators.reshape(
        *(1,) * (table_dim + enum_dim), size, *(1,) * (gap - 1), num_draws, *batch
    )


def table_weights(
    program: ProgramModel,
    trace: poutine.Trace,
    draw_weights: torch.Tensor,
    discrete: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    r"""The weight of every entry of every site's table in :math:`\hat Q`.

    The weights mean what :attr:`~pyroem.estep.program.Posterior.weights` means
    for MAP-EM — (Monte Carlo) posterior marginal × scale × mask — so the MAP-EM
    M-steps consume them unchanged.

    Args:
        program: the program the trace came from: a :class:`StackedProgram` (tables
            have the draws plate), or the enumerated program itself.
        trace: its trace at the current parameters.
        draw_weights: ``(S,)`` weight of each draw, summing to 1.
        discrete: enumerated site → its draws ``(S, *value_shape)``, ``value_shape`` its
            shape in one run of the program (its plates' sizes).

    Returns:
        site → weights shaped like its ``unscaled_log_prob``.
    """
    stacked = isinstance(program, StackedProgram)
    nesting = (
        program.base_nesting if isinstance(program, StackedProgram) else program.max_plate_nesting
    )
    enum_dims = {}
    symbols = {}
    supports = {}
    padded = {}
    for name, value in discrete.items():
        site: Any = trace.nodes[name]
        enum_dims[name] = site["infer"]["_enumerate_dim"]
        symbols[name] = site["infer"]["_enumerate_symbol"]
        supports[name] = site["value"].reshape(-1)
        padded[name] = _stack_shape(value, value.shape[0], nesting, 0)
    plate_weights = draw_weights.reshape(-1, *(1,) * nesting)
    weights = {}
    for name, site in sample_sites(trace):
        table = site["unscaled_log_prob"]
        factor = _mask_factor(site, table)
        # The packed table names the enumerated sites it reads (pyro.markov reuses
        # enumeration dimensions, so the dimensions alone do not say).
        read = site["packed"]["unscaled_log_prob"]._pyro_dims
        depends = [other for other, symbol in symbols.items() if symbol in read]
        if depends:
            indicators = None
            for other in depends:
                one_hot = _one_hot(
                    padded[other],
                    supports[other],
                    enum_dims[other],
                    table.dim(),
                    not stacked,
                    table.dtype,
                )
                indicators = one_hot if indicators is None else indicators * one_hot
            assert indicators is not None
            if stacked:
                frequency = indicators * plate_weights.to(table.dtype)
            else:
                frequency = torch.tensordot(draw_weights.to(table.dtype), indicators, dims=1)
            factor = factor * frequency
        elif stacked:
            factor = factor * plate_weights.to(table.dtype)
        weights[name] = factor.expand(table.shape)
    return weights


def per_draw_log_joint(
    program: LatentProgram, values: Mapping[str, torch.Tensor], draws: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(x, z_s; θ)`` for every draw ``z_s`` of every latent.

    Args:
        program: the program.
        values: the parameters θ.
        draws: every latent site (continuous and enumerated) → ``(S, *shape)``.

    Returns:
        ``(log_joint, log_prior)``, both ``(S,)``: the log joint of each draw (log prior
        of the parameters included) and the parameters' log prior part of it.
    """
    stacked = StackedProgram(program, draws)
    trace = stacked.trace(values)
    nesting = stacked.base_nesting
    # Python zeros, not tensors of torch's default dtype: the sums keep the program's dtype.
    total: torch.Tensor | float = 0.0
    prior: torch.Tensor | float = 0.0
    for name, site in sample_sites(trace):
        log_prob = site["log_prob"]
        per_draw = log_prob.sum(tuple(range(-nesting, 0))) if nesting else log_prob
        total = total + per_draw
        if name in program.params:
            prior = prior + per_draw
    size = (stacked.num_draws,)
    dtype = total.dtype if isinstance(total, torch.Tensor) else program.dtype
    return (
        torch.as_tensor(total, dtype=dtype).detach().expand(size),
        torch.as_tensor(prior, dtype=dtype).detach().expand(size),
    )


def check_stackable(program: LatentProgram, values: Mapping[str, torch.Tensor]) -> None:
    """Run the program once with two prior draws of every latent stacked.

    Raises:
        NotSupportedError: the program does not broadcast over a leading dimension of
            its latent values; the message says what to change.
    """
    with pyro.get_param_store().scope(), poutine.block(), pyro.validation_enabled(False):
        prior = poutine.trace(Inject(values)(program.model)).get_trace(
            *program.model_args, **program.model_kwargs
        )
    nodes: Any = prior.nodes
    draws = {
        name: nodes[name]["value"].detach().expand(2, *nodes[name]["value"].shape)
        for name in [*program.latents, *program.enumerated]
    }
    try:
        per_draw_log_joint(program, values, draws)
    except (RuntimeError, IndexError, ValueError) as err:
        raise broadcast_error(
            program.name, "its latent draws stacked along an outer dimension", "mcmc-em", err
        ) from err
