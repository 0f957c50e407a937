"""The conjugate pairs of :mod:`pyroem.mstep.conjugate` against scipy.

Each pair is checked three ways where it applies: the posterior's parameters make
``log posterior − (log prior + weighted log-likelihood)`` constant in the parameter
(scipy densities at random points), the mode is the numerical maximiser of that log
joint (scipy.optimize; in log / logit / stick-breaking coordinates with the
log-Jacobian for ``unconstrained=True``), and the expectations CAVI reads agree with
Monte Carlo averages over scipy draws (tolerance five standard errors).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import optimize, special, stats

from pyroem.mstep import conjugate as cj

RNG = np.random.default_rng(0)


def _t(x: object) -> torch.Tensor:
    return torch.tensor(np.array(x, dtype=np.float64))


def _maximise(objective, start: np.ndarray) -> np.ndarray:
    result = optimize.minimize(
        lambda u: -objective(u), start, method="BFGS", options={"gtol": 1e-10, "maxiter": 10000}
    )
    return result.x


def _assert_constant(differences: list[float]) -> None:
    spread = np.ptp(differences)
    assert spread < 1e-8 * (1 + np.abs(differences).max()), differences


def _assert_monte_carlo(draws: np.ndarray, expected: np.ndarray) -> None:
    error = draws.std(0) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(draws.mean(0) - expected) < 5 * error + 1e-12), (draws.mean(0), expected)


# --- Dirichlet–categorical ----------------------------------------------------------


@pytest.mark.parametrize("unconstrained", [False, True])
def test_dirichlet_mode_maximises_the_posterior_density(unconstrained: bool) -> None:
    counts = np.array([3.2, 0.0, 7.5, 1.1])
    alpha = np.array([1.5, 0.6, 2.0, 1.0]) if unconstrained else np.array([1.5, 1.2, 2.0, 1.0])
    stick = torch.distributions.transforms.StickBreakingTransform()

    def log_joint(u: np.ndarray) -> float:
        x = _t(u)
        probs = stick(x).numpy()
        value = stats.dirichlet.logpdf(probs, alpha) + float(counts @ np.log(probs))
        return value + float(stick.log_abs_det_jacobian(x, stick(x))) * unconstrained

    if unconstrained:
        found = stick(_t(_maximise(log_joint, np.zeros(3)))).numpy()
    else:
        # The constrained maximiser: the same density maximised over softmax coordinates
        # (no Jacobian: the location of a function's maximum does not depend on them).
        def plain(u: np.ndarray) -> float:
            probs = special.softmax(np.append(u, 0.0))
            return stats.dirichlet.logpdf(probs, alpha) + float(counts @ np.log(probs))

        found = special.softmax(np.append(_maximise(plain, np.zeros(3)), 0.0))
    mode = cj.dirichlet_mode(_t(counts), _t(alpha), unconstrained=unconstrained).numpy()
    np.testing.assert_allclose(mode, found, rtol=1e-5, atol=1e-7)


def test_dirichlet_expected_log_matches_monte_carlo() -> None:
    alpha = np.array([0.7, 2.5, 4.0])
    draws = np.log(stats.dirichlet.rvs(alpha, size=200_000, random_state=RNG))
    _assert_monte_carlo(draws, cj.dirichlet_expected_log(_t(alpha)).numpy())


# --- Beta–Bernoulli / binomial ------------------------------------------------------


def test_beta_posterior_is_prior_times_likelihood() -> None:
    x, trials, w = np.array([0, 3, 5, 2]), np.array([1, 4, 5, 6]), RNG.uniform(0.2, 1, 4)
    a, b = 1.7, 0.8
    post = cj.beta_posterior(_t(w @ x), _t(w @ trials), _t(a), _t(b))
    differences = [
        stats.beta.logpdf(p, *(float(v) for v in post))
        - stats.beta.logpdf(p, a, b)
        - w @ stats.binom.logpmf(x, trials, p)
        for p in RNG.uniform(0.05, 0.95, 6)
    ]
    _assert_constant(differences)


@pytest.mark.parametrize("unconstrained", [False, True])
def test_beta_mode_maximises_the_posterior_density(unconstrained: bool) -> None:
    successes, trials = 2.4, 9.3
    a, b = (0.5, 0.9) if unconstrained else (1.8, 2.5)

    def log_joint(u: np.ndarray) -> float:
        p = special.expit(u[0])
        jacobian = np.log(p * (1 - p)) * unconstrained
        value = stats.beta.logpdf(p, a, b) + successes * np.log(p)
        return value + (trials - successes) * np.log1p(-p) + jacobian

    found = special.expit(_maximise(log_joint, np.zeros(1))[0])
    if not unconstrained:  # logit coordinates without a Jacobian: the same maximiser
        found = optimize.minimize_scalar(
            lambda p: -log_joint(np.array([special.logit(p)])),
            bounds=(1e-9, 1 - 1e-9),
            method="bounded",
            options={"xatol": 1e-12},
        ).x
    mode = cj.beta_mode(_t(successes), _t(trials), _t(a), _t(b), unconstrained=unconstrained)
    assert float(mode) == pytest.approx(found, rel=1e-6)
    assert float(cj.beta_mode(_t(successes), _t(trials))) == pytest.approx(successes / trials)


# --- Gamma–Poisson, Gamma–Exponential, Gamma–Normal precision -----------------------


def test_gamma_poisson_and_exponential_posteriors_are_prior_times_likelihood() -> None:
    x, w = np.array([0.0, 3.0, 1.0, 6.0]), RNG.uniform(0.2, 1, 4)
    a, b = 2.5, 0.7
    poisson = cj.gamma_posterior(_t(w @ x), _t(w.sum()), _t(a), _t(b))
    exponential = cj.gamma_posterior(_t(w.sum()), _t(w @ x), _t(a), _t(b))
    for post, loglik in (
        (poisson, lambda lam: w @ stats.poisson.logpmf(x, lam)),
        (exponential, lambda lam: w @ stats.expon.logpdf(x, scale=1 / lam)),
    ):
        shape, rate = (float(v) for v in post)
        differences = [
            stats.gamma.logpdf(lam, shape, scale=1 / rate)
            - stats.gamma.logpdf(lam, a, scale=1 / b)
            - loglik(lam)
            for lam in RNG.uniform(0.1, 5, 6)
        ]
        _assert_constant(differences)


@pytest.mark.parametrize("unconstrained", [False, True])
def test_gamma_mode_maximises_the_posterior_density(unconstrained: bool) -> None:
    # A Normal precision τ: likelihood Π N(x | 0.3, 1/τ)^w, i.e. s = Σw/2, t = Σw r²/2.
    x, w = RNG.normal(0.3, 2.0, 7), RNG.uniform(0.2, 1, 7)
    a, b = (0.4, 1.3) if unconstrained else (2.2, 1.3)

    def log_joint(u: np.ndarray) -> float:
        tau = np.exp(u[0])
        value = stats.gamma.logpdf(tau, a, scale=1 / b)
        return value + w @ stats.norm.logpdf(x, 0.3, 1 / np.sqrt(tau)) + u[0] * unconstrained

    found = np.exp(_maximise(log_joint, np.zeros(1))[0])
    s, t = w.sum() / 2, w @ (x - 0.3) ** 2 / 2
    mode = cj.gamma_mode(_t(s), _t(t), _t(a), _t(b), unconstrained=unconstrained)
    assert float(mode) == pytest.approx(found, rel=1e-6)
    assert float(cj.gamma_mode(_t(s), _t(t))) == pytest.approx(s / t)


def test_gamma_expected_log_matches_monte_carlo() -> None:
    a, b = np.array([0.6, 3.0]), np.array([2.0, 0.5])
    draws = np.log(stats.gamma.rvs(a, scale=1 / b, size=(200_000, 2), random_state=RNG))
    _assert_monte_carlo(draws, cj.gamma_expected_log(_t(a), _t(b)).numpy())


# --- Inverse-Gamma–Normal variance --------------------------------------------------


@pytest.mark.parametrize("unconstrained", [False, True])
def test_inverse_gamma_mode_maximises_the_posterior_density(unconstrained: bool) -> None:
    x, w = RNG.normal(-1.0, 0.5, 6), RNG.uniform(0.2, 1, 6)
    a, b = 1.5, 0.4

    def log_joint(u: np.ndarray) -> float:
        variance = np.exp(u[0])
        value = stats.invgamma.logpdf(variance, a, scale=b)
        return value + w @ stats.norm.logpdf(x, -1.0, np.sqrt(variance)) + u[0] * unconstrained

    found = np.exp(_maximise(log_joint, np.zeros(1))[0])
    s, t = w.sum() / 2, w @ (x + 1.0) ** 2 / 2
    mode = cj.inverse_gamma_mode(_t(s), _t(t), _t(a), _t(b), unconstrained=unconstrained)
    assert float(mode) == pytest.approx(found, rel=1e-6)
    assert float(cj.inverse_gamma_mode(_t(s), _t(t))) == pytest.approx(t / s)


# --- Normal–Normal (known variance) -------------------------------------------------


def test_normal_mean_mode_maximises_the_posterior_density() -> None:
    x, w, std = RNG.normal(2.0, 1.0, 5), RNG.uniform(0.2, 1, 5), RNG.uniform(0.5, 2, 5)
    mu0, s0 = -1.0, 0.8

    def log_joint(u: np.ndarray) -> float:
        return stats.norm.logpdf(u[0], mu0, s0) + w @ stats.norm.logpdf(x, u[0], std)

    found = _maximise(log_joint, np.zeros(1))[0]
    precision = w / std**2
    mode = cj.normal_mean_mode(_t(precision @ x), _t(precision.sum()), _t(mu0), _t(s0**-2))
    assert float(mode) == pytest.approx(found, rel=1e-6)


def test_mvn_mean_mode_maximises_the_posterior_density() -> None:
    x, w = RNG.normal(size=(4, 2)), RNG.uniform(0.2, 1, 4)
    covs = [np.array([[1.0, 0.3], [0.3, 0.5 + i]]) for i in range(4)]
    mu0, cov0 = np.array([1.0, -1.0]), np.array([[2.0, -0.5], [-0.5, 1.0]])

    def log_joint(u: np.ndarray) -> float:
        lik = sum(
            wi * stats.multivariate_normal.logpdf(xi, u, c)
            for xi, wi, c in zip(x, w, covs, strict=True)
        )
        return stats.multivariate_normal.logpdf(u, mu0, cov0) + lik

    found = _maximise(log_joint, np.zeros(2))
    precisions = [wi * np.linalg.inv(c) for wi, c in zip(w, covs, strict=True)]
    information = _t(sum(precisions))[None]
    weighted = _t(sum(p @ xi for p, xi in zip(precisions, x, strict=True)))[None]
    mode = cj.mvn_mean_mode(information, weighted, _t(mu0)[None], _t(np.linalg.inv(cov0))[None])
    np.testing.assert_allclose(mode[0].numpy(), found, rtol=1e-6)


# --- Inverse-Wishart (known mean) and Normal–Inverse-Wishart ------------------------


def _spd(u: np.ndarray, dim: int) -> np.ndarray:
    """An SPD matrix from unconstrained numbers (Cholesky factor, log diagonal)."""
    chol = np.zeros((dim, dim))
    chol[np.tril_indices(dim)] = u
    chol[np.diag_indices(dim)] = np.exp(np.diag(chol))
    return chol @ chol.T


def test_inverse_wishart_mode_maximises_the_posterior_density() -> None:
    x, w, mean = RNG.normal(size=(6, 2)), RNG.uniform(0.2, 1, 6), np.array([0.2, -0.1])
    nu, psi = 4.5, np.array([[1.0, 0.2], [0.2, 2.0]])

    def log_joint(u: np.ndarray) -> float:
        cov = _spd(u, 2)
        lik = w @ stats.multivariate_normal.logpdf(x, mean, cov)
        return stats.invwishart.logpdf(cov, nu, psi) + lik

    found = _spd(_maximise(log_joint, np.zeros(3)), 2)
    r = x - mean
    scatter = _t((w[:, None] * r).T @ r)[None]
    mode = cj.inverse_wishart_mode(scatter, _t([w.sum()]), _t(psi)[None], _t([nu]))
    np.testing.assert_allclose(mode[0].numpy(), found, rtol=1e-5, atol=1e-7)


_X = RNG.normal(size=(9, 2)) * np.array([1.0, 2.0])
_W = RNG.dirichlet(np.ones(2), size=9)  # responsibilities (n, K)
_PRIOR = cj.NIWPrior(_t([0.5, -0.5]), 0.7, 3.5, _t([[1.5, 0.3], [0.3, 0.8]]))


def _niw_statistics() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = _W.sum(0)
    sum_x = _W.T @ _X
    means = sum_x / counts[:, None]
    full = np.stack([(_W[:, k, None] * (_X - means[k])).T @ (_X - means[k]) for k in range(2)])
    return _t(counts), _t(sum_x), _t(full), _t(np.diagonal(full, axis1=1, axis2=2))


def _niw_log_joint(
    means: np.ndarray, covs: list[np.ndarray] | np.ndarray, kind: str, prior: cj.NIWPrior
) -> float:
    """``weight`` × log NIW prior (pyroem's form for ``kind``) + weighted log-likelihood."""
    mu0, kappa, nu = prior.mean.numpy(), prior.mean_precision, prior.dof
    psi = prior.scale.numpy()
    log_prior = log_lik = 0.0
    for k in range(2):
        if kind in ("full", "tied"):
            cov = covs[0] if kind == "tied" else covs[k]
            if kind == "full" or k == 0:
                log_prior += stats.invwishart.logpdf(cov, nu, psi)
            log_prior += stats.multivariate_normal.logpdf(means[k], mu0, cov / kappa)
            log_lik += _W[:, k] @ stats.multivariate_normal.logpdf(_X, means[k], cov)
            continue
        if kind == "diag":
            var = covs[k]
            log_prior += stats.invgamma.logpdf(var, nu / 2, scale=np.diag(psi) / 2).sum()
        else:
            var = np.full(2, covs[k])
            log_prior += stats.invgamma.logpdf(covs[k], nu / 2, scale=np.diag(psi).mean() / 2)
        log_prior += stats.norm.logpdf(means[k], mu0, np.sqrt(var / kappa)).sum()
        log_lik += _W[:, k] @ stats.norm.logpdf(_X, means[k], np.sqrt(var)).sum(1)
    return float(prior.weight * log_prior + log_lik)


def _niw_unpack(u: np.ndarray, kind: str) -> tuple[np.ndarray, list[np.ndarray] | np.ndarray]:
    means = u[:4].reshape(2, 2)
    rest = u[4:]
    if kind == "full":
        return means, [_spd(rest[:3], 2), _spd(rest[3:], 2)]
    if kind == "tied":
        return means, [_spd(rest, 2)]
    return means, np.exp(rest).reshape((2, 2) if kind == "diag" else (2,))


_SIZES = {"full": 6, "tied": 3, "diag": 4, "spherical": 2}


@pytest.mark.parametrize("weight", [1.0, 0.3])
@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_niw_mode_maximises_the_posterior_density(kind: str, weight: float) -> None:
    prior = _PRIOR._replace(weight=weight)  # the log prior counted ``weight`` times
    counts, sum_x, full, diag = _niw_statistics()
    scatter = full if kind in ("full", "tied") else diag
    start = np.concatenate([(sum_x / counts[:, None]).numpy().ravel(), np.zeros(_SIZES[kind])])
    found = _maximise(lambda u: _niw_log_joint(*_niw_unpack(u, kind), kind, prior), start)
    found_means, found_covs = _niw_unpack(found, kind)
    means, covs = cj.niw_mode(prior, counts, sum_x, scatter, kind)
    np.testing.assert_allclose(means.numpy(), found_means, rtol=1e-5, atol=1e-7)
    expected = np.asarray(found_covs[0] if kind == "tied" else found_covs)
    np.testing.assert_allclose(covs.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_niw_posterior_is_prior_times_likelihood(kind: str) -> None:
    counts, sum_x, full, diag = _niw_statistics()
    post = cj.niw_posterior(_PRIOR, counts, sum_x, full if kind in ("full", "tied") else diag, kind)
    differences = []
    for _ in range(5):
        u = RNG.normal(size=4 + _SIZES[kind]) * 0.5
        means, covs = _niw_unpack(u, kind)
        log_post = 0.0
        for k in range(2):
            # The posterior written in the prior's own form, one component at a time.
            scale = post.scale if kind == "tied" else post.scale[k]
            dof = post.dof if kind == "tied" else post.dof[k]
            if kind in ("full", "tied"):
                cov = covs[0] if kind == "tied" else covs[k]
                if kind == "full" or k == 0:
                    log_post += stats.invwishart.logpdf(cov, float(dof), scale.numpy())
            else:
                cov = np.diag(covs[k] if kind == "diag" else np.full(2, covs[k]))
                variances = covs[k] if kind == "diag" else covs[k : k + 1]
                ig_scale = scale.numpy() / 2
                log_post += stats.invgamma.logpdf(variances, float(dof) / 2, scale=ig_scale).sum()
            cov_mean = cov / float(post.mean_precision[k])
            log_post += stats.multivariate_normal.logpdf(means[k], post.mean[k].numpy(), cov_mean)
        differences.append(log_post - _niw_log_joint(means, covs, kind, _PRIOR))
    _assert_constant(differences)


def test_wishart_expected_log_det_matches_monte_carlo() -> None:
    nu, psi = 5.5, np.array([[1.5, 0.3], [0.3, 0.8]])
    precisions = stats.wishart.rvs(nu, np.linalg.inv(psi), size=200_000, random_state=RNG)
    draws = np.linalg.slogdet(precisions)[1][:, None] + np.linalg.slogdet(psi)[1]
    _assert_monte_carlo(draws, cj.wishart_expected_log_det(_t([nu]), 2).numpy())
