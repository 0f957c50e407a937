"""The simulated Gaussian mixture problems the GMM benchmarks share (NumPy only, so
that a benchmark of another library can run in an environment without pyroem)."""

from __future__ import annotations

import numpy as np

__all__ = ["initial_params", "simulate"]


def simulate(
    num_data: int, dim: int, num_components: int, covariance_type: str, seed: int
) -> np.ndarray:
    """Well-separated Gaussian clusters with random covariances, ``(num_data, dim)``."""
    rng = np.random.default_rng(seed)
    means = 6.0 * rng.standard_normal((num_components, dim))
    weights = rng.dirichlet(np.full(num_components, 5.0))
    labels = rng.choice(num_components, size=num_data, p=weights)
    noise = rng.standard_normal((num_data, dim))
    if covariance_type in ("full", "tied"):
        count = num_components if covariance_type == "full" else 1
        factors = rng.standard_normal((count, dim, dim)) / np.sqrt(dim)
        factors += np.eye(dim)
        # Component by component: no (N, D, D) temporary at large N and D.
        for group in range(count):
            rows = labels % count == group
            noise[rows] = noise[rows] @ factors[group].T
    elif covariance_type == "diag":
        noise *= rng.uniform(0.5, 1.5, (num_components, dim))[labels]
    else:
        noise *= rng.uniform(0.5, 1.5, num_components)[labels, None]
    return means[labels] + noise


def initial_params(
    data: np.ndarray, num_components: int, covariance_type: str, seed: int
) -> dict[str, np.ndarray]:
    """Means at distinct random data points, the data covariance, equal weights."""
    rng = np.random.default_rng(seed + 1)
    dim = data.shape[1]
    means = data[rng.choice(data.shape[0], num_components, replace=False)]
    covariance = np.cov(data.T).reshape(dim, dim)
    covariances = {
        "full": np.repeat(covariance[None], num_components, axis=0),
        "tied": covariance,
        "diag": np.repeat(np.diag(covariance)[None], num_components, axis=0),
        "spherical": np.full(num_components, np.diag(covariance).mean()),
    }[covariance_type]
    weights = np.full(num_components, 1.0 / num_components)
    return {"weights": weights, "means": means, "covariances": covariances}
