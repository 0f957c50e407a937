"""Closed-form M-steps: modes of conjugate conditional posteriors.

Each function returns the maximiser of ``Q(θ) + log p(θ)`` for one parameter
block, in the parameterisation the Pyro program declares (densities over the
declared variable, so e.g. the Dirichlet mode ``∝ N_k + α_k − 1``). Inputs are
expected sufficient statistics under responsibilities ``w_nk``:
``N_k = Σ_n w_nk`` and ``S_k = Σ_n w_nk t(x_n)``. Pure torch, no Pyro effects.
"""

from __future__ import annotations

import torch

__all__ = [
    "dirichlet_mode",
    "gamma_exponential_rate_mode",
    "gamma_poisson_rate_mode",
    "normal_mean_mode",
    "probabilities_mode",
    "scatter_about",
    "weighted_mean",
]


def dirichlet_mode(counts: torch.Tensor, concentration: torch.Tensor) -> torch.Tensor:
    r"""Mode of Dirichlet(concentration + counts) on the simplex (last dim).

    .. math:: \pi_c \propto \max(N_c + \alpha_c - 1, 0)

    A zero entry means ``N_c + α_c − 1 ≤ 0``: with ``α_c < 1`` the density is
    unbounded there, so callers must treat zeros as collapsed, not as a maximum.

    Args:
        counts: expected counts ``N``, shape ``(..., C)``.
        concentration: ``α``, broadcastable to ``counts``.

    Returns:
        Probabilities, shape ``(..., C)``.
    """
    # counts + (α − 1), not (counts + α) − 1: the latter rounds counts below eps·α to 0,
    # which with α = 1 would drop a small but live component.
    unnormalised = (counts + (concentration - 1)).clamp(min=0)
    return unnormalised / unnormalised.sum(-1, keepdim=True)


def probabilities_mode(
    counts: torch.Tensor, totals: torch.Tensor, concentration: torch.Tensor | None
) -> torch.Tensor:
    r"""Mode of categorical / Bernoulli probabilities under a Dirichlet / Beta prior.

    ``p_c = (S_c + α_c − 1) / (N + Σ_c (α_c − 1))``; with no prior ``p_c = S_c / N``.
    Priors are required to have ``α ≥ 1`` so the numerator never goes negative.

    Args:
        counts: expected category counts ``S``, shape ``(..., C)``.
        totals: expected number of trials ``N``, broadcastable to ``(..., 1)``.
        concentration: ``α`` broadcastable to ``counts``, or ``None`` (flat).
    """
    if concentration is None:
        return counts / totals
    excess = (concentration - 1).expand_as(counts)
    return (counts + excess) / (totals + excess.sum(-1, keepdim=True))


def normal_mean_mode(
    sum_x: torch.Tensor,
    counts: torch.Tensor,
    prior_mean: torch.Tensor | None,
    mean_precision: float,
) -> torch.Tensor:
    r"""Mode of a Normal mean under ``μ ~ Normal(μ0, Σ/κ0)``: ``(κ0 μ0 + S) / (κ0 + N)``.

    The conjugate mean update does not depend on Σ, so it is exact for the joint
    mode too. ``κ0 = 0`` (or no prior) gives the weighted sample mean.

    Args:
        sum_x: ``Σ_n w_nk x_n``, shape ``(K, D)``.
        counts: ``N_k``, shape ``(K,)``.
        prior_mean: ``μ0``, shape ``(D,)`` or ``None``.
        mean_precision: ``κ0 ≥ 0``.
    """
    if prior_mean is None or mean_precision == 0:
        return sum_x / counts[:, None]
    return (mean_precision * prior_mean + sum_x) / (mean_precision + counts[:, None])


def weighted_mean(sum_x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sum_x / counts`` per component ``(K, D)``; ``0`` where a component holds no weight."""
    safe = counts.clamp(min=torch.finfo(counts.dtype).tiny)
    return torch.where(counts[:, None] > 0, sum_x / safe[:, None], torch.zeros_like(sum_x))


def scatter_about(
    scatter: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    r"""Scatter about other centres: ``Σ_n w_nk (x_n − μ_k)(x_n − μ_k)ᵀ``.

    From the scatter ``S_k`` about each component's weighted mean ``m_k`` it is
    ``S_k + N_k (m_k − μ_k)(m_k − μ_k)ᵀ``, with no cancellation.

    Args:
        scatter: ``S_k``, shape ``(K, D, D)``, or its diagonal ``(K, D)``.
        offsets: ``m_k − μ_k``, shape ``(K, D)``.
        counts: ``N_k``, shape ``(K,)``.

    Returns:
        Scatter matrices shaped as ``scatter``.
    """
    if scatter.ndim == 2:
        return scatter + counts[:, None] * offsets.square()
    outer = offsets[:, :, None] * offsets[:, None, :]
    return scatter + counts[:, None, None] * outer


def gamma_poisson_rate_mode(
    sum_x: torch.Tensor,
    counts: torch.Tensor,
    concentration: torch.Tensor | None,
    rate: torch.Tensor | None,
) -> torch.Tensor:
    r"""Poisson rate under a Gamma(a, b) prior: ``(S + a − 1) / (N + b)``; flat: ``S / N``.

    Args:
        sum_x: ``Σ_n w_nk x_n``, shape ``(K, D)``.
        counts: ``N_k``, shape ``(K,)``, or per coordinate ``(K, D)`` (missing entries).
        concentration: ``a ≥ 1``, shape ``(D,)`` or ``None``.
        rate: ``b``, shape ``(D,)`` or ``None``.
    """
    totals = counts[:, None] if counts.ndim == 1 else counts
    if concentration is None or rate is None:
        return sum_x / totals
    return (sum_x + (concentration - 1)) / (totals + rate)


def gamma_exponential_rate_mode(
    sum_x: torch.Tensor,
    counts: torch.Tensor,
    concentration: torch.Tensor | None,
    rate: torch.Tensor | None,
) -> torch.Tensor:
    r"""Exponential rate under a Gamma(a, b) prior: ``(N + a − 1) / (S + b)``; flat: ``N / S``.

    Args:
        sum_x: ``Σ_n w_nk x_n``, shape ``(K, D)``.
        counts: ``N_k``, shape ``(K,)``, or per coordinate ``(K, D)`` (missing entries).
        concentration: ``a ≥ 1``, shape ``(D,)`` or ``None``.
        rate: ``b``, shape ``(D,)`` or ``None``.
    """
    totals = counts[:, None] if counts.ndim == 1 else counts
    if concentration is None or rate is None:
        return totals / sum_x
    return (totals + (concentration - 1)) / (sum_x + rate)
