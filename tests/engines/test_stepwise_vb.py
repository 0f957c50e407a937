"""Stochastic variational inference (stepwise EM on CAVI's natural parameters) reaches
the batch CAVI optimum, computed by scikit-learn's ``BayesianGaussianMixture``."""

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import BayesianGaussianMixture

import pyroem
from pyroem.engines.stepwise import step_size
from pyroem.errors import SpecError

WEIGHTS = np.array([0.3, 0.3, 0.4])
ALPHA0, KAPPA0, NU0 = 1.0, 0.5, 3.0


def _blobs(seed: int, num: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[-6.0, 0.0], [0.0, 6.0], [6.0, 0.0]])
    labels = rng.choice(3, size=num, p=WEIGHTS)
    return centres[labels] + rng.normal(size=(num, 2))


def _spec() -> pyroem.Mixture:
    prior = pyroem.NormalInverseWishart(
        mean=np.zeros(2), mean_precision=KAPPA0, dof=NU0, scale=np.eye(2)
    )
    return pyroem.Mixture(3, "gaussian", prior=prior, weights_prior=ALPHA0)


def _sklearn_optimum(data: np.ndarray) -> BayesianGaussianMixture:
    """The batch CAVI optimum of the same model (the same Normal–Wishart prior, see
    tests/engines/test_cavi_sklearn.py), run to convergence."""
    model = BayesianGaussianMixture(
        n_components=3,
        weight_concentration_prior_type="dirichlet_distribution",
        weight_concentration_prior=ALPHA0,
        mean_prior=np.zeros(2),
        mean_precision_prior=KAPPA0,
        degrees_of_freedom_prior=NU0,
        covariance_prior=np.eye(2),
        reg_covar=0.0,
        tol=1e-12,
        max_iter=1000,
        random_state=0,
    )
    return model.fit(data)


def _summaries(state, shift: torch.Tensor) -> dict[str, np.ndarray]:
    """``E_q[π]``, the means ``m_k`` and ``Ψ_k/ν_k`` (scikit-learn's ``covariances_``) of a
    ``q(π, θ)``, in the order of the means' first coordinate."""
    alpha = state.weights_concentration.numpy()
    mean, _, dof, scale = state.components
    means = (mean + shift).numpy()
    order = np.argsort(means[:, 0])
    return {
        "weights": (alpha / alpha.sum())[order],
        "means": means[order],
        "covariances": (scale / dof[:, None, None]).numpy()[order],
    }


