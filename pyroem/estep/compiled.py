r"""The E-step of a fit, compiled once from the first trace and rerun cheaply.

Every EM iteration needs the program's log-probability tables at new parameter
values. :meth:`ProgramModel.trace` gets them by running the program under Pyro's
trace and enumeration handlers, then scores and packs every site; most of that
work only rediscovers what the first trace already established — which sites
exist, which dimension holds which enumerated latent, which latents each table
depends on. :class:`CompiledProgram` keeps that structure and reruns the program
under a single light handler (:class:`Recorder`) that sets the parameters, gives
every enumerated site the value the enumeration handler gave it, and records the
sites. It then checks the run against the first trace, site by site: same sites
in the same order, same distribution types and shapes, same plates, masks, scales
and ``pyro.markov`` scopes, same enumerated supports. A run that differs in any of
these — a program whose control flow depends on the parameters, say — is reported
(``None``), and the caller falls back to the full path. A run that matches has the
very tables a full trace would compute, because the program ran with the same
inputs; only their bookkeeping is reused.

The tables are then contracted as Pyro's ``TraceEnum_ELBO`` would (the log
evidence, with scales and masks; an enumerated site's own table never masked):
chain-structured models by :mod:`pyroem.estep.chain` on stacked tables,
anything else by Pyro's ``contract_to_tensor``. One backward pass gives every
table's weight in Q, as in :func:`pyroem.estep.program`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.util import site_is_subsample
from torch.distributions.utils import _sum_rightmost, probs_to_logits

from pyroem.estep.chain import (
    ChainPlan,
    Factor,
    build_chain_plan,
    log_evidence,
    mixture_log_evidence,
)
from pyroem.estep.log_einsum import LogRing
from pyroem.estep.program import (
    common_scale,
    mask_reads_latents,
    masked_log_prob,
    site_marginal,
    site_scale,
)
from pyroem.model.program import ProgramModel, sample_sites, set_param

__all__ = ["CompiledEStep", "CompiledProgram", "ProgramRunner", "Recorder", "table_of"]


def _enumerated_value(fn: Any, reference: torch.Tensor) -> torch.Tensor | None:
    """The value the enumeration handler would give this site: its support, laid out
    as in the first trace; ``None`` if the support differs from the first trace's."""
    if type(fn) is dist.Categorical:
        # The support is ``arange(num_events)``: the first trace's, if the size agrees.
        if fn._num_events != reference.numel():
            return None
        value = reference.view(reference.shape)
        value._pyro_categorical_support = id(fn)  # type: ignore[attr-defined]
        return value
    support = fn.enumerate_support(expand=False)
    if support.numel() != reference.numel() or not torch.equal(
        support.reshape(-1), reference.reshape(-1)
    ):
        return None
    value = support.reshape(reference.shape)
    categorical = getattr(support, "_pyro_categorical_support", None)
    if categorical is not None:
        # As Pyro's enumeration does: lets Categorical.log_prob read its table directly.
        value._pyro_categorical_support = categorical
    return value


class _PrefixDone(BaseException):
    """Stops a run once its first sites are recorded (a ``BaseException``, so that a
    program's own ``except Exception`` does not catch it)."""


class Recorder(Messenger):
    """Runs a program with parameter values set and enumerated sites at their
    enumerated values; records the sample sites and hides them from outer handlers.

    Args:
        values: parameter values by site (sample sites become observed, as
            :meth:`ProgramModel.trace` does; ``pyro.param`` sites return the value).
        enumerated: the enumerated value of every enumerated site in the first trace.
    """

    def __init__(
        self,
        values: Mapping[str, torch.Tensor],
        enumerated: Mapping[str, torch.Tensor],
        limit: int | None = None,
    ) -> None:
        super().__init__()
        self.values = values
        self.enumerated = enumerated
        self.limit = limit
        self.sites: list[Any] = []
        self.supports_match = True

    def _process_message(self, msg: Any) -> None:
        msg["stop"] = True
        if msg["type"] == "param":
            value = self.values.get(msg["name"])
            if value is not None:
                set_param(msg, value)
            return
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        name = msg["name"]
        value = self.values.get(name)
        if value is not None:
            msg["value"] = value
            msg["is_observed"] = True
        else:
            reference = self.enumerated.get(name)
            if reference is not None and not msg["is_observed"]:
                value = _enumerated_value(msg["fn"], reference)
                if value is None:
                    self.supports_match = False
                    value = reference
                msg["value"] = value
                msg["done"] = True
        self.sites.append(msg)
        if self.limit is not None and len(self.sites) >= self.limit:
            raise _PrefixDone

    def _postprocess_message(self, msg: Any) -> None:
        return None


def _mask_key(mask: Any) -> Any:
    if mask is None or isinstance(mask, bool):
        return mask
    return ("tensor", mask.shape)


def _signature(site: Any, enumerated: bool) -> tuple[Any, ...]:
    """What must agree between two runs for the first run's bookkeeping to hold."""
    fn = site["fn"]
    infer = site["infer"]
    return (
        site["name"],
        type(fn),
        fn.batch_shape,
        fn.event_shape,
        site["is_observed"],
        None if enumerated else site["value"].shape,
        site["cond_indep_stack"],
        _mask_key(site["mask"]),
        site_scale(site),
        infer.get("enumerate"),
        infer.get("_markov_scope"),
        infer.get("_markov_depth"),
    )


