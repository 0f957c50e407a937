r"""EM invariants of MAP-EM: monotone ascent of the log joint and a tight E-step bound.

For MAP-EM the objective is :math:`\log p(x, θ)`. It never decreases from one
iteration to the next (up to floating-point rounding), and after each E-step the
bound :math:`\mathcal{L}(q, θ) = E_q[\log p(x, z, θ)] + H(q)` equals it. The
reference densities below are written independently with ``torch.distributions``
(and ``pyroem.InverseWishart``, checked against SciPy in ``test_inverse_wishart.py``),
with each default prior resolved from its documentation.
"""

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributions as td
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from reference_densities import component_log_prob, weak_gaussian_prior
from reference_densities import log_prior as reference_log_prior

import pyroem

DTYPE = torch.float64
CASES = {
    "gaussian-full": ("gaussian", "full"),
    "gaussian-diag": ("gaussian", "diag"),
    "gaussian-spherical": ("gaussian", "spherical"),
    "gaussian-tied": ("gaussian", "tied"),
    "poisson": ("poisson", None),
    "exponential": ("exponential", None),
    "bernoulli": ("bernoulli", None),
    "categorical": ("categorical", None),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The fits here are tiny: thread hand-offs would cost more than the algebra."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _is_monotone(objective: np.ndarray) -> bool:
    """No decrease beyond floating-point rounding of the objective's magnitude."""
    slack = 1e-9 * (1 + np.abs(objective[:-1]))
    return bool((np.diff(objective) >= -slack).all())


# ----- monotone ascent: a property over random data, sizes and seeds -------------


@pytest.mark.parametrize("prior", ["default", None], ids=["default-prior", "flat"])
@pytest.mark.parametrize("case", list(CASES))
@settings(deadline=None, max_examples=25, derandomize=True)
@example(  # a redundant component whose weight halves each step down to ~1e-17
    seed=3,
    num_components=3,
    num_data=10,
    dim=3,
    init="kmeans++",
    weights_prior=1.0,
    chunk_size=7,
)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_components=st.integers(1, 4),
    num_data=st.integers(10, 150),
    dim=st.integers(1, 3),
    init=st.sampled_from(["kmeans++", "random", "random_from_data"]),
    weights_prior=st.sampled_from([1.0, 2.0]),
    chunk_size=st.sampled_from([7, 65536]),
)
def test_objective_never_decreases(
    case: str,
    prior: Any,
    seed: int,
    num_components: int,
    num_data: int,
    dim: int,
    init: str,
    weights_prior: float,
    chunk_size: int,
) -> None:
    family, covariance_type = CASES[case]
    spec = pyroem.Mixture(
        num_components,
        family=family,
        covariance_type=covariance_type,
        weights_prior=weights_prior,
        prior=prior,
    )
    data, _ = spec.simulate(num_data, seed=seed, dim=dim)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
            # With weights_prior >= 1 the log joint is bounded: no component may collapse.
            warnings.simplefilter("error", pyroem.CollapsedComponentWarning)
            fit = pyroem.fit(
                spec, data, init=init, seed=seed, tol=1e-9, max_iter=60, chunk_size=chunk_size
            )
    except pyroem.PyroEMError as error:
        # Maximum likelihood may legitimately degenerate (SingularCovarianceError, or a
        # PyroEMError for a component on too few points); with a prior nothing may fail,
        # and errors about the input never may.
        if prior is not None or isinstance(error, pyroem.DataError | pyroem.SpecError):
            raise
        event(f"flat fit degenerated: {type(error).__name__}")
        return
    history = fit.history
    assert np.isfinite(history.objective).all()
    assert np.isfinite(history.log_likelihood).all()
    assert _is_monotone(history.objective), np.diff(history.objective).min()
    assert fit.log_joint() == history.objective[-1]
    assert math.isclose(fit.log_likelihood(), history.log_likelihood[-1], rel_tol=1e-12)
    for name, value in fit.params.items():
        assert not bool(torch.isnan(value).any()), name
    assert math.isclose(float(fit.params["weights"].sum()), 1.0, rel_tol=1e-12)
    if prior is None and weights_prior == 1.0:
        # Everything flat: the objective is the log-likelihood plus the constant
        # log Dirichlet(π | α = 1) = log Γ(K).
        offset = history.objective - history.log_likelihood
        np.testing.assert_allclose(offset, math.lgamma(num_components), rtol=0, atol=1e-9)


# ----- the tight bound: objective = log-likelihood + log prior at every θ_t -------


def _default_prior(
    family: str, covariance_type: str | None, data: torch.Tensor, num_components: int
) -> dict[str, Any]:
    """Each family's default prior, resolved as its documentation states."""
    mean = data.mean(0)
    if family == "gaussian":
        assert covariance_type is not None
        return weak_gaussian_prior(covariance_type, data, num_components)
    if family == "poisson":
        return {"concentration": 1 + 0.1 * mean, "rate": torch.full_like(mean, 0.1)}
    if family == "exponential":
        return {"concentration": torch.full_like(mean, 1.1), "rate": 0.1 * mean}
    if family == "bernoulli":
        return {"concentration1": torch.full_like(mean, 1.1), "concentration0": 1.1}
    return {"concentration": torch.full((int(data.max()) + 1,), 1.1, dtype=DTYPE)}


