r"""A mixture program's E-step takes its weights without autograd.

When every chain of a program's plan has one latent (a mixture per data point), the
gradient of the log evidence in each table is the posterior of that latent, summed
over the dimensions the table is broadcast along; the compiled E-step writes it out
instead of backpropagating. Held against independent references, with
``torch.autograd.grad`` counted (the written-out path calls it never):

- a Gaussian mixture program fitted by map-em has, iteration by iteration, the log
  likelihood and parameters of the declarative ``pyroem.Mixture`` fitted from the same
  start (1e-9), and its responsibilities are scikit-learn's ``predict_proba`` at the
  fitted parameters;
- masked data, ``poutine.scale``, a nested feature plate and an observation of the
  latent with a table of its own: the E-step's log likelihood is Pyro's
  ``TraceEnum_ELBO`` loss and its marginals Pyro's ``compute_marginals``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from sklearn.mixture import GaussianMixture
from torch.distributions import constraints

import pyroem
from pyroem.estep.compiled import CompiledProgram
from pyroem.model.program import ProgramModel

NUM_COMPONENTS = 3


@pytest.fixture(autouse=True)
def _float64() -> Any:
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


class _GradCalls:
    """Counts ``torch.autograd.grad`` calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = torch.autograd.grad

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(torch.autograd, "grad", counted)


def _data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(5)
    centres = torch.tensor([[-3.0, 0.0], [0.0, 2.5], [3.0, -1.0]])
    labels = torch.randint(NUM_COMPONENTS, (240,), generator=generator)
    scales = torch.tensor([0.6, 1.0, 0.8])[labels, None]
    return centres[labels] + scales * torch.randn(240, 2, generator=generator)


START = {
    "weights": torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
    "locs": torch.tensor([[-2.0, 0.5], [0.5, 1.5], [2.0, 0.0]], dtype=torch.float64),
    "variances": torch.tensor([[1.0, 1.2], [0.8, 1.0], [1.5, 1.1]], dtype=torch.float64),
}


def _mixture(data: torch.Tensor) -> None:
    weights = pyro.param(
        "weights", lambda: START["weights"].clone(), constraint=constraints.simplex
    )
    locs = pyro.param("locs", lambda: START["locs"].clone())
    variances = pyro.param(
        "variances", lambda: START["variances"].clone(), constraint=constraints.positive
    )
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[z], variances[z].sqrt()).to_event(1), obs=data)


def test_mixture_program_matches_the_declarative_fit_without_autograd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _data()
    counter = _GradCalls(monkeypatch)
    common = {"method": "map-em", "max_iter": 8, "tol": 0.0, "seed": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(_mixture, data, **common)
    assert counter.calls == 0
    spec = pyroem.Mixture(NUM_COMPONENTS, pyroem.Gaussian("diag", prior=None))
    init = {
        "weights": START["weights"],
        "means": START["locs"],
        "covariances": START["variances"],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        other = pyroem.fit(spec, data, init=init, **common)
    history = np.asarray(fit.history.log_likelihood)
    assert history[-1] - history[0] > 10.0  # EM moved
    np.testing.assert_allclose(history, other.history.log_likelihood, rtol=1e-9, atol=0)
    np.testing.assert_allclose(fit.params["locs"], other.params["means"], rtol=1e-9)
    np.testing.assert_allclose(fit.params["variances"], other.params["covariances"], rtol=1e-9)

    reference = GaussianMixture(NUM_COMPONENTS, covariance_type="diag")
    reference.weights_ = fit.params["weights"].numpy()
    reference.means_ = fit.params["locs"].numpy()
    reference.covariances_ = fit.params["variances"].numpy()
    reference.precisions_cholesky_ = 1 / np.sqrt(reference.covariances_)
    expected = reference.predict_proba(data.numpy())
    np.testing.assert_allclose(fit.marginals["z"].numpy(), expected, atol=1e-10)


def _masked_scaled_mixture(data: torch.Tensor, observed: torch.Tensor) -> None:
    weights = pyro.param("weights", torch.tensor([0.2, 0.5, 0.3]), constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([[-2.0, 0.5], [0.5, 1.5], [2.0, 0.0]]))
    scales = pyro.param(
        "scales",
        torch.tensor([[1.0, 1.2], [0.8, 1.0], [1.5, 1.1]]),
        constraint=constraints.positive,
    )
    tags = pyro.param(
        "tags", torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]]), constraint=constraints.simplex
    )
    with poutine.scale(scale=2.5), pyro.plate("data", data.shape[0], dim=-2):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        # The latent observed by a second site: a table of the latent alone.
        pyro.sample("tag", dist.Categorical(tags[z]), obs=(data[:, :1] > 0).long())
        with pyro.plate("features", data.shape[1], dim=-1), poutine.mask(mask=observed):
            pyro.sample("obs", dist.Normal(locs[z[..., 0]], scales[z[..., 0]]), obs=data)


def test_masked_scaled_mixture_estep_is_pyros_without_autograd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _data()[:60]
    observed = torch.rand(data.shape, generator=torch.Generator().manual_seed(2)) > 0.2
    args = (data, observed)
    program = ProgramModel(_masked_scaled_mixture, args)
    values = {name: value.detach() for name, value in program.param_inits.items()}
    trace = program.trace(values)
    compiled = CompiledProgram(program, trace)
    assert compiled.plan is not None and compiled.plan.mixture
    counter = _GradCalls(monkeypatch)
    estep = compiled.estimate_trace(trace)
    marginals = compiled.marginals(estep)
    assert counter.calls == 0

    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    with pyro.get_param_store().scope():
        log_likelihood = -elbo.loss(_masked_scaled_mixture, lambda *_: None, *args)
        expected = elbo.compute_marginals(_masked_scaled_mixture, lambda *_: None, *args)
    assert float(estep.log_likelihood) == pytest.approx(log_likelihood, rel=1e-12)
    torch.testing.assert_close(
        marginals["z"].reshape(-1, NUM_COMPONENTS),
        expected["z"].probs.reshape(-1, NUM_COMPONENTS),
        rtol=1e-10,
        atol=1e-12,
    )
