"""Which components a fit removes, and so its log joint, does not depend on the dtype.

A component that no datum reaches gets responsibilities far below float32's range;
float64 used to keep it with a weight of about 1e-58 (and its log prior in the log
joint) where float32 removed it: same log-likelihood, log joints 80 nats apart.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import dirichlet

import pyroem


def _categorical_case() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    generator = np.random.default_rng(0)
    categories, features, size = 4, 40, 200
    patterns = generator.integers(0, categories, (2, features))
    data = patterns[generator.integers(0, 2, size)]
    noise = generator.random(data.shape) < 0.1
    data = np.where(noise, generator.integers(0, categories, data.shape), data)
    probs = np.full((3, features, categories), 0.02)
    for k in range(2):
        probs[k, np.arange(features), patterns[k]] = 0.94
    probs[2] = 0.01
    probs[2, :, 0] = 0.97  # a component no datum is near
    probs /= probs.sum(-1, keepdims=True)
    return data, {"weights": np.array([0.45, 0.45, 0.1]), "probs": probs}


def test_float32_and_float64_remove_the_same_components_and_agree_on_the_log_joint() -> None:
    data, init = _categorical_case()
    fits = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.CollapsedComponentWarning)
        for dtype in ("float32", "float64"):
            fits[dtype] = pyroem.fit(
                pyroem.Mixture(3, family="categorical"), data, dtype=dtype, init=init
            )
    single, double = fits["float32"], fits["float64"]
    assert single.removed_components == double.removed_components == [2]
    assert np.isclose(single.log_likelihood(), double.log_likelihood(), rtol=1e-6)
    assert np.isclose(single.log_joint(), double.log_joint(), rtol=1e-6)
    # The float64 value, recomputed independently: log-likelihood plus the log densities
    # of Dirichlet(1, 1) weights and Dirichlet(1.1) probabilities of the two components.
    probs = double.params["probs"].numpy()
    log_prior = dirichlet.logpdf(double.params["weights"].numpy(), [1.0, 1.0]) + sum(
        dirichlet.logpdf(row, np.full(4, 1.1)) for row in probs.reshape(-1, 4)
    )
    assert np.isclose(double.log_joint(), double.log_likelihood() + log_prior, rtol=1e-10)
