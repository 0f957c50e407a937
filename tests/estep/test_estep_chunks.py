"""The E-step cuts large chunks by bytes, and its statistics stay those of a brute
force in NumPy (log-densities, responsibilities, per-component weighted scatters)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyroem
import pyroem.estep.enumerate as enumerate_module
from pyroem.estep.enumerate import CHUNK_BYTES, MIN_CHUNK_ROWS, MixtureEStep
from pyroem.model.mixture import MixtureParams

NUM_DATA, DIM, NUM_COMPONENTS = 9000, 32, 8


def _log_densities(data: np.ndarray, means: np.ndarray, covariances: np.ndarray) -> np.ndarray:
    """``log N(x_n | μ_k, Σ_k)`` ``(N, K)`` from the textbook formula."""
    out = np.empty((data.shape[0], means.shape[0]))
    for k, (mean, covariance) in enumerate(zip(means, covariances, strict=True)):
        deviations = data - mean
        mahalanobis = np.einsum("nd,nd->n", deviations, np.linalg.solve(covariance, deviations.T).T)
        log_det = np.linalg.slogdet(covariance)[1]
        out[:, k] = -0.5 * (mahalanobis + log_det + data.shape[1] * np.log(2 * np.pi))
    return out


def _expected_rows(family: object, fused: bool = True) -> int:
    """Rows of a chunk cut by the family's bytes a row (full covariances hold ``(K, rows)``
    and ``(D + shifts, rows)`` arrays a chunk, diagonal ones a ``(K, 2D, rows)`` table)."""
    row_bytes = family.chunk_row_bytes(NUM_COMPONENTS, DIM, 8, fused)  # type: ignore[attr-defined]
    return max(MIN_CHUNK_ROWS, enumerate_module.CHUNK_BYTES // row_bytes)


@pytest.fixture
def small_chunk_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a quarter of the bytes, so that these data take several."""
    monkeypatch.setattr(enumerate_module, "CHUNK_BYTES", CHUNK_BYTES // 4)


@pytest.mark.usefixtures("small_chunk_bytes")
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_a_large_chunk_is_cut_by_bytes_with_the_brute_force_statistics(kind: str) -> None:
    generator = np.random.default_rng(3)
    # Data 50 spreads from the origin; the current means far from where the
    # responsibilities put each component's mean, so the moments about them must be
    # shifted exactly.
    data = 50.0 + generator.normal(0.0, 1.0, (NUM_DATA, DIM)) * generator.uniform(0.5, 2.0, DIM)
    means = 50.0 + 3.0 * generator.normal(size=(NUM_COMPONENTS, DIM))
    variances = generator.uniform(1.0, 4.0, (NUM_COMPONENTS, DIM))
    if kind == "full":
        factors = generator.normal(size=(NUM_COMPONENTS, DIM, DIM)) / np.sqrt(DIM)
        covariances = np.einsum("kde,kfe->kdf", factors, factors) + np.eye(DIM)
        dense = covariances
    else:
        covariances = variances
        dense = np.stack([np.diag(v) for v in variances])
    weights = generator.dirichlet(np.full(NUM_COMPONENTS, 3.0))

    # Brute force.
    joint = _log_densities(data, means, dense) + np.log(weights)
    peak = joint.max(1, keepdims=True)
    log_evidence = float((np.log(np.exp(joint - peak).sum(1)) + peak[:, 0]).sum())
    resp = np.exp(joint - peak)
    resp /= resp.sum(1, keepdims=True)
    counts = resp.sum(0)
    component_means = resp.T @ data / counts[:, None]
    deviations = data[None] - component_means[:, None]  # (K, N, D)
    scatter = np.einsum("nk,knd,kne->kde", resp, deviations, deviations)
    if kind == "diag":
        scatter = np.diagonal(scatter, axis1=1, axis2=2)

    tensor = torch.from_numpy(data)
    spec = pyroem.Mixture(NUM_COMPONENTS, covariance_type=kind, prior=None)
    family = spec.bind(tensor)
    e_step = MixtureEStep(family, spec.weights_prior, tensor, chunk_size=65536)
    rows = _expected_rows(family)
    assert rows < NUM_DATA
    assert [len(chunk) for chunk in e_step.chunks] == [rows, rows, NUM_DATA - 2 * rows]

    components = family.params_type(torch.from_numpy(means), torch.from_numpy(covariances))
    params = MixtureParams(torch.from_numpy(weights), components, torch.arange(NUM_COMPONENTS))
    result = e_step(params)
    np.testing.assert_allclose(result.log_likelihood, log_evidence, rtol=1e-12)
    np.testing.assert_allclose(result.stats.counts.numpy(), counts, rtol=1e-10)
    sums = result.stats.sum_x.numpy() + counts[:, None] * family.shift.numpy()
    np.testing.assert_allclose(sums / counts[:, None], component_means, rtol=1e-12)
    np.testing.assert_allclose(result.stats.scatter.numpy(), scatter, rtol=1e-9, atol=1e-9)


def _mixture_problem(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Data, weights, means and covariances (dense ``(K, D, D)``) away from the origin."""
    generator = np.random.default_rng(5)
    data = 20.0 + generator.normal(0.0, 1.5, (NUM_DATA, DIM))
    means = 20.0 + 2.0 * generator.normal(size=(NUM_COMPONENTS, DIM))
    factors = generator.normal(size=(NUM_COMPONENTS, DIM, DIM)) / np.sqrt(DIM)
    covariances = np.einsum("kde,kfe->kdf", factors, factors) + np.eye(DIM)
    if kind == "diag":
        covariances = np.stack([np.diag(np.diagonal(c)) for c in covariances])
    weights = generator.dirichlet(np.full(NUM_COMPONENTS, 3.0))
    return data, weights, means, covariances


@pytest.mark.usefixtures("small_chunk_bytes")
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_scoring_is_cut_by_bytes_with_the_brute_force_scores(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyroem.estep.enumerate import score_mixture

    data, weights, means, dense = _mixture_problem(kind)
    joint = _log_densities(data, means, dense) + np.log(weights)
    peak = joint.max(1, keepdims=True)
    log_evidence = np.log(np.exp(joint - peak).sum(1)) + peak[:, 0]

    tensor = torch.from_numpy(data)
    spec = pyroem.Mixture(NUM_COMPONENTS, covariance_type=kind, prior=None)
    family = spec.bind(tensor)
    # Every chunk the scoring pass prepares: each bounds the kernels' temporaries.
    seen: list[int] = []
    prepare = type(family).prepare
    monkeypatch.setattr(
        type(family), "prepare", lambda self, x: seen.append(x.shape[0]) or prepare(self, x)
    )
    covariances = dense if kind == "full" else np.diagonal(dense, axis1=1, axis2=2).copy()
    components = family.params_type(torch.from_numpy(means), torch.from_numpy(covariances))
    params = MixtureParams(torch.from_numpy(weights), components, torch.arange(NUM_COMPONENTS))
    pointwise, log_resp = score_mixture(family, params, tensor, chunk_size=65536)

    rows = _expected_rows(family)
    assert rows < NUM_DATA
    assert seen == [rows, rows, NUM_DATA - 2 * rows]
    np.testing.assert_allclose(pointwise.numpy(), log_evidence, rtol=1e-12)
    np.testing.assert_allclose(log_resp.numpy(), joint - log_evidence[:, None], atol=1e-9)


def test_the_estep_reads_the_data_in_place_without_a_second_copy() -> None:
    data, *_ = _mixture_problem("full")
    tensor = torch.from_numpy(data)
    spec = pyroem.Mixture(NUM_COMPONENTS, prior=None)
    e_step = MixtureEStep(spec.bind(tensor), spec.weights_prior, tensor, chunk_size=65536)
    storage = tensor.untyped_storage().data_ptr()
    assert all(chunk.untyped_storage().data_ptr() == storage for chunk in e_step.chunks)


def test_chunks_for_the_plain_statistics_keep_the_component_by_dimension_rule() -> None:
    # Full covariances run the E-step's chunks block by block (features or whitening):
    # a chunk holds (K, rows) and (D + shifts, rows) arrays, so its chunks are longer
    # than those of the plain statistics (CAVI's), which hold (K, D, rows) ones.
    data, *_ = _mixture_problem("full")
    tensor = torch.from_numpy(np.concatenate([data] * 3))
    spec = pyroem.Mixture(NUM_COMPONENTS, prior=None)
    family = spec.bind(tensor)
    fused = MixtureEStep(family, spec.weights_prior, tensor, chunk_size=65536)
    plain = MixtureEStep(family, spec.weights_prior, tensor, chunk_size=65536, fused=False)
    assert plain.chunk_size == max(MIN_CHUNK_ROWS, CHUNK_BYTES // (NUM_COMPONENTS * DIM * 8))
    # (D + ⌊(D − 1)/2⌋, rows): the chunk about its centre wrapped around, D = 32 > K = 8.
    assert fused.chunk_size == CHUNK_BYTES // ((DIM + (DIM - 1) // 2) * 8) > plain.chunk_size
    assert sum(len(chunk) for chunk in fused.chunks) == tensor.shape[0]
