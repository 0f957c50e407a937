r"""Conjugate pairs: posterior parameters from a prior and sufficient statistics.

The one home of pyroem's closed forms. Each pair is written once, as the conjugate
posterior's parameters given the prior's and the (weighted) sufficient statistics;
the MAP-EM M-steps take its **mode** (``*_mode``), CAVI takes the posterior itself
and its **expectations** (``*_expected_log``, means). Modes are of densities over
the declared variable (no Jacobian), so e.g. the Dirichlet mode is
``∝ N_k + α_k − 1``; with ``unconstrained=True`` they are modes of the density of
the unconstrained coordinates :mod:`pyroem.program.space` maximises in (logit,
stick-breaking, log), whose log-Jacobian raises each concentration by one.

Modes are computed from prior and statistics, not from the posterior's parameters,
so that statistics far smaller than the prior's pseudo-counts are not rounded away
(``N + (α − 1)``, not ``(N + α) − 1``). A flat prior is ``None``. Pure torch.

Pairs: Dirichlet–categorical (:func:`dirichlet_mode`), Beta–Bernoulli/binomial
(:func:`beta_mode`), Gamma–Poisson/Exponential/Normal precision
(:func:`gamma_posterior`, :func:`gamma_mode`), Inverse-Gamma–Normal variance
(:func:`inverse_gamma_mode`), Normal–Normal with known variance
(:func:`normal_mean_mode`, :func:`mvn_mean_mode`), Inverse-Wishart–MVN with known
mean (:func:`inverse_wishart_mode`) and Normal–Inverse-Wishart in the four covariance
forms of a Gaussian mixture (:func:`niw_posterior`, :func:`niw_mode`).
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


# ---------------------------------------------------------------------------
# Dirichlet–categorical and Beta–Bernoulli
# ---------------------------------------------------------------------------


def dirichlet_mode(counts: Tensor, concentration: Tensor, unconstrained: bool = False) -> Tensor:
    r"""Mode of the posterior ``Dirichlet(concentration + counts)`` on the simplex (last dim).

    .. math:: \pi_c \propto \max(N_c + \alpha_c - 1, 0)

    A zero entry means ``N_c + α_c − 1 ≤ 0``: with ``α_c < 1`` the density is
    unbounded there, so callers must treat zeros as collapsed, not as a maximum.
    ``unconstrained``: ``π_c ∝ N_c + α_c``, always inside the simplex.

    Args:
        counts: expected counts ``N``, shape ``(..., C)``.
        concentration: ``α``, broadcastable to ``counts``.

    Returns:
        Probabilities, shape ``(..., C)``.
    """
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
    r"""Mode of a Bernoulli/binomial probability under ``Beta(a, b)`` (``None``: flat).

    .. math:: p = \frac{s + a - 1}{n + (a - 1) + (b - 1)}

    clipped to ``[0, 1]``; ``unconstrained``: ``(s + a) / (n + a + b)``.

    Args:
        successes: expected successes ``s``; trials: expected trials ``n`` (same shape).
        concentration1, concentration0: ``a``, ``b``, broadcastable to ``successes``.
    """
    if concentration1 is None or concentration0 is None:
        if not unconstrained:
            return (successes / trials).clamp(0, 1)
        concentration1 = concentration0 = torch.ones_like(successes)
    excess1 = concentration1 - 1 + float(unconstrained)
    excess0 = concentration0 - 1 + float(unconstrained)
    return ((successes + excess1) / (trials + excess1 + excess0)).clamp(0, 1)


# ---------------------------------------------------------------------------
# Gamma–Poisson, Gamma–Exponential, Gamma–Normal precision, Inverse-Gamma–Normal variance
# ---------------------------------------------------------------------------


def gamma_posterior(
    shape_stat: Tensor, rate_stat: Tensor, concentration: Tensor, rate: Tensor
) -> tuple[Tensor, Tensor]:
    r"""``Gamma(a + s, b + t)`` for a likelihood ``∝ λ^s e^{−λ t}``.

    Poisson rates: ``s = Σ w x``, ``t = Σ w·exposure``; Exponential rates: ``s = Σ w``,
    ``t = Σ w x``; Normal precisions: ``s = Σ w / 2``, ``t = Σ w r² / 2``.
    """
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
        if not unconstrained:
            return shape_stat / rate_stat
        concentration, rate = torch.ones_like(shape_stat), torch.zeros_like(rate_stat)
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
    r"""Mode of a Normal variance ``v`` under ``InverseGamma(a, b)``, likelihood
    ``∝ v^{−s} e^{−t/v}`` (``s = Σ w / 2``, ``t = Σ w r² / 2``).

    The posterior is ``InverseGamma(a + s, b + t)``, its mode ``(b + t) / (a + s + 1)``;
    flat: ``t / s``; ``unconstrained`` (log coordinates): ``(b + t) / (a + s)``.
    """
    if concentration is None or rate is None:
        if not unconstrained:
            return rate_stat / shape_stat
        concentration, rate = -torch.ones_like(shape_stat), torch.zeros_like(rate_stat)
    return (rate + rate_stat) / (concentration + (1 - float(unconstrained)) + shape_stat)


# ---------------------------------------------------------------------------
# Normal–Normal (known covariance)
# ---------------------------------------------------------------------------


def normal_mean_mode(
    weighted_sum: Tensor,
    precision_sum: Tensor,
    prior_mean: Tensor | None = None,
    prior_precision: Tensor | float | None = None,
) -> Tensor:
    r"""Mean (= mode) of a Normal mean's posterior under ``Normal(μ0, 1/λ0)``:

    .. math:: \frac{λ_0 μ_0 + Σ_n w_n λ_n x_n}{λ_0 + Σ_n w_n λ_n}

    with ``weighted_sum = Σ w λ x`` and ``precision_sum = Σ w λ`` (for a Gaussian
    mixture's mean under ``μ ~ Normal(μ0, Σ/κ0)``: ``S_k``, ``N_k`` and ``κ0``, since the
    update does not depend on Σ). No prior (or ``λ0 = 0``): ``weighted_sum / precision_sum``.
    """
    if prior_mean is None or prior_precision is None:
        return weighted_sum / precision_sum
    if isinstance(prior_precision, float) and prior_precision == 0:
        return weighted_sum / precision_sum
    return (weighted_sum + prior_precision * prior_mean) / (precision_sum + prior_precision)


def mvn_mean_mode(
    information: Tensor,
    weighted_sum: Tensor,
    prior_mean: Tensor | None = None,
    prior_precision: Tensor | None = None,
) -> Tensor:
    r"""Multivariate :func:`normal_mean_mode`: ``(Λ0 + Σ w Λ)⁻¹ (Λ0 μ0 + Σ w Λ x)``.

    Args:
        information: ``Σ w Λ``, ``(R, D, D)``; weighted_sum: ``Σ w Λ x``, ``(R, D)``.
        prior_mean: ``(R, D)``; prior_precision: ``Λ0``, ``(R, D, D)``.

    Returns:
        ``(R, D)``; rows whose total information is singular are NaN.
    """
    if prior_mean is not None and prior_precision is not None:
        information = information + prior_precision
        weighted_sum = weighted_sum + (prior_precision @ prior_mean[..., None])[..., 0]
    solution, info = torch.linalg.solve_ex(information, weighted_sum)
    solution[info > 0] = float("nan")
    return solution


# ---------------------------------------------------------------------------
# Inverse-Wishart–MVN (known mean) and Normal–Inverse-Wishart
# ---------------------------------------------------------------------------


def inverse_wishart_mode(
    scatter: Tensor, counts: Tensor, scale: Tensor | None = None, dof: Tensor | None = None
) -> Tensor:
    r"""Mode of a covariance with known mean under ``InverseWishart(ν, Ψ)``:
    ``(Ψ + S) / (N + ν + D + 1)``; flat: ``S / N``.

    Args:
        scatter: ``S = Σ w (x − μ)(x − μ)ᵀ``, ``(R, D, D)``; counts: ``N = Σ w``, ``(R,)``.
        scale: ``Ψ``, ``(R, D, D)``; dof: ``ν``, ``(R,)``.
    """
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
    r"""``Σ ~ InverseWishart(dof, scale)``, ``μ | Σ ~ Normal(mean, Σ / mean_precision)``.

    ``scale`` is ``(D, D)``; the diag form reads its diagonal (an
    ``InverseGamma(dof/2, scale_dd/2)`` per variance), the spherical form its mean
    diagonal. ``mean_precision = 0``: a flat prior on the means.
    """

    mean: Tensor
    mean_precision: float
    dof: float
    scale: Tensor


class NIWPosterior(NamedTuple):
    r"""The posterior of :class:`NIWPrior`, per covariance form.

    Shapes: mean ``(K, D)``, mean_precision ``(K,)``, dof ``(K,)`` (tied: ``()``),
    scale full ``(K, D, D)``, tied ``(D, D)``, diag ``(K, D)``, spherical ``(K,)``.
    """

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
    r"""``Ψ0 + Σ_n w_nk (x_n − m_k)(x_n − m_k)ᵀ + κ0 (m_k − μ0)(m_k − μ0)ᵀ`` in the form's shape."""
    scatter = scatter_about(scatter, weighted_mean(sum_x, counts) - means, counts)
    deviation = None
    if prior is not None and prior.mean_precision > 0:
        deviation = means - prior.mean
    if covariance_type == "full":
        extra = None if deviation is None else deviation[:, :, None] * deviation[:, None, :]
    elif covariance_type == "tied":
        scatter = scatter.sum(0)
        extra = None if deviation is None else deviation.T @ deviation
    elif covariance_type == "diag":
        extra = None if deviation is None else deviation.square()
    else:
        scatter = scatter.sum(-1)
        extra = None if deviation is None else deviation.square().sum(-1)
    if prior is None:
        return scatter
    total = scatter + niw_prior_scale(prior.scale, covariance_type)
    return total if extra is None else total + prior.mean_precision * extra


