"""E-step against brute force: enumerate every assignment vector of a tiny mixture.

For ``N`` points and ``K`` components there are ``K^N`` assignment vectors ``z``;

    log p(x | θ) = logsumexp_z Σ_n [log π_{z_n} + log p(x_n | θ_{z_n})],
    P(z_n = k | x) = Σ_{z : z_n = k} p(x, z | θ) / p(x | θ),

with every component density taken from ``scipy.stats``, independently of
pyroem's batched kernels. The exact chunked E-step must reproduce both, and its
sufficient statistics must not depend on the chunk size.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

import pyroem
from pyroem.estep.enumerate import MixtureEStep
from pyroem.model.mixture import MixtureParams

TOL = 1e-10
NUM_CATEGORIES = 3


def _spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    factor = rng.standard_normal((dim, dim))
    return factor @ factor.T + 0.5 * np.eye(dim)


def _gaussian_case(covariance_type: str) -> Callable[[np.random.Generator, int, int], Any]:
    def make(rng: np.random.Generator, num_data: int, num_components: int) -> Any:
        dim = 2
        data = 1.5 * rng.standard_normal((num_data, dim))
        means = rng.standard_normal((num_components, dim))
        if covariance_type == "full":
            covariances = np.stack([_spd(rng, dim) for _ in range(num_components)])
        elif covariance_type == "tied":
            covariances = _spd(rng, dim)
        elif covariance_type == "diag":
            covariances = rng.uniform(0.3, 2.0, (num_components, dim))
        else:
            covariances = rng.uniform(0.3, 2.0, num_components)

        def log_density(x: np.ndarray, k: int) -> float:
            if covariance_type == "full":
                return stats.multivariate_normal(means[k], covariances[k]).logpdf(x)
            if covariance_type == "tied":
                return stats.multivariate_normal(means[k], covariances).logpdf(x)
            variances = covariances[k] * np.ones(dim)
            return stats.norm(means[k], np.sqrt(variances)).logpdf(x).sum()

        return data, {"means": means, "covariances": covariances}, log_density

    return make


def _poisson(rng: np.random.Generator, num_data: int, num_components: int) -> Any:
    data = rng.poisson(3.0, (num_data, 3)).astype(float)
    rates = rng.uniform(0.5, 6.0, (num_components, 3))

    def log_density(x: np.ndarray, k: int) -> float:
        return stats.poisson(rates[k]).logpmf(x).sum()

    return data, {"rates": rates}, log_density


def _exponential(rng: np.random.Generator, num_data: int, num_components: int) -> Any:
    data = rng.exponential(1.0, (num_data, 3))
    rates = rng.uniform(0.3, 3.0, (num_components, 3))

    def log_density(x: np.ndarray, k: int) -> float:
        return stats.expon(scale=1.0 / rates[k]).logpdf(x).sum()

    return data, {"rates": rates}, log_density


def _bernoulli(rng: np.random.Generator, num_data: int, num_components: int) -> Any:
    data = rng.integers(0, 2, (num_data, 4)).astype(float)
    probs = rng.uniform(0.1, 0.9, (num_components, 4))

    def log_density(x: np.ndarray, k: int) -> float:
        return stats.bernoulli(probs[k]).logpmf(x).sum()

    return data, {"probs": probs}, log_density


def _categorical(rng: np.random.Generator, num_data: int, num_components: int) -> Any:
    dim = 3
    data = rng.integers(0, NUM_CATEGORIES, (num_data, dim)).astype(float)
    data[0, 0] = NUM_CATEGORIES - 1  # every category code occurs, so C is inferred as 3
    probs = rng.dirichlet(np.ones(NUM_CATEGORIES), (num_components, dim))

    def log_density(x: np.ndarray, k: int) -> float:
        onehot = np.eye(NUM_CATEGORIES)[x.astype(int)]
        return sum(stats.multinomial(1, probs[k, d]).logpmf(onehot[d]) for d in range(dim))

    return data, {"probs": probs}, log_density


CASES: dict[str, tuple[str, str | None, Callable[..., Any]]] = {
    **{
        f"gaussian-{ct}": ("gaussian", ct, _gaussian_case(ct))
        for ct in ("full", "diag", "spherical", "tied")
    },
    "poisson": ("poisson", None, _poisson),
    "exponential": ("exponential", None, _exponential),
    "bernoulli": ("bernoulli", None, _bernoulli),
    "categorical": ("categorical", None, _categorical),
}
SIZES = [(4, 3), (5, 2), (5, 3)]


def _brute_force(
    data: np.ndarray, weights: np.ndarray, log_density: Callable[[np.ndarray, int], float]
) -> tuple[float, np.ndarray]:
    """Log evidence and responsibilities ``(N, K)`` by summing over all ``K^N`` vectors."""
    num_data, num_components = data.shape[0], weights.shape[0]
    table = np.array(
        [[log_density(data[n], k) for k in range(num_components)] for n in range(num_data)]
    )
    log_weights = np.log(weights)
    vectors = list(itertools.product(range(num_components), repeat=num_data))
    log_joint = np.array(
        [sum(log_weights[z[n]] + table[n, z[n]] for n in range(num_data)) for z in vectors]
    )
    log_evidence = logsumexp(log_joint)
    posterior = np.exp(log_joint - log_evidence)
    resp = np.zeros((num_data, num_components))
    for z, mass in zip(vectors, posterior, strict=True):
        resp[np.arange(num_data), list(z)] += mass
    return float(log_evidence), resp


def _setup(case: str, num_data: int, num_components: int, seed: int) -> Any:
    family, covariance_type, make = CASES[case]
    rng = np.random.default_rng(seed)
    data, component_params, log_density = make(rng, num_data, num_components)
    weights = rng.dirichlet(np.full(num_components, 2.0))
    spec = pyroem.Mixture(num_components, family, covariance_type=covariance_type)
    init = {"weights": weights, **component_params}
    return spec, data, init, log_density


@pytest.mark.parametrize(("num_data", "num_components"), SIZES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_log_evidence_and_responsibilities_match_enumeration(
    case: str, num_data: int, num_components: int
) -> None:
    spec, data, init, log_density = _setup(case, num_data, num_components, seed=num_data)
    log_evidence, resp = _brute_force(data, init["weights"], log_density)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(spec, data, init=init, max_iter=0)
    np.testing.assert_allclose(fit.log_likelihood(), log_evidence, rtol=TOL)
    np.testing.assert_allclose(fit.history.log_likelihood[0], log_evidence, rtol=TOL)
    np.testing.assert_allclose(fit.predict_proba(data).numpy(), resp, rtol=TOL, atol=1e-14)
    # p(x | θ) factorises over points, so the pointwise scores sum to the evidence.
    np.testing.assert_allclose(
        fit.log_likelihood(pointwise=True).sum().item(), log_evidence, rtol=TOL
    )


def _expected_statistics(family: Any, data: np.ndarray, resp: np.ndarray) -> dict[str, np.ndarray]:
    """Sufficient statistics from brute-force responsibilities, as the families define them."""
    counts = resp.sum(0)
    if family.name == "gaussian":
        # Scatter of each component about its own weighted mean, computed directly.
        centered = data - family.shift.numpy()
        sum_x = resp.T @ centered
        deviations = centered[None] - (sum_x / counts[:, None])[:, None]  # (K, n, D)
        if family.covariance_type in ("full", "tied"):
            scatter = np.einsum("nk,knd,kne->kde", resp, deviations, deviations)
        else:
            scatter = np.einsum("nk,knd->kd", resp, deviations**2)
        return {"counts": counts, "sum_x": sum_x, "scatter": scatter}
    if family.name == "categorical":
        onehot = np.eye(NUM_CATEGORIES)[data.astype(int)].reshape(data.shape[0], -1)
        return {"counts": counts, "sum_onehot": resp.T @ onehot}
    return {"counts": counts, "sum_x": resp.T @ data}


@pytest.mark.parametrize("case", sorted(CASES))
def test_statistics_match_enumeration_for_every_chunk_size(case: str) -> None:
    num_data, num_components = 5, 3
    spec, data, init, log_density = _setup(case, num_data, num_components, seed=42)
    log_evidence, resp = _brute_force(data, init["weights"], log_density)

    tensor = torch.as_tensor(data, dtype=torch.float64)
    family = spec.bind(tensor)
    values = {key: value for key, value in init.items() if key != "weights"}
    params = MixtureParams(
        torch.as_tensor(init["weights"]),
        family.from_user(values, num_components, tensor),
        torch.arange(num_components),
    )
    expected = _expected_statistics(family, data, resp)
    results = {}
    for chunk_size in (1, 3, num_data):
        e_step = MixtureEStep(family, spec.weights_prior, tensor, chunk_size)
        results[chunk_size] = e_step(params)
        assert len(e_step.chunks) == -(-num_data // chunk_size)

    for chunk_size, result in results.items():
        np.testing.assert_allclose(result.log_likelihood, log_evidence, rtol=TOL)
        assert set(result.stats._fields) == set(expected), chunk_size
        for name, value in result.stats._asdict().items():
            np.testing.assert_allclose(
                value.numpy(), expected[name], rtol=TOL, atol=1e-12, err_msg=f"{name} {chunk_size}"
            )
    reference = results[num_data]
    for chunk_size in (1, 3):
        np.testing.assert_allclose(
            results[chunk_size].log_likelihood, reference.log_likelihood, rtol=1e-13
        )
        for mine, theirs in zip(results[chunk_size].stats, reference.stats, strict=True):
            np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=1e-13, atol=1e-13)
