"""Bad input gets a clear error.

Every check names the exception type and matches the message: it must say what
was wrong (and, where there is one, the remedy). Flat-prior fits that would need
a singular covariance raise :class:`pyroem.SingularCovarianceError` naming the
prior as the remedy, never returning NaN or a covariance that is singular up to
rounding; the same data fit under the default prior.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyroem
from pyroem import DataError, PyroEMError, SingularCovarianceError, SpecError
from pyroem.errors import NotSupportedError
from pyroem.estep.stacked_draws import LatentProgram

GAUSSIAN_DATA = torch.tensor([[0.0, 1.0], [1.0, 0.5], [2.0, 2.5], [3.0, 1.5], [4.0, 3.0]])
COUNTS = torch.tensor([[0.0, 3.0], [1.0, 2.0], [4.0, 0.0], [2.0, 5.0]])


def _fit(data: Any, num_components: int = 1, family: str = "gaussian", **options: Any) -> Any:
    return pyroem.fit(pyroem.Mixture(num_components, family), data, **options)


# ----------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ([[1.0, 2.0], [float("nan"), float("nan")]], r"row\(s\) \[1\].*every entry missing"),
        ([[1.0, 2.0], [float("inf"), 3.0]], r"1 infinite value\(s\), first at row 1 column 0"),
        ([[1.0, 2.0], [-float("inf"), float("nan")]], r"1 infinite value\(s\)"),
        (np.arange(5.0), r"two-dimensional.*got shape \(5,\).*reshape\(-1, 1\)"),
        (np.zeros((4, 2, 2)), r"two-dimensional.*got shape \(4, 2, 2\)"),
        (np.zeros((0, 2)), r"data is empty: shape \(0, 2\)"),
        (np.zeros((3, 0)), r"data is empty: shape \(3, 0\)"),
        ([], r"two-dimensional.*got shape \(0,\)"),
        ([["a", "b"], ["c", "d"]], r"data must be a numeric array"),
        (np.array([["1.0", "x"], ["2.0", "y"]]), r"data must be a numeric array"),
        ([[1.0, 2.0], [3.0]], r"data must be a numeric array"),
    ],
    ids=[
        "all-missing-row",
        "inf",
        "nan-and-inf",
        "1-d",
        "3-d",
        "no-rows",
        "no-columns",
        "empty-list",
        "strings",
        "numpy-strings",
        "ragged",
    ],
)
def test_bad_data_for_fit(data: Any, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        _fit(data)


def test_bad_data_for_the_pyro_program() -> None:
    spec = pyroem.Mixture(2)
    with pytest.raises(DataError, match=r"1 missing value\(s\) \(NaN\).*not by vb-em"):
        spec.model([[1.0, float("nan")], [2.0, 3.0], [0.0, 1.0]])
    with pytest.raises(DataError, match=r"two-dimensional"):
        spec.model(np.arange(4.0))


def test_data_errors_are_value_errors_and_pyroem_errors() -> None:
    with pytest.raises(ValueError, match=r"NaN") as info:
        _fit([[float("nan")]])
    assert isinstance(info.value, PyroEMError)


@pytest.mark.parametrize(
    ("family", "data", "pattern"),
    [
        ("poisson", [[1.0], [-2.0]], r"poisson family needs non-negative integer counts.*-2\.0"),
        ("poisson", [[1.0], [2.5]], r"poisson family needs non-negative integer counts.*2\.5"),
        (
            "categorical",
            [[0.0], [-1.0]],
            r"categorical family needs non-negative integer counts.*-1\.0",
        ),
        ("categorical", [[0.0], [1.5]], r"categorical family needs non-negative integer.*1\.5"),
        ("bernoulli", [[0.0], [1.0], [2.0]], r"bernoulli family needs binary 0/1 data.*2\.0"),
        ("bernoulli", [[0.0], [0.5]], r"bernoulli family needs binary 0/1 data.*0\.5"),
        ("exponential", [[1.0], [-0.5]], r"exponential family needs non-negative data.*-0\.5"),
    ],
    ids=[
        "poisson-negative",
        "poisson-fraction",
        "categorical-negative",
        "categorical-fraction",
        "bernoulli-two",
        "bernoulli-half",
        "exponential-negative",
    ],
)
def test_data_outside_the_family_support(family: str, data: Any, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        _fit(data, 1, family)


def test_category_beyond_num_categories() -> None:
    spec = pyroem.Mixture(1, "categorical", num_categories=2)
    with pytest.raises(DataError, match=r"holds category 2 but num_categories=2"):
        pyroem.fit(spec, [[0.0], [2.0]])


def test_more_components_than_data_points() -> None:
    with pytest.raises(DataError, match=r"num_components=6 exceeds the number of data points"):
        _fit(GAUSSIAN_DATA, 6)


# ----------------------------------------------------------------------------
# Model specification
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: pyroem.Mixture(0), r"num_components must be >= 1; got 0"),
        (lambda: pyroem.Mixture(-3), r"num_components must be >= 1; got -3"),
        (lambda: pyroem.Mixture(2.5), r"num_components must be a positive integer; got 2\.5"),
        (lambda: pyroem.Mixture("3"), r"num_components must be a positive integer; got '3'"),
        (lambda: pyroem.Mixture(True), r"num_components must be a positive integer; got True"),
        (lambda: pyroem.Mixture(2, "student-t"), r"unknown family 'student-t'; choose one of"),
        (lambda: pyroem.Mixture(2, 42), r"unknown family 42"),
        (
            lambda: pyroem.Mixture(2, covariance_type="banded"),
            r"covariance_type must be one of \('full', 'diag', 'spherical', 'tied'\)",
        ),
        (
            lambda: pyroem.Mixture(2, "poisson", covariance_type="diag"),
            r"covariance_type applies to the gaussian family only",
        ),
        (
            lambda: pyroem.Mixture(2, "bernoulli", num_categories=3),
            r"num_categories applies to the categorical family only",
        ),
        (
            lambda: pyroem.Mixture(2, "categorical", num_categories=1),
            r"num_categories must be an integer >= 2",
        ),
        (
            lambda: pyroem.Mixture(2, weights_prior=[1.0, 1.0, 1.0]),
            r"weights_prior must be a scalar or have shape \(2,\); got shape \(3,\)",
        ),
        (
            lambda: pyroem.Mixture(2, weights_prior=[[1.0, 1.0]]),
            r"weights_prior must be a scalar or have shape \(2,\); got shape \(1, 2\)",
        ),
        (lambda: pyroem.Mixture(2, weights_prior=-1.0), r"weights_prior must be positive"),
        (lambda: pyroem.Mixture(2, weights_prior=[1.0, 0.0]), r"weights_prior must be positive"),
        (
            lambda: pyroem.Mixture(2, weights_prior=float("inf")),
            r"weights_prior must be positive and finite",
        ),
        (
            lambda: pyroem.Mixture(2, prior="flat"),
            r"prior must be 'default', 'mclust', None or a NormalInverseWishart; got 'flat'",
        ),
        (
            lambda: pyroem.Mixture(2, "poisson", prior=pyroem.Beta()),
            r"the poisson family takes a Gamma prior; got Beta",
        ),
        (
            lambda: pyroem.Mixture(2, "gaussian", prior=pyroem.Gamma()),
            r"the gaussian family takes a NormalInverseWishart prior; got Gamma",
        ),
        (
            lambda: pyroem.Mixture(2, "bernoulli", prior=pyroem.Dirichlet()),
            r"the bernoulli family takes a Beta prior; got Dirichlet",
        ),
        (
            lambda: pyroem.Mixture(2, "categorical", prior=pyroem.Beta()),
            r"the categorical family takes a Dirichlet prior; got Beta",
        ),
        (
            lambda: pyroem.Mixture(2, pyroem.Gaussian("diag"), covariance_type="full"),
            r"go on the family object",
        ),
    ],
    ids=[
        "K-zero",
        "K-negative",
        "K-float",
        "K-string",
        "K-bool",
        "unknown-family",
        "family-not-a-string",
        "covariance-type",
        "covariance-type-not-gaussian",
        "num-categories-not-categorical",
        "num-categories-one",
        "weights-prior-shape",
        "weights-prior-2d",
        "weights-prior-negative",
        "weights-prior-zero",
        "weights-prior-inf",
        "prior-string",
        "poisson-prior-type",
        "gaussian-prior-type",
        "bernoulli-prior-type",
        "categorical-prior-type",
        "options-beside-family-object",
    ],
)
def test_bad_specification(make: Callable[[], Any], pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        make()


@pytest.mark.parametrize(
    ("family", "prior", "data", "pattern"),
    [
        ("poisson", pyroem.Gamma(0.5, 1.0), COUNTS, r"Gamma prior concentration must be >= 1"),
        ("exponential", pyroem.Gamma(0.9), COUNTS + 1, r"Gamma prior concentration must be >= 1"),
        ("bernoulli", pyroem.Beta(0.5, 2.0), COUNTS.clamp(max=1), r"Beta prior concentrations"),
        ("bernoulli", pyroem.Beta(2.0, 0.99), COUNTS.clamp(max=1), r"Beta prior concentrations"),
        ("categorical", pyroem.Dirichlet(0.5), COUNTS, r"Dirichlet prior concentration must be"),
        (
            "categorical",
            pyroem.Dirichlet([1.0, 1.0, 0.5, 1.0, 1.0, 1.0]),
            COUNTS,
            r"Dirichlet prior concentration must be",
        ),
    ],
    ids=["gamma-poisson", "gamma-exponential", "beta-1", "beta-0", "dirichlet", "dirichlet-vec"],
)
def test_prior_concentration_below_one_is_unbounded(
    family: str, prior: Any, data: torch.Tensor, pattern: str
) -> None:
    """Below 1 the prior density is infinite on the boundary: MAP does not exist."""
    spec = pyroem.Mixture(2, family, prior=prior)
    with pytest.raises(SpecError, match=pattern) as info:
        pyroem.fit(spec, data)
    message = str(info.value)
    assert "MAP" in message
    assert "unbounded" in message or "no maximum" in message


@pytest.mark.parametrize(
    ("prior", "pattern"),
    [
        (pyroem.NormalInverseWishart(dof=0.5), r"prior dof must exceed dim - 1 = 1; got 0\.5"),
        (pyroem.NormalInverseWishart(mean_precision=-1.0), r"mean_precision must be >= 0"),
        (pyroem.NormalInverseWishart(mean=[0.0, 0.0, 0.0]), r"prior mean must be a scalar or"),
        (pyroem.NormalInverseWishart(scale=[[1.0, 2.0], [2.0, 1.0]]), r"positive definite"),
        (pyroem.NormalInverseWishart(scale=np.ones((3, 3))), r"prior scale must be a float"),
    ],
    ids=["dof", "mean-precision", "mean-shape", "scale-indefinite", "scale-shape"],
)
def test_bad_normal_inverse_wishart(prior: Any, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        pyroem.fit(pyroem.Mixture(2, pyroem.Gaussian("full", prior=prior)), GAUSSIAN_DATA)


def test_bad_gamma_rate() -> None:
    spec = pyroem.Mixture(2, "poisson", prior=pyroem.Gamma(2.0, -1.0))
    with pytest.raises(SpecError, match=r"Gamma prior rate must be > 0"):
        pyroem.fit(spec, COUNTS)


# ----------------------------------------------------------------------------
# Fit options
# ----------------------------------------------------------------------------


def test_unknown_method() -> None:
    with pytest.raises(SpecError, match=r"unknown method 'em'; choose one of"):
        _fit(GAUSSIAN_DATA, method="em")


def test_unknown_map_em_option_is_named() -> None:
    with pytest.raises(SpecError, match=r"unknown options for method='map-em': \['guide'\]"):
        _fit(GAUSSIAN_DATA, guide="normal")


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"n_init": 0}, r"n_init must be an integer >= 1; got 0"),
        ({"n_init": 2.0}, r"n_init must be an integer >= 1; got 2\.0"),
        ({"n_init": True}, r"n_init must be an integer >= 1; got True"),
        ({"max_iter": -1}, r"max_iter must be an integer >= 0; got -1"),
        ({"max_iter": 10.5}, r"max_iter must be an integer >= 0; got 10\.5"),
        ({"tol": -1e-3}, r"tol must be a non-negative number; got -0\.001"),
        ({"tol": "small"}, r"tol must be a non-negative number; got 'small'"),
        ({"chunk_size": 0}, r"chunk_size must be an integer >= 1; got 0"),
        ({"dtype": "float16"}, r"dtype must be one of \['float32', 'float64'\]; got 'float16'"),
        ({"dtype": torch.int64}, r"dtype must be torch\.float64 or torch\.float32"),
        ({"init": "best"}, r"init must be one of .*kmeans\+\+.*; got 'best'"),
    ],
    ids=[
        "n_init-0",
        "n_init-float",
        "n_init-bool",
        "max_iter-negative",
        "max_iter-float",
        "tol-negative",
        "tol-string",
        "chunk_size",
        "dtype-string",
        "dtype-int",
        "init-string",
    ],
)
def test_bad_fit_options(options: dict[str, Any], pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        _fit(GAUSSIAN_DATA, **options)


def test_fit_rejects_models_it_cannot_fit() -> None:
    with pytest.raises(SpecError, match=r"Pyro program \(a callable\) or a pyroem\.Mixture"):
        pyroem.fit("gaussian", GAUSSIAN_DATA)
    with pytest.raises(SpecError, match=r"no observed sites"):
        pyroem.fit(lambda data: None, GAUSSIAN_DATA)
    with pytest.raises(SpecError, match=r"exactly one data argument; got 2"):
        pyroem.fit(pyroem.Mixture(1), GAUSSIAN_DATA, GAUSSIAN_DATA)


_GOOD_INIT = {
    "weights": [0.5, 0.5],
    "means": [[0.0, 1.0], [3.0, 2.0]],
    "covariances": [np.eye(2).tolist(), np.eye(2).tolist()],
}


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"weights": [1.0]}, r"init weights must be 2 non-negative numbers; got shape \(1,\)"),
        ({"weights": [1.5, -0.5]}, r"init weights must be 2 non-negative numbers"),
        ({"weights": [0.5, 0.6]}, r"init weights must sum to 1"),
        ({"means": [[0.0, 1.0]]}, r"init means must have shape \(2, 2\); got \(1, 2\)"),
        ({"means": [[0.0, 1.0, 2.0]] * 2}, r"init means must have shape \(2, 2\); got \(2, 3\)"),
        (
            {"covariances": np.eye(2).tolist()},
            r"init covariances \(full\) must have shape \(2, 2, 2\); got \(2, 2\)",
        ),
        ({"means": [[0.0, float("nan")]] * 2}, r"init_params\['means'\] must be finite"),
        ({"means": "origin"}, r"init_params\['means'\] must be numeric"),
    ],
    ids=[
        "weights-shape",
        "weights-negative",
        "weights-sum",
        "means-rows",
        "means-columns",
        "covariances-shape",
        "means-nan",
        "means-string",
    ],
)
def test_bad_init_dict(change: dict[str, Any], pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        _fit(GAUSSIAN_DATA, 2, init={**_GOOD_INIT, **change})


def test_init_dict_missing_entries() -> None:
    without_weights = {k: v for k, v in _GOOD_INIT.items() if k != "weights"}
    with pytest.raises(SpecError, match=r"init_params needs 'weights'"):
        _fit(GAUSSIAN_DATA, 2, init=without_weights)
    without_covariances = {k: v for k, v in _GOOD_INIT.items() if k != "covariances"}
    with pytest.raises(SpecError, match=r"missing 'covariances'"):
        _fit(GAUSSIAN_DATA, 2, init=without_covariances)


def test_init_dict_with_singular_covariance() -> None:
    init = {**_GOOD_INIT, "covariances": [np.eye(2).tolist(), [[1.0, 1.0], [1.0, 1.0]]]}
    with pytest.raises(SingularCovarianceError, match=r"component 1 is not positive definite"):
        _fit(GAUSSIAN_DATA, 2, init=init)


@pytest.mark.parametrize(
    ("family", "data", "init", "pattern"),
    [
        ("poisson", COUNTS, {"weights": [1.0], "rates": [[-1.0, 1.0]]}, r"non-negative"),
        ("poisson", COUNTS, {"weights": [1.0], "rates": [[1.0]]}, r"shape \(1, 2\); got \(1, 1\)"),
        ("exponential", COUNTS + 1, {"weights": [1.0], "rates": [[0.0, 1.0]]}, r"positive"),
        ("bernoulli", COUNTS.clamp(max=1), {"weights": [1.0], "probs": [[1.2, 0.5]]}, r"\[0, 1\]"),
        (
            "categorical",
            COUNTS,
            {"weights": [1.0], "probs": np.full((1, 2, 6), 0.2).tolist()},
            r"sum to 1 over categories",
        ),
    ],
    ids=["poisson-rate", "poisson-shape", "exponential-rate", "bernoulli-prob", "categorical"],
)
def test_bad_init_dict_for_other_families(
    family: str, data: torch.Tensor, init: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(SpecError, match=pattern):
        _fit(data, 1, family, init=init)


# ----------------------------------------------------------------------------
# Using a fit
# ----------------------------------------------------------------------------


def test_predict_on_data_with_the_wrong_number_of_columns() -> None:
    result = _fit(GAUSSIAN_DATA, 2, seed=0)
    three_columns = torch.zeros(4, 3)
    for method in (result.predict, result.predict_proba, result.score_samples):
        with pytest.raises(DataError, match=r"data has 3 columns but the model was fitted on 2"):
            method(three_columns)
    with pytest.raises(DataError, match=r"data has 1 columns"):
        result.log_likelihood(torch.zeros(4, 1))
    with pytest.raises(DataError, match=r"every entry missing"):
        result.predict([[float("nan"), float("nan")]])


def test_predict_outside_the_support() -> None:
    result = _fit(COUNTS, 2, "poisson", seed=0)
    with pytest.raises(DataError, match=r"non-negative integer counts"):
        result.predict([[0.5, 1.0]])


def test_loading_something_that_is_not_a_fit(tmp_path: Any) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(PyroEMError, match=r"cannot read a pyroem fit"):
        pyroem.load(path)


# ----------------------------------------------------------------------------
# Singular covariances under flat priors
# ----------------------------------------------------------------------------

#: Three locations, each repeated 10 times: clusters of identical points. The data as
#: a whole are not collinear, so the default prior's scale is positive definite.
REPEATED = torch.tensor([[0.0, 0.0]] * 10 + [[10.0, 0.0]] * 10 + [[10.0, 1.0]] * 10)
#: Points exactly on the line y = 2x + 1.
LINE = torch.stack([torch.arange(12.0), 2 * torch.arange(12.0) + 1], dim=1)

COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("num_components", [2, 3])
@pytest.mark.parametrize("shift", [0.0, 100.0], ids=["at-origin", "far-from-origin"])
def test_repeated_points_without_prior_are_singular(
    covariance_type: str, num_components: int, shift: float
) -> None:
    """Flat-prior MLE puts a zero-variance component on repeated points.

    The run must stop with the remedy, not return NaN or a covariance that is
    rounding noise (which would make the log-likelihood arbitrarily large).
    """
    spec = pyroem.Mixture(num_components, covariance_type=covariance_type, prior=None)
    for seed in range(3):
        with pytest.raises(SingularCovarianceError, match=r"use a prior \(prior='default'"):
            pyroem.fit(spec, REPEATED + shift, seed=seed)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("num_components", [2, 3])
def test_repeated_points_fit_under_the_default_prior(
    covariance_type: str, num_components: int
) -> None:
    spec = pyroem.Mixture(num_components, covariance_type=covariance_type)
    result = pyroem.fit(spec, REPEATED, seed=0, n_init=2)
    assert result.converged
    for name, value in result.params.items():
        assert torch.isfinite(value).all(), name
    covariances = result.params["covariances"]
    if covariance_type in ("full", "tied"):
        assert bool((torch.linalg.eigvalsh(covariances) > 1e-6).all())
    else:
        assert bool((covariances > 1e-6).all())
    assert np.isfinite(result.log_likelihood())
    assert np.all(np.diff(result.history.objective) >= -1e-9 * abs(result.log_joint()))


@pytest.mark.parametrize("num_components", [1, 2])
def test_collinear_data_without_prior_are_singular(num_components: int) -> None:
    spec = pyroem.Mixture(num_components, covariance_type="full", prior=None)
    with pytest.raises(SingularCovarianceError, match=r"not positive definite.*use a prior"):
        pyroem.fit(spec, LINE, seed=0)


def test_collinear_data_have_no_mclust_prior() -> None:
    """mclust's scale is the data covariance, singular for collinear columns."""
    with pytest.raises(SpecError, match=r"collinear data columns make the mclust scale singular"):
        pyroem.fit(pyroem.Mixture(1, prior="mclust"), LINE)
    with pytest.raises(SpecError, match=r"constant or collinear"):
        pyroem.fit(
            pyroem.Mixture(1, prior="mclust"), torch.stack([torch.arange(5.0), torch.ones(5)], 1)
        )


