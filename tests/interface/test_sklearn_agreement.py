"""Agreement with scikit-learn: flat-prior Gaussian MAP-EM is maximum-likelihood EM.

With ``prior=None`` and the same starting parameters, every iteration of
pyroem's EM must reproduce ``sklearn.mixture.GaussianMixture(reg_covar=0)``:
the log-likelihood trace, the parameters after the same number of M-steps, and
the scores (``bic``, ``aic``, ``score_samples``, ``predict_proba``) at given
parameters. scikit-learn is run one M-step per ``fit`` call (``max_iter=1``,
``warm_start=True``); after call ``t`` its ``lower_bound_`` is the mean
log-likelihood at the parameters *before* that call's M-step, i.e. at ``θ_{t-1}``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.mixture import GaussianMixture

import pyroem
from pyroem.datasets import load_faithful, load_iris

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
RTOL = 1e-8


def _starting_params(
    data: np.ndarray, num_components: int, covariance_type: str, seed: int
) -> dict[str, np.ndarray]:
    """Random but sensible starting parameters in scikit-learn's shape convention."""
    rng = np.random.default_rng(seed)
    num_data, dim = data.shape
    rows = rng.choice(num_data, size=num_components, replace=False)
    means = data[rows] + 0.1 * rng.standard_normal((num_components, dim)) * data.std(0)
    weights = rng.dirichlet(np.full(num_components, 5.0))
    empirical = np.atleast_2d(np.cov(data.T))
    scales = rng.uniform(0.3, 0.8, size=num_components)
    if covariance_type == "full":
        covariances = scales[:, None, None] * empirical
    elif covariance_type == "diag":
        covariances = scales[:, None] * np.diag(empirical)
    elif covariance_type == "spherical":
        covariances = scales * np.diag(empirical).mean()
    else:
        covariances = 0.5 * empirical
    return {"weights": weights, "means": means, "covariances": covariances}