@pytest.mark.parametrize("source", ["memory", "npy"])
def test_stochastic_vi_reaches_the_batch_cavi_optimum(source, tmp_path):
    r"""Three passes of stochastic VI (b = 100, κ = 0.7) on N = 4000 well-separated
    points: the averaged ``q̄(π, θ)`` after the last pass is within the schedule's noise
    of scikit-learn's batch CAVI optimum.

    Tolerance: as tests/engines/test_stepwise.py derives for stepwise MAP-EM. The natural
    parameters of ``q(π, θ)`` are affine in the running statistics ``s``, whose
    stationary noise about ``s*`` is ``(γ_t / 2) Var ξ`` with ξ a minibatch's sampling
    noise; ``m_k = (κ0 m0 + N_k x̄_k)/(κ0 + N_k)``, ``E_q[π_k] = (α0 + N_k)/(3α0 + N)``
    and ``Ψ_k/ν_k = (Ψ0 + S_k + …)/(ν0 + N_k)`` move with ``x̄_k``, ``N_k/N`` and
    ``S_k/N_k`` as MAP-EM's parameters do (the prior's pseudo-counts, ≤ 3 of N_k ≥ 1200,
    shrink the noise). So: 5·sqrt(γ_{t0}/2 · v), v = σ²/(b π_min) for a mean,
    π(1 − π)/b for a weight and 2σ⁴/(b π_min) for a covariance entry, t0 = N/b the
    first averaged update.
    """
    data = _blobs(3, 4000)
    batch, kappa, passes = 100, 0.7, 3
    given: object = data
    if source == "npy":
        np.save(tmp_path / "x.npy", data)
        given = str(tmp_path / "x.npy")
    averaged = []
    fit = pyroem.fit(
        _spec(),
        given,
        method="vb-em",
        seed=1,
        stepwise=True,
        batch_size=batch,
        kappa=kappa,
        passes=passes,
        tol=0.0,
        num_draws=0,
        callback=lambda step: averaged.append(step.params),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _sklearn_optimum(data)
    order = np.argsort(reference.means_[:, 0])

    gamma = step_size(len(data) // batch, kappa)
    pi_min = 0.3
    tolerances = {
        "means": 5 * math.sqrt(gamma / 2 / (batch * pi_min)),
        "weights": 5 * math.sqrt(gamma / 2 * pi_min * (1 - pi_min) / batch),
        "covariances": 5 * math.sqrt(gamma / 2 * 2 / (batch * pi_min)),
    }
    expected = {
        "weights": reference.weights_[order],
        "means": reference.means_[order],
        "covariances": reference.covariances_[order],
    }
    assert len(averaged) == passes
    shift = fit.family.shift
    ours = _summaries(averaged[-1], shift)
    for name, tol in tolerances.items():
        np.testing.assert_allclose(ours[name], expected[name], rtol=0, atol=tol, err_msg=name)
    # The reported state is one exact CAVI update from q̄: no farther from the optimum.
    # (ν0 = 3 is not above p + 1 = 3, so fit.params["covariances"] is E_q[Λ]⁻¹ = Ψ/ν.)
    reported = {name: value.numpy() for name, value in fit.params.items()}
    mine = np.argsort(reported["means"][:, 0])
    for name, tol in tolerances.items():
        np.testing.assert_allclose(
            reported[name][mine], expected[name], rtol=0, atol=tol, err_msg=name
        )

    # One exact ELBO per pass and the start; the last is the reported state's.
    assert fit.history.objective.shape == (passes + 1,)
    assert fit.num_iterations == passes
    assert fit.options["stepwise"] is True
    assert fit.elbo == fit.history.objective[-1]
    exact = pyroem.fit(_spec(), data, method="vb-em", seed=1, tol=1e-12, num_draws=0)
    batch_means = exact.params["means"].numpy()
    np.testing.assert_allclose(
        batch_means[np.argsort(batch_means[:, 0])], expected["means"], rtol=0, atol=1e-6
    )
    # At most the batch optimum, and within a second-order gap of it.
    assert fit.elbo <= exact.elbo + 1e-9 * abs(exact.elbo)
    assert exact.elbo - fit.elbo < 1e-3 * len(data)


def test_stochastic_vi_options(tmp_path):
    data = _blobs(0, 200)
    for kappa in (0.5, 1.2):
        with pytest.raises(SpecError, match="kappa"):
            pyroem.fit(_spec(), data, method="vb-em", stepwise=True, kappa=kappa)
    with pytest.raises(SpecError, match="batch_size"):
        pyroem.fit(_spec(), data, method="vb-em", stepwise=True, batch_size=0)
    with pytest.raises(SpecError, match="mcmc-em"):
        pyroem.fit(_spec(), data, method="mcmc-em", stepwise=True)
    # The running statistics are not checkpointed: a resume would lose them.
    with pytest.raises(pyroem.errors.NotSupportedError, match="checkpoint"):
        pyroem.fit(_spec(), data, method="vb-em", stepwise=True, checkpoint=tmp_path / "fit.ckpt")


def test_stepwise_em_of_a_pyro_program_is_refused_naming_the_route():
    import pyro
    import pyro.distributions as dist
    from pyro.infer import config_enumerate

    @config_enumerate
    def model(x):
        w = pyro.sample("w", dist.Dirichlet(torch.ones(2, dtype=torch.float64)))
        with pyro.plate("c", 2):
            mu = pyro.sample("mu", dist.Normal(torch.zeros(2, dtype=torch.float64), 10.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(w))
            pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    data = torch.tensor(_blobs(0, 50)[:, 0])
    # Stochastic VI is a Mixture's; stepwise map-em on a program hands its data plate
    # subsamples, which this program ignores (it observes all of x whatever the indices).
    with pytest.raises(pyroem.errors.NotSupportedError, match=r"stepwise.*pyroem\.Mixture"):
        pyroem.fit(model, data, method="vb-em", stepwise=True, batch_size=10)
    with pytest.raises(pyroem.errors.NotSupportedError, match=r"obs=data\[indices\]"):
        pyroem.fit(model, data, method="map-em", stepwise=True, batch_size=10)


def test_bayesian_gaussian_mixture_partial_fit_approaches_the_batch_optimum():
    r"""Three passes of ``partial_fit`` over minibatches of b = 100 rows of N = 4000
    end within the schedule's noise of scikit-learn's batch CAVI optimum.

    Tolerance: the last iterate (no averaging) after T = 3N/b updates carries the
    running statistics' stationary noise (γ_T / 2) Var ξ (tests/engines/test_stepwise.py), so
    5·sqrt(γ_T/2 · v) with v as in the test above. The weak priors (κ0 = Ψ0 = 0.01)
    keep the difference between weighing them against n_seen = 3N rows and against N
    below 0.01/1200 ≈ 1e-5, far inside it.
    """
    from pyroem.sklearn import PARTIAL_FIT_KAPPA
    from pyroem.sklearn import BayesianGaussianMixture as Ours

    data = _blobs(3, 4000)
    settings = dict(
        n_components=3,
        weight_concentration_prior_type="dirichlet_distribution",
        mean_precision_prior=0.01,
        covariance_prior=0.01 * np.eye(2),
        reg_covar=0.0,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = BayesianGaussianMixture(tol=1e-12, max_iter=1000, **settings).fit(data)
    batch, passes = 100, 3
    online = Ours(**settings)
    for _ in range(passes):
        for start in range(0, len(data), batch):
            online.partial_fit(data[start : start + batch])
    updates = passes * len(data) // batch
    assert online.n_iter_ == updates
    gamma = step_size(updates - 1, PARTIAL_FIT_KAPPA)
    pi_min = 0.3
    tolerances = {
        "means_": 5 * math.sqrt(gamma / 2 / (batch * pi_min)),
        "weights_": 5 * math.sqrt(gamma / 2 * pi_min * (1 - pi_min) / batch),
        "covariances_": 5 * math.sqrt(gamma / 2 * 2 / (batch * pi_min)),
    }
    theirs = np.argsort(reference.means_[:, 0])
    ours = np.argsort(online.means_[:, 0])
    for name, tol in tolerances.items():
        np.testing.assert_allclose(
            getattr(online, name)[ours], getattr(reference, name)[theirs], rtol=0, atol=tol
        )
    assert online.predict(data).shape == (len(data),)
    np.testing.assert_allclose(online.predict_proba(data[:5]).sum(1), 1.0, rtol=1e-12)


def test_bayesian_gaussian_mixture_partial_fit_continues_a_fit():
    """After ``fit`` to convergence, the first ``partial_fit`` takes its minibatch's
    statistics whole, scaled to the n rows it has seen: one CAVI iteration on the
    minibatch from the fitted ``q(π, θ)``, which is scikit-learn's warm-started
    iteration (``warm_start=True, max_iter=1``) on it, the priors fixed."""
    from pyroem.sklearn import BayesianGaussianMixture as Ours

    data = _blobs(4, 600)
    settings = dict(
        n_components=3,
        weight_concentration_prior_type="dirichlet_distribution",
        weight_concentration_prior=ALPHA0,
        mean_prior=np.zeros(2),
        mean_precision_prior=KAPPA0,
        degrees_of_freedom_prior=NU0,
        covariance_prior=np.eye(2),
        reg_covar=0.0,
        random_state=0,
        tol=1e-12,
        max_iter=2000,
    )
    minibatch = data[:300]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = BayesianGaussianMixture(**settings).fit(data)
        before = reference.means_.copy()
        reference.set_params(warm_start=True, max_iter=1).fit(minibatch)
    model = Ours(**settings).fit(data)
    model.partial_fit(minibatch)
    assert model.n_iter_ == 1
    assert np.abs(reference.means_ - before).max() > 1e-3  # the iteration moved it
    theirs = np.argsort(reference.means_[:, 0])
    ours = np.argsort(model.means_[:, 0])
    for name in ("weights_", "means_", "covariances_", "mean_precision_", "degrees_of_freedom_"):
        np.testing.assert_allclose(
            getattr(model, name)[ours], getattr(reference, name)[theirs], rtol=1e-7, atol=1e-9
        )
    with pytest.raises(ValueError, match="features"):
        model.partial_fit(data[:, :1])


def _poisson_cavi(counts: np.ndarray, start: np.ndarray, a0: float, b0: float, alpha0: float):
    """Batch CAVI of a Poisson mixture with Gamma(a0, b0) rates and Dirichlet(α0)
    weights, written out in NumPy (Bishop's updates for this conjugate pair), iterated
    from the responsibilities ``start`` to its fixed point: ``(E_q[π], E_q[λ])``."""
    from scipy.special import digamma

    resp = start
    x = counts[:, 0]
    for _ in range(10_000):
        n_k = resp.sum(0)
        alpha, shape, rate = alpha0 + n_k, a0 + resp.T @ x, b0 + n_k
        log_rho = (
            digamma(alpha)
            - digamma(alpha.sum())
            + np.outer(x, digamma(shape) - np.log(rate))
            - shape / rate
        )
        new = np.exp(log_rho - log_rho.max(1, keepdims=True))
        new /= new.sum(1, keepdims=True)
        if np.abs(new - resp).max() < 1e-14:
            break
        resp = new
    return alpha / alpha.sum(), shape / rate


def test_stochastic_vi_of_a_poisson_mixture_reaches_the_cavi_fixed_point():
    r"""Stochastic VI on a two-component Poisson mixture (N = 4000, b = 100, 3 passes)
    ends within the schedule's noise of batch CAVI's fixed point, computed independently
    above: ``E_q[λ_k] = (a0 + Σ r x)/(b0 + N_k)`` moves with the component's mean count,
    whose minibatch noise is λ/(b π_k) (Poisson), and ``E_q[π]`` as the Gaussian test's
    weights; tolerance 5·sqrt(γ_{t0}/2 · v) ≈ 0.59 for the rates. The strong
    Gamma(400, 40) prior (40 pseudo-observations at rate 10) pulls the fixed point's
    rates to 3.23 and 15.02: statistics left at minibatch scale (N_k = 40 rows, not
    1600) would put the first at 6.5."""
    rng = np.random.default_rng(6)
    labels = rng.random(4000) < 0.4
    counts = np.where(labels, rng.poisson(3.0, 4000), rng.poisson(15.0, 4000))[:, None]
    spec = pyroem.Mixture(
        2, "poisson", prior=pyroem.Gamma(concentration=400.0, rate=40.0), weights_prior=1.0
    )
    averaged = []
    pyroem.fit(
        spec,
        counts.astype(float),
        method="vb-em",
        seed=0,
        stepwise=True,
        batch_size=100,
        passes=3,
        tol=0.0,
        num_draws=0,
        callback=lambda step: averaged.append(step.params),
    )
    hard = np.stack([labels, ~labels], axis=1).astype(float)
    weights, rates = _poisson_cavi(counts, hard, 400.0, 40.0, 1.0)
    state = averaged[-1]
    alpha = state.weights_concentration.numpy()
    ours_rates = (state.components.concentration / state.components.rate).numpy()[:, 0]
    mine, theirs = np.argsort(ours_rates), np.argsort(rates)
    gamma = step_size(4000 // 100, 0.7)
    rate_tol = 5 * math.sqrt(gamma / 2 * 15.0 / (100 * 0.4))
    weight_tol = 5 * math.sqrt(gamma / 2 * 0.4 * 0.6 / 100)
    np.testing.assert_allclose(ours_rates[mine], rates[theirs], rtol=0, atol=rate_tol)
    np.testing.assert_allclose((alpha / alpha.sum())[mine], weights[theirs], atol=weight_tol)
