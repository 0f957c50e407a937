"""``pyroem.InverseWishart`` against SciPy's ``invwishart`` and torch's ``Wishart``."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pyroem import InverseWishart


def _random_spd(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A well-conditioned random SPD matrix, ``(dim, dim)`` float64."""
    factor = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    return factor @ factor.T + 0.5 * torch.eye(dim, dtype=torch.float64)


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
@pytest.mark.parametrize("df_excess", [0.3, 1.0, 4.5, 20.0])
def test_log_prob_matches_scipy(dim: int, df_excess: float) -> None:
    generator = torch.Generator().manual_seed(10 * dim + int(df_excess))
    df = dim - 1 + df_excess
    scale = _random_spd(dim, generator)
    values = torch.stack([_random_spd(dim, generator) for _ in range(6)])
    got = InverseWishart(df, scale).log_prob(values)
    reference = stats.invwishart(df=df, scale=scale.numpy())
    expected = [reference.logpdf(v.numpy() if dim > 1 else v.numpy()[0, 0]) for v in values]
    torch.testing.assert_close(
        got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-10
    )


def test_log_prob_is_the_wishart_density_of_the_inverse() -> None:
    """``p_IW(Σ) = p_W(Σ⁻¹; ν, Ψ⁻¹) · |Σ|^{-(D+1)}`` (Jacobian of matrix inversion)."""
    generator = torch.Generator().manual_seed(3)
    dim, df = 3, 6.5
    scale = _random_spd(dim, generator)
    values = torch.stack([_random_spd(dim, generator) for _ in range(5)])
    wishart = torch.distributions.Wishart(df, precision_matrix=scale)
    expected = wishart.log_prob(torch.linalg.inv(values)) - (dim + 1) * torch.logdet(values)
    torch.testing.assert_close(InverseWishart(df, scale).log_prob(values), expected)


def test_batched_parameters_broadcast() -> None:
    generator = torch.Generator().manual_seed(4)
    dim = 2
    dfs = torch.tensor([2.5, 7.0], dtype=torch.float64)
    scales = torch.stack([_random_spd(dim, generator) for _ in range(2)])
    values = torch.stack([_random_spd(dim, generator) for _ in range(3)])[:, None]
    distribution = InverseWishart(dfs, scales)
    assert distribution.batch_shape == (2,)
    assert distribution.event_shape == (dim, dim)
    got = distribution.log_prob(values)
    assert got.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            expected = stats.invwishart(df=float(dfs[j]), scale=scales[j].numpy()).logpdf(
                values[i, 0].numpy()
            )
            assert math.isclose(float(got[i, j]), expected, rel_tol=1e-12)
    expanded = InverseWishart(dfs[0], scales[0]).expand((4,))
    assert expanded.batch_shape == (4,)
    torch.testing.assert_close(
        expanded.log_prob(values[0, 0]),
        InverseWishart(dfs[0], scales[0]).log_prob(values[0, 0]).expand(4),
    )


@pytest.mark.parametrize("dim", [1, 2, 4])
def test_mean_and_mode_match_scipy(dim: int) -> None:
    generator = torch.Generator().manual_seed(dim)
    scale = _random_spd(dim, generator)
    df = dim + 3.5
    distribution = InverseWishart(df, scale)
    expected_mean = np.atleast_2d(stats.invwishart.mean(df, scale.numpy()))
    expected_mode = np.atleast_2d(stats.invwishart.mode(df, scale.numpy()))
    torch.testing.assert_close(distribution.mean, torch.from_numpy(expected_mean))
    torch.testing.assert_close(distribution.mode, torch.from_numpy(expected_mode))


def test_mode_maximises_the_density() -> None:
    generator = torch.Generator().manual_seed(5)
    dim, df = 3, 4.2
    scale = _random_spd(dim, generator)
    distribution = InverseWishart(df, scale)
    at_mode = distribution.log_prob(distribution.mode)
    for _ in range(20):
        direction = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
        step = 1e-3 * (direction + direction.T)
        assert float(distribution.log_prob(distribution.mode + step)) < float(at_mode)


def test_sample_moments() -> None:
    """Sample means of ``Σ`` and ``Σ⁻¹`` match ``Ψ/(ν−D−1)`` and ``ν Ψ⁻¹`` within 5 standard
    errors, for each member of a batch of parameters."""
    torch.manual_seed(0)
    dim, num = 3, 40_000
    generator = torch.Generator().manual_seed(6)
    dfs = torch.tensor([12.0, 9.5], dtype=torch.float64)
    scales = torch.stack([_random_spd(dim, generator) for _ in range(2)])
    samples = InverseWishart(dfs, scales).sample((num,))
    assert samples.shape == (num, 2, dim, dim)
    assert bool((torch.linalg.eigvalsh(samples) > 0).all())
    torch.testing.assert_close(samples, samples.mT)
    for member in range(2):
        df, scale = float(dfs[member]), scales[member]
        draws = samples[:, member]
        for values, expected in (
            (draws, scale / (df - dim - 1)),
            (torch.linalg.inv(draws), df * torch.linalg.inv(scale)),
        ):
            error = values.mean(0) - expected
            standard_error = values.std(0) / math.sqrt(num)
            assert bool((error.abs() < 5 * standard_error).all()), (error, standard_error)


def test_samples_follow_scipy_distribution() -> None:
    """Two-sample Kolmogorov–Smirnov tests on scalar summaries of the draws."""
    torch.manual_seed(1)
    dim, df, num = 2, 4.5, 5_000
    scale = _random_spd(dim, torch.Generator().manual_seed(7))
    ours = InverseWishart(df, scale).sample((num,)).numpy()
    theirs = stats.invwishart(df=df, scale=scale.numpy()).rvs(size=num, random_state=2)
    for summary in (
        lambda s: s[:, 0, 0],
        lambda s: s[:, 0, 1],
        lambda s: np.linalg.slogdet(s)[1],
    ):
        assert stats.ks_2samp(summary(ours), summary(theirs)).pvalue > 1e-3


def test_rsample_is_differentiable() -> None:
    scale = torch.eye(2, dtype=torch.float64).requires_grad_()
    draw = InverseWishart(5.0, scale).rsample((3,))
    draw.sum().backward()
    assert scale.grad is not None
    assert bool(torch.isfinite(scale.grad).all())


def test_rejects_too_few_degrees_of_freedom() -> None:
    with pytest.raises(ValueError, match="df > dim - 1"):
        InverseWishart(1.5, torch.eye(3, dtype=torch.float64))
