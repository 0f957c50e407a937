"""The closed-form MAP M-step of a declarative mixture."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from pyroem.em import Engine, EStepResult, MStepResult
from pyroem.engines.distributed import LOCAL, Collective
from pyroem.engines.initialization import initial_params
from pyroem.errors import CollapsedComponentWarning
from pyroem.fits.checkpoint import to_device
from pyroem.model.families import Family
from pyroem.model.mixture import Mixture, MixtureParams
from pyroem.mstep.conjugate import dirichlet_mode

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


class MixtureEngine(Engine):
    """MAP-EM on a ``Mixture``: the Mixture's initialisation, an exact E-step (its
    subclasses set it: data in memory, or read from a source), the closed-form M-step
    and the stopping rule.

    Attributes:
        spec: the mixture; family: its bound family.
        estep: the exact E-step.
        init_data: the rows the initialisation reads (the data, or a sample of a source).
        start: the ``init`` option; generator: the restarts' random generator.
        parameter_rule: stop on the parameters too (``stop_rule="parameters"``), not on
            the objective alone.
        collective: combines the ranks' E-steps of a distributed fit
            (:mod:`pyroem.engines.distributed`); the estep then reads this rank's shard.
    """

    spec: Mixture
    family: Family
    estep: Callable[[MixtureParams], EStepResult]
    init_data: torch.Tensor
    start: Any
    generator: torch.Generator
    parameter_rule = True
    collective: Collective = LOCAL

    def init(self, restart: int) -> MStepResult:
        start = initial_params(self.spec, self.family, self.init_data, self.start, self.generator)
        return MStepResult(self.collective.broadcast(start))

    def e_step(self, params: Any) -> EStepResult:
        return self.collective.reduce(self.estep(params))

    def m_step(self, stats: Any, params: Any, iteration: int) -> MStepResult:
        new = mixture_m_step(self.family, self.spec.weights_prior, stats, params)
        return MStepResult(new, None, {"change": relative_change(params, new)})

    def snapshot(self, params: MixtureParams) -> dict[str, Any]:
        """The parameters (never changed in place) and the restarts' generator."""
        return {"params": params, "generator": self.generator.get_state()}

    def restore(self, snapshot: dict[str, Any], restart: int) -> MixtureParams:
        self.generator.set_state(snapshot["generator"])
        params: MixtureParams = to_device(snapshot["params"], self.init_data)
        return params

    def converged(self, objectives: list[float], info: list[Any], tol: float) -> bool:
        r"""The objective rule, and the parameters within ``tol`` of their limit: with
        :math:`δ_t` the largest relative parameter change of iteration ``t`` and
        :math:`r = δ_t / δ_{t-1}` EM's linear rate, the Aitken-extrapolated distance
        :math:`δ_t\, r / (1 - r) < \text{tol}` (a flat objective alone stops EM early)."""
        objective = super().converged(objectives, info, tol)
        if not objective or not self.parameter_rule:
            return objective
        change, before = info[-1]["change"], info[-2].get("change", math.nan)
        # A zero change is below round-off (see relative_change): no rate to estimate.
        if change == 0 or before == 0 or math.isnan(before):
            return change < tol
        rate = change / before
        return rate < 1 and change * rate / (1 - rate) < tol


def relative_change(old: MixtureParams, new: MixtureParams) -> float:
    """Largest change of any parameter array relative to the array's largest entry
    (``inf`` when a component was removed; 0 below the dtype's round-off)."""
    if old.weights.shape != new.weights.shape:
        return math.inf
    pairs = [(old.weights, new.weights), *zip(old.components, new.components, strict=True)]
    change = max(
        float((b - a).abs().max() / b.abs().max().clamp(min=torch.finfo(b.dtype).tiny))
        for a, b in pairs
    )
    return 0.0 if change < 10 * torch.finfo(new.weights.dtype).eps else change
