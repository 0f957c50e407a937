r"""The space MAP-EM maximises the posterior density in.

MAP is not invariant to the parameterisation: the mode of a density depends on the
coordinates it is written in. ``space="constrained"`` maximises the log joint as
the program declares it, :math:`\log p(x, θ)`. A prior whose density is unbounded
at the edge of its support — ``Beta(a, b)``, ``Dirichlet(α)`` or ``Gamma(a, ·)``
with a concentration below 1 — can make that supremum infinite: with no success
in a Bernoulli row under a ``Beta(0.1, 0.9)`` prior, ``log p`` grows without bound
as the probability goes to 0.

``space="unconstrained"`` maximises the density of the unconstrained coordinates
``u = T^{-1}(θ)`` that Pyro itself optimises in (:func:`pyroem.model.transforms.unconstraining`
of each site's support: logit, stick-breaking, log), which adds the log-Jacobian
:math:`\log|\det ∂T(u)/∂u|` of every sample site with a prior:

.. math:: \log p(x, T(u)) + \sum_{\text{sites}} \log|\det J_T(u)|

For a ``Beta(a, b)`` prior on a Bernoulli probability with ``s`` successes in
``n`` trials its mode is ``(s + a)/(n + a + b)``, for a ``Dirichlet(α)`` row
``(N_c + α_c)/(N + Σα)``, for a ``Gamma(a, b)`` rate ``(S + a)/(T + b)``: always
inside the support. ``pyro.param`` sites have no prior (maximum likelihood, the same
in every parameterisation) and get no Jacobian; nor does a sample site whose prior
is masked out entirely, nor a positive-definite matrix (torch has no bijection with a
Jacobian for it; an inverse-Wishart density is bounded anyway).

``space="auto"`` (the default) is ``"unconstrained"`` when some prior is unbounded
in this way, else ``"constrained"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro.distributions as dist
import torch

from pyroem.errors import SpecError
from pyroem.model.program import ProgramModel
from pyroem.model.transforms import constrain, needs_bijection, unconstraining

__all__ = [
    "SPACES",
    "jacobian_sites",
    "log_jacobian",
    "resolve_space",
    "unbounded_error",
    "unbounded_priors",
]

SPACES = ("auto", "constrained", "unconstrained")


def _base(fn: Any) -> Any:
    while isinstance(fn, dist.Independent | dist.ExpandedDistribution):
        fn = fn.base_dist
    return fn


def _describe(prior: Any) -> str | None:
    """The prior, if its density is unbounded at the edge of its support."""
    if isinstance(prior, dist.Beta):
        a, b = prior.concentration1, prior.concentration0
        if bool((a < 1).any()) or bool((b < 1).any()):
            return f"Beta with concentrations down to {float(torch.minimum(a, b).min()):.3g}"
    elif isinstance(prior, dist.Dirichlet | dist.Gamma):
        low = float(prior.concentration.min())
        if low < 1:
            return f"{type(prior).__name__} with concentration down to {low:.3g}"
    return None


def _prior_in_play(site: Any) -> bool:
    """Is the site's prior part of the log joint (not masked out entirely, scale > 0)?"""
    mask = site["mask"]
    if mask is not None and not bool(torch.as_tensor(mask).any()):
        return False
    return bool((torch.as_tensor(site["scale"]) != 0).any())


def unbounded_priors(program: ProgramModel, trace: Any) -> dict[str, str]:
    """Sample-site parameters whose prior density is unbounded at the edge of its support,
    with a description of the prior."""
    found = {}
    for name, param in program.params.items():
        if param.kind != "sample" or not _prior_in_play(trace.nodes[name]):
            continue
        described = _describe(_base(trace.nodes[name]["fn"]))
        if described is not None:
            found[name] = described
    return found


def _bijective(constraint: Any) -> bool:
    try:
        return not needs_bijection(constraint)
    except NotImplementedError:
        return False


def jacobian_sites(program: ProgramModel, trace: Any) -> list[str]:
    """The parameters whose log-Jacobian enters the unconstrained objective: sample sites
    whose prior is in play, on a support with a bijection torch knows (not covariance
    matrices: their sites keep the declared density)."""
    return [
        name
        for name, param in program.params.items()
        if param.kind == "sample"
        and _prior_in_play(trace.nodes[name])
        and _bijective(param.constraint)
    ]


def log_jacobian(
    program: ProgramModel, values: Mapping[str, torch.Tensor], sites: list[str]
) -> torch.Tensor:
    r"""``Σ log|det ∂T(u)/∂u|`` at ``u = T^{-1}(θ)`` over ``sites``,
    ``T^{-1} = unconstraining(support)`` (differentiable in ``values``)."""
    transforms = {name: unconstraining(name, program.params[name].constraint) for name in sites}
    return constrain(transforms, {name: transforms[name](values[name]) for name in sites})[1]


def resolve_space(space: str, program: ProgramModel, trace: Any) -> str:
    """``"constrained"`` or ``"unconstrained"`` for the option ``space``.

    Raises:
        SpecError: ``space`` is not one of :data:`SPACES`.
    """
    if space not in SPACES:
        raise SpecError(f"space must be one of {SPACES}; got {space!r}")
    if space != "auto":
        return space
    return "unconstrained" if unbounded_priors(program, trace) else "constrained"


def unbounded_error(program: ProgramModel, trace: Any) -> SpecError:
    """The error for a constrained-space fit whose objective became infinite."""
    found = unbounded_priors(program, trace)
    named = "; ".join(f"{name!r}: {prior}" for name, prior in found.items()) or "(none found)"
    return SpecError(
        "the log joint is unbounded in the declared parameterisation: a parameter reached "
        f"the edge of its support where its prior density is infinite (priors: {named}). "
        "Fit with space='unconstrained' (MAP in the unconstrained coordinates, finite for "
        "these priors; the default space='auto' picks it), or use concentrations >= 1"
    )