class ProgramRunner:
    """Reruns a program with the structure of one full trace (see the module docstring).

    Args:
        program: the program.
        trace: a full trace (:meth:`ProgramModel.trace`) at some parameter values.
    """

    def __init__(self, program: ProgramModel, trace: Any) -> None:
        self.program = program
        sites = sample_sites(trace)
        enumerated = set(program.enumerated)
        self.names = [name for name, _ in sites]
        self.signatures = [_signature(site, name in enumerated) for name, site in sites]
        self.enumerated = {name: site["value"] for name, site in sites if name in enumerated}
        # Called with the parameter values and sites of every complete run that matches.
        self.watch: Callable[[Mapping[str, torch.Tensor], dict[str, Any]], None] | None = None

    def run(
        self, values: Mapping[str, torch.Tensor], limit: int | None = None, validate: bool = False
    ) -> dict[str, Any] | None:
        """Run the program at ``values``; its sample sites by name (Pyro messages), or
        ``None`` if the run's structure differs from the first trace's.

        With ``limit`` the run stops once that many sample sites are recorded, and only
        those are checked and returned (a run that records fewer is ``None``). With
        ``validate`` Pyro validates the distributions' arguments as the program builds
        them (``ValueError`` for an invalid one), as :meth:`ProgramModel.trace` does."""
        recorder = Recorder(values, self.enumerated, limit)
        program = self.program
        depth = len(_PYRO_STACK)
        try:
            with pyro.validation_enabled(validate), recorder:
                program.model(*program.model_args, **program.model_kwargs)
        except _PrefixDone:
            # The handlers the program entered left the stack as the exception passed
            # (a markov loop's handler with its enclosing plate or with the recorder).
            del _PYRO_STACK[depth:]
        sites = recorder.sites
        expected = len(self.names) if limit is None else min(limit, len(self.names))
        if not recorder.supports_match or len(sites) != expected:
            return None
        enumerated = self.enumerated
        for site, signature in zip(sites, self.signatures[:expected], strict=True):
            if _signature(site, site["name"] in enumerated) != signature:
                return None
        named = {site["name"]: site for site in sites}
        if limit is None and self.watch is not None:
            self.watch(values, named)
        return named


# Tables smaller than this are computed as they are: reconstructing costs more.
_COMPACT_NUMEL = 1024

# Families whose log-density is elementwise in their parameters and the value, so it
# can be computed on the parameters without their broadcast (stride-0) copies.
_ELEMENTWISE = {
    dist.Normal: ("loc", "scale"),
    dist.Poisson: ("rate",),
    dist.Exponential: ("rate",),
}


def _table(site: Any) -> torch.Tensor:
    """``fn.log_prob(value)`` of one site, bit for bit, without recomputing broadcast
    copies of parameters: a plate broadcasts a distribution's parameters to the plate's
    size, and log-densities such as ``log(scale)`` would be taken once per data point."""
    fn, value = site["fn"], site["value"]
    if site["args"] or site["kwargs"]:
        return fn.log_prob(value, *site["args"], **site["kwargs"])
    reinterpreted = 0
    base = fn
    if type(base) is dist.Independent:
        reinterpreted = base.reinterpreted_batch_ndims
        base = base.base_dist
    # Some distributions (MaskedMixture) keep their batch shape as a tuple.
    if math.prod(base.batch_shape) < _COMPACT_NUMEL:
        return fn.log_prob(value)
    if type(base) is dist.Categorical and "logits" not in base.__dict__:
        # The lazy ``logits`` of the broadcast ``probs``: one log per distinct entry.
        base.__dict__["logits"] = probs_to_logits(compact_view(base.probs)).expand(base.probs.shape)
    attrs = _ELEMENTWISE.get(type(base))
    if attrs is None:
        return fn.log_prob(value)
    params = [compact_view(getattr(base, attr)) for attr in attrs]
    if type(base) is dist.Normal:
        table = _normal_log_density(value, *params)
    else:
        table = type(base)(*params, validate_args=False).log_prob(value)
    full = _broadcast_shape(base.batch_shape, value.shape)
    return _sum_event(table.expand(full), reinterpreted)


def table_of(site: Any) -> torch.Tensor:
    """A site's log-probability table, ``fn.log_prob(value)`` bit for bit (as the
    E-step computes it)."""
    return _table(site)


def _sum_event(table: torch.Tensor, reinterpreted: int) -> torch.Tensor:
    """``Independent``'s sum over the ``reinterpreted`` rightmost dimensions, bit for bit.

    Torch reduces a last dimension of 2 or 3 entries about fifteen times slower than
    it adds its slices (2.5 ms against 0.15 ms for a ``(3, 50000, 2)`` float64 table,
    one thread); for such sizes the slices are added left to right, which is the
    order of torch's own reduction there, so the floats are the same.
    """
    if reinterpreted == 1 and table.dim() and table.shape[-1] in (2, 3):
        slices = table.unbind(-1)
        total = slices[0] + slices[1]
        return total + slices[2] if len(slices) == 3 else total
    return _sum_rightmost(table, reinterpreted)


