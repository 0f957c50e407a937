r"""The gradient M-step (generalized EM) for blocks without a closed form.

L-BFGS maximises :math:`Q(θ; θ_t)` over the block's sites in the unconstrained
space (:func:`pyroem.transforms.unconstraining` of each site's support; for
covariance matrices the log-Cholesky entries), the other blocks held fixed. The
step is accepted only if Q increased, so the log joint never decreases: this is
generalized EM, and with enough inner steps it converges to the same fixed
points as exact EM.
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

    def objective(candidate: Mapping[str, torch.Tensor]) -> torch.Tensor:
        full = {**values, **candidate}
        q = expected_log_joint(program, full, weights)
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
        candidate = {
            name: constrained(name, u).detach().clone()
            for name, u in zip(names, unconstrained, strict=True)
        }
        try:
            after = float(objective(candidate))
        except (ValueError, RuntimeError):
            after = -math.inf
    if math.isfinite(after) and after >= before:
        return candidate
    return {name: values[name] for name in names}
