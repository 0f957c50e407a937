"""The Pyro program of a ``Mixture`` declares the log joint pyroem maximises.

``spec.model(data)`` is an ordinary Pyro program. Conditioning its global sites
on a fit's parameters and letting Pyro sum out ``z`` (``TraceEnum_ELBO`` with a
guide that samples nothing) gives ``−log p(x, θ)``; it must equal
``fit.log_joint()`` for every family, covariance type and prior. The file also
checks ``spec.simulate`` (shapes, support, reproducibility, recovery of the
truth by a fit) and that the program runs under Pyro's own SVI.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.optim import PyroOptim
from pyro.poutine.util import site_is_subsample
from scipy.optimize import linear_sum_assignment

import pyroem

FAMILIES: list[tuple[str, str | None]] = [
    ("gaussian", "full"),
    ("gaussian", "diag"),
    ("gaussian", "spherical"),
    ("gaussian", "tied"),
    ("poisson", None),
    ("exponential", None),
    ("bernoulli", None),
    ("categorical", None),
]
FAMILY_IDS = [family if ct is None else f"{family}-{ct}" for family, ct in FAMILIES]


def _nothing(*args: Any, **kwargs: Any) -> None:
    """A guide with no sample sites: the ELBO is then the log joint itself."""


def _global_sites(model: Any) -> tuple[list[str], list[str]]:
    """Names of the program's latent global sample sites and of its param sites."""
    trace = poutine.trace(model).get_trace()
    samples = [
        name
        for name in trace.stochastic_nodes
        if not site_is_subsample(trace.nodes[name])
        and trace.nodes[name]["infer"].get("enumerate") is None
    ]
    params = [name for name, site in trace.nodes.items() if site["type"] == "param"]
    return samples, params


def _pyro_log_joint(spec: pyroem.Mixture, data: torch.Tensor, params: dict[str, Any]) -> float:
    """``log p(x, θ)`` of ``spec.model(data)`` at ``params``, z summed out by Pyro."""
    pyro.clear_param_store()
    model = spec.model(data, params=params)
    samples, param_sites = _global_sites(model)
    assert "weights" in samples
    assert set(samples + param_sites) == set(params), (samples, param_sites)
    for name in param_sites:
        torch.testing.assert_close(pyro.param(name).detach(), params[name], rtol=1e-12, atol=0)
    conditioned = poutine.condition(model, data={name: params[name] for name in samples})
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, _nothing)
    return -loss


def _fit(spec: pyroem.Mixture, data: torch.Tensor, **options: Any) -> pyroem.FitResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        return pyroem.fit(spec, data, **options)


PRIORS: dict[str, Any] = {
    "default": lambda family: "default",
    "flat": lambda family: None,
    "explicit": lambda family: {
        "gaussian": pyroem.NormalInverseWishart(mean_precision=0.0, dof=6.0, scale=0.5),
        "poisson": pyroem.Gamma(concentration=2.0, rate=0.5),
        "exponential": pyroem.Gamma(concentration=1.5, rate=2.0),
        "bernoulli": pyroem.Beta(concentration1=2.0, concentration0=3.0),
        "categorical": pyroem.Dirichlet(concentration=[1.5, 2.0, 1.0]),
    }[family],
}


@pytest.mark.parametrize("prior", sorted(PRIORS))
@pytest.mark.parametrize(("family", "covariance_type"), FAMILIES, ids=FAMILY_IDS)
def test_program_log_joint_equals_fit_objective(
    family: str, covariance_type: str | None, prior: str
) -> None:
    weights_prior = 3.0 if prior == "explicit" else 1.0
    spec = pyroem.Mixture(
        3,
        family,
        covariance_type=covariance_type,
        prior=PRIORS[prior](family),
        weights_prior=weights_prior,
        num_categories=3 if family == "categorical" else None,
    )
    data, truth = spec.simulate(150, seed=2, dim=3)

    fit = _fit(spec, data, seed=0, max_iter=30)
    np.testing.assert_allclose(_pyro_log_joint(spec, data, fit.params), fit.log_joint(), rtol=1e-9)
    assert fit.history.objective[-1] == pytest.approx(fit.log_joint(), rel=1e-12)

    # Away from the optimum too: the objective at θ_0 (here the truth) is the program's.
    start = {key: value for key, value in truth.items() if key != "assignment"}
    at_truth = _fit(spec, data, init=start, max_iter=0)
    np.testing.assert_allclose(
        _pyro_log_joint(spec, data, start), at_truth.history.objective[0], rtol=1e-9
    )
    if prior == "flat" and weights_prior == 1.0:
        # A flat prior leaves only log Dirichlet(π | 1) = log Γ(K) = log 2 for K = 3.
        np.testing.assert_allclose(
            fit.log_joint() - fit.log_likelihood(), math.log(2.0), rtol=1e-12
        )


