r"""Conjugate pairs, each written once: posterior parameters from prior + statistics.

MAP-EM M-steps (mixture families, the Pyro program's recognised closed forms) take the
posterior's **mode** (``*_mode``), CAVI the posterior and its **expectations**. Modes are
of densities over the declared variable (the Dirichlet mode is ``∝ N + α − 1``); with
``unconstrained=True`` they are of the coordinates :mod:`pyroem.model.space` uses
(logit, stick-breaking, log), whose log-Jacobian moves each concentration by one. They
are computed from prior and statistics, ``N + (α − 1)`` rather than ``(N + α) − 1``, so
that statistics far below the pseudo-counts are not rounded away. A flat prior is
``None`` (maximum likelihood, no Jacobian). Pure torch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "NIWPosterior",
    "NIWPrior",
    "beta_mode",
    "beta_posterior",
    "dirichlet_expected_log",
    "dirichlet_mode",
    "gamma_expected_log",
    "gamma_mode",
    "gamma_posterior",
    "inverse_gamma_mode",
    "inverse_wishart_mode",
    "mvn_mean_mode",
    "niw_dim",
    "niw_divide",
    "niw_exponent",
    "niw_mode",
    "niw_posterior",
    "niw_prior_scale",
    "normal_mean_mode",
    "scatter_about",
    "weighted_mean",
    "wishart_expected_log_det",
]

Tensor = torch.Tensor


def dirichlet_mode(
    counts: Tensor, concentration: Tensor | None, unconstrained: bool = False
) -> Tensor:
    r"""Mode of ``Dirichlet(α + N)`` (last dim): ``π_c ∝ max(N_c + α_c − 1, 0)``.

    A zero entry means ``N_c + α_c − 1 ≤ 0``: with ``α_c < 1`` the density is unbounded
    there, so callers must treat zeros as collapsed, not as a maximum.
    ``unconstrained``: ``π_c ∝ N_c + α_c``. Shapes: counts ``(..., C)``, α broadcastable;
    ``None``: flat, ``π_c ∝ N_c``.
    """
    if concentration is None:
        return counts / counts.sum(-1, keepdim=True)
    # counts + (α − 1), not (counts + α) − 1: the latter rounds counts below eps·α to 0,
    # which with α = 1 would drop a small but live component.
    unnormalised = (counts + (concentration - 1 + float(unconstrained))).clamp(min=0)
    return unnormalised / unnormalised.sum(-1, keepdim=True)


def dirichlet_expected_log(concentration: Tensor) -> Tensor:
    r"""``E[log π_c] = ψ(α_c) − ψ(Σ_c α_c)`` under ``Dirichlet(α)`` (last dim; a Beta is
    the pair ``(α_1, α_0)``)."""
    total = concentration.sum(-1, keepdim=True)
    return torch.special.digamma(concentration) - torch.special.digamma(total)


def beta_posterior(
    successes: Tensor, trials: Tensor, concentration1: Tensor, concentration0: Tensor
) -> tuple[Tensor, Tensor]:
    """``Beta(a + s, b + n − s)``: the posterior's ``(concentration1, concentration0)``."""
    return concentration1 + successes, concentration0 + (trials - successes).clamp(min=0)


def beta_mode(
    successes: Tensor,
    trials: Tensor,
    concentration1: Tensor | None = None,
    concentration0: Tensor | None = None,
    unconstrained: bool = False,
) -> Tensor:
    r"""Mode of :func:`beta_posterior`: ``(s + a − 1) / (n + a + b − 2)`` in ``[0, 1]``;
    flat: ``s / n``; ``unconstrained`` (logit): ``(s + a) / (n + a + b)``."""
    if concentration1 is None or concentration0 is None:
        return (successes / trials).clamp(0, 1)
    excess1 = concentration1 - 1 + float(unconstrained)
    excess0 = concentration0 - 1 + float(unconstrained)
    return ((successes + excess1) / (trials + excess1 + excess0)).clamp(0, 1)


def gamma_posterior(
    shape_stat: Tensor, rate_stat: Tensor, concentration: Tensor, rate: Tensor
) -> tuple[Tensor, Tensor]:
    r"""``Gamma(a + s, b + t)`` for a likelihood ``∝ λ^s e^{−λ t}``: Poisson rates
    ``s = Σ w x``, ``t = Σ w·exposure``; Exponential ``s = Σ w``, ``t = Σ w x``; Normal
    precisions ``s = Σ w/2``, ``t = Σ w r²/2``."""
    return concentration + shape_stat, rate + rate_stat


