r"""Closed-form M-steps recognised in a Pyro program.

The M-step is ECM: each parameter site is a block, maximised with the others held
at their current values. A block gets a closed form when its prior and every
likelihood term it appears in form a conjugate pair; pyroem recognises the pair
by **probing** the program, once, before EM starts:

1. run the program twice with the site set to two designed values ``P1``, ``P2``
   (everything else fixed);
2. every site whose log-probability table changed is a *use* of the parameter;
3. a use is recognised when its distribution family is one pyroem knows and the
   parameter enters it in a known way — ``probs = θ[i]``, ``loc = θ[i] + d``,
   ``rate = c·θ[i]``, ``scale² = c·θ[i]``, ``scale^{-2} = c·θ[i]``,
   ``covariance = c·θ[i]`` — where the index map ``i`` and the offsets ``d``/``c``
   do not depend on θ. The designed probes make ``i`` readable from the two runs
   and check the form exactly.

Anything else (a non-conjugate prior, a parameter inside a nonlinear function, a
family pyroem does not know) falls back to the gradient M-step. The recognised
updates are modes of the conditional posterior in the parameterisation the
program declares (no Jacobian), so they equal the gradient M-step's optimum on the
same Q — a test holds them to that.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyroem.estep.compiled import ProgramRunner, Replication, compact_view
from pyroem.model.distributions import InverseWishart
from pyroem.model.program import ProgramModel, sample_sites
from pyroem.mstep import conjugate

__all__ = [
    "ADJUSTABLE_PRIORS",
    "LOCATION_SLOTS",
    "SCALE_SLOTS",
    "ClosedForm",
    "Use",
    "closed_form_update",
    "effective_prior",
    "prior_weight",
    "recognise",
    "summed_over_shards",
]

Tensor = torch.Tensor

# Relative tolerance of the structural checks on the probes (float64 rounding only).
_PROBE_RTOL = 1e-9
_PROBE_RTOL_FLOAT32 = 1e-4

# Likelihood slot -> (accepted prior types, kind reported to the user).
_PRIORS: dict[str, tuple[tuple[type, ...], str]] = {
    "categorical": ((dist.Dirichlet,), "categorical"),
    "bernoulli": ((dist.Beta,), "bernoulli"),
    "binomial": ((dist.Beta,), "binomial"),
    "poisson": ((dist.Gamma,), "poisson"),
    "exponential": ((dist.Gamma,), "exponential"),
    "normal-loc": ((dist.Normal,), "normal-mean"),
    "normal-variance": ((dist.InverseGamma,), "normal-variance"),
    "normal-precision": ((dist.Gamma,), "normal-precision"),
    "mvn-loc": ((dist.MultivariateNormal, dist.Normal), "mvn-mean"),
    "mvn-covariance": ((InverseWishart,), "mvn-covariance"),
}
_PRIOR_NAMES = {
    dist.Dirichlet: "dirichlet",
    dist.Beta: "beta",
    dist.Gamma: "gamma",
    dist.InverseGamma: "inverse-gamma",
    dist.Normal: "normal",
    dist.MultivariateNormal: "normal",
    InverseWishart: "inverse-wishart",
}


class Use(NamedTuple):
    """One place a parameter enters the program.

    Attributes:
        site: the site whose distribution holds the parameter.
        slot: how it enters (``"categorical"``, ``"normal-loc"``, …).
        rows: for every entry of the distribution's parameter tensor, the row of
            the parameter it reads (shape of that tensor without its event part).
        event_ndims: dimensions reinterpreted by ``Independent`` around the family.
    """

    site: str
    slot: str
    rows: torch.Tensor
    event_ndims: int


class ClosedForm(NamedTuple):
    """A recognised closed-form block: parameter ``name`` updated by ``kind``.

    ``jacobian``: the block maximises the density of the unconstrained coordinates
    (:mod:`pyroem.model.space`), whose log-Jacobian shifts the prior's exponents.
    """

    name: str
    kind: str
    slot: str
    uses: tuple[Use, ...]
    jacobian: bool = False


def unwrap_distribution(fn: Any) -> tuple[Any, int]:
    """Strip ``Independent`` and ``expand`` wrappers; count reinterpreted dims."""
    event_ndims = 0
    while True:
        if isinstance(fn, dist.Independent):
            event_ndims += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, dist.ExpandedDistribution):
            fn = fn.base_dist
        else:
            return fn, event_ndims


def _constraint_kind(constraint: constraints.Constraint) -> str | None:
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    if constraint is constraints.real:
        return "real"
    if isinstance(constraint, constraints.greater_than | constraints.greater_than_eq):
        return "positive" if float(constraint.lower_bound) == 0 else None
    if isinstance(constraint, constraints.interval):
        unit = float(constraint.lower_bound) == 0 and float(constraint.upper_bound) == 1
        return "unit" if unit else None
    if isinstance(constraint, type(constraints.simplex)):
        return "simplex"
    if isinstance(constraint, type(constraints.positive_definite)):
        return "positive-definite"
    return None


def _probes(
    value: torch.Tensor, kind: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three values in the support: two designed ones whose difference reveals each
    entry's row, and a random one that checks the form read off the first two."""
    numel = value.numel()
    ramp = torch.arange(1, numel + 1, dtype=value.dtype, device=value.device).reshape(value.shape)
    noise = torch.randn(value.shape, generator=generator, dtype=value.dtype).to(value.device)
    if kind == "real":
        return value, value + ramp / numel, value + noise
    if kind == "positive":
        return value, value * (1 + ramp / numel), value * (0.5 * noise).exp()
    if kind == "unit":
        first = 0.2 + 0.6 * (ramp - 0.5) / numel
        return first, first.square(), torch.sigmoid(noise)
    if kind == "simplex":
        # Normalised ramps: rows differ (a softmax of ramps would not: it is shift-invariant).
        first = ramp / ramp.sum(-1, keepdim=True)
        return first, first.flip(-1), torch.softmax(noise, -1)
    rows = value.reshape(-1, *value.shape[-2:])
    gain = (
        1
        + torch.arange(1, rows.shape[0] + 1, dtype=value.dtype, device=value.device) / rows.shape[0]
    )
    random_gain = (0.5 * noise.reshape(rows.shape[0], -1)[:, 0]).exp()
    return (
        value,
        (rows * gain[:, None, None]).reshape(value.shape),
        (rows * random_gain[:, None, None]).reshape(value.shape),
    )


