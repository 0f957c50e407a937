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

from collections.abc import Mapping
from typing import Any, NamedTuple

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyroem.mstep.conjugate import dirichlet_mode
from pyroem.program.model import ProgramModel, sample_sites
from pyroem.spec.distributions import InverseWishart

__all__ = [
    "LOCATION_SLOTS",
    "SCALE_SLOTS",
    "ClosedForm",
    "Use",
    "closed_form_update",
    "recognise",
]

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
    """A recognised closed-form block: parameter ``name`` updated by ``kind``."""

    name: str
    kind: str
    slot: str
    uses: tuple[Use, ...]


def _unwrap(fn: Any) -> tuple[Any, int]:
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


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    rtol = _PROBE_RTOL if a.dtype == torch.float64 else _PROBE_RTOL_FLOAT32
    scale = 1 + torch.maximum(a.abs(), b.abs())
    return a.shape == torch.broadcast_shapes(a.shape, b.shape) and bool(
        ((a - b).abs() <= rtol * scale).all()
    )


def _element_index(
    first: torch.Tensor, second: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor], kind: str
) -> torch.Tensor | None:
    """Flat parameter index read by each entry, if the entry is ``θ[i]`` up to the
    form ``kind`` allows (shift for real, ratio for positive, identity for unit)."""
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
    return index if ok else None


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
    rows1, rows2 = (p.reshape(-1, width) for p in probe)
    flat1, flat2 = first.reshape(-1, width), second.reshape(-1, width)
    signal, design = (flat2 - flat1, rows2 - rows1) if shift else (flat1, rows1)
    index = (signal[:, None, :] - design[None, :, :]).abs().amax(-1).argmin(-1)
    if shift:
        ok = _close(flat2 - flat1, (rows2 - rows1)[index])
    else:
        ok = _close(flat1, rows1[index]) and _close(flat2, rows2[index])
    return index.reshape(first.shape[:-1]) if ok else None