def test_collinear_data_fit_with_an_explicit_prior_scale() -> None:
    prior = pyroem.NormalInverseWishart(scale=1.0)
    result = pyroem.fit(pyroem.Mixture(2, pyroem.Gaussian("full", prior=prior)), LINE, seed=0)
    assert torch.isfinite(result.params["covariances"]).all()
    assert bool((torch.linalg.eigvalsh(result.params["covariances"]) > 0).all())


# ----------------------------------------------------------------------------
# The boundary: inputs that once failed inside torch or pyro
# ----------------------------------------------------------------------------

_X = np.random.default_rng(0).normal(size=(20, 2))


@pytest.mark.parametrize(
    "data",
    [_X + 1j, torch.tensor(_X) * (1 + 1j), (_X + 0j).tolist()],
    ids=["numpy", "torch", "list"],
)
def test_complex_data_are_rejected(data: Any) -> None:
    with pytest.raises(DataError, match=r"data must be real; got a complex array.*data\.real"):
        _fit(data, 2)


@pytest.mark.parametrize(
    ("device", "pattern"),
    [
        ("tpu", r"device must be 'cpu', 'cuda', 'cuda:N' or 'mps'.*got 'tpu'"),
        ("meta", r"device='meta' is not supported: pyroem computes on 'cpu', 'cuda' or 'mps'"),
        (3.5, r"device must be 'cpu'.*got 3.5"),
    ],
)
def test_unusable_devices_are_named(device: Any, pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        _fit(_X, 2, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_named() -> None:
    with pytest.raises(SpecError, match=r"device='cuda' asks for a GPU.*sees no CUDA.*'cpu'"):
        _fit(_X, 2, device="cuda")


def test_numpy_integer_seeds_are_seeds() -> None:
    plain = _fit(_X, 2, seed=3)
    numpy_seed = _fit(_X, 2, seed=np.int64(3))
    for name, value in plain.params.items():
        assert torch.equal(value, numpy_seed.params[name])


@pytest.mark.parametrize("seed", ["abc", 1.5, 2**70, -1, True, np.float64(2.0)])
@pytest.mark.parametrize("method", ["map-em", "mcmc-em"])
def test_bad_seeds_are_named(seed: Any, method: str) -> None:
    with pytest.raises(SpecError, match=r"seed must be an integer in \[0, 2\*\*32\) or None"):
        _fit(_X, 2, seed=seed, method=method)


_COVARIANCES = np.stack([np.eye(2), np.eye(2)])
_ASYMMETRIC = np.array([[1.0, 0.5], [0.1, 1.0]])


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (
            lambda: _fit(
                _X, 2, init={"weights": "ab", "means": _X[:2], "covariances": _COVARIANCES}
            ),
            r"init weights must be 2 non-negative numbers summing to 1; got 'ab'",
        ),
        (
            lambda: _fit(
                _X,
                2,
                init={
                    "weights": [0.5, 0.5],
                    "means": _X[:2],
                    "covariances": np.stack([_ASYMMETRIC] * 2),
                },
            ),
            r"init covariances must be symmetric.*largest \|A - A.T\| is 0.4",
        ),
        (
            lambda: pyroem.Mixture(2, weights_prior="a"),
            r"weights_prior must be a positive number or 2 positive numbers.*got 'a'",
        ),
        (
            lambda: pyroem.fit(
                pyroem.Mixture(2, prior=pyroem.NormalInverseWishart(scale=_ASYMMETRIC)), _X
            ),
            r"prior scale must be symmetric",
        ),
        (
            lambda: pyroem.NormalInverseWishart(dof="a"),
            r"NormalInverseWishart\(dof=...\) must be a finite number.*got 'a'",
        ),
        (lambda: pyroem.Gamma(rate=[1.0, "x"]), r"Gamma\(rate=...\) must be a finite number"),
    ],
    ids=["init-weights", "init-covariance", "weights-prior", "prior-scale", "niw-dof", "gamma"],
)
def test_bad_values_are_named_before_torch_sees_them(make: Callable[[], Any], pattern: str) -> None:
    with pytest.raises(SpecError, match=pattern):
        make()


