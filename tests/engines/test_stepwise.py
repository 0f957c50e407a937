"""Stepwise (online) EM reaches the batch EM optimum, and reports the exact objective of
every pass."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.mixture import GaussianMixture

import pyroem
from pyroem.engines.stepwise import step_size
from pyroem.errors import SpecError
from tests.reference_densities import gaussian_mixture_pointwise

SPEC = pyroem.Mixture(3, "gaussian", prior=None)
WEIGHTS = np.array([0.3, 0.3, 0.4])


def _blobs(seed: int, num: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    labels = rng.choice(3, size=num, p=WEIGHTS)
    return centres[labels] + rng.normal(size=(num, 2))


def _log_joint(data: np.ndarray, params: dict) -> float:
    """log p(x, θ) of a Gaussian mixture by SciPy: the log-likelihood plus the flat
    Dirichlet(1, 1, 1) density of the weights, log Γ(3) = log 2 (the MAP-EM objective)."""
    return float(gaussian_mixture_pointwise(data, params).sum()) + math.log(2.0)


@pytest.mark.parametrize("source", ["memory", "npy"])
def test_stepwise_em_reaches_the_batch_optimum(source, tmp_path):
    r"""Three passes of stepwise EM (b = 100 rows per minibatch, κ = 0.7) on N = 4000
    well-separated points reach the batch optimum (scikit-learn's EM) within the noise
    the schedule leaves.

    Derivation of the tolerance. Near the optimum, the running statistics obey
    s_t − s* ≈ (1 − γ_t)(s_{t−1} − s*) + γ_t ξ_t, with ξ_t the minibatch's sampling
    noise; for slowly varying γ this AR(1) recursion has stationary variance
    γ_t² Var ξ / (1 − (1 − γ_t)²) ≈ (γ_t / 2) Var ξ. For a component mean, the
    minibatch noise of Σ_B r_nk (x_n − μ_k) · N / b divided by N_k has variance
    σ² / (b π_k) per coordinate (σ = 1 here); for a weight, π_k(1 − π_k) / b; for a
    covariance entry at most 2σ⁴ / (b π_k). The reported parameters average the
    iterates of passes 2 and 3 (updates t ≥ t0 = N / b), whose γ_t ≤ γ_{t0}; an average
    is no farther from θ* than its farthest term, and 80 near-normal terms (4 numbers
    each) stay within 5 standard deviations but with probability < 1e-3. So the
    tolerance is 5·sqrt(γ_{t0}/2 · v) with v the variance above at π_min = 0.3. On
    well-separated data the responsibilities are 0/1 from the first update, so the
    deterministic transient (Π(1 − γ_t) of the start's error) is gone before t0.
    """
    data = _blobs(3, 4000)
    batch, kappa, passes = 100, 0.7, 3
    if source == "npy":
        np.save(tmp_path / "x.npy", data)
        given = str(tmp_path / "x.npy")
    else:
        given = data
    fit = pyroem.fit(
        SPEC, given, seed=1, stepwise=True, batch_size=batch, kappa=kappa, passes=passes
    )
    gmm = GaussianMixture(3, reg_covar=0.0, tol=1e-12, max_iter=1000, random_state=0).fit(data)
    order = np.argsort(fit.params["means"][:, 0].numpy())
    theirs = np.argsort(gmm.means_[:, 0])

    gamma = step_size(len(data) // batch, kappa)
    pi_min = 0.3
    mean_tol = 5 * math.sqrt(gamma / 2 / (batch * pi_min))
    weight_tol = 5 * math.sqrt(gamma / 2 * pi_min * (1 - pi_min) / batch)
    cov_tol = 5 * math.sqrt(gamma / 2 * 2 / (batch * pi_min))
    means = fit.params["means"].numpy()[order]
    np.testing.assert_allclose(means, gmm.means_[theirs], rtol=0, atol=mean_tol)
    weights = fit.params["weights"].numpy()[order]
    np.testing.assert_allclose(weights, gmm.weights_[theirs], rtol=0, atol=weight_tol)
    covariances = fit.params["covariances"].numpy()[order]
    np.testing.assert_allclose(covariances, gmm.covariances_[theirs], rtol=0, atol=cov_tol)

    # The history holds the start and one exact objective per pass.
    history = fit.history.objective
    assert history.shape == (passes + 1,)
    assert fit.num_iterations == passes
    assert fit.options["stepwise"] is True
    np.testing.assert_allclose(history[-1], _log_joint(data, fit.params), rtol=1e-12)
    optimum = gmm.score(data) * len(data) + math.log(2.0)
    assert history[-1] <= optimum + 1e-9 * abs(optimum)
    # Second-order gap: |Δθ|² × curvature ~ N × tol², far below one nat per point.
    assert optimum - history[-1] < 1e-3 * len(data)


def test_step_size_schedule_and_options():
    assert step_size(1, 0.7) == pytest.approx(3**-0.7)
    assert step_size(10, 1.0) == pytest.approx(1 / 12)
    data = _blobs(0, 200)
    for kappa in (0.5, 1.2, "0.7"):
        with pytest.raises(SpecError, match="kappa"):
            pyroem.fit(SPEC, data, stepwise=True, kappa=kappa)
    with pytest.raises(SpecError, match="batch_size"):
        pyroem.fit(SPEC, data, stepwise=True, batch_size=0)
    with pytest.raises(SpecError, match="map-em"):
        pyroem.fit(SPEC, data, method="nuts", stepwise=True)


def test_stepwise_statistics_combine_exactly():
    """One pass with a minibatch as large as the data and a batch M-step is one batch
    EM iteration: with b = N the first minibatch's statistics are the batch's."""
    data = _blobs(5, 300)
    start = {
        "weights": np.array([0.2, 0.3, 0.5]),
        "means": np.array([[-4.0, 1.0], [1.0, 4.0], [4.0, -1.0]]),
        "covariances": np.stack([np.eye(2) * 2.0] * 3),
    }
    stepwise = pyroem.fit(
        SPEC, data, init=start, stepwise=True, batch_size=len(data), passes=1, shuffle=False
    )
    with pytest.warns(pyroem.errors.ConvergenceWarning):
        batch = pyroem.fit(SPEC, data, init=start, max_iter=1, tol=0.0)
    for name, value in batch.params.items():
        torch.testing.assert_close(stepwise.params[name], value, rtol=0, atol=1e-12)


def test_stepwise_statistics_are_scaled_to_the_data_size():
    r"""With a strong Gamma(400, 40) prior (40 pseudo-observations at rate 10) the batch
    MAP rates sit ~0.2 from the data's; statistics left at minibatch scale (b = 100, not
    N = 2000) would weigh the prior 20 times more, moving the 15-rate by ~2. The
    tolerance, derived as in the Gaussian test (Poisson noise λ/(b π_k) per rate,
    λ ≤ 15, π_k = 0.5), is 5·sqrt(γ_{t0}/2 · 15/(100 · 0.5)) ≈ 0.5."""
    rng = np.random.default_rng(4)
    counts = np.concatenate([rng.poisson(3.0, (1000, 1)), rng.poisson(15.0, (1000, 1))])
    spec = pyroem.Mixture(2, "poisson", prior=pyroem.Gamma(concentration=400.0, rate=40.0))
    batch = pyroem.fit(spec, counts, seed=0, tol=1e-12)
    stepwise = pyroem.fit(spec, counts, seed=0, stepwise=True, batch_size=100, passes=3)
    tol = 5 * math.sqrt(step_size(len(counts) // 100, 0.7) / 2 * 15 / (100 * 0.5))
    ours = np.sort(stepwise.params["rates"].numpy()[:, 0])
    np.testing.assert_allclose(ours, np.sort(batch.params["rates"].numpy()[:, 0]), atol=tol)


def test_stepwise_fit_of_a_dataframe_keeps_its_column_names():
    frame = pd.DataFrame(_blobs(0, 300), columns=["width", "height"])
    fit = pyroem.fit(SPEC, frame, seed=0, stepwise=True, batch_size=50, passes=1)
    assert fit.feature_names == ("width", "height")
