"""The small-dimension Gaussian kernel (D <= 4): what it computes equals a float64
NumPy brute force, in float64 and float32, near the origin and far from it, and it is
the kernel the E-step runs at those dimensions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyroem
from pyroem.estep import gaussian_small
from pyroem.estep.enumerate import MixtureEStep, score_mixture
from pyroem.model.mixture import MixtureParams

NUM_COMPONENTS = 3
NUM_DATA = 900


def _full_covariances(kind: str, covariances: np.ndarray, dim: int) -> np.ndarray:
    """Every component's covariance as a ``(K, D, D)`` matrix."""
    if kind == "full":
        return covariances
    if kind == "tied":
        return np.repeat(covariances[None], NUM_COMPONENTS, axis=0)
    if kind == "diag":
        return np.stack([np.diag(row) for row in covariances])
    return covariances[:, None, None] * np.eye(dim)


def _reference(
    data: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    frequency: np.ndarray,
) -> dict[str, np.ndarray]:
    """Log-likelihood, log-responsibilities, counts, component means and scatters, each
    row counted ``frequency`` times, from the densities written out in float64."""
    num, dim = data.shape
    log_joint = np.empty((num, len(weights)))
    for k in range(len(weights)):
        deviation = data - means[k]
        inverse = np.linalg.inv(covariances[k])
        quadratic = np.einsum("ni,ij,nj->n", deviation, inverse, deviation)
        _, log_det = np.linalg.slogdet(covariances[k])
        log_joint[:, k] = np.log(weights[k]) - 0.5 * (quadratic + log_det + dim * np.log(2 * np.pi))
    top = log_joint.max(1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(log_joint - top).sum(1))
    log_resp = log_joint - log_norm[:, None]
    resp = np.exp(log_resp) * frequency[:, None]
    counts = resp.sum(0)
    component_means = resp.T @ data / counts[:, None]
    scatter = np.stack(
        [
            (resp[:, k, None] * (data - component_means[k])).T @ (data - component_means[k])
            for k in range(len(weights))
        ]
    )
    return {
        "log_likelihood": float(frequency @ log_norm),
        "log_norm": log_norm,
        "log_resp": log_resp,
        "counts": counts,
        "means": component_means,
        "scatter": scatter,
    }