@pytest.mark.parametrize("prior", ["default", None])
@pytest.mark.parametrize(
    ("factor", "pattern"),
    [
        (1e300, r"data values reach [0-9.]+e\+300; their squares overflow torch.float64.*rescale"),
        (1e-300, r"column 0 of the data spans only [0-9.]+e-300; its variance underflows.*rescale"),
    ],
)
def test_data_beyond_the_dtype_range_are_named(prior: Any, factor: float, pattern: str) -> None:
    """Not "constant or collinear" (they are neither) and not a NaN inside k-means++."""
    with pytest.raises(DataError, match=pattern):
        pyroem.fit(pyroem.Mixture(2, prior=prior), _X * factor)


def test_scaled_data_still_fit_where_the_dtype_holds_them() -> None:
    """1e100 times the data is within float64's range: the fit is the unscaled one, scaled
    (means by 1e100, covariances by 1e200), to rounding."""
    base = pyroem.fit(pyroem.Mixture(2, prior=None), _X, seed=0)
    scaled = pyroem.fit(pyroem.Mixture(2, prior=None), _X * 1e100, seed=0)
    torch.testing.assert_close(scaled.params["means"] / 1e100, base.params["means"])
    torch.testing.assert_close(scaled.params["covariances"] / 1e200, base.params["covariances"])


