"""Covariances exact to the dtype's precision however far apart the clusters sit.

References are exact: each cluster's sample covariance computed by numpy in
float64 from the known assignments (the clusters are so far apart that the
maximum-likelihood responsibilities are exactly 0 or 1).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pyroem

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")


def _two_clusters(separation: float, spread: float, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    generator = np.random.default_rng(0)
    first = generator.normal(0.0, spread, (50, 2))
    second = generator.normal(separation, spread, (50, 2))
    # The data as the fit sees them (float32 rounds them), in float64 for the reference.
    data = np.r_[first, second].astype(dtype).astype(np.float64)
    return data, np.repeat([0, 1], 50)


def _exact_covariances(data: np.ndarray, labels: np.ndarray, kind: str) -> np.ndarray:
    full = np.stack([np.cov(data[labels == k].T, bias=True) for k in (0, 1)])
    if kind == "full":
        return full
    if kind == "diag":
        return np.diagonal(full, axis1=1, axis2=2)
    if kind == "spherical":
        return np.diagonal(full, axis1=1, axis2=2).mean(-1)
    counts = np.bincount(labels)
    return (counts[:, None, None] * full).sum(0) / counts.sum()


def _fitted(data: np.ndarray, labels: np.ndarray, kind: str, dtype: str) -> np.ndarray:
    fit = pyroem.fit(pyroem.Mixture(2, covariance_type=kind, prior=None), data, dtype=dtype)
    covariances = fit.params["covariances"].double().numpy()
    if kind == "tied":
        return covariances
    # Order the components as the labels are: the first cluster sits at the origin.
    order = np.argsort(fit.params["means"].double().numpy()[:, 0])
    return covariances[order]


def _assert_close(fitted: np.ndarray, exact: np.ndarray, kind: str, rtol: float) -> None:
    """Variances to ``rtol`` relative; a matrix's off-diagonal (a small sum of signed
    terms) to ``rtol`` relative to the matrix's largest variance."""
    if kind in ("full", "tied"):
        variances = np.diagonal(exact, axis1=-2, axis2=-1)
        np.testing.assert_allclose(np.diagonal(fitted, axis1=-2, axis2=-1), variances, rtol=rtol)
        scale = variances.max(-1)[..., None, None]
        np.testing.assert_allclose(fitted / scale, exact / scale, rtol=0, atol=rtol)
    else:
        np.testing.assert_allclose(fitted, exact, rtol=rtol, atol=0)


@pytest.mark.parametrize("separation", [1e3, 1e4, 1e5])
@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_float32_clusters_far_apart(kind: str, separation: float) -> None:
    data, labels = _two_clusters(separation, 1.0, "float32")
    exact = _exact_covariances(data, labels, kind)
    if kind == "full" and separation == 1e3:  # the variances the issue quotes
        np.testing.assert_allclose(np.diagonal(exact[0]), [0.8595, 0.9741], atol=1e-4)
    _assert_close(_fitted(data, labels, kind, "float32"), exact, kind, rtol=1e-5)


@pytest.mark.parametrize("separation", [1e4, 1e5])
@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_float64_clusters_far_apart_with_tiny_spread(kind: str, separation: float) -> None:
    data, labels = _two_clusters(separation, 1e-3, "float64")
    exact = _exact_covariances(data, labels, kind)
    _assert_close(_fitted(data, labels, kind, "float64"), exact, kind, rtol=1e-10)


def test_cavi_elbo_never_decreases_with_a_far_outlier_under_tied_covariance() -> None:
    generator = np.random.default_rng(0)
    data = np.r_[generator.normal(0.0, 1.0, (100, 2)), [[1e5, -1e5]]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            pyroem.Mixture(3, covariance_type="tied"),
            data,
            method="vb-em",
            seed=0,
            tol=0.0,
            max_iter=150,
        )
    elbo = np.asarray(fit.history.objective)
    slack = 1e-9 * (1 + np.abs(elbo[:-1]))  # rounding of the ELBO's magnitude only
    assert (np.diff(elbo) >= -slack).all(), np.diff(elbo).min()
