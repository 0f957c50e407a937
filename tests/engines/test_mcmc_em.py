"""MCMC-EM: agreement with exact EM within Monte Carlo error, diagnostics, options.

The tolerances come from the linear noise approximation of the EM recursion
(``test_mcmc_em_noise.py``): each test writes the model's exact E-step (expected
sufficient statistics and the covariance of one draw's statistics) and M-step
independently of pyroem, and checks every parameter within 4 Monte Carlo standard
deviations of the exact EM fixed point, plus the deterministic (noise-free) distance
left after the same number of iterations. For one coordinate a 4σ band is missed
with probability 6e-5 when the approximation holds; the runs are seeded.
"""

from __future__ import annotations

import math
import runpy
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy.stats import multivariate_normal
from test_mcmc_em_noise import deterministic_path, monte_carlo_covariance

import pyroem
from pyroem.diagnostics import ChainDiagnostics, chain_diagnostics
from pyroem.engines.mcmc_em import MCMCEMFit, fit_mcmc_em
from pyroem.engines.program_map import initial_values
from pyroem.errors import ConvergenceWarning, MCMCWarning, NotSupportedError, SpecError
from pyroem.estep.exact_draws import sample_discrete
from pyroem.estep.program import expected_log_joint, posterior
from pyroem.estep.stacked_draws import (
    LatentProgram,
    StackedProgram,
    per_draw_log_joint,
    table_weights,
)

NUM_SD = 4.0
ROOT = Path(__file__).resolve().parents[2]

# ----- Gaussian mixture: exact draws of z ---------------------------------------------------


