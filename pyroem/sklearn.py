"""scikit-learn estimators over pyroem's engines.

``GaussianMixture`` and ``BayesianGaussianMixture`` take scikit-learn's constructor
arguments and set its fitted attributes, so they drop into a ``Pipeline`` or
``GridSearchCV`` where ``sklearn.mixture``'s classes go::

    from pyroem.sklearn import GaussianMixture
    gm = GaussianMixture(n_components=3, covariance_type="diag", random_state=0).fit(X)
    gm.means_, gm.predict(X), gm.bic(X)

They are thin: every fit is :func:`pyroem.fit` on a :class:`~pyroem.Mixture`
(``map-em`` with a flat prior and ``reg_covar`` for ``GaussianMixture``, closed-form
``vb-em`` for ``BayesianGaussianMixture``); scoring uses the same kernels.
``PoissonMixture``, ``BernoulliMixture`` and ``CategoricalMixture`` give the other
families the same shape. ``partial_fit`` is one stepwise-EM update per call on running
sufficient statistics (:mod:`pyroem.engines.stepwise`); for ``BayesianGaussianMixture``, one
step of stochastic VI on the natural parameters of ``q(π, θ)``.
"""

from __future__ import annotations

import time
import warnings
from numbers import Integral, Real
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from scipy.linalg import solve_triangular
from sklearn.base import BaseEstimator, DensityMixin
from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from pyroem.api import fit as pyroem_fit
from pyroem.engines.cavi import OnlineVariational
from pyroem.engines.initialization import initial_params
from pyroem.engines.stepwise import step_size
from pyroem.errors import (
    CollapsedComponentWarning,
    ConvergenceWarning,
    DataError,
    NotSupportedError,
    PyroEMError,
    SpecError,
)
from pyroem.estep.enumerate import (
    MixtureEStep,
    add_statistics,
    scale_statistics,
    score_mixture,
)
from pyroem.model.families import Bernoulli, Categorical, Family, Gaussian, Poisson
from pyroem.model.mixture import Mixture, MixtureParams, fill_missing
from pyroem.model.priors import NormalInverseWishart
from pyroem.mstep.mixture import mixture_m_step

__all__ = [
    "BayesianGaussianMixture",
    "BernoulliMixture",
    "CategoricalMixture",
    "GaussianMixture",
    "PoissonMixture",
]

# scikit-learn's init_params names and pyroem's initialisations that do the same.
_INIT_NAMES = {
    "kmeans": "kmeans",
    "k-means++": "kmeans++",
    "random": "random",
    "random_from_data": "random_from_data",
}


