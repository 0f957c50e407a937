"""The default prior only protects against collapse: on well-separated clusters the
MAP fit is the maximum-likelihood one to within 1 % (scikit-learn's MLE as the
reference), and a singleton, repeated points or a constant column still fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

import pyroem


def _clusters(separation: float, size: int, dim: int = 2) -> np.ndarray:
    generator = np.random.default_rng(0)
    return np.r_[
        generator.normal(0.0, 1.0, (size, dim)), generator.normal(separation, 1.0, (size, dim))
    ]


def _ordered(means: np.ndarray, covariances: np.ndarray, kind: str) -> np.ndarray:
    return covariances if kind == "tied" else covariances[np.argsort(means[:, 0])]


@pytest.mark.parametrize("kind", ["full", "diag", "spherical", "tied"])
@pytest.mark.parametrize(("separation", "size"), [(30.0, 100), (100.0, 100), (1000.0, 50)])
def test_default_prior_stays_within_one_percent_of_the_mle(
    separation: float, size: int, kind: str
) -> None:
    data = _clusters(separation, size)
    reference = GaussianMixture(
        2, covariance_type=kind, reg_covar=1e-12, tol=1e-12, max_iter=500, random_state=0
    ).fit(data)
    fit = pyroem.fit(pyroem.Mixture(2, covariance_type=kind), data, seed=0)
    means = fit.params["means"].numpy()
    np.testing.assert_allclose(
        _ordered(means, fit.params["covariances"].numpy(), kind),
        _ordered(reference.means_, reference.covariances_, kind),
        rtol=0.01,
        atol=0.01 * float(np.max(reference.covariances_)) if kind in ("full", "tied") else 0,
    )
    # The means move by less than 1 % of a standard deviation.
    np.testing.assert_allclose(
        means[np.argsort(means[:, 0])],
        reference.means_[np.argsort(reference.means_[:, 0])],
        rtol=0,
        atol=0.01,
    )
    assert abs(fit.log_likelihood() - reference.score(data) * len(data)) < 0.01 * abs(
        fit.log_likelihood()
    )


@pytest.mark.parametrize("kind", ["full", "diag", "spherical", "tied"])
def test_a_singleton_and_repeated_points_fit_under_the_default_prior(kind: str) -> None:
    generator = np.random.default_rng(1)
    bulk = generator.normal(0.0, 1.0, (60, 2))
    for extra in ([[50.0, 50.0]], np.tile([[50.0, 50.0]], (5, 1))):
        fit = pyroem.fit(pyroem.Mixture(2, covariance_type=kind), np.r_[bulk, extra], seed=0)
        covariances = fit.params["covariances"].numpy()
        assert np.isfinite(covariances).all()
        if kind in ("full", "tied"):
            assert (np.linalg.eigvalsh(covariances) > 0).all()
        else:
            assert (covariances > 0).all()
        assert sorted(np.bincount(fit.labels.numpy(), minlength=2)) == [len(extra), 60]


def test_a_constant_column_fits_under_the_default_prior() -> None:
    generator = np.random.default_rng(2)
    data = np.c_[generator.normal(0.0, 1.0, (60, 1)), np.full((60, 1), 3.0)]
    fit = pyroem.fit(pyroem.Mixture(1), data, seed=0)
    covariance = fit.params["covariances"].numpy()[0]
    np.testing.assert_allclose(covariance[0, 0], np.var(data[:, 0]), rtol=0.01)
    assert (np.linalg.eigvalsh(covariance) > 0).all()


def test_mclust_prior_is_kept_by_name() -> None:
    data = _clusters(30.0, 100)
    spec = pyroem.Mixture(2, prior="mclust")
    assert spec.family.prior == pyroem.NormalInverseWishart()
    fit = pyroem.fit(spec, data, seed=0)
    # Fraley-Raftery MAP at convergence, from numpy on the fit's own responsibilities:
    # Σ_k = (Ψ + S_k + κN/(κ+N)(x̄_k − μ0)(x̄_k − μ0)ᵀ) / (ν + N_k + D + 2).
    resp = fit.predict_proba(data).numpy()
    dim, kappa, dof = 2, 0.01, 4.0
    scale = np.cov(data.T) / 2 ** (2 / dim)
    prior_mean = data.mean(0)
    for k in range(2):
        counts = resp[:, k].sum()
        mean = resp[:, k] @ data / counts
        centred = data - mean
        scatter = (resp[:, k, None] * centred).T @ centred
        gap = (mean - prior_mean)[:, None]
        numer = scale + scatter + kappa * counts / (kappa + counts) * gap @ gap.T
        np.testing.assert_allclose(
            fit.params["covariances"].numpy()[k], numer / (dof + counts + dim + 2), rtol=1e-5
        )


def test_collinear_columns_fit_under_the_default_prior() -> None:
    line = torch.stack([torch.arange(20.0), 2 * torch.arange(20.0) + 1], 1).double()
    fit = pyroem.fit(pyroem.Mixture(1), line, seed=0)
    covariance = fit.params["covariances"][0].numpy()
    np.testing.assert_allclose(covariance, np.cov(line.numpy().T, bias=True), rtol=0.01)
    assert (np.linalg.eigvalsh(covariance) > 0).all()


def test_program_map_em_under_the_weighted_default_prior_matches_the_mixture() -> None:
    """The Pyro program declares the weighted prior with poutine.scale; map-em on it
    (gradient M-steps for the weighted sites) reaches the closed-form fit's optimum."""
    spec = pyroem.Mixture(2, covariance_type="diag")
    data = torch.as_tensor(_clusters(8.0, 40))
    fast = pyroem.fit(spec, data, seed=0, tol=1e-12, max_iter=500)
    model = spec.model(data, params=fast.params)
    generic = pyroem.fit(model, init={"means": fast.params["means"]}, max_iter=50)
    assert np.isclose(generic.log_joint(), fast.log_joint(), rtol=1e-9)
