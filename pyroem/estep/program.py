r"""The exact E-step on any enumerable Pyro program.

The log joint of the program with discrete latents summed out is a tensor
contraction of factor tables (Pyro's ``contract_to_tensor``: sum over enumerated
dimensions, product over plates):

.. math:: \log p(x, θ) = \log \sum_z \prod_f φ_f(z; θ) + \log p(θ).

Its gradient with respect to the table :math:`\log φ_f` is the posterior marginal
:math:`μ_f` of that factor's configurations — forward–backward is backprop — so one
backward pass gives every responsibility and every pairwise marginal, and

.. math:: Q(θ; θ_t) = \sum_f \sum_c μ_f(c; θ_t)\, \log φ_f(c; θ) + \log p(θ)

is exact. Scales (``poutine.scale``) and masks (``poutine.mask``) are folded into
the weights :math:`μ_f`, so ``Q`` is the plain weighted sum of log-probability tables.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, NamedTuple

import pyro.poutine as poutine
import torch
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor

from pyroem.errors import NotSupportedError
from pyroem.estep.log_einsum import LogRing
from pyroem.model.program import ProgramModel, sample_sites

__all__ = [
    "Posterior",
    "common_scale",
    "expected_log_joint",
    "log_joint_terms",
    "mask_reads_latents",
    "posterior",
]


class Posterior(NamedTuple):
    """The E-step at θ_t.

    Attributes:
        log_likelihood: :math:`\\log p(x | θ_t)`, discrete latents summed out (0-dim).
        log_joint: ``log_likelihood`` plus the log prior of the sample-site parameters.
        weights: per sample site, the weight of each entry of its log-probability
            table in Q, the shape of the site's ``log_prob`` (enumerated dimensions
            included): posterior marginal × scale × mask, or scale × mask for a
            parameter's own prior.
        marginals: per enumerated site, posterior probabilities of its values,
            ``(*value_shape, num_values)``.
        trace: the trace at θ_t.
    """

    log_likelihood: torch.Tensor
    log_joint: torch.Tensor
    weights: dict[str, torch.Tensor]
    marginals: dict[str, torch.Tensor]
    trace: poutine.Trace


def site_scale(site: Any) -> float:
    """The site's scalar ``poutine.scale`` as a float.

    Raises:
        NotSupportedError: the scale is a tensor with dimensions.
    """
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        if scale.dim():
            raise NotSupportedError(
                f"site {site['name']!r} has a tensor-valued poutine.scale; pyroem supports "
                "scalar scales only"
            )
        return float(scale)
    return float(scale)


def common_scale(scales: set[float]) -> float:
    """The one ``poutine.scale`` of the sites that depend on enumerated latents (1 if
    there are none): the contraction multiplies its result by a single scale.

    Raises:
        NotSupportedError: the sites have different scales.
    """
    if len(scales) > 1:
        raise NotSupportedError(
            "sites that depend on enumerated latents have different poutine.scale "
            f"values {sorted(scales)}; pyroem needs one common scale"
        )
    return scales.pop() if scales else 1.0


def masked_log_prob(site: Any, log_prob: torch.Tensor) -> torch.Tensor:
    """``log_prob`` with the entries the site's ``poutine.mask`` turns off set to 0."""
    mask = site["mask"]
    if mask is None or mask is True:
        return log_prob
    if mask is False:
        return torch.zeros_like(log_prob)
    return torch.where(mask, log_prob, torch.zeros((), dtype=log_prob.dtype))


def _enum_symbols(trace: poutine.Trace) -> set[str]:
    return {
        site["infer"]["_enumerate_symbol"]
        for _, site in sample_sites(trace)
        if site["infer"].get("_enumerate_symbol") is not None
    }


def mask_reads_latents(site: Any, enum_symbols: set[str]) -> bool:
    """Does the site's ``poutine.mask`` depend on an enumerated latent (``mask=(z == k)``)?
    Then the masked table, not the site's own, is the factor of the contraction."""
    mask = site.get("packed", {}).get("mask")
    dims = getattr(mask, "_pyro_dims", "")
    return isinstance(mask, torch.Tensor) and not enum_symbols.isdisjoint(dims)