def _broadcast_shape(*shapes: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """The broadcast of ``shapes`` (as :func:`torch.broadcast_shapes`)."""
    ndim = max(len(shape) for shape in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[i] not in (1, size):
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = size
    return tuple(out)


def _compact_pair(
    first: torch.Tensor, second: torch.Tensor, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of two tensors of one shape without the dimensions (all but the last
    ``keep``) along which both are broadcast copies."""
    if first.shape != second.shape:
        return first, second
    for dim in range(first.dim() - keep):
        if first.shape[dim] > 1 and first.stride(dim) == 0 and second.stride(dim) == 0:
            first, second = first.narrow(dim, 0, 1), second.narrow(dim, 0, 1)
    return first, second


def _close_to(
    actual: torch.Tensor,
    actual_shape: torch.Size,
    expected: torch.Tensor,
    expected_shape: tuple[int, ...],
) -> bool:
    """:func:`_close` on two tensors of the given shapes, from views (possibly compacted)
    that broadcast to them."""
    try:
        if tuple(actual_shape) != _broadcast_shape(actual_shape, expected_shape):
            return False
        return _close(*torch.broadcast_tensors(actual, expected))
    except (ValueError, RuntimeError):
        return False


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    rtol = _PROBE_RTOL if a.dtype == torch.float64 else _PROBE_RTOL_FLOAT32
    scale = 1 + torch.maximum(a.abs(), b.abs())
    return a.shape == _broadcast_shape(a.shape, b.shape) and bool(
        ((a - b).abs() <= rtol * scale).all()
    )


def _element_index(
    first: torch.Tensor, second: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor], kind: str
) -> torch.Tensor | None:
    """Flat parameter index read by each entry, if the entry is ``θ[i]`` up to the
    form ``kind`` allows (shift for real, ratio for positive, identity for unit)."""
    shape = first.shape
    first, second = _compact_pair(first, second, 0)
    p1, p2 = (p.reshape(-1) for p in probe)
    numel = p1.numel()
    if kind == "real":
        signal = second - first
    elif kind == "positive":
        signal = second / first - 1
    else:
        signal = (first - 0.2) / 0.6
    index = torch.round(signal * numel - (0.5 if kind == "unit" else 1)).long()
    if bool(((index < 0) | (index >= numel)).any()):
        return None
    if kind == "real":
        ok = _close(second - first, (p2 - p1)[index])
    elif kind == "positive":
        ok = _close(second / first, (p2 / p1)[index])
    else:
        ok = _close(first, p1[index]) and _close(second, p2[index])
    return index.expand(shape) if ok else None


def _row_index(
    first: torch.Tensor,
    second: torch.Tensor,
    probe: tuple[torch.Tensor, torch.Tensor],
    width: int,
    shift: bool,
) -> torch.Tensor | None:
    """Row of the parameter read by each row (last dim ``width``) of a tensor: the
    tensor is ``θ[i] + d`` (``shift``) or exactly ``θ[i]``."""
    if first.shape[-1] != width:
        return None
    shape = first.shape[:-1]
    first, second = _compact_pair(first, second, 1)
    rows1, rows2 = (p.reshape(-1, width) for p in probe)
    flat1, flat2 = first.reshape(-1, width), second.reshape(-1, width)
    signal, design = (flat2 - flat1, rows2 - rows1) if shift else (flat1, rows1)
    index = (signal[:, None, :] - design[None, :, :]).abs().amax(-1).argmin(-1)
    if shift:
        ok = _close(flat2 - flat1, (rows2 - rows1)[index])
    else:
        ok = _close(flat1, rows1[index]) and _close(flat2, rows2[index])
    return index.reshape(first.shape[:-1]).expand(shape) if ok else None


def _matrix_index(
    first: torch.Tensor, second: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor | None:
    """Matrix of the parameter read by each matrix, if it is ``c·θ[i]``."""
    rows1, rows2 = (p.reshape(-1, *p.shape[-2:]) for p in probe)
    if first.shape[-2:] != rows1.shape[-2:]:
        return None
    shape = first.shape[:-2]
    first, second = _compact_pair(first, second, 2)
    dim = first.shape[-1]
    ratio = torch.diagonal(second, dim1=-2, dim2=-1) / torch.diagonal(first, dim1=-2, dim2=-1)
    gains = rows2[:, 0, 0] / rows1[:, 0, 0]
    index = (ratio[..., :1] - gains).abs().argmin(-1)
    scale = torch.diagonal(first, dim1=-2, dim2=-1)[..., 0] / rows1[index][..., 0, 0]
    ok = _close(second, gains[index][..., None, None] * first) and _close(
        first, scale[..., None, None] * rows1[index]
    )
    return index.expand(shape) if ok and dim == rows1.shape[-1] else None


# Per known family (after ``unwrap_distribution``), the attributes its log-density reads besides
# the value. Their changes between probe runs say how a parameter enters the site.
_FAMILY_ATTRS: tuple[tuple[type, tuple[str, ...]], ...] = (
    (dist.Categorical, ("probs",)),
    (dist.Binomial, ("probs", "total_count")),
    (dist.Bernoulli, ("probs",)),
    (dist.Poisson, ("rate",)),
    (dist.Exponential, ("rate",)),
    (dist.Normal, ("loc", "scale")),
    (dist.MultivariateNormal, ("loc", "scale_tril")),
)


def _family_attrs(fn: Any) -> tuple[str, ...] | None:
    for family, attrs in _FAMILY_ATTRS:
        if isinstance(fn, family):
            return attrs
    return None


class _Attrs(NamedTuple):
    """A distribution as recognition reads it: its family and attribute tensors (for
    several sites at once, stacked along a new first dimension)."""

    family: type
    tensors: dict[str, torch.Tensor]

    def __getattr__(self, attr: str) -> torch.Tensor:
        try:
            return self.tensors[attr]
        except KeyError:
            raise AttributeError(attr) from None


def _attrs_of(fn: Any) -> _Attrs | None:
    """The attributes of a known family (and a covariance for the multivariate normal)."""
    attrs = _family_attrs(fn)
    if attrs is None:
        return None
    tensors = {attr: getattr(fn, attr) for attr in attrs}
    if isinstance(fn, dist.MultivariateNormal):
        tensors["covariance_matrix"] = fn.covariance_matrix
    return _Attrs(type(fn), tensors)


def _recognise_use(
    before: Any, after: Any, probe: tuple[torch.Tensor, torch.Tensor], kind: str
) -> Use | None:
    """Match one changed site against the known (family, parameter) forms."""
    fn1, event_ndims = unwrap_distribution(before["fn"])
    fn2, _ = unwrap_distribution(after["fn"])
    first, second = _attrs_of(fn1), _attrs_of(fn2)
    if type(fn1) is not type(fn2) or first is None or second is None:
        return None
    attrs = _family_attrs(fn1) or ()
    moved = frozenset(a for a in attrs if not torch.equal(getattr(fn1, a), getattr(fn2, a)))
    return _recognise_moved(before["name"], first, second, probe, kind, moved, event_ndims)


def _recognise_moved(
    site: str,
    fn1: _Attrs,
    fn2: _Attrs,
    probe: tuple[torch.Tensor, torch.Tensor],
    kind: str,
    moved: frozenset[str],
    event_ndims: int,
) -> Use | None:
    """Match a site's distributions at the two designed probes against the known
    (family, parameter) forms; ``moved`` are the attributes the parameter changes."""
    index: torch.Tensor | None
    family = fn1.family
    if issubclass(family, dist.Categorical):
        if kind != "simplex" or moved != {"probs"}:
            return None
        index = _row_index(fn1.probs, fn2.probs, probe, probe[0].shape[-1], shift=False)
        return None if index is None else Use(site, "categorical", index, event_ndims)
    if issubclass(family, dist.Bernoulli | dist.Binomial):
        if kind != "unit" or moved != {"probs"}:
            return None
        slot = "binomial" if issubclass(family, dist.Binomial) else "bernoulli"
        index = _element_index(fn1.probs, fn2.probs, probe, kind)
        return None if index is None else Use(site, slot, index, event_ndims)
    if issubclass(family, dist.Poisson | dist.Exponential):
        if kind != "positive" or moved != {"rate"}:
            return None
        index = _element_index(fn1.rate, fn2.rate, probe, kind)
        slot = "poisson" if issubclass(family, dist.Poisson) else "exponential"
        return None if index is None else Use(site, slot, index, event_ndims)
    if issubclass(family, dist.Normal):
        if kind == "real" and moved == {"loc"}:
            index = _element_index(fn1.loc, fn2.loc, probe, kind)
            return None if index is None else Use(site, "normal-loc", index, event_ndims)
        if kind == "positive" and moved == {"scale"}:
            variance = _element_index(fn1.scale.square(), fn2.scale.square(), probe, kind)
            if variance is not None:
                return Use(site, "normal-variance", variance, event_ndims)
            precision = _element_index(fn1.scale**-2, fn2.scale**-2, probe, kind)
            if precision is not None:
                return Use(site, "normal-precision", precision, event_ndims)
        return None
    if issubclass(family, dist.MultivariateNormal):
        if kind == "real" and moved == {"loc"}:
            index = _row_index(fn1.loc, fn2.loc, probe, fn1.loc.shape[-1], shift=True)
            return None if index is None else Use(site, "mvn-loc", index, event_ndims)
        if kind == "positive-definite" and moved == {"scale_tril"}:
            index = _matrix_index(fn1.covariance_matrix, fn2.covariance_matrix, probe)
            return None if index is None else Use(site, "mvn-covariance", index, event_ndims)
    return None


def _holds(
    use: Use,
    fn1: _Attrs,
    fn3: _Attrs,
    probe1: torch.Tensor,
    probe3: torch.Tensor,
    others: bool = True,
) -> bool:
    """Does the form read off the designed probes also hold at the random probe?

    With ``others`` the site's other attributes (a location use's scale, …) must not
    have moved either; without, other parameters probed at the same time move them.
    """
    if fn1.family is not fn3.family:
        return False
    rows, slot, shape = compact_view(use.rows), use.slot, tuple(use.rows.shape)
    flat1, flat3 = probe1.reshape(-1), probe3.reshape(-1)

    def same(attr: str) -> bool:
        first, third = getattr(fn1, attr), getattr(fn3, attr)
        return _close_to(compact_view(third), third.shape, compact_view(first), first.shape)

    def moved(attr: str, expected: torch.Tensor, expected_shape: tuple[int, ...]) -> bool:
        """``fn3.attr − fn1.attr`` (or the ratio for rates and scales) is ``expected``."""
        first, third = compact_view(getattr(fn1, attr)), compact_view(getattr(fn3, attr))
        if attr == "loc":
            change = third - first
        elif attr == "scale":
            change = third.square() / first.square()
            change = 1 / change if slot == "normal-precision" else change
        else:
            change = third / first
        return _close_to(change, getattr(fn3, attr).shape, expected, expected_shape)

    if slot == "categorical":
        width = probe3.shape[-1]
        expected = probe3.reshape(-1, width)[rows]
        return _close_to(compact_view(fn3.probs), fn3.probs.shape, expected, (*shape, width))
    if slot in ("bernoulli", "binomial"):
        return _close_to(compact_view(fn3.probs), fn3.probs.shape, flat3[rows], shape)
    if slot in ("poisson", "exponential"):
        return moved("rate", (flat3 / flat1)[rows], shape)
    if slot == "normal-loc":
        return moved("loc", (flat3 - flat1)[rows], shape) and (not others or same("scale"))
    if slot in ("normal-variance", "normal-precision"):
        return moved("scale", (flat3 / flat1)[rows], shape) and (not others or same("loc"))
    width = probe1.shape[-1]
    if slot == "mvn-loc":
        shift = (probe3 - probe1).reshape(-1, width)[rows]
        fixed = not others or same("scale_tril")
        return moved("loc", shift, (*shape, width)) and fixed
    mats1, mats3 = (p.reshape(-1, width, width) for p in (probe1, probe3))
    gains = (mats3[:, 0, 0] / mats1[:, 0, 0])[use.rows][..., None, None]
    fixed = not others or same("loc")
    return _close(fn3.covariance_matrix, gains * fn1.covariance_matrix) and fixed


def _recognise_prior(program: ProgramModel, name: str, slot: str, site: Any) -> str | None:
    """The kind of closed form for ``name`` given its prior, or ``None``."""
    accepted, likelihood = _PRIORS[slot]
    if program.params[name].kind == "param":
        return f"flat-{likelihood}"
    prior, _ = unwrap_distribution(site["fn"])
    if not isinstance(prior, accepted):
        return None
    if prior_weight(site) is not None and not isinstance(prior, ADJUSTABLE_PRIORS):
        # A scaled or masked prior whose closed form here does not take the weight.
        return None
    if slot == "mvn-loc" and isinstance(prior, dist.Normal) and site["fn"].event_dim != 1:
        return None
    return f"{_PRIOR_NAMES[type(prior)]}-{likelihood}"


def recognise(
    program: ProgramModel,
    values: Mapping[str, torch.Tensor],
    trace: Any = None,
    runner: ProgramRunner | None = None,
    replication: Replication | None = None,
) -> dict[str, ClosedForm | None]:
    """Find the closed-form block of every parameter site, by probing.

    The probe runs are light reruns of the program (:class:`ProgramRunner`), and
    parameters whose probes cannot disturb each other share them: the first run moves
    every parameter at once with gradient-tracking values, and its autograd graph says
    which parameters reach which sites (:func:`_probe_groups`). A group whose joint runs
    do not cleanly separate falls back to probing each parameter alone with full traces.

    With ``replication`` (chains whose steps repeat their first steps, as verified on
    the first trace), the first probe run, a complete one, checks the repetition at
    other parameter values (:meth:`Replication.watch`); once it holds, every other
    probe runs the chains' first steps only, the probes read those steps' sites, and
    each later step of a stack gets its first site's use under its own name (the
    replicated E-step computes that step's table from the same distribution).

    Args:
        program: the program.
        values: valid parameter values to probe around (the starting point).
        trace: the program's trace at ``values``, if already run.
        runner: a :class:`ProgramRunner` of that trace, if already built.
        replication: the first trace's replicated chains, if any (with ``runner``).

    Returns:
        ``{site: ClosedForm or None}``; ``None`` means the gradient M-step.
    """
    base_trace = program.trace(values) if trace is None else trace
    generator = torch.Generator().manual_seed(0)
    candidates: dict[str, _Probe] = {}
    for name, param in program.params.items():
        kind = _constraint_kind(param.constraint)
        value = values[name].detach()
        if kind is None or value.dtype not in (torch.float32, torch.float64):
            continue
        probes = _probes(value, kind, generator)
        reuse = kind in _REUSE or (kind == "simplex" and _distinct_rows(value))
        if reuse:
            probes = (value, *probes[1:])
        candidates[name] = _Probe(kind, probes, reuse)
    found: dict[str, ClosedForm | None] = dict.fromkeys(program.params)
    if not candidates:
        return found
    runner = ProgramRunner(program, base_trace) if runner is None else runner
    names = list(candidates)
    second = {**values, **{name: candidates[name].values[1] for name in names}}
    # A complete run: it also checks the replication, if any (Replication.watch).
    tracked_run = _tracked_run(runner, second, list(program.params))
    prefix = None
    if replication is not None and replication.active:
        prefix = replication.prefix
    reach = None if tracked_run is None else _reachability(tracked_run, prefix)
    for group in _probe_groups(names, reach):
        shared = tracked_run if group == names else None
        result = _recognise_jointly(
            program, values, base_trace, runner, group, candidates, reach, shared, prefix
        )
        if result is not None and prefix is not None and replication is not None:
            result = _replicated_uses(result, runner.names, replication.representative)
        if result is None:
            result = {
                name: _recognise_alone(program, values, base_trace, name, candidates[name])
                for name in group
            }
        found.update(result)
    return found


def _replicated_uses(
    found: dict[str, ClosedForm | None],
    names: list[str],
    representative: Mapping[str, str],
) -> dict[str, ClosedForm | None]:
    """Blocks found on a prefix, with every later step of a stack using its parameter
    as the stack's first site does (in the order of the program's sites)."""
    out: dict[str, ClosedForm | None] = {}
    for name, block in found.items():
        if block is None:
            out[name] = None
            continue
        own = {use.site: use for use in block.uses}
        uses = []
        for site in names:
            use = own.get(site)
            if use is None:
                key = representative.get(site)
                first = None if key is None else own.get(key)
                if first is None:
                    continue
                use = Use(site, first.slot, first.rows, first.event_ndims)
            uses.append(use)
        out[name] = block._replace(uses=tuple(uses))
    return out


def _tracked_run(
    runner: ProgramRunner, values: Mapping[str, torch.Tensor], names: list[str]
) -> _TrackedRun | None:
    """A light run with gradient-tracking copies of ``values``; ``None`` if the program
    cannot run so (one that calls ``.numpy()`` on a parameter, say)."""
    leaves = _tracked(values)
    try:
        with warnings.catch_warnings():
            # A program may read a parameter as a number; that is not an error here.
            warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
            sites = runner.run(leaves)
    except (ValueError, RuntimeError):
        return None
    if sites is None:
        return None
    ids = {id(leaves[name]): name for name in names if leaves[name].requires_grad}
    return _TrackedRun(sites, ids)


class _TrackedRun(NamedTuple):
    """A light run's sites and, by ``id``, the gradient-tracking parameter values."""

    sites: dict[str, Any]
    leaves: dict[int, str]


class _Probe(NamedTuple):
    """How one parameter is probed: its constraint kind, the three probe values, and
    whether the first is its current value (so the base trace serves as that run)."""

    kind: str
    values: tuple[torch.Tensor, ...]
    reuse: bool


# Constraint kinds whose first designed probe is the value itself.
_REUSE = ("real", "positive", "positive-definite")


def _distinct_rows(value: torch.Tensor) -> bool:
    """Are the rows of a simplex value far enough apart to tell which one a site reads?
    Then the value itself can be the first probe."""
    rows = value.reshape(-1, value.shape[-1])
    if rows.shape[0] == 1:
        return True
    gaps = (rows[:, None, :] - rows[None, :, :]).abs().amax(-1)
    gaps = gaps + torch.eye(rows.shape[0], dtype=gaps.dtype, device=gaps.device) * 2
    return bool(gaps.min() > 1e-6)


def _tracked(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of floating-point parameter values that track gradients, so that a run
    with them records which parameters reach which sites."""
    return {
        name: value.detach().clone().requires_grad_() if value.is_floating_point() else value
        for name, value in values.items()
    }


# Reach of a tensor: the parameters its autograd graph reads.
_Reach = frozenset[str]


def _node_reach(root: Any, leaves: Mapping[int, str], memo: dict[Any, _Reach]) -> _Reach:
    """Parameters (autograd leaves) under one autograd node; iterative, memoised."""
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in memo:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in memo)
            continue
        own = leaves.get(id(getattr(node, "variable", None)))
        reach = {own} if own is not None else set()
        for child in children:
            reach |= memo[child]
        memo[node] = frozenset(reach)
    return memo[root]


def _reach(tensor: Any, leaves: Mapping[int, str], memo: dict[Any, _Reach]) -> _Reach:
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return frozenset()
    if tensor.grad_fn is None:
        name = leaves.get(id(tensor))
        return frozenset() if name is None else frozenset([name])
    return _node_reach(tensor.grad_fn, leaves, memo)


class _Reachability(NamedTuple):
    """Which parameters each site's table, and each attribute of a known family, reads."""

    sites: dict[str, _Reach]
    attrs: dict[str, dict[str, _Reach]]


def _reachability(run: _TrackedRun, prefix: int | None = None) -> _Reachability:
    """Read the autograd graph of a :func:`_tracked_run`: for each site (the first
    ``prefix`` only, if given), which parameters its table reads (tables computed here
    only for families without named attributes), and for each attribute of a known
    family, which parameters it reads."""
    memo: dict[Any, _Reach] = {}
    sites, attrs = {}, {}
    items = list(run.sites.items())
    with pyro.validation_enabled(False):
        for name, site in items if prefix is None else items[:prefix]:
            family = unwrap_distribution(site["fn"])[0]
            known = _family_attrs(family)
            if known is None:
                table = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
                sites[name] = _reach(table, run.leaves, memo)
                continue
            reached = {attr: _reach(getattr(family, attr), run.leaves, memo) for attr in known}
            reached["value"] = _reach(site["value"], run.leaves, memo)
            attrs[name] = reached
            sites[name] = frozenset().union(*reached.values())
    return _Reachability(sites, attrs)


def _probe_groups(names: list[str], reach: _Reachability | None) -> list[list[str]]:
    """Split parameters into groups probed in the same runs.

    Two parameters conflict when both reach the same attribute of a known family
    (``loc``, ``scale``, ``probs``, …, or the value), or the same site of any other
    family: a change there could not be told apart. Groups are formed greedily, in
    parameter order, without conflicts. Without reachability, every parameter is alone.
    """
    if reach is None:
        return [[name] for name in names]
    conflicts: dict[str, set[str]] = {name: set() for name in names}
    sets = [
        *(reached for attrs in reach.attrs.values() for reached in attrs.values()),
        *(reach.sites[name] for name in reach.sites if name not in reach.attrs),
    ]
    for reached in sets:
        members = [name for name in names if name in reached]
        for name in members:
            conflicts[name].update(members)
    groups: list[list[str]] = []
    for name in names:
        for group in groups:
            if not conflicts[name].intersection(group):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


class _Candidate(NamedTuple):
    """A site a probed parameter moves: its attributes in the three runs, compacted."""

    site: str
    runs: tuple[_Attrs, _Attrs, _Attrs]
    shapes: dict[str, torch.Size]
    moved: frozenset[str]
    event_ndims: int


def _recognise_jointly(
    program: ProgramModel,
    values: Mapping[str, torch.Tensor],
    trace: Any,
    runner: ProgramRunner,
    group: list[str],
    candidates: Mapping[str, _Probe],
    reach: _Reachability | None,
    second: _TrackedRun | None = None,
    prefix: int | None = None,
) -> dict[str, ClosedForm | None] | None:
    """Probe a group of parameters in shared light runs; ``None`` if a change in the
    runs cannot be attributed to one member (then each is probed alone). ``second``:
    the group's second run, if already made; ``prefix``: probe the first ``prefix``
    sites only (see :func:`recognise`)."""
    kinds = {name: candidates[name].kind for name in group}
    probes = {name: candidates[name].values for name in group}
    runs: list[Mapping[str, Any]] = []
    for step in range(3):
        if step == 0 and all(candidates[name].reuse for name in group):
            runs.append(trace.nodes)
            continue
        if step == 1 and second is not None:
            runs.append(second.sites)
            continue
        try:
            run = runner.run(
                {**values, **{name: probes[name][step] for name in group}}, limit=prefix
            )
        except (ValueError, RuntimeError):
            return None
        if run is None:
            return None
        runs.append(run)
    members = set(group)
    moved_sites: dict[str, list[_Candidate]] = {name: [] for name in group}
    failed: set[str] = set()
    for site_name in runner.names if prefix is None else runner.names[:prefix]:
        sites = [run[site_name] for run in runs]
        unwrapped = [unwrap_distribution(site["fn"]) for site in sites]
        attrs = [_attrs_of(fn) for fn, _ in unwrapped]
        if any(a is None for a in attrs) or len({type(fn) for fn, _ in unwrapped}) > 1:
            owners = (reach.sites[site_name] if reach is not None else members) & members
            if owners <= {site_name} and site_name in members:
                # A parameter's own prior, read by no other member: not a use of anything.
                continue
            if _same_tables(sites):
                continue
            if not owners:
                return None
            failed |= owners - {site_name}
            continue
        first = attrs[0]
        assert first is not None
        changed = [
            attr
            for attr in (*first.tensors, "value")
            if attr != "covariance_matrix"
            and not all(
                _equal(_attr(sites[0], first, attr), _attr(site, a, attr))
                for site, a in zip(sites[1:], attrs[1:], strict=True)
            )
        ]
        owners_of = {}
        for attr in changed:
            reached = reach.attrs[site_name][attr] if reach is not None else members
            owners_of[attr] = reached & members
            if not owners_of[attr]:
                return None
        for name in group:
            moved = frozenset(attr for attr in changed if name in owners_of[attr])
            if name == site_name or not moved:
                continue
            if "value" in moved:
                failed.add(name)
                continue
            first_run, second_run, third_run = (_compacted(a) for a in attrs)
            runs_attrs = (first_run, second_run, third_run)
            shapes = {attr: tensor.shape for attr, tensor in first.tensors.items()}
            event_ndims = unwrapped[0][1]
            moved_sites[name].append(_Candidate(site_name, runs_attrs, shapes, moved, event_ndims))
    result: dict[str, ClosedForm | None] = {}
    for name in group:
        uses = (
            None
            if name in failed
            else _recognise_candidates(moved_sites[name], kinds[name], probes[name])
        )
        result[name] = None
        if not uses:
            continue
        slot = uses[0].slot
        closed_kind = _recognise_prior(program, name, slot, trace.nodes.get(name))
        if closed_kind is not None:
            result[name] = ClosedForm(name, closed_kind, slot, tuple(uses))
    return result


# Per slot: the attribute whose shape (less its last ``event`` dims) is the rows' shape.
_ROWS_OF = {
    "categorical": ("probs", 1),
    "bernoulli": ("probs", 0),
    "binomial": ("probs", 0),
    "poisson": ("rate", 0),
    "exponential": ("rate", 0),
    "normal-loc": ("loc", 0),
    "normal-variance": ("scale", 0),
    "normal-precision": ("scale", 0),
    "mvn-loc": ("loc", 1),
    "mvn-covariance": ("scale_tril", 2),
}


def _equal(first: torch.Tensor, second: torch.Tensor) -> bool:
    """``torch.equal``, on the entries that are not broadcast copies when both tensors
    are broadcast alike."""
    if first.shape != second.shape:
        return False
    compact, other = compact_view(first), compact_view(second)
    if compact.shape == other.shape:
        return torch.equal(compact, other)
    return torch.equal(first, second)


def _attr(site: Any, attrs: Any, attr: str) -> torch.Tensor:
    return site["value"] if attr == "value" else attrs.tensors[attr]


def _compacted(attrs: Any) -> _Attrs:
    """Attributes without broadcast copies (small ones as they are: cheaper to stack)."""
    return _Attrs(
        attrs.family,
        {attr: compact_view(t) if t.numel() >= 1024 else t for attr, t in attrs.tensors.items()},
    )


def _recognise_candidates(
    candidates: list[_Candidate], kind: str, probes: tuple[torch.Tensor, ...]
) -> list[Use] | None:
    """The uses of one parameter from the sites it moves, or ``None`` if a site does not
    match a known form. Sites of one family and layout are checked together, stacked."""
    batches: dict[tuple[Any, ...], list[_Candidate]] = {}
    for candidate in candidates:
        layout = tuple(
            (attr, tuple(run.tensors[attr].shape for run in candidate.runs))
            for attr in candidate.runs[0].tensors
        )
        key = (candidate.runs[0].family, candidate.moved, candidate.event_ndims, layout)
        batches.setdefault(key, []).append(candidate)
    uses: dict[str, Use] = {}
    for batch in batches.values():
        stacked = [
            _Attrs(
                batch[0].runs[0].family,
                {
                    attr: torch.stack([c.runs[step].tensors[attr] for c in batch])
                    for attr in batch[0].runs[0].tensors
                },
            )
            for step in range(3)
        ]
        first = batch[0]
        use = _recognise_moved(
            "", stacked[0], stacked[1], (probes[0], probes[1]), kind, first.moved, first.event_ndims
        )
        if use is None or not _holds(use, stacked[0], stacked[2], probes[0], probes[2], False):
            return None
        attr, event = _ROWS_OF[use.slot]
        for i, candidate in enumerate(batch):
            full = candidate.shapes[attr]
            rows = use.rows[i].expand(full[: len(full) - event])
            uses[candidate.site] = Use(candidate.site, use.slot, rows, candidate.event_ndims)
    ordered = [uses[candidate.site] for candidate in candidates]
    if any(use.slot != ordered[0].slot for use in ordered):
        return None
    return ordered


def _same_tables(sites: list[Any]) -> bool:
    """Do the runs give one site the same log-probability table?"""
    with pyro.validation_enabled(False):
        tables = [site["fn"].log_prob(site["value"]) for site in sites]
    return all(torch.equal(tables[0], other) for other in tables[1:])


def _recognise_alone(
    program: ProgramModel,
    values: Mapping[str, torch.Tensor],
    base_trace: Any,
    name: str,
    probe: _Probe,
) -> ClosedForm | None:
    """Probe one parameter with full traces, the others held at ``values``."""
    kind, probes = probe.kind, probe.values
    try:
        traces = [base_trace if probe.reuse else program.trace({**values, name: probes[0]})]
        traces += [program.trace({**values, name: p}) for p in probes[1:]]
    except (ValueError, RuntimeError):
        return None
    uses: list[Use] = []
    for site_name, site in sample_sites(traces[0]):
        if any(site_name not in trace.nodes for trace in traces[1:]):
            return None
        second, third = (trace.nodes[site_name] for trace in traces[1:])
        unchanged = all(
            torch.equal(site["log_prob"], other["log_prob"]) for other in (second, third)
        )
        if site_name == name or unchanged:
            continue
        use = _recognise_use(site, second, (probes[0], probes[1]), kind)
        first_attrs = _attrs_of(unwrap_distribution(site["fn"])[0])
        third_attrs = _attrs_of(unwrap_distribution(third["fn"])[0])
        if (
            use is None
            or first_attrs is None
            or third_attrs is None
            or (uses and use.slot != uses[0].slot)
            or not _holds(use, first_attrs, third_attrs, probes[0], probes[2])
        ):
            return None
        uses.append(use)
    if not uses:
        return None
    closed_kind = _recognise_prior(program, name, uses[0].slot, base_trace.nodes.get(name))
    return None if closed_kind is None else ClosedForm(name, closed_kind, uses[0].slot, tuple(uses))


# ----- updates -----------------------------------------------------------------------


def _use_weight(weight: torch.Tensor, event_ndims: int) -> torch.Tensor:
    """A use's weight table, compacted, with its site's reinterpreted dims appended."""
    weight = compact_view(weight)
    return weight.reshape((*weight.shape, *(1,) * event_ndims))


def _entry_shape(weight: torch.Tensor, event_ndims: int, *tensors: torch.Tensor) -> tuple[int, ...]:
    """The shape of a use's entries: its weight table (with its site's reinterpreted
    dims), row index, value and distribution parameters broadcast together."""
    return _broadcast_shape((*weight.shape, *(1,) * event_ndims), *(t.shape for t in tensors))


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _sums_by_row(
    num_rows: int,
    index: torch.Tensor,
    shape: tuple[int, ...],
    *terms: tuple[torch.Tensor, ...],
) -> list[torch.Tensor]:
    """For each term — a product of factors, each broadcastable to the entries
    ``shape`` — the sum of its entries over the entries that read each parameter row
    (``index``), ``(num_rows,)``.

    The product and the sum are one ``einsum`` on the factors as they are, so factors
    that are constant along a dimension (a parameter per component, the data per point)
    are never broadcast to the full entries.
    """
    index = compact_view(index)
    rank = len(shape)
    kept = (1,) * (rank - index.dim()) + tuple(index.shape)
    flat_index = index.expand(kept).reshape(-1)
    sums = []
    for factors in terms:
        padded = [f.reshape((1,) * (rank - f.dim()) + tuple(f.shape)) for f in factors]
        spanned = [any(f.shape[d] > 1 for f in padded) for d in range(rank)]
        out = [d for d in range(rank) if kept[d] > 1 and spanned[d]]
        # Factors constant along every summed dimension multiply the sums afterwards.
        inner = [f for f in padded if any(f.shape[d] > 1 for d in range(rank) if d not in out)]
        outer = [f for f in padded if all(f.shape[d] == 1 for d in range(rank) if d not in out)]
        total = _einsum_sum(inner, out, rank) if inner else None
        for factor in outer:
            factor = factor.reshape([factor.shape[d] for d in out])
            total = factor if total is None else total * factor
        assert total is not None
        repeats = math.prod(shape[d] for d in range(rank) if kept[d] == 1 and not spanned[d])
        if repeats != 1:
            total = total * repeats
        shape_out = [kept[d] if d in out else 1 for d in range(rank)]
        total = total.expand([kept[d] for d in out]).reshape(shape_out).expand(kept)
        sums.append(_scatter(num_rows, flat_index, total.reshape(-1)))
    return sums


def _einsum_sum(factors: list[torch.Tensor], out: list[int], rank: int) -> torch.Tensor:
    """``Σ ∏ factors`` keeping the dimensions ``out`` (``einsum`` over size > 1 dims)."""
    operands, subscripts = [], []
    for factor in factors:
        dims = [d for d in range(rank) if factor.shape[d] > 1]
        operands.append(factor.reshape([factor.shape[d] for d in dims]))
        subscripts.append("".join(_LETTERS[d] for d in dims))
    present = set("".join(subscripts))
    result = "".join(_LETTERS[d] for d in out if _LETTERS[d] in present)
    total = torch.einsum(",".join(subscripts) + "->" + result, *operands)
    # Output dimensions no inner factor has: broadcast them back in place.
    view = [total.shape[result.index(_LETTERS[d])] if _LETTERS[d] in present else 1 for d in out]
    return total.reshape(view)


def _scatter(num_rows: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(num_rows, *values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


# How the closed forms sum their weighted statistics over the shards of a distributed
# fit (None: one process holds all the data).
_SHARD_SUMS: ContextVar[Callable[[list[torch.Tensor]], list[torch.Tensor]] | None] = ContextVar(
    "shard_sums", default=None
)


@contextmanager
def summed_over_shards(
    reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> Iterator[None]:
    """Within the block, every closed form's weighted sums over its uses (counts, moments,
    scatter matrices: the data terms, before the prior joins them) are passed through
    ``reduce``, which returns them summed over the shards of the data (one all-reduce
    per block): each shard's process then takes the closed form of the whole data."""
    token = _SHARD_SUMS.set(reduce)
    try:
        yield
    finally:
        _SHARD_SUMS.reset(token)


def _over_shards(*sums: torch.Tensor) -> list[torch.Tensor]:
    """``sums`` summed over the shards (:func:`summed_over_shards`); as they are otherwise."""
    reduce = _SHARD_SUMS.get()
    return list(sums) if reduce is None else reduce(list(sums))


SCALE_SLOTS = ("normal-variance", "normal-precision", "mvn-covariance")
LOCATION_SLOTS = ("normal-loc", "mvn-loc")


def patched_site(
    site: Any, changes: Mapping[str, tuple[torch.Tensor, torch.Tensor]], blocks: Mapping[str, Any]
) -> Any:
    """A use site as it would be after the location updates in ``changes``.

    A location enters as ``loc = θ[i] + d``, so its change shifts ``loc`` by
    ``Δθ[i]``; a parameter site's own value is replaced. That is all a scale block
    reads of a site, so it needs no new run of the program.
    """
    name = site["name"]
    fn, _ = unwrap_distribution(site["fn"])
    shift = None
    for other, (old, new) in changes.items():
        block = blocks.get(other)
        if block is None or block.slot not in LOCATION_SLOTS:
            continue
        for use in block.uses:
            if use.site == name:
                delta = new - old
                width = 1 if block.slot == "normal-loc" else delta.shape[-1]
                rows = delta.reshape(-1, width)[compact_view(use.rows)]
                step = rows[..., 0] if block.slot == "normal-loc" else rows
                shift = step if shift is None else shift + step
    if shift is None and name not in changes:
        return site
    if shift is not None:
        if isinstance(fn, dist.Normal):
            fn = dist.Normal(compact_view(fn.loc) + shift, fn.scale, validate_args=False)
        else:
            fn = dist.MultivariateNormal(fn.loc + shift, scale_tril=fn.scale_tril)
    value = changes[name][1] if name in changes else site["value"]
    return {**site, "value": value, "fn": fn}


def closed_form_update(
    program: ProgramModel,
    block: ClosedForm,
    trace: Any,
    weights: Mapping[str, torch.Tensor],
    changes: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    blocks: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """The exact maximiser of Q over one block, others held at their values in ``trace``.

    Args:
        program: the program.
        block: the recognised block.
        trace: a trace of the program at the current parameter values.
        weights: the E-step's Q weights.
        changes: for a scale block, ``{site: (old, new)}`` of location blocks updated
            since ``trace`` was run (see :func:`patched_site`).
        blocks: the recognised blocks by site, to read the changed locations' uses.

    Returns:
        The new value of ``block.name`` (rows with no data keep their value).
    """
    current = trace.nodes[block.name]["value"].detach()
    prior_site = trace.nodes[block.name] if program.params[block.name].kind == "sample" else None
    uses = []
    for use in block.uses:
        site = trace.nodes[use.site]
        weight = weights[use.site]
        if changes:
            site = patched_site(site, changes, blocks or {})
        uses.append((use, site, weight))
    prior = None if prior_site is None else effective_prior(prior_site)
    new = CONJUGATE_UPDATES[block.slot](current, uses, prior, block.jacobian)
    keep = ~torch.isfinite(new)
    return torch.where(keep, current, new).detach()


# Prior families with conjugate closed forms whose parameters effective_prior adjusts.
ADJUSTABLE_PRIORS = (dist.Beta, dist.Dirichlet, dist.Gamma, dist.InverseGamma, dist.Normal)


def prior_weight(site: Any) -> torch.Tensor | None:
    """The weight of a prior site's log density, ``scale · mask`` broadcast against the
    parameter's entries (batch shape with the event dims as 1); ``None`` when it is 1."""
    mask, scale = site["mask"], site["scale"]
    trivial_scale = not isinstance(scale, torch.Tensor) and scale == 1.0
    if mask is None and trivial_scale:
        return None
    fn = site["fn"]
    value = site["value"]
    weight = torch.ones(fn.batch_shape, dtype=value.dtype, device=value.device)
    if mask is not None:
        weight = weight * torch.as_tensor(mask, device=value.device)
    weight = weight * torch.as_tensor(scale, dtype=value.dtype, device=value.device)
    return weight.reshape((*weight.shape, *(1,) * fn.event_dim))


def effective_prior(site: Any) -> Any:
    r"""The prior of a block as its closed form must see it.

    The log prior enters the log joint weighted by ``s = scale · mask`` of its site
    (``poutine.scale``, ``poutine.mask``). That keeps the conjugate form; the exponents
    move: a ``Beta``/``Dirichlet``/``Gamma`` concentration ``a`` becomes ``1 + s(a − 1)``,
    a ``Gamma`` rate ``s·b``, an ``InverseGamma`` concentration ``s(a + 1) − 1`` and rate
    ``s·b``, a ``Normal`` scale ``σ/√s``. ``s = 0`` gives a flat prior. (The
    log-Jacobian of the unconstrained space is the modes' ``unconstrained`` option.)
    """
    prior = unwrap_distribution(site["fn"])[0]
    s = prior_weight(site)
    if s is None:
        return prior
    if not isinstance(prior, ADJUSTABLE_PRIORS):
        raise ValueError(f"no adjusted closed form for a {type(prior).__name__} prior")
    if isinstance(prior, dist.Beta):
        return SimpleNamespace(
            concentration1=1 + s * (prior.concentration1 - 1),
            concentration0=1 + s * (prior.concentration0 - 1),
        )
    if isinstance(prior, dist.Dirichlet):
        return SimpleNamespace(concentration=1 + s * (prior.concentration - 1))
    if isinstance(prior, dist.Gamma):
        return SimpleNamespace(concentration=1 + s * (prior.concentration - 1), rate=s * prior.rate)
    if isinstance(prior, dist.InverseGamma):
        return SimpleNamespace(concentration=s * (prior.concentration + 1) - 1, rate=s * prior.rate)
    return SimpleNamespace(loc=prior.loc, scale=prior.scale / s.sqrt())


def _broadcast_prior(value: torch.Tensor, *params: torch.Tensor) -> list[torch.Tensor]:
    return [p.expand(value.shape) for p in params]


def _flat_prior(value: torch.Tensor, prior: Any, *attrs: str) -> list[Any]:
    """The prior's ``attrs`` broadcast to ``value`` and flattened; ``None`` each if flat."""
    if prior is None:
        return [None] * len(attrs)
    return [p.reshape(-1) for p in _broadcast_prior(value, *(getattr(prior, a) for a in attrs))]


def _categorical(current: Tensor, uses: list[Any], prior: Any, unconstrained: bool) -> Tensor:
    num_values = current.shape[-1]
    rows = current.reshape(-1, num_values)
    counts = torch.zeros_like(rows)
    for use, site, weight in uses:
        shape = _entry_shape(weight, use.event_ndims, site["value"], use.rows)
        w = _use_weight(weight, use.event_ndims)
        value = compact_view(site["value"]).long()
        index = compact_view(use.rows)
        target = _broadcast_shape((1,) * len(shape), value.shape, index.shape)
        w = w.expand(shape).sum_to_size(target).reshape(-1)
        keys = (index.expand(target).reshape(-1), value.expand(target).reshape(-1))
        counts.index_put_(keys, w, accumulate=True)
    (counts,) = _over_shards(counts)
    (concentration,) = _flat_prior(current, prior, "concentration")
    concentration = None if concentration is None else concentration.reshape(rows.shape)
    return conjugate.dirichlet_mode(counts, concentration, unconstrained).reshape(current.shape)


_Terms = tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]


def _row_sums(
    current: Tensor, uses: list[Any], terms: Callable[[Any, Tensor, Tensor], _Terms]
) -> list[Tensor]:
    """Two weighted sums per parameter entry over all uses. ``terms(fn, x, θ[i])`` gives
    the distribution's tensors the entries broadcast over and the factors of the two
    products (each times the use's weight), from its family, value and parameter entries."""
    flat = current.reshape(-1)
    sums = [torch.zeros_like(flat), torch.zeros_like(flat)]
    for use, site, weight in uses:
        fn, _ = unwrap_distribution(site["fn"])
        index = compact_view(use.rows)
        attrs, first, second = terms(fn, compact_view(site["value"]), flat[index])
        shape = _entry_shape(weight, use.event_ndims, site["value"], use.rows, *attrs)
        w = _use_weight(weight, use.event_ndims)
        more = _sums_by_row(flat.numel(), index, shape, (w, *first), (w, *second))
        for total, extra in zip(sums, more, strict=True):
            total += extra
    return _over_shards(*sums)


def _binary(current: Tensor, uses: list[Any], prior: Any, unconstrained: bool) -> Tensor:
    def terms(fn: Any, x: Tensor, theta: Tensor) -> _Terms:
        total = fn.total_count if isinstance(fn, dist.Binomial) else torch.ones(())
        return (total,), (x,), (compact_view(total),)

    successes, trials = _row_sums(current, uses, terms)
    a, b = _flat_prior(current, prior, "concentration1", "concentration0")
    return conjugate.beta_mode(successes, trials, a, b, unconstrained).reshape(current.shape)


def _rate(current: Tensor, uses: list[Any], prior: Any, unconstrained: bool, slot: str) -> Tensor:
    def terms(fn: Any, x: Tensor, theta: Tensor) -> _Terms:
        exposure = compact_view(fn.rate) / theta
        if slot == "poisson":
            return (fn.rate,), (x,), (exposure,)
        return (fn.rate,), (), (exposure, x)

    counts, totals = _row_sums(current, uses, terms)
    a, b = _flat_prior(current, prior, "concentration", "rate")
    return conjugate.gamma_mode(counts, totals, a, b, unconstrained).reshape(current.shape)


def _normal_loc(current: Tensor, uses: list[Any], prior: Any, unconstrained: bool) -> Tensor:
    def terms(fn: Any, x: Tensor, theta: Tensor) -> _Terms:
        inverse = 1 / compact_view(fn.scale).square()
        return (fn.loc, fn.scale), (inverse,), (inverse, x - (compact_view(fn.loc) - theta))

    precision, weighted = _row_sums(current, uses, terms)
    mean, std = _flat_prior(current, prior, "loc", "scale")
    prior_precision = None if std is None else std**-2
    return conjugate.normal_mean_mode(weighted, precision, mean, prior_precision).reshape(
        current.shape
    )


def _normal_scale(
    current: Tensor, uses: list[Any], prior: Any, unconstrained: bool, slot: str
) -> Tensor:
    def terms(fn: Any, x: Tensor, theta: Tensor) -> _Terms:
        loc, scale = compact_view(fn.loc), compact_view(fn.scale)
        # scale² = c·θ (variance) or scale⁻² = c·θ (precision); (x−loc)²/scale² = r²/(cθ) or r²cθ.
        factor = theta / scale.square()
        if slot == "normal-precision":
            factor = 1 / (scale.square() * theta)
        return (fn.loc, fn.scale), (), ((x - loc).square(), factor)

    counts, squares = _row_sums(current, uses, terms)
    a, b = _flat_prior(current, prior, "concentration", "rate")
    mode = conjugate.inverse_gamma_mode if slot == "normal-variance" else conjugate.gamma_mode
    return mode(counts / 2, squares / 2, a, b, unconstrained).reshape(current.shape)


def _mvn_entries(
    use: Use, site: Any, weight: Tensor
) -> tuple[Any, tuple[int, ...], Tensor, Tensor]:
    """A multivariate normal use's distribution, its entries' batch shape, and their
    weights and parameter rows, each flattened ``(entries,)``."""
    fn, _ = unwrap_distribution(site["fn"])
    w = weight.reshape((*weight.shape, *(1,) * use.event_ndims))
    shapes = (site["value"].shape[:-1], fn.loc.shape[:-1], fn.scale_tril.shape[:-2])
    batch = _broadcast_shape(w.shape, use.rows.shape, *shapes)
    return fn, batch, w.expand(batch).reshape(-1), use.rows.expand(batch).reshape(-1)


def _mvn_loc(current: Tensor, uses: list[Any], prior: Any, unconstrained: bool) -> Tensor:
    dim = current.shape[-1]
    rows = current.reshape(-1, dim)
    num_rows = rows.shape[0]
    information = torch.zeros(num_rows, dim, dim, dtype=current.dtype, device=current.device)
    weighted = torch.zeros_like(rows)
    for use, site, weight in uses:
        fn, batch, w, index = _mvn_entries(use, site, weight)
        tril = fn.scale_tril
        # Group entries by (parameter row, covariance entry): precisions stay unexpanded.
        tril_flat = tril.reshape(-1, dim, dim)
        tril_id = torch.arange(tril_flat.shape[0]).reshape(tril.shape[:-2])
        cov_id = tril_id.expand(batch).reshape(-1)
        x = site["value"].expand(*batch, dim).reshape(-1, dim)
        offset = fn.loc.expand(*batch, dim).reshape(-1, dim) - rows[index]
        key = index * tril_flat.shape[0] + cov_id
        size = num_rows * tril_flat.shape[0]
        sum_w = _scatter(size, key, w).reshape(num_rows, -1)
        sum_wx = _scatter(size, key, w[:, None] * (x - offset)).reshape(num_rows, -1, dim)
        precision = torch.cholesky_inverse(tril_flat)
        information += torch.einsum("rc,cij->rij", sum_w, precision)
        weighted += torch.einsum("cij,rcj->ri", precision, sum_wx)
    information, weighted = _over_shards(information, weighted)
    mean = prior_precision = None
    if prior is not None:
        if isinstance(prior, dist.MultivariateNormal):
            prior_precision = torch.cholesky_inverse(prior.scale_tril)
            prior_precision = prior_precision.expand(*current.shape[:-1], dim, dim)
            mean = prior.loc.expand(current.shape)
        else:
            mean, std = _broadcast_prior(current, prior.loc, prior.scale)
            prior_precision = torch.diag_embed(std**-2)
        prior_precision, mean = prior_precision.reshape(-1, dim, dim), mean.reshape(-1, dim)
    # Rows without information (no data, flat prior) come back NaN and keep their value.
    return conjugate.mvn_mean_mode(information, weighted, mean, prior_precision).reshape(
        current.shape
    )


def _mvn_covariance(current: Tensor, uses: list[Any], prior: Any, unconstrained: bool) -> Tensor:
    dim = current.shape[-1]
    mats = current.reshape(-1, dim, dim)
    num_rows = mats.shape[0]
    counts = torch.zeros(num_rows, dtype=current.dtype, device=current.device)
    scatter = torch.zeros_like(mats)
    for use, site, weight in uses:
        fn, batch, w, index = _mvn_entries(use, site, weight)
        # covariance = c·θ[i]; read c from the diagonal's first entry.
        factor = (fn.covariance_matrix[..., 0, 0].expand(batch).reshape(-1)) / mats[index][:, 0, 0]
        residual = (site["value"] - fn.loc).expand(*batch, dim).reshape(-1, dim)
        w = w / factor
        counts += _scatter(num_rows, index, w * factor)
        for row in range(num_rows):
            chosen = index == row
            r = residual[chosen]
            scatter[row] += (r * w[chosen, None]).mT @ r
    counts, scatter = _over_shards(counts, scatter)
    df = psi = None
    if prior is not None:
        df = prior.df.expand(current.shape[:-2]).reshape(-1)
        psi = prior.scale_matrix.expand(current.shape).reshape(-1, dim, dim)
    return conjugate.inverse_wishart_mode(scatter, counts, psi, df).reshape(current.shape)


#: The closed-form update of each block slot (``ClosedForm.slot``): called with the
#: current value, its ``(use, site, weight)`` triples, the prior (or ``None``) and
#: ``block.jacobian``, it returns the block's new value.
CONJUGATE_UPDATES: dict[str, Any] = {
    "categorical": _categorical,
    "bernoulli": _binary,
    "binomial": _binary,
    "poisson": lambda c, u, p, j: _rate(c, u, p, j, "poisson"),
    "exponential": lambda c, u, p, j: _rate(c, u, p, j, "exponential"),
    "normal-loc": _normal_loc,
    "normal-variance": lambda c, u, p, j: _normal_scale(c, u, p, j, "normal-variance"),
    "normal-precision": lambda c, u, p, j: _normal_scale(c, u, p, j, "normal-precision"),
    "mvn-loc": _mvn_loc,
    "mvn-covariance": _mvn_covariance,
}