def _check_support(family: str, data: torch.Tensor, num_categories: int) -> None:
    assert bool(torch.isfinite(data).all())
    if family in ("poisson", "bernoulli", "categorical"):
        assert torch.equal(data, data.round())
    if family == "poisson":
        assert bool((data >= 0).all())
    elif family == "exponential":
        assert bool((data > 0).all())
    elif family == "bernoulli":
        assert set(data.unique().tolist()) <= {0.0, 1.0}
    elif family == "categorical":
        assert bool((data >= 0).all() and (data < num_categories).all())


@pytest.mark.parametrize(("family", "covariance_type"), FAMILIES, ids=FAMILY_IDS)
def test_simulate_shapes_support_and_seed(family: str, covariance_type: str | None) -> None:
    num_categories = 4
    spec = pyroem.Mixture(
        3,
        family,
        covariance_type=covariance_type,
        num_categories=num_categories if family == "categorical" else None,
    )
    data, truth = spec.simulate(500, seed=7, dim=4)
    assert data.shape == (500, 4)
    assert data.dtype == torch.float64
    _check_support(family, data, num_categories)

    assert all(value.dtype == torch.float64 for key, value in truth.items() if key != "assignment")
    assert truth["weights"].shape == (3,)
    assert bool((truth["weights"] > 0).all())
    assert float(truth["weights"].sum()) == pytest.approx(1.0, abs=1e-12)
    assert truth["assignment"].shape == (500,)
    assert set(truth["assignment"].unique().tolist()) <= {0, 1, 2}
    expected_keys = {
        "gaussian": {"means", "covariances"},
        "poisson": {"rates"},
        "exponential": {"rates"},
        "bernoulli": {"probs"},
        "categorical": {"probs"},
    }[family]
    assert set(truth) == {"weights", "assignment"} | expected_keys
    if family == "categorical":
        assert truth["probs"].shape == (3, 4, num_categories)
        torch.testing.assert_close(truth["probs"].sum(-1), torch.ones(3, 4, dtype=torch.float64))

    again, truth_again = spec.simulate(500, seed=7, dim=4)
    assert torch.equal(data, again)
    assert torch.equal(truth["assignment"], truth_again["assignment"])
    other, _ = spec.simulate(500, seed=8, dim=4)
    assert not torch.equal(data, other)
    # The truth is a valid starting point for a fit of the same spec.
    start = {key: value for key, value in truth.items() if key != "assignment"}
    assert math.isfinite(_fit(spec, data, init=start, max_iter=0).log_joint())


# Deviation bound for an average of N independent variables in [0, 1] with variance v:
# Bernstein's inequality, |error| <= sqrt(2 v L / N) + 2 L / (3 N) with probability
# 1 - δ, L = log(2 / δ); δ = 1e-6 makes a false alarm negligible.
_LOG_TERM = math.log(2 / 1e-6)
_NUM_STANDARD_ERRORS = 5.0


