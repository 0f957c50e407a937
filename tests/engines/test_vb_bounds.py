"""The ELBO is a lower bound on the exact log evidence, and nearly reaches it.

For a tiny data set (``N ≤ 7``, ``K = 2``) the log evidence of the mixture is a sum
over all ``K^N`` assignments,

    log p(x) = logsumexp_z [ log p(z) + log p(x | z) ],

with ``p(z)`` the Dirichlet–categorical marginal and ``p(x | z)`` the conjugate
marginal likelihood of the points each component holds (π and θ integrated out).
Both are computed here by the chain rule of posterior predictives, written with
SciPy's distributions (Student-t, negative binomial, Lomax, ...) from the
documented priors: a route independent of pyroem's closed-form normalisers. The
enumeration walks the assignments as a tree, so each predictive is evaluated once
per prefix.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

import pyroem

NUM_COMPONENTS = 2
WEIGHTS_PRIOR = 0.8


# ----- sequential conjugate predictives: state, log predictive, update ---------------


class _NormalInverseWishart:
    """Per component ``(m, κ)``; ``(ν, Ψ)`` per component, or one shared (tied)."""

    def __init__(self, prior: dict[str, Any], tied: bool) -> None:
        self.tied = tied
        self.means = [np.asarray(prior["mean"], float)] * NUM_COMPONENTS
        self.kappas = [prior["mean_precision"]] * NUM_COMPONENTS
        count = 1 if tied else NUM_COMPONENTS
        self.dofs = [prior["dof"]] * count
        self.scales = [np.asarray(prior["scale"], float)] * count

    def log_predictive(self, x: np.ndarray, k: int) -> float:
        j = 0 if self.tied else k
        dim = x.shape[0]
        dof = self.dofs[j] - dim + 1
        kappa = self.kappas[k]
        shape = self.scales[j] * (kappa + 1) / (kappa * dof)
        return float(stats.multivariate_t(self.means[k], shape, df=dof).logpdf(x))

    def update(self, x: np.ndarray, k: int) -> None:
        j = 0 if self.tied else k
        kappa, mean = self.kappas[k], self.means[k]
        diff = x - mean
        self.scales[j] = self.scales[j] + kappa / (kappa + 1) * np.outer(diff, diff)
        self.dofs[j] = self.dofs[j] + 1
        self.means[k] = (kappa * mean + x) / (kappa + 1)
        self.kappas[k] = kappa + 1


class _NormalInverseGamma:
    """Per component: variances ``InverseGamma(a, b)`` (one per dimension, or one shared
    by all dimensions), means ``Normal(m_d, σ²/κ_d)``; a point is taken one coordinate at
    a time, so a shared variance sees ``D`` scalar observations per point."""

    def __init__(self, prior: dict[str, Any], spherical: bool, dim: int) -> None:
        self.spherical = spherical
        diagonal = np.diag(np.asarray(prior["scale"], float))
        rate = np.full(1, diagonal.mean() / 2) if spherical else diagonal / 2
        self.a = [np.full(rate.shape, prior["dof"] / 2) for _ in range(NUM_COMPONENTS)]
        self.b = [rate.copy() for _ in range(NUM_COMPONENTS)]
        self.m = [np.asarray(prior["mean"], float).copy() for _ in range(NUM_COMPONENTS)]
        self.kappa = [np.full(dim, float(prior["mean_precision"])) for _ in range(NUM_COMPONENTS)]

    def _step(self, x: np.ndarray, k: int) -> float:
        """Log predictive of ``x`` in component ``k``, then condition on it."""
        a, b, m, kappa = self.a[k], self.b[k], self.m[k], self.kappa[k]
        total = 0.0
        for d, value in enumerate(x):
            v = 0 if self.spherical else d
            scale = math.sqrt(b[v] * (kappa[d] + 1) / (a[v] * kappa[d]))
            total += float(stats.t.logpdf(value, 2 * a[v], loc=m[d], scale=scale))
            b[v] += kappa[d] * (value - m[d]) ** 2 / (2 * (kappa[d] + 1))
            m[d] = (kappa[d] * m[d] + value) / (kappa[d] + 1)
            kappa[d] += 1
            a[v] += 0.5
        return total

    def log_predictive(self, x: np.ndarray, k: int) -> float:
        return copy.deepcopy(self)._step(x, k)

    def update(self, x: np.ndarray, k: int) -> None:
        self._step(x, k)


class _GammaRates:
    """Gamma(a, b) per component and dimension: Poisson counts or Exponential times."""

    def __init__(self, prior: dict[str, Any], poisson: bool, dim: int) -> None:
        self.poisson = poisson
        self.a = np.tile(np.broadcast_to(prior["concentration"], dim), (NUM_COMPONENTS, 1))
        self.b = np.tile(np.broadcast_to(prior["rate"], dim), (NUM_COMPONENTS, 1)).astype(float)

    def log_predictive(self, x: np.ndarray, k: int) -> float:
        a, b = self.a[k], self.b[k]
        if self.poisson:  # Gamma–Poisson predictive: negative binomial
            return float(stats.nbinom(a, b / (b + 1)).logpmf(x).sum())
        return float(stats.lomax(a, scale=b).logpdf(x).sum())  # Gamma–Exponential: Lomax

    def update(self, x: np.ndarray, k: int) -> None:
        self.a = self.a.copy()
        self.b = self.b.copy()
        self.a[k] += x if self.poisson else 1
        self.b[k] += 1 if self.poisson else x


class _DirichletCounts:
    """Dirichlet(β) per component and feature over categories (Beta for binary data)."""

    def __init__(self, concentration: np.ndarray, dim: int) -> None:
        self.beta = np.tile(concentration, (NUM_COMPONENTS, dim, 1)).astype(float)

    def log_predictive(self, x: np.ndarray, k: int) -> float:
        beta = self.beta[k]
        codes = x.astype(int)
        return float(np.log(beta[np.arange(len(codes)), codes] / beta.sum(-1)).sum())

    def update(self, x: np.ndarray, k: int) -> None:
        self.beta = self.beta.copy()
        self.beta[k, np.arange(len(x)), x.astype(int)] += 1


def log_evidence(data: np.ndarray, make_state: Callable[[], Any]) -> tuple[float, float]:
    """``log p(x)`` by enumerating every assignment, chain rule along the data, and
    ``max_z log p(x, z)``, the log joint of the most probable assignment."""
    num_data = data.shape[0]
    totals: list[float] = []

    def walk(n: int, state: Any, counts: np.ndarray, log_joint: float) -> None:
        if n == num_data:
            totals.append(log_joint)
            return
        for k in range(NUM_COMPONENTS):
            # Dirichlet–categorical predictive of z_n, then the conjugate predictive of x_n.
            log_z = math.log((WEIGHTS_PRIOR + counts[k]) / (NUM_COMPONENTS * WEIGHTS_PRIOR + n))
            log_x = state.log_predictive(data[n], k)
            child = copy.deepcopy(state)
            child.update(data[n], k)
            grown = counts.copy()
            grown[k] += 1
            walk(n + 1, child, grown, log_joint + log_z + log_x)

    walk(0, make_state(), np.zeros(NUM_COMPONENTS), 0.0)
    assert len(totals) == NUM_COMPONENTS**num_data
    return float(logsumexp(totals)), max(totals)


# ----- the cases -----------------------------------------------------------------

GAUSSIAN_PRIOR = {
    "mean": [0.0, 0.0],
    "mean_precision": 0.5,
    "dof": 5.0,
    "scale": [[0.6, 0.1], [0.1, 0.4]],
}


def _separated_gaussian(rng: np.random.Generator) -> np.ndarray:
    centres = np.array([[-2.0, 1.0]] * 3 + [[2.0, -1.5]] * 3)
    return centres + 0.3 * rng.standard_normal(centres.shape)


def _case(name: str) -> dict[str, Any]:
    """Spec, prior as numbers, a well-separated data set and the predictive state."""
    if name.startswith("gaussian"):
        kind = name.split("-")[1]
        prior = GAUSSIAN_PRIOR
        if kind in ("full", "tied"):

            def state() -> Any:
                return _NormalInverseWishart(prior, tied=kind == "tied")
        else:

            def state() -> Any:
                return _NormalInverseGamma(prior, spherical=kind == "spherical", dim=2)

        spec = pyroem.Mixture(
            NUM_COMPONENTS,
            "gaussian",
            covariance_type=kind,
            prior=pyroem.NormalInverseWishart(**prior),
            weights_prior=WEIGHTS_PRIOR,
        )
        return {"spec": spec, "state": state, "data": _separated_gaussian}
    if name in ("poisson", "exponential"):
        poisson = name == "poisson"
        prior = {"concentration": 2.0, "rate": 0.5 if poisson else 1.0}

        def separated(rng: np.random.Generator) -> np.ndarray:
            if poisson:
                return rng.poisson([[1.0, 8.0]] * 3 + [[9.0, 1.0]] * 3).astype(float)
            # Exponential draws of one scale vary too much for six points to separate.
            return np.array(
                [[0.1, 5.0], [0.2, 7.0], [0.15, 6.0], [6.0, 0.1], [8.0, 0.2], [5.0, 0.3]]
            )

        spec = pyroem.Mixture(
            NUM_COMPONENTS, name, prior=pyroem.Gamma(**prior), weights_prior=WEIGHTS_PRIOR
        )
        return {
            "spec": spec,
            "state": lambda: _GammaRates(prior, poisson=poisson, dim=2),
            "data": separated,
        }
    if name == "bernoulli":
        spec = pyroem.Mixture(
            NUM_COMPONENTS,
            "bernoulli",
            prior=pyroem.Beta(concentration1=1.5, concentration0=1.5),
            weights_prior=WEIGHTS_PRIOR,
        )
        # Beta(c1, c0) on p(x = 1) is Dirichlet(c0, c1) over the codes (0, 1).
        return {
            "spec": spec,
            "state": lambda: _DirichletCounts(np.array([1.5, 1.5]), dim=5),
            "data": lambda rng: np.array([[1, 1, 1, 0, 0]] * 3 + [[0, 0, 0, 1, 1]] * 3, float),
        }
    spec = pyroem.Mixture(
        NUM_COMPONENTS,
        "categorical",
        prior=pyroem.Dirichlet(1.2),
        num_categories=3,
        weights_prior=WEIGHTS_PRIOR,
    )
    return {
        "spec": spec,
        "state": lambda: _DirichletCounts(np.full(3, 1.2), dim=4),
        "data": lambda rng: np.array([[0, 1, 2, 2]] * 3 + [[2, 2, 0, 1]] * 3, float),
    }


def _random_data(name: str, rng: np.random.Generator) -> np.ndarray:
    """Seven points with no structure: the bound must hold there too."""
    if name.startswith("gaussian"):
        return rng.standard_normal((7, 2))
    if name == "poisson":
        return rng.poisson(3.0, (7, 2)).astype(float)
    if name == "exponential":
        return rng.exponential(2.0, (7, 2))
    if name == "bernoulli":
        return (rng.random((7, 5)) < 0.5).astype(float)
    return rng.integers(0, 3, (7, 4)).astype(float)


CASES = [
    "gaussian-full",
    "gaussian-tied",
    "gaussian-diag",
    "gaussian-spherical",
    "poisson",
    "exponential",
    "bernoulli",
    "categorical",
]


def _elbo_trace(spec: pyroem.Mixture, data: np.ndarray, seed: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            spec, data, method="vb-em", seed=seed, tol=1e-12, max_iter=300, num_draws=0
        )
    return fit.history.objective


@pytest.mark.parametrize("name", CASES)
def test_elbo_below_log_evidence_and_close_to_it(name: str) -> None:
    case = _case(name)
    rng = np.random.default_rng(CASES.index(name))
    # Round-off of sums of a few dozen terms of size ~10: far below any real violation.
    slack = 1e-9

    data = _random_data(name, rng)
    evidence, _ = log_evidence(data, case["state"])
    for seed in range(3):
        trace = _elbo_trace(case["spec"], data, seed)
        assert np.all(trace <= evidence + slack), (trace.max(), evidence)

    data = case["data"](rng)
    evidence, best_assignment = log_evidence(data, case["state"])
    elbo = _elbo_trace(case["spec"], data, seed=0)[-1]
    # The gap log p(x) − ELBO is KL(q ‖ p(z, π, θ | x)) ≥ 0. The variational family holds
    # q(z) = δ(z*) with q(π, θ) = p(π, θ | x, z*), whose ELBO is exactly log p(x, z*); on
    # well-separated data CAVI converges to (or beyond) the best of these, so its gap is
    # at most −log max_z p(z | x) (≈ log 2 here: exchangeable priors give every
    # clustering two mirror-image labellings of equal mass).
    assert elbo <= evidence + slack
    assert elbo >= best_assignment - slack, (elbo, best_assignment, evidence)
    assert evidence - best_assignment < 1.5  # the data do single out one clustering
