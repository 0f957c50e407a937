"""The gradient M-step of a Pyro program fit (ECME) runs the program lightly: after the
first trace, every run is a compiled one (the end point's validity check included, and
its E-step serves the next iteration), and the fit reaches the optimum that L-BFGS
finds on Pyro's own ``TraceEnum_ELBO`` loss."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.distributions import biject_to

import pyroem
from pyroem.model.program import ProgramModel
from tests.engines.test_program_short_runs import _counts
from tests.engines.test_pyro_examples import pyro_log_joint, zero_inflated_mixture


def _start() -> dict[str, torch.Tensor]:
    return {
        "weights": torch.tensor([0.5, 0.5]),
        "rates": torch.tensor([1.0, 6.0]),
        "gate": torch.tensor(0.3),
    }


def _pyro_optimum(counts: torch.Tensor, constraints: dict[str, Any]) -> float:
    """The highest log joint L-BFGS reaches on Pyro's loss from the same start, in the
    unconstrained coordinates (no Jacobian: the fit is in the constrained space)."""
    transforms = {name: biject_to(constraint) for name, constraint in constraints.items()}
    leaves = [
        transforms[name].inv(value).detach().requires_grad_() for name, value in _start().items()
    ]
    optimizer = torch.optim.LBFGS(
        leaves,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def values() -> dict[str, torch.Tensor]:
        return {name: transforms[name](u) for name, u in zip(transforms, leaves, strict=True)}

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = -pyro_log_joint(zero_inflated_mixture, values(), 1, counts)
        value.backward()
        return value

    for _ in range(3):
        optimizer.step(loss)
    with torch.no_grad():
        return float(pyro_log_joint(zero_inflated_mixture, values(), 1, counts))


def test_gradient_m_steps_run_no_full_trace_and_reach_pyros_optimum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.set_default_dtype(torch.float64)
    counts = _counts()
    traces = []
    trace = ProgramModel.trace

    def counted(self: ProgramModel, *args: Any, **kwargs: Any) -> Any:
        traces.append(True)
        return trace(self, *args, **kwargs)

    monkeypatch.setattr(ProgramModel, "trace", counted)
    fit = pyroem.fit(zero_inflated_mixture, counts, init=_start(), tol=1e-10, max_iter=500)
    monkeypatch.undo()
    assert fit.m_step_kinds["rates"] == "gradient" and fit.m_step_kinds["gate"] == "gradient"
    assert fit.num_iterations >= 3
    # One full trace: the setup's first (the gradient M-steps' checks ran compiled).
    assert len(traces) == 1
    objective = fit.history.objective
    assert bool((objective[1:] >= objective[:-1]).all())
    expected = float(pyro_log_joint(zero_inflated_mixture, fit.params, 1, counts))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    constraints = {name: site.constraint for name, site in fit.program.params.items()}
    assert fit.log_joint() == pytest.approx(_pyro_optimum(counts, constraints), rel=1e-8)


def test_an_ecme_step_takes_a_gain_above_its_tolerance_on_a_shallow_start():
    """The tolerance of an ECME step is a gain of the objective: a start whose slope is
    below it, but whose optimum lies far above it, is still climbed (torch's own
    ``tolerance_change`` also bounds the slope, and at this tolerance froze the block)."""
    from types import SimpleNamespace

    from torch.distributions import constraints

    from pyroem.mstep.gradient import ecme_m_step

    site = SimpleNamespace(constraint=constraints.real)
    program: Any = SimpleNamespace(params={"x": site}, module_params={})
    curvature, optimum = 1e-3, 100.0

    def objective(values: dict[str, torch.Tensor], validate: bool = False) -> torch.Tensor:
        # Slope 0.1 at x = 0, a gain of 5 at the optimum.
        return -0.5 * curvature * (values["x"] - optimum) ** 2

    start = {"x": torch.tensor(0.0, dtype=torch.float64)}
    step = ecme_m_step(program, start, ["x"], objective, max_steps=50, tolerance=0.1)
    assert step is not None
    # The exact maximiser of the quadratic, to L-BFGS's precision on it.
    assert float(step["x"]) == pytest.approx(optimum, abs=1e-6)
