r"""The Monte Carlo error of an MCMC-EM estimate, for the tolerances of the MCMC-EM tests.

Derivation (linear noise approximation of the EM recursion near its fixed point).
Write the exact EM map in sufficient-statistic form: the E-step gives the expected
statistics :math:`E(θ) = E[s(z) \mid x; θ]`, the M-step :math:`θ' = M(s, θ)` (ECM
may read the previous θ). MCMC-EM replaces :math:`E(θ_{t-1})` by the average of
:math:`n_t` effective draws, :math:`\hat s_t = E(θ_{t-1}) + η_t` with
:math:`\mathrm{Cov}(η_t) = Σ_1 / n_t` (:math:`Σ_1`: covariance of the statistics of
one draw from the exact posterior), and combines them with step :math:`γ_t`
(1 for MCEM; SAEM's schedule otherwise):

.. math:: s_t = (1 - γ_t) s_{t-1} + γ_t \hat s_t,\qquad θ_t = M(s_t, θ_{t-1}).

Linearised about the fixed point :math:`(s^*, θ^*)`, with
:math:`E_θ = ∂E/∂θ`, :math:`M_s = ∂M/∂s`, :math:`M_θ = ∂M/∂θ`, the deviations
:math:`x_t = (s_t - s^*, θ_t - θ^*)` follow :math:`x_t = A_t x_{t-1} + B_t η_t` with

.. math::
    A_t = \begin{pmatrix} (1-γ_t) I & γ_t E_θ \\ (1-γ_t) M_s & γ_t M_s E_θ + M_θ \end{pmatrix},
    \qquad B_t = \begin{pmatrix} γ_t I \\ γ_t M_s \end{pmatrix},

so their covariance obeys :math:`V_t = A_t V_{t-1} A_t^T + B_t Σ_1 B_t^T / n_t`
(:math:`V_0 = 0`: the run starts from a fixed θ_0). The θ block of :math:`V_T` is the
Monte Carlo covariance of the final estimate. The noise-free recursion from θ_0 (exact
E-steps, same γ's) gives the deterministic part; the tests allow for it separately.

The draws of different E-steps are taken as independent: exactly so for exact
discrete draws; for NUTS chains continued across iterations, ``discard_steps``
transitions separate the E-steps and the chains' autocorrelation time is a few
transitions, and the within-E-step correlation enters through ``n_t = r · S_t``, with
``r`` the ESS per draw of the statistics measured (by ArviZ) on the last E-step.

This module also checks the recursion against two closed forms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Vector = np.ndarray


def jacobian(function: Callable[[Vector], Vector], point: Vector, step: float = 1e-6) -> np.ndarray:
    """Central finite-difference Jacobian ``(out, in)``, steps relative to each entry."""
    point = np.asarray(point, dtype=float)
    columns = []
    for i in range(point.size):
        h = step * max(1.0, abs(point[i]))
        up, down = point.copy(), point.copy()
        up[i] += h
        down[i] -= h
        columns.append((np.asarray(function(up)) - np.asarray(function(down))) / (2 * h))
    return np.stack(columns, axis=-1)


def monte_carlo_covariance(
    expected: Callable[[Vector], Vector],
    m_step: Callable[[Vector, Vector], Vector],
    theta: Vector,
    single_draw_covariance: np.ndarray,
    gammas: Sequence[float],
    sizes: Sequence[float],
) -> np.ndarray:
    """Covariance of θ_T under the linear noise approximation (see the module docstring).

    Args:
        expected: ``θ → E(θ)``, the exact expected statistics.
        m_step: ``(s, θ_prev) → θ``, the M-step as the engine applies it.
        theta: the fixed point θ*.
        single_draw_covariance: ``Σ_1``, covariance of the statistics of one exact draw at θ*.
        gammas: step sizes γ_1..γ_T of the M-steps.
        sizes: effective draws n_1..n_T of the E-steps they used.

    Returns:
        ``(p, p)`` covariance of θ_T.
    """
    stats = np.asarray(expected(theta))
    e_theta = jacobian(expected, theta)
    m_s = jacobian(lambda s: m_step(s, theta), stats)
    m_theta = jacobian(lambda t: m_step(stats, t), theta)
    q, p = stats.size, theta.size
    state = np.zeros((q + p, q + p))
    for gamma, size in zip(gammas, sizes, strict=True):
        a = np.block(
            [
                [(1 - gamma) * np.eye(q), gamma * e_theta],
                [(1 - gamma) * m_s, gamma * m_s @ e_theta + m_theta],
            ]
        )
        b = np.vstack([gamma * np.eye(q), gamma * m_s])
        state = a @ state @ a.T + b @ single_draw_covariance @ b.T / size
    return state[q:, q:]


def deterministic_path(
    expected: Callable[[Vector], Vector],
    m_step: Callable[[Vector, Vector], Vector],
    theta0: Vector,
    gammas: Sequence[float],
) -> Vector:
    """θ_T of the noise-free recursion from θ_0 with the same step sizes."""
    theta = np.asarray(theta0, dtype=float)
    stats = np.asarray(expected(theta))
    for gamma in gammas:
        stats = (1 - gamma) * stats + gamma * np.asarray(expected(theta))
        theta = np.asarray(m_step(stats, theta))
    return theta


# ----- the recursion against closed forms ------------------------------------------


def test_mcem_recursion_is_the_ar1_stationary_variance() -> None:
    """Scalar MCEM with E(θ) = ρθ + c and M(s) = s: θ_t = ρθ_{t-1} + c + η_t is AR(1),
    whose stationary variance is σ²/(n(1 - ρ²))."""
    rho, sigma2, n = 0.6, 2.0, 50.0
    variance = monte_carlo_covariance(
        lambda t: rho * t + 1.0,
        lambda s, t: s,
        np.array([1.0 / (1 - rho)]),
        np.array([[sigma2]]),
        [1.0] * 200,
        [n] * 200,
    )
    assert np.isclose(variance[0, 0], sigma2 / (n * (1 - rho**2)), rtol=1e-9)


def test_saem_recursion_without_feedback_is_the_running_average() -> None:
    """With E constant (no feedback) and γ_k = 1/k, s_K is the average of K draws of
    n each: variance σ²/(nK)."""
    sigma2, n, k = 3.0, 20.0, 40
    variance = monte_carlo_covariance(
        lambda t: np.array([5.0]),
        lambda s, t: s,
        np.array([5.0]),
        np.array([[sigma2]]),
        [1.0 / i for i in range(1, k + 1)],
        [n] * k,
    )
    assert np.isclose(variance[0, 0], sigma2 / (n * k), rtol=1e-9)