def _lower_bound(table: torch.Tensor, posterior: torch.Tensor, log_prior: torch.Tensor) -> float:
    """``L(q, θ) = Σ_nk q_nk [log π_k + log p(x_n|θ_k) − log q_nk] + log p(θ)``."""
    entropy_terms = torch.special.xlogy(posterior, posterior)
    return float((posterior * table).sum() - entropy_terms.sum() + log_prior)


@pytest.mark.parametrize("case", list(CASES))
def test_bound_is_tight_after_each_e_step(case: str) -> None:
    """History entry ``t`` is ``log p(x | θ_t) + log p(θ_t)``, and the E-step bound
    ``L(q_t, θ_t)`` with ``q_t = p(z | x, θ_t)`` equals it; the bound is a bound
    (``L(q_{t-1}, θ_t) ≤ log p(x, θ_t)``) that the M-step raises
    (``L(q_{t-1}, θ_t) ≥ L(q_{t-1}, θ_{t-1})``)."""
    family, covariance_type = CASES[case]
    num_components, num_steps = 3, 6
    alpha = torch.tensor([1.0, 2.0, 1.5], dtype=DTYPE)
    spec = pyroem.Mixture(
        num_components, family=family, covariance_type=covariance_type, weights_prior=alpha
    )
    data, _ = spec.simulate(90, seed=5, dim=2)
    prior = _default_prior(family, covariance_type, data, num_components)

    def run(max_iter: int) -> pyroem.FitResult:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
            return pyroem.fit(spec, data, init="random", seed=7, tol=0.0, max_iter=max_iter)

    history = run(num_steps).history
    assert len(history.objective) == num_steps + 1
    assert _is_monotone(history.objective)
    previous: tuple[torch.Tensor, float] | None = None
    for step in range(num_steps + 1):
        params = run(step).params
        table = params["weights"].log() + component_log_prob(family, covariance_type, data, params)
        log_prior = td.Dirichlet(alpha).log_prob(params["weights"]) + reference_log_prior(
            family, covariance_type, prior, params
        )
        log_likelihood = float(torch.logsumexp(table, -1).sum())
        objective = history.objective[step]
        assert math.isclose(history.log_likelihood[step], log_likelihood, rel_tol=1e-10)
        assert math.isclose(
            objective - history.log_likelihood[step],
            float(log_prior),
            abs_tol=1e-8 * (1 + abs(objective)),
        )
        posterior = torch.softmax(table, -1)
        assert math.isclose(_lower_bound(table, posterior, log_prior), objective, rel_tol=1e-10)
        if previous is not None:
            stale_posterior, stale_bound = previous
            bound = _lower_bound(table, stale_posterior, log_prior)
            assert bound <= objective + 1e-9 * abs(objective)
            assert bound >= stale_bound - 1e-9 * abs(stale_bound)
        previous = (posterior, objective)


@pytest.mark.parametrize(
    "case",
    [
        "gaussian-full",
        "gaussian-diag",
        "gaussian-spherical",
        "gaussian-tied",
        "poisson",
        "exponential",
    ],
)
def test_empty_component_takes_the_prior_mode(case: str) -> None:
    """A component no datum reaches (its responsibilities underflow to exactly 0) is
    not an error under a prior: with ``α = 2`` its weight is ``(0 + α − 1) / (N + K(α − 1))``
    and its parameters are the prior mode; EM goes on, monotone."""
    family, covariance_type = CASES[case]
    num_data, num_components = 100, 3
    spec = pyroem.Mixture(
        num_components, family=family, covariance_type=covariance_type, weights_prior=2.0
    )
    data, truth = spec.simulate(num_data, seed=11, dim=2)
    init = {name: value.clone() for name, value in truth.items() if name != "assignment"}
    if family == "gaussian":
        init["means"][2] = 1e3
    else:
        init["rates"][2] = 1e4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        first = pyroem.fit(spec, data, init=init, tol=0.0, max_iter=1)
        fit = pyroem.fit(spec, data, init=init, tol=1e-8, max_iter=200)
    assert math.isclose(
        float(first.params["weights"][2]), 1 / (num_data + num_components), rel_tol=1e-12
    )
    mean = data.mean(0)
    if family == "gaussian":
        torch.testing.assert_close(first.params["means"][2], mean)
    elif family == "poisson":
        # Gamma(1 + 0.1·mean, 0.1) has its mode at the data mean.
        torch.testing.assert_close(first.params["rates"][2], mean)
    else:
        # Gamma(1.1, 0.1·mean) has its mode at 1 / mean.
        torch.testing.assert_close(first.params["rates"][2], 1 / mean)
    assert fit.removed_components == []
    assert np.isfinite(fit.history.objective).all()
    assert _is_monotone(fit.history.objective)
