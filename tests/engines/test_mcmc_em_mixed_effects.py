"""MCMC-EM on the linear mixed-effects model of ``models/mixed_effects.py`` agrees with
statsmodels' maximum-likelihood fit of lme4's sleepstudy model.

The tolerance is derived from the Monte Carlo error (``test_mcmc_em_noise.py``): the
model's exact EM — conjugate Gaussian posterior of each subject's random effects,
the M-step as pyroem applies it (σ² and Σ_b in closed form from the current fixed
effects, then the fixed effects) — is written here with NumPy; its Jacobians and the
covariance of one draw's statistics give the Monte Carlo covariance of the final
estimate, in the model's (centred) coordinates, mapped linearly to statsmodels'.
Each parameter must lie within 4 standard deviations of statsmodels' estimate, plus
the distance between statsmodels and the noise-free EM path with the same step sizes
(EM's own transient: SAEM's running average still carries a little of the early
iterations, decaying like 1/k; and statsmodels' optimiser tolerance). That the exact
EM written here converges to statsmodels' estimate is checked separately.
"""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_mcmc_em_noise import deterministic_path, monte_carlo_covariance

from pyroem.diagnostics import chain_diagnostics

MODEL = Path(__file__).resolve().parents[2] / "models" / "mixed_effects.py"
NUM_SD = 4.0


