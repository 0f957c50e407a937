"""Frequency weights in MAP-EM and CAVI: integer weights give the fit on repeated rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyroem


def _start(data: np.ndarray, covariance_type: str) -> dict[str, np.ndarray]:
    """One fixed start (rows 0 and 30 as means, the data covariance) for both fits."""
    cov = np.cov(data.T)
    covariances = {
        "full": np.stack([cov, cov]),
        "tied": cov,
        "diag": np.stack([np.diag(cov)] * 2),
        "spherical": np.full(2, np.diag(cov).mean()),
    }[covariance_type]
    return {"weights": np.array([0.5, 0.5]), "means": data[[0, 30]], "covariances": covariances}


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("prior", [None, "default"])
def test_integer_weights_equal_repeated_rows(covariance_type: str, prior: object) -> None:
    rng = np.random.default_rng(0)
    data = np.concatenate([rng.normal(0, 1, (30, 2)), rng.normal(3, 0.5, (30, 2))])
    counts = rng.integers(0, 4, size=data.shape[0])
    repeated = np.repeat(data, counts, axis=0)
    spec = pyroem.Mixture(2, pyroem.Gaussian(covariance_type, prior=prior))
    start = _start(data, covariance_type)
    options = {"init": start, "tol": 1e-10, "max_iter": 200}
    weighted = pyroem.fit(spec, data, sample_weight=counts, **options)
    spec_repeated = pyroem.Mixture(2, pyroem.Gaussian(covariance_type, prior=prior))
    if prior is not None:
        # The default prior is data-scaled; fix it to the weighted fit's numbers.
        spec_repeated = pyroem.Mixture(2, weighted.family.explicit())
        spec = pyroem.Mixture(2, weighted.family.explicit())
        weighted = pyroem.fit(spec, data, sample_weight=counts, **options)
    plain = pyroem.fit(spec_repeated, repeated, **options)
    assert weighted.num_iterations == plain.num_iterations
    np.testing.assert_allclose(weighted.history.objective, plain.history.objective, rtol=1e-12)
    for name, value in plain.params.items():
        np.testing.assert_allclose(weighted.params[name], value, rtol=1e-10, atol=1e-12)


def test_bad_sample_weight_is_an_error() -> None:
    data = torch.randn(20, 2, dtype=torch.float64)
    spec = pyroem.Mixture(2, pyroem.Gaussian("diag", prior=None))
    with pytest.raises(pyroem.DataError, match="shape"):
        pyroem.fit(spec, data, sample_weight=np.ones(19))
    with pytest.raises(pyroem.DataError, match="non-negative"):
        pyroem.fit(spec, data, sample_weight=-np.ones(20))
    with pytest.raises(pyroem.NotSupportedError, match="map-em"):
        pyroem.fit(spec, data, method="mcmc-em", sample_weight=np.ones(20))


VB_CASES = [
    ("full", pyroem.NormalInverseWishart(mean=[0.5, 1.0], mean_precision=0.3, dof=1.5, scale=1.0)),
    ("diag", pyroem.NormalInverseWishart(mean=[0.5, 1.0], mean_precision=0.3, dof=4.0, scale=1.0)),
    ("poisson", pyroem.Gamma(2.0, 0.5)),
]


@pytest.mark.filterwarnings("ignore::pyroem.errors.ConvergenceWarning")
@pytest.mark.parametrize(("kind", "prior"), VB_CASES, ids=[case[0] for case in VB_CASES])
@pytest.mark.parametrize("prior_type", ["dirichlet_distribution", "dirichlet_process"])
def test_vb_em_integer_weights_equal_repeated_rows(
    kind: str, prior: object, prior_type: str
) -> None:
    """CAVI with frequency weights: every ELBO of the path, q(π, θ) and the expected
    parameters equal the fit on the repeated rows (the Poisson case includes the base
    measure −log x! in the ELBO)."""
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 4, size=60)
    if kind == "poisson":
        data = np.concatenate([rng.poisson(2.0, (30, 2)), rng.poisson(7.0, (30, 2))]).astype(float)
        family: object = pyroem.Poisson(prior=prior)
        start = {"weights": np.array([0.5, 0.5]), "rates": data[[0, 30]] + 0.5}
    else:
        data = np.concatenate([rng.normal(0, 1, (30, 2)), rng.normal(3, 0.5, (30, 2))])
        family = pyroem.Gaussian(kind, prior=prior)
        start = _start(data, kind)
    options = {
        "method": "vb-em",
        "init": start,
        "tol": 0.0,
        "max_iter": 25,
        "num_draws": 0,
        "weights_prior_type": prior_type,
    }
    spec = pyroem.Mixture(2, family, weights_prior=0.8)
    weighted = pyroem.fit(spec, data, sample_weight=counts, **options)
    plain = pyroem.fit(spec, np.repeat(data, counts, axis=0), **options)
    assert weighted.history.objective[-1] - weighted.history.objective[0] > 1.0
    np.testing.assert_allclose(weighted.history.objective, plain.history.objective, rtol=1e-12)
    for factor in ("weights", "components"):
        for name, value in plain.variational[factor].items():
            np.testing.assert_allclose(weighted.variational[factor][name], value, rtol=1e-12)
    for name, value in plain.params.items():
        np.testing.assert_allclose(weighted.params[name], value, rtol=1e-12, atol=1e-14)