def _matrix_index(
    first: torch.Tensor, second: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor | None:
    """Matrix of the parameter read by each matrix, if it is ``c·θ[i]``."""
    rows1, rows2 = (p.reshape(-1, *p.shape[-2:]) for p in probe)
    if first.shape[-2:] != rows1.shape[-2:]:
        return None
    dim = first.shape[-1]
    ratio = torch.diagonal(second, dim1=-2, dim2=-1) / torch.diagonal(first, dim1=-2, dim2=-1)
    gains = rows2[:, 0, 0] / rows1[:, 0, 0]
    index = (ratio[..., :1] - gains).abs().argmin(-1)
    scale = torch.diagonal(first, dim1=-2, dim2=-1)[..., 0] / rows1[index][..., 0, 0]
    ok = _close(second, gains[index][..., None, None] * first) and _close(
        first, scale[..., None, None] * rows1[index]
    )
    return index if ok and dim == rows1.shape[-1] else None


def _recognise_use(
    before: Any, after: Any, probe: tuple[torch.Tensor, torch.Tensor], kind: str
) -> Use | None:
    """Match one changed site against the known (family, parameter) forms."""
    fn1, event_ndims = _unwrap(before["fn"])
    fn2, _ = _unwrap(after["fn"])
    if type(fn1) is not type(fn2):
        return None
    site = before["name"]
    if isinstance(fn1, dist.Categorical) and kind == "simplex":
        index = _row_index(fn1.probs, fn2.probs, probe, probe[0].shape[-1], shift=False)
        return None if index is None else Use(site, "categorical", index, event_ndims)
    if isinstance(fn1, dist.Bernoulli | dist.Binomial) and kind == "unit":
        if isinstance(fn1, dist.Binomial) and not torch.equal(fn1.total_count, fn2.total_count):
            return None
        slot = "binomial" if isinstance(fn1, dist.Binomial) else "bernoulli"
        index = _element_index(fn1.probs, fn2.probs, probe, kind)
        return None if index is None else Use(site, slot, index, event_ndims)
    if isinstance(fn1, dist.Poisson | dist.Exponential) and kind == "positive":
        index = _element_index(fn1.rate, fn2.rate, probe, kind)
        slot = "poisson" if isinstance(fn1, dist.Poisson) else "exponential"
        return None if index is None else Use(site, slot, index, event_ndims)
    if isinstance(fn1, dist.Normal):
        return _recognise_normal(site, fn1, fn2, probe, kind, event_ndims)
    if isinstance(fn1, dist.MultivariateNormal):
        return _recognise_mvn(site, fn1, fn2, probe, kind, event_ndims)
    return None


def _recognise_normal(
    site: str, fn1: Any, fn2: Any, probe: tuple[torch.Tensor, torch.Tensor], kind: str, nd: int
) -> Use | None:
    same_loc = torch.equal(fn1.loc, fn2.loc)
    same_scale = torch.equal(fn1.scale, fn2.scale)
    if kind == "real" and same_scale:
        index = _element_index(fn1.loc, fn2.loc, probe, kind)
        return None if index is None else Use(site, "normal-loc", index, nd)
    if kind == "positive" and same_loc:
        variance = _element_index(fn1.scale.square(), fn2.scale.square(), probe, kind)
        if variance is not None:
            return Use(site, "normal-variance", variance, nd)
        precision = _element_index(fn1.scale**-2, fn2.scale**-2, probe, kind)
        if precision is not None:
            return Use(site, "normal-precision", precision, nd)
    return None


def _recognise_mvn(
    site: str, fn1: Any, fn2: Any, probe: tuple[torch.Tensor, torch.Tensor], kind: str, nd: int
) -> Use | None:
    same_loc = torch.equal(fn1.loc, fn2.loc)
    same_cov = torch.equal(fn1.scale_tril, fn2.scale_tril)
    if kind == "real" and same_cov:
        index = _row_index(fn1.loc, fn2.loc, probe, fn1.loc.shape[-1], shift=True)
        return None if index is None else Use(site, "mvn-loc", index, nd)
    if kind == "positive-definite" and same_loc:
        index = _matrix_index(fn1.covariance_matrix, fn2.covariance_matrix, probe)
        return None if index is None else Use(site, "mvn-covariance", index, nd)
    return None


def _holds(use: Use, fn1: Any, fn3: Any, probe1: torch.Tensor, probe3: torch.Tensor) -> bool:
    """Does the form read off the designed probes also hold at the random probe?"""
    rows, slot = use.rows, use.slot
    if type(fn1) is not type(fn3):
        return False
    flat1, flat3 = probe1.reshape(-1), probe3.reshape(-1)
    if slot == "categorical":
        return _close(fn3.probs, probe3.reshape(-1, probe3.shape[-1])[rows])
    if slot in ("bernoulli", "binomial"):
        return _close(fn3.probs, flat3[rows])
    if slot in ("poisson", "exponential"):
        return _close(fn3.rate / fn1.rate, (flat3 / flat1)[rows])
    if slot == "normal-loc":
        return _close(fn3.loc - fn1.loc, (flat3 - flat1)[rows]) and _close(fn3.scale, fn1.scale)
    if slot in ("normal-variance", "normal-precision"):
        ratio = fn3.scale.square() / fn1.scale.square()
        if slot == "normal-precision":
            ratio = 1 / ratio
        return _close(ratio, (flat3 / flat1)[rows]) and _close(fn3.loc, fn1.loc)
    width = probe1.shape[-1]
    if slot == "mvn-loc":
        shift = (probe3 - probe1).reshape(-1, width)[rows]
        return _close(fn3.loc - fn1.loc, shift) and _close(fn3.scale_tril, fn1.scale_tril)
    mats1, mats3 = (p.reshape(-1, width, width) for p in (probe1, probe3))
    gains = (mats3[:, 0, 0] / mats1[:, 0, 0])[rows][..., None, None]
    return _close(fn3.covariance_matrix, gains * fn1.covariance_matrix) and _close(fn3.loc, fn1.loc)


def _recognise_prior(program: ProgramModel, name: str, slot: str, site: Any) -> str | None:
    """The kind of closed form for ``name`` given its prior, or ``None``."""
    accepted, likelihood = _PRIORS[slot]
    if program.params[name].kind == "param":
        return f"flat-{likelihood}"
    prior, _ = _unwrap(site["fn"])
    if not isinstance(prior, accepted):
        return None
    if slot == "mvn-loc" and isinstance(prior, dist.Normal) and site["fn"].event_dim != 1:
        return None
    return f"{_PRIOR_NAMES[type(prior)]}-{likelihood}"


def recognise(
    program: ProgramModel, values: Mapping[str, torch.Tensor], trace: Any = None
) -> dict[str, ClosedForm | None]:
    """Find the closed-form block of every parameter site, by probing.

    Args:
        program: the program.
        values: valid parameter values to probe around (the starting point).
        trace: the program's trace at ``values``, if already run.

    Returns:
        ``{site: ClosedForm or None}``; ``None`` means the gradient M-step.
    """
    found: dict[str, ClosedForm | None] = {}
    base_trace = program.trace(values) if trace is None else trace
    generator = torch.Generator().manual_seed(0)
    for name, param in program.params.items():
        found[name] = None
        kind = _constraint_kind(param.constraint)
        value = values[name].detach()
        if kind is None or value.dtype not in (torch.float32, torch.float64):
            continue
        probes = _probes(value, kind, generator)
        try:
            # The real, positive and positive-definite designs start at the value itself.
            reuse = kind in ("real", "positive", "positive-definite")
            traces = [base_trace if reuse else program.trace({**values, name: probes[0]})]
            traces += [program.trace({**values, name: p}) for p in probes[1:]]
        except (ValueError, RuntimeError):
            continue
        uses: list[Use] = []
        recognised = True
        for site_name, site in sample_sites(traces[0]):
            second, third = (trace.nodes[site_name] for trace in traces[1:])
            unchanged = all(
                torch.equal(site["log_prob"], other["log_prob"]) for other in (second, third)
            )
            if site_name == name or unchanged:
                continue
            use = _recognise_use(site, second, probes[:2], kind)
            if (
                use is None
                or (uses and use.slot != uses[0].slot)
                or not _holds(
                    use, _unwrap(site["fn"])[0], _unwrap(third["fn"])[0], probes[0], probes[2]
                )
            ):
                recognised = False
                break
            uses.append(use)
        if not recognised or not uses:
            continue
        closed_kind = _recognise_prior(program, name, uses[0].slot, base_trace.nodes.get(name))
        if closed_kind is not None:
            found[name] = ClosedForm(name, closed_kind, uses[0].slot, tuple(uses))
    return found


# ----- updates -----------------------------------------------------------------------


def _entries(
    weight: torch.Tensor, index: torch.Tensor, event_ndims: int, *tensors: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Broadcast a use's weight, row index and tensors to its table, flattened."""
    weight = weight.reshape(*weight.shape, *(1,) * event_ndims)
    shape = torch.broadcast_shapes(weight.shape, index.shape, *(t.shape for t in tensors))
    return tuple(t.expand(shape).reshape(-1) for t in (weight, index, *tensors))


def _scatter(num_rows: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(num_rows, *values.shape[1:], dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values)


SCALE_SLOTS = ("normal-variance", "normal-precision", "mvn-covariance")
LOCATION_SLOTS = ("normal-loc", "mvn-loc")


def _patched_site(
    site: Any, changes: Mapping[str, tuple[torch.Tensor, torch.Tensor]], blocks: Mapping[str, Any]
) -> Any:
    """A use site as it would be after the location updates in ``changes``.

    A location enters as ``loc = θ[i] + d``, so its change shifts ``loc`` by
    ``Δθ[i]``; a parameter site's own value is replaced. That is all a scale block
    reads of a site, so it needs no new run of the program.
    """
    name = site["name"]
    fn, _ = _unwrap(site["fn"])
    shift = None
    for other, (old, new) in changes.items():
        block = blocks.get(other)
        if block is None or block.slot not in LOCATION_SLOTS:
            continue
        for use in block.uses:
            if use.site == name:
                delta = new - old
                width = 1 if block.slot == "normal-loc" else delta.shape[-1]
                rows = delta.reshape(-1, width)[use.rows]
                step = rows[..., 0] if block.slot == "normal-loc" else rows
                shift = step if shift is None else shift + step
    if shift is None and name not in changes:
        return site
    if shift is not None:
        if isinstance(fn, dist.Normal):
            fn = dist.Normal(fn.loc + shift, fn.scale, validate_args=False)
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
            since ``trace`` was run (see :func:`_patched_site`).
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
            site = _patched_site(site, changes, blocks or {})
        uses.append((use, site, weight))
    prior = None if prior_site is None else _unwrap(prior_site["fn"])[0]
    update = _UPDATES[block.slot]
    new = update(current, uses, prior)
    keep = ~torch.isfinite(new)
    return torch.where(keep, current, new).detach()


def _broadcast_prior(value: torch.Tensor, *params: torch.Tensor) -> list[torch.Tensor]:
    return [p.expand(value.shape) for p in params]


def _categorical(current: torch.Tensor, uses: list[Any], prior: Any) -> torch.Tensor:
    num_values = current.shape[-1]
    rows = current.reshape(-1, num_values)
    counts = torch.zeros_like(rows)
    for use, site, weight in uses:
        value = site["value"].long()
        w, index, x = _entries(weight, use.rows, use.event_ndims, value)
        counts.index_put_((index, x), w, accumulate=True)
    concentration = (
        torch.ones_like(rows)
        if prior is None
        else prior.concentration.expand(current.shape).reshape(rows.shape)
    )
    return dirichlet_mode(counts, concentration).reshape(current.shape)


def _binary(current: torch.Tensor, uses: list[Any], prior: Any) -> torch.Tensor:
    flat = current.reshape(-1)
    successes = torch.zeros_like(flat)
    trials = torch.zeros_like(flat)
    for use, site, weight in uses:
        fn, _ = _unwrap(site["fn"])
        total = fn.total_count if isinstance(fn, dist.Binomial) else torch.ones(())
        w, index, x, n = _entries(weight, use.rows, use.event_ndims, site["value"], total)
        successes += _scatter(flat.numel(), index, w * x)
        trials += _scatter(flat.numel(), index, w * n)
    if prior is None:
        a = b = torch.ones_like(flat)
    else:
        a, b = (
            p.reshape(-1)
            for p in _broadcast_prior(current, prior.concentration1, prior.concentration0)
        )
    new = (successes + (a - 1)) / (trials + (a - 1) + (b - 1))
    return new.clamp(0, 1).reshape(current.shape)


def _rate(current: torch.Tensor, uses: list[Any], prior: Any, slot: str) -> torch.Tensor:
    flat = current.reshape(-1)
    counts = torch.zeros_like(flat)
    totals = torch.zeros_like(flat)
    for use, site, weight in uses:
        fn, _ = _unwrap(site["fn"])
        w, index, x, rate = _entries(weight, use.rows, use.event_ndims, site["value"], fn.rate)
        exposure = rate / flat[index]
        if slot == "poisson":
            counts += _scatter(flat.numel(), index, w * x)
            totals += _scatter(flat.numel(), index, w * exposure)
        else:
            counts += _scatter(flat.numel(), index, w)
            totals += _scatter(flat.numel(), index, w * exposure * x)
    if prior is None:
        a, b = torch.ones_like(flat), torch.zeros_like(flat)
    else:
        a, b = (p.reshape(-1) for p in _broadcast_prior(current, prior.concentration, prior.rate))
    return ((counts + (a - 1)).clamp(min=0) / (totals + b)).reshape(current.shape)


def _normal_loc(current: torch.Tensor, uses: list[Any], prior: Any) -> torch.Tensor:
    flat = current.reshape(-1)
    precision = torch.zeros_like(flat)
    weighted = torch.zeros_like(flat)
    for use, site, weight in uses:
        fn, _ = _unwrap(site["fn"])
        w, index, x, loc, scale = _entries(
            weight, use.rows, use.event_ndims, site["value"], fn.loc, fn.scale
        )
        offset = loc - flat[index]
        tau = w / scale.square()
        precision += _scatter(flat.numel(), index, tau)
        weighted += _scatter(flat.numel(), index, tau * (x - offset))
    if prior is not None:
        mean, std = (p.reshape(-1) for p in _broadcast_prior(current, prior.loc, prior.scale))
        prior_precision = std**-2
        precision = precision + prior_precision
        weighted = weighted + prior_precision * mean
    return (weighted / precision).reshape(current.shape)


def _normal_scale(current: torch.Tensor, uses: list[Any], prior: Any, slot: str) -> torch.Tensor:
    flat = current.reshape(-1)
    counts = torch.zeros_like(flat)
    squares = torch.zeros_like(flat)
    for use, site, weight in uses:
        fn, _ = _unwrap(site["fn"])
        w, index, x, loc, scale = _entries(
            weight, use.rows, use.event_ndims, site["value"], fn.loc, fn.scale
        )
        # scale² = c·θ (variance) or scale⁻² = c·θ (precision); (x−loc)²/scale² = r²/(cθ) or r²cθ.
        residual = (x - loc).square() / scale.square() * flat[index]
        if slot == "normal-precision":
            residual = (x - loc).square() * scale.square() ** -1 / flat[index]
        counts += _scatter(flat.numel(), index, w)
        squares += _scatter(flat.numel(), index, w * residual)
    if slot == "normal-variance":
        if prior is None:
            return (squares / counts).reshape(current.shape)
        a, b = (p.reshape(-1) for p in _broadcast_prior(current, prior.concentration, prior.rate))
        return ((b + squares / 2) / (a + 1 + counts / 2)).reshape(current.shape)
    if prior is None:
        return (counts / squares).reshape(current.shape)
    a, b = (p.reshape(-1) for p in _broadcast_prior(current, prior.concentration, prior.rate))
    return ((a - 1 + counts / 2).clamp(min=0) / (b + squares / 2)).reshape(current.shape)


def _mvn_loc(current: torch.Tensor, uses: list[Any], prior: Any) -> torch.Tensor:
    dim = current.shape[-1]
    rows = current.reshape(-1, dim)
    num_rows = rows.shape[0]
    information = torch.zeros(num_rows, dim, dim, dtype=current.dtype, device=current.device)
    weighted = torch.zeros_like(rows)
    for use, site, weight in uses:
        fn, _ = _unwrap(site["fn"])
        tril = fn.scale_tril
        batch = torch.broadcast_shapes(
            weight.reshape(*weight.shape, *(1,) * use.event_ndims).shape,
            use.rows.shape,
            site["value"].shape[:-1],
            fn.loc.shape[:-1],
            tril.shape[:-2],
        )
        # Group entries by (parameter row, covariance entry): precisions stay unexpanded.
        tril_flat = tril.reshape(-1, dim, dim)
        tril_id = torch.arange(tril_flat.shape[0]).reshape(tril.shape[:-2])
        w = weight.reshape(*weight.shape, *(1,) * use.event_ndims).expand(batch).reshape(-1)
        index = use.rows.expand(batch).reshape(-1)
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
    if prior is not None:
        if isinstance(prior, dist.MultivariateNormal):
            prior_precision = torch.cholesky_inverse(prior.scale_tril)
            prior_precision = prior_precision.expand(*current.shape[:-1], dim, dim)
            mean = prior.loc.expand(current.shape)
        else:
            mean, std = _broadcast_prior(current, prior.loc, prior.scale)
            prior_precision = torch.diag_embed(std**-2)
        prior_precision = prior_precision.reshape(-1, dim, dim)
        information = information + prior_precision
        weighted = weighted + (prior_precision @ mean.reshape(-1, dim, 1))[..., 0]
    solution, info = torch.linalg.solve_ex(information, weighted)
    # Rows without information (no data, flat prior) come back non-finite and keep their value.
    solution[info > 0] = float("nan")
    return solution.reshape(current.shape)


def _mvn_covariance(current: torch.Tensor, uses: list[Any], prior: Any) -> torch.Tensor:
    dim = current.shape[-1]
    mats = current.reshape(-1, dim, dim)
    num_rows = mats.shape[0]
    counts = torch.zeros(num_rows, dtype=current.dtype, device=current.device)
    scatter = torch.zeros_like(mats)
    for use, site, weight in uses:
        fn, _ = _unwrap(site["fn"])
        cov = fn.covariance_matrix
        w = weight.reshape(*weight.shape, *(1,) * use.event_ndims)
        batch = torch.broadcast_shapes(
            w.shape, use.rows.shape, site["value"].shape[:-1], fn.loc.shape[:-1], cov.shape[:-2]
        )
        index = use.rows.expand(batch).reshape(-1)
        # covariance = c·θ[i]; read c from the diagonal's first entry.
        factor = (cov[..., 0, 0].expand(batch).reshape(-1)) / mats[index][:, 0, 0]
        residual = (site["value"] - fn.loc).expand(*batch, dim).reshape(-1, dim)
        w = w.expand(batch).reshape(-1) / factor
        counts += _scatter(num_rows, index, w * factor)
        for row in range(num_rows):
            chosen = index == row
            r = residual[chosen]
            scatter[row] += (r * w[chosen, None]).mT @ r
    if prior is None:
        new = scatter / counts[:, None, None]
    else:
        df = prior.df.expand(current.shape[:-2]).reshape(-1)
        psi = prior.scale_matrix.expand(current.shape).reshape(-1, dim, dim)
        new = (psi + scatter) / (df + counts + dim + 1)[:, None, None]
    return new.reshape(current.shape)


_UPDATES: dict[str, Any] = {
    "categorical": _categorical,
    "bernoulli": _binary,
    "binomial": _binary,
    "poisson": lambda c, u, p: _rate(c, u, p, "poisson"),
    "exponential": lambda c, u, p: _rate(c, u, p, "exponential"),
    "normal-loc": _normal_loc,
    "normal-variance": lambda c, u, p: _normal_scale(c, u, p, "normal-variance"),
    "normal-precision": lambda c, u, p: _normal_scale(c, u, p, "normal-precision"),
    "mvn-loc": _mvn_loc,
    "mvn-covariance": _mvn_covariance,
}
