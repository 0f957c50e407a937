"""The closed-form MAP M-step of a declarative mixture."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from pyroem.errors import CollapsedComponentWarning
from pyroem.mstep.conjugate import dirichlet_mode
from pyroem.spec.families import Family
from pyroem.spec.mixture import MixtureParams

__all__ = ["mixture_m_step"]


def mixture_m_step(
    family: Family, weights_prior: torch.Tensor, stats: Any, params: MixtureParams
) -> MixtureParams:
    r"""Maximise ``Q(θ; θ_t) + log p(θ)`` in closed form.

    Weights: the Dirichlet mode ``π_k ∝ max(N_k + α_k − 1, 0)``. A component whose
    ``N_k + α_k − 1 ≤ 0`` (possible only with ``α_k < 1``) sits where the log joint
    is unbounded; it is removed, with a :class:`CollapsedComponentWarning`, and the
    fit goes on with the remaining components. Components: the family's conjugate
    mode from the same statistics. With ``α_k = 1`` the same happens to a component
    that no data reaches at all (``N_k = 0``). A removal changes the model, so the
    objective is monotone between removals, not across one.

    Args:
        family: the bound family.
        weights_prior: Dirichlet concentration of the original components, ``(K0,)``.
        stats: statistics of the current components (``counts`` first).
        params: the current parameters (for the ``active`` bookkeeping).
    """
    alpha = weights_prior.to(stats.counts)[params.active]
    weights = dirichlet_mode(stats.counts, alpha)
    alive = weights > 0
    if not bool(alive.all()):
        keep = torch.nonzero(alive).reshape(-1)
        removed = params.active[~alive].tolist()
        warnings.warn(
            f"component(s) {removed} collapsed: N_k + alpha_k - 1 <= 0, either because no "
            "data reaches them or because weights_prior alpha_k < 1 makes the log joint "
            f"unbounded at weight 0; they were removed and {keep.numel()} component(s) remain. "
            "Use weights_prior >= 1, or fewer components.",
            CollapsedComponentWarning,
            stacklevel=2,
        )
        stats = family.select(stats, keep)
        weights = weights[keep]
        return MixtureParams(weights, family.m_step(stats), params.active[keep])
    return MixtureParams(weights, family.m_step(stats), params.active)