def _bernstein(p: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return (2 * p * (1 - p) * _LOG_TERM / count).sqrt() + 2 * _LOG_TERM / (3 * count)


def _tolerances(
    family: str, covariance_type: str | None, truth: dict[str, torch.Tensor], num_data: int
) -> torch.Tensor:
    """Per-component, per-coordinate tolerance on the family's parameter, ``(K, ·)``.

    Counts are the expected points per component, ``N π_k``. Unbounded data: 5 standard
    errors of the complete-data maximum-likelihood estimate; probabilities: Bernstein.
    """
    counts = num_data * truth["weights"]
    if family == "gaussian":
        covariances = truth["covariances"]
        means = truth["means"]
        if covariance_type == "full":
            variances = covariances.diagonal(dim1=-2, dim2=-1)
        elif covariance_type == "tied":
            variances = covariances.diagonal().expand_as(means)
        elif covariance_type == "diag":
            variances = covariances
        else:
            variances = covariances[:, None].expand_as(means)
        return _NUM_STANDARD_ERRORS * (variances / counts[:, None]).sqrt()
    if family == "poisson":
        return _NUM_STANDARD_ERRORS * (truth["rates"] / counts[:, None]).sqrt()
    if family == "exponential":
        return _NUM_STANDARD_ERRORS * truth["rates"] / counts[:, None].sqrt()
    probs = truth["probs"].reshape(truth["probs"].shape[0], -1)
    return _bernstein(probs, counts[:, None])


RECOVERY_DIMS = {"gaussian": 3, "poisson": 10, "exponential": 20, "bernoulli": 10, "categorical": 6}
LOCATION = {
    "gaussian": "means",
    "poisson": "rates",
    "exponential": "rates",
    "bernoulli": "probs",
    "categorical": "probs",
}


@pytest.mark.parametrize(("family", "covariance_type"), FAMILIES, ids=FAMILY_IDS)
def test_fit_recovers_simulated_truth(family: str, covariance_type: str | None) -> None:
    num_data = 2000
    spec = pyroem.Mixture(3, family, covariance_type=covariance_type)
    data, truth = spec.simulate(num_data, seed=0, dim=RECOVERY_DIMS[family])
    fit = _fit(spec, data, seed=0, n_init=2)
    assert fit.converged

    name = LOCATION[family]
    estimate = fit.params[name].reshape(3, -1)
    true = truth[name].reshape(3, -1)
    tolerance = _tolerances(family, covariance_type, truth, num_data)
    standardised = (estimate[:, None, :] - true[None, :, :]) / tolerance[None, :, :]
    rows, cols = linear_sum_assignment(standardised.square().sum(-1).numpy())
    errors = (estimate[rows] - true[cols]).abs()
    assert bool((errors <= tolerance[cols]).all()), (errors / tolerance[cols]).max()

    weights = truth["weights"][cols]
    weight_tolerance = _bernstein(weights, torch.tensor(float(num_data)))
    assert bool(((fit.params["weights"][rows] - weights).abs() <= weight_tolerance).all())

    # Well separated: the fitted labels agree with the simulated assignments.
    relabel = torch.empty(3, dtype=torch.long)
    relabel[torch.as_tensor(rows)] = torch.as_tensor(cols)
    agreement = (relabel[fit.labels] == truth["assignment"]).double().mean()
    assert float(agreement) >= 0.95


@pytest.mark.parametrize(
    ("family", "covariance_type", "prior"),
    [(family, ct, "default") for family, ct in FAMILIES] + [("gaussian", "full", None)],
    ids=[*FAMILY_IDS, "gaussian-full-flat"],
)
def test_program_runs_under_pyro_svi(
    family: str, covariance_type: str | None, prior: str | None
) -> None:
    spec = pyroem.Mixture(2, family, covariance_type=covariance_type, prior=prior)
    data, _ = spec.simulate(100, seed=3, dim=2)
    model = spec.model(data)
    samples, _ = _global_sites(model)
    pyro.clear_param_store()
    guide = AutoDelta(poutine.block(model, expose=samples))
    optimizer = PyroOptim(torch.optim.Adam, {"lr": 0.05})
    svi = SVI(model, guide, optimizer, TraceEnum_ELBO(max_plate_nesting=1))
    losses = np.array([svi.step() for _ in range(25)])
    assert np.isfinite(losses).all()
    assert losses[-5:].mean() < losses[:5].mean()