def _niw_counts(counts: Tensor, covariance_type: str, dim: int) -> Tensor:
    """The observations each Inverse-Wishart factor sees: ``N_k``, ``Σ N_k`` or ``D·N_k``."""
    if covariance_type == "tied":
        return counts.sum()
    return counts * dim if covariance_type == "spherical" else counts


def _prior_mean(prior: NIWPrior | None) -> tuple[Tensor | None, float]:
    if prior is None or prior.mean_precision == 0:
        return None, 0.0
    return prior.mean, float(prior.mean_precision)


def niw_posterior(
    prior: NIWPrior, counts: Tensor, sum_x: Tensor, scatter: Tensor, covariance_type: str
) -> NIWPosterior:
    r"""The Normal–Inverse-Wishart posterior of a Gaussian mixture's components.

    .. math:: κ_k = κ_0 + N_k,\quad m_k = (κ_0 μ_0 + S_k) / κ_k,\quad ν_k = ν_0 + N_k,
        \quad Ψ_k = Ψ_0 + Σ_n w_{nk} (x_n − m_k)(x_n − m_k)ᵀ + κ_0 (m_k − μ_0)(m_k − μ_0)ᵀ

    (tied: one ``ν = ν0 + Σ N_k`` and ``Ψ`` summed over components; diag: per variance;
    spherical: ``ν_k = ν0 + D N_k``, ``Ψ_k`` the trace).

    Args:
        prior: the prior (``mean_precision > 0``).
        counts: ``N_k`` ``(K,)``; sum_x: ``S_k = Σ_n w_nk x_n`` ``(K, D)``.
        scatter: each component's scatter about its weighted mean, ``(K, D, D)``
            (diag, spherical: its diagonal ``(K, D)``).
        covariance_type: ``"full"``, ``"tied"``, ``"diag"`` or ``"spherical"``.
    """
    kappa = prior.mean_precision + counts
    means = normal_mean_mode(sum_x, counts[:, None], prior.mean, prior.mean_precision)
    scale = _niw_scale(prior, means, counts, sum_x, scatter, covariance_type)
    dof = prior.dof + _niw_counts(counts, covariance_type, sum_x.shape[-1])
    return NIWPosterior(means, kappa, dof, scale)