class _MixtureEstimator(DensityMixin, BaseEstimator):
    """What every estimator here shares: restarts, warm starts, scoring, criteria.

    Subclasses give the family, the starting parameters' overrides and the map
    between pyroem's parameters and the fitted attributes.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "init_params": [StrOptions(set(_INIT_NAMES))],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
    }
    _method: ClassVar[str] = "map-em"
    _data_dtype: ClassVar[Any] = [np.float64, np.float32]
    # map-em marginalises missing entries (NaN); vb-em needs complete data.
    _allow_nan: ClassVar[bool] = True

    # ----- what subclasses supply ------------------------------------------------
    def _family(self) -> Family:
        raise NotImplementedError

    def _spec(self, num_features: int) -> Mixture:
        return Mixture(self.n_components, self._family())

    def _check_init_overrides(self, num_features: int) -> None:
        """Validate user-given starting values (weights_init, ...)."""

    def _start(self, spec: Mixture, family: Family, data: torch.Tensor, seed: int) -> dict:
        """Starting parameters in ``fit.params`` form for one restart (missing entries
        read as their column's median, as :func:`pyroem.fit` starts)."""
        generator = torch.Generator().manual_seed(seed)
        init = _INIT_NAMES[self.init_params]
        start = initial_params(spec, family, fill_missing(data), init, generator)
        return {"weights": start.weights, **family.to_user(start.components)}

    def _set_fitted(self, result: Any) -> None:
        raise NotImplementedError

    def _warm_params(self) -> Any:
        raise NotImplementedError

    def _mixture_params(self) -> MixtureParams:
        raise NotImplementedError

    def _fit_options(self) -> dict[str, Any]:
        # scikit-learn's tol is on the change of the mean log-likelihood alone.
        return {"stop_rule": "objective"}

    # ----- fitting -----------------------------------------------------------------
    def _validate_data(self, X: Any, reset: bool) -> np.ndarray:
        X = validate_data(
            self,
            X,
            dtype=self._data_dtype,
            ensure_min_samples=2 if reset else 1,
            reset=reset,
            ensure_all_finite="allow-nan" if self._allow_nan else True,
        )
        X = np.asarray(X)
        if self._allow_nan:
            empty = np.flatnonzero(np.isnan(X).all(axis=1))
            if empty.size:
                raise ValueError(
                    f"Input X has rows with every entry missing (NaN): {empty[:10].tolist()}; "
                    "such a row carries no information, drop it"
                )
        return X

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> Any:
        """Fit the mixture to ``X`` ``(n_samples, n_features)``; returns ``self``.

        ``sample_weight`` ``(n_samples,)``: non-negative frequency weights (row ``n``
        counts ``w_n`` times; ``pyroem.fit(..., sample_weight=)``). The initialisation
        draws from the rows with positive weight, unweighted.
        """
        self.fit_predict(X, y, sample_weight=sample_weight)
        return self

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """Fit, then return the most probable component of each row of ``X``.

        The labels come from the final parameters, so they equal
        ``fit(X).predict(X)``.
        """
        self._validate_params()
        X = self._validate_data(X, reset=True)
        self.__dict__.pop("_stepwise", None)  # a later partial_fit continues from this fit
        weights = None if sample_weight is None else _check_weights(sample_weight, X.shape[0])
        if X.shape[0] < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got "
                f"n_components = {self.n_components}, n_samples = {X.shape[0]}"
            )
        self._check_init_overrides(X.shape[1])
        data = torch.as_tensor(X, dtype=torch.float64)
        spec = self._spec(X.shape[1])
        family = spec.bind(data)
        init_data = data if weights is None else data[torch.as_tensor(weights > 0)]
        options = self._fit_options()
        if weights is not None:
            options["sample_weight"] = weights
        warm = bool(self.warm_start and hasattr(self, "converged_"))
        n_init = 1 if warm else self.n_init
        random_state = check_random_state(self.random_state)
        best: Any = None
        best_bound = -np.inf
        started = time.perf_counter()
        for restart in range(n_init):
            if self.verbose:
                print(f"Initialization {restart}")
            seed = int(random_state.randint(np.iinfo(np.int32).max))
            start = self._warm_params() if warm else self._start(spec, family, init_data, seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                warnings.simplefilter("ignore", CollapsedComponentWarning)
                result = pyroem_fit(
                    spec,
                    data,
                    method=self._method,
                    init=start,
                    tol=self._fit_tolerance(X.shape[0] if weights is None else weights.sum()),
                    max_iter=self.max_iter,
                    seed=seed,
                    **options,
                )
            bound = self._lower_bound(result, weights)
            if self.verbose:
                state = "converged" if result.converged else "did not converge"
                print(
                    f"Initialization {state}. time lapse {time.perf_counter() - started:.5f}s"
                    f"\t lower bound {bound:.5f}"
                )
            if best is None or bound > best_bound:
                best, best_bound = result, bound
        if not best.converged and self.max_iter > 0:
            warnings.warn(
                "Best performing initialization did not converge. "
                "Try different init parameters, or increase max_iter, "
                "tol, or check for degenerate data.",
                SklearnConvergenceWarning,
                stacklevel=2,
            )
        self._fit_dtype = X.dtype
        self._set_fitted(best)
        self.converged_ = bool(best.converged)
        self.n_iter_ = int(best.num_iterations)
        self.lower_bound_ = float(best_bound)
        self.lower_bounds_ = self._lower_bounds(best, weights)
        return self.predict(X)

    def _fit_tolerance(self, num_data: float) -> float:
        return float(self.tol)

    def _lower_bound(self, result: Any, weights: np.ndarray | None) -> float:
        if weights is None:
            return float(result.log_likelihood()) / result.num_data
        return float(result.history.log_likelihood[-1] / weights.sum())

    def _lower_bounds(self, result: Any, weights: np.ndarray | None) -> list[float]:
        total = result.num_data if weights is None else weights.sum()
        return list(result.history.log_likelihood[1:] / total)

    # ----- scoring -------------------------------------------------------------------
    def _score(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self)
        X = self._validate_data(X, reset=False)
        data = torch.as_tensor(X, dtype=torch.float64)
        pointwise, log_resp = score_mixture(self._bound_family, self._mixture_params(), data)
        return pointwise.numpy(), log_resp.numpy()

    def score_samples(self, X: Any) -> np.ndarray:
        """Log-density ``log p(x_n)`` of each row (components summed out), ``(n_samples,)``."""
        return self._score(X)[0]

    def score(self, X: Any, y: Any = None) -> float:
        """Mean log-density of the rows of ``X``."""
        return float(self.score_samples(X).mean())

    def predict_proba(self, X: Any) -> np.ndarray:
        """Posterior component probabilities, ``(n_samples, n_components)``."""
        return np.exp(self._score(X)[1])

    def predict(self, X: Any) -> np.ndarray:
        """Most probable component of each row, ``(n_samples,)``."""
        return self._score(X)[1].argmax(axis=1)

    def _n_parameters(self) -> int:
        return self._bound_family.num_parameters(self.n_components) + self.n_components - 1

    def bic(self, X: Any) -> float:
        """Bayesian information criterion on ``X``; lower is better."""
        X = self._validate_data(X, reset=False)
        return -2 * self.score(X) * X.shape[0] + self._n_parameters() * np.log(X.shape[0])

    def aic(self, X: Any) -> float:
        """Akaike information criterion on ``X``; lower is better."""
        return -2 * self.score(X) * np.asarray(X).shape[0] + 2 * self._n_parameters()

    def sample(self, n_samples: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n_samples`` rows from the fitted mixture.

        Returns:
            ``(X, y)``: the rows ``(n_samples, n_features)`` and their components,
            grouped by component as scikit-learn does.
        """
        check_is_fitted(self)
        if n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples} . The sampling requires at "
                "least one sample."
            )
        rng = check_random_state(self.random_state)
        counts = rng.multinomial(n_samples, self.weights_)
        params = self._mixture_params()
        family = self._bound_family
        rows, labels = [], []
        for component, count in enumerate(counts):
            if count == 0:
                continue
            chosen = family.select(params.components, torch.tensor([component]))
            draw_seed = int(rng.randint(np.iinfo(np.int32).max))
            with torch.random.fork_rng():
                torch.manual_seed(draw_seed)
                draws = family.component_distribution(chosen).sample((int(count),))
            rows.append(draws.reshape(int(count), -1).numpy())
            labels.append(np.full(int(count), component, dtype=int))
        return np.concatenate(rows), np.concatenate(labels)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        tags.input_tags.allow_nan = self._allow_nan
        return tags


# Step-size exponent of partial_fit: γ_t = (t + 2)^(−κ), as stepwise EM's default.
PARTIAL_FIT_KAPPA = 0.7


class _Stepwise(NamedTuple):
    """What ``partial_fit`` keeps between calls."""

    spec: Mixture
    family: Family
    params: MixtureParams
    mean_stats: Any  # running statistics per row: s̄_t = (1 − γ_t) s̄_{t−1} + γ_t ŝ(B_t)/|B_t|
    updates: int
    rows_seen: int


class _StepwiseEstimator(_MixtureEstimator):
    """``partial_fit``: stepwise (online) EM, one update per call."""

    def partial_fit(self, X: Any, y: Any = None) -> Any:
        r"""One stepwise-EM update from the minibatch ``X`` ``(n_samples, n_features)``;
        returns ``self``.

        The running statistics per row move towards the minibatch's,
        ``s̄_t = (1 − γ_t) s̄_{t−1} + γ_t ŝ(X; θ_{t−1}) / n``, with
        ``γ_t = (t + 2)^{−κ}`` (``κ`` = :data:`PARTIAL_FIT_KAPPA`; the first minibatch sets
        ``s̄_1``), and the parameters are the closed-form M-step of ``n_seen·s̄_t``
        (``n_seen``: the rows seen so far, so a prior weighs against all of them; the
        maximum-likelihood ``GaussianMixture`` does not depend on that scale). Over
        repeated passes the iterates approach a fixed point of batch EM
        (Cappé & Moulines 2009). The first call initialises from its minibatch (which
        needs ``n_samples >= n_components``) as ``fit`` does, unless the estimator was
        fitted, whose parameters it continues from. ``n_iter_`` counts the updates;
        ``lower_bound_`` is the minibatch's mean log-likelihood under ``θ_{t−1}``.
        """
        state: _Stepwise | None = getattr(self, "_stepwise", None)
        fitted = state is not None or hasattr(self, "_bound_family")
        X = self._validate_data(X, reset=not fitted)
        data = torch.as_tensor(X, dtype=torch.float64)
        if state is None:
            state = self._start_stepwise(X, data, fitted)
        # The family was bound to the first minibatch or the fitted data: e.g. a category
        # code beyond the ones seen then is an error here, not an index out of range.
        state.family.validate(data)
        estep = MixtureEStep(state.family, state.spec.weights_prior, data, 65536)(state.params)
        batch_stats = scale_statistics(estep.stats, 1.0 / X.shape[0])
        if state.mean_stats is None:
            mean_stats = batch_stats
        else:
            gain = step_size(state.updates, PARTIAL_FIT_KAPPA)
            mean_stats = add_statistics(
                scale_statistics(state.mean_stats, 1.0 - gain),
                scale_statistics(batch_stats, gain),
            )
        rows_seen = state.rows_seen + X.shape[0]
        params = mixture_m_step(
            state.family,
            state.spec.weights_prior,
            scale_statistics(mean_stats, float(rows_seen)),
            state.params,
        )
        if params.active.shape != state.params.active.shape:
            # A component collapsed: the statistics of the others go on.
            keep = torch.nonzero(torch.isin(state.params.active, params.active)).reshape(-1)
            mean_stats = state.family.select(mean_stats, keep)
        self._stepwise = state._replace(
            params=params, mean_stats=mean_stats, updates=state.updates + 1, rows_seen=rows_seen
        )
        self._set_fitted(_StepwiseResult(state.spec, state.family, params))
        self.n_iter_ = state.updates + 1
        self.lower_bound_ = float(estep.log_likelihood) / X.shape[0]
        return self

    def _start_stepwise(self, X: np.ndarray, data: torch.Tensor, fitted: bool) -> _Stepwise:
        """The state before the first update: the fitted parameters, or an
        initialisation from the first minibatch."""
        if fitted:
            spec = self._bound_family_spec()
            return _Stepwise(spec, self._bound_family, self._mixture_params(), None, 0, 0)
        self._validate_params()
        if X.shape[0] < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got "
                f"n_components = {self.n_components}, n_samples = {X.shape[0]}"
            )
        self._check_init_overrides(X.shape[1])
        spec = self._spec(X.shape[1])
        family = spec.bind(data)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        start = self._start(spec, family, data, seed)
        generator = torch.Generator().manual_seed(seed)
        params = initial_params(spec, family, data, start, generator)
        self._fit_dtype = X.dtype
        return _Stepwise(spec, family, params, None, 0, 0)

    def _bound_family_spec(self) -> Mixture:
        return Mixture(self.n_components, self._bound_family)


class _StepwiseResult(NamedTuple):
    """The fields of a fit result that ``_set_fitted`` reads, for a stepwise iterate."""

    spec: Mixture
    family: Family
    internal: MixtureParams

    @property
    def params(self) -> dict[str, torch.Tensor]:
        components = self.family.to_user(self.internal.components)
        return {"weights": self.internal.weights, **components}

    @property
    def removed_components(self) -> list[int]:
        alive = set(self.internal.active.tolist())
        return [k for k in range(self.spec.num_components) if k not in alive]


# ---------------------------------------------------------------------------
# Gaussian
# ---------------------------------------------------------------------------


def _precisions_cholesky(covariances: np.ndarray, covariance_type: str) -> np.ndarray:
    """Cholesky factors of the precisions, in scikit-learn's layout."""
    if covariance_type in ("diag", "spherical"):
        return 1.0 / np.sqrt(covariances)
    matrices = covariances if covariance_type == "full" else covariances[None]
    eye = np.eye(covariances.shape[-1])
    # Upper triangular U with U Uᵀ = Σ⁻¹: the transposed inverse of Σ's Cholesky factor.
    factors = np.stack(
        [solve_triangular(np.linalg.cholesky(matrix), eye, lower=True).T for matrix in matrices]
    )
    return factors if covariance_type == "full" else factors[0]


def _precisions(precisions_cholesky: np.ndarray, covariance_type: str) -> np.ndarray:
    if covariance_type in ("diag", "spherical"):
        return precisions_cholesky**2
    return precisions_cholesky @ np.swapaxes(precisions_cholesky, -1, -2)


def _covariances_from_precisions(precisions: np.ndarray, covariance_type: str) -> np.ndarray:
    if covariance_type in ("diag", "spherical"):
        return 1.0 / precisions
    return np.linalg.inv(precisions)


def _check_weights(sample_weight: Any, num_rows: int) -> np.ndarray:
    """``sample_weight`` as ``(num_rows,)`` float64, non-negative and finite."""
    weights = np.asarray(sample_weight, dtype=np.float64)
    if weights.ndim == 0:
        weights = np.full(num_rows, float(weights))
    if weights.shape != (num_rows,):
        raise ValueError(f"sample_weight.shape == {weights.shape}, expected ({num_rows},)!")
    if not (np.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError("sample_weight must be finite and non-negative")
    if not weights.sum() > 0:
        raise ValueError("Sample weights must contain at least one non-zero number.")
    return weights


def _frequency_covariance(X: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """The covariance of the rows of ``X``, row ``n`` counted ``weights_n`` times
    (``np.cov`` of the repeated rows: divided by the count less one)."""
    if weights is None:
        return np.cov(X.T)
    total = weights.sum()
    if not total > 1:
        raise ValueError(
            "sample_weight must sum to more than 1 (at least two rows' worth) for the "
            f"default covariance_prior, the data's covariance; got {total}. Pass "
            "covariance_prior"
        )
    centred = X - np.average(X, axis=0, weights=weights)
    return (weights[:, None] * centred).T @ centred / (total - 1)


def _check_shape(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(
            f"The parameter '{name}' should have the shape of {shape}, but got {array.shape}"
        )
    return array


class _GaussianBase(_MixtureEstimator):
    """Covariance layouts and precisions shared by both Gaussian estimators."""

    def _set_covariances(self, covariances: np.ndarray) -> None:
        self.covariances_ = covariances
        self.precisions_cholesky_ = _precisions_cholesky(covariances, self.covariance_type)
        self.precisions_ = _precisions(self.precisions_cholesky_, self.covariance_type)

    def _mixture_params(self) -> MixtureParams:
        family = self._bound_family
        components = family.params_type(
            means=torch.as_tensor(self.means_, dtype=torch.float64),
            covariances=torch.as_tensor(self.covariances_, dtype=torch.float64),
        )
        weights = torch.as_tensor(self.weights_, dtype=torch.float64)
        return MixtureParams(weights, components, torch.arange(weights.shape[0]))

    def _warm_params(self) -> dict:
        return {"weights": self.weights_, "means": self.means_, "covariances": self.covariances_}

    def _precision_shape(self, num_features: int) -> tuple[int, ...]:
        k, d = self.n_components, num_features
        return {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}[
            self.covariance_type
        ]

    def _check_init_overrides(self, num_features: int) -> None:
        k = self.n_components
        if self.weights_init is not None:
            weights = _check_shape(self.weights_init, (k,), "weights")
            if weights.min() < 0 or weights.max() > 1:
                raise ValueError(
                    "The parameter 'weights' should be in the range [0, 1], but got "
                    f"max value {weights.min():.5f}, min value {weights.max():.5f}"
                )
            if not np.allclose(weights.sum(), 1.0, rtol=0, atol=1e-6):
                raise ValueError(
                    "The parameter 'weights' should be normalized, "
                    f"but got sum(weights) = {weights.sum():.5f}"
                )
        if self.means_init is not None:
            _check_shape(self.means_init, (k, num_features), "means")
        if self.precisions_init is not None:
            kind = self.covariance_type
            name = f"{kind} precision"
            precisions = _check_shape(
                self.precisions_init, self._precision_shape(num_features), name
            )
            if kind in ("diag", "spherical"):
                if (precisions <= 0).any():
                    raise ValueError(f"'{name}' should be positive")
            else:
                matrices = precisions if kind == "full" else precisions[None]
                symmetric = np.allclose(matrices, np.swapaxes(matrices, -1, -2))
                if not symmetric or (np.linalg.eigvalsh(matrices) <= 0).any():
                    raise ValueError(f"'{name}' should be symmetric, positive-definite")

    def _start(self, spec: Mixture, family: Family, data: torch.Tensor, seed: int) -> dict:
        given = (self.weights_init, self.means_init, self.precisions_init)
        if all(value is not None for value in given):
            start: dict[str, Any] = {}
        else:
            start = super()._start(spec, family, data, seed)
        if self.weights_init is not None:
            start["weights"] = np.asarray(self.weights_init, dtype=np.float64)
        if self.means_init is not None:
            start["means"] = np.asarray(self.means_init, dtype=np.float64)
        if self.precisions_init is not None:
            precisions = np.asarray(self.precisions_init, dtype=np.float64)
            start["covariances"] = _covariances_from_precisions(precisions, self.covariance_type)
        return start


class GaussianMixture(_GaussianBase, _StepwiseEstimator):
    """Gaussian mixture fitted by maximum likelihood (pyroem's ``map-em``, flat prior).

    Takes scikit-learn's ``GaussianMixture`` arguments and sets the same fitted
    attributes (``weights_``, ``means_``, ``covariances_``, ``precisions_``,
    ``precisions_cholesky_``, ``converged_``, ``n_iter_``, ``lower_bound_``,
    ``lower_bounds_``, ``n_features_in_``, ``feature_names_in_``). The fit is
    ``pyroem.fit(Mixture(n_components, Gaussian(covariance_type, prior=None,
    reg_covar=reg_covar)), X, method="map-em")`` from each restart's start.

    ``lower_bound_`` is the mean log-likelihood of the training rows under the
    returned parameters, and ``n_iter_`` counts M-steps: pyroem returns the
    parameters it last scored, not one M-step past them.

    Missing entries (NaN) in ``X`` are marginalised, in ``fit`` and in ``predict``,
    ``predict_proba``, ``score_samples`` and ``score`` (scikit-learn's ``allow_nan``
    tag is set); a row with every entry missing is an error. The same holds for
    ``PoissonMixture``, ``BernoulliMixture`` and ``CategoricalMixture``;
    ``BayesianGaussianMixture`` (vb-em) needs complete data.
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_MixtureEstimator._parameter_constraints,
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "covariance_type": [StrOptions({"full", "tied", "diag", "spherical"})],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
    }

    def __init__(
        self,
        n_components: int = 1,
        *,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weights_init: Any = None,
        means_init: Any = None,
        precisions_init: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    def _family(self) -> Family:
        return Gaussian(self.covariance_type, prior=None, reg_covar=float(self.reg_covar))

    def _set_fitted(self, result: Any) -> None:
        params = {key: value.numpy() for key, value in result.params.items()}
        family = result.family
        self._bound_family = family
        removed = result.removed_components
        if removed:
            # map-em drops a component no data reaches (its maximum-likelihood weight is 0);
            # scikit-learn keeps all n_components, so it returns with weight 0, the mean of
            # the data and covariance reg_covar·I (what the M-step gives it with no data).
            kept = [k for k in range(self.n_components) if k not in removed]
            dim = params["means"].shape[1]
            weights = np.zeros(self.n_components)
            means = np.tile(family.shift.numpy(), (self.n_components, 1))
            weights[kept], means[kept] = params["weights"], params["means"]
            covariances = params["covariances"]
            if self.covariance_type != "tied":
                empty: Any = {
                    "full": self.reg_covar * np.eye(dim),
                    "diag": np.full(dim, self.reg_covar),
                    "spherical": self.reg_covar,
                }[self.covariance_type]
                full = np.broadcast_to(empty, (self.n_components, *np.shape(empty))).copy()
                full[kept] = covariances
                covariances = full
            params = {"weights": weights, "means": means, "covariances": covariances}
        dtype = self._fit_dtype
        self.weights_ = params["weights"].astype(dtype)
        self.means_ = params["means"].astype(dtype)
        self._set_covariances(np.asarray(params["covariances"]).astype(dtype))

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        try:
            return super().fit_predict(X, y, sample_weight=sample_weight)
        except PyroEMError as err:
            if isinstance(err, DataError | SpecError | NotSupportedError):
                raise
            # A singular covariance, or a component with no data under reg_covar=0.
            raise ValueError(
                f"Fitting the mixture model failed because some components have ill-defined "
                f"empirical covariance (for instance caused by singleton or collapsed "
                f"samples). Try to decrease the number of components, increase reg_covar, "
                f"or scale the input data. ({err})"
            ) from err


class BayesianGaussianMixture(_GaussianBase):
    """Variational Bayesian Gaussian mixture (pyroem's closed-form ``vb-em``, CAVI).

    Takes scikit-learn's ``BayesianGaussianMixture`` arguments and sets its fitted
    attributes, the variational ones included (``weight_concentration_``,
    ``mean_precision_``, ``degrees_of_freedom_``, and the resolved priors
    ``weight_concentration_prior_``, ``mean_precision_prior_``, ``mean_prior_``,
    ``degrees_of_freedom_prior_``, ``covariance_prior_``). ``covariances_`` is the
    Inverse-Wishart scale over its degrees of freedom, ``Ψ_k / ν_k``, as in
    scikit-learn (so ``precisions_ = E_q[Λ_k]``).

    ``weight_concentration_prior_type="dirichlet_process"`` (the default, as in
    scikit-learn) is vb-em's truncated stick-breaking prior; ``weight_concentration_``
    is then the sticks' Beta parameters ``(γ_1, γ_2)``.

    The priors resolve as scikit-learn's (``degrees_of_freedom_prior=None`` is
    ``n_features``; any value above ``n_features − 1`` is proper), ``reg_covar`` is added
    to each component's covariance estimate in every update, and ``tol`` is on the
    change of the whole ELBO, as in scikit-learn. For ``"tied"`` covariances scikit-learn
    counts the shared precision's prior ``n_components`` times; the fit is pyroem's tied
    model with ``dof = n_components·degrees_of_freedom_prior`` and scale
    ``n_components·covariance_prior``, which is the same iteration, and
    ``degrees_of_freedom_`` is reported on scikit-learn's scale. For ``D > 1``, diag and
    spherical covariances are pyroem's Normal–Inverse-Gamma model, not scikit-learn's.
    """

    _method = "vb-em"
    _allow_nan = False
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_MixtureEstimator._parameter_constraints,
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "covariance_type": [StrOptions({"full", "tied", "diag", "spherical"})],
        "weight_concentration_prior_type": [
            StrOptions({"dirichlet_process", "dirichlet_distribution"})
        ],
        "weight_concentration_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_precision_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_prior": [None, "array-like"],
        "degrees_of_freedom_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "covariance_prior": [None, "array-like", Interval(Real, 0.0, None, closed="neither")],
    }

    def __init__(
        self,
        *,
        n_components: int = 1,
        covariance_type: str = "full",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        weight_concentration_prior_type: str = "dirichlet_process",
        weight_concentration_prior: float | None = None,
        mean_precision_prior: float | None = None,
        mean_prior: Any = None,
        degrees_of_freedom_prior: float | None = None,
        covariance_prior: Any = None,
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ) -> None:
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    def _check_init_overrides(self, num_features: int) -> None:
        dof = self.degrees_of_freedom_prior
        if dof is not None and dof <= num_features - 1:
            raise ValueError(
                "The parameter 'degrees_of_freedom_prior' should be greater than "
                f"{num_features - 1}, but got {dof:.3f}."
            )
        if self.mean_prior is not None:
            _check_shape(self.mean_prior, (num_features,), "means")

    def _start(self, spec: Mixture, family: Family, data: torch.Tensor, seed: int) -> dict:
        return _MixtureEstimator._start(self, spec, family, data, seed)

    def _resolve_priors(self, X: np.ndarray, weights: np.ndarray | None) -> None:
        """The priors' values, scikit-learn's defaults where ``None`` (the data's mean
        and covariance, with rows counted ``weights`` times)."""
        dim = X.shape[1]
        kind = self.covariance_type
        self.weight_concentration_prior_ = (
            1.0 / self.n_components
            if self.weight_concentration_prior is None
            else float(self.weight_concentration_prior)
        )
        self.mean_precision_prior_ = (
            1.0 if self.mean_precision_prior is None else float(self.mean_precision_prior)
        )
        self.mean_prior_ = (
            np.average(X, axis=0, weights=weights)
            if self.mean_prior is None
            else np.asarray(self.mean_prior, dtype=np.float64)
        )
        self.degrees_of_freedom_prior_ = (
            float(dim)
            if self.degrees_of_freedom_prior is None
            else float(self.degrees_of_freedom_prior)
        )
        if self.covariance_prior is None:
            empirical = np.atleast_2d(_frequency_covariance(X, weights))
            prior = {
                "full": empirical,
                "tied": empirical,
                "diag": np.diag(empirical).copy(),
                "spherical": float(np.diag(empirical).mean()),
            }[kind]
        else:
            prior = np.asarray(self.covariance_prior, dtype=np.float64)
            expected = {"full": (dim, dim), "tied": (dim, dim), "diag": (dim,), "spherical": ()}
            _check_shape(prior, expected[kind], f"{kind} covariance_prior")
        self.covariance_prior_ = prior

    def _spec(self, num_features: int) -> Mixture:
        scale: Any = self.covariance_prior_
        if self.covariance_type == "diag":
            scale = np.diag(scale)
        elif self.covariance_type == "spherical":
            scale = float(scale)
        shared = self._tied_count()
        prior = NormalInverseWishart(
            mean=self.mean_prior_.tolist(),
            mean_precision=self.mean_precision_prior_,
            dof=shared * self.degrees_of_freedom_prior_,
            scale=(shared * np.asarray(scale)).tolist(),
        )
        return Mixture(
            self.n_components,
            Gaussian(self.covariance_type, prior=prior, reg_covar=float(self.reg_covar)),
            weights_prior=self.weight_concentration_prior_,
        )

    def _tied_count(self) -> int:
        """How often scikit-learn counts the covariance prior: ``n_components`` if tied."""
        return self.n_components if self.covariance_type == "tied" else 1

    def _fit_options(self) -> dict[str, Any]:
        return {"num_draws": 0, "weights_prior_type": self.weight_concentration_prior_type}

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> np.ndarray:
        """Fit, then return the most probable component of each row of ``X``.

        ``sample_weight`` (which scikit-learn's ``BayesianGaussianMixture`` lacks) are
        frequency weights, as for ``GaussianMixture``: ``pyroem.fit(..., method="vb-em",
        sample_weight=)``, with the data-scaled default priors (``mean_prior``,
        ``covariance_prior``) from the weighted rows, so integer weights give the fit on
        repeated rows from the same start.
        """
        self._validate_params()
        checked = self._validate_data(X, reset=True)
        weights = None if sample_weight is None else _check_weights(sample_weight, len(checked))
        self._resolve_priors(np.asarray(checked, dtype=np.float64), weights)
        self.__dict__.pop("_online", None)  # a later partial_fit continues from this fit
        return super().fit_predict(X, y, sample_weight=sample_weight)

    def partial_fit(self, X: Any, y: Any = None) -> Any:
        r"""One step of stochastic variational inference from the minibatch ``X``
        ``(n_samples, n_features)``; returns ``self``.

        The running statistics per row of ``q(z)`` move towards the minibatch's,
        ``s̄_t = (1 − γ_t) s̄_{t−1} + γ_t ŝ(X; q_{t−1}) / n``, ``γ_t = (t + 2)^{−κ}``
        (``κ`` = :data:`PARTIAL_FIT_KAPPA`; the first minibatch sets ``s̄_1``), and
        ``q(π, θ)`` is CAVI's conjugate update of ``n_seen·s̄_t`` (``n_seen``: the rows
        seen so far): the natural-gradient step of stochastic VI
        (:class:`~pyroem.engines.cavi.OnlineVariational`). The first call resolves
        the default priors from its minibatch and starts as ``fit`` does (``q(π, θ)``
        from the initial parameters' responsibilities on it), unless the estimator was
        fitted, whose ``q(π, θ)`` it continues from. ``n_iter_`` counts the updates;
        ``lower_bound_`` is the minibatch's mean log-likelihood at ``E_{q_{t−1}}[π, θ]``.
        """
        online: OnlineVariational | None = getattr(self, "_online", None)
        fitted = online is not None or hasattr(self, "_result")
        X = self._validate_data(X, reset=not fitted)
        data = torch.as_tensor(X, dtype=torch.float64)
        if online is None:
            online = self._start_online(X, data, fitted)
        online.family.validate(data)
        self.lower_bound_ = online.update(data, PARTIAL_FIT_KAPPA)
        self._online = online
        self._set_fitted(online)
        self.n_iter_ = online.updates
        return self

    def _start_online(self, X: np.ndarray, data: torch.Tensor, fitted: bool) -> OnlineVariational:
        if fitted:
            return OnlineVariational.continuing(self._result)
        self._validate_params()
        if X.shape[0] < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got "
                f"n_components = {self.n_components}, n_samples = {X.shape[0]}"
            )
        self._check_init_overrides(X.shape[1])
        self._resolve_priors(np.asarray(X, dtype=np.float64), None)
        spec = self._spec(X.shape[1])
        family = spec.bind(data)
        seed = int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))
        start = self._start(spec, family, data, seed)
        params = initial_params(spec, family, data, start, torch.Generator().manual_seed(seed))
        self._fit_dtype = X.dtype
        prior_type = str(self.weight_concentration_prior_type)
        return OnlineVariational.start(spec, family, data, params, prior_type)

    def _fit_tolerance(self, num_data: float) -> float:
        return self.tol / num_data

    def _lower_bound(self, result: Any, weights: np.ndarray | None) -> float:
        return float(result.elbo)

    def _lower_bounds(self, result: Any, weights: np.ndarray | None) -> list[float]:
        return list(result.history.objective[1:])

    def _set_fitted(self, result: Any) -> None:
        self._result = result
        self._bound_family = result.family
        dtype = self._fit_dtype
        posterior = result.variational["components"]
        weights = result.variational["weights"]
        if "concentration" in weights:
            self.weight_concentration_: Any = weights["concentration"].numpy().astype(dtype)
        else:
            self.weight_concentration_ = (
                weights["stick_concentration1"].numpy().astype(dtype),
                weights["stick_concentration0"].numpy().astype(dtype),
            )
        self.weights_ = result.params["weights"].numpy().astype(dtype)
        self.mean_precision_ = posterior["mean_precision"].numpy().astype(dtype)
        self.means_ = posterior["mean"].numpy().astype(dtype)
        dof = posterior["dof"].numpy()
        self.degrees_of_freedom_ = (dof / self._tied_count()).astype(dtype)
        scale = posterior["scale"].numpy()
        if self.covariance_type == "full":
            covariances = scale / dof[:, None, None]
        elif self.covariance_type == "diag":
            covariances = scale / dof[:, None]
        else:
            covariances = scale / dof
        self._set_covariances(covariances.astype(dtype))

    def _warm_params(self) -> Any:
        # The previous fit itself: vb-em continues from its q(π, θ); after partial_fit,
        # from its expected parameters.
        if isinstance(self._result, OnlineVariational):
            return self._result.params
        return self._result

    def _score(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        check_is_fitted(self)
        X = self._validate_data(X, reset=False)
        data = torch.as_tensor(X, dtype=torch.float64)
        probs = self._result.predict_proba(data).numpy()
        with np.errstate(divide="ignore"):
            log_resp = np.log(probs)
        return self._result.score_samples(data).numpy(), log_resp

    def _n_parameters(self) -> int:
        return self._bound_family.num_parameters(self.n_components) + self.n_components - 1


# ---------------------------------------------------------------------------
# Families scikit-learn lacks: the same estimator shape
# ---------------------------------------------------------------------------


class _DiscreteMixture(_StepwiseEstimator):
    """A mixture of one of pyroem's vector families fitted by ``map-em``.

    The fitted component parameters are one attribute (``rates_`` or ``probs_``)
    of shape ``(n_components, ...)``, beside ``weights_``.
    """

    _attribute: ClassVar[str]
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_MixtureEstimator._parameter_constraints,
        "prior": [StrOptions({"default"}), None],
    }

    def __init__(
        self,
        n_components: int = 1,
        *,
        prior: str | None = "default",
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ) -> None:
        self.n_components = n_components
        self.prior = prior
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.init_params = init_params
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval

    def _set_fitted(self, result: Any) -> None:
        params = {key: value.numpy() for key, value in result.params.items()}
        self._bound_family = result.family
        name = self._attribute[:-1]
        values, weights = params[name], params["weights"]
        removed = result.removed_components
        if removed:
            # A component no data reaches is dropped by map-em (weight 0); it returns
            # with weight 0 and the average of the other components' parameters.
            kept = [k for k in range(self.n_components) if k not in removed]
            full = np.broadcast_to(values.mean(0), (self.n_components, *values.shape[1:])).copy()
            full[kept] = values
            values = full
            weights = np.zeros(self.n_components)
            weights[kept] = params["weights"]
        self.weights_ = weights
        setattr(self, self._attribute, values)

    def _mixture_params(self) -> MixtureParams:
        family = self._bound_family
        name = self._attribute[:-1]
        value = torch.as_tensor(getattr(self, self._attribute), dtype=torch.float64)
        weights = torch.as_tensor(self.weights_, dtype=torch.float64)
        components = family.params_type(**{name: value})
        return MixtureParams(weights, components, torch.arange(weights.shape[0]))

    def _warm_params(self) -> dict:
        return {"weights": self.weights_, self._attribute[:-1]: getattr(self, self._attribute)}


class PoissonMixture(_DiscreteMixture):
    """Mixture of independent Poisson counts per feature; ``rates_`` ``(K, D)``.

    ``prior="default"`` is pyroem's weak Gamma prior on the rates (MAP); ``None`` is
    maximum likelihood. Otherwise the arguments and methods are ``GaussianMixture``'s.
    """

    _attribute = "rates_"

    def _family(self) -> Family:
        return Poisson(prior=self.prior)


class BernoulliMixture(_DiscreteMixture):
    """Mixture of independent binary features (latent class analysis); ``probs_`` ``(K, D)``.

    ``prior="default"`` is pyroem's weak Beta prior (MAP); ``None`` is maximum likelihood.
    """

    _attribute = "probs_"

    def _family(self) -> Family:
        return Bernoulli(prior=self.prior)


class CategoricalMixture(_DiscreteMixture):
    """Mixture of independent categorical features coded ``0 .. C−1``; ``probs_``
    ``(K, D, C)``.

    ``num_categories`` defaults to ``max(X) + 1``; ``prior="default"`` is pyroem's weak
    Dirichlet prior (MAP), ``None`` maximum likelihood.
    """

    _attribute = "probs_"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        **_DiscreteMixture._parameter_constraints,
        "num_categories": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        n_components: int = 1,
        *,
        num_categories: int | None = None,
        prior: str | None = "default",
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        init_params: str = "kmeans",
        random_state: Any = None,
        warm_start: bool = False,
        verbose: int = 0,
        verbose_interval: int = 10,
    ) -> None:
        super().__init__(
            n_components,
            prior=prior,
            tol=tol,
            max_iter=max_iter,
            n_init=n_init,
            init_params=init_params,
            random_state=random_state,
            warm_start=warm_start,
            verbose=verbose,
            verbose_interval=verbose_interval,
        )
        self.num_categories = num_categories

    def _family(self) -> Family:
        return Categorical(self.num_categories, prior=self.prior)