@pytest.mark.parametrize("prior", ["default", None])
def test_all_zero_exponential_data_are_named(prior: Any) -> None:
    """Not "use prior='default'" when that prior is in use."""
    with pytest.raises(DataError, match=r"column 0 of the exponential data is all zero"):
        pyroem.fit(pyroem.Mixture(2, "exponential", prior=prior), np.zeros((10, 1)))


def _branches_on_a_latent(x: torch.Tensor) -> None:
    p = pyro.sample("p", dist.Beta(1.0, 1.0))
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    z = pyro.sample("z", dist.Bernoulli(p))
    mean = loc if z.item() else 0.0
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mean, 1.0), obs=x)


@pytest.mark.parametrize("method", ["map-em", "vb-em", "mcmc-em", "nuts"])
def test_python_branching_on_an_enumerated_latent_is_explained(method: str) -> None:
    torch.set_default_dtype(torch.float64)
    with pytest.raises(
        NotSupportedError,
        match=r"(?s)discrete latents \['z'\] enumerated.*"
        r"do not branch in Python on a latent's value.*torch.where",
    ):
        pyroem.fit(_branches_on_a_latent, torch.zeros(5), method=method, seed=0)


def _normal_model(x: torch.Tensor) -> None:
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    variances = pyro.sample("variances", dist.InverseGamma(2.0, 2.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, variances.sqrt()), obs=x)


