"""Agreement with scikit-learn's variational Gaussian mixture.

``BayesianGaussianMixture(weight_concentration_prior_type="dirichlet_distribution",
reg_covar=0)`` runs mean-field coordinate ascent (Bishop, PRML §10.2) on a
Normal–Wishart model. With the priors matched and the same initial responsibilities
it must follow pyroem's CAVI iteration for iteration: the ELBO after each iteration,
the final variational parameters and the responsibilities under them.

Matching the models, covariance type by covariance type (read off scikit-learn's
``_estimate_wishart_*``, ``_estimate_log_prob`` and ``_compute_lower_bound``):

- ``full``: the same model. pyroem's ``NormalInverseWishart(mean=m0,
  mean_precision=κ0, dof=ν0, scale=Ψ0)`` is scikit-learn's ``mean_prior=m0,
  mean_precision_prior=κ0, degrees_of_freedom_prior=ν0, covariance_prior=Ψ0``
  (``Λ ~ Wishart(ν0, Ψ0⁻¹)`` is ``Σ ~ InverseWishart(ν0, Ψ0)``).
- ``tied``: scikit-learn updates its shared precision with ``N/K`` observations
  (``dof = ν0' + N/K``, scale ``Ψ0' + S/K``), which is pyroem's update (``ν0 + N``,
  ``Ψ0 + S``) divided by ``K`` once ``ν0' = ν0/K`` and ``Ψ0' = Ψ0/K``. Then
  ``E_q[Λ] = ν Ψ⁻¹`` is the same, the ``E_q[log |Λ|]`` term is common to all
  components and cancels from the responsibilities, and the lower bounds differ by a
  constant: the same path.
- ``diag`` and ``spherical``: scikit-learn's ``E_q[log |Λ|]`` is the Wishart one,
  ``Σ_d ψ((ν − d)/2)``, not ``D ψ(ν/2)`` of independent Gamma precisions, and its
  spherical update counts ``N_k`` observations rather than ``D·N_k`` coordinates;
  for ``D > 1`` neither is the Normal–Inverse-Gamma model pyroem's Pyro program
  declares. For ``D = 1`` all three are that model, so these two types are compared
  on one-dimensional data.

scikit-learn drops constants from ``lower_bound_``; each case adds its constant back
exactly (derived below), so the ELBO values themselves are compared, not only their
changes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from scipy.special import gammaln, logsumexp, multigammaln
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture
from threadpoolctl import threadpool_limits

import pyroem
from pyroem.datasets import load_faithful

# Both sides compute the same float64 arithmetic in a different order (BLAS sums, a
# Cholesky of Ψ against one of Ψ/ν, ...): a few hundred flops per datum summed over
# 272 data, through iterations of a contracting map, leave round-off near 1e-13
# relative. 1e-9 keeps headroom for other BLAS builds, while a wrong formula (a
# missing κ term, ν off by one, a wrong constant) moves these numbers by 1e-4 or more.
RTOL = 1e-9
NUM_ITERATIONS = 30
NUM_COMPONENTS = 3
WEIGHTS_PRIOR = 0.7


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread() -> Any:
    """scikit-learn's many tiny triangular solves stall on contended BLAS threads."""
    with threadpool_limits(limits=1):
        yield


class _InjectedStart(BayesianGaussianMixture):
    """``BayesianGaussianMixture`` whose first M-step uses given responsibilities."""

    def __init__(self, start_resp: np.ndarray | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_resp = start_resp

    def _initialize_parameters(self, X: np.ndarray, random_state: Any, xp: Any = None) -> None:
        self._initialize(X, self.start_resp)


def _faithful(columns: list[int]) -> np.ndarray:
    data = load_faithful().data.numpy()[:, columns]
    return (data - data.mean(0)) / data.std(0)


def _start(covariance_type: str, dim: int) -> dict[str, np.ndarray]:
    """Starting parameters in ``fit.params`` form."""
    means = np.array([[-1.2] * dim, [0.1] * dim, [1.0] * dim])
    covariances = {
        "full": np.stack([0.3 * np.eye(dim), 0.6 * np.eye(dim) + 0.1, 0.4 * np.eye(dim)]),
        "tied": 0.5 * np.eye(dim) + 0.05,
        "diag": np.array([[0.3] * dim, [0.6] * dim, [0.4] * dim]),
        "spherical": np.array([0.3, 0.6, 0.4]),
    }[covariance_type]
    return {"weights": np.array([0.3, 0.3, 0.4]), "means": means, "covariances": covariances}


def _start_responsibilities(data: np.ndarray, start: dict[str, np.ndarray], kind: str) -> Any:
    """Exact posterior responsibilities of the starting parameters, by SciPy."""
    dim = data.shape[1]
    covariances = start["covariances"]
    full = {
        "full": lambda: covariances,
        "tied": lambda: np.repeat(covariances[None], NUM_COMPONENTS, 0),
        "diag": lambda: np.stack([np.diag(c) for c in covariances]),
        "spherical": lambda: np.stack([c * np.eye(dim) for c in covariances]),
    }[kind]()
    log_joint = np.stack(
        [
            multivariate_normal(start["means"][k], full[k]).logpdf(data).reshape(-1)
            for k in range(NUM_COMPONENTS)
        ],
        1,
    ) + np.log(start["weights"])
    return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))