def gamma_mode(
    shape_stat: Tensor,
    rate_stat: Tensor,
    concentration: Tensor | None = None,
    rate: Tensor | None = None,
    unconstrained: bool = False,
) -> Tensor:
    r"""Mode of :func:`gamma_posterior`: ``max(s + a − 1, 0) / (t + b)``; flat: ``s / t``;
    ``unconstrained`` (log coordinates): ``(s + a) / (t + b)``."""
    if concentration is None or rate is None:
        return shape_stat / rate_stat
    return (shape_stat + (concentration - 1 + float(unconstrained))).clamp(min=0) / (
        rate_stat + rate
    )


def gamma_expected_log(concentration: Tensor, rate: Tensor) -> Tensor:
    """``E[log λ] = ψ(a) − log b`` under ``Gamma(a, b)``."""
    return torch.special.digamma(concentration) - rate.log()


def inverse_gamma_mode(
    shape_stat: Tensor,
    rate_stat: Tensor,
    concentration: Tensor | None = None,
    rate: Tensor | None = None,
    unconstrained: bool = False,
) -> Tensor:
    r"""Mode of a Normal variance under ``InverseGamma(a, b)`` and a likelihood
    ``∝ v^{−s} e^{−t/v}`` (``s = Σ w/2``, ``t = Σ w r²/2``): the posterior is
    ``InverseGamma(a + s, b + t)``, its mode ``(b + t) / (a + s + 1)``; flat: ``t / s``;
    ``unconstrained`` (log): ``(b + t) / (a + s)``."""
    if concentration is None or rate is None:
        return rate_stat / shape_stat
    return (rate + rate_stat) / (concentration + (1 - float(unconstrained)) + shape_stat)


def normal_mean_mode(
    weighted_sum: Tensor,
    precision_sum: Tensor,
    prior_mean: Tensor | None = None,
    prior_precision: Tensor | float | None = None,
) -> Tensor:
    r"""Mean (= mode) of a Normal mean under ``Normal(μ0, 1/λ0)`` and known precisions
    ``λ_n``: ``(λ0 μ0 + Σ w λ x) / (λ0 + Σ w λ)`` from ``weighted_sum = Σ w λ x`` and
    ``precision_sum = Σ w λ``; flat: their ratio. (A Gaussian mixture's mean under
    ``Normal(μ0, Σ/κ0)``: ``S_k``, ``N_k``, ``κ0``, whatever Σ.)"""
    if prior_mean is None or prior_precision is None:
        return weighted_sum / precision_sum
    return (weighted_sum + prior_precision * prior_mean) / (precision_sum + prior_precision)


def mvn_mean_mode(
    information: Tensor,
    weighted_sum: Tensor,
    prior_mean: Tensor | None = None,
    prior_precision: Tensor | None = None,
) -> Tensor:
    r"""Multivariate :func:`normal_mean_mode`, ``(Λ0 + Σ w Λ)⁻¹ (Λ0 μ0 + Σ w Λ x)``, from
    ``information = Σ w Λ`` ``(R, D, D)`` and ``weighted_sum`` ``(R, D)``; prior mean
    ``(R, D)``, precision ``(R, D, D)``. Rows with singular information are NaN."""
    if prior_mean is not None and prior_precision is not None:
        information = information + prior_precision
        weighted_sum = weighted_sum + (prior_precision @ prior_mean[..., None])[..., 0]
    solution, info = torch.linalg.solve_ex(information, weighted_sum)
    solution[info > 0] = float("nan")
    return solution


def inverse_wishart_mode(
    scatter: Tensor, counts: Tensor, scale: Tensor | None = None, dof: Tensor | None = None
) -> Tensor:
    r"""Mode of a covariance with known mean under ``InverseWishart(ν, Ψ)``,
    ``(Ψ + S) / (N + ν + D + 1)``; flat: ``S / N``. Scatter ``S = Σ w (x − μ)(x − μ)ᵀ`` and
    Ψ ``(R, D, D)``, counts ``N = Σ w`` and ν ``(R,)``."""
    if scale is None or dof is None:
        return scatter / counts[:, None, None]
    return (scale + scatter) / (counts + (dof + scatter.shape[-1] + 1))[:, None, None]


