"""Label switching: components permuted on purpose are put back in order.

Draws are built with known component identities; their labels are then permuted
per chain, per draw or for the whole fit with permutations chosen here, and the
alignment must undo exactly those permutations. Fits are relabelled by fitting
the same data from a permuted starting point, an independent source of permuted
labels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pyroem
from pyroem.diagnostics import chain_diagnostics
from pyroem.errors import SpecError
from pyroem.outputs.alignment import (
    align,
    align_draws,
    align_fits,
    component_axes,
    match_components,
)

NUM_CHAINS, NUM_DRAWS = 3, 200


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def _truth() -> dict[str, torch.Tensor]:
    return {
        "weights": torch.tensor([0.2, 0.3, 0.5]),
        "means": torch.tensor([[-5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]),
        "scales": torch.tensor([1.0, 2.0, 0.5]),
        "shared": torch.tensor([0.7, 0.1]),
    }


AXES = {"weights": 0, "means": 0, "scales": 0}


def _draws(seed: int = 0) -> dict[str, torch.Tensor]:
    """Independent draws around the truth, components well separated."""
    generator = torch.Generator().manual_seed(seed)
    draws = {}
    for name, value in _truth().items():
        noise = torch.randn((NUM_CHAINS, NUM_DRAWS, *value.shape), generator=generator)
        draws[name] = value + 0.02 * noise * value.abs().clamp(min=1)
    return draws


def _permute(draws, permutations):
    """``permutations``: (chains, K) or (chains, draws, K); component k ← old perm[k]."""
    index = torch.as_tensor(permutations)
    if index.dim() == 2:
        index = index[:, None, :].expand(NUM_CHAINS, NUM_DRAWS, -1)
    result = dict(draws)
    for name in AXES:
        value = draws[name]
        shape = index.shape + (1,) * (value.dim() - 3)
        result[name] = value.gather(2, index.reshape(shape).expand(value.shape))
    return result


def test_chains_permuted_on_purpose_are_realigned():
    draws = _draws()
    permutations = np.array([[0, 1, 2], [2, 0, 1], [1, 2, 0]])
    scrambled = _permute(draws, permutations)
    before = chain_diagnostics({name: scrambled[name] for name in AXES})
    assert before.max_rhat > 2
    result = align_draws(scrambled, AXES)
    for name, value in draws.items():
        torch.testing.assert_close(result.draws[name], value, rtol=0, atol=0)
    # Undoing a permutation: position k holds what the scrambled chain had at inverse[k].
    expected = np.argsort(permutations, axis=1)
    np.testing.assert_array_equal(result.permutations, expected)
    after = chain_diagnostics({name: result.draws[name] for name in AXES})
    assert after.max_rhat < 1.01


def test_whole_fit_permutation_is_undone_by_a_reference():
    draws = _draws(1)
    permutation = np.array([2, 0, 1])
    scrambled = _permute(draws, np.tile(permutation, (NUM_CHAINS, 1)))
    result = align_draws(scrambled, AXES, reference=_truth())
    for name, value in draws.items():
        torch.testing.assert_close(result.draws[name], value, rtol=0, atol=0)


def test_draws_permuted_one_by_one_are_realigned():
    draws = _draws(2)
    generator = np.random.default_rng(0)
    permutations = np.stack(
        [[generator.permutation(3) for _ in range(NUM_DRAWS)] for _ in range(NUM_CHAINS)]
    )
    permutations[0, 0] = [0, 1, 2]
    scrambled = _permute(draws, permutations)
    per_chain = align_draws(scrambled, AXES)
    assert not torch.equal(per_chain.draws["means"], draws["means"])
    result = align_draws(scrambled, AXES, reference=_truth(), per_draw=True)
    for name, value in draws.items():
        torch.testing.assert_close(result.draws[name], value, rtol=0, atol=0)
    unreferenced = align_draws(scrambled, AXES, per_draw=True)
    # Without a reference the order is the pooled posterior's: one permutation for all.
    order = match_components(
        {name: unreferenced.draws[name].mean((0, 1)) for name in AXES}, _truth(), AXES
    )
    for name in AXES:
        torch.testing.assert_close(
            unreferenced.draws[name].index_select(2, torch.as_tensor(order)), draws[name]
        )


def test_vague_elements_do_not_outweigh_informative_ones():
    """Nearly equal weights with large posterior spread must not decide the match."""
    reference = {"weights": torch.tensor([0.49, 0.51]), "means": torch.tensor([-3.0, 3.0])}
    estimate = {"weights": torch.tensor([0.49, 0.51]), "means": torch.tensor([3.1, -2.9])}
    variance = {"weights": torch.full((2,), 0.05**2), "means": torch.full((2,), 0.1**2)}
    permutation = match_components(
        estimate, reference, {"weights": 0, "means": 0}, estimate_var=variance
    )
    np.testing.assert_array_equal(permutation, [1, 0])


def test_mixture_fit_started_permuted_is_aligned_to_reference():
    spec = pyroem.Mixture(3, "gaussian", covariance_type="full")
    data, _ = spec.simulate(300, seed=4)
    # Tight tolerance: both runs reach the same optimum to ~1e-9, not just to EM's default.
    reference = pyroem.fit(spec, data, seed=0, tol=1e-13, max_iter=5000)
    order = [2, 0, 1]
    start = {name: value[order] for name, value in reference.params.items()}
    permuted = pyroem.fit(spec, data, init=start, tol=1e-13, max_iter=5000)
    assert not torch.allclose(permuted.params["means"], reference.params["means"])
    aligned = align(permuted, reference)
    for name, value in reference.params.items():
        torch.testing.assert_close(aligned.params[name], value, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(aligned.labels.numpy(), reference.labels.numpy())
    torch.testing.assert_close(
        aligned.predict_proba(data), reference.predict_proba(data), rtol=1e-5, atol=1e-6
    )
    assert component_axes(reference) == {"weights": 0, "means": 0, "covariances": 0}


def test_program_fit_aligned_with_its_marginals():
    spec = pyroem.Mixture(2, "poisson")
    data, _ = spec.simulate(200, seed=6, dim=2)
    reference = pyroem.fit(spec, data, seed=0, tol=1e-13, max_iter=5000)
    start = {name: value.flip(0) for name, value in reference.params.items()}
    program_fit = pyroem.fit(spec.model(data, params=start), init=start, tol=1e-13, max_iter=5000)
    assert component_axes(program_fit) == {"rates": 0, "weights": 0}
    # Label-valued draws (as MCMC-EM keeps of z) are renamed with the components.
    labels = program_fit.marginals["assignment"].argmax(-1)
    program_fit.draws = {"assignment": labels.expand(1, 4, -1).clone()}
    aligned = align(program_fit, reference)
    expected = reference.predict(data).expand(1, 4, -1)
    torch.testing.assert_close(aligned.draws["assignment"], expected)
    for name, value in reference.params.items():
        torch.testing.assert_close(aligned.params[name], value, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(
        aligned.marginals["assignment"], reference.predict_proba(data), rtol=1e-6, atol=1e-8
    )


def test_unknown_component_axes_are_an_error():
    with pytest.raises(SpecError, match="no values"):
        align_draws(_draws(), {"nonexistent": 0})
    with pytest.raises(SpecError, match="different sizes"):
        align_draws(_draws(), {"means": 0, "shared": 0})


def test_align_fits_orders_every_fit_like_the_first():
    spec = pyroem.Mixture(2, "poisson")
    data, _ = spec.simulate(150, seed=8, dim=2)
    first = pyroem.fit(spec, data, seed=0, tol=1e-13, max_iter=5000)
    start = {name: value.flip(0) for name, value in first.params.items()}
    second = pyroem.fit(spec, data, init=start, tol=1e-13, max_iter=5000)
    aligned = align_fits({"a": first, "b": second})
    assert aligned["a"] is first
    for name, value in first.params.items():
        torch.testing.assert_close(aligned["b"].params[name], value, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_relabelled_variational_fit_predicts_in_its_new_order(tmp_path, streamed):
    # Three blobs far apart: each point's component is the one whose (aligned) mean is
    # nearest, whatever order the fit holds its components in.
    generator = np.random.default_rng(3)
    centres = np.array([[-8.0, 0.0], [0.0, 8.0], [8.0, 0.0]])
    data = np.concatenate([generator.normal(c, 0.5, size=(60, 2)) for c in centres])
    path = tmp_path / "data.npy"
    np.save(path, data)
    fit = pyroem.fit(
        pyroem.Mixture(3, family="gaussian"),
        str(path) if streamed else data,
        method="vb-em",
        seed=0,
    )
    order = [2, 0, 1]
    reference = {name: value[order] for name, value in fit.params.items()}
    aligned = pyroem.align(fit, reference)
    means = aligned.params["means"].numpy()
    nearest = np.argmin(((data[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(aligned.predict(data).numpy(), nearest)
    np.testing.assert_array_equal(aligned.labels.numpy(), nearest)
    probs = aligned.predict_proba(data).numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(probs.argmax(1), nearest)
    saved = tmp_path / "fit.npz"
    aligned.save(saved)
    np.testing.assert_array_equal(pyroem.load(saved).predict(data).numpy(), nearest)
