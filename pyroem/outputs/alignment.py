r"""Label switching: put the components of chains, draws and fits in one order.

A mixture's likelihood does not change when its components are relabelled, so two
chains (or two methods) may report the same components in different orders, and
averaging draws or computing R-hat across them is meaningless until they are put in
one order. pyroem matches each estimate to a **reference** by the Hungarian
algorithm (``scipy.optimize.linear_sum_assignment``) on the cost

.. math::
    C_{jk} = \sum_{s} \sum_{e} \frac{(m_{s,je} - r_{s,ke})^2}{v_{s,jke}},

summed over the component-indexed sites :math:`s` (for a mixture: the weights and
every per-component parameter) and their elements :math:`e`, where :math:`m_{s,j}`
is the estimate's summary of component :math:`j` (a chain's posterior mean, one
draw, or a point estimate) and :math:`r_{s,k}` the reference's. The scale is the
Monte Carlo spread of the two summaries, :math:`v = \operatorname{var}_m +
\operatorname{var}_r` (the posterior variance of a component's element within a
chain, 0 for a point or a single draw), so each squared difference is measured in
posterior standard deviations and a well-determined parameter outweighs a vague one.
When neither side has draws (two point estimates), :math:`v` is the variance of the
element across the reference's components. Elements with :math:`v = 0` are left out.
Component :math:`k` of the aligned estimate is the estimate's component
:math:`j = π(k)` that the assignment matched to the reference's component :math:`k`.

Where alignment happens:

- :func:`align_draws` aligns chains (``per_draw=False``: one permutation per chain,
  matched on the chain's posterior means) or single draws (``per_draw=True``: each
  draw matched to the pooled, chain-aligned posterior). Without a reference the
  pooled posterior of the chains is the reference, recomputed until no permutation
  changes (chain 0 starts it).
- ``method="nuts"`` aligns its chains this way before it reports posterior means and
  R-hat.
- :func:`align` relabels a whole fit to match another fit (across methods), and
  :func:`align_fits` a set of fits to the first one.

Which axis of which site indexes the components: for a :class:`~pyroem.Mixture` fit,
the leading axis of ``weights`` and of every per-component parameter (a tied
covariance is shared and left alone); for a Pyro program, the sites inside a
``pyro.plate`` named ``"components"`` (the axis of that plate) and ``weights`` when its
last axis has that size. Any other program names them: ``axes={site: axis}``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pyroem.errors import SpecError
from pyroem.model.params import MixtureParams

__all__ = [
    "Alignment",
    "align",
    "align_draws",
    "align_fits",
    "component_axes",
    "match_components",
    "permute_components",
    "program_component_axes",
]

COMPONENT_PLATE = "components"


class Alignment(NamedTuple):
    """Draws put in one component order.

    Attributes:
        draws: site name → aligned draws ``(num_chains, num_draws, *shape)``.
        permutations: ``(num_chains, K)`` (per chain) or ``(num_chains, num_draws, K)``
            (per draw): entry ``k`` is the original label now at position ``k``.
    """

    draws: dict[str, torch.Tensor]
    permutations: np.ndarray


def _normalised_axes(
    axes: Mapping[str, int], values: Mapping[str, torch.Tensor], batch: int = 0
) -> dict[str, int]:
    """Check ``axes`` against ``values`` (whose first ``batch`` dims are chain/draw) and
    make every axis non-negative, relative to the site's own value."""
    if not axes:
        raise SpecError("axes is empty; name at least one component-indexed site")
    normalised = {}
    for name, axis in axes.items():
        if name not in values:
            raise SpecError(
                f"axes names the site {name!r}, which has no values; sites: {sorted(values)}"
            )
        ndim = values[name].dim() - batch
        if not -ndim <= axis < ndim:
            raise SpecError(
                f"axes[{name!r}] = {axis} is out of range for a value with {ndim} dimensions"
            )
        normalised[name] = axis % ndim
    sizes = {values[name].shape[batch + axis] for name, axis in normalised.items()}
    if len(sizes) > 1:
        found = {name: values[name].shape[batch + axis] for name, axis in normalised.items()}
        raise SpecError(f"the component axes have different sizes {found}; they must agree")
    return normalised