@pytest.mark.parametrize("method", ["map-em", "vb-em", "nuts"])
@pytest.mark.parametrize("value", [-1, torch.tensor(-1.0)], ids=["int", "tensor"])
def test_program_init_outside_the_support_is_named(method: str, value: Any) -> None:
    torch.set_default_dtype(torch.float64)
    with pytest.raises(
        SpecError, match=r"init\['variances'\] = -1(\.0)? is outside the site's support"
    ):
        pyroem.fit(_normal_model, torch.zeros(5), init={"variances": value}, method=method)


def _random_intercepts(y: torch.Tensor, groups: torch.Tensor) -> None:
    mu = pyro.param("mu", torch.tensor(0.0))
    tau = pyro.param("tau", torch.tensor(1.0), constraint=dist.constraints.positive)
    sigma = pyro.param("sigma", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("groups", 3):
        effects = pyro.sample("b", dist.Normal(0.0, tau))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu + effects[..., groups], sigma), obs=y)


def _random_intercepts_data() -> tuple[torch.Tensor, torch.Tensor]:
    groups = torch.arange(3).repeat_interleave(4)
    return torch.tensor([0.0, 1.0, 2.0])[groups] + torch.linspace(-1, 1, 12), groups


def test_random_effects_of_a_pyro_param_model_are_its_latents() -> None:
    """lme4's reading: the pyro.param sites are the parameters, the sample site in the
    plate of groups holds the random effects MCMC-EM integrates over."""
    torch.set_default_dtype(torch.float64)
    program = LatentProgram(_random_intercepts, _random_intercepts_data())
    assert program.latents == ["b"]
    assert sorted(program.params) == ["mu", "sigma", "tau"]
    # A sample site with a prior in a program without pyro.param sites stays a parameter.
    assert LatentProgram(_normal_model, (torch.zeros(5),)).latents == []


