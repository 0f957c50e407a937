r"""The gradient M-step (generalized EM) for blocks without a closed form.

L-BFGS maximises :math:`Q(θ; θ_t)` over the block's sites in the unconstrained
space (:func:`pyroem.transforms.unconstraining` of each site's support; for
covariance matrices the log-Cholesky entries), the other blocks held fixed. The
step is accepted only if Q increased, so the log joint never decreases: this is
generalized EM, and with enough inner steps it converges to the same fixed
points as exact EM.

A site's support may be wider than the distribution argument it feeds (a real
``pyro.param`` used as Bernoulli or Categorical probabilities): L-BFGS can then step
where the program is invalid and the log-density, computed without validation, is
meaningless. The step is checked with Pyro's validation and, where it fails, cut back
along the segment from the old values until it passes and Q has not decreased.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch

from pyroem.program.model import ProgramModel
from pyroem.program.posterior import expected_log_joint
from pyroem.program.space import log_jacobian
from pyroem.transforms import unconstraining

__all__ = ["gradient_m_step"]


def gradient_m_step(
    program: ProgramModel,
    values: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    names: list[str],
    *,
    max_steps: int = 50,
    jacobian: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Increase Q over the sites ``names`` by L-BFGS; keep the old values if Q did not rise.

    Args:
        program: the program.
        values: current values of every parameter (constrained).
        weights: the E-step's Q weights.
        names: the sites of this block.
        max_steps: L-BFGS iterations (function evaluations are bounded at 2× that).
        jacobian: sites of the block whose log-Jacobian is part of the objective (MAP in
            the unconstrained space, :mod:`pyroem.program.space`).

    Returns:
        New values of the block's sites.
    """
    transforms = {name: unconstraining(name, program.params[name].constraint) for name in names}
    modules = program.module_params
    for name in names:
        if name in modules:
            # A network reads its own parameter: optimise that tensor in place.
            with torch.no_grad():
                modules[name].copy_(values[name])
    # Contiguous copies: L-BFGS flattens gradients with .view, which a strided value breaks.
    unconstrained = [
        modules[name]
        if name in modules
        else transforms[name](values[name].detach()).contiguous().clone().requires_grad_()
        for name in names
    ]

    jacobian_sites = [name for name in names if name in jacobian]

    def objective(candidate: Mapping[str, torch.Tensor], validate: bool = False) -> torch.Tensor:
        full = {**values, **candidate}
        q = expected_log_joint(program, full, weights, validate)
        if jacobian_sites:
            q = q + log_jacobian(program, full, jacobian_sites)
        return q

    def constrained(name: str, u: torch.Tensor) -> torch.Tensor:
        return u if name in modules else transforms[name].inv(u)

    def q_value() -> torch.Tensor:
        update = {name: constrained(name, u) for name, u in zip(names, unconstrained, strict=True)}
        return objective(update)

    with torch.no_grad():
        before = float(q_value())
    optimizer = torch.optim.LBFGS(
        unconstrained,
        lr=1.0,
        max_iter=max_steps,
        max_eval=2 * max_steps,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = -q_value()
            if torch.isfinite(loss):
                loss.backward()
        return loss

    try:
        optimizer.step(closure)
    except (ValueError, RuntimeError):
        # A step outside the model's domain (e.g. a failed Cholesky): keep the old values.
        return {name: values[name] for name in names}
    with torch.no_grad():
        start = [transforms[name](values[name].detach()) for name in names if name not in modules]
        end = [u.detach().clone() for u in unconstrained]
        old_modules = {name: values[name].detach().clone() for name in names if name in modules}
        for _ in range(_CUTBACKS):
            candidate = {
                name: constrained(name, u).detach().clone()
                for name, u in zip(names, end, strict=True)
            }
            try:
                after = float(objective(candidate, validate=True))
            except (ValueError, RuntimeError):
                after = math.nan
            if math.isfinite(after) and after >= before:
                return candidate
            if not math.isnan(after):
                # Valid but no better: L-BFGS's point is kept out.
                break
            end = _halfway(names, modules, start, end, old_modules)
    for name in names:
        if name in modules:
            with torch.no_grad():
                modules[name].copy_(values[name])
    return {name: values[name] for name in names}


# Halvings of an invalid step before the old values are kept.
_CUTBACKS = 30


def _halfway(
    names: list[str],
    modules: Mapping[str, torch.Tensor],
    start: list[torch.Tensor],
    end: list[torch.Tensor],
    old_modules: Mapping[str, torch.Tensor],
) -> list[torch.Tensor]:
    """The midpoints between the old unconstrained values and ``end``."""
    starts = iter(start)
    out = []
    for name, u in zip(names, end, strict=True):
        old = old_modules[name] if name in modules else next(starts)
        middle = (old + u) / 2
        if name in modules:
            modules[name].copy_(middle)
        out.append(middle)
    return out
