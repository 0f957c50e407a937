"""pyroem.sklearn against scikit-learn: the same numbers from the same start, and
scikit-learn's own mixture tests run on pyroem's classes (installed test modules,
substituted by the plugin in bench/sklearn_suite.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import sklearn
from sklearn import mixture
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pyroem.sklearn import (
    BernoulliMixture,
    CategoricalMixture,
    GaussianMixture,
    PoissonMixture,
)

ROOT = Path(__file__).resolve().parents[2]
COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


def _blobs() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate(
        [rng.normal(0.0, 1.0, (60, 3)), rng.normal(4.0, 0.7, (50, 3)), rng.normal(-3, 0.5, (40, 3))]
    )


def _start(data: np.ndarray, covariance_type: str) -> dict[str, np.ndarray]:
    precision = np.linalg.inv(np.cov(data.T))
    precisions = {
        "full": np.stack([precision] * 3),
        "tied": precision,
        "diag": np.stack([np.diag(precision)] * 3),
        "spherical": np.full(3, np.diag(precision).mean()),
    }[covariance_type]
    return {
        "weights_init": np.array([0.3, 0.3, 0.4]),
        "means_init": data[[0, 70, 120]],
        "precisions_init": precisions,
    }


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gaussian_mixture_equals_scikit_learn_from_the_same_start(covariance_type: str) -> None:
    """Five EM iterations from the same start: after n M-steps both hold θ_n."""
    data = _blobs()
    options = {
        "n_components": 3,
        "covariance_type": covariance_type,
        "tol": 0.0,
        "max_iter": 5,
        "reg_covar": 1e-3,
        **_start(data, covariance_type),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GaussianMixture(**options).fit(data)
        theirs = mixture.GaussianMixture(**options).fit(data)
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-10)
    np.testing.assert_allclose(ours.score_samples(data), theirs.score_samples(data), rtol=1e-10)
    np.testing.assert_allclose(ours.predict_proba(data), theirs.predict_proba(data), atol=1e-10)
    assert ours.bic(data) == pytest.approx(theirs.bic(data), rel=1e-10)
    assert ours.aic(data) == pytest.approx(theirs.aic(data), rel=1e-10)
    # scikit-learn's lower bounds score θ_0..θ_4, pyroem's θ_1..θ_5: shifted by one.
    np.testing.assert_allclose(ours.lower_bounds_[:-1], theirs.lower_bounds_[1:], rtol=1e-10)


def test_gaussian_mixture_in_pipeline_and_grid_search() -> None:
    data = np.random.default_rng(2).permutation(_blobs())
    grid = {"n_components": [1, 3], "covariance_type": ["full", "spherical"]}
    search = GridSearchCV(GaussianMixture(random_state=0), grid, cv=3).fit(data)
    reference = GridSearchCV(mixture.GaussianMixture(random_state=0), grid, cv=3).fit(data)
    assert search.best_params_ == reference.best_params_
    assert search.best_params_["n_components"] == 3
    pipeline = make_pipeline(StandardScaler(), GaussianMixture(3, random_state=0)).fit(data)
    reference = make_pipeline(StandardScaler(), mixture.GaussianMixture(3, random_state=0))
    assert pipeline.score(data) == pytest.approx(reference.fit(data).score(data), rel=1e-6)


def test_reg_covar_is_added_to_the_covariances() -> None:
    """One M-step from hard responsibilities: the covariance plus reg_covar on the diagonal."""
    data = _blobs()
    theirs = mixture.GaussianMixture(3, reg_covar=0.5, max_iter=1, **_start(data, "full"))
    ours = GaussianMixture(3, reg_covar=0.5, max_iter=1, **_start(data, "full"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        np.testing.assert_allclose(
            ours.fit(data).covariances_, theirs.fit(data).covariances_, rtol=1e-10
        )


def _brute_force_log_density(
    data: np.ndarray, weights: np.ndarray, log_component: np.ndarray
) -> np.ndarray:
    from scipy.special import logsumexp

    return logsumexp(np.log(weights) + log_component, axis=1)


def test_discrete_mixtures_score_by_their_densities() -> None:
    from scipy import stats

    rng = np.random.default_rng(1)
    counts = np.concatenate([rng.poisson(2, (80, 3)), rng.poisson(9, (70, 3))]).astype(float)
    poisson = PoissonMixture(2, prior=None, random_state=0).fit(counts)
    log_component = stats.poisson.logpmf(counts[:, None, :], poisson.rates_[None]).sum(-1)
    expected = _brute_force_log_density(counts, poisson.weights_, log_component)
    np.testing.assert_allclose(poisson.score_samples(counts), expected, rtol=1e-12)
    assert sorted(poisson.rates_.mean(1).round()) == [2.0, 9.0]

    binary = (rng.random((150, 4)) < np.where(np.arange(150)[:, None] < 80, 0.2, 0.8)).astype(float)
    bernoulli = BernoulliMixture(2, random_state=0).fit(binary)
    log_component = stats.bernoulli.logpmf(binary[:, None, :], bernoulli.probs_[None]).sum(-1)
    expected = _brute_force_log_density(binary, bernoulli.weights_, log_component)
    np.testing.assert_allclose(bernoulli.score_samples(binary), expected, rtol=1e-12)

    codes = np.concatenate(
        [rng.choice(3, (80, 2), p=[0.8, 0.1, 0.1]), rng.choice(3, (70, 2), p=[0.1, 0.1, 0.8])]
    )
    categorical = CategoricalMixture(2, random_state=0).fit(codes)
    assert categorical.probs_.shape == (2, 2, 3)
    probs = categorical.probs_[:, np.arange(2)[None, :], codes]  # (K, N, D)
    log_component = np.log(probs).sum(-1).T
    expected = _brute_force_log_density(codes, categorical.weights_, log_component)
    np.testing.assert_allclose(categorical.score_samples(codes), expected, rtol=1e-12)
    draws, labels = categorical.sample(5)
    assert draws.shape == (5, 2) and labels.shape == (5,)


# scikit-learn's own tests (installed with it) that must pass on pyroem's classes.
SKLEARN_TESTS = [
    "test_mixture.py",
    "test_gaussian_mixture.py::test_gaussian_mixture_attributes",
    "test_gaussian_mixture.py::test_check_weights",
    "test_gaussian_mixture.py::test_check_means",
    "test_gaussian_mixture.py::test_check_precisions",
    "test_gaussian_mixture.py::test_gaussian_mixture_predict_predict_proba",
    "test_gaussian_mixture.py::test_gaussian_mixture_fit_predict_n_init",
    "test_gaussian_mixture.py::test_gaussian_mixture_fit_convergence_warning",
    "test_gaussian_mixture.py::test_gaussian_mixture_n_parameters",
    "test_gaussian_mixture.py::test_bic_1d_1component",
    "test_gaussian_mixture.py::test_gaussian_mixture_aic_bic",
    "test_gaussian_mixture.py::test_score_samples",
    "test_gaussian_mixture.py::test_regularisation",
    "test_gaussian_mixture.py::test_max_iter_zero",
    "test_gaussian_mixture.py::test_gaussian_mixture_single_component_stable",
    "test_bayesian_mixture.py::test_bayesian_mixture_check_is_fitted",
    "test_bayesian_mixture.py::test_bayesian_mixture_mean_prior_initialisation",
    "test_bayesian_mixture.py::test_bayesian_mixture_weights_prior_initialisation",
    "test_bayesian_mixture.py::test_bayesian_mixture_precisions_prior_initialisation",
]


# The same, each taking a minute or more on two cores (hundreds of warm-started fits).
SLOW_SKLEARN_TESTS = [
    "test_gaussian_mixture.py::test_monotonic_likelihood",
    "test_bayesian_mixture.py::test_monotonic_likelihood",
]


def test_scikit_learn_own_tests_pass_on_pyroem_classes() -> None:
    _run_scikit_learn_tests(SKLEARN_TESTS)


@pytest.mark.slow
def test_scikit_learn_own_slow_tests_pass_on_pyroem_classes() -> None:
    _run_scikit_learn_tests(SLOW_SKLEARN_TESTS)


def _run_scikit_learn_tests(nodes: list[str]) -> None:
    tests = Path(sklearn.__file__).parent / "mixture" / "tests"
    targets = [str(tests / node) for node in nodes]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("PYROEM_SKLEARN_ORIGINAL", None)
    command = [sys.executable, "-m", "pytest", "-p", "bench.sklearn_suite", "-q",
               "-p", "no:cacheprovider", "-W", "ignore", *targets]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:]
    assert " failed" not in done.stdout and " passed" in done.stdout


@pytest.mark.parametrize("covariance_type", ["full", "tied"])
def test_sample_weight_equals_scikit_learn_on_repeated_rows(covariance_type: str) -> None:
    data = _blobs()
    counts = np.random.default_rng(3).integers(0, 4, size=data.shape[0])
    counts[[0, 70, 120]] = 1
    options = {
        "n_components": 3,
        "covariance_type": covariance_type,
        "tol": 0.0,
        "max_iter": 5,
        **_start(data, covariance_type),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GaussianMixture(**options).fit(data, sample_weight=counts)
        theirs = mixture.GaussianMixture(**options).fit(np.repeat(data, counts, axis=0))
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-10)
    np.testing.assert_allclose(ours.lower_bounds_[:-1], theirs.lower_bounds_[1:], rtol=1e-10)


# ---------------------------------------------------------------------------
# BayesianGaussianMixture against scikit-learn's from the same start
# ---------------------------------------------------------------------------


def _faithful() -> np.ndarray:
    from pyroem.datasets import load_faithful

    data = load_faithful().data.numpy()
    return (data - data.mean(0)) / data.std(0)


def _bayesian_start(covariance_type: str) -> dict[str, np.ndarray]:
    covariances = {
        "full": np.stack([0.3 * np.eye(2), 0.6 * np.eye(2) + 0.1, 0.4 * np.eye(2)]),
        "tied": 0.5 * np.eye(2) + 0.05,
    }[covariance_type]
    means = np.array([[-1.2, -1.2], [0.1, 0.1], [1.0, 1.0]])
    return {"weights": np.array([0.3, 0.3, 0.4]), "means": means, "covariances": covariances}


def _scipy_responsibilities(data: np.ndarray, start: dict[str, np.ndarray]) -> np.ndarray:
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    covariances = start["covariances"]
    if covariances.ndim == 2:
        covariances = np.repeat(covariances[None], 3, 0)
    densities = [
        multivariate_normal(mean, covariance).logpdf(data)
        for mean, covariance in zip(start["means"], covariances, strict=True)
    ]
    log_joint = np.log(start["weights"]) + np.stack(densities, 1)
    return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))


class _SklearnFromResponsibilities(mixture.BayesianGaussianMixture):
    """scikit-learn's class whose first M-step uses given responsibilities."""

    def __init__(self, start_resp: np.ndarray | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.start_resp = start_resp

    def _initialize_parameters(
        self, X: np.ndarray, random_state: object, xp: object = None
    ) -> None:
        self._initialize(X, self.start_resp)


BAYESIAN_CASES = [
    ("full", {}),  # scikit-learn's defaults: degrees_of_freedom_prior = D
    ("full", {"degrees_of_freedom_prior": 1.3}),  # D − 1 < ν0 < D: E_q[Σ] may not exist
    ("full", {"reg_covar": 1e-2}),
    ("tied", {}),
    ("tied", {"reg_covar": 1e-2}),
]


@pytest.mark.parametrize(("covariance_type", "options"), BAYESIAN_CASES)
def test_bayesian_mixture_follows_scikit_learn_with_its_defaults(
    covariance_type: str, options: dict[str, float]
) -> None:
    """From the same start (θ_0 for pyroem, its exact responsibilities for scikit-learn),
    with scikit-learn's default priors, both run the same CAVI iteration: the variational
    parameters and the lower bounds agree to round-off at every step."""
    from scipy.special import multigammaln

    from pyroem.sklearn import BayesianGaussianMixture

    data = _faithful()
    start = _bayesian_start(covariance_type)

    class FromStart(BayesianGaussianMixture):
        def _start(self, spec: object, family: object, tensor: object, seed: int) -> dict:
            return dict(start)

    iterations = 15
    settings = {"n_components": 3, "covariance_type": covariance_type, "tol": 0.0, **options}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = FromStart(max_iter=iterations, **settings).fit(data)
        # pyroem's first state is scikit-learn's first iteration, so one iteration more.
        theirs = _SklearnFromResponsibilities(
            start_resp=_scipy_responsibilities(data, start), max_iter=iterations + 1, **settings
        ).fit(data)
    for name in ("weights_", "means_", "covariances_", "precisions_", "degrees_of_freedom_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-10)
    np.testing.assert_allclose(ours.mean_precision_, theirs.mean_precision_, rtol=1e-10)
    for sticks, expected in zip(
        ours.weight_concentration_, theirs.weight_concentration_, strict=True
    ):
        np.testing.assert_allclose(sticks, expected, rtol=1e-10)
    np.testing.assert_allclose(ours.predict_proba(data), theirs.predict_proba(data), atol=1e-10)
    bounds = np.array([float(np.sum(bound)) for bound in theirs.lower_bounds_[1:]])
    assert bounds[-1] - bounds[0] > 0.5  # the path moved
    np.testing.assert_allclose(np.diff(ours.lower_bounds_), np.diff(bounds), rtol=1e-9)
    if covariance_type == "full":
        # scikit-learn's lower bound leaves out terms fixed by the prior and N: the
        # Beta(1, α) normalisers −K log α of the sticks and, per component, the
        # Normal–Wishart constants D/2 log κ0 + ν0/2 log|Ψ0| − log Γ_D(ν0/2)
        # − ν0 D/2 log 2 + D(D − 1)/4 log π; and −N D/2 log 2π.
        num_data, dim = data.shape
        nu0, kappa0 = ours.degrees_of_freedom_prior_, ours.mean_precision_prior_
        per_component = (
            0.5 * dim * np.log(kappa0)
            + 0.5 * nu0 * np.linalg.slogdet(ours.covariance_prior_)[1]
            - multigammaln(nu0 / 2, dim)
            - 0.5 * nu0 * dim * np.log(2)
            + 0.25 * dim * (dim - 1) * np.log(np.pi)
        )
        omitted = (
            3 * np.log(ours.weight_concentration_prior_)
            - 0.5 * num_data * dim * np.log(2 * np.pi)
            + 3 * per_component
        )
        assert ours.lower_bound_ == pytest.approx(theirs.lower_bound_ + omitted, rel=1e-12)
    # pyroem.fit's params stay finite: E_q[Σ] when ν0 > D + 1, else E_q[Λ]⁻¹ = Ψ/ν.
    assert np.isfinite(ours._result.params["covariances"].numpy()).all()


# ---------------------------------------------------------------------------
# partial_fit: stepwise EM, one update per minibatch
# ---------------------------------------------------------------------------


def _stream_rows() -> np.ndarray:
    rng = np.random.default_rng(0)
    parts = [
        rng.multivariate_normal([0, 0], [[1, 0.3], [0.3, 1]], 250),
        rng.multivariate_normal([4, 1], [[0.5, 0], [0, 0.8]], 200),
        rng.multivariate_normal([-3, 3], [[0.7, -0.2], [-0.2, 0.4]], 150),
    ]
    return rng.permutation(np.concatenate(parts))


def _row_weights(num_rows: int, batch_size: int, updates: int, kappa: float) -> np.ndarray:
    """Each row's share of the running statistics after ``updates`` stepwise updates
    over consecutive minibatches (cycling through the rows): update ``t`` (from 0)
    enters with ``γ_t = (t + 2)^(−κ)`` (the first with 1) and is then shrunk by every
    later ``1 − γ``."""
    batches = num_rows // batch_size
    shares = np.zeros(updates)
    for t in range(updates):
        gain = 1.0 if t == 0 else (t + 2) ** -kappa
        shares[:t] *= 1.0 - gain
        shares[t] = gain
    rows = np.zeros(num_rows)
    for t, share in enumerate(shares):
        start = (t % batches) * batch_size
        rows[start : start + batch_size] += share / batch_size
    return rows


@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_partial_fit_approaches_the_batch_optimum(family: str) -> None:
    """Passes of partial_fit over minibatches end within a step-size-derived distance of
    the batch maximum-likelihood fit.

    After T updates the running statistics weigh row n by c_n (the step sizes' products,
    ``_row_weights``), so the iterate is close to the maximiser of the c-weighted
    log-likelihood. Near the batch optimum θ̂ the per-row log-likelihood is quadratic,
    θ − θ̂ ≈ I₁⁻¹ Σ_n (c_n − 1/N) ∇ℓ_n, and for data drawn from the model the expected
    gap ℓ̄(θ̂) − ℓ̄(θ) is ½ E[χ²_p] Σ_n (c_n − 1/N)² with p free parameters. The tolerance
    is the 99.9% quantile of χ²_p in place of its mean (the measured gaps sit near the
    mean: 2.2e-4 and 5.6e-5 against tolerances 5.1e-4 and 3.2e-4). The clusters are
    separated enough for EM's own transient from the start to have died out by then;
    the gap must also have shrunk from the first pass to the last.
    """
    from scipy.stats import chi2

    from pyroem.sklearn import PARTIAL_FIT_KAPPA

    if family == "gaussian":
        data = _stream_rows()
        make = lambda **kw: GaussianMixture(3, random_state=0, **kw)  # noqa: E731
        num_parameters = 3 * (2 + 3) + 2
    else:
        rng = np.random.default_rng(1)
        rates = np.array([[1.0, 12.0], [12.0, 1.5], [20.0, 20.0]])
        labels = rng.choice(3, size=600, p=[0.4, 0.35, 0.25])
        data = rng.poisson(rates[labels]).astype(float)
        make = lambda **kw: PoissonMixture(3, prior=None, random_state=0, **kw)  # noqa: E731
        num_parameters = 3 * 2 + 2
    batch = make(tol=1e-12, max_iter=2000).fit(data)
    num_rows, batch_size, passes = data.shape[0], 50, 10
    online = make()
    gaps = []
    for _ in range(passes):
        for start in range(0, num_rows, batch_size):
            online.partial_fit(data[start : start + batch_size])
        gaps.append(batch.score(data) - online.score(data))
    updates = passes * num_rows // batch_size
    assert online.n_iter_ == updates
    weights = _row_weights(num_rows, batch_size, updates, PARTIAL_FIT_KAPPA)
    assert weights.sum() == pytest.approx(1.0)
    tolerance = 0.5 * chi2.ppf(0.999, num_parameters) * np.sum((weights - 1 / num_rows) ** 2)
    assert 0 < tolerance < 1e-3
    assert -1e-9 < gaps[-1] < tolerance
    assert gaps[-1] < gaps[0] / 5


def test_partial_fit_is_deterministic_and_continues_a_fit() -> None:
    data = _stream_rows()
    fitted = []
    for _ in range(2):
        model = GaussianMixture(3, covariance_type="diag", random_state=4)
        for start in range(0, 300, 60):
            model.partial_fit(data[start : start + 60])
        fitted.append(model)
    for name in ("weights_", "means_", "covariances_", "precisions_cholesky_"):
        np.testing.assert_array_equal(getattr(fitted[0], name), getattr(fitted[1], name))
    # After fit, partial_fit continues from the fitted parameters: the first update
    # takes its minibatch's statistics whole, so on all the data it is one EM iteration,
    # scikit-learn's from the same parameters.
    model = GaussianMixture(3, random_state=0, max_iter=3).fit(data)
    start = {
        "weights_init": model.weights_,
        "means_init": model.means_,
        "precisions_init": model.precisions_,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = mixture.GaussianMixture(3, max_iter=1, **start).fit(data)
    model.partial_fit(data)
    assert np.abs(model.means_ - start["means_init"]).max() > 1e-6  # it moved
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(model, name), getattr(reference, name), rtol=1e-10)
    with pytest.raises(ValueError, match="features"):
        model.partial_fit(data[:, :1])
    codes = np.random.default_rng(0).choice(3, (40, 2))
    categorical = CategoricalMixture(2, random_state=0).partial_fit(codes)
    with pytest.raises(ValueError, match="num_categories=3; raise num_categories"):
        categorical.partial_fit(codes + 2)


def test_bayesian_mixture_sample_weight_equals_scikit_learn_on_repeated_rows() -> None:
    """Integer frequency weights (which scikit-learn's class lacks) give scikit-learn's
    fit on the repeated rows from the same start, default priors included (their
    data-scaled mean and covariance come from the weighted rows)."""
    from pyroem.sklearn import BayesianGaussianMixture

    data = _faithful()
    counts = np.random.default_rng(5).integers(0, 4, size=data.shape[0])
    repeated = np.repeat(data, counts, axis=0)
    start = _bayesian_start("full")

    class FromStart(BayesianGaussianMixture):
        def _start(self, spec: object, family: object, tensor: object, seed: int) -> dict:
            return dict(start)

    settings = {"n_components": 3, "tol": 0.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = FromStart(max_iter=10, **settings).fit(data, sample_weight=counts)
        theirs = _SklearnFromResponsibilities(
            start_resp=_scipy_responsibilities(repeated, start), max_iter=11, **settings
        ).fit(repeated)
    np.testing.assert_allclose(ours.mean_prior_, theirs.mean_prior_, rtol=1e-12)
    np.testing.assert_allclose(ours.covariance_prior_, theirs.covariance_prior_, rtol=1e-12)
    for name in ("weights_", "means_", "covariances_", "degrees_of_freedom_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-10)
    bounds = np.array(theirs.lower_bounds_[1:])
    np.testing.assert_allclose(np.diff(ours.lower_bounds_), np.diff(bounds), rtol=1e-9)
