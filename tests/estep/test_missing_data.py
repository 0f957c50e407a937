"""Missing data (NaN) under map-em: marginalised exactly, checked against brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import pyroem
import pyroem.datasets
from pyroem.sklearn import BayesianGaussianMixture, GaussianMixture

COVARIANCE_TYPES = ["full", "diag", "spherical", "tied"]


def _gaussian_data(seed: int = 0, num: int = 80, rate: float = 0.25) -> np.ndarray:
    """Two correlated 3-d clusters, about ``rate`` of the entries missing (no empty row)."""
    rng = np.random.default_rng(seed)
    cov = np.array([[1.0, 0.6, 0.3], [0.6, 1.0, 0.5], [0.3, 0.5, 1.0]])
    half = num // 2
    data = np.concatenate(
        [
            rng.multivariate_normal([0.0, 0.0, 0.0], cov, half),
            rng.multivariate_normal([4.0, 3.0, -2.0], 0.5 * cov, num - half),
        ]
    )
    missing = rng.random(data.shape) < rate
    missing[missing.all(1), 0] = False
    data[missing] = np.nan
    return data


def _full_covariances(covariances: np.ndarray, covariance_type: str, dim: int) -> np.ndarray:
    """Every component's ``(D, D)`` covariance, ``(K, D, D)``."""
    covariances = np.asarray(covariances)
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return np.stack([covariances, covariances])
    if covariance_type == "diag":
        return np.stack([np.diag(row) for row in covariances])
    return np.stack([value * np.eye(dim) for value in covariances])


def _params(covariance_type: str) -> dict[str, np.ndarray]:
    full = np.array(
        [
            [[1.2, 0.5, 0.2], [0.5, 0.9, 0.3], [0.2, 0.3, 1.5]],
            [[0.7, -0.2, 0.1], [-0.2, 0.6, 0.2], [0.1, 0.2, 0.8]],
        ]
    )
    covariances = {
        "full": full,
        "tied": full[0],
        "diag": np.stack([np.diag(matrix) for matrix in full]),
        "spherical": np.array([1.1, 0.7]),
    }[covariance_type]
    means = np.array([[0.3, -0.1, 0.2], [3.5, 2.8, -1.5]])
    return {"weights": np.array([0.45, 0.55]), "means": means, "covariances": covariances}