def _normal_log_density(
    value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``Normal(loc, scale).log_prob(value)``: the same operations in the same order
    (so the same floats), the full-size ones in place."""
    variance = scale**2
    table = value - loc
    table.pow_(2).neg_().div_(2 * variance)
    return table.sub_(scale.log()).sub_(math.log(math.sqrt(2 * math.pi)))


def _broadcast_shape(*shapes: torch.Size) -> tuple[int, ...]:
    """The broadcast of ``shapes`` (as :func:`torch.broadcast_shapes`, without its cost)."""
    ndim = max(len(shape) for shape in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                out[i] = size
    return tuple(out)


def _stacked_tables(sites: Mapping[str, Any], names: Sequence[str]) -> torch.Tensor:
    """The tables of sites of one structure, stacked along a new first dimension: for
    the usual families, one log-density call on their stacked parameters (entry for
    entry the same arithmetic as each site's own ``log_prob``)."""
    group = [sites[name] for name in names]
    stacked = _stacked_family_table(group) if len(group) > 1 else None
    if stacked is not None:
        return stacked
    tables = [_table(site) for site in group]
    return tables[0].unsqueeze(0) if len(tables) == 1 else torch.stack(tables)


def _uniform(tensors: Sequence[torch.Tensor]) -> bool:
    return all(tensor.shape == tensors[0].shape for tensor in tensors)


def _padded_stack(tensors: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    stacked = torch.stack(list(tensors))
    return stacked.reshape(len(tensors), *(1,) * (rank - stacked.dim()), *stacked.shape[1:])


def _stacked_family_table(group: Sequence[Any]) -> torch.Tensor | None:
    """:func:`_stacked_tables` for Normal (possibly ``Independent``) and enumerated
    Categorical sites; ``None`` for anything else."""
    fns = [site["fn"] for site in group]
    values = [site["value"] for site in group]
    if any(site["args"] or site["kwargs"] for site in group) or not _uniform(values):
        return None
    if any(type(fn) is not type(fns[0]) for fn in fns):
        return None
    reinterpreted = 0
    if type(fns[0]) is dist.Independent:
        reinterpreted = fns[0].reinterpreted_batch_ndims
        if any(fn.reinterpreted_batch_ndims != reinterpreted for fn in fns):
            return None
        fns = [fn.base_dist for fn in fns]
        if any(type(fn) is not type(fns[0]) for fn in fns):
            return None
    if type(fns[0]) is dist.Normal:
        locs, scales = [fn.loc for fn in fns], [fn.scale for fn in fns]
        if not (_uniform(locs) and _uniform(scales)):
            return None
        rank = 1 + max(locs[0].dim(), scales[0].dim(), values[0].dim())
        normal = dist.Normal(
            _padded_stack(locs, rank), _padded_stack(scales, rank), validate_args=False
        )
        return _sum_event(normal.log_prob(_padded_stack(values, rank)), reinterpreted)
    if type(fns[0]) is dist.Categorical and not reinterpreted:
        # Pyro's Categorical.log_prob on its enumerated support reads the logits table
        # directly (a transpose); stacked, the same transpose.
        value = values[0]
        fast = all(
            getattr(v, "_pyro_categorical_support", None) == id(fn)
            for v, fn in zip(values, fns, strict=True)
        )
        logits = [fn.logits for fn in fns]
        if not fast or not _uniform(logits):
            return None
        table = torch.stack(logits)
        if logits[0].dim() <= value.dim():
            ones = (1,) * (1 + value.dim() - logits[0].dim())
            table = table.reshape(len(logits), *ones, *logits[0].shape)
        return table.transpose(-1 - value.dim(), -1).squeeze(-1)
    return None


def compact_view(tensor: torch.Tensor) -> torch.Tensor:
    """A view of ``tensor`` without its broadcast copies: size 1 along every expanded
    (stride-0) dimension. It broadcasts back to ``tensor``."""
    if tensor.is_contiguous():
        return tensor  # no stride-0 dimension of size > 1
    for dim, (size, stride) in enumerate(zip(tensor.shape, tensor.stride(), strict=True)):
        if stride == 0 and size > 1:
            tensor = tensor.narrow(dim, 0, 1)
    return tensor


class CompiledEStep(NamedTuple):
    """The E-step at one set of parameter values, from a compiled run.

    Attributes:
        log_likelihood: :math:`\\log p(x | θ)`, 0-dim.
        log_joint: plus the log prior, 0-dim.
        sites: the run's sample sites by name (``fn``, ``value``, ``mask``, …).
        stacks: per group of stacked tables (keyed by its first site), the tables'
            weights in Q, stacked, ``(n, *table_shape)``; enumerated sites masked.
        marginal_weights: the same before masking enumerated sites (for marginals), by
            group key, or by site for tables that are not stacked.
        weights: per site outside the stacks, its weight in Q.
        group_of: per stacked site, ``(group key, position)``.
    """

    log_likelihood: torch.Tensor
    log_joint: torch.Tensor
    sites: Mapping[str, Any]
    stacks: dict[str, torch.Tensor]
    marginal_weights: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    group_of: dict[str, tuple[str, int]]

    def weight(self, name: str) -> torch.Tensor:
        """The weight table of one site."""
        if name in self.weights:
            return self.weights[name]
        key, position = self.group_of[name]
        return self.stacks[key][position]

    def all_weights(self) -> dict[str, torch.Tensor]:
        """Every site's weight table, as :attr:`Posterior.weights`."""
        return {name: self.weight(name) for name in self.sites}


class _Stack(NamedTuple):
    """Tables stacked together: their sites, mask handling and enumerated flag."""

    names: tuple[str, ...]
    mask: Any
    enumerated: bool


class CompiledProgram:
    """A program's structure read from one full trace, to rerun it cheaply.

    Args:
        program: the program.
        trace: a full trace (:meth:`ProgramModel.trace`) at some parameter values.
    """

    def __init__(self, program: ProgramModel, trace: Any) -> None:
        self.program = program
        self.runner = ProgramRunner(program, trace)
        sites = sample_sites(trace)
        enumerated = set(program.enumerated)
        self.enumerated = self.runner.enumerated
        self.enumerated_sites = {name: site for name, site in sites if name in enumerated}
        self.symbols = {
            site["infer"]["_enumerate_symbol"]
            for _, site in sites
            if site["infer"].get("_enumerate_symbol") is not None
        }
        self.priors = [name for name, _ in sites if name in program.params]
        # Masks that read enumerated latents are for the full E-step (posterior.py) only.
        self.supported = not any(
            mask_reads_latents(site, self.symbols)
            for name, site in sites
            if name not in program.params
        )
        self.free: list[str] = []
        factors: list[Factor] = []
        # Per factor: whether it is an enumerated site's own table, and its mask's kind.
        how: dict[str, tuple[bool, Any]] = {}
        self.dim_to_symbol: dict[str, dict[int, str]] = {}
        self.ordinals: dict[str, frozenset[str]] = {}
        scales = set()
        for name, site in sites:
            if name in program.params:
                continue
            table = site["unscaled_log_prob"]
            dims = site["packed"]["unscaled_log_prob"]._pyro_dims
            if self.symbols.isdisjoint(dims):
                self.free.append(name)
                continue
            scales.add(site_scale(site))
            self.dim_to_symbol[name] = site["infer"]["_dim_to_symbol"]
            plates = frozenset(
                trace.plate_to_symbol[frame.name]
                for frame in site["cond_indep_stack"]
                if frame.vectorized
            )
            self.ordinals[name] = plates
            symbols = tuple(
                None if size == 1 else self.dim_to_symbol[name][i - table.dim()]
                for i, size in enumerate(table.shape)
            )
            how[name] = (name in enumerated, _mask_key(site["mask"]))
            factors.append(Factor(name, table.shape, symbols, plates, how[name]))
        self.scale = common_scale(scales)
        latent_plates = {
            site["infer"]["_enumerate_symbol"]: self.ordinals[name]
            for name, site in sites
            if site["infer"].get("_enumerate_symbol") is not None and name in self.ordinals
        }
        frames = {
            (trace.plate_to_symbol[frame.name], frame.dim)
            for _, site in sites
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        }
        plate_order = [symbol for symbol, _ in sorted(frames, key=lambda item: item[1])]
        self.plan: ChainPlan | None = (
            build_chain_plan(factors, latent_plates, plate_order) if factors else None
        )
        self.stacks: list[_Stack] = []
        if self.plan is not None:
            keys = {factor.name: how[factor.name] for factor in factors}
            for group in self.plan.groups:
                enumerated_site, mask = keys[group.names[0]]
                self.stacks.append(_Stack(group.names, mask, enumerated_site))
        self.factor_names = [factor.name for factor in factors]
        self.in_stacks = frozenset(name for stack in self.stacks for name in stack.names)
        self.group_of = {
            name: (stack.names[0], position)
            for stack in self.stacks
            for position, name in enumerate(stack.names)
        }
        self.replication: Replication | None = None
        if _REPLICATED and self.plan is not None and self.supported:
            first = {name: trace.nodes[name]["value"] for name in program.params}
            replication = Replication(self, dict(sites), first)
            if not replication.failed:
                self.replication = replication
                self.runner.watch = replication.watch

    def estimate_trace(self, trace: Any) -> CompiledEStep:
        """The E-step from a full trace (:meth:`ProgramModel.trace`) of the same structure."""
        sites = dict(sample_sites(trace))
        return self.estimate(
            sites, {name: site["unscaled_log_prob"].detach() for name, site in sites.items()}
        )

    def marginals(self, estep: CompiledEStep) -> dict[str, torch.Tensor]:
        """Posterior marginals of the enumerated sites, as :attr:`Posterior.marginals`."""
        out = {}
        for name, site in self.enumerated_sites.items():
            if name in estep.group_of:
                key, position = estep.group_of[name]
                weight = estep.marginal_weights[key][position]
            else:
                weight = estep.marginal_weights[name]
            out[name] = site_marginal(self.program, site, weight)
        return out

    def _replicating(self) -> Replication | None:
        replication = self.replication
        return replication if replication is not None and replication.active else None

    @property
    def replicating(self) -> bool:
        """Whether runs are replicated (:meth:`run` returns a chain's prefix only)."""
        return self._replicating() is not None

    def run(self, values: Mapping[str, torch.Tensor]) -> Mapping[str, Any] | None:
        """See :meth:`ProgramRunner.run`; replicated chains run their prefix only."""
        replication = self._replicating()
        if replication is not None:
            return replication.run(values)
        return self.runner.run(values)

    def __call__(
        self, values: Mapping[str, torch.Tensor], validate: bool = False
    ) -> CompiledEStep | None:
        """The E-step at ``values``, or ``None`` if the program's structure changed
        (``validate``: see :meth:`ProgramRunner.run`; replicated runs are not validated,
        callers trace those in full)."""
        replication = self._replicating()
        if replication is not None:
            view = replication.run(values)
            if view is None:
                return None
            groups = replication.tables(view.prefix)
            return self.estimate(view.prefix, groups=groups, view=view)
        sites = self.runner.run(values, validate=validate)
        if sites is None:
            return None
        return self.estimate(sites)

    # ----- the E-step ---------------------------------------------------------------
    def estimate(
        self,
        sites: Mapping[str, Any],
        tables: Mapping[str, torch.Tensor] | None = None,
        groups: Mapping[str, torch.Tensor] | None = None,
        view: Mapping[str, Any] | None = None,
    ) -> CompiledEStep:
        """Contract the tables of one run and differentiate (see the module docstring).

        Args:
            sites: the run's sample sites.
            tables: their log-probability tables, if already computed (a full trace).
            groups: the stacked tables of every stack, if already computed (a
                replicated run: ``sites`` is then its prefix).
            view: the sites the E-step hands on, if not ``sites``.
        """
        in_stacks = self.in_stacks if tables is None else frozenset()
        if tables is None:
            with pyro.validation_enabled(False):
                tables = {
                    name: _table(site) for name, site in sites.items() if name not in in_stacks
                }
        prior_terms: list[torch.Tensor] = []
        likelihood_terms: list[torch.Tensor] = []
        weights = {}
        for names, terms in ((self.priors, prior_terms), (self.free, likelihood_terms)):
            for name in names:
                site = sites[name]
                scale = site_scale(site)
                terms.append(scale * masked_log_prob(site, tables[name]).sum())
                weights[name] = masked_log_prob(site, torch.full_like(tables[name], scale))
        stacks: dict[str, torch.Tensor] = {}
        marginal_weights: dict[str, torch.Tensor] = {}
        # Read-only, shared by every E-step of this structure.
        group_of: dict[str, tuple[str, int]] = self.group_of if self.plan is not None else {}
        if self.plan is not None:
            likelihood_terms.append(
                self._chain_estep(sites, tables, stacks, marginal_weights, group_of, groups)
            )
        elif self.factor_names:
            likelihood_terms.append(self._general_estep(sites, tables, weights, marginal_weights))
        like = (likelihood_terms or prior_terms)[0]
        log_likelihood = _total(likelihood_terms, like).detach()
        log_prior = _total(prior_terms, like).detach()
        return CompiledEStep(
            log_likelihood,
            log_likelihood + log_prior,
            dict(sites) if view is None else view,
            stacks,
            marginal_weights,
            weights,
            group_of,
        )

    def _stacked_masks(self, sites: Mapping[str, Any], stack: _Stack, ndim: int) -> Any:
        masks = [sites[name]["mask"] for name in stack.names]
        first = masks[0]
        if first is None or isinstance(first, bool):
            return first
        mask = torch.stack(masks)
        return mask.reshape(mask.shape[0], *(1,) * (ndim - mask.dim()), *mask.shape[1:])

    def _chain_estep(
        self,
        sites: Mapping[str, Any],
        log_probs: Mapping[str, torch.Tensor],
        stacks: dict[str, torch.Tensor],
        marginal_weights: dict[str, torch.Tensor],
        group_of: dict[str, tuple[str, int]],
        groups: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        assert self.plan is not None
        leaves = []
        stacked: dict[str, torch.Tensor] = {}
        masks = {}
        replication = self.replication if groups is not None else None
        # Mixtures (chains of one latent): the gradient written out, no autograd graph.
        tracked = not (_MIXTURE_WEIGHTS and self.plan.mixture)
        with torch.enable_grad():
            for position, stack in enumerate(self.stacks):
                if groups is not None and replication is not None:
                    replica = replication.replicas[position]
                    leaf = groups[replica.key].detach()
                    leaf.requires_grad_(tracked)
                    leaves.append(leaf)
                    masks[replica.key] = replica.mask
                    stacked[replica.key] = (
                        leaf if stack.enumerated else _apply_mask(leaf, replica.mask)
                    )
                    continue
                if stack.names[0] in log_probs:
                    tables = [log_probs[name].detach() for name in stack.names]
                    leaf = tables[0].unsqueeze(0) if len(tables) == 1 else torch.stack(tables)
                else:
                    with pyro.validation_enabled(False):
                        leaf = _stacked_tables(sites, stack.names).detach()
                leaf.requires_grad_(tracked)
                leaves.append(leaf)
                mask = self._stacked_masks(sites, stack, leaf.dim())
                masks[stack.names[0]] = mask
                stacked[stack.names[0]] = leaf if stack.enumerated else _apply_mask(leaf, mask)
            if tracked:
                value = self.scale * log_evidence(self.plan, stacked)
                grads = torch.autograd.grad(value, leaves)
            else:
                value, grads = self._mixture_weights(stacked, leaves, masks)
        for stack, grad in zip(self.stacks, grads, strict=True):
            key = stack.names[0]
            marginal_weights[key] = grad
            stacks[key] = _apply_mask(grad, masks[key]) if stack.enumerated else grad
        return value.detach()

    def _mixture_weights(
        self,
        stacked: Mapping[str, torch.Tensor],
        leaves: Sequence[torch.Tensor],
        masks: Mapping[str, Any],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """:meth:`_chain_estep`'s log evidence and gradients in ``leaves`` for a mixture
        plan, without autograd (:func:`~pyroem.estep.chain.mixture_log_evidence`)."""
        assert self.plan is not None
        found = mixture_log_evidence(self.plan, stacked)
        assert found is not None
        evidence, weights = found
        grads = []
        for stack, leaf in zip(self.stacks, leaves, strict=True):
            key = stack.names[0]
            grad = weights[key]
            if not stack.enumerated:
                # The masked table passes its gradient where the mask holds.
                grad = _apply_mask(grad, masks[key])
            if self.scale != 1.0:
                grad = grad * self.scale
            grads.append(grad.sum_to_size(leaf.shape).contiguous())
        return self.scale * evidence, tuple(grads)

    def _general_estep(
        self,
        sites: Mapping[str, Any],
        log_probs: Mapping[str, torch.Tensor],
        weights: dict[str, torch.Tensor],
        marginal_weights: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """Pyro's contraction of per-site tables, for structures without a chain plan."""
        enumerated = self.enumerated
        leaves = {}
        log_factors: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
        with torch.enable_grad():
            for name in self.factor_names:
                site = sites[name]
                leaf = log_probs[name].detach().requires_grad_()
                leaves[name] = leaf
                term = leaf if name in enumerated else masked_log_prob(site, leaf)
                term = packed.pack(term, self.dim_to_symbol[name])
                log_factors.setdefault(self.ordinals[name], []).append(term)
            contracted = contract_to_tensor(log_factors, set(self.symbols), ring=LogRing())
            value = self.scale * contracted.sum()
            grads = torch.autograd.grad(
                value, list(leaves.values()), allow_unused=True, materialize_grads=True
            )
        for name, grad in zip(leaves, grads, strict=True):
            if name in enumerated:
                marginal_weights[name] = grad
                grad = masked_log_prob(sites[name], grad)
            weights[name] = grad
        return value.detach()


def _total(terms: Sequence[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The sum of 0-dim ``terms`` (0 like ``like`` if there are none)."""
    total = torch.zeros((), dtype=like.dtype, device=like.device)
    for term in terms:
        total = total + term
    return total


def _apply_mask(table: torch.Tensor, mask: Any) -> torch.Tensor:
    if mask is None or mask is True:
        return table
    if mask is False:
        return torch.zeros_like(table)
    return torch.where(mask, table, torch.zeros((), dtype=table.dtype, device=table.device))


# Off, mixture plans take their E-step weights from autograd like any chain (the
# reference the written-out gradient is tested against).
_MIXTURE_WEIGHTS = True

# ----- replicated chains ----------------------------------------------------------------

# Off, every E-step after the first reruns the whole program (the reference the
# replicated path is tested against).
_REPLICATED = True

# Attribute values compared by equality when two distributions are compared.
_PLAIN = (int, float, bool, str, type(None), torch.Size, torch.dtype, torch.device)


def _same_distribution(first: Any, second: Any) -> bool:
    """Do two distribution objects compute the same log-density?

    Same type, and the same entries in their ``__dict__`` (tensors equal in shape and
    value, nested distributions the same by this rule, plain values equal, anything
    else the same object). Entries only one of them holds are lazily cached values
    (``Categorical.logits`` computed from ``probs``), derived from the shared ones.
    """
    if type(first) is not type(second):
        return False
    own, other = first.__dict__, second.__dict__
    for key in own.keys() & other.keys():
        a, b = own[key], other[key]
        if a is b:
            continue
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
                return False
            if not torch.equal(a.detach(), b.detach()):
                return False
        elif isinstance(a, torch.distributions.Distribution):
            if not _same_distribution(a, b):
                return False
        elif isinstance(a, _PLAIN) or (
            isinstance(a, tuple) and all(isinstance(item, _PLAIN) for item in a)
        ):
            if type(a) is not type(b) or a != b:
                return False
        else:
            return False
    return True


def _same_mask(first: Any, second: Any) -> bool:
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return first.shape == second.shape and torch.equal(first, second)
    return first is second or (
        not isinstance(first, torch.Tensor)
        and not isinstance(second, torch.Tensor)
        and first == second
    )


class _Replica(NamedTuple):
    """One stack of tables computed from its first site (the representative).

    Attributes:
        key: the stack's key, its first site.
        names: its sites.
        shape: the stacked tables' shape, ``(n, *table_shape)``.
        values: observed sites: their values stacked and padded so that the
            representative's ``log_prob`` broadcasts them to ``shape``; else ``None``
            (the sites share the representative's value, and so its table).
        mask: the sites' masks stacked as the E-step applies them.
    """

    key: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    values: torch.Tensor | None
    mask: Any


class Replication:
    r"""Chains whose steps repeat one another, run from their first steps.

    A ``pyro.markov`` loop of ``T`` steps writes ``T`` sites of each kind, and in a
    time-homogeneous chain the ``t``-th transition is ``Categorical(trans[z_{t-1}])``
    with the same table at every step, the ``t``-th emission ``Normal(locs[z_t], …)``
    the same distribution up to its observed value. Every stack of tables the chain
    contraction reads is then one distribution — that of the stack's first site —
    evaluated at the stack's values, and the program need only run as far as the
    last first site of a stack (the *prefix*: a few steps of the loop).

    What is verified:

    - on the first trace, every site of a stack has the distribution of the stack's
      first site (same type, parameters equal entry for entry, no extra ``log_prob``
      arguments), enumerated sites the same value, and the tables computed from the
      first sites equal the trace's own;
    - on the next complete run at other parameter values, no two parameters equal
      (the probe run of
      :func:`~pyroem.mstep.recognised.recognise`, or else the second E-step), the
      same for the distributions, and every observed value and mask equal to the
      first trace's. Until then every E-step runs the whole program; if it fails, all
      of them do, as without replication;
    - on every run of the prefix, the structure check of :class:`ProgramRunner`
      (sites, distribution types, shapes, plates, masks, scales, markov scopes) for
      the prefix's sites.

    The program is assumed to keep, at every parameter value, the repetition seen at
    those two: a program whose steps differ only at some parameter values (control
    flow on a parameter's value inside the loop, past the prefix) is outside this
    check; ``pyroem.estep.compiled._REPLICATED = False`` runs the whole program at
    every E-step.

    Args:
        compiled: the compiled program (with a chain plan).
        sites: the first trace's sample sites.
        first: the parameter values of the first trace.
    """

    def __init__(
        self, compiled: CompiledProgram, sites: Mapping[str, Any], first: Mapping[str, Any]
    ) -> None:
        self.compiled = compiled
        self.first_sites = sites
        self.first_values = {name: value.detach() for name, value in first.items()}
        names = compiled.runner.names
        self.representative: dict[str, str] = {}
        for stack in compiled.stacks:
            for name in stack.names[1:]:
                self.representative[name] = stack.names[0]
        last = max(i for i, name in enumerate(names) if name not in self.representative)
        self.prefix = last + 1
        self.verified = False
        self.failed = self.prefix >= len(names) or not self._replicated(sites)
        self.replicas: list[_Replica] = []
        self._keys = {stack.names[0] for stack in compiled.stacks}
        # Per tuple of sites (as the M-step stacks them), by identity: the tuple, its
        # stack's key (None if they are not one stack's sites), their observed values.
        self._owners: dict[int, tuple[tuple[str, ...], str | None, torch.Tensor | None]] = {}
        if not self.failed:
            self.replicas = [self._replica(stack) for stack in compiled.stacks]
            self.failed = not self._tables_agree()

    @property
    def active(self) -> bool:
        """Verified on a second run, so that E-steps run the prefix only."""
        return self.verified and not self.failed

    def _replicated(self, sites: Mapping[str, Any], observed: bool = False) -> bool:
        """Does every stacked site repeat its stack's first site in this run?
        ``observed``: also compare observed values and masks with the first trace's."""
        enumerated = self.compiled.enumerated
        for name, key in self.representative.items():
            site, first = sites[name], sites[key]
            if site["args"] or site["kwargs"] or first["args"] or first["kwargs"]:
                return False
            if not _same_distribution(site["fn"], first["fn"]):
                return False
            if name in enumerated:
                if not torch.equal(site["value"], first["value"]):
                    return False
            if observed:
                reference = self.first_sites[name]
                if not _same_mask(site["mask"], reference["mask"]):
                    return False
                if name not in enumerated and not torch.equal(site["value"], reference["value"]):
                    return False
        return True

    def _replica(self, stack: _Stack) -> _Replica:
        sites = self.first_sites
        first = sites[stack.names[0]]
        table = first["unscaled_log_prob"]
        shape = (len(stack.names), *table.shape)
        mask = self.compiled._stacked_masks(sites, stack, len(shape))
        values = None
        if not stack.enumerated and len(stack.names) > 1:
            stacked = torch.stack([sites[name]["value"] for name in stack.names])
            value_shape = stacked.shape[1:]
            batch_dims = len(value_shape) - first["fn"].event_dim
            pad = (1,) * max(table.dim() - batch_dims, 0)
            values = stacked.reshape(len(stack.names), *pad, *value_shape)
        return _Replica(stack.names[0], stack.names, shape, values, mask)

    def tables(self, sites: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Every stack's tables, ``(n, *table_shape)``, from its first site in ``sites``."""
        out = {}
        with pyro.validation_enabled(False):
            for replica in self.replicas:
                site = sites[replica.key]
                if replica.values is None:
                    out[replica.key] = _table(site).unsqueeze(0).expand(replica.shape)
                    continue
                table = site["fn"].log_prob(replica.values)
                if table.shape != replica.shape:
                    table = table.expand(replica.shape)
                out[replica.key] = table
        return out

    def _tables_agree(self) -> bool:
        """Are the tables computed from the first sites the first trace's own?"""
        try:
            tables = self.tables(self.first_sites)
        except (RuntimeError, ValueError, IndexError):
            return False
        for replica in self.replicas:
            expected = torch.stack(
                [self.first_sites[name]["unscaled_log_prob"] for name in replica.names]
            )
            actual = tables[replica.key]
            if actual.shape != expected.shape:
                return False
            # Rounding only (the same arithmetic entry for entry, in another layout).
            tol = max(1e-12, 16 * torch.finfo(actual.dtype).eps)
            scale = torch.maximum(actual.abs(), expected.abs()).clamp(min=1.0)
            near = (actual == expected) | ((actual - expected).abs() <= tol * scale)
            if not bool(near.all()):
                return False
        return True

    def watch(self, values: Mapping[str, torch.Tensor], sites: dict[str, Any]) -> None:
        """Check a complete run (see the class docstring), if at other parameter values."""
        if self.verified or self.failed:
            return
        moved = any(
            not torch.equal(values[name].detach(), first)
            for name, first in self.first_values.items()
            if name in values
        )
        if not moved:
            return
        # Any run can show that the steps differ; only a generic one that they repeat.
        if not self._replicated(sites, observed=True):
            self.failed = True
        elif self._generic(values):
            self.verified = True

    def _generic(self, values: Mapping[str, torch.Tensor]) -> bool:
        """Can a run at ``values`` tell the chain's steps apart? No two parameters are
        equal: steps that read different parameters (a survival probability per
        period) have equal distributions wherever those parameters are equal, so such
        a run verifies nothing."""
        if any(name not in values for name in self.first_values):
            return False
        current = [values[name].detach() for name in self.first_values]
        for i, value in enumerate(current):
            for other in current[:i]:
                if value.shape == other.shape and torch.equal(value, other):
                    return False
        return True

    def run(self, values: Mapping[str, torch.Tensor]) -> ReplicatedSites | None:
        """The prefix of a run at ``values``, standing for the whole run; ``None`` if its
        structure differs from the first trace's."""
        prefix = self.compiled.runner.run(values, limit=self.prefix)
        return None if prefix is None else ReplicatedSites(self, prefix)

    def stacked(
        self, names: tuple[str, ...], attr: str, prefix: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """A value or distribution attribute of ``names`` stacked, ``(n, *shape)``, when
        they are sites of one stack (else ``None``)."""
        # By the tuple's identity (hashing thousands of names costs more), the tuple
        # kept with the entry so that its identity stays its own.
        entry = self._owners.get(id(names))
        if entry is None or entry[0] is not names:
            key = self.representative.get(names[0], names[0])
            same = all(self.representative.get(name, name) == key for name in names)
            owner = key if same and key in self._keys else None
            values = None
            if owner is not None and owner not in self.compiled.enumerated:
                # Observed values: the first trace's (verified), stacked once.
                values = torch.stack([self.first_sites[name]["value"] for name in names])
            entry = (names, owner, values)
            self._owners[id(names)] = entry
        _, owner, values = entry
        if owner is None:
            return None
        key = owner
        if attr == "value" and values is not None:
            return values
        site = prefix[key]
        if attr == "value":
            tensor = site["value"]
        else:
            family = site["fn"]
            while isinstance(family, dist.Independent | dist.ExpandedDistribution):
                family = family.base_dist
            tensor = getattr(family, attr)
        return compact_view(tensor).unsqueeze(0).expand(len(names), *tensor.shape)


class ReplicatedSites(Mapping[str, Any]):
    """The sites of a run, from the run of its prefix (:class:`Replication`): a site
    past the prefix is its stack's first site with its own name, value and mask."""

    def __init__(self, replication: Replication, prefix: dict[str, Any]) -> None:
        self.replication = replication
        self.prefix = prefix

    def __getitem__(self, name: str) -> Any:
        site = self.prefix.get(name)
        if site is not None:
            return site
        replication = self.replication
        key = replication.representative[name]
        first = replication.first_sites[name]
        site = dict(self.prefix[key])
        site["name"] = name
        site["mask"] = first["mask"]
        if name not in replication.compiled.enumerated:
            site["value"] = first["value"]
        return site

    def __iter__(self) -> Iterator[str]:
        return iter(self.replication.compiled.runner.names)

    def __len__(self) -> int:
        return len(self.replication.compiled.runner.names)

    def stacked(self, names: tuple[str, ...], attr: str) -> torch.Tensor | None:
        """See :meth:`Replication.stacked`."""
        return self.replication.stacked(names, attr, self.prefix)