def wishart_expected_log_det(dof: Tensor, dim: int) -> Tensor:
    r"""``E[log|Λ|] + log|Ψ| = Σ_{i<p} ψ((ν − i)/2) + p log 2`` for ``Σ = Λ⁻¹ ~
    InverseWishart(ν, Ψ)`` of dimension ``p``, per entry of ``dof``."""
    offsets = torch.arange(dim, dtype=dof.dtype, device=dof.device)
    digammas = torch.special.digamma(0.5 * (dof[..., None] - offsets)).sum(-1)
    return digammas + dim * math.log(2.0)


class NIWPrior(NamedTuple):
    r"""``Σ ~ InverseWishart(dof, scale)``, ``μ | Σ ~ Normal(mean, Σ / mean_precision)``;
    ``scale`` ``(D, D)``, of which diag reads the diagonal (``InverseGamma(dof/2,
    scale_dd/2)`` per variance), spherical its mean. ``mean_precision = 0``: flat means.
    ``weight`` τ: the log density counts τ times, which is the same form with scale τΨ,
    mean precision τκ and τ times the pseudo-counts ``ν + p + 1 + m`` (:func:`niw_exponent`)."""

    mean: Tensor
    mean_precision: float
    dof: float
    scale: Tensor
    weight: float = 1.0


class NIWPosterior(NamedTuple):
    r"""The posterior of :class:`NIWPrior`: mean ``(K, D)``, mean_precision ``(K,)``, dof
    ``(K,)`` (tied ``()``), scale full ``(K, D, D)``, tied ``(D, D)``, diag ``(K, D)``,
    spherical ``(K,)``."""

    mean: Tensor
    mean_precision: Tensor
    dof: Tensor
    scale: Tensor


def niw_dim(covariance_type: str, dim: int) -> int:
    """The dimension ``p`` of each Inverse-Wishart factor: ``D`` (full, tied) or 1."""
    return dim if covariance_type in ("full", "tied") else 1


def niw_exponent(covariance_type: str, dim: int, num_components: int, mean_prior: bool) -> int:
    """``p + 1 + m``: what the mode's denominator adds to ``ν``; ``m`` is the number of
    mean priors ``Normal(μ0, Σ/κ0)`` that each covariance scales (none if flat)."""
    factors = {"full": 1, "diag": 1, "spherical": dim, "tied": num_components}
    return niw_dim(covariance_type, dim) + 1 + (factors[covariance_type] if mean_prior else 0)


def niw_prior_scale(scale: Tensor, covariance_type: str) -> Tensor:
    """A ``(D, D)`` prior scale in the form's shape: ``(D, D)``, ``(D,)`` or ``()``."""
    if covariance_type in ("full", "tied"):
        return scale
    diagonal = torch.diagonal(scale)
    return diagonal.clone() if covariance_type == "diag" else diagonal.mean()


def _niw_scale(
    prior: NIWPrior | None,
    means: Tensor,
    counts: Tensor,
    sum_x: Tensor,
    scatter: Tensor,
    covariance_type: str,
) -> Tensor:
    r"""``Ψ0 + Σ_n w_nk (x_n − m_k)(x_n − m_k)ᵀ + κ0 (m_k − μ0)(m_k − μ0)ᵀ``, form's shape."""
    scatter = scatter_about(scatter, weighted_mean(sum_x, counts) - means, counts)
    if prior is not None and prior.mean_precision > 0:
        kappa = torch.full_like(counts, prior.mean_precision)
        scatter = scatter_about(scatter, means - prior.mean, kappa)
    if covariance_type in ("tied", "spherical"):
        scatter = scatter.sum(0 if covariance_type == "tied" else -1)
    return scatter if prior is None else scatter + niw_prior_scale(prior.scale, covariance_type)


def _niw_counts(counts: Tensor, covariance_type: str, dim: int) -> Tensor:
    """The observations each Inverse-Wishart factor sees: ``N_k``, ``Σ N_k`` or ``D·N_k``."""
    if covariance_type == "tied":
        return counts.sum()
    return counts * dim if covariance_type == "spherical" else counts


