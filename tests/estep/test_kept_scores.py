"""A fit's per-row log-likelihoods and labels come from its last E-step where that
E-step was predicted to be the last (no scoring pass of their own), and from a scoring
pass otherwise; either way they are those of a brute force in NumPy at the fitted
parameters."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pyroem
import pyroem.api
from pyroem.estep import gaussian_features, gaussian_small
from pyroem.estep.enumerate import MIN_CHUNK_ROWS, MixtureEStep
from pyroem.model import families
from pyroem.model.mixture import MixtureParams
from tests.reference_densities import component_log_prob


def _brute_force_scores(
    data: np.ndarray, params: dict[str, torch.Tensor], kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """``log p(x_n)`` ``(N,)`` and ``argmax_k log π_k p(x_n | θ_k)`` ``(N,)`` from torch's
    own densities in float64."""
    log_densities = component_log_prob("gaussian", kind, torch.from_numpy(data), params)
    joint = (log_densities + params["weights"].log()).numpy()
    peak = joint.max(1)
    return np.log(np.exp(joint - peak[:, None]).sum(1)) + peak, joint.argmax(1)


def _blobs(dim: int, count: int, size: int, seed: int) -> np.ndarray:
    generator = np.random.default_rng(seed)
    centres = 4.0 * generator.normal(size=(count, dim))
    labels = generator.integers(count, size=size)
    return centres[labels] + generator.normal(size=(size, dim)) * generator.uniform(0.5, 1.5, dim)


def _check_scores(fit: pyroem.FitResult, data: np.ndarray, kind: str) -> None:
    pointwise, labels = _brute_force_scores(data, fit.params, kind)
    np.testing.assert_allclose(fit.log_likelihood(pointwise=True).numpy(), pointwise, rtol=1e-12)
    np.testing.assert_array_equal(fit.labels.numpy(), labels)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the fit's own scoring passes (``pyroem.api.score_labels``)."""
    calls: list[int] = []
    scoring = pyroem.api.score_labels

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return scoring(*args, **kwargs)

    monkeypatch.setattr(pyroem.api, "score_labels", counted)
    return calls