def log_joint_terms(
    program: ProgramModel,
    trace: poutine.Trace,
    log_probs: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contract the program's log-probability tables to the log joint.

    Args:
        program: the program.
        trace: a trace from :meth:`ProgramModel.trace`.
        log_probs: the unscaled, unmasked ``log_prob`` table of every sample site
            (replaceable by leaves so that their gradients are the weights; default:
            the trace's own).

    Returns:
        ``(log_likelihood, log_prior)``, both 0-dim.
    """
    if log_probs is None:
        log_probs = {name: site["unscaled_log_prob"] for name, site in sample_sites(trace)}
    enum_symbols = _enum_symbols(trace)
    log_factors: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
    # Python zeros, not tensors of torch's default dtype: the sums keep the program's dtype.
    log_prior: torch.Tensor | float = 0.0
    log_likelihood: torch.Tensor | float = 0.0
    scales = set()
    for name, site in sample_sites(trace):
        scale = site_scale(site)
        # As in Pyro's TraceEnum_ELBO, an enumerated site's own table is never masked:
        # masked it would be 0 for every value and add log(num_values) to the evidence.
        enumerated = site["infer"].get("_enumerate_symbol") is not None
        term = log_probs[name] if enumerated else masked_log_prob(site, log_probs[name])
        if name in program.params:
            log_prior = log_prior + scale * term.sum()
            continue
        # The trace already packed its own table: its symbols say which latents it reads.
        own = site["packed"]["unscaled_log_prob"]._pyro_dims
        if enum_symbols.isdisjoint(own) and not mask_reads_latents(site, enum_symbols):
            log_likelihood = log_likelihood + scale * term.sum()
            continue
        term_packed = packed.pack(term, site["infer"]["_dim_to_symbol"])
        ordinal = frozenset(
            trace.plate_to_symbol[frame.name]
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        )
        log_factors.setdefault(ordinal, []).append(term_packed)
        scales.add(scale)
    if log_factors:
        scale = common_scale(scales)
        contracted = contract_to_tensor(log_factors, set(enum_symbols), ring=LogRing())
        log_likelihood = log_likelihood + scale * contracted.sum()
    dtype = next(
        (term.dtype for term in (log_likelihood, log_prior) if isinstance(term, torch.Tensor)),
        torch.get_default_dtype(),
    )
    return torch.as_tensor(log_likelihood, dtype=dtype), torch.as_tensor(log_prior, dtype=dtype)


def site_marginal(program: ProgramModel, site: Any, weight: torch.Tensor) -> torch.Tensor:
    """Sum a site's factor weights down to the marginal of its own value, shaped like
    the value would be without enumeration (its plates' dimensions, size-1 ones too)."""
    nesting = program.max_plate_nesting
    enum_dim = site["infer"]["_enumerate_dim"]
    others = [d for d in range(-weight.dim(), -nesting) if d != enum_dim]
    if others:
        weight = weight.sum(others, keepdim=True)
    weight = weight.movedim(enum_dim, -1)
    plate_dims = [-frame.dim for frame in site["cond_indep_stack"] if frame.vectorized]
    kept = max(plate_dims, default=0)
    # Dimensions left of the site's plates are all size 1 by now.
    batch = weight.shape[weight.dim() - 1 - kept : -1] if kept else ()
    return weight.reshape(*batch, weight.shape[-1]) / site_scale(site)


def posterior(
    program: ProgramModel, values: Mapping[str, torch.Tensor], trace: Any = None
) -> Posterior:
    """The exact E-step at parameters ``values``.

    Args:
        program: the program.
        values: a value for every parameter site (constrained).
        trace: the program's trace at ``values``, if already run.

    Returns:
        A :class:`Posterior`.
    """
    if trace is None:
        trace = program.trace({name: value.detach() for name, value in values.items()})
    sites = sample_sites(trace)
    leaves = {
        name: site["unscaled_log_prob"].detach().requires_grad_()
        for name, site in sites
        if name not in program.params
    }
    param_terms = {
        name: site["unscaled_log_prob"].detach() for name, site in sites if name in program.params
    }
    with torch.enable_grad():
        log_likelihood, log_prior = log_joint_terms(program, trace, {**leaves, **param_terms})
        grads = torch.autograd.grad(
            log_likelihood, list(leaves.values()), allow_unused=True, materialize_grads=True
        )
    weights = dict(zip(leaves, grads, strict=True))
    for name, term in param_terms.items():
        site = trace.nodes[name]
        weights[name] = masked_log_prob(site, torch.full_like(term, site_scale(site)))
    marginals = {
        name: site_marginal(program, trace.nodes[name], weights[name])
        for name in program.enumerated
        if name in weights
    }
    # A masked discrete latent is absent (padding, say): its own table leaves Q, so a
    # chain's transitions past a sequence's end do not count. Exact EM as long as no
    # unmasked site depends on a masked latent.
    for name in marginals:
        weights[name] = masked_log_prob(trace.nodes[name], weights[name])
    log_likelihood = log_likelihood.detach()
    return Posterior(log_likelihood, log_likelihood + log_prior.detach(), weights, marginals, trace)


def expected_log_joint(
    program: ProgramModel,
    values: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    validate: bool = False,
    priors: bool = True,
) -> torch.Tensor:
    """``Q(θ; θ_t)`` up to a constant: weighted log-probability tables plus log prior.

    Differentiable in ``values``. ``validate``: with Pyro's argument validation
    (``ValueError`` where a distribution's argument is outside its constraint).
    ``priors=False`` leaves out the parameters' own prior terms (the ranks of a
    distributed fit other than rank 0, which counts them once).
    """
    trace = program.trace(values, validate)
    enum_symbols = _enum_symbols(trace)
    total = torch.zeros(())
    for name, site in sample_sites(trace):
        if not priors and name in program.params:
            continue
        table = site["unscaled_log_prob"]
        # A mask that reads a latent is already in the weights (the posterior of its value).
        if not mask_reads_latents(site, enum_symbols):
            table = masked_log_prob(site, table)
        total = total + (weights[name] * table).sum()
    return total