def _problem(
    kind: str,
    dim: int,
    offset: float,
    spread: float = 1.0,
    seed: int = 0,
    count: int = NUM_COMPONENTS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Data, weights, means, covariances (in ``kind``'s shape) and frequency weights of
    ``count`` components."""
    generator = np.random.default_rng(seed)
    centres = offset + 4.0 * spread * generator.normal(size=(count, dim))
    labels = generator.integers(count, size=NUM_DATA)
    data = centres[labels] + spread * generator.normal(size=(NUM_DATA, dim))
    means = centres + 0.3 * spread * generator.normal(size=centres.shape)
    factors = generator.normal(size=(count, dim, dim)) / np.sqrt(dim)
    full = spread**2 * (factors @ factors.transpose(0, 2, 1) + np.eye(dim))
    covariances = {
        "full": full,
        "tied": full[0],
        "diag": np.diagonal(full, axis1=1, axis2=2).copy(),
        "spherical": np.diagonal(full, axis1=1, axis2=2).mean(1),
    }[kind]
    weights = generator.dirichlet(np.full(count, 5.0))
    frequency = generator.integers(1, 4, size=NUM_DATA).astype(np.float64)
    return data, weights, means, covariances, frequency


def _run(
    kind: str,
    data: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    frequency: np.ndarray,
    dtype: torch.dtype,
):
    """The E-step's result and the scoring's ``(log p(x_n), log r)`` on the data."""
    tensor = torch.from_numpy(data).to(dtype)
    count = len(weights)
    spec = pyroem.Mixture(count, covariance_type=kind, prior=None)
    family = spec.bind(tensor)
    e_step = MixtureEStep(
        family,
        spec.weights_prior,
        tensor,
        chunk_size=400,
        sample_weight=torch.from_numpy(frequency).to(dtype),
    )
    components = family.params_type(
        torch.from_numpy(means).to(dtype), torch.from_numpy(covariances).to(dtype)
    )
    params = MixtureParams(torch.from_numpy(weights).to(dtype), components, torch.arange(count))
    return e_step(params), score_mixture(family, params, tensor, chunk_size=400)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Blocks of 256 rows (several per 400-row chunk, a short one last), and a record of
    the dimensions the small kernel was built for."""
    monkeypatch.setattr(gaussian_small, "SMALL_BLOCK_BYTES", 1)
    built: list[int] = []
    original = gaussian_small.small_kernels

    def recording(components, scratch):
        built.append(components.centres.shape[1])
        return original(components, scratch)

    monkeypatch.setattr("pyroem.model.families.small_kernels", recording)
    return built


def _check(result, scores, reference, dim: int, kind: str, rtol: float) -> None:
    stats = result.stats
    np.testing.assert_allclose(result.log_likelihood, reference["log_likelihood"], rtol=rtol)
    log_norm, log_resp = scores
    np.testing.assert_allclose(log_norm.double().numpy(), reference["log_norm"], rtol=rtol)
    np.testing.assert_allclose(log_resp.double().numpy(), reference["log_resp"], atol=rtol * 100)
    np.testing.assert_allclose(stats.counts.double().numpy(), reference["counts"], rtol=rtol)
    sums = stats.sum_x.double().numpy()
    np.testing.assert_allclose(
        sums / reference["counts"][:, None], reference["means"], rtol=rtol, atol=0
    )
    scatter = reference["scatter"]
    if kind in ("diag", "spherical"):
        scatter = np.diagonal(scatter, axis1=1, axis2=2)
        got = stats.scatter.double().numpy()
        largest = scatter.max(1, keepdims=True)
    else:
        got = stats.scatter.double().numpy()
        largest = np.diagonal(scatter, axis1=1, axis2=2).max(1)[:, None, None]
    # Each scatter relative to its component's largest variance.
    np.testing.assert_allclose(got / largest, scatter / largest, rtol=0, atol=rtol)


@pytest.mark.parametrize("kind", ["full", "diag", "tied", "spherical"])
@pytest.mark.parametrize("dim", [1, 2, 3, 4])
def test_the_small_kernel_gives_the_brute_force_answer(
    kind: str, dim: int, small_blocks: list[int]
) -> None:
    data, weights, means, covariances, frequency = _problem(kind, dim, offset=0.0)
    result, scores = _run(kind, data, weights, means, covariances, frequency, torch.float64)
    assert small_blocks and set(small_blocks) == {dim}
    full = _full_covariances(kind, covariances, dim)
    reference = _reference(data, weights, means, full, frequency)
    _check(result, scores, reference, dim, kind, rtol=1e-12)


@pytest.mark.parametrize("kind", ["full", "diag", "tied"])
@pytest.mark.parametrize("dim", [2, 4])
def test_the_small_kernel_in_float32_is_within_its_rounding(
    kind: str, dim: int, small_blocks: list[int]
) -> None:
    data, weights, means, covariances, frequency = _problem(kind, dim, offset=0.0)
    # The reference on the data and parameters as float32 holds them.
    rounded = [value.astype(np.float32).astype(np.float64) for value in (data, means, covariances)]
    weights = weights.astype(np.float32).astype(np.float64)
    result, scores = _run(kind, data, weights, means, covariances, frequency, torch.float32)
    assert small_blocks and set(small_blocks) == {dim}
    full = _full_covariances(kind, rounded[2], dim)
    reference = _reference(rounded[0], weights, rounded[1], full, frequency)
    # Sums over N = 900 rows of terms each rounded a few times: rounding errors of a
    # few eps per term, adding up like a random walk, 4·sqrt(N)·eps ≈ 1.4e-5 relative.
    eps = float(np.finfo(np.float32).eps)
    _check(result, scores, reference, dim, kind, rtol=4 * np.sqrt(NUM_DATA) * eps)


@pytest.mark.parametrize("kind", ["full", "diag", "tied"])
def test_the_small_kernel_keeps_the_digits_of_clusters_far_from_the_origin(
    kind: str, small_blocks: list[int]
) -> None:
    # Clusters of spread 1e-3 at 1e6 from the origin: raw second moments about the
    # origin would cancel all 16 digits of the scatters (1e12 / 1e-6 = 1e18).
    data, weights, means, covariances, frequency = _problem(
        kind, 2, offset=1e6, spread=1e-3, seed=3
    )
    result, scores = _run(kind, data, weights, means, covariances, frequency, torch.float64)
    assert set(small_blocks) == {2}
    full = _full_covariances(kind, covariances, 2)
    # The reference about the data's own centre, where nothing cancels.
    centre = data.mean(0)
    reference = _reference(data - centre, weights, means - centre, full, frequency)
    reference["means"] = reference["means"] + centre
    # The data are known to 1e6·eps ≈ 2e-10 absolute, 2e-7 of a spread of 1e-3.
    _check(result, scores, reference, 2, kind, rtol=1e-6)


@pytest.mark.parametrize(("dim", "count"), [(5, 3), (4, 8)])
def test_the_other_kernels_take_five_dimensions_and_the_feature_kernel_case(
    dim: int, count: int, small_blocks: list[int]
) -> None:
    # Full covariances: from D = 5, and at D = 4 with K >= 8, where the quadratic-feature
    # kernel is the faster one.
    data, weights, means, covariances, frequency = _problem("full", dim, 0.0, count=count)
    result, scores = _run("full", data, weights, means, covariances, frequency, torch.float64)
    assert small_blocks == []
    reference = _reference(data, weights, means, covariances, frequency)
    _check(result, scores, reference, dim, "full", rtol=1e-12)


def test_diagonal_covariances_take_the_small_kernel_with_many_components(
    small_blocks: list[int],
) -> None:
    data, weights, means, covariances, frequency = _problem("diag", 4, 0.0, count=8)
    result, scores = _run("diag", data, weights, means, covariances, frequency, torch.float64)
    assert set(small_blocks) == {4}
    full = np.stack([np.diag(row) for row in covariances])
    reference = _reference(data, weights, means, full, frequency)
    _check(result, scores, reference, 4, "diag", rtol=1e-12)
