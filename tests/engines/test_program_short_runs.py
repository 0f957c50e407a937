"""map-em's short runs (em-EM's start) stop once three agree, and programs with only
``pyro.param`` sites start from short runs too; each checked against L-BFGS on Pyro's
own ``−TraceEnum_ELBO`` from starts drawn by a generator of its own."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

import pyroem
from pyroem.engines import program_map
from tests.engines.test_program_default_start import (
    _pyro_optimum,
    _pyro_param_optimum,
    _uniform_starts,
)
from tests.engines.test_pyro_examples import (
    HIDDEN,
    _tone_data,
    pyro_log_joint,
    second_order_hmm,
)


def test_run_limit_is_exact_on_a_geometric_run() -> None:
    """A run converging linearly, ``f_k = c - a r^k``, is heading to ``c``: Aitken's Δ²
    recovers it from three values when ``r`` is under the cap, and lies at most
    ``cap / (1 - cap)`` last gains on above it."""
    c, a = -12.5, 3.0
    for rate in (0.3, 0.5, 0.8):
        run = [c - a * rate**k for k in range(6)]
        assert program_map.run_limit(run) == pytest.approx(c, rel=1e-12)
    slow = [c - a * 0.95**k for k in range(6)]
    cap = program_map.SHORT_RUN_MAX_RATE
    gain = slow[-1] - slow[-2]
    assert program_map.run_limit(slow) == pytest.approx(slow[-1] + gain * cap / (1 - cap))
    # Too short, or not increasing: the last value.
    assert program_map.run_limit([1.0, 2.0]) == 2.0
    assert program_map.run_limit([1.0, 2.0, 2.0]) == 2.0


def test_agreeing_runs_counts_the_runs_near_the_best_limit() -> None:
    limits = [-10.0, -10.05, float("nan"), -9.96, -11.0]
    assert program_map.agreeing_runs(limits, 0.1) == 3
    assert program_map.agreeing_runs(limits, 0.01) == 1
    assert program_map.agreeing_runs([float("nan")], 0.1) == 0


def _counts() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.cat(
        [
            torch.poisson(torch.full((30,), 2.0), generator=generator),
            torch.poisson(torch.full((30,), 9.0), generator=generator),
            torch.zeros(10),
        ]
    )


def poisson_mixture(counts: torch.Tensor) -> None:
    """A mixture of two Poissons whose parameters all have closed forms."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.full((2,), 2.0)))
    rates = pyro.sample("rates", dist.Gamma(2.0, 0.5).expand([2]).to_event(1))
    with pyro.plate("data", len(counts)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("n", dist.Poisson(rates[z]), obs=counts)


def test_short_runs_stop_once_three_agree_on_a_program_with_one_optimum() -> None:
    """A Poisson mixture (70 counts, one optimum up to relabelling): the short runs stop
    after three (before the rule: all 20), and the fit still reaches the best of 4 L-BFGS
    runs on Pyro's own log joint. (This test used the zero-inflated mixture, whose
    gradient M-steps now start from the prior draw: test_program_gradient_start.py.)"""
    torch.set_default_dtype(torch.float64)
    counts = _counts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        pyro.clear_param_store()
        fit = pyroem.fit(poisson_mixture, counts, seed=0, tol=1e-10)
    assert fit.options["start"] == "short runs"
    assert len(fit.options["short_run_objectives"]) == program_map.SHORT_RUNS_AGREE
    supports = {"weights": constraints.simplex, "rates": constraints.positive}
    shapes = {"weights": (2,), "rates": (2,)}
    starts = _uniform_starts(supports, shapes, 4)
    reference = _pyro_optimum(poisson_mixture, (counts,), 1, supports, starts, jacobian=False)
    assert float(fit.history.objective[-1]) >= reference - 1e-6 * abs(reference)
    expected = float(pyro_log_joint(poisson_mixture, dict(fit.params), 1, counts))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_a_program_of_pyro_params_only_starts_from_short_runs() -> None:
    """hmm.py's model_6 (a second-order HMM whose parameters are all ``pyro.param``
    sites) on 4 sequences × 12 steps × 5 tones. Before, it had no short runs: map-em
    from the program's own initial values stopped at −96.76, below L-BFGS on Pyro's
    objective from that same start. Now its short runs redraw the ``pyro.param`` sites
    uniformly in their unconstrained coordinates, and the fit ends at least as high as
    the best of L-BFGS from the program's start and from 4 draws of its own."""
    torch.set_default_dtype(torch.float64)
    data = _tone_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        pyro.clear_param_store()
        torch.manual_seed(0)
        fit = pyroem.fit(second_order_hmm, *data, seed=0)
        pyro.clear_param_store()
        torch.manual_seed(0)
        start = pyroem.fit(second_order_hmm, *data, seed=0, max_iter=0).params
    assert fit.options["start"] == "short runs"
    supports = {"probs_x": constraints.simplex, "probs_y": constraints.unit_interval}
    shapes = {"probs_x": (HIDDEN, HIDDEN, HIDDEN), "probs_y": (HIDDEN, data[0].shape[-1])}
    starts = [dict(start), *_uniform_starts(supports, shapes, 4)]
    reference = max(_pyro_param_optimum(second_order_hmm, data, 2, supports, one) for one in starts)
    assert float(fit.history.objective[-1]) >= reference - 1e-6 * abs(reference)
    expected = float(pyro_log_joint(second_order_hmm, dict(fit.params), 2, *data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)
