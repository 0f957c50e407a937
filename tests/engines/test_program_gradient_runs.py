"""The gradient M-step of a Pyro program fit (ECME) runs the program lightly: after the
first trace, every run is a compiled one (the end point's validity check included, and
its E-step serves the next iteration), and the fit reaches the optimum that L-BFGS
finds on Pyro's own ``TraceEnum_ELBO`` loss."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import biject_to, constraints

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


def _bounded_scale_hmm(data: torch.Tensor) -> None:
    """A Gaussian HMM whose emission scale ``2 sqrt(1 - rho^2) + 0.3`` is defined for
    ``|rho| <= 1`` only, with ``rho`` declared real: L-BFGS's line search on it steps
    where the program's log joint is NaN."""
    rho = pyro.param("rho", torch.tensor(0.1, dtype=torch.float64))
    scale = (1 - rho**2).sqrt() * 2 + 0.3
    trans = pyro.param(
        "trans",
        torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64),
        constraint=constraints.simplex,
    )
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0], dtype=torch.float64))
    with pyro.plate("sequences", data.shape[0]):
        state = torch.zeros(data.shape[0], dtype=torch.long)
        for t in pyro.markov(range(data.shape[1])):
            state = pyro.sample(f"state_{t}", dist.Categorical(trans[state]))
            pyro.sample(f"x_{t}", dist.Normal(locs[state], scale), obs=data[:, t])


@pytest.mark.filterwarnings("ignore::pyroem.ConvergenceWarning")
def test_a_gradient_block_whose_line_search_leaves_the_domain_still_climbs() -> None:
    # Before: torch's strong-Wolfe search raised IndexError after its first trial step
    # (rho = 1.1, a NaN log joint), which ended the fit. Now the block starts again with
    # shorter first steps and keeps its highest finite point.
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(4, 40, generator=generator) < 0.5, -2.0, 2.0)
    data = (0.35 * torch.randn(4, 40, generator=generator) + signs).double()
    fit = pyroem.fit(_bounded_scale_hmm, data, seed=0, accelerate=None, tol=1e-9, max_iter=30)
    assert fit.m_step_kinds["rho"] == "gradient"
    objectives = np.asarray(fit.history.objective)
    assert np.all(np.diff(objectives) >= -1e-9 * np.abs(objectives[1:]))
    params = {name: value.detach() for name, value in fit.params.items()}
    expected = float(pyro_log_joint(_bounded_scale_hmm, params, 1, data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
    # Pyro's gradient at the start points to larger rho (smaller scales fit the 0.35
    # spread about each mean): rho moved that way, inside its domain.
    start = {**params, "rho": torch.tensor(0.1, dtype=torch.float64).requires_grad_()}
    pyro_log_joint(_bounded_scale_hmm, start, 1, data).backward()
    assert float(start["rho"].grad) > 0
    assert 0.5 < float(fit.params["rho"]) < 1.0
