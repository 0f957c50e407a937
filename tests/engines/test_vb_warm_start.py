"""A vb-em fit given a previous vb-em fit as ``init`` continues its ``q``: stopping
after 5 iterations and going on for 4 more is the uninterrupted 10-iteration run."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pyroem
from pyroem.datasets import load_faithful


@pytest.mark.parametrize("weights_prior_type", ["dirichlet_distribution", "dirichlet_process"])
def test_vb_em_continues_from_a_previous_fit(weights_prior_type: str) -> None:
    data = load_faithful().data.numpy()
    spec = pyroem.Mixture(3, "gaussian", covariance_type="full", weights_prior=0.5)
    options = {
        "method": "vb-em",
        "tol": 0.0,
        "seed": 0,
        "num_draws": 0,
        "weights_prior_type": weights_prior_type,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        whole = pyroem.fit(spec, data, max_iter=10, **options)
        first = pyroem.fit(spec, data, max_iter=5, **options)
        rest = pyroem.fit(spec, data, max_iter=4, init=first, **options)
    np.testing.assert_allclose(first.history.objective, whole.history.objective[:6], rtol=1e-12)
    np.testing.assert_allclose(rest.history.objective, whole.history.objective[6:], rtol=1e-12)
    assert rest.history.objective[0] > first.history.objective[-1]
    for key, value in whole.variational["components"].items():
        np.testing.assert_allclose(rest.variational["components"][key], value, rtol=1e-10)