def _prior(dim: int) -> dict[str, Any]:
    scale = 0.8 * np.eye(dim) + 0.1 * np.ones((dim, dim))
    return {"mean": np.full(dim, 0.2), "mean_precision": 0.5, "dof": dim + 4.0, "scale": scale}


def _omitted_constant(prior: dict[str, Any], num_data: int, kind: str) -> float:
    """pyroem's ELBO minus scikit-learn's ``lower_bound_`` (independent of the data).

    With ``q(π, θ)`` optimal for ``q(z)`` the ELBO is ``H(q(z)) + log B(α̂)/B(α)`` plus
    the Normal–Inverse-Wishart normaliser ratio ``Σ_k [−N_k D/2 log π + D/2 log κ0/κ_k
    + ν0/2 log|Ψ0| − ν_k/2 log|Ψ_k| + log Γ_D(ν_k/2) − log Γ_D(ν0/2)]``; scikit-learn
    keeps ``H + log B(α̂) − D/2 Σ log κ_k − Σ_k log W(ν_k, Ψ_k)`` with
    ``−log W = −ν/2 log|Ψ| + ν D/2 log 2 + Σ_{d<D} log Γ((ν − d)/2)``. The differences
    depend on ``N = Σ_k N_k`` and the prior only.
    """
    dim = len(prior["mean"])
    kappa0, nu0 = prior["mean_precision"], prior["dof"]
    log_det0 = np.linalg.slogdet(np.atleast_2d(prior["scale"]))[1]
    log_beta0 = NUM_COMPONENTS * gammaln(WEIGHTS_PRIOR) - gammaln(NUM_COMPONENTS * WEIGHTS_PRIOR)
    if kind == "tied":
        # One shared Σ with ν = ν0 + N and Ψ = K Ψ_sklearn; scikit-learn counts K Wishart
        # normalisers at ν/K.
        nu = nu0 + num_data
        per_sklearn = sum(gammaln((nu / NUM_COMPONENTS - d) / 2) for d in range(dim))
        return (
            -log_beta0
            - 0.5 * num_data * dim * math.log(math.pi)
            + 0.5 * NUM_COMPONENTS * dim * math.log(kappa0)
            + 0.5 * nu0 * log_det0
            - multigammaln(nu0 / 2, dim)
            + multigammaln(nu / 2, dim)
            - 0.5 * nu * dim * math.log(NUM_COMPONENTS)
            - 0.5 * nu * dim * math.log(2)
            - NUM_COMPONENTS * per_sklearn
        )
    per_component = (
        0.5 * dim * math.log(kappa0)
        + 0.5 * nu0 * log_det0
        - multigammaln(nu0 / 2, dim)
        - 0.5 * nu0 * dim * math.log(2)
        + 0.25 * dim * (dim - 1) * math.log(math.pi)
    )
    return (
        -log_beta0 - 0.5 * num_data * dim * math.log(2 * math.pi) + NUM_COMPONENTS * per_component
    )


def _sklearn_prior(prior: dict[str, Any], kind: str) -> dict[str, Any]:
    shrink = NUM_COMPONENTS if kind == "tied" else 1
    scale = prior["scale"] / shrink
    covariance_prior = {
        "full": scale,
        "tied": scale,
        "diag": np.diag(scale),
        "spherical": float(np.diag(scale).mean()),
    }[kind]
    return {
        "mean_prior": prior["mean"],
        "mean_precision_prior": prior["mean_precision"],
        "degrees_of_freedom_prior": prior["dof"] / shrink,
        "covariance_prior": covariance_prior,
    }


CASES = [("full", [0, 1]), ("tied", [0, 1]), ("diag", [1]), ("spherical", [0])]