def _brute_force_pointwise(data: np.ndarray, params: dict, covariance_type: str) -> np.ndarray:
    """``log Σ_k π_k N(x_o | μ_ko, Σ_k,oo)`` of each row by scipy, on its observed entries."""
    dim = data.shape[1]
    covariances = _full_covariances(params["covariances"], covariance_type, dim)
    out = []
    for row in data:
        seen = ~np.isnan(row)
        terms = [
            np.log(weight)
            + stats.multivariate_normal(mean[seen], cov[np.ix_(seen, seen)]).logpdf(row[seen])
            for weight, mean, cov in zip(
                params["weights"], params["means"], covariances, strict=True
            )
        ]
        out.append(logsumexp(terms))
    return np.array(out)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_log_likelihood_is_the_marginal_of_the_observed_entries(covariance_type: str) -> None:
    data = _gaussian_data()
    assert 0 < np.isnan(data).mean() < 0.5 and (~np.isnan(data)).all(1).any()
    params = _params(covariance_type)
    spec = pyroem.Mixture(2, pyroem.Gaussian(covariance_type, prior=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(spec, data, init=params, max_iter=0)
    expected = _brute_force_pointwise(data, params, covariance_type)
    np.testing.assert_allclose(fit.score_samples(data).numpy(), expected, rtol=0, atol=1e-10)
    # The E-step's own log-likelihood (the objective EM climbs) at the same parameters.
    assert abs(fit.history.log_likelihood[0] - expected.sum()) < 1e-10 * len(data)
    assert abs(fit.log_likelihood() - expected.sum()) < 1e-10 * len(data)
    # Responsibilities given the observed entries.
    dim = data.shape[1]
    covariances = _full_covariances(params["covariances"], covariance_type, dim)
    row = data[np.isnan(data).any(1)][0]
    seen = ~np.isnan(row)
    joint = np.array(
        [
            np.log(w) + stats.multivariate_normal(m[seen], c[np.ix_(seen, seen)]).logpdf(row[seen])
            for w, m, c in zip(params["weights"], params["means"], covariances, strict=True)
        ]
    )
    np.testing.assert_allclose(
        fit.predict_proba(row[None]).numpy()[0], np.exp(joint - logsumexp(joint)), atol=1e-12
    )


def _torch_log_likelihood(
    data: torch.Tensor, logits: torch.Tensor, means: torch.Tensor, raw: torch.Tensor, kind: str
) -> torch.Tensor:
    """Observed-data log-likelihood written row by row with torch.distributions."""
    log_weights = torch.log_softmax(logits, 0)
    if kind in ("full", "tied"):
        symmetric = 0.5 * (raw + raw.mT)
        covariances = symmetric.expand(2, 3, 3) if kind == "tied" else symmetric
    elif kind == "diag":
        covariances = torch.diag_embed(raw)
    else:
        covariances = raw[:, None, None] * torch.eye(3, dtype=raw.dtype)
    total = data.new_zeros(())
    for row in data:
        seen = ~torch.isnan(row)
        index = torch.nonzero(seen).reshape(-1)
        terms = torch.stack(
            [
                torch.distributions.MultivariateNormal(
                    means[k, index], covariances[k][index][:, index]
                ).log_prob(row[index])
                for k in range(2)
            ]
        )
        total = total + torch.logsumexp(log_weights + terms, 0)
    return total


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_em_is_monotone_and_stops_where_the_observed_gradient_vanishes(
    covariance_type: str,
) -> None:
    data = _gaussian_data(seed=1, num=60)
    spec = pyroem.Mixture(2, pyroem.Gaussian(covariance_type, prior=None))
    fit = pyroem.fit(spec, data, init=_params(covariance_type), tol=1e-13, max_iter=2000)
    assert fit.converged
    objective = fit.history.objective
    assert np.all(np.diff(objective) >= -1e-12 * np.abs(objective[1:]))
    assert objective[-1] > objective[0] + 1.0
    params = fit.params
    tensor = torch.as_tensor(data)
    logits = params["weights"].log().clone().requires_grad_(True)
    means = params["means"].clone().requires_grad_(True)
    raw = params["covariances"].clone().requires_grad_(True)
    value = _torch_log_likelihood(tensor, logits, means, raw, covariance_type)
    assert abs(float(value.detach()) - fit.log_likelihood()) < 1e-9
    value.backward()
    for name, grad in (("weights", logits.grad), ("means", means.grad), ("cov", raw.grad)):
        assert grad is not None
        assert float(grad.abs().max()) < 1e-8, (name, grad)
    # With the default conjugate prior the log joint climbs too (MAP-EM).
    spec = pyroem.Mixture(2, pyroem.Gaussian(covariance_type))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        prior_fit = pyroem.fit(spec, data, init=_params(covariance_type), max_iter=30)
    joint = prior_fit.history.objective
    assert np.all(np.diff(joint) >= -1e-12 * np.abs(joint[1:]))


def test_no_missing_rows_add_nothing_to_the_fit() -> None:
    """Rows with NaN at zero weight leave the complete rows' fit exactly as it is: the
    complete rows take the same kernels, and the missing-data path adds zeros."""
    data = _gaussian_data(seed=2, rate=0.0)
    holes = _gaussian_data(seed=3, num=20)
    holes = holes[np.isnan(holes).any(1)]
    both = np.concatenate([data, holes])
    weights = np.concatenate([np.ones(len(data)), np.zeros(len(holes))])
    for covariance_type in COVARIANCE_TYPES:
        spec = pyroem.Mixture(2, pyroem.Gaussian(covariance_type, prior=None))
        start = _params(covariance_type)
        plain = pyroem.fit(spec, data, init=start, tol=1e-10)
        padded = pyroem.fit(spec, both, init=start, tol=1e-10, sample_weight=weights)
        assert padded.num_iterations == plain.num_iterations
        np.testing.assert_array_equal(padded.history.objective, plain.history.objective)
        for name, value in plain.params.items():
            np.testing.assert_array_equal(padded.params[name].numpy(), value.numpy())


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_impute_is_the_conditional_mean(covariance_type: str) -> None:
    data = _gaussian_data(seed=4, num=40)
    spec = pyroem.Mixture(2, pyroem.Gaussian(covariance_type, prior=None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(spec, data, init=_params(covariance_type), max_iter=5, tol=0.0)
    params = {key: value.numpy() for key, value in fit.params.items()}
    covariances = _full_covariances(params["covariances"], covariance_type, 3)
    imputed = fit.impute(data).numpy()
    for row, got in zip(data, imputed, strict=True):
        seen = ~np.isnan(row)
        log_joint, conditional = [], []
        for weight, mean, cov in zip(params["weights"], params["means"], covariances, strict=True):
            marginal = stats.multivariate_normal(mean[seen], cov[np.ix_(seen, seen)])
            log_joint.append(np.log(weight) + marginal.logpdf(row[seen]))
            gain = cov[np.ix_(~seen, seen)] @ np.linalg.inv(cov[np.ix_(seen, seen)])
            conditional.append(mean[~seen] + gain @ (row[seen] - mean[seen]))
        resp = np.exp(np.array(log_joint) - logsumexp(log_joint))
        expected = row.copy()
        expected[~seen] = resp @ np.array(conditional) if (~seen).any() else []
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(fit.impute().numpy(), imputed, rtol=0, atol=0)


def _discrete(family: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    if family == "poisson":
        data = np.concatenate([rng.poisson([1, 6, 2], (40, 3)), rng.poisson([7, 1, 4], (40, 3))])
        start = {"weights": np.array([0.5, 0.5]), "rates": np.array([[2.0, 4, 3], [5, 2, 3]])}
    elif family == "bernoulli":
        probs = np.array([[0.9, 0.2, 0.7, 0.1], [0.1, 0.8, 0.3, 0.6]])
        data = np.concatenate([rng.random((40, 4)) < probs[0], rng.random((40, 4)) < probs[1]])
        start = {"weights": np.array([0.4, 0.6]), "probs": np.array([[0.7, 0.4, 0.6, 0.3]] * 2)}
        start["probs"][1] = [0.3, 0.6, 0.4, 0.5]
    else:
        first, second = rng.exponential([1, 3], (40, 2)), rng.exponential([4, 0.5], (40, 2))
        data = np.concatenate([first, second])
        start = {"weights": np.array([0.5, 0.5]), "rates": np.array([[1.5, 0.5], [0.4, 1.2]])}
    data = data.astype(float)
    missing = rng.random(data.shape) < 0.2
    missing[missing.all(1), 0] = False
    data[missing] = np.nan
    return data, start


def _entry_log_pmf(family: str, data: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``log p(x_nd | θ_kd)`` ``(N, D)`` by scipy, 0 where ``x_nd`` is missing."""
    filled = np.nan_to_num(data)
    if family == "poisson":
        out = stats.poisson(value).logpmf(filled)
    elif family == "bernoulli":
        out = stats.bernoulli(value).logpmf(filled)
    else:
        out = stats.expon(scale=1 / value).logpdf(filled)
    return np.where(np.isnan(data), 0.0, out)


@pytest.mark.parametrize("family", ["poisson", "bernoulli", "exponential"])
def test_other_families_drop_missing_entries(family: str) -> None:
    """Log-likelihood and five EM iterations equal brute force with the missing
    entries' likelihood terms left out (flat priors: weighted per-coordinate means)."""
    data, start = _discrete(family)
    name = "probs" if family == "bernoulli" else "rates"
    weights, value = start["weights"], start[name]
    observed = ~np.isnan(data)
    filled = np.nan_to_num(data)
    objectives = []
    for _ in range(6):
        joint = np.log(weights) + np.stack(
            [_entry_log_pmf(family, data, row).sum(1) for row in value], 1
        )
        norm = logsumexp(joint, axis=1)
        objectives.append(norm.sum())
        if len(objectives) == 6:
            break
        resp = np.exp(joint - norm[:, None])
        weights = resp.sum(0) / resp.sum()
        sums, counts = resp.T @ filled, resp.T @ observed
        value = counts / sums if family == "exponential" else sums / counts
    spec = pyroem.Mixture(2, family, prior=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(spec, data, init=start, max_iter=5, tol=0.0)
    np.testing.assert_allclose(fit.history.log_likelihood, objectives, rtol=1e-12)
    np.testing.assert_allclose(fit.params["weights"].numpy(), weights, rtol=1e-10)
    np.testing.assert_allclose(fit.params[name].numpy(), value, rtol=1e-10)
    expected_scores = logsumexp(
        np.log(weights) + np.stack([_entry_log_pmf(family, data, row).sum(1) for row in value], 1),
        axis=1,
    )
    np.testing.assert_allclose(fit.score_samples(data).numpy(), expected_scores, rtol=1e-12)
    means = 1 / value if family == "exponential" else value
    resp = fit.predict_proba(data).numpy()
    np.testing.assert_allclose(
        fit.impute(data).numpy(), np.where(observed, data, resp @ means), rtol=1e-12
    )


def test_categorical_drops_missing_entries() -> None:
    rng = np.random.default_rng(6)
    data = rng.integers(0, 3, (60, 3)).astype(float)
    data[:30, 0] = rng.choice(3, 30, p=[0.8, 0.1, 0.1])
    data[rng.random(data.shape) < 0.2] = np.nan
    data[np.isnan(data).all(1), 1] = 1.0
    probs = np.full((2, 3, 3), 1 / 3)
    probs[0, 0] = [0.6, 0.2, 0.2]
    start = {"weights": np.array([0.5, 0.5]), "probs": probs}
    observed = ~np.isnan(data)
    onehot = np.stack([(data == c) for c in range(3)], -1).astype(float)  # (N, D, C)
    weights = start["weights"]
    for _ in range(4):
        joint = np.log(weights) + np.einsum("ndc,kdc->nk", onehot, np.log(probs))
        resp = np.exp(joint - logsumexp(joint, axis=1)[:, None])
        weights = resp.sum(0) / resp.sum()
        counts = np.einsum("nk,ndc->kdc", resp, onehot)
        probs = counts / (resp.T @ observed)[:, :, None]
    spec = pyroem.Mixture(2, "categorical", prior=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(spec, data, init=start, max_iter=4, tol=0.0)
    np.testing.assert_allclose(fit.params["probs"].numpy(), probs, rtol=1e-10)
    np.testing.assert_allclose(fit.params["weights"].numpy(), weights, rtol=1e-10)


def test_scikit_learn_estimator_marginalises_missing_entries() -> None:
    data = _gaussian_data(seed=7)
    estimator = GaussianMixture(2, covariance_type="full", random_state=0).fit(data)
    assert estimator.__sklearn_tags__().input_tags.allow_nan
    params = {
        "weights": estimator.weights_,
        "means": estimator.means_,
        "covariances": estimator.covariances_,
    }
    expected = _brute_force_pointwise(data, params, "full")
    np.testing.assert_allclose(estimator.score_samples(data), expected, rtol=0, atol=1e-10)
    assert np.isfinite(estimator.means_).all() and estimator.converged_


def test_unsupported_missing_data_is_a_clear_error(tmp_path: object) -> None:
    data = _gaussian_data(seed=8, num=30)
    spec = pyroem.Mixture(2)
    for method in ("vb-em", "mcmc-em", "nuts"):
        with pytest.raises(pyroem.DataError, match=r"missing value\(s\) \(NaN\).*map-em"):
            pyroem.fit(spec, data, method=method, seed=0)
    with pytest.raises(pyroem.DataError, match=r"not by vb-em.*streamed and stepwise"):
        pyroem.fit(spec, data, stepwise=True, seed=0)
    path = f"{tmp_path}/data.npy"
    np.save(path, data)
    with pytest.raises(pyroem.DataError, match=r"missing value\(s\)"):
        pyroem.fit(spec, path, seed=0)
    with pytest.raises(pyroem.DataError, match=r"missing value\(s\)"):
        spec.model(data)
    empty = data.copy()
    empty[[3, 7]] = np.nan
    with pytest.raises(pyroem.DataError, match=r"row\(s\) \[3, 7\].*every entry missing"):
        pyroem.fit(spec, empty, seed=0)
    column = data.copy()
    column[:, 1] = np.nan
    with pytest.raises(pyroem.DataError, match=r"column\(s\) \[1\].*every entry missing"):
        pyroem.fit(spec, column, seed=0)
    fit = pyroem.fit(spec, data, seed=0)
    with pytest.raises(pyroem.DataError, match=r"row\(s\) \[0\].*every entry missing"):
        fit.predict(np.full((1, 3), np.nan))
    complete = data[~np.isnan(data).any(1)]
    variational = pyroem.fit(spec, complete, method="vb-em", seed=0)
    for score in (variational.predict, variational.score_samples, variational.impute):
        with pytest.raises(pyroem.DataError, match=r"missing value\(s\) \(NaN\).*map-em"):
            score(data)
    with pytest.raises(ValueError, match=r"Input X contains NaN"):
        BayesianGaussianMixture(n_components=2).fit(data)
    with pytest.raises(ValueError, match=r"every entry missing"):
        GaussianMixture(2).fit(empty)


def test_airquality_fits_in_float64_and_float32() -> None:
    """The bundled data set with missing values: the fit uses every observed entry and
    agrees across dtypes (float32 parameter changes reach round-off, where the stopping
    rule must not divide by a zero change)."""
    data = pyroem.datasets.load_airquality().data
    spec = pyroem.Mixture(2)
    fits = [pyroem.fit(spec, data, seed=0, dtype=dtype) for dtype in ("float64", "float32")]
    assert all(fit.converged for fit in fits)
    assert fits[0].num_data == 153 and torch.isnan(data).sum() == 44
    assert abs(fits[0].log_likelihood() - fits[1].log_likelihood()) < 1e-3 * 153
    imputed = fits[0].impute()
    assert not torch.isnan(imputed).any()
    assert torch.equal(imputed[~torch.isnan(data)], data[~torch.isnan(data)])


def test_the_quick_missing_value_check_is_exact() -> None:
    from pyroem.estep.missing import has_nan

    assert has_nan(torch.tensor([[1.0, 2.0], [float("nan"), 4.0]]))
    assert not has_nan(torch.zeros(5, 3, dtype=torch.float32))
    assert not has_nan(torch.arange(6).reshape(3, 2))
    # A sum that is NaN without a NaN in the data (infinities of both signs): the full
    # scan decides.
    both = torch.tensor([[float("inf"), 1.0], [float("-inf"), 2.0]], dtype=torch.float64)
    assert bool(torch.isnan(both.sum()))
    assert not has_nan(both)