def _gmm_vector(params: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate(
        [params[name].detach().numpy().ravel() for name in ("weights", "means", "covariances")]
    )


def _gmm_unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return theta[:2], theta[2:6].reshape(2, 2), theta[6:].reshape(2, 2, 2)


def _gmm_features(x: np.ndarray) -> np.ndarray:
    """t(x) = (1, x, vec(x xᵀ)) per point, ``(N, 7)``: a component's statistics."""
    return np.concatenate(
        [np.ones((len(x), 1)), x, np.einsum("ni,nj->nij", x, x).reshape(-1, 4)], 1
    )


def _gmm_responsibilities(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    weights, means, covariances = _gmm_unpack(theta)
    log = np.stack(
        [
            np.log(weights[k]) + multivariate_normal(means[k], covariances[k]).logpdf(x)
            for k in range(2)
        ],
        1,
    )
    log -= log.max(1, keepdims=True)
    resp = np.exp(log)
    return resp / resp.sum(1, keepdims=True)


def _gmm_exact(x: np.ndarray):
    """Exact EM of a 2-component full-covariance Gaussian mixture in statistic form:
    s = (Σ_n 1[z_n = k] t(x_n))_k, M-step: weights N_k/N (flat Dirichlet), means, then
    covariances about the new means."""
    features = _gmm_features(x)

    def expected(theta: np.ndarray) -> np.ndarray:
        resp = _gmm_responsibilities(x, theta)
        return (resp[:, :, None] * features[:, None, :]).sum(0).ravel()

    def single_draw_covariance(theta: np.ndarray) -> np.ndarray:
        resp = _gmm_responsibilities(x, theta)
        second = np.zeros((14, 14))
        for k in range(2):
            block = np.einsum("n,ni,nj->ij", resp[:, k], features, features)
            second[7 * k : 7 * k + 7, 7 * k : 7 * k + 7] = block
        means = (resp[:, :, None] * features[:, None, :]).reshape(len(x), 14)
        return second - means.T @ means

    def m_step(stats: np.ndarray, theta: np.ndarray) -> np.ndarray:
        s = stats.reshape(2, 7)
        counts = s[:, 0]
        means = s[:, 1:3] / counts[:, None]
        covariances = s[:, 3:].reshape(2, 2, 2) / counts[:, None, None] - np.einsum(
            "ki,kj->kij", means, means
        )
        return np.concatenate([counts / counts.sum(), means.ravel(), covariances.ravel()])

    return expected, single_draw_covariance, m_step


@pytest.fixture(scope="module")
def faithful_reference() -> Iterator[dict[str, object]]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    data = pyroem.datasets.load_faithful().data
    spec = pyroem.Mixture(2, "gaussian", covariance_type="full", prior=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = pyroem.fit(spec, data, method="map-em", seed=1, max_iter=0).params
    reference = pyroem.fit(spec, data, method="map-em", init=start, tol=1e-12)
    yield {"data": data, "spec": spec, "start": start, "reference": reference}
    # Module-scoped: the per-test fixture restores the dtype it found, which is this one.
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("schedule", ["mcem", "saem"])
def test_gaussian_mixture_reaches_the_map_em_optimum(
    faithful_reference: dict[str, object], schedule: str
) -> None:
    data, spec, start = (faithful_reference[k] for k in ("data", "spec", "start"))
    reference = faithful_reference["reference"]
    fit = pyroem.fit(spec, data, method="mcmc-em", init=start, seed=0, schedule=schedule)
    assert isinstance(fit, MCMCEMFit) and fit.method == "mcmc-em" and fit.converged

    x = data.numpy()
    expected, single_draw_covariance, m_step = _gmm_exact(x)
    # The optimum: map-em's answer, polished by the independently written EM map (map-em
    # stops on the objective, whose change is quadratic in the parameters' error).
    map_em = _gmm_vector(reference.params)  # type: ignore[attr-defined]
    optimum = _fixed_point(expected, m_step, map_em)
    np.testing.assert_allclose(map_em, optimum, rtol=1e-5)
    # Exact draws are independent: n_t is the number of draws of the E-step before M-step t.
    gammas = fit.sample_stats["step_size"][1:]
    sizes = fit.sample_stats["num_samples"][:-1]
    covariance = monte_carlo_covariance(
        expected, m_step, optimum, single_draw_covariance(optimum), gammas, sizes
    )
    sd = np.sqrt(np.diag(covariance))
    transient = np.abs(deterministic_path(expected, m_step, _gmm_vector(start), gammas) - optimum)
    error = np.abs(_gmm_vector(fit.params) - optimum)
    assert np.all(error <= NUM_SD * sd + transient + 1e-10), (error / sd).max()
    # The Monte Carlo error is real (the draws are random) but small.
    assert error.max() > 0 and (error / (sd + transient)).max() < NUM_SD
    # Every latent is discrete: the objective is the exact log joint of θ_t.
    assert fit.history.objective[-1] == pytest.approx(reference.log_joint(), abs=1e-3)  # type: ignore[attr-defined]
    assert fit.draws["assignment"].shape == (1, int(fit.sample_stats["num_samples"][-1]), 272)
    assert math.isnan(fit.diagnostics[-1].max_rhat)
    assert fit.diagnostics[-1].min_ess_bulk == fit.sample_stats["num_samples"][-1]
    if schedule == "saem":
        assert fit.burn_in is not None and fit.sample_stats["step_size"][-1] < 1


def test_exact_draws_of_hmm_states_match_the_exact_posterior() -> None:
    """Forward filtering, backward sampling on a masked Gaussian HMM (models/hmm.py):
    the frequency of every configuration of every factor table (single states,
    transitions) over S exact draws is a mean of S i.i.d. Bernoulli(p) indicators, with
    p the exact posterior marginal from enumeration, so it lies within
    4.5 sqrt(p(1 - p)/S) of p; over the ~300 entries the band is missed by chance with
    probability below 0.3% (and the seed is fixed). The Monte Carlo Q computed from
    those weights equals the average log joint of the draws (two representations of
    the same sum)."""
    torch.set_default_dtype(torch.float64)
    namespace = runpy.run_path(str(ROOT / "models" / "hmm.py"), run_name="example")
    lengths = torch.tensor([6, 4, 5])
    sequences, _ = namespace["simulate_gaussian_hmm"](
        lengths,
        torch.tensor([0.6, 0.4]),
        torch.tensor([[0.8, 0.2], [0.3, 0.7]]),
        torch.tensor([[0.0], [1.5]]),
        torch.tensor([[0.6], [0.6]]),
        seed=1,
    )
    program = LatentProgram(namespace["gaussian_hmm"], (sequences, lengths, 2))
    values = initial_values(program, None, 0)
    exact = posterior(program, values)
    num_draws = 4000
    draws = sample_discrete(program, values, num_draws)
    uniform = torch.full((num_draws,), 1.0 / num_draws)
    weights = table_weights(program, exact.trace, uniform, draws)
    for name, expected in exact.weights.items():
        band = 4.5 * (expected * (1 - expected) / num_draws).sqrt() + 1e-12
        assert torch.all((weights[name] - expected).abs() <= band), name
    per_draw = per_draw_log_joint(program, values, draws)[0]
    q = expected_log_joint(program, values, weights)
    assert float(q) == pytest.approx(float(per_draw.mean()), rel=1e-10)


def grouped_mixture(y: torch.Tensor) -> None:
    """Two-component mixture with a random shift b_g per group: a continuous and a
    discrete latent in the same plate."""
    weights = pyro.param("w", torch.ones(2) / 2, constraint=dist.constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    tau2 = pyro.param("tau2", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("groups", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(0.0, tau2.sqrt()))
        with pyro.plate("members", y.shape[1], dim=-1):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("y", dist.Normal(locs[z] + b, 0.4), obs=y)


def test_discrete_draws_given_continuous_draws_match_their_conditional_posterior() -> None:
    """With continuous draws b_s stacked along the draws plate, the exact draws of z
    given each b_s give table weights whose sum over the draws estimates the average
    conditional marginal (1/S) Σ_s p(z | y, b_s): per entry a sum of independent
    Bernoulli(p_s)/S terms, standard deviation sqrt(Σ_s p_s(1 - p_s))/S, checked within
    4.5 of them (about 100 entries: missed by chance with probability below 0.1%). The
    Monte Carlo Q from those weights equals the average log joint of the draws."""
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(5, 4, generator=generator) + torch.tensor([-1.5, 1.5, -1.5, 1.5])
    program = LatentProgram(grouped_mixture, (y,))
    assert program.latents == ["b"] and program.enumerated == ["z"]
    values = initial_values(program, None, 0)
    num_draws = 3000
    shifts = 0.7 * torch.randn(num_draws, 5, 1, generator=generator)
    discrete = sample_discrete(program, values, num_draws, {"b": shifts})
    stacked = StackedProgram(program, {"b": shifts})
    exact = posterior(stacked, values)
    uniform = torch.full((num_draws,), 1.0 / num_draws)
    weights = table_weights(stacked, exact.trace, uniform, discrete)
    draws_dim = -stacked.max_plate_nesting
    estimate = weights["y"].sum(draws_dim)
    expected = exact.weights["y"].sum(draws_dim) / num_draws
    spread = (exact.weights["y"] * (1 - exact.weights["y"])).sum(draws_dim).sqrt() / num_draws
    assert torch.all((estimate - expected).abs() <= 4.5 * spread + 1e-12)
    per_draw = per_draw_log_joint(program, values, {"b": shifts, **discrete})[0]
    q = expected_log_joint(stacked, values, weights)
    assert float(q) == pytest.approx(float(per_draw.mean()), rel=1e-10)


# ----- Normal–Normal hierarchy: NUTS draws of continuous latents --------------------------

NUM_GROUPS, GROUP_SIZE = 10, 5


def _hierarchy_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    effects = 1.0 + 1.2 * torch.randn(NUM_GROUPS, 1, generator=generator, dtype=torch.float64)
    return effects + torch.randn(NUM_GROUPS, GROUP_SIZE, generator=generator, dtype=torch.float64)


def hierarchy(y: torch.Tensor) -> None:
    """y_ij ~ N(b_i, σ²), b_i ~ N(μ, τ²); θ = (μ, τ², σ²) maximum likelihood."""
    mu = pyro.param("mu", torch.tensor(0.0))
    tau2 = pyro.param("tau2", torch.tensor(1.0), constraint=dist.constraints.positive)
    sigma2 = pyro.param("sigma2", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("groups", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(mu, tau2.sqrt()))
        with pyro.plate("members", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(b, sigma2.sqrt()), obs=y)


def _hierarchy_exact(y: np.ndarray):
    """Exact EM of the Normal–Normal hierarchy, written from the conjugate posterior
    b_i | y ~ N(m_i, v), v = 1/(n/σ² + 1/τ²), m_i = v (Y_i/σ² + μ/τ²), Y_i = Σ_j y_ij.

    Statistics s = (Σ b_i, Σ b_i², Σ Y_i b_i); M-step: μ = Σb/G, τ² = Σb²/G − μ²,
    σ² = (Σ y² − 2 Σ Y_i b_i + n Σ b_i²)/(G n). θ = (μ, τ², σ²)."""
    groups, size = y.shape
    totals = y.sum(1)

    def posterior(theta: np.ndarray) -> tuple[np.ndarray, float]:
        mu, tau2, sigma2 = theta
        v = 1.0 / (size / sigma2 + 1.0 / tau2)
        return v * (totals / sigma2 + mu / tau2), v

    def expected(theta: np.ndarray) -> np.ndarray:
        m, v = posterior(theta)
        return np.array([m.sum(), (m**2 + v).sum(), (totals * m).sum()])

    def single_draw_covariance(theta: np.ndarray) -> np.ndarray:
        m, v = posterior(theta)
        # b ~ N(m, v): Var b = v, Cov(b, b²) = 2 m v, Var b² = 2v² + 4m²v.
        blocks = [
            [np.full_like(m, v), 2 * m * v, totals * v],
            [2 * m * v, 2 * v**2 + 4 * m**2 * v, 2 * totals * m * v],
            [totals * v, 2 * totals * m * v, totals**2 * v],
        ]
        return np.array([[entry.sum() for entry in row] for row in blocks])

    def m_step(stats: np.ndarray, theta: np.ndarray) -> np.ndarray:
        mu = stats[0] / groups
        return np.array(
            [
                mu,
                stats[1] / groups - mu**2,
                ((y**2).sum() - 2 * stats[2] + size * stats[1]) / (groups * size),
            ]
        )

    return expected, single_draw_covariance, m_step


def _fixed_point(expected, m_step, theta: np.ndarray) -> np.ndarray:
    for _ in range(10000):
        new = m_step(expected(theta), theta)
        if np.max(np.abs(new - theta)) < 1e-13:
            return new
        theta = new
    raise AssertionError("exact EM did not converge")


def _statistics_ess_ratio(stats: np.ndarray) -> float:
    """ESS per draw of the sufficient statistics ``(chains, draws, q)`` (ArviZ bulk ESS,
    smallest over the statistics), at most 1."""
    diagnostics = chain_diagnostics({"stats": stats})
    return min(1.0, diagnostics.min_ess_bulk / (stats.shape[0] * stats.shape[1]))


NUTS_OPTIONS = {
    "schedule": "mcem",
    "num_samples": 40,
    "warmup_steps": 100,
    "final_draws": 250,
    "jit_compile": True,
    "log_likelihood_samples": 500,
}


@pytest.fixture(scope="module")
def hierarchy_fit() -> Iterator[tuple[MCMCEMFit, dict[str, torch.Tensor]]]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    y = _hierarchy_data()
    # Far enough from the optimum that E-steps at a stale θ would end elsewhere.
    start = {"mu": torch.tensor(0.0), "tau2": torch.tensor(0.5), "sigma2": torch.tensor(2.0)}
    # 250 draws per chain keep the test fast; with so few, the largest R-hat over the
    # latents scatters around 1.01 even for sound chains, so the warning is not tested here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCMCWarning)
        fit = pyroem.fit(
            hierarchy, y, method="mcmc-em", init=start, seed=0, tol=1e-3, **NUTS_OPTIONS
        )
    yield fit, start
    torch.set_default_dtype(previous)


def test_normal_hierarchy_matches_the_exact_em_fixed_point(
    hierarchy_fit: tuple[MCMCEMFit, dict[str, torch.Tensor]],
) -> None:
    fit, start = hierarchy_fit
    assert fit.converged and fit.latents == ["b"]
    assert fit.m_step_kinds == {
        "mu": "flat-normal-mean",
        "tau2": "flat-normal-variance",
        "sigma2": "flat-normal-variance",
    }
    y = _hierarchy_data().numpy()
    expected, single_draw_covariance, m_step = _hierarchy_exact(y)
    theta0 = np.array([float(start[name]) for name in ("mu", "tau2", "sigma2")])
    optimum = _fixed_point(expected, m_step, theta0)
    draws = fit.draws["b"].numpy()[..., 0]  # (chains, draws, groups)
    totals = y.sum(1)
    per_draw = np.stack([draws.sum(-1), (draws**2).sum(-1), (draws * totals).sum(-1)], -1)
    ratio = _statistics_ess_ratio(per_draw)
    gammas = fit.sample_stats["step_size"][1:]
    sizes = ratio * fit.sample_stats["num_samples"][:-1]
    covariance = monte_carlo_covariance(
        expected, m_step, optimum, single_draw_covariance(optimum), gammas, sizes
    )
    sd = np.sqrt(np.diag(covariance))
    transient = np.abs(deterministic_path(expected, m_step, theta0, gammas) - optimum)
    estimate = np.array([float(fit.params[name]) for name in ("mu", "tau2", "sigma2")])
    error = np.abs(estimate - optimum)
    assert np.all(error <= NUM_SD * sd + transient), error / sd
    # The final log-likelihood is an importance-sampling estimate; the exact one is a
    # Gaussian integral: y_i ~ N(μ1, σ²I + τ²11ᵀ).
    mu, tau2, sigma2 = estimate
    law = multivariate_normal(
        np.full(GROUP_SIZE, mu), sigma2 * np.eye(GROUP_SIZE) + tau2 * np.ones((GROUP_SIZE,) * 2)
    )
    exact = law.logpdf(y).sum()
    assert abs(fit.log_likelihood() - exact) <= NUM_SD * fit.log_likelihood_se + 1e-3


def test_diagnostics_are_recorded_every_iteration(
    hierarchy_fit: tuple[MCMCEMFit, dict[str, torch.Tensor]],
) -> None:
    fit, _ = hierarchy_fit
    length = fit.num_iterations + 1
    assert len(fit.diagnostics) == length == len(fit.history.objective)
    assert all(isinstance(entry, ChainDiagnostics) for entry in fit.diagnostics)
    assert all(entry.num_chains == 4 for entry in fit.diagnostics)
    for key in (
        "num_samples",
        "step_size",
        "delta_q",
        "max_rhat",
        "min_ess_bulk",
        "num_divergences",
    ):
        assert fit.sample_stats[key].shape == (length,), key
    assert all(np.isfinite(fit.sample_stats["max_rhat"]))
    assert fit.parameter_trace["tau2"].shape == (length,)
    assert float(fit.parameter_trace["tau2"][-1]) == float(fit.params["tau2"])
    # The final E-step is long enough to tell sound chains from broken ones (below).
    final = fit.final_diagnostics
    assert final is not None and final.num_draws == 250 and final.num_divergences == 0
    assert final.max_rhat < 1.05 and final.min_ess_bulk > 400
    assert fit.draws["b"].shape == (4, 250, NUM_GROUPS, 1)


def ridge(y: torch.Tensor) -> None:
    """One observation of b_0 + b_1 under a wide prior: the posterior of b is a ridge,
    sd 0.7 across and 70 along it."""
    shift = pyro.param("shift", torch.tensor(0.0))
    b = pyro.sample("b", dist.Normal(torch.zeros(2), 100.0).to_event(1))
    pyro.sample("y", dist.Normal(b.sum(-1) + shift, 1.0), obs=y)


def test_a_broken_chain_is_flagged() -> None:
    """No adaptation (identity mass matrix, so the step size is set by the narrow
    direction) and trees of depth 1: the chains creep along the ridge and do not mix."""
    torch.set_default_dtype(torch.float64)
    with warnings.catch_warnings(), pytest.warns(MCMCWarning, match="R-hat"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # two iterations only
        fit = pyroem.fit(
            ridge,
            torch.tensor(3.0),
            method="mcmc-em",
            latents=["b"],
            seed=0,
            max_iter=2,
            num_samples=40,
            warmup_steps=0,
            max_tree_depth=1,
            final_draws=25,
            log_likelihood_samples=0,
        )
    final = fit.final_diagnostics
    assert final is not None and final.max_rhat > 1.5 and final.min_ess_bulk < 20
    # Every E-step shows it (NaN: a chain that never moved).
    assert all(not entry.max_rhat < 1.1 for entry in fit.diagnostics)
    assert any("R-hat" in problem for problem in fit.problems)


# ----- options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_sample": 10}, "unknown options for method='mcmc-em'"),
        ({"schedule": "em"}, "schedule must be one of"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"num_samples": 50, "max_samples": 10}, "max_samples"),
        ({"sample_growth": 1}, "sample_growth must be a number > 1"),
        ({"burn_in": -1}, "burn_in must be an integer >= 0"),
        ({"step_exponent": 0.5}, "step_exponent must be in"),
        ({"target_accept_prob": 1.0}, "target_accept_prob must be in"),
        ({"num_chains": 0}, "num_chains must be an integer >= 1"),
        ({"jit_compile": "yes"}, "jit_compile must be True or False"),
        ({"latents": "b"}, "latents must be a list of site names"),
        ({"latents": ["nothing"]}, "not continuous latent sample sites"),
        ({"num_samples": 6}, "at least 4 draws"),
    ],
)
def test_options_are_validated(options: dict[str, object], message: str) -> None:
    torch.set_default_dtype(torch.float64)
    with pytest.raises(SpecError, match=message):
        pyroem.fit(hierarchy, _hierarchy_data(), method="mcmc-em", **options)


def test_m_step_option_is_validated() -> None:
    torch.set_default_dtype(torch.float64)
    with pytest.raises(SpecError, match="m_step must be one of"):
        fit_mcmc_em(
            hierarchy,
            (_hierarchy_data(),),
            None,
            tol=1e-4,
            max_iter=1,
            init=None,
            seed=0,
            progress=False,
            m_step="newton",
        )


def test_a_model_without_latents_is_refused() -> None:
    torch.set_default_dtype(torch.float64)

    def no_latents(y: torch.Tensor) -> None:
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    with pytest.raises(NotSupportedError, match="no latent variables"):
        pyroem.fit(no_latents, torch.zeros(5), method="mcmc-em")


def test_init_must_be_a_dict() -> None:
    torch.set_default_dtype(torch.float64)
    with pytest.raises(SpecError, match="init for a Pyro program"):
        pyroem.fit(hierarchy, _hierarchy_data(), method="mcmc-em", init=[1.0])


def test_mixture_under_float32_default_dtype() -> None:
    """The data are float64 while torch's default dtype stays float32: the Monte Carlo
    weights must follow the tables' dtype."""
    torch.set_default_dtype(torch.float32)  # conftest restores the previous default
    data = pyroem.datasets.load_faithful().data
    spec = pyroem.Mixture(2, "gaussian")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(spec, data, method="mcmc-em", seed=0, max_iter=5)
    reference = pyroem.fit(spec, data, seed=0)
    assert fit.params["means"].dtype == torch.float64
    # A handful of SAEM steps from the same k-means++ start lands near the MAP fixed point
    # (well-separated clusters: responsibilities are nearly 0/1, Monte Carlo noise tiny).
    torch.testing.assert_close(fit.params["means"], reference.params["means"], rtol=1e-2, atol=0)


def _intercepts(y: torch.Tensor) -> None:
    """y_ij ~ N(b_i, 1), b_i ~ N(μ, τ²): every tensor in the data's dtype."""
    mu = pyro.param("mu", torch.tensor(0.0, dtype=y.dtype))
    tau = pyro.param("tau", torch.tensor(1.0, dtype=y.dtype), constraint=dist.constraints.positive)
    with pyro.plate("groups", y.shape[0], dim=-2):
        b = pyro.sample("b", dist.Normal(mu, tau))
        with pyro.plate("members", y.shape[1], dim=-1):
            pyro.sample("y", dist.Normal(b, torch.tensor(1.0, dtype=y.dtype)), obs=y)


@pytest.mark.parametrize(
    ("default", "dtype"),
    [(torch.float32, torch.float64), (torch.float64, torch.float32)],
)
def test_nuts_mcmc_em_runs_in_the_programs_dtype(default: torch.dtype, dtype: torch.dtype) -> None:
    """The chains, the draws and the importance-sampling log-likelihood follow the
    program's dtype, not torch's default one (a float64 program under the float32
    default crashed in the final log-likelihood; a float32 one under the float64
    default ran its chains in float64)."""
    torch.set_default_dtype(default)  # conftest restores the previous default
    y = _hierarchy_data()[:6, :4].to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MCMCWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = pyroem.fit(
            _intercepts,
            y,
            method="mcmc-em",
            seed=0,
            max_iter=3,
            schedule="mcem",
            num_chains=2,
            num_samples=10,
            warmup_steps=40,
            final_draws=100,
            log_likelihood_samples=1000,
        )
    assert fit.draws["b"].dtype == dtype
    assert all(value.dtype == dtype for value in fit.params.values())
    # The exact marginal at the fitted θ: y_i ~ N(μ1, I + τ²11ᵀ), per group.
    mu, tau = float(fit.params["mu"]), float(fit.params["tau"])
    size = y.shape[1]
    law = multivariate_normal(np.full(size, mu), np.eye(size) + tau**2 * np.ones((size, size)))
    exact = law.logpdf(y.double().numpy()).sum()
    # Within 4 Monte Carlo standard errors (about 0.02 here), plus the float32 rounding
    # of the log joint: 30 terms of size ~2, each good to 2^-24 relative, 1e-4 in all.
    se = fit.log_likelihood_se
    assert 0 < se < 0.1
    assert abs(fit.log_likelihood() - exact) <= NUM_SD * se + 1e-4