def _precisions(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """Inverse covariances in scikit-learn's ``precisions_init`` convention."""
    if covariance_type in ("full", "tied"):
        return np.linalg.inv(covariances)
    return 1.0 / covariances


def _precision_cholesky(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """scikit-learn's ``precisions_cholesky_``: upper factor ``U`` with ``U Uᵀ = Σ⁻¹``."""
    if covariance_type == "full":
        return np.stack([np.linalg.inv(np.linalg.cholesky(c)).T for c in covariances])
    if covariance_type == "tied":
        return np.linalg.inv(np.linalg.cholesky(covariances)).T
    return 1.0 / np.sqrt(covariances)


def _sklearn_em(
    data: np.ndarray, start: dict[str, np.ndarray], covariance_type: str, num_iterations: int
) -> tuple[np.ndarray, GaussianMixture]:
    """Run scikit-learn's EM one M-step at a time.

    Returns:
        The mean log-likelihood at ``θ_0 … θ_T`` (``T = num_iterations``) and the
        estimator holding ``θ_T``.
    """
    gmm = GaussianMixture(
        n_components=len(start["weights"]),
        covariance_type=covariance_type,
        reg_covar=0.0,
        tol=0.0,
        max_iter=1,
        warm_start=True,
        init_params="random",
        random_state=0,
        weights_init=start["weights"],
        means_init=start["means"],
        precisions_init=_precisions(start["covariances"], covariance_type),
    )
    mean_log_likelihoods = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        for _ in range(num_iterations):
            gmm.fit(data)
            mean_log_likelihoods.append(gmm.lower_bound_)
    mean_log_likelihoods.append(gmm.score(data))
    return np.array(mean_log_likelihoods), gmm


def _pyroem_em(
    data: np.ndarray, start: dict[str, np.ndarray], covariance_type: str, num_iterations: int
) -> pyroem.FitResult:
    spec = pyroem.Mixture(
        len(start["weights"]), "gaussian", covariance_type=covariance_type, prior=None
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        return pyroem.fit(spec, data, init=start, max_iter=num_iterations, tol=0)


def _set_sklearn_params(
    data: np.ndarray, params: dict[str, torch.Tensor], covariance_type: str
) -> GaussianMixture:
    """A scikit-learn estimator holding exactly ``params`` (no fitting)."""
    values = {key: value.numpy() for key, value in params.items()}
    gmm = GaussianMixture(n_components=len(values["weights"]), covariance_type=covariance_type)
    gmm.weights_ = values["weights"]
    gmm.means_ = values["means"]
    gmm.covariances_ = values["covariances"]
    gmm.precisions_cholesky_ = _precision_cholesky(values["covariances"], covariance_type)
    gmm.n_features_in_ = data.shape[1]
    return gmm


def _simulated(covariance_type: str) -> np.ndarray:
    spec = pyroem.Mixture(3, "gaussian", covariance_type=covariance_type)
    data, _ = spec.simulate(400, seed=11, dim=3)
    return data.numpy()


DATASETS: dict[str, Any] = {
    "faithful": lambda ct: load_faithful().data.numpy(),
    "iris": lambda ct: load_iris().data.numpy(),
    "simulated": _simulated,
}
CASES = [
    ("faithful", 2, 40),
    ("faithful", 3, 30),
    ("iris", 3, 30),
    ("simulated", 3, 25),
]


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize(("dataset", "num_components", "num_iterations"), CASES)
def test_em_trace_and_parameters_match_sklearn(
    dataset: str, num_components: int, num_iterations: int, covariance_type: str
) -> None:
    data = DATASETS[dataset](covariance_type)
    start = _starting_params(data, num_components, covariance_type, seed=num_components)
    expected, gmm = _sklearn_em(data, start, covariance_type, num_iterations)
    fit = _pyroem_em(data, start, covariance_type, num_iterations)

    assert fit.num_iterations == num_iterations
    traced = fit.history.log_likelihood / data.shape[0]
    assert traced.shape == expected.shape
    np.testing.assert_allclose(traced, expected, rtol=RTOL, atol=0)
    # The trace must not be trivially flat: EM actually moved the parameters.
    assert expected[-1] - expected[0] > 1e-3

    params = {key: value.numpy() for key, value in fit.params.items()}
    np.testing.assert_allclose(params["weights"], gmm.weights_, rtol=RTOL, atol=1e-12)
    scale = np.abs(data).max()
    np.testing.assert_allclose(params["means"], gmm.means_, rtol=RTOL, atol=RTOL * scale)
    cov_scale = np.abs(gmm.covariances_).max()
    np.testing.assert_allclose(
        params["covariances"], gmm.covariances_, rtol=RTOL, atol=RTOL * cov_scale
    )
    assert params["covariances"].shape == gmm.covariances_.shape

    # The same θ_T, scored by both: information criteria use the same parameter count.
    assert fit.num_parameters == gmm._n_parameters()
    np.testing.assert_allclose(fit.bic(), gmm.bic(data), rtol=RTOL)
    np.testing.assert_allclose(fit.aic(), gmm.aic(data), rtol=RTOL)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_scores_at_given_parameters_match_sklearn(covariance_type: str) -> None:
    data = load_faithful().data.numpy()
    start = _starting_params(data, 3, covariance_type, seed=5)
    fit = _pyroem_em(data, start, covariance_type, num_iterations=7)
    gmm = _set_sklearn_params(data, fit.params, covariance_type)

    rng = np.random.default_rng(1)
    unseen = data.mean(0) + 2.0 * data.std(0) * rng.standard_normal((50, data.shape[1]))
    for points in (data, unseen):
        np.testing.assert_allclose(
            fit.score_samples(points).numpy(), gmm.score_samples(points), rtol=1e-10
        )
        np.testing.assert_allclose(
            fit.predict_proba(points).numpy(), gmm.predict_proba(points), rtol=1e-9, atol=1e-12
        )
        np.testing.assert_array_equal(fit.predict(points).numpy(), gmm.predict(points))
        np.testing.assert_allclose(fit.bic(points), gmm.bic(points), rtol=1e-10)
        np.testing.assert_allclose(fit.aic(points), gmm.aic(points), rtol=1e-10)
    np.testing.assert_allclose(fit.log_likelihood(), gmm.score(data) * data.shape[0], rtol=1e-10)