def niw_mode(
    prior: NIWPrior | None, counts: Tensor, sum_x: Tensor, scatter: Tensor, covariance_type: str
) -> tuple[Tensor, Tensor]:
    r"""The joint mode ``(means, covariances)`` of :func:`niw_posterior`.

    .. math:: \hat μ_k = m_k,\qquad \hat Σ_k = Ψ_k / (N_k + ν_0 + p + 1 + m)

    where ``p`` is the Inverse-Wishart dimension (``D`` full/tied, 1 per variance) and
    ``m`` the number of mean priors each covariance scales (1; tied ``K``; spherical
    ``D``; 0 with ``mean_precision = 0``). ``prior=None``: maximum likelihood.

    Returns:
        means ``(K, D)`` and covariances shaped as :class:`NIWPosterior`'s scale.
    """
    dim = sum_x.shape[-1]
    prior_mean, kappa = _prior_mean(prior)
    means = normal_mean_mode(sum_x, counts[:, None], prior_mean, kappa)
    scale = _niw_scale(prior, means, counts, sum_x, scatter, covariance_type)
    seen = _niw_counts(counts, covariance_type, dim)
    if prior is not None:
        seen = seen + (prior.dof + niw_exponent(covariance_type, dim, sum_x.shape[0], kappa > 0))
    if covariance_type == "full":
        return means, scale / seen[:, None, None]
    return means, scale / (seen[:, None] if covariance_type == "diag" else seen)


# ---------------------------------------------------------------------------
# Statistics shared by the Gaussian closed forms
# ---------------------------------------------------------------------------


def weighted_mean(sum_x: Tensor, counts: Tensor) -> Tensor:
    """``sum_x / counts`` per component ``(K, D)``; ``0`` where a component holds no weight."""
    safe = counts.clamp(min=torch.finfo(counts.dtype).tiny)
    return torch.where(counts[:, None] > 0, sum_x / safe[:, None], torch.zeros_like(sum_x))


def scatter_about(scatter: Tensor, offsets: Tensor, counts: Tensor) -> Tensor:
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
