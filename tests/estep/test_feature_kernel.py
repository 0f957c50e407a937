"""The quadratic-feature kernel of full covariances: the E-step's statistics stay those
of a brute force in NumPy where it runs, and its guard sends the chunks where its
cancellation would lose digits to the whitening kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyroem
from pyroem.estep import gaussian_features
from pyroem.estep.enumerate import MixtureEStep, score_mixture
from pyroem.model import families
from pyroem.model.mixture import MixtureParams

NUM_COMPONENTS = 8


def _brute_force(
    data: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    row_weights: np.ndarray | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Log-likelihood, counts, component means and scatters from the textbook formulas
    (each row counted ``row_weights`` times, if given)."""
    frequency = np.ones(data.shape[0]) if row_weights is None else row_weights
    joint = np.empty((data.shape[0], means.shape[0]))
    for k, (mean, covariance) in enumerate(zip(means, covariances, strict=True)):
        deviations = data - mean
        solved = np.linalg.solve(covariance, deviations.T).T
        mahalanobis = np.einsum("nd,nd->n", deviations, solved)
        log_det = np.linalg.slogdet(covariance)[1]
        joint[:, k] = -0.5 * (mahalanobis + log_det + data.shape[1] * np.log(2 * np.pi))
    joint += np.log(weights)
    peak = joint.max(1, keepdims=True)
    log_likelihood = float((frequency * (np.log(np.exp(joint - peak).sum(1)) + peak[:, 0])).sum())
    resp = np.exp(joint - peak)
    resp /= resp.sum(1, keepdims=True)
    resp *= frequency[:, None]
    counts = resp.sum(0)
    component_means = resp.T @ data / counts[:, None]
    deviations = data[None] - component_means[:, None]
    scatter = np.einsum("nk,knd,kne->kde", resp, deviations, deviations)
    return log_likelihood, counts, component_means, scatter


def _e_step_and_params(
    data: np.ndarray,
    weights: np.ndarray,
    means: np.ndarray,
    covariances: np.ndarray,
    dtype: torch.dtype = torch.float64,
) -> tuple[MixtureEStep, MixtureParams]:
    tensor = torch.from_numpy(data).to(dtype)
    spec = pyroem.Mixture(NUM_COMPONENTS, covariance_type="full", prior=None)
    family = spec.bind(tensor)
    e_step = MixtureEStep(family, spec.weights_prior, tensor, chunk_size=65536)
    components = family.params_type(
        torch.from_numpy(means).to(dtype), torch.from_numpy(covariances).to(dtype)
    )
    params = MixtureParams(
        torch.from_numpy(weights).to(dtype), components, torch.arange(NUM_COMPONENTS)
    )
    return e_step, params


def _e_step(data: np.ndarray, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray):
    e_step, params = _e_step_and_params(data, weights, means, covariances)
    return e_step(params)