def _flat(value: torch.Tensor, axis: int) -> np.ndarray:
    """``(K, elements)`` float64 array with the component axis first."""
    moved = value.detach().cpu().double().movedim(axis, 0)
    return moved.reshape(moved.shape[0], -1).numpy()


def _cost(
    estimate: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    estimate_var: Mapping[str, np.ndarray] | None,
    reference_var: Mapping[str, np.ndarray] | None,
) -> np.ndarray:
    """The assignment cost ``(..., K_estimate, K_reference)``; estimates may carry
    leading batch dimensions (one cost matrix per draw)."""
    total: Any = 0.0
    for name, ref in reference.items():
        est = estimate[name]
        var = np.zeros((*est.shape[:-2], est.shape[-2], ref.shape[0], ref.shape[1]))
        if estimate_var is not None:
            var = var + estimate_var[name][..., :, None, :]
        if reference_var is not None:
            var = var + reference_var[name][None, :, :]
        if not np.any(var > 0):
            var = np.broadcast_to(ref.var(axis=0), var.shape)
        diff = np.square(est[..., :, None, :] - ref[None, :, :])
        used = var > 0
        ratio = np.divide(diff, var, out=np.zeros_like(diff), where=used)
        total = total + ratio.sum(-1)
    return np.asarray(total)


def _assign(cost: np.ndarray) -> np.ndarray:
    """Permutation ``π`` with ``π[k]`` = the estimate's component matched to reference ``k``."""
    rows, cols = linear_sum_assignment(cost)
    permutation = np.empty(cost.shape[1], dtype=np.int64)
    permutation[cols] = rows
    return permutation


