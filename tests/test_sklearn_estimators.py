"""pyroem.sklearn against scikit-learn: the same numbers from the same start, and
scikit-learn's own mixture tests run on pyroem's classes (installed test modules,
substituted by the plugin in bench/sklearn_suite.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import sklearn
from sklearn import mixture
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pyroem.sklearn import (
    BernoulliMixture,
    CategoricalMixture,
    GaussianMixture,
    PoissonMixture,
)

ROOT = Path(__file__).resolve().parent.parent
COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


def _blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate(
        [rng.normal(0.0, 1.0, (60, 3)), rng.normal(4.0, 0.7, (50, 3)), rng.normal(-3, 0.5, (40, 3))]
    )


def _start(data: np.ndarray, covariance_type: str) -> dict[str, np.ndarray]:
    precision = np.linalg.inv(np.cov(data.T))
    precisions = {
        "full": np.stack([precision] * 3),
        "tied": precision,
        "diag": np.stack([np.diag(precision)] * 3),
        "spherical": np.full(3, np.diag(precision).mean()),
    }[covariance_type]
    return {
        "weights_init": np.array([0.3, 0.3, 0.4]),
        "means_init": data[[0, 70, 120]],
        "precisions_init": precisions,
    }


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gaussian_mixture_equals_scikit_learn_from_the_same_start(covariance_type: str) -> None:
    """Five EM iterations from the same start: after n M-steps both hold θ_n."""
    data = _blobs()
    options = {
        "n_components": 3,
        "covariance_type": covariance_type,
        "tol": 0.0,
        "max_iter": 5,
        "reg_covar": 1e-3,
        **_start(data, covariance_type),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GaussianMixture(**options).fit(data)
        theirs = mixture.GaussianMixture(**options).fit(data)
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-10)
    np.testing.assert_allclose(ours.score_samples(data), theirs.score_samples(data), rtol=1e-10)
    np.testing.assert_allclose(ours.predict_proba(data), theirs.predict_proba(data), atol=1e-10)
    assert ours.bic(data) == pytest.approx(theirs.bic(data), rel=1e-10)
    assert ours.aic(data) == pytest.approx(theirs.aic(data), rel=1e-10)
    # scikit-learn's lower bounds score θ_0..θ_4, pyroem's θ_1..θ_5: shifted by one.
    np.testing.assert_allclose(ours.lower_bounds_[:-1], theirs.lower_bounds_[1:], rtol=1e-10)


def test_gaussian_mixture_in_pipeline_and_grid_search() -> None:
    data = np.random.default_rng(2).permutation(_blobs())
    grid = {"n_components": [1, 3], "covariance_type": ["full", "spherical"]}
    search = GridSearchCV(GaussianMixture(random_state=0), grid, cv=3).fit(data)
    reference = GridSearchCV(mixture.GaussianMixture(random_state=0), grid, cv=3).fit(data)
    assert search.best_params_ == reference.best_params_
    assert search.best_params_["n_components"] == 3
    pipeline = make_pipeline(StandardScaler(), GaussianMixture(3, random_state=0)).fit(data)
    reference = make_pipeline(StandardScaler(), mixture.GaussianMixture(3, random_state=0))
    assert pipeline.score(data) == pytest.approx(reference.fit(data).score(data), rel=1e-6)


def test_reg_covar_is_added_to_the_covariances() -> None:
    """One M-step from hard responsibilities: the covariance plus reg_covar on the diagonal."""
    data = _blobs()
    theirs = mixture.GaussianMixture(3, reg_covar=0.5, max_iter=1, **_start(data, "full"))
    ours = GaussianMixture(3, reg_covar=0.5, max_iter=1, **_start(data, "full"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        np.testing.assert_allclose(
            ours.fit(data).covariances_, theirs.fit(data).covariances_, rtol=1e-10
        )


def _brute_force_log_density(
    data: np.ndarray, weights: np.ndarray, log_component: np.ndarray
) -> np.ndarray:
    from scipy.special import logsumexp

    return logsumexp(np.log(weights) + log_component, axis=1)


def test_discrete_mixtures_score_by_their_densities() -> None:
    from scipy import stats

    rng = np.random.default_rng(1)
    counts = np.concatenate([rng.poisson(2, (80, 3)), rng.poisson(9, (70, 3))]).astype(float)
    poisson = PoissonMixture(2, prior=None, random_state=0).fit(counts)
    log_component = stats.poisson.logpmf(counts[:, None, :], poisson.rates_[None]).sum(-1)
    expected = _brute_force_log_density(counts, poisson.weights_, log_component)
    np.testing.assert_allclose(poisson.score_samples(counts), expected, rtol=1e-12)
    assert sorted(poisson.rates_.mean(1).round()) == [2.0, 9.0]

    binary = (rng.random((150, 4)) < np.where(np.arange(150)[:, None] < 80, 0.2, 0.8)).astype(float)
    bernoulli = BernoulliMixture(2, random_state=0).fit(binary)
    log_component = stats.bernoulli.logpmf(binary[:, None, :], bernoulli.probs_[None]).sum(-1)
    expected = _brute_force_log_density(binary, bernoulli.weights_, log_component)
    np.testing.assert_allclose(bernoulli.score_samples(binary), expected, rtol=1e-12)

    codes = np.concatenate(
        [rng.choice(3, (80, 2), p=[0.8, 0.1, 0.1]), rng.choice(3, (70, 2), p=[0.1, 0.1, 0.8])]
    )
    categorical = CategoricalMixture(2, random_state=0).fit(codes)
    assert categorical.probs_.shape == (2, 2, 3)
    probs = categorical.probs_[:, np.arange(2)[None, :], codes]  # (K, N, D)
    log_component = np.log(probs).sum(-1).T
    expected = _brute_force_log_density(codes, categorical.weights_, log_component)
    np.testing.assert_allclose(categorical.score_samples(codes), expected, rtol=1e-12)
    draws, labels = categorical.sample(5)
    assert draws.shape == (5, 2) and labels.shape == (5,)


# scikit-learn's own tests (installed with it) that must pass on pyroem's classes.
SKLEARN_TESTS = [
    "test_mixture.py",
    "test_gaussian_mixture.py::test_gaussian_mixture_attributes",
    "test_gaussian_mixture.py::test_check_weights",
    "test_gaussian_mixture.py::test_check_means",
    "test_gaussian_mixture.py::test_check_precisions",
    "test_gaussian_mixture.py::test_gaussian_mixture_predict_predict_proba",
    "test_gaussian_mixture.py::test_gaussian_mixture_fit_predict_n_init",
    "test_gaussian_mixture.py::test_gaussian_mixture_fit_convergence_warning",
    "test_gaussian_mixture.py::test_gaussian_mixture_n_parameters",
    "test_gaussian_mixture.py::test_bic_1d_1component",
    "test_gaussian_mixture.py::test_gaussian_mixture_aic_bic",
    "test_gaussian_mixture.py::test_score_samples",
    "test_gaussian_mixture.py::test_regularisation",
    "test_gaussian_mixture.py::test_max_iter_zero",
    "test_gaussian_mixture.py::test_gaussian_mixture_single_component_stable",
    "test_bayesian_mixture.py::test_bayesian_mixture_check_is_fitted",
    "test_bayesian_mixture.py::test_bayesian_mixture_mean_prior_initialisation",
    "test_bayesian_mixture.py::test_bayesian_mixture_weights_prior_initialisation",
]


def test_scikit_learn_own_tests_pass_on_pyroem_classes() -> None:
    tests = Path(sklearn.__file__).parent / "mixture" / "tests"
    targets = [str(tests / node) for node in SKLEARN_TESTS]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("PYROEM_SKLEARN_ORIGINAL", None)
    command = [sys.executable, "-m", "pytest", "-p", "bench.sklearn_suite", "-q",
               "-p", "no:cacheprovider", "-W", "ignore", *targets]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " failed" not in done.stdout and " passed" in done.stdout


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_sample_weight_equals_scikit_learn_on_repeated_rows(covariance_type: str) -> None:
    data = _blobs()
    counts = np.random.default_rng(3).integers(0, 4, size=data.shape[0])
    counts[[0, 70, 120]] = 1
    options = {
        "n_components": 3,
        "covariance_type": covariance_type,
        "tol": 0.0,
        "max_iter": 5,
        **_start(data, covariance_type),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GaussianMixture(**options).fit(data, sample_weight=counts)
        theirs = mixture.GaussianMixture(**options).fit(np.repeat(data, counts, axis=0))
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-10)
    np.testing.assert_allclose(ours.lower_bounds_[:-1], theirs.lower_bounds_[1:], rtol=1e-10)