def _chunk_loss(data: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """The guard's bound ``(K,)`` for the whole data as one chunk."""
    whiten = torch.linalg.inv(torch.linalg.cholesky(torch.from_numpy(covariances)))
    const = torch.zeros(NUM_COMPONENTS, dtype=torch.float64)
    weights = gaussian_features.feature_weights(torch.from_numpy(means), whiten, const)
    rows = torch.from_numpy(data).T
    centre = rows.mean(1)
    return gaussian_features.feature_loss(weights, rows - centre[:, None], centre).numpy()


def _assert_brute_force(result, data, weights, means, covariances, rtol: float) -> None:
    log_likelihood, counts, component_means, scatter = _brute_force(
        data, weights, means, covariances
    )
    np.testing.assert_allclose(result.log_likelihood, log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(result.stats.counts.numpy(), counts, rtol=rtol)
    sums = result.stats.sum_x.numpy()
    np.testing.assert_allclose(sums / counts[:, None], component_means, rtol=rtol)
    # Each scatter relative to its own largest variance.
    largest = np.diagonal(scatter, axis1=1, axis2=2).max(1)[:, None, None]
    np.testing.assert_allclose(
        result.stats.scatter.numpy() / largest, scatter / largest, rtol=0, atol=rtol
    )


def _covariances(generator: np.random.Generator, dim: int, scale: float) -> np.ndarray:
    factors = generator.normal(size=(NUM_COMPONENTS, dim, dim)) / np.sqrt(dim)
    return scale**2 * (np.einsum("kde,kfe->kdf", factors, factors) + np.eye(dim))


@pytest.mark.parametrize("offset", [0.0, 1e6])
def test_the_feature_kernel_gives_the_brute_force_statistics(offset: float) -> None:
    # Well-conditioned clusters, far from the origin or not: the chunk's own centre
    # keeps the features small, so the guard takes the fast kernel.
    generator = np.random.default_rng(0)
    dim = 6
    centres = offset + 4.0 * generator.normal(size=(NUM_COMPONENTS, dim))
    labels = generator.integers(NUM_COMPONENTS, size=3000)
    data = centres[labels] + generator.normal(size=(3000, dim))
    means = centres + 0.5 * generator.normal(size=centres.shape)
    covariances = _covariances(generator, dim, 1.0)
    weights = generator.dirichlet(np.full(NUM_COMPONENTS, 5.0))
    assert gaussian_features.features_pay(NUM_COMPONENTS, dim)
    loss = _chunk_loss(data, means, covariances)
    assert (loss <= gaussian_features.max_feature_loss(torch.float64)).all()
    result = _e_step(data, weights, means, covariances)
    _assert_brute_force(result, data, weights, means, covariances, rtol=1e-12)


def test_the_guard_whitens_chunks_where_features_would_cancel() -> None:
    # Two groups of tight clusters 1e4 apart in one chunk: about the chunk's centre the
    # second moments are ~1e7 times each cluster's spread (1e-2): raw features would
    # keep fewer than 3 of 16 digits of the scatters.
    generator = np.random.default_rng(1)
    dim = 5
    centres = 0.05 * generator.normal(size=(NUM_COMPONENTS, dim))
    centres[NUM_COMPONENTS // 2 :] += 1e4
    labels = np.repeat(np.arange(NUM_COMPONENTS), 200)
    data = centres[labels] + 1e-2 * generator.normal(size=(labels.size, dim))
    means = np.stack([data[labels == k].mean(0) for k in range(NUM_COMPONENTS)])
    means += 1e-3 * generator.normal(size=means.shape)
    covariances = _covariances(generator, dim, 1e-2)
    weights = np.full(NUM_COMPONENTS, 1.0 / NUM_COMPONENTS)
    loss = _chunk_loss(data, means, covariances)
    assert (loss > gaussian_features.max_feature_loss(torch.float64)).all()
    result = _e_step(data, weights, means, covariances)
    _assert_brute_force(result, data, weights, means, covariances, rtol=1e-10)


def test_each_component_takes_the_kernel_its_own_bound_allows() -> None:
    # Four broad clusters and four tight ones (spread 1e-4) in the same region: the
    # features suit the broad components only (about the chunk's centre the tight ones'
    # second moments are ~1e9 times their variances).
    generator = np.random.default_rng(2)
    dim = 4
    centres = 3.0 * generator.normal(size=(NUM_COMPONENTS, dim))
    spreads = np.repeat([1.0, 1e-4], NUM_COMPONENTS // 2)
    labels = np.repeat(np.arange(NUM_COMPONENTS), 250)
    data = centres[labels] + spreads[labels, None] * generator.normal(size=(labels.size, dim))
    means = np.stack([data[labels == k].mean(0) for k in range(NUM_COMPONENTS)])
    means += 0.1 * spreads[:, None] * generator.normal(size=means.shape)
    covariances = _covariances(generator, dim, 1.0) * spreads[:, None, None] ** 2
    weights = np.full(NUM_COMPONENTS, 1.0 / NUM_COMPONENTS)
    fast = _chunk_loss(data, means, covariances) <= gaussian_features.max_feature_loss(
        torch.float64
    )
    np.testing.assert_array_equal(fast, spreads == 1.0)
    result = _e_step(data, weights, means, covariances)
    _assert_brute_force(result, data, weights, means, covariances, rtol=1e-10)


def test_the_whitening_kernel_works_in_cache_sized_blocks() -> None:
    # K = 8, D = 64 (beyond the features' range): one chunk of 3,000 rows is whitened
    # in blocks of about WHITEN_BLOCK_BYTES, its statistics summed block by block, and
    # no (K, D, n) tensor of deviations is kept from the log-densities to the statistics.
    generator = np.random.default_rng(3)
    dim, size = 64, 3000
    centres = 3.0 * generator.normal(size=(NUM_COMPONENTS, dim))
    labels = generator.integers(NUM_COMPONENTS, size=size)
    data = centres[labels] + generator.normal(size=(size, dim))
    means = centres + 0.3 * generator.normal(size=centres.shape)
    covariances = _covariances(generator, dim, 1.0)
    weights = generator.dirichlet(np.full(NUM_COMPONENTS, 5.0))
    assert not gaussian_features.features_pay(NUM_COMPONENTS, dim)
    e_step, params = _e_step_and_params(data, weights, means, covariances)
    assert len(e_step.chunks) == 1
    result = e_step(params)
    _assert_brute_force(result, data, weights, means, covariances, rtol=1e-12)
    # The deviations of the whole chunk would take NUM_COMPONENTS * dim * size * 8 bytes
    # (12 MiB); beside the chunk's own (D, n) copy, every temporary kept is at most one
    # block's.
    block_bytes = families.WHITEN_BLOCK_BYTES
    assert NUM_COMPONENTS * dim * size * 8 > 4 * block_bytes
    held = {
        name: value.numel() * value.element_size()
        for name, value in e_step.workspace.items()
        if name != "rows"
    }
    assert held and max(held.values()) <= block_bytes, held


def test_float32_chunks_no_component_can_take_the_features_are_never_centred() -> None:
    # Clusters 8 apart in float32: even the bound from below, from each coordinate's
    # range, exceeds float32's limit (eps^(-1/3), about 200) for every component, so
    # the chunk goes to the whitening kernel without a centred copy or the exact bound.
    generator = np.random.default_rng(4)
    dim, size = 6, 3000
    centres = 8.0 * generator.normal(size=(NUM_COMPONENTS, dim))
    labels = generator.integers(NUM_COMPONENTS, size=size)
    data = centres[labels] + generator.normal(size=(size, dim))
    means = centres + 0.5 * generator.normal(size=centres.shape)
    covariances = _covariances(generator, dim, 1.0)
    weights = generator.dirichlet(np.full(NUM_COMPONENTS, 5.0))
    e_step, params = _e_step_and_params(data, weights, means, covariances, torch.float32)
    rows = e_step.chunks[0].T
    centre = rows.mean(1)
    features = gaussian_features.feature_weights(
        params.components.means,
        torch.linalg.inv(torch.linalg.cholesky(params.components.covariances)),
        torch.zeros(NUM_COMPONENTS),
    )
    floor = gaussian_features.feature_loss_floor(features, rows, centre)
    exact = gaussian_features.feature_loss(features, rows - centre[:, None], centre)
    assert (floor <= exact).all()
    assert (floor > gaussian_features.max_feature_loss(torch.float32)).all()
    result = e_step(params)
    assert "centred" not in e_step.workspace
    # Against the float64 brute force on the values float32 holds: each log-density is
    # a length-D dot product of whitened values (rounding <= D eps each step); 8 D eps
    # covers the few steps, relative to each quantity's own scale.
    eps = float(torch.finfo(torch.float32).eps)
    rtol = 8 * dim * eps

    def held(array: np.ndarray) -> np.ndarray:
        return array.astype(np.float32).astype(np.float64)

    reference = _brute_force(held(data), held(weights), held(means), held(covariances))
    log_likelihood, counts, component_means, scatter = reference
    assert abs(result.log_likelihood - log_likelihood) <= rtol * abs(log_likelihood)
    np.testing.assert_allclose(result.stats.counts.double().numpy(), counts, rtol=rtol)
    sums = result.stats.sum_x.double().numpy()
    scale = np.abs(data).max()
    np.testing.assert_allclose(sums / counts[:, None], component_means, rtol=0, atol=rtol * scale)
    largest = np.diagonal(scatter, axis1=1, axis2=2).max(1)[:, None, None]
    np.testing.assert_allclose(
        result.stats.scatter.double().numpy() / largest, scatter / largest, rtol=0, atol=rtol
    )


def test_weighted_chunks_with_failing_components_run_fused_in_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Four broad and four tight components (half pass the bound), rows with frequency
    # weights, 5,000 rows in one chunk (four blocks of features of 1 MiB): the log-densities,
    # responsibilities and moments run block by block over the features and the
    # failing components' deviations, with no (P, n) array of the chunk's features
    # kept; the statistics and the weighted log-likelihood stay the brute force's.
    generator = np.random.default_rng(5)
    dim, size = 12, 5000
    centres = 3.0 * generator.normal(size=(NUM_COMPONENTS, dim))
    spreads = np.repeat([1.0, 1e-4], NUM_COMPONENTS // 2)
    labels = generator.integers(NUM_COMPONENTS, size=size)
    data = centres[labels] + spreads[labels, None] * generator.normal(size=(size, dim))
    means = np.stack([data[labels == k].mean(0) for k in range(NUM_COMPONENTS)])
    means += 0.1 * spreads[:, None] * generator.normal(size=means.shape)
    covariances = _covariances(generator, dim, 1.0) * spreads[:, None, None] ** 2
    weights = generator.dirichlet(np.full(NUM_COMPONENTS, 5.0))
    frequency = generator.integers(0, 4, size=size).astype(np.float64)
    monkeypatch.setattr(gaussian_features, "FEATURE_BLOCK_BYTES", 2**20)
    loss = _chunk_loss(data, means, covariances)
    assert (loss <= gaussian_features.max_feature_loss(torch.float64)).sum() == 4
    tensor = torch.from_numpy(data)
    spec = pyroem.Mixture(NUM_COMPONENTS, covariance_type="full", prior=None)
    family = spec.bind(tensor)
    e_step = MixtureEStep(
        family,
        spec.weights_prior,
        tensor,
        chunk_size=65536,
        sample_weight=torch.from_numpy(frequency),
    )
    assert len(e_step.chunks) == 1 and e_step.chunks[0].shape[0] == size
    components = family.params_type(torch.from_numpy(means), torch.from_numpy(covariances))
    params = MixtureParams(torch.from_numpy(weights), components, torch.arange(NUM_COMPONENTS))
    result = e_step(params)
    num_features = gaussian_features.feature_count(dim)
    assert gaussian_features.feature_block_rows(num_features, 8) * 3 < size
    held = {name: value.numel() for name, value in e_step.workspace.items()}
    assert max(held.values()) < num_features * size, held
    log_likelihood, counts, component_means, scatter = _brute_force(
        data, weights, means, covariances, frequency
    )
    np.testing.assert_allclose(result.log_likelihood, log_likelihood, rtol=1e-12)
    np.testing.assert_allclose(result.stats.counts.numpy(), counts, rtol=1e-10)
    sums = result.stats.sum_x.numpy()
    np.testing.assert_allclose(sums / counts[:, None], component_means, rtol=1e-10)
    largest = np.diagonal(scatter, axis1=1, axis2=2).max(1)[:, None, None]
    np.testing.assert_allclose(
        result.stats.scatter.numpy() / largest, scatter / largest, rtol=0, atol=1e-10
    )


def test_scoring_with_failing_components_gives_the_brute_force_values() -> None:
    # Scoring reads the log-densities alone (no statistics): the features for every
    # component in one product, the four tight components' rows then whitened.
    generator = np.random.default_rng(6)
    dim, size = 6, 2000
    centres = 3.0 * generator.normal(size=(NUM_COMPONENTS, dim))
    spreads = np.repeat([1.0, 1e-4], NUM_COMPONENTS // 2)
    labels = generator.integers(NUM_COMPONENTS, size=size)
    data = centres[labels] + spreads[labels, None] * generator.normal(size=(size, dim))
    means = np.stack([data[labels == k].mean(0) for k in range(NUM_COMPONENTS)])
    means += 0.1 * spreads[:, None] * generator.normal(size=means.shape)
    covariances = _covariances(generator, dim, 1.0) * spreads[:, None, None] ** 2
    weights = generator.dirichlet(np.full(NUM_COMPONENTS, 5.0))
    loss = _chunk_loss(data, means, covariances)
    assert (loss <= gaussian_features.max_feature_loss(torch.float64)).sum() == 4
    e_step, params = _e_step_and_params(data, weights, means, covariances)
    pointwise, log_resp = score_mixture(e_step.family, params, torch.from_numpy(data))
    joint = np.empty((size, NUM_COMPONENTS))
    for k, (mean, covariance) in enumerate(zip(means, covariances, strict=True)):
        deviations = data - mean
        solved = np.linalg.solve(covariance, deviations.T).T
        mahalanobis = np.einsum("nd,nd->n", deviations, solved)
        log_det = np.linalg.slogdet(covariance)[1]
        joint[:, k] = np.log(weights[k]) - 0.5 * (mahalanobis + log_det + dim * np.log(2 * np.pi))
    peak = joint.max(1, keepdims=True)
    expected = np.log(np.exp(joint - peak).sum(1)) + peak[:, 0]
    np.testing.assert_allclose(pointwise.numpy(), expected, rtol=1e-12, atol=1e-9)
    # Responsibilities above float64's resolution agree to 1e-9 absolute.
    np.testing.assert_allclose(
        np.exp(log_resp.numpy()), np.exp(joint - expected[:, None]), rtol=0, atol=1e-9
    )


def test_tied_covariances_with_failing_components_give_the_brute_force_statistics() -> None:
    # One covariance shared by every component (its constant too); the far half of the
    # components fails the rounding bound on every chunk, so their rows are whitened.
    generator = np.random.default_rng(7)
    dim, size = 5, 2000
    data = 0.5 * generator.normal(size=(size, dim))
    means = 0.3 * generator.normal(size=(NUM_COMPONENTS, dim))
    means[NUM_COMPONENTS // 2 :] += 20.0
    covariance = 1e-3 * np.eye(dim)
    weights = np.full(NUM_COMPONENTS, 1.0 / NUM_COMPONENTS)
    tensor = torch.from_numpy(data)
    spec = pyroem.Mixture(NUM_COMPONENTS, covariance_type="tied", prior=None)
    family = spec.bind(tensor)
    components = family.params_type(torch.from_numpy(means), torch.from_numpy(covariance))
    params = MixtureParams(torch.from_numpy(weights), components, torch.arange(NUM_COMPONENTS))
    shared = np.broadcast_to(covariance, (NUM_COMPONENTS, dim, dim))
    with np.errstate(invalid="ignore"):  # the far components' means: 0 / 0
        expected = _brute_force(data, weights, means, shared)[0]
    result = MixtureEStep(family, spec.weights_prior, tensor, chunk_size=512)(params)
    assert float(result.log_likelihood) == pytest.approx(expected, rel=1e-12)
    pointwise = score_mixture(family, params, tensor)[0]
    assert float(pointwise.sum()) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 5, 7, 8])
def test_the_features_are_every_pair_once_and_give_the_gaussian_log_density(dim: int) -> None:
    # The quadratic features come shift by shift from one broadcast product (odd and
    # even D, where the half shift is built apart): each unordered pair of coordinates
    # once, and W·φ equals SciPy's multivariate normal log-density.
    from scipy.stats import multivariate_normal

    generator = np.random.default_rng(7)
    size = 53
    data = generator.normal(size=(size, dim)) + 2.0
    means = data[:3] + 0.1
    covariances = np.stack([_covariances(generator, dim, 1.0)[k] for k in range(3)])
    rows, cols = gaussian_features.feature_pairs(dim)
    pairs = sorted(zip(rows.tolist(), cols.tolist(), strict=True))
    assert sorted((min(i, j), max(i, j)) for i, j in pairs) == [
        (i, j) for i in range(dim) for j in range(i, dim)
    ]
    chunk = torch.from_numpy(data).T
    centre = chunk.mean(1)
    centred = chunk - centre[:, None]
    features = torch.empty(gaussian_features.feature_count(dim), size, dtype=torch.float64)
    # Into a strided slice of a wider buffer, as the kept features are written.
    wider = torch.zeros(features.shape[0], size + 9, dtype=torch.float64)
    gaussian_features.feature_rows(centred, wider[:, 4 : 4 + size])
    gaussian_features.feature_rows(centred, features)
    np.testing.assert_array_equal(wider[:, 4 : 4 + size].numpy(), features.numpy())
    whiten = torch.linalg.inv(torch.linalg.cholesky(torch.from_numpy(covariances)))
    log_det = np.linalg.slogdet(covariances)[1]
    const = torch.from_numpy(-0.5 * (dim * np.log(2 * np.pi) + log_det))
    weights = gaussian_features.feature_weights(torch.from_numpy(means), whiten, const)
    log_prob = gaussian_features.feature_coefficients(weights, centre) @ features
    expected = [multivariate_normal(means[k], covariances[k]).logpdf(data) for k in range(3)]
    np.testing.assert_allclose(log_prob.numpy(), np.reshape(expected, (3, size)), rtol=1e-12)


def test_failing_components_take_the_features_moments_where_confirmed(monkeypatch) -> None:
    # Four broad clusters near the origin and one far away (so that the chunk's largest
    # |y|² is ~2,000) pass the chunk bound; three components with a thin direction fail
    # it but are predicted to keep their moments' accuracy (λ_max(|μ_k − c|² + tr Σ_k)
    # within it): they are whitened for their log-densities only and take the features'
    # moments, which moment_losses confirms for two tight ones. The third sits at the
    # chunk's centre with broad variances but takes a cluster 30 away (its weighted
    # mean far from the centre), so its moments are refused once the chunk is done and
    # the chunk runs again with them whitened. Every statistic stays the brute force's.
    generator = np.random.default_rng(8)
    dim, size = 5, 3000
    centres = np.zeros((NUM_COMPONENTS, dim))
    centres[:4] = 3.0 * generator.normal(size=(4, dim))
    centres[4:7] = np.array([10.0, 10.0, 30.0])[:, None] * np.eye(dim)[:3]
    centres[7] = 45.0 * np.ones(dim) / np.sqrt(dim)
    thin = np.array([1.0] * 4 + [0.05])
    spreads = np.ones((NUM_COMPONENTS, dim))
    spreads[4:6] = 0.08
    spreads[6] = thin
    labels = generator.integers(NUM_COMPONENTS, size=size)
    data = centres[labels] + spreads[labels] * generator.normal(size=(size, dim))
    means = np.stack([data[labels == k].mean(0) for k in range(NUM_COMPONENTS)])
    covariances = _covariances(generator, dim, 1.0)
    covariances[4:6] *= 0.08**2
    # At the centre, but on its cluster's line in the thin direction.
    means[6, :4] = data.mean(0)[:4]
    covariances[6] = np.diag([25.0] * 4 + [0.05**2])
    weights = np.full(NUM_COMPONENTS, 1.0 / NUM_COMPONENTS)
    loss = _chunk_loss(data, means, covariances)
    limit = gaussian_features.max_feature_loss(torch.float64)
    np.testing.assert_array_equal(loss > limit, [False] * 4 + [True] * 3 + [False])
    seen = []

    def recorded(weights, moments):
        losses = gaussian_features.moment_losses(weights, moments)
        seen.append(losses.numpy().copy())
        return losses

    monkeypatch.setattr(families, "moment_losses", recorded)
    result = _e_step(data, weights, means, covariances)
    # One check of the one chunk: components 4 and 5 confirmed, 6 refused.
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0][4:7] <= limit, [True, True, False])
    _assert_brute_force(result, data, weights, means, covariances, rtol=1e-10)