def match_components(
    estimate: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    axes: Mapping[str, int],
    *,
    estimate_var: Mapping[str, torch.Tensor] | None = None,
    reference_var: Mapping[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """The permutation that puts ``estimate``'s components in ``reference``'s order.

    Args:
        estimate: site name → value (a point estimate or a chain's posterior mean).
        reference: site name → value, same shapes.
        axes: component-indexed site → component axis of its value.
        estimate_var: optional posterior variances of ``estimate``, same shapes.
        reference_var: optional posterior variances of ``reference``.

    Returns:
        ``(K,)`` int array ``π``: component ``k`` of the aligned estimate is
        ``estimate``'s component ``π[k]`` (see the module docstring for the cost).
    """
    axes = _normalised_axes(axes, reference)
    _normalised_axes(axes, estimate)
    est = {name: _flat(estimate[name], axis) for name, axis in axes.items()}
    ref = {name: _flat(reference[name], axis) for name, axis in axes.items()}
    for name in axes:
        if est[name].shape != ref[name].shape:
            raise SpecError(
                f"site {name!r} has shape {tuple(estimate[name].shape)} in the estimate but "
                f"{tuple(reference[name].shape)} in the reference; fits with different numbers "
                "of components cannot be aligned"
            )
    est_var = (
        None
        if estimate_var is None
        else {name: _flat(estimate_var[name], axis) for name, axis in axes.items()}
    )
    ref_var = (
        None
        if reference_var is None
        else {name: _flat(reference_var[name], axis) for name, axis in axes.items()}
    )
    return _assign(_cost(est, ref, est_var, ref_var))


def permute_components(
    values: Mapping[str, torch.Tensor], permutation: Any, axes: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Reorder the component axis of every site in ``axes`` (others are copied as they are).

    Args:
        values: site name → value.
        permutation: ``(K,)``: component ``k`` of the result is component
            ``permutation[k]`` of ``values``.
        axes: component-indexed site → component axis.
    """
    axes = _normalised_axes(axes, values)
    index = torch.as_tensor(np.asarray(permutation), dtype=torch.long)
    result = {}
    for name, value in values.items():
        if name in axes:
            result[name] = value.index_select(axes[name], index.to(value.device))
        else:
            result[name] = value.clone()
    return result


def _permute_draws(
    draws: Mapping[str, torch.Tensor], permutations: np.ndarray, axes: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Apply per-chain ``(C, K)`` or per-draw ``(C, S, K)`` permutations to draws."""
    num_chains, num_draws = next(iter(draws.values())).shape[:2]
    index = torch.as_tensor(permutations, dtype=torch.long)
    if index.dim() == 2:
        index = index[:, None, :].expand(num_chains, num_draws, index.shape[-1])
    result = {}
    for name, value in draws.items():
        if name not in axes:
            result[name] = value.clone()
            continue
        moved = value.movedim(axes[name] + 2, 2)
        shape = index.shape + (1,) * (moved.dim() - 3)
        gathered = moved.gather(2, index.reshape(shape).expand(moved.shape).to(value.device))
        result[name] = gathered.movedim(2, axes[name] + 2)
    return result


def _moments(
    draws: Mapping[str, torch.Tensor], axes: Mapping[str, int]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Posterior mean and variance of each component-indexed site over all draws."""
    flat = {name: draws[name].detach().double().flatten(0, 1) for name in axes}
    return (
        {name: value.mean(0) for name, value in flat.items()},
        {name: value.var(0, correction=0) for name, value in flat.items()},
    )


def align_draws(
    draws: Mapping[str, torch.Tensor],
    axes: Mapping[str, int],
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    reference_var: Mapping[str, torch.Tensor] | None = None,
    per_draw: bool = False,
    max_passes: int = 10,
) -> Alignment:
    """Align the components of posterior draws, chain by chain or draw by draw.

    Args:
        draws: site name → draws ``(num_chains, num_draws, *shape)``.
        axes: component-indexed site → component axis of one draw's value.
        reference: site name → reference values (a point estimate, or another fit's
            posterior mean); ``None``: the draws' own pooled posterior (started from
            chain 0 and recomputed until no permutation changes).
        reference_var: posterior variances of ``reference``, if it has them.
        per_draw: also align every single draw (after the chains).
        max_passes: most passes of the self-referenced refinement.

    Returns:
        The aligned draws and the permutations applied.
    """
    if not draws:
        raise SpecError("there are no draws to align")
    axes = _normalised_axes(axes, draws, batch=2)
    num_chains, num_draws = next(iter(draws.values())).shape[:2]
    first = next(iter(axes))
    num_components = draws[first].shape[2 + axes[first]]
    chains = [
        _moments({n: v[c : c + 1] for n, v in draws.items()}, axes) for c in range(num_chains)
    ]
    fixed = reference is not None
    target: Mapping[str, torch.Tensor]
    target_var: Mapping[str, torch.Tensor] | None
    if reference is not None:
        target, target_var = reference, reference_var
    else:
        target, target_var = chains[0]
    permutations = np.tile(np.arange(num_components), (num_chains, 1))
    for step in range(1 if fixed else max_passes):
        new = np.stack(
            [
                match_components(mean, target, axes, estimate_var=var, reference_var=target_var)
                for mean, var in chains
            ]
        )
        if step > 0 and np.array_equal(new, permutations):
            break
        permutations = new
        if not fixed:
            target, target_var = _moments(_permute_draws(draws, permutations, axes), axes)
    if not per_draw:
        return Alignment(_permute_draws(draws, permutations, axes), permutations)
    per = np.repeat(permutations[:, None, :], num_draws, axis=1)
    single = {name: _flat_draws(draws[name], axes[name]) for name in axes}
    for _ in range(1 if fixed else max_passes):
        if not fixed:
            target, target_var = _moments(_permute_draws(draws, per, axes), axes)
        flat_target = {name: _flat(target[name], axes[name]) for name in axes}
        flat_var = (
            None
            if target_var is None
            else {name: _flat(target_var[name], axes[name]) for name in axes}
        )
        cost = _cost(single, flat_target, None, flat_var)
        new = np.stack([_assign(matrix) for matrix in cost.reshape(-1, *cost.shape[-2:])])
        new = new.reshape(num_chains, num_draws, num_components)
        unchanged = np.array_equal(new, per)
        per = new
        if unchanged:
            break
    return Alignment(_permute_draws(draws, per, axes), per)


def _flat_draws(draws: torch.Tensor, axis: int) -> np.ndarray:
    """``(C, S, K, elements)`` float64 array with the component axis third."""
    moved = draws.detach().cpu().double().movedim(axis + 2, 2)
    return moved.reshape(*moved.shape[:3], -1).numpy()


def component_axes(fit: Any) -> dict[str, int]:
    """The component axis of every component-indexed parameter of a fit.

    Args:
        fit: a :class:`~pyroem.Fit`.

    Raises:
        SpecError: a Pyro program without a ``"components"`` plate (pass ``axes``).
    """
    if getattr(fit, "kind", None) == "mixture":
        shared = set(fit.family.shared_params)
        return {
            "weights": 0,
            **{name: 0 for name in fit.params if name not in shared | {"weights"}},
        }
    if getattr(fit, "kind", None) == "program":
        return program_component_axes(fit.program, fit.params)
    raise SpecError(f"expected a pyroem fit; got {type(fit).__name__}")


def program_component_axes(program: Any, values: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Component axes of a Pyro program's parameters: sites inside a ``pyro.plate``
    named ``"components"`` (that plate's axis), and ``weights`` when its last axis has
    the plate's size.

    Raises:
        SpecError: the program has no ``"components"`` plate.
    """
    trace = program.trace(values)
    axes: dict[str, int] = {}
    size = None
    for name in program.params:
        site = trace.nodes[name]
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.name == COMPONENT_PLATE:
                value = values[name]
                event_dim = site["fn"].event_dim if site["type"] == "sample" else 0
                axes[name] = value.dim() - event_dim + frame.dim
                size = frame.size
    if not axes:
        raise SpecError(
            f"cannot tell which axes of {program.name}'s parameters index components: it "
            f"has no pyro.plate named {COMPONENT_PLATE!r}; pass axes={{site: axis}}"
        )
    weights = values.get("weights")
    if "weights" not in axes and weights is not None and weights.shape[-1:] == (size,):
        axes["weights"] = weights.dim() - 1
    return axes


def _discrete_sites(fit: Any, num_components: int) -> list[str]:
    """Enumerated sites whose values are component labels (``K`` values)."""
    marginals = getattr(fit, "marginals", {}) or {}
    return [name for name, value in marginals.items() if value.shape[-1] == num_components]


def align(
    fit: Any,
    reference: Any = None,
    *,
    axes: Mapping[str, int] | None = None,
    per_draw: bool = False,
    labels: list[str] | None = None,
) -> Any:
    """A copy of ``fit`` with its components in the order of ``reference``'s.

    Draws of every component-indexed site are aligned chain by chain (or draw by draw
    with ``per_draw=True``) to the reference; the point estimate is matched on its
    own, with the aligned draws' posterior variances as its scale. A
    ``method="nuts"`` fit recomputes its posterior mean, diagnostics and marginals from
    the aligned draws. Draws of other sites (MCMC-EM's latent draws) follow the point
    estimate's permutation; label-valued ones are renamed.

    Args:
        fit: the fit to relabel.
        reference: the fit (or ``{site: value}``) whose order to adopt; ``None``: the
            fit's own pooled draws (only aligns chains; a fit without draws is returned
            unchanged).
        axes: component-indexed site → component axis (default:
            :func:`component_axes`).
        per_draw: align every draw, not just every chain.
        labels: enumerated sites whose values are component labels, relabelled in
            ``marginals`` and in draws (default: those whose marginals have ``K`` values).

    Returns:
        A relabelled shallow copy: point estimate, draws, most probable labels
        (``FitResult.labels``), predictions (``predict``, ``predict_proba``) and
        marginals follow the new order; method-specific extras (a variational fit's
        ``variational`` factors) are left as they are.
    """
    axes = dict(component_axes(fit) if axes is None else axes)
    params = fit.params
    axes = _normalised_axes(axes, params)
    ref_values, ref_var = _reference_summary(reference, axes)
    draws = getattr(fit, "draws", None) or {}
    aligned: Alignment | None = None
    if draws and all(name in draws for name in axes):
        aligned = align_draws(draws, axes, ref_values, reference_var=ref_var, per_draw=per_draw)
        # A fit with draws of θ that derives its estimate from them (NUTS) rebuilds itself.
        if callable(getattr(fit, "realigned", None)):
            return fit.realigned(aligned)
    if ref_values is None:
        if aligned is None:
            return fit
        first = next(iter(axes))
        permutation = np.arange(params[first].shape[axes[first]])
    else:
        est_var = None
        if aligned is not None:
            est_var = _moments(aligned.draws, axes)[1]
        permutation = match_components(
            params, ref_values, axes, estimate_var=est_var, reference_var=ref_var
        )
    return _relabel(fit, permutation, axes, aligned, labels)


def _reference_summary(
    reference: Any, axes: Mapping[str, int]
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """A reference's values and, when it has draws, their posterior variances."""
    if reference is None:
        return None, None
    if isinstance(reference, Mapping):
        return {name: torch.as_tensor(reference[name]) for name in axes}, None
    draws = getattr(reference, "draws", None)
    params = reference.params
    missing = [name for name in axes if name not in params]
    if missing:
        raise SpecError(f"the reference has no sites {missing}; it must be a fit of the same model")
    if draws and all(name in draws for name in axes):
        return {name: params[name] for name in axes}, _moments(draws, axes)[1]
    return {name: params[name] for name in axes}, None


def _relabel(
    fit: Any,
    permutation: np.ndarray,
    axes: Mapping[str, int],
    aligned: Alignment | None,
    labels: list[str] | None,
) -> Any:
    """A shallow copy of ``fit`` with one permutation applied to its point estimate."""
    new = copy.copy(fit)
    index = torch.as_tensor(permutation, dtype=torch.long)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(index.shape[0])
    discrete = (
        _discrete_sites(fit, index.shape[0]) if labels is None or fit.kind == "mixture" else labels
    )
    if aligned is not None:
        new.draws = aligned.draws
    elif fit.draws:
        # Draws of some sites only (e.g. MCMC-EM's latent draws): one permutation for all,
        # and label-valued draws renamed.
        new.draws = {}
        for name, value in fit.draws.items():
            if name in axes:
                value = value.index_select(axes[name] + 2, index.to(value.device))
            elif name in discrete:
                value = inverse.to(value.device)[value.long()].to(value.dtype)
            new.draws[name] = value
    if fit.kind == "mixture":
        internal = fit._internal
        new._internal = MixtureParams(
            internal.weights[index],
            fit.family.select(internal.components, index),
            internal.active[index],
        )
        new._reordered(index)
        if fit._labels is not None:  # a streamed fit's are computed from its parameters
            new.labels = inverse[fit._labels]
        return new
    new._values = permute_components(fit._values, permutation, axes)
    new.marginals = {
        name: value[..., index] if name in discrete else value
        for name, value in fit.marginals.items()
    }
    return new


def align_fits(
    fits: Mapping[Any, Any], reference: Any = None, *, per_draw: bool = False
) -> dict[Any, Any]:
    """Put the components of several fits of one model in one order.

    Args:
        fits: ``{label: fit}``.
        reference: the fit whose order the others adopt (default: the first fit).
        per_draw: align every draw of the fits that have draws, not just every chain.

    Returns:
        ``{label: aligned fit}`` (see :func:`align`); a fit whose component axes cannot
        be told (a Pyro program without a ``"components"`` plate) is returned as it is.
    """
    labelled = dict(fits)
    if not labelled:
        return labelled
    anchor = next(iter(labelled.values())) if reference is None else reference
    aligned = {}
    for label, fit in labelled.items():
        try:
            axes = component_axes(fit)
        except SpecError:
            aligned[label] = fit
            continue
        aligned[label] = fit if fit is anchor else align(fit, anchor, axes=axes, per_draw=per_draw)
    return aligned
