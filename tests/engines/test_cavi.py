"""Closed-form mean-field VB (``method="vb-em"`` on a ``Mixture``): invariants and checks.

- The ELBO never decreases (coordinate ascent), swept over random data and seeds for
  every family and covariance type.
- The ELBO *value* equals an independent Monte Carlo estimate of
  ``E_q[log p(x, z, π, θ) − log q(z, π, θ)]``, with ``log p`` from the Pyro program
  ``spec.model(data)`` and ``q`` rebuilt with ``torch.distributions`` from
  ``fit.variational``, so no constant can hide.
- ``fit.params`` are the posterior means of ``q``; the history, draws, chunking,
  restarts and errors behave as documented.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
import torch.distributions as td
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.poutine.util import site_is_subsample
from reference_densities import component_log_prob

import pyroem
from pyroem.datasets import load_faithful
from pyroem.engines.cavi import VariationalFit

DTYPE = torch.float64
CASES = {
    "gaussian-full": ("gaussian", "full"),
    "gaussian-diag": ("gaussian", "diag"),
    "gaussian-spherical": ("gaussian", "spherical"),
    "gaussian-tied": ("gaussian", "tied"),
    "poisson": ("poisson", None),
    "exponential": ("exponential", None),
    "bernoulli": ("bernoulli", None),
    "categorical": ("categorical", None),
}


def _fit(spec: pyroem.Mixture, data: Any, **kwargs: Any) -> VariationalFit:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        return pyroem.fit(spec, data, method="vb-em", **kwargs)


# ----- monotone ascent ------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@settings(deadline=None, max_examples=8, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_components=st.integers(1, 4),
    num_data=st.integers(8, 120),
    dim=st.integers(1, 3),
    init=st.sampled_from(["kmeans++", "random", "random_from_data"]),
    weights_prior=st.sampled_from([0.05, 1.0, 3.0]),
    chunk_size=st.sampled_from([7, 65536]),
)
def test_elbo_never_decreases(
    case: str,
    seed: int,
    num_components: int,
    num_data: int,
    dim: int,
    init: str,
    weights_prior: float,
    chunk_size: int,
) -> None:
    family, covariance_type = CASES[case]
    spec = pyroem.Mixture(
        num_components, family, covariance_type=covariance_type, weights_prior=weights_prior
    )
    data, _ = spec.simulate(max(num_data, num_components), seed=seed, dim=dim)
    fit = _fit(spec, data, init=init, seed=seed, tol=1e-10, max_iter=150, chunk_size=chunk_size)
    elbo = fit.history.objective
    assert np.isfinite(elbo).all()
    assert np.isfinite(fit.history.log_likelihood).all()
    # Coordinate ascent: no decrease beyond the rounding of an O(|ELBO|) sum.
    slack = 1e-9 * (1 + np.abs(elbo[:-1]))
    assert (np.diff(elbo) >= -slack).all(), np.diff(elbo).min()
    assert fit.elbo == elbo[-1]
    np.testing.assert_allclose(fit.params["weights"].sum().item(), 1.0, rtol=1e-12)


# ----- the ELBO value against Monte Carlo -------------------------------------------


def _q_distributions(fit: VariationalFit, case: str) -> tuple[Any, Any]:
    """``q(π)`` and a sampler/log-density of ``q(θ)`` in site form, from ``fit.variational``."""
    family, covariance_type = CASES[case]
    weights = td.Dirichlet(fit.variational["weights"]["concentration"])
    q = fit.variational["components"]
    if family in ("poisson", "exponential"):
        rates = td.Gamma(q["concentration"], q["rate"])
        return weights, lambda: _single("rates", rates)
    if family == "bernoulli":
        probs = td.Beta(q["concentration1"], q["concentration0"])
        return weights, lambda: _single("probs", probs)
    if family == "categorical":
        probs = td.Dirichlet(q["concentration"])
        return weights, lambda: _single("probs", probs)
    mean, kappa, dof, scale = q["mean"], q["mean_precision"], q["dof"], q["scale"]

    def gaussian() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if covariance_type in ("full", "tied"):
            covariance_q = pyroem.InverseWishart(dof, scale)
            covariances = covariance_q.sample()
            shared = (
                covariances if covariance_type == "full" else covariances.expand(len(kappa), -1, -1)
            )
            mean_q = td.MultivariateNormal(mean, shared / kappa[:, None, None])
            means = mean_q.sample()
            log_q = covariance_q.log_prob(covariances).sum() + mean_q.log_prob(means).sum()
            return {"means": means, "covariances": covariances}, log_q
        # diag: one InverseGamma per variance; spherical: one per component.
        concentration = dof[:, None] / 2 if covariance_type == "diag" else dof / 2
        variance_q = td.InverseGamma(concentration, scale / 2)
        covariances = variance_q.sample()
        variances = covariances if covariance_type == "diag" else covariances[:, None]
        mean_q = td.Normal(mean, (variances / kappa[:, None]).sqrt().expand_as(mean))
        means = mean_q.sample()
        log_q = variance_q.log_prob(covariances).sum() + mean_q.log_prob(means).sum()
        return {"means": means, "covariances": covariances}, log_q

    return weights, gaussian


def _single(name: str, q: td.Distribution) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    value = q.sample()
    return {name: value}, q.log_prob(value).sum()


def _program_log_joint(
    spec: pyroem.Mixture, data: torch.Tensor, values: dict[str, torch.Tensor], resp: torch.Tensor
) -> torch.Tensor:
    """``E_q(z)[log p(x, z, π, θ)]`` from the Pyro program's log densities: the
    program is run with every ``z_n = k`` in turn and weighted by ``r_nk``."""
    model = spec.model(data)
    total = torch.zeros((), dtype=DTYPE)
    for k in range(resp.shape[1]):
        assignment = torch.full((data.shape[0],), k, dtype=torch.long)
        conditioned = poutine.condition(model, data={**values, "assignment": assignment})
        trace = poutine.trace(conditioned).get_trace()
        trace.compute_log_prob()
        local = trace.nodes["assignment"]["log_prob"] + trace.nodes["obs"]["log_prob"]
        total = total + (resp[:, k] * local).sum()
        if k == 0:
            sites = {
                name
                for name, site in trace.nodes.items()
                if site["type"] == "sample" and not site_is_subsample(site)
            }
            assert sites == {*values, "assignment", "obs"}  # every prior term is counted
            total = total + sum(trace.nodes[name]["log_prob_sum"] for name in values)
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_elbo_equals_monte_carlo_estimate(case: str) -> None:
    """The reported ELBO against ``H(q(z)) + E_{q(π,θ)}[f(π, θ)]`` by Monte Carlo, with
    ``f = E_q(z)[log p(x, z, π, θ)] − log q(π, θ)`` (the z-sum is exact).

    Tolerance: when ``q(π, θ)`` is the conjugate update of ``q(z)``, as it is in every
    state CAVI reports, ``f`` is the same number for every draw (``q(π, θ) ∝ p(π, θ)
    Π p(x_n, z_n = k | π, θ)^{r_nk}``), so its sample standard deviation is round-off; a
    ``q`` that were not that update would show a spread. The mean must match within
    4 standard errors plus 1e-9 relative round-off.
    """
    family, covariance_type = CASES[case]
    # vb-em needs a proper prior: for gaussians its default is mclust's, named here so
    # that spec.model() declares the same prior.
    prior = "mclust" if family == "gaussian" else "default"
    spec = pyroem.Mixture(
        2, family, covariance_type=covariance_type, weights_prior=0.7, prior=prior
    )
    data, _ = spec.simulate(40, seed=3, dim=2)
    # A few iterations only: the check holds in every state, not just at convergence.
    fit = _fit(spec, data, seed=1, tol=0.0, max_iter=3, num_draws=0)
    resp = fit.variational["assignment"]["probs"]
    entropy = -torch.special.xlogy(resp, resp).sum()
    weights_q, components_q = _q_distributions(fit, case)
    torch.manual_seed(0)
    values = []
    for _ in range(40):
        weights = weights_q.sample()
        components, log_q = components_q()
        sites = {"weights": weights, **components}
        log_p = _program_log_joint(spec, data, sites, resp)
        values.append(float(log_p - weights_q.log_prob(weights) - log_q))
    samples = np.array(values)
    standard_error = samples.std(ddof=1) / math.sqrt(len(samples))
    assert samples.std() < 1e-8 * abs(fit.elbo)
    estimate = float(entropy) + samples.mean()
    assert abs(estimate - fit.elbo) <= 4 * standard_error + 1e-9 * abs(fit.elbo), (
        estimate,
        fit.elbo,
    )


# ----- results ------------------------------------------------------------------


def test_params_history_and_labels_are_the_documented_ones() -> None:
    data = load_faithful().data
    spec = pyroem.Mixture(2, "gaussian", covariance_type="full")
    long = _fit(spec, data, seed=0, tol=0.0, max_iter=6)
    short = _fit(spec, data, seed=0, tol=0.0, max_iter=2)
    assert isinstance(long, VariationalFit) and isinstance(long, pyroem.FitResult)
    assert long.method == "vb-em"
    # Entry t of the history is state t: its ELBO and its expected parameters' likelihood.
    assert short.elbo == long.history.objective[2]
    assert math.isclose(short.log_likelihood(), long.history.log_likelihood[2], rel_tol=1e-12)
    np.testing.assert_array_equal(long.sample_stats["elbo"], long.history.objective)
    # log-likelihood at E_q[θ], by an independent density table.
    params = long.params
    table = params["weights"].log() + component_log_prob("gaussian", "full", data, params)
    assert math.isclose(
        long.log_likelihood(), float(torch.logsumexp(table, -1).sum()), rel_tol=1e-12
    )
    # E_q[π] = α̂ / Σα̂ and E_q[Σ] = Ψ / (ν − D − 1).
    q = long.variational
    alpha = q["weights"]["concentration"]
    torch.testing.assert_close(params["weights"], alpha / alpha.sum())
    components = q["components"]
    dof = components["dof"][:, None, None]
    torch.testing.assert_close(params["covariances"], components["scale"] / (dof - 3))
    torch.testing.assert_close(params["means"], components["mean"])
    # Labels are q(z)'s; predict applies the variational E-step to the final q.
    resp = q["assignment"]["probs"]
    assert resp.shape == (data.shape[0], 2)
    torch.testing.assert_close(resp.sum(1), torch.ones(data.shape[0], dtype=DTYPE))
    torch.testing.assert_close(long.labels, resp.argmax(1))
    assert (long.predict(data) == long.labels).float().mean() > 0.99
    assert "ELBO" in long.summary() and "effective" in long.summary()


def test_draws_come_from_q() -> None:
    spec = pyroem.Mixture(3, "poisson", weights_prior=0.5)
    data, _ = spec.simulate(200, seed=2, dim=2)
    num_draws = 4000
    fit = _fit(spec, data, seed=4, num_draws=num_draws)
    assert set(fit.draws) == set(fit.params)
    assert fit.draws["weights"].shape == (4, num_draws // 4, 3)
    assert fit.draws["rates"].shape == (4, num_draws // 4, 3, 2)
    # Draw means against E_q, within 4.5 Monte Carlo standard errors (18 checks at once).
    for name in ("weights", "rates"):
        draws = fit.draws[name].flatten(0, 1)
        error = draws.std(0) / math.sqrt(num_draws)
        assert ((draws.mean(0) - fit.params[name]).abs() <= 4.5 * error).all(), name
    q = fit.variational["components"]
    variance = q["concentration"] / q["rate"] ** 2
    draws = fit.draws["rates"].flatten(0, 1)
    # Var of the sample variance ≈ (μ4 − σ⁴)/S = (6/a + 2) σ⁴/S for a Gamma(a, b).
    sd = variance * torch.sqrt((6 / q["concentration"] + 2) / num_draws)
    assert ((draws.var(0) - variance).abs() <= 4.5 * sd).all()
    again = _fit(spec, data, seed=4, num_draws=num_draws)
    torch.testing.assert_close(again.draws["rates"], fit.draws["rates"], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["gaussian-full", "gaussian-diag", "gaussian-tied", "categorical"])
def test_chunking_changes_nothing(case: str) -> None:
    family, covariance_type = CASES[case]
    spec = pyroem.Mixture(3, family, covariance_type=covariance_type)
    data, _ = spec.simulate(150, seed=8, dim=3)
    whole = _fit(spec, data, seed=5, max_iter=40, num_draws=0)
    chunked = _fit(spec, data, seed=5, max_iter=40, num_draws=0, chunk_size=16)
    np.testing.assert_allclose(chunked.history.objective, whole.history.objective, rtol=1e-11)
    for name, value in whole.params.items():
        torch.testing.assert_close(chunked.params[name], value, rtol=1e-9, atol=1e-12)


def test_restarts_keep_the_highest_elbo() -> None:
    data = load_faithful().data
    spec = pyroem.Mixture(4, "gaussian", weights_prior=0.1)
    fit = _fit(spec, data, seed=2, n_init=3, num_draws=0)
    assert len(fit.restart_objectives) == 3
    assert fit.elbo == max(fit.restart_objectives)
    warm = _fit(spec, data, init=fit, seed=2, num_draws=0)
    assert warm.elbo >= fit.elbo - 1e-6 * abs(fit.elbo)


# ----- errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "prior"),
    [
        ("gaussian", None),
        ("gaussian", pyroem.NormalInverseWishart(mean_precision=0.0)),
        ("poisson", None),
        ("bernoulli", None),
    ],
)
def test_flat_prior_is_refused(family: str, prior: Any) -> None:
    spec = pyroem.Mixture(2, family, prior=prior)
    data, _ = pyroem.Mixture(2, family).simulate(30, seed=0, dim=2)
    with pytest.raises(pyroem.SpecError, match=r"vb-em needs a proper prior.*prior='default'"):
        pyroem.fit(spec, data, method="vb-em")


def test_bad_options_are_refused() -> None:
    data = load_faithful().data
    spec = pyroem.Mixture(2, "gaussian")
    with pytest.raises(pyroem.SpecError, match="num_samples"):
        pyroem.fit(spec, data, method="vb-em", num_samples=10)
    with pytest.raises(pyroem.SpecError, match="num_draws"):
        pyroem.fit(spec, data, method="vb-em", num_draws=-1)
    with pytest.raises(pyroem.SpecError, match="weight_threshold"):
        pyroem.fit(spec, data, method="vb-em", weight_threshold=2)
    small_dof = pyroem.Mixture(2, "gaussian", prior=pyroem.NormalInverseWishart(dof=1.0))
    with pytest.raises(pyroem.SpecError, match="dof must exceed dim - 1 = 1"):
        pyroem.fit(small_dof, data, method="vb-em")