def niw_posterior(
    prior: NIWPrior, counts: Tensor, sum_x: Tensor, scatter: Tensor, covariance_type: str
) -> NIWPosterior:
    r"""The Normal–Inverse-Wishart posterior of a Gaussian mixture's components:
    ``κ_k = κ0 + N_k``, ``m_k = (κ0 μ0 + S_k) / κ_k``, ``ν_k = ν0 + N_k`` and
    ``Ψ_k = Ψ0 + Σ_n w_nk (x_n − m_k)(x_n − m_k)ᵀ + κ0 (m_k − μ0)(m_k − μ0)ᵀ`` (tied: one
    ``ν0 + Σ N_k`` and ``Ψ`` summed over components; diag: per variance; spherical:
    ``ν0 + D N_k`` and the trace).

    Args:
        counts: ``N_k`` ``(K,)``; sum_x: ``S_k = Σ_n w_nk x_n`` ``(K, D)``; scatter: about
            each component's weighted mean, ``(K, D, D)`` (diag, spherical: ``(K, D)``).
        covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
    """
    if prior.weight != 1.0:
        tau, mean_prior = prior.weight, prior.mean_precision > 0
        pseudo = niw_exponent(covariance_type, sum_x.shape[-1], sum_x.shape[0], mean_prior)
        prior = NIWPrior(
            prior.mean,
            tau * prior.mean_precision,
            tau * (prior.dof + pseudo) - pseudo,
            tau * prior.scale,
        )
    kappa = prior.mean_precision + counts
    means = normal_mean_mode(sum_x, counts[:, None], prior.mean, prior.mean_precision)
    scale = _niw_scale(prior, means, counts, sum_x, scatter, covariance_type)
    dof = prior.dof + _niw_counts(counts, covariance_type, sum_x.shape[-1])
    return NIWPosterior(means, kappa, dof, scale)


def niw_mode(
    prior: NIWPrior | None, counts: Tensor, sum_x: Tensor, scatter: Tensor, covariance_type: str
) -> tuple[Tensor, Tensor]:
    r"""The joint mode of :func:`niw_posterior`: the means ``m_k`` ``(K, D)`` and covariances
    ``Ψ_k / (N_k + ν0 + p + 1 + m)`` (:func:`niw_exponent`) shaped as its scale;
    ``prior=None``: maximum likelihood."""
    dim = sum_x.shape[-1]
    if prior is None:
        means = sum_x / counts[:, None]
        scale = _niw_scale(None, means, counts, sum_x, scatter, covariance_type)
        seen = _niw_counts(counts, covariance_type, dim)
    else:
        means, _, dof, scale = niw_posterior(prior, counts, sum_x, scatter, covariance_type)
        mean_prior = prior.mean_precision > 0
        seen = dof + niw_exponent(covariance_type, dim, sum_x.shape[0], mean_prior)
    return means, niw_divide(scale, seen, covariance_type)


def niw_divide(scale: Tensor, divisor: Tensor, covariance_type: str) -> Tensor:
    """``scale / divisor`` with one divisor per Inverse-Wishart factor, ``(K,)`` (tied
    ``()``), broadcast over the form's scale: a covariance from ``Ψ`` and its pseudo-counts
    (the mode's, or ``ν − p − 1`` for the posterior mean ``E[Σ]``)."""
    if covariance_type == "full":
        return scale / divisor[:, None, None]
    return scale / (divisor[:, None] if covariance_type == "diag" else divisor)


def weighted_mean(sum_x: Tensor, counts: Tensor) -> Tensor:
    """``sum_x / counts`` per component ``(K, D)``; ``0`` where a component holds no weight."""
    safe = counts.clamp(min=torch.finfo(counts.dtype).tiny)
    return torch.where(counts[:, None] > 0, sum_x / safe[:, None], torch.zeros_like(sum_x))


def scatter_about(scatter: Tensor, offsets: Tensor, counts: Tensor) -> Tensor:
    r"""Scatter about other centres, ``Σ_n w_nk (x_n − μ_k)(x_n − μ_k)ᵀ``, from the scatter
    ``S_k`` ``(K, D, D)`` (or its diagonal ``(K, D)``) about each component's weighted mean
    ``m_k``: ``S_k + N_k (m_k − μ_k)(m_k − μ_k)ᵀ`` (offsets ``m_k − μ_k`` ``(K, D)``, counts
    ``N_k`` ``(K,)``), with no cancellation."""
    if scatter.ndim == 2:
        return scatter + counts[:, None] * offsets.square()
    outer = offsets[:, :, None] * offsets[:, None, :]
    return scatter + counts[:, None, None] * outer