def _gaussian_moment_covariance(mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Covariance of (b, vec(b bᵀ)) for b ~ N(mean, cov), by Isserlis' theorem, ``(6, 6)``."""
    d = len(mean)
    pairs = [(i, j) for i in range(d) for j in range(d)]
    size = d + len(pairs)
    out = np.zeros((size, size))
    out[:d, :d] = cov
    for a, (j, k) in enumerate(pairs):
        for i in range(d):
            value = mean[j] * cov[i, k] + mean[k] * cov[i, j]
            out[i, d + a] = out[d + a, i] = value
        for c, (m, n) in enumerate(pairs):
            out[d + a, d + c] = (
                cov[j, m] * cov[k, n]
                + cov[j, n] * cov[k, m]
                + mean[j] * mean[m] * cov[k, n]
                + mean[j] * mean[n] * cov[k, m]
                + mean[k] * mean[m] * cov[j, n]
                + mean[k] * mean[n] * cov[j, m]
            )
    return out


def _exact_em(reaction: np.ndarray, days: np.ndarray, subject: np.ndarray, groups: int):
    """Exact EM of y_g = X_g α + X_g b_g + ε, b_g ~ N(0, Σ), ε ~ N(0, σ² I), X_g = [1, days].

    θ = (α_0, α_1, vec Σ, σ²); statistics per subject (b_g, vec b_g b_gᵀ)."""
    design = np.stack([np.ones_like(days), days], 1)
    rows = [subject == g for g in range(groups)]
    num_data = len(reaction)
    gram_inverse = np.linalg.inv(design.T @ design)

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        return theta[:2], theta[2:6].reshape(2, 2), float(theta[6])

    def posteriors(theta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        alpha, cov, sigma2 = unpack(theta)
        out = []
        for r in rows:
            x = design[r]
            c = np.linalg.inv(x.T @ x / sigma2 + np.linalg.inv(cov))
            out.append((c @ x.T @ (reaction[r] - x @ alpha) / sigma2, c))
        return out

    def expected(theta: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [np.concatenate([m, (c + np.outer(m, m)).ravel()]) for m, c in posteriors(theta)]
        )

    def single_draw_covariance(theta: np.ndarray) -> np.ndarray:
        blocks = [_gaussian_moment_covariance(m, c) for m, c in posteriors(theta)]
        out = np.zeros((6 * groups, 6 * groups))
        for g, block in enumerate(blocks):
            out[6 * g : 6 * g + 6, 6 * g : 6 * g + 6] = block
        return out

    def m_step(stats: np.ndarray, theta: np.ndarray) -> np.ndarray:
        alpha_prev = theta[:2]
        s = stats.reshape(groups, 6)
        first, second = s[:, :2], s[:, 2:].reshape(groups, 2, 2)
        squares = 0.0
        fitted = np.zeros(2)
        for g, r in enumerate(rows):
            x = design[r]
            residual = reaction[r] - x @ alpha_prev
            squares += residual @ residual - 2 * residual @ x @ first[g]
            squares += np.trace(x.T @ x @ second[g])
            fitted += x.T @ (reaction[r] - x @ first[g])
        return np.concatenate([gram_inverse @ fitted, second.mean(0).ravel(), [squares / num_data]])

    return expected, single_draw_covariance, m_step


def _to_original(centre: float) -> np.ndarray:
    """The linear map from (α, vec Σ_u, σ²) with centred days to day-0 coordinates."""
    shift = np.array([[1.0, -centre], [0.0, 1.0]])
    out = np.zeros((7, 7))
    out[:2, :2] = shift
    out[2:6, 2:6] = np.kron(shift, shift)
    out[6, 6] = 1.0
    return out


@pytest.mark.slow
def test_mixed_effects_maximum_likelihood_agrees_with_statsmodels() -> None:
    statsmodels = pytest.importorskip("statsmodels.formula.api")
    namespace = runpy.run_path(str(MODEL), run_name="example")
    torch.set_default_dtype(torch.float64)
    data = namespace["sleepstudy"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = pd.DataFrame(
            {
                "Reaction": data["reaction"].numpy(),
                "Days": data["days"].numpy(),
                "Subject": data["subject"].numpy(),
            }
        )
        model = statsmodels.mixedlm("Reaction ~ Days", frame, groups="Subject", re_formula="~Days")
        reference = model.fit(reml=False)
    theta_reference = np.concatenate(
        [reference.fe_params.values, reference.cov_re.values.ravel(), [reference.scale]]
    )

    fit = namespace["fit"](data, seed=1)
    assert fit.converged and fit.schedule == "saem"
    assert fit.m_step_kinds["random_effects_covariance"] == "flat-mvn-covariance"
    assert fit.m_step_kinds["residual_variance"] == "flat-normal-variance"

    centre = data["centre"]
    days = data["days"].numpy() - centre
    reaction, subject = data["reaction"].numpy(), data["subject"].numpy()
    groups = data["num_subjects"]
    expected, single_draw_covariance, m_step = _exact_em(reaction, days, subject, groups)
    start = namespace["starting_values"](
        data["reaction"], data["days"] - centre, data["subject"], groups
    )
    theta0 = np.concatenate(
        [
            start[name].numpy().ravel()
            for name in ("fixed_effects", "random_effects_covariance", "residual_variance")
        ]
    )
    optimum = theta0
    for _ in range(5000):
        new = m_step(expected(optimum), optimum)
        if np.max(np.abs(new - optimum) / (1 + np.abs(optimum))) < 1e-13:
            break
        optimum = new
    to_original = _to_original(centre)
    # Exact EM (written here) and statsmodels find the same maximum likelihood.
    np.testing.assert_allclose(to_original @ optimum, theta_reference, rtol=1e-4)

    # Effective draws: ESS per draw of the statistics, measured on the last E-step.
    effects = fit.draws["random_effects"].numpy()  # (chains, draws, groups, 2)
    per_draw = np.concatenate(
        [effects, np.einsum("cdgi,cdgj->cdgij", effects, effects).reshape(*effects.shape[:3], 4)],
        -1,
    ).reshape(*effects.shape[:2], -1)
    ratio = min(1.0, chain_diagnostics({"s": per_draw}).min_ess_bulk / np.prod(per_draw.shape[:2]))
    gammas = fit.sample_stats["step_size"][1:]
    sizes = ratio * fit.sample_stats["num_samples"][:-1]
    covariance = monte_carlo_covariance(
        expected, m_step, optimum, single_draw_covariance(optimum), gammas, sizes
    )
    sd = np.sqrt(np.diag(to_original @ covariance @ to_original.T))
    path = to_original @ deterministic_path(expected, m_step, theta0, gammas)
    allowance = np.abs(path - theta_reference)

    estimates = namespace["to_original_scale"](fit.params, centre)
    estimate = np.concatenate(
        [
            estimates[name].numpy().ravel()
            for name in ("fixed_effects", "random_effects_covariance", "residual_variance")
        ]
    )
    error = np.abs(estimate - theta_reference)
    assert np.all(error <= NUM_SD * sd + allowance), error / sd
    # The estimate is not the reference by accident: it carries Monte Carlo noise.
    assert np.all(error > 0)
    # The importance-sampling log-likelihood at the estimate against its exact value.
    exact = namespace["marginal_log_likelihood"](estimates, data)
    assert abs(fit.log_likelihood() - exact) <= NUM_SD * fit.log_likelihood_se
    assert reference.llf >= exact - 1e-6