@pytest.mark.parametrize(
    ("kind", "dim", "count"),
    [("full", 6, 8), ("full", 2, 3), ("diag", 6, 4), ("spherical", 3, 3), ("tied", 5, 8)],
)
def test_a_fit_to_max_iter_keeps_its_last_e_steps_scores(
    kind: str, dim: int, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The features (full, tied with 8 components), the small-dimension kernel and the
    # diagonal table: each keeps the rows' scores of the E-step at iteration max_iter,
    # over several chunks (the fewest rows a chunk takes) and several blocks a chunk.
    monkeypatch.setattr(gaussian_features, "FEATURE_BLOCK_BYTES", 2**16)
    monkeypatch.setattr(gaussian_small, "SMALL_BLOCK_BYTES", 2**16)
    data = _blobs(dim, count, 2 * MIN_CHUNK_ROWS + 900, seed=dim + count)
    calls = _counting(monkeypatch)
    spec = pyroem.Mixture(count, covariance_type=kind, prior=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            spec, torch.from_numpy(data), tol=0.0, max_iter=4, seed=0, chunk_size=MIN_CHUNK_ROWS
        )
    assert fit.num_iterations == 4
    assert calls == []
    _check_scores(fit, data, kind)


def test_kept_scores_are_of_each_row_once_under_frequency_weights(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A row's log-likelihood is its own, whatever its weight (a zero weight included);
    # the fit with weights is the fit of the data with rows repeated.
    data = _blobs(3, 3, 1500, seed=4)
    weights = np.random.default_rng(5).integers(0, 3, size=data.shape[0]).astype(float)
    calls = _counting(monkeypatch)
    spec = pyroem.Mixture(3, prior=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            spec, torch.from_numpy(data), tol=0.0, max_iter=3, seed=0, sample_weight=weights
        )
    assert calls == []
    _check_scores(fit, data, "full")


def test_a_fit_converging_as_predicted_keeps_its_last_e_steps_scores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Overlapping clusters: EM converges linearly over some tens of iterations, and the
    # rate of the last changes predicts the E-step whose change falls below tol.
    generator = np.random.default_rng(7)
    data = np.concatenate(
        [generator.normal(0.0, 1.0, (800, 2)), generator.normal(1.8, 1.0, (800, 2))]
    )
    calls = _counting(monkeypatch)
    fit = pyroem.fit(pyroem.Mixture(2, prior=None), torch.from_numpy(data), tol=1e-7, seed=1)
    assert fit.converged and fit.num_iterations > 10
    assert calls == []
    _check_scores(fit, data, "full")


def test_a_fit_whose_last_e_step_was_not_predicted_is_scored_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _blobs(4, 3, 2000, seed=9)
    calls = _counting(monkeypatch)
    monkeypatch.setattr(pyroem.api._MixtureEngine, "_converges_next", lambda self: False)
    fit = pyroem.fit(pyroem.Mixture(3, prior=None), torch.from_numpy(data), tol=1e-3, seed=0)
    assert fit.converged
    assert calls == [1]
    _check_scores(fit, data, "full")


def test_rows_with_missing_entries_are_scored_by_a_pass_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The E-step keeps nothing where rows have missing entries (they run in blocks by
    # pattern): the fit scores its rows once, the labels those of its own predictions.
    data = _blobs(3, 3, 1200, seed=12)
    data[::7, 1] = np.nan
    calls = _counting(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pyroem.ConvergenceWarning)
        fit = pyroem.fit(
            pyroem.Mixture(3, prior=None), torch.from_numpy(data), tol=0.0, max_iter=3, seed=0
        )
    assert calls == [1]
    assert torch.equal(fit.labels, fit.predict(torch.from_numpy(data)))


def test_a_chunk_run_again_keeps_each_rows_scores_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Seven broad clusters, one far away (the chunk's largest |x - c|^2 is about 1,500),
    # and a thin component at the chunk's centre: it fails the chunk's rounding bound but
    # is predicted to keep its moments' accuracy, so its moments are checked once the
    # chunk is done. Refusing them makes the chunk run again; the scores the E-step keeps
    # are each row's once, in order.
    generator = np.random.default_rng(11)
    count, dim, size = 8, 5, 3000
    means = 3.0 * generator.normal(size=(count, dim))
    means[6] = 0.0
    means[7] = 0.0
    means[7, 0] = 45.0
    covariances = np.repeat(np.eye(dim)[None], count, 0)
    covariances[6] = np.diag([1.0] * 4 + [0.05**2])
    labels = generator.integers(count, size=size)
    chol = np.linalg.cholesky(covariances)
    data = means[labels] + np.einsum("nde,ne->nd", chol[labels], generator.normal(size=(size, dim)))
    weights = np.full(count, 1.0 / count)
    refused: list[int] = []

    def refuse(feature_weights, moments):  # type: ignore[no-untyped-def]
        refused.append(1)
        return torch.full((moments.shape[0],), torch.inf, dtype=moments.dtype)

    monkeypatch.setattr(families, "moment_losses", refuse)
    # Several blocks of features in the one chunk, each pass over them in order.
    monkeypatch.setattr(gaussian_features, "FEATURE_BLOCK_BYTES", 2**15)
    tensor = torch.from_numpy(data)
    spec = pyroem.Mixture(count, prior=None)
    family = spec.bind(tensor)
    e_step = MixtureEStep(family, spec.weights_prior, tensor, chunk_size=65536)
    components = family.params_type(torch.from_numpy(means), torch.from_numpy(covariances))
    params = MixtureParams(torch.from_numpy(weights), components, torch.arange(count))
    result = e_step(params, keep=True)
    assert len(refused) == 1  # the one chunk checked, refused and run again
    truth = {
        name: torch.from_numpy(value)
        for name, value in zip(
            ("weights", "means", "covariances"), (weights, means, covariances), strict=True
        )
    }
    pointwise, best = _brute_force_scores(data, truth, "full")
    assert e_step.kept is not None and e_step.kept.params is params
    np.testing.assert_allclose(e_step.kept.pointwise.numpy(), pointwise, rtol=1e-12)
    np.testing.assert_array_equal(e_step.kept.labels.numpy(), best)
    np.testing.assert_allclose(result.log_likelihood, pointwise.sum(), rtol=1e-12)
    # Without keep, nothing is kept.
    e_step(params)
    assert e_step.kept is None
