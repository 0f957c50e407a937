"""One answer from two paths.

A declarative :class:`pyroem.Mixture` is fitted by its fast tensor kernels; the
Pyro program it compiles to (``spec.model(data)``) can be fitted by the generic
path, which only sees a Pyro program: enumeration E-step, closed forms found by
probing. From the same start, both must produce the same iterates — the log
joint after every iteration and the parameters at the end — to 1e-8 relative in
float64, for every family, covariance type and prior.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch

import pyroem
from pyroem.errors import ConvergenceWarning

RTOL = 1e-8
NUM_ITERATIONS = 8

CASES = [
    ("gaussian", {"covariance_type": "full"}),
    ("gaussian", {"covariance_type": "diag"}),
    ("gaussian", {"covariance_type": "spherical"}),
    ("gaussian", {"covariance_type": "tied"}),
    ("poisson", {}),
    ("exponential", {}),
    ("bernoulli", {}),
    ("categorical", {"num_categories": 3}),
]

# What the generic path must recognise on each family's program (sites with a prior).
EXPECTED_KINDS = {
    "full": ("inverse-wishart-mvn-covariance", "normal-mvn-mean"),
    "tied": ("inverse-wishart-mvn-covariance", "normal-mvn-mean"),
    "diag": ("inverse-gamma-normal-variance", "normal-normal-mean"),
    "spherical": ("inverse-gamma-normal-variance", "normal-normal-mean"),
}


def _fit_fast(spec: pyroem.Mixture, data: torch.Tensor, iterations: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pyroem.fit(spec, data, max_iter=iterations, tol=0, seed=3)


def _fit_generic(model: Any, init: dict[str, torch.Tensor], iterations: int) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return pyroem.fit(model, max_iter=iterations, tol=0, init=init)


@pytest.mark.parametrize("prior", ["default", None])
@pytest.mark.parametrize(("family", "options"), CASES)
def test_generic_path_reproduces_fast_path(
    family: str, options: dict[str, Any], prior: str | None
) -> None:
    if family == "gaussian" and prior == "default":
        # The gaussian default is a weighted prior (poutine.scale), which the program's
        # closed forms leave to the gradient M-step; mclust's is a plain conjugate one.
        prior = "mclust"
    spec = pyroem.Mixture(3, family=family, prior=prior, **options)
    data, _ = spec.simulate(240, seed=11, dim=2)
    start = _fit_fast(spec, data, 0).params
    fast = _fit_fast(spec, data, NUM_ITERATIONS)

    model = spec.model(data, params=start)
    program = pyroem.ProgramModel(model)
    generic = _fit_generic(model, {name: start[name] for name in program.params}, NUM_ITERATIONS)

    assert generic.num_iterations == fast.num_iterations == NUM_ITERATIONS
    np.testing.assert_allclose(generic.history.objective, fast.history.objective, rtol=RTOL)
    np.testing.assert_allclose(
        generic.history.log_likelihood, fast.history.log_likelihood, rtol=RTOL
    )
    for name, value in generic.params.items():
        np.testing.assert_allclose(
            value.numpy(), fast.params[name].numpy(), rtol=RTOL, atol=RTOL, err_msg=name
        )
    # Every site got a closed form, so the paths are the same algorithm, not two optimisers.
    assert "gradient" not in generic.m_step_kinds.values()
    covariance_type = options.get("covariance_type")
    if prior is not None and covariance_type is not None:
        kinds = (generic.m_step_kinds["covariances"], generic.m_step_kinds["means"])
        assert kinds == EXPECTED_KINDS[covariance_type]
    responsibilities = fast.predict_proba(data)
    np.testing.assert_allclose(
        generic.marginals["assignment"].numpy(), responsibilities.numpy(), rtol=1e-7, atol=1e-12
    )