@pytest.mark.slow
def test_random_effects_of_a_pyro_param_model_are_sampled_by_default() -> None:
    torch.set_default_dtype(torch.float64)
    y, groups = _random_intercepts_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = pyroem.fit(
            _random_intercepts,
            y,
            groups,
            method="mcmc-em",
            seed=0,
            max_iter=1,
            num_samples=8,
            num_chains=2,
            warmup_steps=10,
            final_draws=8,
            log_likelihood_samples=0,
        )
    assert sorted(fit.params) == ["mu", "sigma", "tau"]
    assert fit.draws["b"].shape[-1] == 3


def test_a_program_variance_collapsing_onto_one_point_is_an_error_not_nan():
    """A component that captures one outlying point shrinks its variance to 0: the
    likelihood is unbounded there and the log joint is NaN. The fit ends that start with
    an error naming the parameter and the remedies, instead of returning NaN."""
    data = torch.cat([torch.linspace(-2.0, 2.0, 60, dtype=torch.float64), torch.tensor([50.0])])

    def model() -> None:
        weights = pyro.param(
            "w", torch.ones(3, dtype=torch.float64) / 3, constraint=dist.constraints.simplex
        )
        locs = pyro.param("locs", torch.tensor([-1.0, 1.0, 49.0], dtype=torch.float64))
        var = pyro.param(
            "var", torch.ones(3, dtype=torch.float64), constraint=dist.constraints.positive
        )
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[z], var[z].sqrt()), obs=data)

    start = {
        "w": torch.ones(3, dtype=torch.float64) / 3,
        "locs": torch.tensor([-1.0, 1.0, 49.0], dtype=torch.float64),
        "var": torch.ones(3, dtype=torch.float64),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PyroEMError, match=r"is nan.*\['var'\].*prior") as caught:
            pyroem.fit(model, method="map-em", init=start, max_iter=50)
    assert not isinstance(caught.value, SpecError)