@pytest.mark.parametrize(("covariance_type", "columns"), CASES, ids=[c[0] for c in CASES])
def test_cavi_follows_sklearn(covariance_type: str, columns: list[int]) -> None:
    data = _faithful(columns)
    num_data, dim = data.shape
    start = _start(covariance_type, dim)
    prior = _prior(dim)
    spec = pyroem.Mixture(
        NUM_COMPONENTS,
        "gaussian",
        covariance_type=covariance_type,
        prior=pyroem.NormalInverseWishart(**prior),
        weights_prior=WEIGHTS_PRIOR,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            spec, data, method="vb-em", init=start, tol=0, max_iter=NUM_ITERATIONS, num_draws=0
        )

    # pyroem's entry 0 is the state after one E-step from the start (q(z) from θ_0, then
    # its conjugate q(π, θ)): scikit-learn's first iteration. So T + 1 iterations there.
    model = _InjectedStart(
        start_resp=_start_responsibilities(data, start, covariance_type),
        n_components=NUM_COMPONENTS,
        covariance_type=covariance_type,
        weight_concentration_prior_type="dirichlet_distribution",
        weight_concentration_prior=WEIGHTS_PRIOR,
        reg_covar=0.0,
        tol=0.0,
        max_iter=NUM_ITERATIONS + 1,
        **_sklearn_prior(prior, covariance_type),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        model.fit(data)

    bounds = np.array([float(np.sum(bound)) for bound in model.lower_bounds_])
    expected = bounds + _omitted_constant(prior, num_data, covariance_type)
    elbo = fit.history.objective
    assert elbo.shape == (NUM_ITERATIONS + 1,)
    np.testing.assert_allclose(elbo, expected, rtol=RTOL, atol=0)
    assert elbo[-1] - elbo[0] > 1.0  # the path moved: the comparison is not of a fixed point
    assert fit.elbo == pytest.approx(expected[-1], rel=RTOL)

    variational = fit.variational
    components = {key: value.numpy() for key, value in variational["components"].items()}
    shrink = NUM_COMPONENTS if covariance_type == "tied" else 1
    dof = components["dof"]
    scale = components["scale"]
    normalised = {
        "full": lambda: scale / dof[:, None, None],
        "tied": lambda: scale / dof,
        "diag": lambda: scale / dof[:, None],
        "spherical": lambda: scale / dof,
    }[covariance_type]()
    np.testing.assert_allclose(
        variational["weights"]["concentration"].numpy(), model.weight_concentration_, rtol=RTOL
    )
    np.testing.assert_allclose(components["mean_precision"], model.mean_precision_, rtol=RTOL)
    np.testing.assert_allclose(components["mean"], model.means_, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(dof / shrink, model.degrees_of_freedom_, rtol=RTOL)
    np.testing.assert_allclose(normalised, model.covariances_, rtol=RTOL, atol=RTOL)
    # The variational E-step on the final q: scikit-learn's predict_proba is the same.
    np.testing.assert_allclose(
        fit.predict_proba(data).numpy(), model.predict_proba(data), rtol=1e-7, atol=1e-12
    )
    # params are the posterior means: E_q[π] = α̂/Σα̂ and E_q[Σ] = Ψ/(ν − p − 1).
    alpha = model.weight_concentration_
    np.testing.assert_allclose(fit.params["weights"].numpy(), alpha / alpha.sum(), rtol=RTOL)
    p = dim if covariance_type in ("full", "tied") else 1
    mean_cov = {
        "full": lambda: scale / (dof - p - 1)[:, None, None],
        "tied": lambda: scale / (dof - p - 1),
        "diag": lambda: scale / (dof - p - 1)[:, None],
        "spherical": lambda: scale / (dof - p - 1),
    }[covariance_type]()
    np.testing.assert_allclose(fit.params["covariances"].numpy(), mean_cov, rtol=RTOL)


def test_superfluous_components_collapse_like_sklearn() -> None:
    """K = 6 on Old Faithful with a sparse Dirichlet(0.01) prior: two clusters remain.

    The component prior is scikit-learn's default (mean 0 and covariance scale the
    data's, mean_precision 1) except ``dof = D + 2``, so that pyroem's ``params`` are
    the posterior means ``E_q[Σ]``. Both start from the same responsibilities and run
    to the same tolerance (scikit-learn's is on the bound, pyroem's per datum), so they
    stop at the same iteration of the same path and agree to round-off (``RTOL``).
    """
    data = _faithful([0, 1])
    num_data = data.shape[0]
    num_components, alpha = 6, 0.01
    prior = {"mean": np.zeros(2), "mean_precision": 1.0, "dof": 4.0, "scale": np.cov(data.T)}
    rng = np.random.default_rng(0)
    start = {
        "weights": np.full(num_components, 1 / num_components),
        "means": data[rng.choice(num_data, num_components, replace=False)],
        "covariances": np.repeat(0.3 * np.cov(data.T)[None], num_components, 0),
    }
    log_joint = np.stack(
        [
            multivariate_normal(mean, start["covariances"][0]).logpdf(data)
            for mean in start["means"]
        ],
        1,
    )
    resp = np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
    spec = pyroem.Mixture(
        num_components,
        "gaussian",
        prior=pyroem.NormalInverseWishart(**prior),
        weights_prior=alpha,
    )
    tol = 1e-9
    fit = pyroem.fit(spec, data, method="vb-em", init=start, tol=tol, max_iter=3000, num_draws=0)
    model = _InjectedStart(
        start_resp=resp,
        n_components=num_components,
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_distribution",
        weight_concentration_prior=alpha,
        reg_covar=0.0,
        tol=tol * num_data,
        max_iter=3001,
        **_sklearn_prior(prior, "full"),
    )
    model.fit(data)
    assert fit.converged and model.converged_
    assert fit.num_iterations == model.n_iter_ - 1

    weights = fit.params["weights"].numpy()
    np.testing.assert_allclose(weights, model.weights_, rtol=RTOL)
    assert fit.num_effective_components == 2
    assert fit.effective_components == np.nonzero(model.weights_ > 0.01)[0].tolist()
    # A collapsed component keeps only its prior share, E_q[π_k] = (α + N_k)/(Kα + N) with
    # N_k ≈ 0; the two live ones hold the two eruption types (about 36% and 64%).
    collapsed = np.sort(weights)[:-2]
    floor = alpha / (num_components * alpha + num_data)
    assert np.all(collapsed < 1.01 * floor)
    np.testing.assert_allclose(np.sort(weights)[-2:], [0.36, 0.64], atol=0.02)


def test_dirichlet_process_cavi_follows_sklearn() -> None:
    """The truncated stick-breaking prior: scikit-learn's default
    ``weight_concentration_prior_type="dirichlet_process"`` from the same start, full
    covariances. The ELBOs differ by a constant (scikit-learn drops the Beta(1, α)
    normalisers and the Wishart constants), so their changes are compared."""
    data = _faithful([0, 1])
    dim = data.shape[1]
    start = _start("full", dim)
    prior = _prior(dim)
    spec = pyroem.Mixture(
        NUM_COMPONENTS,
        "gaussian",
        covariance_type="full",
        prior=pyroem.NormalInverseWishart(**prior),
        weights_prior=WEIGHTS_PRIOR,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            spec,
            data,
            method="vb-em",
            init=start,
            tol=0,
            max_iter=NUM_ITERATIONS,
            num_draws=0,
            weights_prior_type="dirichlet_process",
        )
    model = _InjectedStart(
        start_resp=_start_responsibilities(data, start, "full"),
        n_components=NUM_COMPONENTS,
        covariance_type="full",
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=WEIGHTS_PRIOR,
        reg_covar=0.0,
        tol=0.0,
        max_iter=NUM_ITERATIONS + 1,
        **_sklearn_prior(prior, "full"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SklearnConvergenceWarning)
        model.fit(data)
    bounds = np.array([float(np.sum(bound)) for bound in model.lower_bounds_])
    elbo = fit.history.objective
    assert elbo[-1] - elbo[0] > 1.0
    np.testing.assert_allclose(np.diff(elbo), np.diff(bounds), rtol=1e-7, atol=1e-9)
    sticks = fit.variational["weights"]
    np.testing.assert_allclose(
        sticks["stick_concentration1"].numpy(), model.weight_concentration_[0], rtol=RTOL
    )
    np.testing.assert_allclose(
        sticks["stick_concentration0"].numpy(), model.weight_concentration_[1], rtol=RTOL
    )
    components = fit.variational["components"]
    np.testing.assert_allclose(components["mean"].numpy(), model.means_, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(fit.params["weights"].numpy(), model.weights_, rtol=RTOL)
    np.testing.assert_allclose(
        fit.predict_proba(data).numpy(), model.predict_proba(data), rtol=1e-7, atol=1e-12
    )
