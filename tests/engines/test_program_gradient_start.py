"""The default map-em fit of a program with gradient M-steps: it starts from the prior
draw (no em-EM short runs, whose iterations each cost a program run plus L-BFGS's) and
switches to SQUAREM once plain EM slows down (``accelerate="auto"``), whose jumps stay
inside what the program accepts. Each fit is checked
against L-BFGS on Pyro's own ``−TraceEnum_ELBO`` and the program runs are counted by
wrapping the program."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pytest
import torch
from pyro.distributions import constraints

import pyroem
from tests.engines.test_program_default_start import _pyro_optimum, _uniform_starts
from tests.engines.test_program_short_runs import _counts
from tests.engines.test_pyro_examples import (
    _dp_points,
    check_real_probability_fit,
    dp_mixture,
    pyro_log_joint,
    real_probability_mixture,
    zero_inflated_mixture,
)


def _counted(model: Callable[..., None], runs: list[int]) -> Callable[..., None]:
    def counted(*args: Any) -> None:
        runs[0] += 1
        model(*args)

    return counted


def _default_fit(model: Callable[..., None], *args: Any) -> tuple[Any, int, dict[str, Any]]:
    """The default fit at seed 0 (counting the program's runs) and its start (the same
    prior draw, from a fit with ``max_iter=0``)."""
    runs = [0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        pyro.clear_param_store()
        torch.manual_seed(0)
        fit = pyroem.fit(_counted(model, runs), *args, seed=0)
        pyro.clear_param_store()
        torch.manual_seed(0)
        start = pyroem.fit(model, *args, seed=0, max_iter=0).params
    return fit, runs[0], {name: value.detach().clone() for name, value in start.items()}


def _monotone(history: Any) -> bool:
    return all(b >= a - 1e-9 * abs(a) for a, b in itertools.pairwise(history))


def test_dpmm_default_fit_starts_from_the_prior_draw_and_reaches_lbfgs() -> None:
    """The DPMM tutorial's stick-breaking mixture (200 points; the stick fractions have
    no closed form). Before, its default start ran 20 short runs (1,680 program runs
    in all) and the fit ended at -867.449. Now it runs the program at most 900 times
    (695 at the time of writing: L-BFGS's evaluations are runs too) and ends at least
    as high as L-BFGS on Pyro's objective from the same start, with Pyro's log joint."""
    torch.set_default_dtype(torch.float64)
    data = _dp_points(50)
    fit, runs, start = _default_fit(dp_mixture, data)
    assert fit.options["start"] == "prior"
    assert fit.options["accelerate"] == "auto"
    # Plain EM steps first, SQUAREM cycles once a gain is more than half the one before.
    assert 0 < fit.options["squarem_cycles"] < fit.num_iterations
    assert runs <= 900
    assert fit.converged and _monotone(fit.history.objective)
    supports = {"beta": constraints.unit_interval, "mu": constraints.real}
    reference = _pyro_optimum(dp_mixture, (data,), 1, supports, [start], jacobian=True)
    assert float(fit.history.objective[-1]) >= reference - 1e-6 * abs(reference)
    expected = float(pyro_log_joint(dp_mixture, dict(fit.params), 1, data))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)


def test_zero_inflated_default_fit_starts_from_the_prior_draw() -> None:
    """The zero-inflated Poisson mixture (70 counts; rates and gate without closed
    forms): before, three short runs and then the fit, 190 program runs; now at most
    170 (150 at the time of writing), at least as high as the best of L-BFGS on Pyro's
    log joint from the same start and from 4 uniform draws."""
    torch.set_default_dtype(torch.float64)
    counts = _counts()
    fit, runs, start = _default_fit(zero_inflated_mixture, counts)
    assert fit.options["start"] == "prior"
    assert runs <= 170
    assert fit.converged and _monotone(fit.history.objective)
    supports = {
        "weights": constraints.simplex,
        "rates": constraints.positive,
        "gate": constraints.unit_interval,
    }
    shapes = {"weights": (2,), "rates": (2,), "gate": ()}
    starts = [start, *_uniform_starts(supports, shapes, 4)]
    reference = _pyro_optimum(zero_inflated_mixture, (counts,), 1, supports, starts, jacobian=False)
    assert float(fit.history.objective[-1]) >= reference - 1e-6 * abs(reference)
    expected = float(pyro_log_joint(zero_inflated_mixture, dict(fit.params), 1, counts))
    assert fit.log_joint() == pytest.approx(expected, rel=1e-9)


def test_squarem_jumps_stay_inside_what_the_program_accepts() -> None:
    """A Bernoulli mixture whose ``pyro.param`` probabilities are declared real:
    SQUAREM extrapolates in the declared (real) coordinates, and before, a jump to
    probabilities below 0 was scored without Pyro's checks and kept (a fit ending at
    probabilities down to -0.0195). Now each jump is scored with them: the fit stays in
    [0, 1], Pyro (validating) gives its log joint, and it reaches the optimum of the
    same program with the constraints declared (closed forms) to 1e-4."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    data = torch.zeros(40, 3)
    data[20:] = (torch.rand(20, 3, generator=generator) < 0.8).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            real_probability_mixture, data, seed=0, tol=1e-10, max_iter=300, accelerate="squarem"
        )
    check_real_probability_fit(fit, data)


def test_plain_em_is_accepted_wherever_the_default_is() -> None:
    """``accelerate=None`` (plain EM) was the default; with ``"auto"`` the default, a
    ``Mixture`` fit passing ``None`` still runs (the same fit as leaving the option
    out), while ``"squarem"`` there is refused."""
    torch.set_default_dtype(torch.float64)
    data = torch.cat([torch.randn(20, 1) - 3, torch.randn(20, 1) + 3])
    spec = pyroem.Mixture(2, "gaussian")
    plain = pyroem.fit(spec, data, accelerate=None, seed=0)
    default = pyroem.fit(spec, data, seed=0)
    assert np.array_equal(plain.history.objective, default.history.objective)
    with pytest.raises(pyroem.errors.SpecError, match="accelerate does not apply"):
        pyroem.fit(spec, data, accelerate="squarem", seed=0)
